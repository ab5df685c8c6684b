//! `tollgate top`: a live view of a running agent, from its `/metrics`
//! (Prometheus text, parsed with `prometheus-parse`): per workload calls/s,
//! tokens/s and spend, refusals by reason, active streams. Rates are the
//! difference of two scrapes over the time between them.
use std::{
    collections::BTreeMap,
    fmt::Write,
    net::SocketAddr,
    time::{Duration, Instant},
};

use prometheus_parse::{Scrape, Value};

/// Per workload: `(namespace, workload)`.
type Key = (String, String);

/// What one scrape says, summed the way the view shows it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    pub requests: BTreeMap<Key, f64>,
    pub tokens: BTreeMap<Key, f64>,
    pub cost_usd: BTreeMap<Key, f64>,
    /// Refused calls and connections by reason.
    pub refusals: BTreeMap<String, f64>,
    pub active_streams: f64,
    pub active_connections: f64,
}

fn value(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        _ => 0.0,
    }
}

impl Sample {
    /// Sum the series of a `/metrics` text.
    pub fn parse(text: &str) -> std::io::Result<Sample> {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
        let mut s = Sample::default();
        for m in &scrape.samples {
            let key = || {
                (
                    m.labels.get("namespace").unwrap_or("").to_string(),
                    m.labels.get("workload").unwrap_or("").to_string(),
                )
            };
            let v = value(&m.value);
            match m.metric.as_str() {
                "tollgate_requests_total" => *s.requests.entry(key()).or_default() += v,
                "tollgate_tokens_total"
                    if matches!(m.labels.get("token_type"), Some("input" | "output")) =>
                {
                    *s.tokens.entry(key()).or_default() += v
                }
                "tollgate_cost_usd_total" => *s.cost_usd.entry(key()).or_default() += v,
                "tollgate_decisions_total" if m.labels.get("decision") == Some("deny") => {
                    *s.refusals
                        .entry(m.labels.get("reason").unwrap_or("").to_string())
                        .or_default() += v
                }
                "tollgate_active_streams" => s.active_streams += v,
                "tollgate_active_connections" => s.active_connections += v,
                _ => {}
            }
        }
        Ok(s)
    }
}

/// Per-second rate of `key` between two scrapes `secs` apart (a counter
/// that went down — an agent restart — counts from zero).
fn rate(prev: &BTreeMap<Key, f64>, cur: &BTreeMap<Key, f64>, key: &Key, secs: f64) -> f64 {
    let now = cur.get(key).copied().unwrap_or(0.0);
    let before = prev.get(key).copied().unwrap_or(0.0);
    let delta = if now >= before { now - before } else { now };
    if secs > 0.0 { delta / secs } else { 0.0 }
}

/// One screen: the view of `cur`, with rates against `prev` over `secs`.
pub fn frame(addr: SocketAddr, prev: &Sample, cur: &Sample, secs: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tollgate top — agent {addr} — active streams {} — open connections {} — rates over {secs:.1} s",
        cur.active_streams, cur.active_connections
    );
    let _ = writeln!(
        out,
        "\n{:<20} {:<36} {:>8} {:>10} {:>9} {:>12}",
        "NAMESPACE", "WORKLOAD", "calls/s", "tokens/s", "calls", "spend USD"
    );
    let mut keys: Vec<&Key> = cur.requests.keys().collect();
    // Busiest first, then by name.
    keys.sort_by(|a, b| {
        let (ra, rb) = (
            rate(&prev.requests, &cur.requests, a, secs),
            rate(&prev.requests, &cur.requests, b, secs),
        );
        rb.total_cmp(&ra).then_with(|| a.cmp(b))
    });
    if keys.is_empty() {
        let _ = writeln!(out, "(no calls yet)");
    }
    for k in keys {
        let _ = writeln!(
            out,
            "{:<20} {:<36} {:>8.1} {:>10.1} {:>9} {:>12.6}",
            if k.0.is_empty() { "-" } else { &k.0 },
            k.1,
            rate(&prev.requests, &cur.requests, k, secs),
            rate(&prev.tokens, &cur.tokens, k, secs),
            cur.requests.get(k).copied().unwrap_or(0.0),
            cur.cost_usd.get(k).copied().unwrap_or(0.0),
        );
    }
    let _ = writeln!(
        out,
        "\n{:<60} {:>8} {:>9}",
        "REFUSED (reason)", "per s", "total"
    );
    if cur.refusals.is_empty() {
        let _ = writeln!(out, "(none)");
    }
    for (reason, total) in &cur.refusals {
        let before = prev.refusals.get(reason).copied().unwrap_or(0.0);
        let per_s = if secs > 0.0 && *total >= before {
            (total - before) / secs
        } else {
            0.0
        };
        let _ = writeln!(out, "{reason:<60} {per_s:>8.1} {total:>9}");
    }
    let _ = writeln!(
        out,
        "\ncalls and spend are since the agent started (`tollgate status` shows budget spend per day)"
    );
    out
}

