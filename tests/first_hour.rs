//! The first hour: what a newcomer starting the demo, and an operator starting a configured
//! gateway, see and can do without outside knowledge.

mod harness;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A `tollgate serve` started for a test, with what it printed up to its "listening" line.
struct Started {
    child: Child,
    url: String,
    printed: Vec<String>,
}

/// Starts `tollgate serve` in `dir` with `args`, the admin token variable set to `admin_token`
/// (or unset), its log in `dir/stderr.log`, and waits for it to listen.
async fn serve_in(dir: &Path, args: &[&str], admin_token: Option<&str>) -> Started {
    let log = std::fs::File::create(dir.join("stderr.log")).expect("a log file");
    let mut command = Command::new(harness::binary());
    command
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    if let Some(token) = admin_token {
        command.env("TOLLGATE_ADMIN_TOKEN", token);
    }
    let mut child = command.spawn().expect("tollgate starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let url = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.expect("stdout reads") {
            if let Some(url) = line.strip_prefix("tollgate listening on ") {
                return url.to_owned();
            }
            printed.push(line);
        }
        panic!("the gateway exited before listening: {printed:?}");
    })
    .await
    .expect("the gateway listens within 120 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Started {
        child,
        url,
        printed,
    }
}

impl Started {
    /// Kills the gateway and waits for it to exit: the next start on its data directory finds it
    /// unlocked.
    async fn stop(mut self) {
        self.child.kill().await.expect("the gateway stops");
    }
}

/// The demo in a fresh directory, its plugin cache the tests' shared one (compiling every shipped
/// plugin again would take a minute in a debug build).
fn demo_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::create_dir(dir.path().join("data")).expect("the data directory");
    let shared = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache");
    std::fs::create_dir_all(&shared).expect("the shared plugin cache");
    std::os::unix::fs::symlink(&shared, dir.path().join("data/plugin-cache"))
        .expect("the cache linked");
    dir
}

/// The value of `export NAME=value` among the printed lines.
fn exported<'a>(printed: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("export {name}=");
    printed
        .iter()
        .find_map(|line| line.trim().strip_prefix(prefix.as_str()))
}

async fn admin_status(url: &str, token: &str) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .get(format!("{url}/admin/tenants"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn the_demo_makes_its_admin_token_once_and_prints_how_to_call_it() {
    let dir = demo_dir();
    let first = serve_in(dir.path(), &["--listen", "127.0.0.1:0"], None).await;
    let printed = &first.printed;
    assert_eq!(
        exported(printed, "TOLLGATE_BASE_URL"),
        Some(format!("{}/v1", first.url).as_str()),
        "{printed:?}"
    );
    assert_eq!(
        exported(printed, "TOLLGATE_ADMIN_URL"),
        Some(first.url.as_str()),
        "the CLI's admin API: {printed:?}"
    );
    let key = exported(printed, "TOLLGATE_KEY").expect("the new key is printed");
    assert!(key.starts_with("tg-"), "{key}");
    let token = exported(printed, "TOLLGATE_ADMIN_TOKEN")
        .expect("the admin token is printed")
        .to_owned();
    let kept = dir.path().join("data/admin-token");
    assert_eq!(std::fs::read_to_string(&kept).expect("kept"), token);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kept)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only its owner reads it");
    assert_eq!(admin_status(&first.url, &token).await.0, 200);
    let (status, wrong) = admin_status(&first.url, "not-the-token").await;
    assert_eq!(status, 401);
    assert_eq!(wrong["error"]["code"], "invalid_admin_token", "{wrong}");
    first.stop().await;

    // The next start keeps the token, and prints no key: the secret was shown once.
    let second = serve_in(dir.path(), &["--listen", "127.0.0.1:0"], None).await;
    assert_eq!(
        exported(&second.printed, "TOLLGATE_ADMIN_TOKEN"),
        Some(token.as_str())
    );
    assert_eq!(exported(&second.printed, "TOLLGATE_KEY"), None);
    second.stop().await;

    // With the variable set, it is the token and the kept one opens nothing.
    let chosen = "the-operators-token";
    let third = serve_in(dir.path(), &["--listen", "127.0.0.1:0"], Some(chosen)).await;
    assert_eq!(admin_status(&third.url, chosen).await.0, 200);
    assert_eq!(admin_status(&third.url, &token).await.0, 401);
    assert_eq!(exported(&third.printed, "TOLLGATE_ADMIN_TOKEN"), None);
    third.stop().await;
}

#[tokio::test]
async fn a_configured_gateway_without_an_admin_token_says_its_admin_api_is_closed() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let body = harness::billing(1_000_000);
    let config = harness::write_config(dir.path(), "listen = \"127.0.0.1:0\"\n", &body)
        .expect("the configuration");
    let config = config.to_str().expect("a UTF-8 path");
    let gateway = serve_in(dir.path(), &["--config", config], None).await;
    assert!(
        !dir.path().join("data/admin-token").exists(),
        "nothing is generated outside the demo"
    );
    let (status, closed) = admin_status(&gateway.url, "any-token").await;
    assert_eq!(status, 401);
    assert_eq!(closed["error"]["code"], "admin_api_closed", "{closed}");
    let message = closed["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("TOLLGATE_ADMIN_TOKEN"), "{message}");
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).expect("the log");
    assert!(
        log.contains("the admin API is closed"),
        "said at start-up: {log}"
    );
}

