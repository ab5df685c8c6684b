//! Budget spend shared by every node through Redis (`state.backend: redis`).
//!
//! One round trip per decision: `MGET` of the day and month totals of the
//! call's budget. Charging after the call is one pipelined round trip
//! (`INCRBYFLOAT` + `EXPIRE` for both periods), sent off the data path.
//! Keys: `tollgate:budget:<rule>:<key>:d:<YYYY-MM-DD>` and `…:m:<YYYY-MM>`,
//! expiring after their period. When Redis cannot answer within
//! `state.timeout`, the node decides with its own spend (logged and counted
//! in `tollgate_state_errors_total`) and goes on trying Redis.
use std::time::{Duration, Instant};

use redis::{AsyncCommands, aio::MultiplexedConnection};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::budgets::{BudgetKey, SoftCrossed};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Each node counts on its own.
    #[default]
    Local,
    /// Budgets are shared through Redis.
    Redis,
}

/// The `state` section.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub backend: Backend,
    /// `redis://host:port/db`, `rediss://…` (TLS) or `unix:///path/redis.sock`.
    pub redis_url: String,
    /// Longest wait for Redis before deciding locally.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Local,
            redis_url: "redis://127.0.0.1:6379".into(),
            timeout: Duration::from_millis(50),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("state.redis_url `{url}` is not a Redis URL: {source}")]
    Url {
        url: String,
        source: redis::RedisError,
    },
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Spend totals of one budget, both periods.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub day_usd: f64,
    pub month_usd: f64,
}

pub struct SharedBudgets {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

fn keys(b: &BudgetKey, now: OffsetDateTime) -> (String, String) {
    let d = now.date();
    let base = format!("tollgate:budget:{}:{}", b.rule, b.key);
    (
        format!(
            "{base}:d:{:04}-{:02}-{:02}",
            d.year(),
            u8::from(d.month()),
            d.day()
        ),
        format!("{base}:m:{:04}-{:02}", d.year(), u8::from(d.month())),
    )
}

impl SharedBudgets {
    pub fn new(cfg: &StateConfig) -> Result<Self, SharedError> {
        let client =
            redis::Client::open(cfg.redis_url.as_str()).map_err(|source| SharedError::Url {
                url: cfg.redis_url.clone(),
                source,
            })?;
        Ok(Self {
            client,
            conn: Mutex::new(None),
            timeout: cfg.timeout,
        })
    }

    /// A connection (made on first use, remade after a failure).
    async fn conn(&self) -> Result<MultiplexedConnection, SharedError> {
        let mut c = self.conn.lock().await;
        if let Some(conn) = c.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.client.get_multiplexed_async_connection().await?;
        *c = Some(conn.clone());
        Ok(conn)
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, SharedError>>,
    ) -> Result<T, SharedError> {
        let r = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(SharedError::Timeout(self.timeout)),
        };
        if r.is_err() {
            self.forget().await;
        }
        r
    }

    /// The cluster's spend of `b` in the current day and month.
    pub async fn totals(&self, b: &BudgetKey, now: OffsetDateTime) -> Result<Totals, SharedError> {
        let (day, month) = keys(b, now);
        self.bounded(async {
            let mut c = self.conn().await?;
            let (d, m): (Option<f64>, Option<f64>) = c.mget(&[day, month]).await?;
            Ok(Totals {
                day_usd: d.unwrap_or(0.0),
                month_usd: m.unwrap_or(0.0),
            })
        })
        .await
    }

    /// Add `usd`; the soft limits this charge crossed, cluster-wide.
    pub async fn charge(
        &self,
        b: &BudgetKey,
        usd: f64,
        now: OffsetDateTime,
    ) -> Result<Vec<SoftCrossed>, SharedError> {
        let (day, month) = keys(b, now);
        let started = Instant::now();
        let (d, m): (f64, f64) = self
            .bounded(async {
                let mut c = self.conn().await?;
                let (d, _, m, _): (f64, i64, f64, i64) = redis::pipe()
                    .atomic()
                    .incr(&day, usd)
                    .expire(&day, 2 * 86_400)
                    .incr(&month, usd)
                    .expire(&month, 32 * 86_400)
                    .query_async(&mut c)
                    .await?;
                Ok((d, m))
            })
            .await?;
        tracing::trace!(took = ?started.elapsed(), "budget charged in Redis");
        let share = b.config.soft_percent / 100.0;
        let crossed = |period, limit: Option<f64>, total: f64| {
            limit
                .filter(|l| total >= l * share && total - usd < l * share)
                .map(|l| SoftCrossed {
                    period,
                    limit: l,
                    spent: total,
                })
        };
        Ok(crossed("daily", b.config.daily_usd, d)
            .into_iter()
            .chain(crossed("monthly", b.config.monthly_usd, m))
            .collect())
    }
}
