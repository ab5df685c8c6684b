//! `tollgate status`: what a running agent reports on `/status` of its
//! metrics endpoint, as a table.
use std::{fmt::Write, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the agent at {addr}: {message}\nhint: is `tollgate run` running, and is this its metrics.listen address (--addr)?"
    )]
    Unreachable { addr: SocketAddr, message: String },
    #[error("the agent at {0} answered something that is not its status (an older agent?)")]
    Unexpected(SocketAddr),
    #[error(
        "the agent at {0} requires a token for /status and /metrics\nhint: pass --token-file with the agent's metrics.bearer_token_file"
    )]
    Unauthorized(SocketAddr),
}

/// GET `/status` from the agent at `addr`, with the bearer token if given.
pub async fn fetch(addr: SocketAddr, token: Option<&str>) -> Result<String, StatusError> {
    fetch_path(addr, "/status", token).await
}

/// GET `path` (`/status`, `/metrics`) of the agent's metrics endpoint.
pub async fn fetch_path(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<String, StatusError> {
    let unreachable = |e: &dyn std::fmt::Display| StatusError::Unreachable {
        addr,
        message: e.to_string(),
    };
    let get = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::get(path).header("host", addr.to_string());
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|_| StatusError::Unexpected(addr))?;
        let resp = send.send_request(req).await.map_err(|e| unreachable(&e))?;
        if resp.status() == hyper::StatusCode::UNAUTHORIZED {
            return Err(StatusError::Unauthorized(addr));
        }
        if !resp.status().is_success() {
            return Err(StatusError::Unexpected(addr));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?;
        String::from_utf8(body.to_bytes().to_vec()).map_err(|_| StatusError::Unexpected(addr))
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| unreachable(&"no answer within 5 s"))?
}

/// The status JSON as a human table.
pub fn render(json: &str) -> Result<String, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let mut out = String::new();
    let _ = writeln!(out, "policy rules in force: {}", v["policy_rules"]);
    if let Some(k) = v["kubernetes"].as_object() {
        let _ = writeln!(
            out,
            "kubernetes pods known: {} ({})",
            k.get("pods").and_then(|p| p.as_u64()).unwrap_or(0),
            if k.get("synced").and_then(|s| s.as_bool()) == Some(true) {
                "synced with the API server"
            } else {
                "not synced yet: records carry pod UIDs only"
            }
        );
    }
    let rows = v["budgets"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        let _ = writeln!(out, "budgets: no spend recorded yet");
        return Ok(out);
    }
    let _ = writeln!(
        out,
        "\n{:<28} {:<40} {:>12} {:>12}",
        "budget (rule)", "key", "today USD", "month USD"
    );
    for r in rows {
        let key = r["key"].as_str().unwrap_or("");
        let _ = writeln!(
            out,
            "{:<28} {:<40} {:>12.4} {:>12.4}",
            r["rule"].as_str().unwrap_or(""),
            if key.is_empty() { "(global)" } else { key },
            r["day_usd"].as_f64().unwrap_or(0.0),
            r["month_usd"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_rows() {
        let t = super::render(
            r#"{"policy_rules":2,"budgets":[{"rule":"rule:team","key":"","day":"2026-11-25","day_usd":1.5,"month":"2026-11","month_usd":3.25}]}"#,
        )
        .unwrap();
        assert!(t.contains("policy rules in force: 2"), "{t}");
        assert!(
            t.contains("rule:team") && t.contains("(global)") && t.contains("3.2500"),
            "{t}"
        );
    }
}
