//! End-to-end for plugin authors: `tollgate plugin new` writes a crate per role that builds for
//! `wasm32-wasip2` and runs under `tollgate plugin test`; the `examples/tier-router` rule, uploaded
//! and bound with the CLI, routes live requests by the tier header and refuses an unknown tier.
//! (`first_hour` runs its README's walkthrough as written.)

mod harness;

use std::path::Path;
use std::process::Command;

use harness::{
    ADMIN_TOKEN, billing, binary, channel_with, chat, cli, simulator, start, test_plugin,
};
use serde_json::Value;

fn run_json(output: std::process::Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "JSON on stdout ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn plugin_new_crates_build_and_pass_plugin_test() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scratch = tempfile::tempdir().expect("a temp dir");
    // Shared between runs, so the SDK and its dependencies compile once.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-new-target");
    let request =
        r#"{"model":"test-model","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    for role in ["router", "translator", "billing"] {
        let name = format!("my-{role}");
        let dir = scratch.path().join(&name);
        let created = cli(&[
            "plugin",
            "new",
            &name,
            "--role",
            role,
            "--dir",
            dir.to_str().expect("utf-8"),
        ])
        .expect("plugin new runs");
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
        // The workspace's lock pins the versions this machine has, so the build works offline.
        std::fs::copy(workspace.join("Cargo.lock"), dir.join("Cargo.lock")).expect("lock copied");
        let cargo = |args: &[&str]| {
            let output =
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
                    .current_dir(&dir)
                    .args(args)
                    .args(["--offline", "--quiet"])
                    .env("CARGO_TARGET_DIR", &target)
                    .env_remove("RUSTFLAGS")
                    .env_remove("CARGO_ENCODED_RUSTFLAGS")
                    .env_remove("RUSTC_WRAPPER")
                    .env_remove("RUSTC_WORKSPACE_WRAPPER")
                    .output()
                    .expect("cargo runs");
            assert!(
                output.status.success(),
                "{role} template: cargo {args:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        };
        // Its generated unit tests run natively, on the SDK's stand-ins for the host.
        cargo(&["test"]);
        cargo(&["build", "--release", "--target", "wasm32-wasip2"]);
        let component = target
            .join("wasm32-wasip2/release")
            .join(format!("my_{role}.wasm"));
        let tested = run_json(
            cli(&[
                "plugin",
                "test",
                component.to_str().expect("utf-8"),
                "--request",
                request,
            ])
            .expect("plugin test runs"),
        );
        assert_eq!(tested["role"], role);
        let decision = &tested["decision"];
        match role {
            "router" => {
                assert_eq!(decision["plan"][0]["channel"], "default", "{tested}");
            }
            "translator" => {
                assert_eq!(decision["path"], "/chat/completions", "{tested}");
                assert_eq!(decision["auth"]["header"], "api-key", "{tested}");
                assert_eq!(decision["body"]["model"], "test-model", "{tested}");
            }
            _ => {
                // The template's default prices: 1,000,000 picos per input token and 2,000,000
                // per output token; 10 output tokens alone make 20,000,000.
                let hold = decision["authorize"]["hold_picos"]
                    .as_u64()
                    .expect("a hold");
                assert!(hold >= 20_000_000, "{tested}");
                assert_eq!(
                    decision["charge_for_estimate"]["amount_picos"].as_u64(),
                    Some(hold)
                );
            }
        }
    }
}

#[tokio::test]
async fn the_tier_router_walkthrough_routes_live_requests_by_tier() {
    let sim = simulator().await;
    let key = r#"api_key_env = ["TEST_UPSTREAM_KEY"]"#;
    let config = format!(
        "{}{}{}",
        billing(1_000_000),
        channel_with(
            "cheap",
            &sim,
            1,
            &format!("{key}\nprices = {{ \"test-model\" = {{ input = 100, output = 200 }} }}")
        ),
        channel_with(
            "best",
            &sim,
            2,
            &format!("{key}\nprices = {{ \"test-model\" = {{ input = 3000, output = 9000 }} }}")
        )
    );
    let gateway = start(&config).await.expect("the gateway starts");
    let component = test_plugin("tier_router.wasm");

    // The README's steps: test locally, upload, bind for the tenant.
    let local = run_json(
        cli(&[
            "plugin",
            "test",
            component.to_str().expect("utf-8"),
            "--request",
            r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#,
            "--tag",
            "tier=premium",
            "--channels",
            r#"[{"name":"cheap","models":{"test-model":"m"},"price_per_million_output_micros":200},
                {"name":"best","models":{"test-model":"m"},"price_per_million_output_micros":9000}]"#,
        ])
        .expect("plugin test runs"),
    );
    assert_eq!(local["decision"]["plan"][0]["channel"], "best", "{local}");
    let admin = |args: &[&str]| {
        let output = Command::new(binary())
            .args(args)
            .args(["--admin-url", &gateway.url])
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("the CLI runs");
        run_json(output)
    };
    let uploaded = admin(&[
        "plugin",
        "upload",
        component.to_str().expect("utf-8"),
        "--name",
        "tier-router",
    ]);
    assert_eq!(uploaded["role"], "router");
    let bound = admin(&[
        "plugin",
        "bind",
        "--role",
        "router",
        "--tenant",
        "acme",
        "--plugin",
        "tier-router",
    ]);
    assert!(
        bound["current"]["plugin"]
            .as_str()
            .is_some_and(|sha| sha.len() == 64),
        "{bound}"
    );

    for (tier, expected) in [("premium", "best"), ("free", "cheap")] {
        let answer = gateway
            .post(
                "/v1/chat/completions",
                &chat("hi"),
                &[("x-tollgate-tier", tier)],
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.json);
        let record = gateway.record(&answer.request_id()).await;
        assert_eq!(record["channel"], expected, "tier {tier}");
        assert!(
            record["plugins"][0]
                .as_str()
                .is_some_and(|entry| entry.starts_with("tier-router@")),
            "{}",
            record["plugins"]
        );
    }
    let refused = gateway
        .post(
            "/v1/chat/completions",
            &chat("hi"),
            &[("x-tollgate-tier", "gold")],
        )
        .await;
    refused.assert_error(403, Some("route_refused"));
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("gold"))
    );
}