/// Runs the CLI with `args`, the admin token `token`, and backtraces asked for (a failure must
/// still be one line).
fn cli_as(token: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(harness::binary())
        .args(args)
        .env("TOLLGATE_ADMIN_TOKEN", token)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the CLI runs")
}

/// Runs an admin command of the CLI against `gateway` with its admin token; asserts it succeeds
/// and returns what it printed.
fn admin_cli(gateway: &harness::Gateway, args: &[&str]) -> String {
    let mut args = args.to_vec();
    args.extend(["--admin-url", gateway.admin_url.as_str()]);
    let output = cli_as(harness::ADMIN_TOKEN, &args);
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{args:?}: {said}");
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// A configuration of the test billing and one simulated channel, `name`.
fn one_channel(name: &str, simulator: &tollgate_simulator::Simulator) -> String {
    format!(
        "{}{}",
        harness::billing(1_000_000),
        harness::channel(name, simulator, 1)
    )
}

#[tokio::test]
async fn a_failed_cli_command_says_why_in_one_line_and_its_exit_status_says_its_kind() {
    let gateway = harness::start(&harness::billing(1_000_000))
        .await
        .expect("the gateway starts");
    let admin_url = gateway.admin_url.as_str();
    let listed = cli_as(
        harness::ADMIN_TOKEN,
        &["tenant", "list", "--admin-url", admin_url],
    );
    assert_eq!(listed.status.code(), Some(0));
    let refused = cli_as("wrong", &["tenant", "list", "--admin-url", admin_url]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        refused.status.code(),
        Some(3),
        "the admin API refused: {said}"
    );
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(
        said.starts_with("error: 401 Unauthorized invalid_admin_token: The admin token is"),
        "the status, the code and the API's own message: {said}"
    );
    assert!(!said.contains('{'), "no raw JSON: {said}");

    let nobody = cli_as(
        harness::ADMIN_TOKEN,
        &["tenant", "list", "--admin-url", "http://127.0.0.1:1"],
    );
    let said = String::from_utf8_lossy(&nobody.stderr);
    assert_eq!(nobody.status.code(), Some(4), "no gateway there: {said}");
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(said.contains("no gateway answers at"), "{said}");
}

#[tokio::test]
async fn the_cli_shows_amounts_in_currency_units_beside_the_picos() {
    let gateway = harness::start(&harness::billing(1_000_000))
        .await
        .expect("the gateway starts");
    let admin_url = gateway.admin_url.as_str();
    let topped = cli_as(
        harness::ADMIN_TOKEN,
        &[
            "balance",
            "top-up",
            "--tenant",
            "acme",
            "--amount-micros",
            "2500000",
            "--reason",
            "test",
            "--admin-url",
            admin_url,
        ],
    );
    assert_eq!(
        topped.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&topped.stderr)
    );
    let balance = cli_as(
        harness::ADMIN_TOKEN,
        &[
            "balance",
            "get",
            "--tenant",
            "acme",
            "--admin-url",
            admin_url,
        ],
    );
    let shown: serde_json::Value = serde_json::from_slice(&balance.stdout).expect("JSON");
    assert_eq!(shown["balance_picos"], "2500000000000", "{shown}");
    assert_eq!(
        shown["balance"], "2.50",
        "beside it, in currency units: {shown}"
    );
}

