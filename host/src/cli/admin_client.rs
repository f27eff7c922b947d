//! Calls to a running gateway's admin API, and the subcommands that are nothing else.

use anyhow::Context;
use reqwest::Method;

use tollgate::console;

use super::args::{AdminArgs, BalanceAction, ChannelAction, UsageAction, percent_encode};

/// The admin API answered with an error: its status, code and message, as it said them.
#[derive(Debug, thiserror::Error)]
#[error("{status}{}: {message}", code.as_deref().map(|code| format!(" {code}")).unwrap_or_default())]
pub(crate) struct AdminRefusal {
    status: reqwest::StatusCode,
    code: Option<String>,
    message: String,
}

impl AdminRefusal {
    /// Reads an error answer: OpenAI's error object when it is one, else its text.
    fn read(status: reqwest::StatusCode, body: &str) -> Self {
        let error = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|answer| answer.get("error").cloned());
        let text = |field: &str| {
            error
                .as_ref()
                .and_then(|error| error[field].as_str())
                .map(str::to_owned)
        };
        Self {
            status,
            code: text("code").or_else(|| text("type")),
            message: text("message").unwrap_or_else(|| body.trim().to_owned()),
        }
    }
}

/// The gateway at `--admin-url` could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("no gateway answers at {url} ({cause}); is it running, and is --admin-url right?")]
pub(crate) struct Unreachable {
    url: String,
    cause: String,
}

/// Calls the admin API and prints its JSON answer; a non-2xx answer is an error.
pub(crate) fn admin_call(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let answer = admin_request(admin, method, path, body)?;
    console::line(&serde_json::to_string_pretty(&with_currency_units(
        answer.clone(),
    ))?);
    Ok(answer)
}

/// Picos (10^-12 currency units) per currency unit.
const PICOS_PER_UNIT: i128 = 1_000_000_000_000;

/// `value` with every amount in picos (`cost_picos`, `balance_picos`: exact integers, as numbers
/// or strings) shown beside it in currency units too (`cost`, `balance`), for a person to read.
fn with_currency_units(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(fields) => {
            let mut shown = serde_json::Map::new();
            for (name, value) in fields {
                let units = name.strip_suffix("_picos");
                let amount = match &value {
                    Value::Number(number) => number.as_i64().map(i128::from),
                    Value::String(text) => text.parse::<i128>().ok(),
                    _ => None,
                };
                let value = with_currency_units(value);
                if let (Some(units), Some(amount)) = (units, amount) {
                    shown.insert(units.to_owned(), Value::String(currency_units(amount)));
                }
                shown.insert(name, value);
            }
            Value::Object(shown)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(with_currency_units).collect()),
        other => other,
    }
}

/// Picos as an exact decimal amount of currency units, with at least two decimals (`9.998`,
/// `10.00`, `-0.000000000001`).
fn currency_units(picos: i128) -> String {
    let sign = if picos < 0 { "-" } else { "" };
    let (whole, fraction) = (
        picos.unsigned_abs() / PICOS_PER_UNIT.unsigned_abs(),
        picos.unsigned_abs() % PICOS_PER_UNIT.unsigned_abs(),
    );
    let fraction = format!("{fraction:012}");
    let kept = fraction.trim_end_matches('0').len().max(2);
    format!("{sign}{whole}.{}", &fraction[..kept])
}

/// Calls the admin API and returns its JSON answer; a non-2xx answer is an error.
pub(crate) fn admin_request(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    send_admin(admin, method, path, |request| match body {
        Some(body) => request.json(&body),
        None => request,
    })
}

/// Sends one admin request, its body set by `with_body`; returns the JSON answer of a 2xx.
pub(crate) fn send_admin(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    with_body: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let url = format!("{}/admin{path}", admin.admin_url.trim_end_matches('/'));
        let request = with_body(
            reqwest::Client::new()
                .request(method, &url)
                .bearer_auth(&admin.admin_token),
        );
        let response = request
            .send()
            .await
            .map_err(|error| unreachable(&url, &error))?;
        let status = response.status();
        let body = response.text().await.context("reading the answer")?;
        if !status.is_success() {
            return Err(AdminRefusal::read(status, &body).into());
        }
        serde_json::from_str(&body).context("the answer is not JSON")
    })
}

