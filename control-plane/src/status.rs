//! `infermesh-control-plane status`: every proxy on every replica given, as
//! `istioctl proxy-status` shows them. Each replica knows only its own
//! proxies (they share nothing but the source), so the command asks each
//! one's admin port (`/debug/proxies`) and lists the answers side by side.

use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// How long one replica may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The proxies of the replica whose admin port is `admin` (`host:port`).
pub async fn fetch(admin: &str) -> anyhow::Result<Vec<Value>> {
    let body = tokio::time::timeout(TIMEOUT, get(admin, "/debug/proxies"))
        .await
        .with_context(|| format!("{admin} did not answer within {TIMEOUT:?}"))??;
    let value: Value = serde_json::from_str(&body)
        .with_context(|| format!("{admin} did not answer with the proxies' JSON"))?;
    match value.get("proxies") {
        Some(Value::Array(proxies)) => Ok(proxies.clone()),
        _ => bail!("{admin} answered without a `proxies` list"),
    }
}

/// A GET of a control plane's admin port (loopback or a trusted
/// network), returning the body of a 200.
pub async fn get(admin: &str, path: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("cannot reach the admin port {admin}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, admin)
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != hyper::StatusCode::OK {
        bail!("{admin}{path} answered {status}");
    }
    String::from_utf8(body.to_vec()).context("the answer is not UTF-8")
}

/// The table of every replica's proxies; a replica that cannot be asked
/// is named with why, and the others are still shown.
pub fn table(replicas: &[(String, anyhow::Result<Vec<Value>>)], now: SystemTime) -> String {
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("-").to_owned();
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = vec![
        [
            "PROXY",
            "REPLICA",
            "IDENTITY",
            "CONNECTED",
            "VERSION",
            "STATE",
        ]
        .map(str::to_owned),
    ];
    let mut problems = String::new();
    for (replica, proxies) in replicas {
        let proxies = match proxies {
            Ok(proxies) => proxies,
            Err(e) => {
                problems.push_str(&format!("replica {replica}: {e:#}\n"));
                continue;
            }
        };
        for proxy in proxies {
            let workload = proxy.get("workload").cloned().unwrap_or_default();
            let since = proxy.get("connected_since").and_then(Value::as_u64).map_or(
                "-".to_owned(),
                |since| {
                    humantime::format_duration(Duration::from_secs(now.saturating_sub(since)))
                        .to_string()
                        + " ago"
                },
            );
            let state = match text(proxy, "state").as_str() {
                "synced" => "SYNCED".to_owned(),
                "stale" => format!("STALE (sending {})", text(proxy, "desired_version")),
                "nacked" => format!(
                    "NACKED {}: {}",
                    text(proxy, "version"),
                    text(proxy, "error").replace('\n', " ")
                ),
                other => other.to_owned(),
            };
            rows.push([
                text(&workload, "node"),
                replica.clone(),
                text(&workload, "identity"),
                since,
                text(proxy, "acked_version"),
                state,
            ]);
        }
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&problems);
    out
}

/// Asks every replica and prints the table (or the JSON); fails when no
/// replica answered.
pub async fn print(admins: &[String], json: bool) -> anyhow::Result<()> {
    let mut replicas = Vec::new();
    for admin in admins {
        replicas.push((admin.clone(), fetch(admin).await));
    }
    if replicas.iter().all(|(_, r)| r.is_err()) {
        let reasons: Vec<String> = replicas
            .iter()
            .filter_map(|(admin, r)| r.as_ref().err().map(|e| format!("{admin}: {e:#}")))
            .collect();
        bail!("no replica answered: {}", reasons.join("; "));
    }
    if json {
        let all: serde_json::Map<String, Value> = replicas
            .into_iter()
            .map(|(admin, r)| {
                (
                    admin,
                    r.map_or_else(|e| Value::from(format!("{e:#}")), Value::from),
                )
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print!("{}", table(&replicas, SystemTime::now()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_shows_each_proxy_s_state_and_each_silent_replica() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let replicas = vec![
            (
                "10.0.0.1:15014".to_owned(),
                Ok(vec![
                    json!({"workload": {"node": "chat-0", "identity": "spiffe://td/ns/apps/sa/chat"},
                           "connected_since": 940, "acked_version": "aa", "state": "synced"}),
                    json!({"workload": {"node": "llama-0", "identity": "spiffe://td/ns/models/sa/llama"},
                           "connected_since": 1000, "acked_version": "aa", "state": "nacked",
                           "version": "bb", "error": "route: bad\nline"}),
                ]),
            ),
            (
                "10.0.0.2:15014".to_owned(),
                Err(anyhow::anyhow!("connection refused")),
            ),
        ];
        let table = table(&replicas, now);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("PROXY    REPLICA"), "{table}");
        assert!(
            lines[1].contains("chat-0")
                && lines[1].contains("1m ago")
                && lines[1].ends_with("SYNCED"),
            "{table}"
        );
        assert!(lines[2].ends_with("NACKED bb: route: bad line"), "{table}");
        assert_eq!(lines[3], "replica 10.0.0.2:15014: connection refused");
    }
}
