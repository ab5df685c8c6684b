//! Spend budgets per rule and key, per UTC day and month, priced by the
//! price table. Before it is sent, a call reserves its worst-case cost
//! (input estimate, plus its output limit at the output price); it is
//! refused when spend plus what calls in flight reserved has reached a
//! hard limit, and settles on its real cost when it ends. So concurrent
//! calls cannot spend more than the budget plus one call's reservation.
//! Crossing the soft share is logged and counted once per period.
//!
//! Spend survives restarts when `policy.budget_state_file` is set: it is
//! written there every few seconds when it changed, and at shutdown.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::limits::LimitKey;

/// A rule's `budget`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default)]
    pub per: LimitKey,
    /// USD per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_usd: Option<f64>,
    /// USD per UTC calendar month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_usd: Option<f64>,
    /// Share of a budget (percent) at which a warning is logged and counted.
    #[serde(default = "default_soft")]
    pub soft_percent: f64,
}

fn default_soft() -> f64 {
    80.0
}

impl BudgetConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.daily_usd.is_none() && self.monthly_usd.is_none() {
            return Err(("daily_usd", "set daily_usd, monthly_usd or both".into()));
        }
        for (f, v) in [
            ("daily_usd", self.daily_usd),
            ("monthly_usd", self.monthly_usd),
        ] {
            if v.is_some_and(|v| !v.is_finite() || v <= 0.0) {
                return Err((f, "must be a positive amount of USD".into()));
            }
        }
        if !(0.0..=100.0).contains(&self.soft_percent) {
            return Err(("soft_percent", "must be between 0 and 100".into()));
        }
        Ok(())
    }
}

/// Which budget a call draws on (carried from decision to accounting, and
/// in the call journal across a restart).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetKey {
    /// The decision's reason, `rule:<name>`.
    pub rule: String,
    pub key: String,
    pub config: BudgetConfig,
}

/// A budget that refuses calls: spent until it resets, or committed to
/// calls in flight until they settle.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhausted {
    /// `daily` or `monthly`.
    pub period: &'static str,
    pub limit: f64,
    pub spent: f64,
    /// Reserved by calls in flight (their worst-case cost).
    pub reserved: f64,
    pub resets_at: OffsetDateTime,
}

impl Exhausted {
    /// Spent for good (not only committed to calls in flight, which may
    /// settle for less).
    pub fn spent_for_the_period(&self) -> bool {
        self.spent >= self.limit
    }
}

/// A soft limit crossed by a charge.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftCrossed {
    pub period: &'static str,
    pub limit: f64,
    pub spent: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Spend {
    /// `YYYY-MM-DD` and `YYYY-MM` of the periods the sums are for.
    day: String,
    day_usd: f64,
    month: String,
    month_usd: f64,
    day_warned: bool,
    month_warned: bool,
    /// Worst-case cost reserved by calls in flight (not saved: a restart
    /// ends those calls, and the journal charges them).
    #[serde(skip)]
    reserved_usd: f64,
}

impl Spend {
    /// Start new periods when the date moved on.
    fn roll(&mut self, now: OffsetDateTime) {
        let (day, month) = periods(now);
        if self.day != day {
            self.day = day;
            self.day_usd = 0.0;
            self.day_warned = false;
        }
        if self.month != month {
            self.month = month;
            self.month_usd = 0.0;
            self.month_warned = false;
        }
    }
}

fn periods(now: OffsetDateTime) -> (String, String) {
    let d = now.date();
    (
        format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        format!("{:04}-{:02}", d.year(), u8::from(d.month())),
    )
}

/// One row of `tollgate status`.
#[derive(Debug, Clone, Serialize)]
pub struct SpendRow {
    pub rule: String,
    pub key: String,
    pub day: String,
    pub day_usd: f64,
    pub month: String,
    pub month_usd: f64,
}

/// Refuse when a hard limit of `b` is reached by these totals and what
/// calls in flight reserved.
pub fn verdict(
    b: &BudgetKey,
    day_usd: f64,
    month_usd: f64,
    reserved: f64,
    now: OffsetDateTime,
) -> Result<(), Exhausted> {
    let d = now.date();
    if let Some(limit) = b.config.daily_usd.filter(|l| day_usd + reserved >= *l) {
        return Err(Exhausted {
            period: "daily",
            limit,
            spent: day_usd,
            reserved,
            resets_at: d
                .next_day()
                .expect("not the end of time")
                .midnight()
                .assume_utc(),
        });
    }
    if let Some(limit) = b.config.monthly_usd.filter(|l| month_usd + reserved >= *l) {
        let (y, m) = if d.month() == time::Month::December {
            (d.year() + 1, time::Month::January)
        } else {
            (d.year(), d.month().next())
        };
        return Err(Exhausted {
            period: "monthly",
            limit,
            spent: month_usd,
            reserved,
            resets_at: time::Date::from_calendar_date(y, m, 1)
                .expect("valid date")
                .midnight()
                .assume_utc(),
        });
    }
    Ok(())
}