/// Scrape `addr` every `interval` and redraw until interrupted; with
/// `once`, print one frame (two scrapes `interval` apart) and return.
pub async fn run(
    addr: SocketAddr,
    token: Option<&str>,
    interval: Duration,
    once: bool,
) -> Result<(), crate::status::StatusError> {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal() && !once;
    let scrape = || async {
        let text = crate::status::fetch_path(addr, "/metrics", token).await?;
        Sample::parse(&text).map_err(|_| crate::status::StatusError::Unexpected(addr))
    };
    let mut prev = scrape().await?;
    let mut at = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        let cur = scrape().await?;
        let now = Instant::now();
        let text = frame(addr, &prev, &cur, (now - at).as_secs_f64());
        if terminal {
            // Home and clear, then the frame: a plain redraw, no alternate screen.
            print!("\x1b[H\x1b[2J{text}");
        } else {
            print!("{text}");
        }
        if once {
            return Ok(());
        }
        prev = cur;
        at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE tollgate_requests_total counter
tollgate_requests_total{model="gpt-4o-mini",namespace="team-a",pod="p1",provider="openai",result="ok",status_class="2xx",workload="Deployment/chat"} 10
tollgate_requests_total{model="gpt-4o-mini",namespace="team-a",pod="p2",provider="openai",result="ok",status_class="2xx",workload="Deployment/chat"} 5
# TYPE tollgate_tokens_total counter
tollgate_tokens_total{model="m",namespace="team-a",pod="p1",provider="openai",token_type="input",workload="Deployment/chat"} 100
tollgate_tokens_total{model="m",namespace="team-a",pod="p1",provider="openai",token_type="cached_input",workload="Deployment/chat"} 40
# TYPE tollgate_active_streams gauge
tollgate_active_streams 0
"#;

    const AFTER: &str = r#"# TYPE tollgate_requests_total counter
tollgate_requests_total{model="gpt-4o-mini",namespace="team-a",pod="p1",provider="openai",result="ok",status_class="2xx",workload="Deployment/chat"} 14
tollgate_requests_total{model="gpt-4o-mini",namespace="team-a",pod="p2",provider="openai",result="ok",status_class="2xx",workload="Deployment/chat"} 5
tollgate_requests_total{model="gpt-4o",namespace="research",pod="e",provider="openai",result="denied",status_class="4xx",workload="Deployment/eval"} 2
# TYPE tollgate_tokens_total counter
tollgate_tokens_total{model="m",namespace="team-a",pod="p1",provider="openai",token_type="input",workload="Deployment/chat"} 180
tollgate_tokens_total{model="m",namespace="team-a",pod="p1",provider="openai",token_type="output",workload="Deployment/chat"} 20
tollgate_tokens_total{model="m",namespace="team-a",pod="p1",provider="openai",token_type="cached_input",workload="Deployment/chat"} 90
# TYPE tollgate_cost_usd_total counter
tollgate_cost_usd_total{model="m",namespace="team-a",pod="p1",provider="openai",workload="Deployment/chat"} 0.0125
# TYPE tollgate_decisions_total counter
tollgate_decisions_total{decision="deny",provider="openai",reason="rule:no-frontier"} 2
tollgate_decisions_total{decision="allow",provider="openai",reason="rule:chat"} 14
# TYPE tollgate_active_streams gauge
tollgate_active_streams 3
"#;

    #[test]
    fn sums_per_workload_and_rates_between_scrapes() {
        let (a, b) = (
            Sample::parse(BEFORE).unwrap(),
            Sample::parse(AFTER).unwrap(),
        );
        let chat = ("team-a".to_string(), "Deployment/chat".to_string());
        assert_eq!(a.requests[&chat], 15.0, "pods of one workload are summed");
        assert_eq!(b.tokens[&chat], 200.0, "input + output, cached not twice");
        assert_eq!(b.refusals["rule:no-frontier"], 2.0);
        assert!(
            !b.refusals.contains_key("rule:chat"),
            "allows are not refusals"
        );
        assert_eq!(rate(&a.requests, &b.requests, &chat, 2.0), 2.0);
        assert_eq!(rate(&a.tokens, &b.tokens, &chat, 2.0), 50.0);
        // A counter that went down (agent restart) counts from zero.
        assert_eq!(rate(&b.requests, &a.requests, &chat, 1.0), 15.0);
        let f = frame("127.0.0.1:9464".parse().unwrap(), &a, &b, 2.0);
        assert!(f.contains("active streams 3"), "{f}");
        let lines: Vec<&str> = f.lines().collect();
        let chat_row = lines
            .iter()
            .position(|l| l.contains("Deployment/chat"))
            .unwrap();
        let eval_row = lines
            .iter()
            .position(|l| l.contains("Deployment/eval"))
            .unwrap();
        assert!(chat_row < eval_row, "busiest first:\n{f}");
        assert!(
            lines[chat_row].contains("2.0") && lines[chat_row].contains("50.0"),
            "{f}"
        );
        assert!(lines[chat_row].contains("0.012500"), "{f}");
        assert!(f.contains("rule:no-frontier"), "{f}");
    }

    #[test]
    fn an_agent_without_calls_says_so() {
        let s = Sample::parse("").unwrap();
        let f = frame("127.0.0.1:9464".parse().unwrap(), &s, &s, 1.0);
        assert!(f.contains("(no calls yet)") && f.contains("(none)"), "{f}");
    }
}