#[tokio::test]
async fn key_terms_change_for_the_next_request_and_a_disabled_tenant_comes_back() {
    let sim = harness::simulator().await;
    let config = one_channel("only", &sim);
    let gateway = harness::start(&config).await.expect("the gateway starts");
    let admin = |args: &[&str]| admin_cli(&gateway, args);
    let created = admin(&["key", "create", "--tenant", "acme", "--rpm", "1"]);
    let secret = created.lines().last().expect("the secret, last");
    let id = created
        .split_whitespace()
        .find(|word| word.starts_with("key_"))
        .expect("the key's id");
    let hello = harness::chat("hello");
    assert_eq!(gateway.chat_as(secret, &hello).await.status, 200);
    assert_eq!(
        gateway.chat_as(secret, &hello).await.status,
        429,
        "1 a minute"
    );
    admin(&["key", "update", id, "--rpm", "2"]);
    assert_eq!(
        gateway.chat_as(secret, &hello).await.status,
        200,
        "the raised limit is there at once"
    );
    admin(&["key", "update", id, "--allowed-models", "another-model"]);
    gateway
        .chat_as(secret, &hello)
        .await
        .assert_error(404, Some("model_not_found"));
    admin(&[
        "key",
        "update",
        id,
        "--clear",
        "allowed_models",
        "--clear",
        "rpm",
    ]);
    for _ in 0..3 {
        assert_eq!(gateway.chat_as(secret, &hello).await.status, 200);
    }

    let patch = |path: String, body: serde_json::Value| {
        reqwest::Client::new()
            .patch(format!("{}/admin{path}", gateway.admin_url))
            .bearer_auth(harness::ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let bad = patch(format!("/keys/{id}"), serde_json::json!({"rpm": "many"}))
        .await
        .expect("the gateway answers");
    assert_eq!(bad.status(), 400, "a term of the wrong type is refused");
    let unknown = patch("/keys/key_nobody".to_owned(), serde_json::json!({"rpm": 1}))
        .await
        .expect("the gateway answers");
    assert_eq!(unknown.status(), 404);
    let said: serde_json::Value = unknown.json().await.expect("JSON");
    assert_eq!(said["error"]["code"], "not_found", "{said}");

    admin(&["tenant", "disable", "acme"]);
    assert_eq!(gateway.chat_as(&gateway.key, &hello).await.status, 401);
    admin(&["tenant", "enable", "acme"]);
    assert_eq!(gateway.chat_as(&gateway.key, &hello).await.status, 200);
}

/// A fresh clone's set-up files in a temporary directory: no virtual environment, no npm packages.
fn bare_clone() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let clone = tempfile::tempdir().expect("a temporary directory");
    for file in [
        "scripts/setup.sh",
        "tests/sdk/requirements.txt",
        "tests/sdk/package.json",
        "tests/sdk/package-lock.json",
    ] {
        let to = clone.path().join(file);
        std::fs::create_dir_all(to.parent().expect("a folder")).expect("the folder");
        std::fs::copy(root.join(file), &to).expect("copied");
    }
    clone
}

/// Runs the clone's set-up with `path` as `PATH`.
fn set_up(clone: &Path, path: &str, args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new("bash")
        .arg(clone.join("scripts/setup.sh"))
        .args(args)
        .env("PATH", path)
        .output()
        .expect("bash runs");
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), said)
}

#[test]
fn the_set_up_of_a_bare_machine_says_what_it_installs_and_what_it_cannot() {
    let home = std::env::var("HOME").expect("HOME");
    // Rust through rustup, and the system's python3 and node; no cargo-nextest.
    let bare_path = format!("{home}/.cargo/bin:/usr/bin:/bin");
    let clone = bare_clone();
    let (code, said) = set_up(clone.path(), &bare_path, &["--with-test-deps", "--dry-run"]);
    assert_eq!(code, Some(0), "{said}");
    for planned in [
        "would install cargo-nextest",
        "would install a Python virtual environment in tests/sdk/.venv",
        "would install the openai and anthropic Python SDKs into tests/sdk/.venv",
        "would install the openai npm package",
    ] {
        assert!(said.contains(planned), "{planned}: {said}");
    }
    assert!(
        !clone.path().join("tests/sdk/.venv").exists(),
        "a dry run installs nothing"
    );

    // A node older than 20 is named, not worked around.
    let old = tempfile::tempdir().expect("a temporary directory");
    let node = old.path().join("node");
    std::fs::write(
        &node,
        "#!/bin/sh\n[ \"$1\" = --version ] && echo v18.19.0 && exit 0\nexit 1\n",
    )
    .expect("a stand-in node");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o755)).expect("executable");
    let old_path = format!("{}:{bare_path}", old.path().display());
    let (code, said) = set_up(clone.path(), &old_path, &["--with-test-deps", "--dry-run"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("node 20 or newer is required; this is v18.19.0"),
        "{said}"
    );
}

