//! The `anthropic` translator's decoding of upstream answers, error bodies and stream events:
//! nothing panics, and every chunk it emits is a JSON object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_fuzz::{assert_object, context};
use tollgate_plugin_sdk::translator::{StreamEvent, StreamTranslate, Translator, UpstreamResponse};
use tollgate_translator_anthropic::{Anthropic, AnthropicStream};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let response = UpstreamResponse {
                status: 200,
                headers: Vec::new(),
                body: body.to_vec(),
            };
            if let Ok(answer) = Anthropic::chat_response(context(false), response) {
                assert_object(&answer.body);
                assert!(answer.usage.cache_read_tokens <= answer.usage.input_tokens);
            }
        }
        1 => {
            let response = UpstreamResponse {
                status: 400 + u16::from(mode),
                headers: vec![(
                    "retry-after".into(),
                    String::from_utf8_lossy(body.get(..4).unwrap_or(body)).into_owned(),
                )],
                body: body.to_vec(),
            };
            let failure = Anthropic::read_failure(context(false), response);
            assert!(!failure.message.is_empty());
        }
        _ => {
            let mut stream = AnthropicStream::new(context(mode & 4 != 0));
            for line in String::from_utf8_lossy(body).split('\n') {
                match stream.push(StreamEvent {
                    event: None,
                    data: line.to_owned(),
                }) {
                    Ok(chunks) => chunks.iter().for_each(|chunk| assert_object(chunk)),
                    Err(_) => break,
                }
            }
            if let Ok(end) = stream.finish() {
                end.chunks.iter().for_each(|chunk| assert_object(chunk));
            }
        }
    }
});
