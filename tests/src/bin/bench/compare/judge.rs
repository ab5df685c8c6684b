//! From the rounds of one scenario to what is printed and judged. Every
//! comparison is made within a round (the systems of a round ran
//! back to back, so a slow spell of the machine hits them alike) and then
//! summarised over the rounds: the median, and the range of the rounds as
//! its interval. For the median of n rounds the range is a distribution-free
//! confidence interval covering it with 1 − 2·0.5ⁿ (94 % for 5 rounds, 75 %
//! for 3); a target counts as met only when the whole interval meets it.
use serde_json::{Value, json};

/// A figure over rounds: its median and the range of the rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub lo: f64,
    pub hi: f64,
    pub rounds: usize,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Option<Self> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            lo: v[0],
            hi: v[n - 1],
            rounds: n,
        })
    }

    fn json(&self) -> Value {
        json!({"median": self.median, "lo": self.lo, "hi": self.hi, "rounds": self.rounds})
    }
}

/// The rows of every system in one round.
#[derive(Clone, Copy)]
pub struct Round<'a>(pub &'a [Value]);

impl Round<'_> {
    /// `pointer` (e.g. `/p50_ns`, `/ttft/p50_ns`) of `system`'s row, unless
    /// it failed.
    pub fn get(&self, system: &str, pointer: &str) -> Option<f64> {
        let row = self.0.iter().find(|r| r["system"] == system)?;
        // A failed run, or one in which no call succeeded, has no figures.
        if row.get("failed").is_some() || row["count"].as_u64() == Some(0) {
            return None;
        }
        row.pointer(pointer)?.as_f64()
    }

    /// What `system` adds to the direct path's `pointer`.
    pub fn added(&self, system: &str, pointer: &str) -> Option<f64> {
        Some(self.get(system, pointer)? - self.get("direct", pointer)?)
    }

    /// `system`'s `pointer` over `base`'s.
    pub fn ratio(&self, system: &str, base: &str, pointer: &str) -> Option<f64> {
        let b = self.get(base, pointer)?;
        (b > 0.0).then(|| self.get(system, pointer).map(|s| s / b))?
    }

    /// `system`'s added `pointer` over `base`'s added one; None when the
    /// base adds nothing measurable (the ratio would mean nothing).
    pub fn added_ratio(&self, system: &str, base: &str, pointer: &str) -> Option<f64> {
        let b = self.added(base, pointer)?;
        (b > 0.0).then(|| self.added(system, pointer).map(|s| s / b))?
    }
}

/// One scenario's rounds: `rounds[i]` holds every system's row of round i.
pub struct Rounds {
    pub scenario: &'static str,
    pub rounds: Vec<Vec<Value>>,
}

impl Rounds {
    pub fn spread(&self, f: impl Fn(Round<'_>) -> Option<f64>) -> Option<Spread> {
        Spread::of(self.rounds.iter().filter_map(|r| f(Round(r))).collect())
    }

    /// The figures each system's table row adds to its own medians: the
    /// ratios to direct and to nginx, and the added p50, each over rounds.
    pub fn derived(&self, system: &str) -> Value {
        let mut out = serde_json::Map::new();
        for (name, s) in [
            (
                "p50_x_direct",
                self.spread(|r| r.ratio(system, "direct", "/p50_ns")),
            ),
            (
                "p99_x_direct",
                self.spread(|r| r.ratio(system, "direct", "/p99_ns")),
            ),
            (
                "p50_x_nginx",
                self.spread(|r| r.ratio(system, "nginx", "/p50_ns")),
            ),
            (
                "p99_x_nginx",
                self.spread(|r| r.ratio(system, "nginx", "/p99_ns")),
            ),
            ("added_p50_ns", self.spread(|r| r.added(system, "/p50_ns"))),
        ] {
            if let Some(s) = s.filter(|_| system != "direct") {
                out.insert(name.into(), s.json());
            }
        }
        Value::Object(out)
    }
}

/// An added latency as printed: its median and the rounds' range, or `≤0`
/// when the median is within noise of the direct path (a system cannot
/// take time away; a negative figure is noise, not a saving).
pub fn added(s: Option<Spread>) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.median <= 0.0 => "≤0".into(),
        Some(s) if s.rounds == 1 => dur(s.median),
        Some(s) => format!("{} [{}–{}]", dur(s.median), dur(s.lo.max(0.0)), dur(s.hi)),
    }
}

/// A ratio as printed (`1.42×`).
pub fn times(s: Option<Spread>) -> String {
    s.map_or("—".into(), |s| format!("{:.2}×", s.median))
}

/// Nanoseconds as printed.
pub fn dur(ns: f64) -> String {
    if ns >= 10_000_000.0 {
        format!("{:.0}ms", ns / 1e6)
    } else if ns >= 1_000_000.0 {
        format!("{:.1}ms", ns / 1e6)
    } else {
        format!("{:.0}µs", ns / 1e3)
    }
}