#[test]
fn plugin_test_says_a_refusal_in_plain_words() {
    let translator = harness::test_plugin("tollgate_translator_anthropic.wasm");
    let request = serde_json::json!({
        "model": "test-model",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "code_interpreter"}],
    });
    let output = harness::cli(&[
        "plugin",
        "test",
        translator.to_str().expect("UTF-8"),
        "--request",
        &request.to_string(),
    ])
    .expect("plugin test runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let tested: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        tested["decision"]["refused"],
        serde_json::json!({
            "kind": "invalid_request",
            "message": "only `function` tools can be sent to an Anthropic model",
            "param": "tools[0].type",
        }),
        "{tested}"
    );
}

#[tokio::test]
async fn an_operator_starts_from_an_empty_directory_with_a_funded_tenant() {
    let dir = demo_dir();
    let tollgate = |args: &[&str]| {
        std::process::Command::new(harness::binary())
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("the CLI runs")
    };
    let written = tollgate(&["init"]);
    assert!(written.status.success(), "{written:?}");
    let config = std::fs::read_to_string(dir.path().join("tollgate.toml")).expect("written");
    assert!(
        config.contains("[[channels]]"),
        "a starting point: {config}"
    );
    let again = tollgate(&["init"]);
    assert_eq!(again.status.code(), Some(1));
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("never overwrites"), "{said}");

    let funded = ["tenant", "create", "acme", "--balance-micros", "2500000"];
    let created = tollgate(&[&funded[..], &["--config", "tollgate.toml"]].concat());
    assert!(created.status.success(), "{created:?}");
    let key = tollgate(&[
        "key",
        "create",
        "--tenant",
        "acme",
        "--config",
        "tollgate.toml",
    ]);
    assert!(key.status.success(), "{key:?}");

    let token = "the-operators-token";
    let args = ["--config", "tollgate.toml", "--listen", "127.0.0.1:0"];
    let gateway = serve_in(dir.path(), &args, Some(token)).await;
    let balance: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/admin/tenants/acme/balance", gateway.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("the gateway answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(balance["balance_picos"], "2500000000000", "{balance}");
}

/// The demo's configuration on free ports, as the docs' runnable blocks expect to find it: the
/// configuration `tollgate init` writes (the embedded defaults) with the simulator it names on a
/// free port instead of 8099, served with `--listen 127.0.0.1:0`.
struct DocsDemo {
    dir: tempfile::TempDir,
    gateway: Started,
    simulator: tollgate_simulator::Simulator,
    /// What the gateway's `export` lines set, and the admin token.
    env: Vec<(String, String)>,
}

const DOCS_ADMIN_TOKEN: &str = "the-docs-admin-token";

async fn docs_demo() -> DocsDemo {
    let simulator = tollgate_simulator::Simulator::start(([127, 0, 0, 1], 0).into(), Vec::new())
        .await
        .expect("the simulator binds a loopback port");
    let dir = demo_dir();
    let written = std::process::Command::new(harness::binary())
        .arg("init")
        .current_dir(dir.path())
        .output()
        .expect("the CLI runs");
    assert!(written.status.success(), "{written:?}");
    let config = dir.path().join("tollgate.toml");
    let text = std::fs::read_to_string(&config).expect("written");
    let address = simulator.address().to_string();
    std::fs::write(&config, text.replace("127.0.0.1:8099", &address)).expect("rewritten");
    let args = ["--config", "tollgate.toml", "--listen", "127.0.0.1:0"];
    let gateway = serve_in(dir.path(), &args, Some(DOCS_ADMIN_TOKEN)).await;
    let mut env: Vec<(String, String)> =
        ["TOLLGATE_BASE_URL", "TOLLGATE_ADMIN_URL", "TOLLGATE_KEY"]
            .into_iter()
            .map(|name| {
                let value = exported(&gateway.printed, name)
                    .unwrap_or_else(|| panic!("{name} is printed: {:?}", gateway.printed));
                (name.to_owned(), value.to_owned())
            })
            .collect();
    env.push((
        "TOLLGATE_ADMIN_TOKEN".to_owned(),
        DOCS_ADMIN_TOKEN.to_owned(),
    ));
    DocsDemo {
        dir,
        gateway,
        simulator,
        env,
    }
}