#[derive(Default)]
pub struct Budgets {
    spend: Mutex<(HashMap<String, Spend>, bool)>, // by "rule\tkey"; dirty flag
}

fn id(rule: &str, key: &str) -> String {
    format!("{rule}\t{key}")
}

impl Budgets {
    /// Reserve `usd` for a call under `b`, or refuse if a hard limit is
    /// reached by this node's spend and reservations.
    pub fn reserve(&self, b: &BudgetKey, usd: f64, now: OffsetDateTime) -> Result<(), Exhausted> {
        let mut g = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        let id = id(&b.rule, &b.key);
        // A refused key that spent nothing gets no entry: a flood of
        // refused workloads keeps no memory.
        let (day, month, reserved) = match g.0.get_mut(&id) {
            Some(s) => {
                s.roll(now);
                (s.day_usd, s.month_usd, s.reserved_usd)
            }
            None => (0.0, 0.0, 0.0),
        };
        verdict(b, day, month, reserved, now)?;
        g.0.entry(id).or_default().reserved_usd += usd;
        Ok(())
    }

    /// Hold `usd` for a call another store (Redis) admitted, so this
    /// node's view, used when that store is away, counts it too.
    pub fn hold(&self, b: &BudgetKey, usd: f64) {
        let mut g = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        g.0.entry(id(&b.rule, &b.key)).or_default().reserved_usd += usd;
    }

    /// Give back a reservation (the call ended; its cost is charged apart).
    pub fn release(&self, b: &BudgetKey, usd: f64) {
        let mut g = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = g.0.get_mut(&id(&b.rule, &b.key)) {
            s.reserved_usd = (s.reserved_usd - usd).max(0.0);
        }
    }

    /// Add `usd` to `b`'s spend; the soft limits it crossed (once per period).
    pub fn charge(&self, b: &BudgetKey, usd: f64, now: OffsetDateTime) -> Vec<SoftCrossed> {
        let mut g = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = true;
        let s = g.0.entry(id(&b.rule, &b.key)).or_default();
        s.roll(now);
        s.day_usd += usd;
        s.month_usd += usd;
        let share = b.config.soft_percent / 100.0;
        [
            ("daily", b.config.daily_usd, s.day_usd, &mut s.day_warned),
            (
                "monthly",
                b.config.monthly_usd,
                s.month_usd,
                &mut s.month_warned,
            ),
        ]
        .into_iter()
        .filter_map(|(period, limit, spent, warned)| {
            let limit = limit.filter(|l| !*warned && spent >= l * share)?;
            *warned = true;
            Some(SoftCrossed {
                period,
                limit,
                spent,
            })
        })
        .collect()
    }

    /// Current spend, for `tollgate status` and the metrics. Keys that have
    /// spent nothing this month (a workload gone since last month, say) are
    /// forgotten here: they carry nothing a check or a report needs.
    pub fn rows(&self, now: OffsetDateTime) -> Vec<SpendRow> {
        let mut g = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        let before = g.0.len();
        g.0.retain(|_, s| {
            s.roll(now);
            s.month_usd > 0.0 || s.day_usd > 0.0 || s.reserved_usd > 0.0
        });
        if g.0.len() != before {
            g.1 = true;
        }
        let mut rows: Vec<SpendRow> =
            g.0.iter_mut()
                .map(|(k, s)| {
                    s.roll(now);
                    let (rule, key) = k.split_once('\t').unwrap_or((k, ""));
                    SpendRow {
                        rule: rule.into(),
                        key: key.into(),
                        day: s.day.clone(),
                        day_usd: s.day_usd,
                        month: s.month.clone(),
                        month_usd: s.month_usd,
                    }
                })
                .collect();
        rows.sort_by(|a, b| (&a.rule, &a.key).cmp(&(&b.rule, &b.key)));
        rows
    }

