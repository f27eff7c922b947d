//! The host's event framing (SSE and NDJSON): any bytes, cut anywhere, frame to the same events as
//! the whole body at once, and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::plugin::translator::{StreamEvent, StreamFraming};
use tollgate::sse::EventFramer;

fn frame(framing: StreamFraming, pieces: &[&[u8]]) -> Vec<(Option<String>, String)> {
    let mut framer = EventFramer::new(framing);
    let mut events: Vec<StreamEvent> = Vec::new();
    for piece in pieces {
        events.extend(framer.push(piece));
    }
    events.extend(framer.finish());
    events
        .into_iter()
        .map(|event| (event.event, event.data))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, body)) = data.split_first() else {
        return;
    };
    for framing in [StreamFraming::Sse, StreamFraming::Ndjson] {
        let whole = frame(framing, &[body]);
        // Cut into pieces of a length chosen by the input, as a network would deliver them.
        let size = usize::from(cut_seed % 17) + 1;
        let pieces: Vec<&[u8]> = body.chunks(size).collect();
        assert_eq!(
            whole,
            frame(framing, &pieces),
            "framing depends on where the body was cut"
        );
    }
});