impl DocsDemo {
    fn value(&self, name: &str) -> &str {
        self.env
            .iter()
            .find_map(|(key, value)| (key == name).then_some(value.as_str()))
            .expect("a variable the demo set")
    }

    /// The blocks of `document` fenced `sh runnable` or `python runnable`, in order, as one bash
    /// script (a Python block runs in the SDKs' virtual environment), with the docs' addresses and
    /// key placeholder replaced by this demo's.
    fn runnable_script(&self, document: &str) -> String {
        let markdown = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(document),
        )
        .expect("the document reads");
        let gateway = self.gateway.url.trim_start_matches("http://");
        let simulator = self.simulator.address().to_string();
        let replacements = [
            ("127.0.0.1:8080", gateway),
            ("127.0.0.1:8099", simulator.as_str()),
            ("tg-...", self.value("TOLLGATE_KEY")),
        ];
        let mut script = String::from("set -euo pipefail\n");
        let mut lines = markdown.lines();
        let mut blocks = 0;
        while let Some(line) = lines.next() {
            let python = match line.trim_end() {
                "```sh runnable" => false,
                "```python runnable" => true,
                _ => continue,
            };
            let mut text = lines
                .by_ref()
                .take_while(|line| line.trim_end() != "```")
                .collect::<Vec<_>>()
                .join("\n");
            for (from, to) in replacements {
                text = text.replace(from, to);
            }
            blocks += 1;
            script.push_str(&format!(
                "echo '# {document}: runnable block {blocks}' >&2\n"
            ));
            if python {
                script.push_str(&format!(
                    "\"$PYTHON\" - <<'PYTHON_BLOCK'\n{text}\nPYTHON_BLOCK\n"
                ));
            } else {
                script.push_str(&text);
                script.push('\n');
            }
        }
        assert!(blocks > 0, "{document} has runnable blocks");
        script
    }

    /// Runs `document`'s runnable blocks in the demo's directory, `tollgate` on the `PATH` and
    /// every `curl` failing on an HTTP error (`fail-with-body` in its configuration), with
    /// `extra_path` searched first; returns what they printed.
    async fn run(&self, document: &str, extra_path: Option<&Path>) -> String {
        let script = self.runnable_script(document);
        let curl_home = self.dir.path().join("curl-home");
        std::fs::create_dir_all(&curl_home).expect("curl's home");
        std::fs::write(curl_home.join(".curlrc"), "fail-with-body\nshow-error\n")
            .expect("curl's configuration");
        let binary_dir = Path::new(harness::binary()).parent().expect("a folder");
        let mut path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .collect::<Vec<_>>();
        path.insert(0, binary_dir.to_path_buf());
        if let Some(extra) = extra_path {
            path.insert(0, extra.to_path_buf());
        }
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk/.venv/bin/python3");
        let output = tokio::time::timeout(
            Duration::from_secs(900),
            Command::new("bash")
                .arg("-c")
                .arg(&script)
                .current_dir(self.dir.path())
                .env("PATH", std::env::join_paths(path).expect("a PATH"))
                .env("CURL_HOME", &curl_home)
                .env("PYTHON", python)
                .envs(self.env.iter().map(|(name, value)| (name, value)))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the blocks finish within 15 minutes")
        .expect("bash runs");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{document}'s runnable blocks fail:\n{}\nstdout: {stdout}\nscript:\n{script}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// The demo tenant's usage records, oldest first.
    async fn records(&self) -> Vec<serde_json::Value> {
        let answer: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/admin/usage?tenant=demo", self.gateway.url))
            .bearer_auth(DOCS_ADMIN_TOKEN)
            .send()
            .await
            .expect("the gateway answers")
            .json()
            .await
            .expect("JSON");
        answer["data"].as_array().cloned().unwrap_or_default()
    }
}

#[tokio::test]
async fn the_readmes_runnable_blocks_run_against_the_demo() {
    let demo = docs_demo().await;
    let printed = demo.run("README.md", None).await;
    let records = demo.records().await;
    let asked: Vec<_> = records
        .iter()
        .map(|record| (record["model_asked"].as_str(), record["status"].as_u64()))
        .collect();
    assert_eq!(
        asked,
        [
            (Some("gpt-4o-mini"), Some(200)),
            (Some("gpt-4o-mini"), Some(200)),
            (Some("claude-sonnet"), Some(200)),
        ],
        "one answered request per call: {printed}"
    );
}

/// A stand-in `cargo` for the walkthrough's plugin crate: its build shares the tests' compiled
/// SDK (a `target` linked to theirs) and the workspace's lock, offline, as `plugin_authoring` does.
fn cargo_sharing_the_tests_target(dir: &Path) -> std::path::PathBuf {
    let shim = dir.join("cargo-shim");
    std::fs::create_dir_all(&shim).expect("the shim's folder");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-new-target");
    std::fs::create_dir_all(&target).expect("the shared target");
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let cargo = std::env::var("CARGO").expect("cargo runs the tests");
    let script = format!(
        "#!/bin/sh\n[ -e target ] || ln -s '{}' target\n[ -e Cargo.lock ] || cp '{}' Cargo.lock\n\
         unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER\n\
         CARGO_NET_OFFLINE=true exec '{cargo}' \"$@\"\n",
        target.display(),
        lock.display()
    );
    let file = shim.join("cargo");
    std::fs::write(&file, script).expect("the shim");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).expect("executable");
    shim
}

