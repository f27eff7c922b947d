//! The `gemini` translator's decoding of whole answers, embeddings, error bodies and stream events:
//! nothing panics, and every chunk it emits is a JSON object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_fuzz::{assert_object, context};
use tollgate_plugin_sdk::translator::{StreamEvent, StreamTranslate, Translator, UpstreamResponse};
use tollgate_translator_gemini::{Gemini, GeminiStream};

fn response(status: u16, body: &[u8]) -> UpstreamResponse {
    UpstreamResponse {
        status,
        headers: Vec::new(),
        body: body.to_vec(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            if let Ok(answer) = Gemini::chat_response(context(false), response(200, body)) {
                assert_object(&answer.body);
                assert!(answer.usage.cache_read_tokens <= answer.usage.input_tokens);
                assert!(answer.usage.reasoning_tokens <= answer.usage.output_tokens);
            }
        }
        1 => {
            let failure =
                Gemini::read_failure(context(false), response(400 + u16::from(mode), body));
            assert!(!failure.message.is_empty());
        }
        2 => {
            if let Ok(answer) = Gemini::embeddings_response(context(false), response(200, body)) {
                assert_object(&answer.body);
            }
        }
        _ => {
            let mut stream = GeminiStream::new(context(mode & 4 != 0));
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
