//! The `anthropic` plugin's client side (`/v1/messages`): converting a client's Messages body to
//! OpenAI's shape, forwarding it, reading forwarded streams, and writing OpenAI answers and chunks
//! as Messages. Nothing panics; everything it emits is a JSON object; a forwarded body keeps the
//! routed model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_fuzz::{assert_object, context};
use tollgate_plugin_sdk::inbound::{ConvertStream, Endpoint, ForwardStream, Inbound, Usage};
use tollgate_plugin_sdk::translator::StreamEvent;
use tollgate_translator_anthropic::{ConvertedStream, ForwardedStream, Messages};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(body).into_owned();
    let endpoint = if mode & 8 == 0 {
        Endpoint::Messages
    } else {
        Endpoint::CountTokens
    };
    match mode % 5 {
        0 => {
            if let Ok(chat) = Messages::to_openai_request(endpoint, text) {
                assert_object(&chat);
            }
        }
        1 => {
            if let Ok(request) = Messages::forward_request(endpoint, context(true), text, Vec::new())
            {
                // Values pass as raw text: a number no f64 holds (`1e3888`) is valid JSON that
                // the upstream judges, so read the body without converting its values.
                let sent: std::collections::BTreeMap<String, &serde_json::value::RawValue> =
                    serde_json::from_slice(&request.body).expect("a forwarded body is JSON");
                assert_eq!(sent["model"].get(), r#""m-up""#, "the routed model");
            }
        }
        2 => {
            let mut stream = ForwardedStream::new(context(true));
            for line in text.split('\n') {
                let (event, data) = line.split_once(' ').unwrap_or(("", line));
                let pushed = stream.push(StreamEvent {
                    event: (!event.is_empty()).then(|| event.to_owned()),
                    data: data.to_owned(),
                });
                match pushed {
                    Ok(events) => assert_eq!(events.len(), 1, "passed through one for one"),
                    Err(_) => break,
                }
            }
            let _ = stream.finish();
        }
        3 => {
            let mut stream = ConvertedStream::new(context(true));
            for line in text.split('\n') {
                match stream.push(line.to_owned()) {
                    Ok(events) => events.iter().for_each(|event| assert_object(&event.data)),
                    Err(_) => return,
                }
            }
            let usage = Usage {
                input_tokens: u64::from(mode),
                cache_read_tokens: u64::from(mode / 2),
                cache_write_tokens: 0,
                output_tokens: 3,
                reasoning_tokens: 0,
                estimated: false,
            };
            if let Ok(events) = stream.finish(usage) {
                events.iter().for_each(|event| assert_object(&event.data));
            }
        }
        _ => {
            if let Ok(message) = Messages::from_openai_response(context(false), text) {
                assert_object(&message);
            }
        }
    }
});