    /// Load spend saved by an earlier run (missing file: nothing spent yet).
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let map: HashMap<String, Spend> = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: not a budget state file: {e}", path.display()))?;
                Ok(Self {
                    spend: Mutex::new((map, false)),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write spend to `path` if it changed (atomically: temp file + rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = {
            let mut g = self.spend.lock().unwrap_or_else(|e| e.into_inner());
            if !g.1 {
                return Ok(());
            }
            g.1 = false;
            serde_json::to_vec(&g.0).expect("spend serialises")
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp: PathBuf = path.with_extension("tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn key(daily: Option<f64>, monthly: Option<f64>) -> BudgetKey {
        BudgetKey {
            rule: "rule:team".into(),
            key: "w".into(),
            config: BudgetConfig {
                per: LimitKey::Workload,
                daily_usd: daily,
                monthly_usd: monthly,
                soft_percent: 50.0,
            },
        }
    }

    #[test]
    fn hard_limit_refuses_until_the_next_day() {
        let b = Budgets::default();
        let k = key(Some(1.0), None);
        let t = datetime!(2026-11-25 10:00 UTC);
        assert!(b.reserve(&k, 0.0, t).is_ok());
        let soft = b.charge(&k, 0.6, t);
        assert_eq!(
            soft,
            vec![SoftCrossed {
                period: "daily",
                limit: 1.0,
                spent: 0.6
            }]
        );
        assert!(
            b.charge(&k, 0.1, t).is_empty(),
            "soft warning once per period"
        );
        b.charge(&k, 0.4, t);
        let e = b.reserve(&k, 0.1, t).unwrap_err();
        assert_eq!(e.period, "daily");
        assert!(e.spent_for_the_period());
        assert_eq!(e.resets_at, datetime!(2026-11-26 0:00 UTC));
        assert!(
            b.reserve(&k, 0.1, datetime!(2026-11-26 0:00:01 UTC))
                .is_ok(),
            "a new day"
        );
    }

    #[test]
    fn monthly_budget_spans_days_and_resets_with_the_month() {
        let b = Budgets::default();
        let k = key(None, Some(2.0));
        b.charge(&k, 1.5, datetime!(2026-12-30 23:00 UTC));
        b.charge(&k, 0.6, datetime!(2026-12-31 01:00 UTC));
        let e = b
            .reserve(&k, 0.0, datetime!(2026-12-31 02:00 UTC))
            .unwrap_err();
        assert_eq!(e.period, "monthly");
        assert_eq!(e.resets_at, datetime!(2027-01-01 0:00 UTC));
        assert!(b.reserve(&k, 0.0, datetime!(2027-01-01 0:00 UTC)).is_ok());
    }

    #[test]
    fn keys_that_spent_nothing_this_month_are_forgotten() {
        let b = Budgets::default();
        for i in 0..100 {
            let k = BudgetKey {
                key: format!("pod-{i}"),
                ..key(Some(1.0), None)
            };
            assert!(b.reserve(&k, 0.1, datetime!(2026-12-01 10:00 UTC)).is_ok());
            b.release(&k, 0.1);
        }
        assert!(
            b.rows(datetime!(2026-12-01 10:00 UTC)).is_empty(),
            "calls that spent nothing keep nothing"
        );
        let k = key(Some(1.0), None);
        b.charge(&k, 0.5, datetime!(2026-12-01 10:00 UTC));
        assert_eq!(
            b.rows(datetime!(2026-12-31 10:00 UTC)).len(),
            1,
            "kept within its month"
        );
        assert!(
            b.rows(datetime!(2027-01-01 10:00 UTC)).is_empty(),
            "gone the month after"
        );
    }

    #[test]
    fn concurrent_calls_cannot_spend_more_than_the_budget_and_one_reservation() {
        let b = Budgets::default();
        let k = key(Some(1.0), None);
        let t = datetime!(2026-12-01 10:00 UTC);
        // Fifty calls at once, each reserving 0.3: four get in (0.9 < 1.0
        // before the fourth), the rest wait for them to settle.
        let admitted = (0..50).filter(|_| b.reserve(&k, 0.3, t).is_ok()).count();
        assert_eq!(admitted, 4);
        let e = b.reserve(&k, 0.3, t).unwrap_err();
        assert!(!e.spent_for_the_period(), "committed, not spent: {e:?}");
        assert!((e.reserved - 1.2).abs() < 1e-9);
        // They settle for less than reserved: room again.
        for _ in 0..4 {
            b.release(&k, 0.3);
            b.charge(&k, 0.1, t);
        }
        assert!(b.reserve(&k, 0.3, t).is_ok());
        b.release(&k, 0.3);
        b.charge(&k, 0.7, t);
        assert!(b.reserve(&k, 0.3, t).unwrap_err().spent_for_the_period());
    }

    #[test]
    fn spend_survives_a_restart_through_the_state_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state/budgets.json");
        let b = Budgets::default();
        let k = key(Some(1.0), None);
        let t = OffsetDateTime::now_utc();
        b.charge(&k, 1.25, t);
        b.save(&p).unwrap();
        let again = Budgets::load(&p).unwrap();
        assert!(again.reserve(&k, 0.0, t).is_err());
        assert_eq!(again.rows(t)[0].day_usd, 1.25);
        assert!(Budgets::load(&d.path().join("none.json")).is_ok());
        std::fs::write(&p, "nonsense").unwrap();
        assert!(Budgets::load(&p).is_err());
        assert!(key(None, None).config.validate().is_err());
    }
}