/// A target of the issue: a figure of Tollgate's, per round, against a limit.
pub struct Target {
    pub scenario: &'static str,
    pub text: &'static str,
    pub figure: fn(Round<'_>) -> Option<f64>,
    pub limit: f64,
    pub at_most: bool,
    /// How the figure prints: "×" (a ratio), "µs", "ms", "KiB".
    pub unit: &'static str,
}

pub const TARGETS: &[Target] = &[
    Target {
        scenario: "rate_200",
        text: "added p50 ≤ 1.0 × nginx's",
        figure: |r| r.added_ratio("tollgate", "nginx", "/p50_ns"),
        limit: 1.0,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "rate_200",
        text: "p99 ≤ 1.0 × nginx's",
        figure: |r| r.ratio("tollgate", "nginx", "/p99_ns"),
        limit: 1.0,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "rate_200",
        text: "CPU per call ≤ 1.2 × nginx's",
        figure: |r| r.ratio("tollgate", "nginx", "/cpu_s_per_1000"),
        limit: 1.2,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "rate_200",
        text: "added p50 ≤ 1.5 × the floor's (a bare rustls relay): what LLM awareness may cost",
        figure: |r| r.added_ratio("tollgate", "floor", "/p50_ns"),
        limit: 1.5,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "rate_1000",
        text: "added p50 ≤ 1.0 × nginx's",
        figure: |r| r.added_ratio("tollgate", "nginx", "/p50_ns"),
        limit: 1.0,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "rate_1000",
        text: "p99 ≤ 1.0 × nginx's",
        figure: |r| r.ratio("tollgate", "nginx", "/p99_ns"),
        limit: 1.0,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "rate_1000",
        text: "CPU per call ≤ 1.2 × nginx's",
        figure: |r| r.ratio("tollgate", "nginx", "/cpu_s_per_1000"),
        limit: 1.2,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "rate_1000",
        text: "peak RSS under load ≤ nginx's",
        figure: |r| r.ratio("tollgate", "nginx", "/peak_rss_mib"),
        limit: 1.0,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "saturation",
        text: "throughput ≥ 1.0 × nginx's",
        figure: |r| r.ratio("tollgate", "nginx", "/rps"),
        limit: 1.0,
        at_most: false,
        unit: "×",
    },
    Target {
        scenario: "saturation",
        text: "throughput ≥ 10 × LiteLLM's",
        figure: |r| r.ratio("tollgate", "litellm", "/rps"),
        limit: 10.0,
        at_most: false,
        unit: "×",
    },
    Target {
        scenario: "fresh_tls",
        text: "added p50 with a new TCP + TLS connection per call ≤ 2 × nginx's",
        figure: |r| r.added_ratio("tollgate", "nginx", "/p50_ns"),
        limit: 2.0,
        at_most: true,
        unit: "×",
    },
    Target {
        scenario: "streaming",
        text: "per-chunk delay added ≤ 50 µs p50",
        figure: |r| r.added("tollgate", "/p50_ns").map(|ns| ns / 1e3),
        limit: 50.0,
        at_most: true,
        unit: "µs",
    },
    Target {
        scenario: "streaming",
        text: "time to first token ≤ direct + 0.5 ms",
        figure: |r| r.added("tollgate", "/ttft/p50_ns").map(|ns| ns / 1e6),
        limit: 0.5,
        at_most: true,
        unit: "ms",
    },
    Target {
        scenario: "idle",
        text: "memory per idle kept-alive TLS connection ≤ 12 KiB",
        figure: |r| r.get("tollgate", "/kib_per_conn"),
        limit: 12.0,
        at_most: true,
        unit: "KiB",
    },
];

/// Each target judged on the scenarios measured: met only when every
/// round's figure meets it, missed when none does, unsure between.
pub fn judge(all: &[Rounds]) -> Vec<Value> {
    let mut out = Vec::new();
    for t in TARGETS {
        let name = format!("{}: Tollgate {}", t.scenario, t.text);
        let Some(s) = all
            .iter()
            .find(|r| r.scenario == t.scenario)
            .and_then(|r| r.spread(t.figure))
        else {
            out.push(json!({"target": name, "verdict": "n/a", "why": "a system or scenario was not measured"}));
            continue;
        };
        let meets = |v: f64| {
            if t.at_most {
                v <= t.limit
            } else {
                v >= t.limit
            }
        };
        let verdict = match (meets(s.lo), meets(s.hi)) {
            (true, true) => "met",
            (false, false) => "MISSED",
            _ => "unsure",
        };
        out.push(json!({
            "target": name, "verdict": verdict, "limit": t.limit, "unit": t.unit,
            "figure": s.json(),
        }));
    }
    out
}

/// The verdicts as printed.
pub fn print(verdicts: &[Value]) {
    println!(
        "\nTargets (printed, not asserted; figure = median over rounds [range]; met only when the whole range is)\n"
    );
    for v in verdicts {
        let name = v["target"].as_str().unwrap_or("");
        let verdict = v["verdict"].as_str().unwrap_or("");
        let f = &v["figure"];
        let (Some(m), Some(lo), Some(hi)) =
            (f["median"].as_f64(), f["lo"].as_f64(), f["hi"].as_f64())
        else {
            println!("  {verdict:<7} {name}: {}", v["why"].as_str().unwrap_or(""));
            continue;
        };
        let unit = v["unit"].as_str().unwrap_or("");
        let n = f["rounds"].as_u64().unwrap_or(1);
        let range = if n > 1 {
            format!(" [{lo:.2}–{hi:.2}, {n} rounds]")
        } else {
            " (1 round: no interval)".into()
        };
        println!(
            "  {verdict:<7} {name}: {m:.2}{unit}{range} vs {}{unit}",
            v["limit"]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: &str, p50_us: f64, p99_us: f64) -> Value {
        json!({"system": system, "p50_ns": p50_us * 1e3, "p99_ns": p99_us * 1e3, "rps": 100.0, "cpu_s_per_1000": 0.5})
    }

    fn rounds(scenario: &'static str, r: Vec<Vec<Value>>) -> Rounds {
        Rounds {
            scenario,
            rounds: r,
        }
    }

    #[test]
    fn the_range_of_the_rounds_is_the_interval() {
        let s = Spread::of(vec![3.0, 1.0, 2.0, f64::NAN, 5.0, 4.0]).unwrap();
        assert_eq!((s.median, s.lo, s.hi, s.rounds), (3.0, 1.0, 5.0, 5));
        assert_eq!(Spread::of(vec![2.0, 4.0]).unwrap().median, 3.0);
        assert!(Spread::of(vec![]).is_none());
    }

    #[test]
    fn figures_are_compared_within_a_round() {
        // Round 2 is slower for everyone: within-round ratios stay put.
        let r = rounds(
            "rate_200",
            vec![
                vec![
                    row("direct", 300.0, 900.0),
                    row("tollgate", 500.0, 1200.0),
                    row("nginx", 500.0, 1500.0),
                ],
                vec![
                    row("direct", 900.0, 2000.0),
                    row("tollgate", 1100.0, 2400.0),
                    row("nginx", 1100.0, 3000.0),
                ],
            ],
        );
        let added = r.spread(|x| x.added("tollgate", "/p50_ns")).unwrap();
        assert_eq!((added.lo, added.hi), (200_000.0, 200_000.0));
        let vs = r
            .spread(|x| x.added_ratio("tollgate", "nginx", "/p50_ns"))
            .unwrap();
        assert_eq!(vs.median, 1.0);
        let d = r.derived("tollgate");
        assert_eq!(d["p99_x_nginx"]["lo"], 0.8);
        assert!(r.derived("direct").as_object().unwrap().is_empty());
    }

    #[test]
    fn a_target_is_met_only_when_every_round_meets_it() {
        let at = |tg: f64, nginx: f64| {
            vec![
                row("direct", 300.0, 900.0),
                row("tollgate", tg, 1000.0),
                row("nginx", nginx, 1000.0),
            ]
        };
        let verdict = |r: Vec<Vec<Value>>| {
            let v = judge(&[rounds("rate_200", r)]);
            v.iter()
                .find(|v| v["target"] == "rate_200: Tollgate added p50 ≤ 1.0 × nginx's")
                .unwrap()["verdict"]
                .clone()
        };
        // Added 200 vs 250, 180 vs 250: met in both.
        assert_eq!(verdict(vec![at(500.0, 550.0), at(480.0, 550.0)]), "met");
        // One round over the limit: the interval straddles it.
        assert_eq!(verdict(vec![at(500.0, 550.0), at(600.0, 550.0)]), "unsure");
        assert_eq!(verdict(vec![at(700.0, 550.0), at(600.0, 550.0)]), "MISSED");
        // Nothing measured for a scenario: said so, not judged.
        let v = judge(&[]);
        assert!(
            v.iter()
                .all(|v| v["verdict"] == "n/a" && v["why"].is_string())
        );
    }

    #[test]
    fn a_failed_row_is_not_a_figure_and_noise_is_not_a_saving() {
        let r = Round(&[
            json!({"system": "direct", "p50_ns": 100.0}),
            json!({"system": "nginx", "failed": "x", "p50_ns": 1.0}),
        ]);
        assert_eq!(r.get("nginx", "/p50_ns"), None);
        assert_eq!(added(Spread::of(vec![-20_000.0, 5_000.0, -1_000.0])), "≤0");
        assert_eq!(
            added(Spread::of(vec![200_000.0, 250_000.0, 300_000.0])),
            "250µs [200µs–300µs]"
        );
    }
}
