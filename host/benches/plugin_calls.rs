//! Cost of one plugin call of each role through the real runtime: a fresh instance from the cached
//! `InstancePre`, the call, and dropping its store. Run: `cargo bench -p tollgate --bench plugin_calls`.
//!
//! The runtime is single-threaded, as the gateway's workers are, and never idle: the calls never
//! wait, so the tasks that would drop stores and make instances ahead never run, and each call
//! makes its instance and drops its store itself, as on a saturated worker.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::plugin::Operation;
use tollgate::plugin::billing::{CallOutcome, ChargeRequest};
use tollgate::plugin::router::{Channel, ChannelModel, Circuit, RequestFacts};
use tollgate::plugin::translator::{AttemptContext, RequestKind, StreamEvent, Usage};
use tollgate::plugin::{Binding, Limits, PluginRuntime, Role, RuntimeSettings, shipped};

fn bind(
    runtime: &Arc<PluginRuntime>,
    tokio: &tokio::runtime::Runtime,
    role: Role,
    name: &str,
    config: &str,
) -> Binding {
    let plugin = shipped::find(role, name).expect("a shipped plugin");
    let compiled = runtime
        .load(name, role, plugin.bytes, None)
        .expect("the shipped plugin compiles");
    tokio
        .block_on(Binding::new(
            runtime.clone(),
            compiled,
            config.to_owned(),
            Limits::default(),
        ))
        .expect("the config is valid")
}

fn chat_body(bytes: usize) -> String {
    let text = "lorem ipsum ".repeat(bytes / 12);
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]}).to_string()
}

fn benchmarks(criterion: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let cache = tempfile::tempdir().expect("a temp dir");
    let runtime = PluginRuntime::new(&RuntimeSettings {
        max_instances: 100,
        max_memory_bytes: 256 << 20,
        cache_dir: cache.path().to_owned(),
        max_instances_per_tenant: None,
    })
    .expect("the engine starts");
    let router = bind(&runtime, &tokio, Role::Router, "failover", "{}");
    let translator = bind(&runtime, &tokio, Role::Translator, "openai", "{}");
    let billing = bind(
        &runtime,
        &tokio,
        Role::Billing,
        "price-table",
        r#"{"models":{"m":{"input":150000,"output":600000}}}"#,
    );

    let facts = RequestFacts {
        request_id: "bench".into(),
        tenant: "t".into(),
        key_id: "k".into(),
        operation: Operation::Chat,
        model: "m".into(),
        stream: false,
        estimated_input_tokens: 300,
        max_output_tokens: None,
        tags: vec![],
    };
    let channels: Vec<Channel> = (0..3)
        .map(|index| Channel {
            name: format!("c{index}"),
            protocol: "openai".into(),
            models: vec![ChannelModel {
                public_name: "m".into(),
                upstream_name: "m".into(),
                price_per_million_input_micros: None,
                price_per_million_output_micros: None,
                circuit: Circuit::Closed,
            }],
            priority: index,
            weight: 1,
            circuit: Circuit::Closed,
            latency_ewma_ms: None,
            ttfb_ewma_ms: None,
            error_rate_permille: 0,
            in_flight: 0,
        })
        .collect();
    let context = AttemptContext {
        request_id: "bench".into(),
        operation: Operation::Chat,
        public_model: "m".into(),
        upstream_model: "m-up".into(),
        channel: "c0".into(),
        channel_options: "{}".into(),
        stream: true,
        include_usage: false,
        created_unix_s: 0,
    };
    let usage = Usage {
        input_tokens: 300,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 100,
        reasoning_tokens: 0,
        estimated: false,
    };
    let charge = ChargeRequest {
        request_id: "bench".into(),
        tenant: "t".into(),
        key_id: "k".into(),
        operation: Operation::Chat,
        model_asked: "m".into(),
        model_served: "m".into(),
        channel: "c0".into(),
        usage,
        latency_ms: 10,
        outcome: CallOutcome::Complete,
    };

    let mut group = criterion.benchmark_group("plugin");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("router.plan (instantiate + call, 3 channels)", |b| {
        b.to_async(&tokio)
            .iter(|| async { router.plan(&facts, &channels).await.expect("no trap") })
    });
    for size in [1024, 16 * 1024, 128 * 1024] {
        let body = chat_body(size);
        group.bench_function(
            format!("translator.chat-request ({} KB)", size / 1024),
            |b| {
                b.to_async(&tokio).iter(|| async {
                    translator
                        .translate_request(RequestKind::Chat, &context, &body)
                        .await
                        .expect("no trap")
                })
            },
        );
    }
    group.bench_function("billing.charge (instantiate + call)", |b| {
        b.to_async(&tokio)
            .iter(|| async { billing.charge(&charge).await.expect("no trap") })
    });
    let chunk = StreamEvent {
        event: None,
        data: r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hello "},"finish_reason":null}]}"#.into(),
    };
    let mut session = tokio
        .block_on(translator.open_stream(&context))
        .expect("a stream opens");
    group.bench_function("translator.stream push (one chunk)", |b| {
        b.iter(|| tokio.block_on(session.push(&chunk)).expect("no trap"))
    });
    group.finish();
}

criterion_group!(plugin_calls, benchmarks);
criterion_main!(plugin_calls);