fn unreachable(url: &str, error: &reqwest::Error) -> Unreachable {
    // The innermost cause says why (connection refused, a name that does not resolve).
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    Unreachable {
        url: url.to_owned(),
        cause: cause.to_string(),
    }
}

/// Copies a CSV export to stdout as it arrives.
fn export_csv(admin: &AdminArgs, path: &str) -> anyhow::Result<()> {
    use futures::StreamExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let url = format!("{}/admin{path}", admin.admin_url.trim_end_matches('/'));
        let response = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&admin.admin_token)
            .send()
            .await
            .map_err(|error| unreachable(&url, &error))?;
        let status = response.status();
        if !status.is_success() {
            return Err(AdminRefusal::read(status, &response.text().await?).into());
        }
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            console::raw(&chunk.context("the export broke off")?)?;
        }
        Ok(())
    })
}

/// `tollgate balance …`.
pub(crate) fn balance(action: BalanceAction) -> anyhow::Result<()> {
    match action {
        BalanceAction::TopUp {
            tenant,
            amount_micros,
            reason,
            admin,
        } => admin_call(
            &admin,
            Method::POST,
            &format!("/tenants/{tenant}/top-ups"),
            Some(serde_json::json!({"amount_micros": amount_micros, "reason": reason})),
        ),
        BalanceAction::Get { tenant, admin } => admin_call(
            &admin,
            Method::GET,
            &format!("/tenants/{tenant}/balance"),
            None,
        ),
    }
    .map(drop)
}

/// `tollgate channel …`: channels as JSON files.
pub(crate) fn channel(action: ChannelAction) -> anyhow::Result<()> {
    let read = |file: &std::path::Path| -> anyhow::Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
    };
    match action {
        ChannelAction::List { tenant, admin } => {
            let path = match tenant {
                Some(tenant) => format!("/channels?tenant={}", percent_encode(&tenant)),
                None => "/channels".to_owned(),
            };
            admin_call(&admin, Method::GET, &path, None)
        }
        ChannelAction::Create { file, admin } => {
            admin_call(&admin, Method::POST, "/channels", Some(read(&file)?))
        }
        ChannelAction::Update { name, file, admin } => admin_call(
            &admin,
            Method::PUT,
            &format!("/channels/{}", percent_encode(&name)),
            Some(read(&file)?),
        ),
        ChannelAction::Delete { name, admin } => admin_call(
            &admin,
            Method::DELETE,
            &format!("/channels/{}", percent_encode(&name)),
            None,
        ),
    }
    .map(drop)
}

/// `tollgate usage …`: records, their CSV export and the books; `reconcile` fails when the books
/// do not balance.
pub(crate) fn usage(action: UsageAction) -> anyhow::Result<()> {
    match action {
        UsageAction::Query {
            filters,
            limit,
            admin,
        } => {
            let path = format!("/usage{}", filters.query_string(limit));
            admin_call(&admin, Method::GET, &path, None).map(drop)
        }
        UsageAction::Export { filters, admin } => {
            export_csv(&admin, &format!("/usage.csv{}", filters.query_string(None)))
        }
        UsageAction::Reconcile { admin } => {
            let books = admin_call(&admin, Method::GET, "/reconcile", None)?;
            anyhow::ensure!(
                books["balanced"] == serde_json::Value::Bool(true),
                "the books do not balance"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picos_are_shown_exactly_in_currency_units() {
        assert_eq!(currency_units(10 * PICOS_PER_UNIT), "10.00");
        assert_eq!(currency_units(9_998_000_000_000), "9.998");
        assert_eq!(currency_units(1), "0.000000000001");
        assert_eq!(currency_units(-1_500_000_000_000), "-1.50");
        assert_eq!(currency_units(0), "0.00");
    }

    #[test]
    fn every_amount_in_picos_gets_its_currency_units_beside_it() {
        let shown = with_currency_units(serde_json::json!({
            "balance_picos": "2500000000000",
            "records": [{"cost_picos": 30, "latency_ms": 5}],
        }));
        assert_eq!(shown["balance"], "2.50");
        assert_eq!(
            shown["balance_picos"], "2500000000000",
            "the exact figure stays"
        );
        assert_eq!(shown["records"][0]["cost"], "0.00000000003");
        assert!(shown["records"][0].get("latency").is_none());
    }
}
