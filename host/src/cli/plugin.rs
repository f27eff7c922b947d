//! `tollgate plugin`: write, test, upload and bind plugins.

use std::path::{Path, PathBuf};

use anyhow::Context;
use reqwest::Method;

use tollgate::console;

use super::admin_client::{admin_call, send_admin};
use super::args::{AdminArgs, PluginAction, percent_encode};

/// `tollgate plugin …`.
pub(crate) fn command(action: PluginAction) -> anyhow::Result<()> {
    match action {
        PluginAction::New {
            name,
            role,
            dir,
            sdk,
        } => new(&name, &role, dir, sdk),
        PluginAction::Test {
            file,
            request,
            channels,
            config,
            tags,
        } => test(&file, &request, channels, &config, &tags),
        PluginAction::Upload { file, name, admin } => upload(&file, name, &admin),
        PluginAction::List { admin } => admin_call(&admin, Method::GET, "/plugins", None).map(drop),
        PluginAction::Show { sha256, admin } => {
            let path = format!("/plugins/{}", percent_encode(&sha256));
            admin_call(&admin, Method::GET, &path, None).map(drop)
        }
        PluginAction::Delete { sha256, admin } => {
            let path = format!("/plugins/{}", percent_encode(&sha256));
            admin_call(&admin, Method::DELETE, &path, None).map(drop)
        }
        PluginAction::Bindings { admin } => {
            admin_call(&admin, Method::GET, "/bindings", None).map(drop)
        }
        PluginAction::Bind {
            scope,
            binding,
            admin,
        } => {
            let path = format!("/bindings?{}", scope.query());
            admin_call(&admin, Method::PUT, &path, Some(binding.body()?)).map(drop)
        }
        PluginAction::Rollback { scope, admin } => {
            let path = format!("/bindings/rollback?{}", scope.query());
            admin_call(&admin, Method::POST, &path, None).map(drop)
        }
        PluginAction::Canary {
            scope,
            binding,
            percent,
            max_failure_percent,
            min_calls,
            admin,
        } => {
            let mut body = binding.body()?;
            body["percent"] = percent.into();
            if let Some(max_failure_percent) = max_failure_percent {
                body["max_failure_percent"] = max_failure_percent.into();
            }
            if let Some(min_calls) = min_calls {
                body["min_calls"] = min_calls.into();
            }
            let path = format!("/bindings/canary?{}", scope.query());
            admin_call(&admin, Method::PUT, &path, Some(body)).map(drop)
        }
        PluginAction::Promote { scope, admin } => {
            let path = format!("/bindings/canary/promote?{}", scope.query());
            admin_call(&admin, Method::POST, &path, None).map(drop)
        }
        PluginAction::Abort { scope, admin } => {
            let path = format!("/bindings/canary?{}", scope.query());
            admin_call(&admin, Method::DELETE, &path, None).map(drop)
        }
    }
}

/// `plugin new`: a plugin crate of `role` from the template, in `dir` (default: `name`).
fn new(name: &str, role: &str, dir: Option<PathBuf>, sdk: Option<PathBuf>) -> anyhow::Result<()> {
    let role =
        tollgate::plugin::Role::parse(role).context("--role is router, translator or billing")?;
    let sdk = sdk
        .or_else(tollgate::trial::default_sdk_path)
        .context("the SDK is not beside this binary: pass --sdk PATH/plugins/sdk")?;
    let sdk = sdk.canonicalize().unwrap_or(sdk);
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    anyhow::ensure!(!dir.exists(), "{} already exists", dir.display());
    for (path, contents) in tollgate::trial::template(name, role, &sdk) {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    console::line(&format!(
        "created the {role} plugin {name} in {}; build it with \
         `cargo build --release --target wasm32-wasip2`",
        dir.display()
    ));
    Ok(())
}

/// `plugin test`: one call of the plugin in the host's sandbox, its decision printed.
fn test(
    file: &Path,
    request: &str,
    channels: Option<String>,
    config: &str,
    tags: &[String],
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let json = |text: &str, what: &str| -> anyhow::Result<serde_json::Value> {
        let text = match text.strip_prefix('@') {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
            }
            None => text.to_owned(),
        };
        serde_json::from_str(&text).with_context(|| format!("{what} is not JSON"))
    };
    let tags = tags
        .iter()
        .map(|tag| {
            tag.split_once('=')
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .context("a --tag is NAME=VALUE")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let trial = tollgate::trial::Trial {
        name: file.file_stem().map_or_else(
            || "plugin".to_owned(),
            |stem| stem.to_string_lossy().into_owned(),
        ),
        bytes,
        config: json(config, "--config")?.to_string(),
        request: json(request, "--request")?,
        tags,
        channels: channels.map(|text| json(&text, "--channels")).transpose()?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let decision = runtime.block_on(tollgate::trial::run(trial))?;
    console::line(&serde_json::to_string_pretty(&decision)?);
    Ok(())
}

/// `plugin upload`: the file's bytes to the admin API, named `name` or after the file.
fn upload(file: &Path, name: Option<String>, admin: &AdminArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let name = name
        .or_else(|| {
            file.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
        })
        .context("name the plugin with --name")?;
    let path = format!("/plugins?name={}", percent_encode(&name));
    let answer = send_admin(admin, Method::POST, &path, |request| {
        request
            .header("content-type", "application/wasm")
            .body(bytes)
    })?;
    console::line(&serde_json::to_string_pretty(&answer)?);
    Ok(())
}
