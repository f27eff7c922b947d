//! Cost of sizing a prompt for its hold: the byte bound every request pays (`request::read`, which
//! also parses the body), and the tokenizer count with its margin that only a tenant near its
//! floor pays (`bill::counted_prompt_bound`'s measure). Run:
//! `cargo bench -p tollgate --bench prompt_bound`.

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::plugin::Operation;
use tollgate::request;

fn chat_body(bytes: usize) -> String {
    let text = "lorem ipsum ".repeat(bytes / 12);
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]}).to_string()
}

fn prompt_bounds(criterion: &mut Criterion) {
    for kib in [1, 16, 128] {
        let body = chat_body(kib << 10);
        let value: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        criterion.bench_function(&format!("read with byte bound {kib} KiB"), |bench| {
            bench.iter(|| {
                request::read(Operation::Chat, body.clone(), &value).expect("a valid body")
            });
        });
        criterion.bench_function(&format!("tokenizer bound {kib} KiB"), |bench| {
            bench.iter(|| {
                request::prompt_bound(&value, &|text: &str| {
                    (tollgate::tokens::count(text) * 3).div_ceil(2)
                })
            });
        });
    }
}

criterion_group!(benches, prompt_bounds);
criterion_main!(benches);