#[tokio::test]
async fn the_tier_router_walkthrough_runs_as_written_against_the_demo() {
    let demo = docs_demo().await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    std::os::unix::fs::symlink(&examples, demo.dir.path().join("examples"))
        .expect("the examples linked");
    let shim = cargo_sharing_the_tests_target(demo.dir.path());
    let printed = demo
        .run("examples/tier-router/README.md", Some(&shim))
        .await;
    let records = demo.records().await;
    let premium = records
        .iter()
        .find(|record| {
            record["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("tier-walkthrough-"))
        })
        .unwrap_or_else(|| panic!("the named request is recorded: {printed}"));
    assert_eq!(premium["channel"], "best", "{premium}");
    assert!(
        premium["plugins"][0]
            .as_str()
            .is_some_and(|plugin| plugin.starts_with("tier-router@")),
        "{premium}"
    );
}

#[tokio::test]
async fn channel_list_shows_the_order_a_request_would_try() {
    let simulator = harness::simulator().await;
    let priced = |output: u64| {
        format!(
            "api_key_env = [\"TEST_UPSTREAM_KEY\"]\nprices = {{ \"test-model\" = {{ input = 1, output = {output} }} }}"
        )
    };
    // Listed cheaper first, but the failover router tries the lower priority first.
    let config = format!(
        "{}{}{}",
        harness::billing(1_000_000),
        harness::channel_with("cheap", &simulator, 5, &priced(200)),
        harness::channel_with("dear", &simulator, 1, &priced(9_000)),
    );
    let gateway = harness::start(&config).await.expect("the gateway starts");
    let admin = |args: &[&str]| {
        serde_json::from_str::<serde_json::Value>(&admin_cli(&gateway, args)).expect("JSON")
    };
    let global = admin(&["channel", "list"]);
    let order = &global["try_order"];
    assert_eq!(
        order["models"]["test-model"]["channels"],
        serde_json::json!(["dear", "cheap"]),
        "{order}"
    );
    assert!(
        order["router"]
            .as_str()
            .is_some_and(|router| router.starts_with("failover@")),
        "{order}"
    );

    admin(&[
        "plugin",
        "bind",
        "--role",
        "router",
        "--tenant",
        "acme",
        "--plugin",
        "cost-first",
    ]);
    let own = admin(&["channel", "list", "--tenant", "acme"]);
    assert_eq!(
        own["try_order"]["models"]["test-model"]["channels"],
        serde_json::json!(["cheap", "dear"]),
        "{}",
        own["try_order"]
    );
    let answer = gateway
        .post("/v1/chat/completions", &harness::chat("hi"), &[])
        .await;
    assert_eq!(
        gateway.record(&answer.request_id()).await["channel"],
        "cheap",
        "a request tries what the list said"
    );

    let unknown = gateway
        .admin(reqwest::Method::GET, "/channels?tenant=nobody", None)
        .await;
    unknown.assert_error(404, Some("tenant_not_found"));
    let misspelt = gateway
        .admin(reqwest::Method::GET, "/channels?tennant=acme", None)
        .await;
    misspelt.assert_error(400, None);
    assert_eq!(misspelt.json["error"]["type"], "invalid_request_error");
    assert!(
        misspelt.json["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("tennant")),
        "the 400 names what it could not read: {}",
        misspelt.json
    );
}

#[tokio::test]
async fn a_channel_may_name_its_providers_bare_host_and_a_wrong_path_says_so() {
    let simulator = harness::simulator().await;
    let host = format!("http://{}", simulator.address());
    let config = format!(
        "{}{}{}{}{}",
        harness::billing(1_000_000).replace("\"test-embedding\"", "\"gemini-model\""),
        // As Anthropic's and Google's SDKs take them: no `/v1`, no `/v1beta`.
        harness::protocol_channel(
            "anthropic",
            "anthropic",
            &host,
            1,
            r#""test-model" = "claude-sim""#
        ),
        harness::protocol_channel(
            "gemini",
            "gemini",
            &host,
            1,
            r#""gemini-model" = "gemini-sim""#
        ),
        // A path the upstream lacks, tried first for `test-model`.
        harness::protocol_channel(
            "misplaced",
            "anthropic",
            &format!("{host}/anthropic/v2"),
            0,
            r#""test-model" = "claude-sim""#,
        ),
        harness::protocol_channel(
            "misplaced-gemini",
            "gemini",
            &format!("{host}/v2"),
            0,
            r#""gemini-model" = "gemini-sim""#,
        ),
    );
    let gateway = harness::start(&config).await.expect("the gateway starts");
    for (model, answering) in [("test-model", "anthropic"), ("gemini-model", "gemini")] {
        let mut body = harness::chat("hi");
        body["model"] = model.into();
        let answer = gateway.post("/v1/chat/completions", &body, &[]).await;
        assert_eq!(answer.status, 200, "{model}: {}", answer.json);
        let record = gateway.record(&answer.request_id()).await;
        assert_eq!(record["channel"], answering, "{record}");
        let first = &record["attempts"][0];
        assert_eq!(first["status"], 404, "{record}");
        assert_eq!(
            first["error_class"], "server",
            "a path the upstream lacks is not a missing model: {record}"
        );
    }
    let log = gateway.log();
    assert!(
        log.lines()
            .any(|line| line.contains("misplaced") && line.contains("no such path")),
        "the attempt's log line says what the 404 was about"
    );
}

#[tokio::test]
async fn a_plugin_is_compiled_once_for_gateways_sharing_a_cache_and_says_how_long_it_took() {
    let simulator = harness::simulator().await;
    let config = one_channel("sim", &simulator);
    // Both use the tests' shared plugin cache, as gateways on one machine share theirs.
    let (first, second) = tokio::join!(harness::start(&config), harness::start(&config));
    let (first, second) = (first.expect("starts"), second.expect("starts"));
    // A version no cache holds: its upload compiles it, through the step a first start takes for
    // each shipped plugin. Both gateways get it at once.
    let router = std::fs::read(harness::test_plugin(
        "tollgate_test_plugin_scripted_router.wasm",
    ))
    .expect("built");
    let fresh = harness::plugin_version(&router, &format!("first-hour-{}", std::process::id()));
    let (one, other) = tokio::join!(
        first.upload_plugin("fresh", fresh.clone()),
        second.upload_plugin("fresh", fresh)
    );
    assert_eq!(
        (one.status, other.status),
        (201, 201),
        "{} {}",
        one.json,
        other.json
    );
    let logs = format!("{}{}", first.log(), second.log());
    let said = |words: &str| logs.lines().filter(|line| line.contains(words)).count();
    assert_eq!(
        said("compiling a plugin for this machine"),
        1,
        "one compile, said once, for both: {logs}"
    );
    assert!(
        logs.lines()
            .any(|line| line.contains("plugin compiled") && line.contains("compile_ms")),
        "and how long it took: {logs}"
    );
}
