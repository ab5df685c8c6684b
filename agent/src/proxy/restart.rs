//! The calls an earlier run of the agent admitted and never recorded (it was
//! killed, or crashed, mid-call): each becomes one audit record with
//! `result: agent_restarted` and is charged to its budget, so every call
//! the provider may have served is counted once.
//!
//! What the journal keeps of a call is its record as of admission, the
//! model it is billed as, its input estimate and its budget. Its output
//! is not known: the record says `estimated` and counts the input only.
use std::{collections::HashSet, io::BufRead, path::Path, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    journal::{Journal, Unfinished},
    policy::{BudgetKey, spend::BudgetStore},
    pricing::PriceTable,
    providers::Usage,
    telemetry::{events::EventLog, records::RequestRecord},
};

/// A call's journal entry, written when it is admitted.
#[derive(Serialize)]
pub(super) struct Begun<'a> {
    pub record: &'a RequestRecord,
    /// The model the call is billed as when the provider never said.
    pub model: Option<&'a str>,
    /// Input tokens estimated from the request's text.
    pub input_tokens: u64,
    pub budget: Option<&'a BudgetKey>,
}

/// `Begun`, read back after a restart.
#[derive(Deserialize)]
struct Found {
    record: serde_json::Value,
    model: Option<String>,
    input_tokens: u64,
    budget: Option<BudgetKey>,
}

/// Record and charge every call in `unfinished`; those the audit log at
/// `audit_path` already has (the agent died between writing a record and
/// ending its journal entry) are only ended. Returns how many were recorded.
pub fn account_unfinished(
    unfinished: Vec<Unfinished>,
    journal: &Arc<Journal>,
    events: &EventLog,
    prices: &PriceTable,
    budgets: &Arc<BudgetStore>,
    audit_path: &str,
    soft_warn: impl Fn() -> crate::policy::SoftWarn,
) -> usize {
    if unfinished.is_empty() {
        return 0;
    }
    let ids: HashSet<&str> = unfinished.iter().map(|u| u.id.as_str()).collect();
    let recorded = already_recorded(audit_path, &ids);
    let mut n = 0;
    for u in &unfinished {
        if recorded.contains(&u.id) {
            journal.end(&u.id);
            continue;
        }
        let Ok(found) = serde_json::from_value::<Found>(u.entry.clone()) else {
            tracing::warn!(id = %u.id, "a call journal entry this agent cannot read was dropped");
            journal.end(&u.id);
            continue;
        };
        let (record, cost) = restarted(
            found.record,
            found.model.as_deref(),
            found.input_tokens,
            prices,
        );
        if let Some(b) = &found.budget {
            budgets.charge(b, &u.id, cost.unwrap_or(0.0), soft_warn());
        }
        events.record_call(&record, &u.id);
        n += 1;
    }
    n
}

/// The record of a call the agent stopped during, and its cost.
fn restarted(
    mut record: serde_json::Value,
    model: Option<&str>,
    input_tokens: u64,
    prices: &PriceTable,
) -> (serde_json::Value, Option<f64>) {
    let usage = Usage {
        input_tokens,
        estimated: true,
        ..Default::default()
    };
    let provider = record["provider"].as_str().unwrap_or_default().to_string();
    let cost = model.and_then(|m| prices.cost(&provider, m, &usage));
    record["result"] = "agent_restarted".into();
    record["error"] =
        "the agent stopped during this call; recorded when it started again (output unknown: usage estimated from the request)".into();
    record["usage"] = serde_json::to_value(usage).unwrap_or_default();
    if let Some(c) = cost {
        record["cost_usd"] = super::account::round_nano(c).into();
    }
    (record, cost)
}

/// Which of `ids` have a record in the audit log (the current file and the
/// last rotated one). Standard output cannot be read back: none.
fn already_recorded(audit_path: &str, ids: &HashSet<&str>) -> HashSet<String> {
    let mut found = HashSet::new();
    if audit_path == "-" || audit_path.is_empty() {
        return found;
    }
    for path in [audit_path.to_string(), format!("{audit_path}.1")] {
        let Ok(f) = std::fs::File::open(Path::new(&path)) else {
            continue;
        };
        for line in std::io::BufReader::new(f)
            .split(b'\n')
            .map_while(Result::ok)
        {
            let Some(at) = find(&line, b"\"kind\":\"request\",\"id\":\"") else {
                continue;
            };
            let rest = &line[at..];
            let Some(end) = rest.iter().position(|b| *b == b'"') else {
                continue;
            };
            if let Ok(id) = std::str::from_utf8(&rest[..end])
                && ids.contains(id)
            {
                found.insert(id.to_string());
            }
        }
    }
    found
}

/// The index just past `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + needle.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_call_is_priced_on_its_input_and_says_so() {
        let prices = PriceTable::new(&Default::default()).unwrap();
        let rec =
            serde_json::json!({"kind": "request", "id": "x", "provider": "openai", "result": "ok"});
        let (r, cost) = restarted(rec, Some("gpt-4o"), 1000, &prices);
        assert_eq!(r["result"], "agent_restarted");
        assert_eq!(r["usage"]["estimated"], true);
        assert_eq!(r["usage"]["input_tokens"], 1000);
        assert!((cost.unwrap() - 1000.0 * 2.5 / 1e6).abs() < 1e-12);
        let (_, cost) = restarted(serde_json::json!({}), Some("unpriced-x"), 10, &prices);
        assert_eq!(cost, None);
    }

    #[test]
    fn records_already_in_the_audit_log_are_found() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        std::fs::write(
            &p,
            "{\"node\":\"n\",\"time\":\"t\",\"kind\":\"request\",\"id\":\"a\",\"x\":1}\n{\"node\":\"n\",\"kind\":\"connection\"}\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("audit.jsonl.1"),
            "{\"node\":\"n\",\"time\":\"t\",\"kind\":\"request\",\"id\":\"b\"}\n",
        )
        .unwrap();
        let ids: HashSet<&str> = ["a", "b", "c"].into();
        let found = already_recorded(p.to_str().unwrap(), &ids);
        assert_eq!(found, ["a".to_string(), "b".to_string()].into());
        assert!(already_recorded("-", &ids).is_empty());
    }
}
