//! What the CLI reads without a running gateway: the configuration and the data directory.

use std::path::Path;

use anyhow::Context;
use reqwest::Method;

use tollgate::config::{self, Config};
use tollgate::console;
use tollgate::stages::auth;
use tollgate::store::{SledStore, Store, now_unix_ms};

use super::admin_client::{admin_call, admin_request};
use super::args::{DataDirArgs, KeyAction, TenantAction, percent_encode};

/// The configuration file at `path`, or the embedded demo configuration.
pub(crate) fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::from_file(path)?,
        None => Config::parse(
            config::EMBEDDED_DEFAULT,
            "the embedded default configuration",
        )?,
    })
}

/// The data directory `args` name, opened.
pub(crate) fn open_store(args: &DataDirArgs) -> anyhow::Result<SledStore> {
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => load_config(args.config.as_deref())?.server.data_dir,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    // The CLI commits no usage records: the log is never synced by it.
    Ok(SledStore::open(
        &data_dir,
        tollgate::store::LedgerSync::None,
    )?)
}

/// A new, enabled tenant.
pub(crate) fn new_tenant(name: &str) -> tollgate::store::Tenant {
    tollgate::store::Tenant {
        name: name.to_owned(),
        created_unix_ms: now_unix_ms(),
        disabled: false,
        max_concurrency: None,
    }
}

/// The reason recorded with a balance given at creation.
const OPENING_BALANCE: &str = "opening balance";

/// `tollgate init`: the demo's configuration as a file to begin from, never over an existing one.
pub(crate) fn init(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {} (init never overwrites a file)", path.display()))?;
    file.write_all(config::EMBEDDED_DEFAULT.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    console::line(&format!(
        "wrote {}: the demo's configuration, commented; edit its channels, then \
         `tollgate serve --config {}`",
        path.display(),
        path.display()
    ));
    Ok(())
}

/// `tollgate tenant …`: creation works on the data directory (or the admin API with
/// `--admin-url`); the rest through the admin API.
pub(crate) fn tenant(action: TenantAction) -> anyhow::Result<()> {
    match action {
        TenantAction::Create {
            name,
            balance_micros,
            data,
        } => {
            if let Some(admin) = data.admin()? {
                let body = serde_json::json!({ "name": name });
                admin_request(&admin, Method::POST, "/tenants", Some(body))?;
                if balance_micros > 0 {
                    let path = format!("/tenants/{}/top-ups", percent_encode(&name));
                    let top_up = serde_json::json!({
                        "amount_micros": balance_micros,
                        "reason": OPENING_BALANCE,
                    });
                    admin_request(&admin, Method::POST, &path, Some(top_up))?;
                }
            } else {
                let store = open_store(&data)?;
                store.create_tenant(&new_tenant(&name))?;
                if balance_micros > 0 {
                    store.top_up(&tollgate::store::TopUp {
                        tenant: name.clone(),
                        amount_picos: i128::from(balance_micros) * 1_000_000,
                        reason: OPENING_BALANCE.to_owned(),
                        unix_ms: now_unix_ms(),
                    })?;
                }
                store.flush()?;
            }
            console::line(&format!("created tenant {name}"));
            Ok(())
        }
        TenantAction::List { admin } => admin_call(&admin, Method::GET, "/tenants", None).map(drop),
        TenantAction::Get { name, admin } => {
            let path = format!("/tenants/{}", percent_encode(&name));
            admin_call(&admin, Method::GET, &path, None).map(drop)
        }
        TenantAction::Disable { name, admin } => {
            let path = format!("/tenants/{}/disable", percent_encode(&name));
            admin_call(&admin, Method::POST, &path, None).map(drop)
        }
        TenantAction::Enable { name, admin } => {
            let path = format!("/tenants/{}/enable", percent_encode(&name));
            admin_call(&admin, Method::POST, &path, None).map(drop)
        }
    }
}

/// `tollgate key …`: creation works on the data directory (or the admin API with `--admin-url`)
/// and prints the secret once, as the last line; the rest through the admin API.
pub(crate) fn key(action: KeyAction) -> anyhow::Result<()> {
    match action {
        KeyAction::Create {
            tenant,
            terms,
            data,
        } => {
            let terms = terms.body()?;
            if let Some(admin) = data.admin()? {
                let path = format!("/tenants/{}/keys", percent_encode(&tenant));
                let body = serde_json::Value::Object(terms);
                let created = admin_request(&admin, Method::POST, &path, Some(body))?;
                let id = created["key"]["id"].as_str().unwrap_or_default();
                console::line(&format!("created key {id} for tenant {tenant}"));
                console::line(
                    created["secret"]
                        .as_str()
                        .context("the answer holds the secret")?,
                );
                return Ok(());
            }
            let store = open_store(&data)?;
            let terms: auth::KeyTerms = serde_json::from_value(serde_json::Value::Object(terms))
                .context("the key's terms")?;
            let (key, secret) = auth::issue_key(&store, &tenant, terms, now_unix_ms())?;
            store.flush()?;
            console::line(&format!("created key {} for tenant {}", key.id, key.tenant));
            console::line(&secret);
            Ok(())
        }
        KeyAction::List { tenant, admin } => {
            let path = format!("/tenants/{}/keys", percent_encode(&tenant));
            admin_call(&admin, Method::GET, &path, None).map(drop)
        }
        KeyAction::Update {
            id,
            terms,
            clear,
            admin,
        } => {
            let mut body = terms.body()?;
            for term in clear {
                body.insert(term, serde_json::Value::Null);
            }
            let path = format!("/keys/{}", percent_encode(&id));
            let body = Some(serde_json::Value::Object(body));
            admin_call(&admin, Method::PATCH, &path, body).map(drop)
        }
        KeyAction::Revoke { id, admin } => {
            let path = format!("/keys/{}/revoke", percent_encode(&id));
            admin_call(&admin, Method::POST, &path, None).map(drop)
        }
    }
}
