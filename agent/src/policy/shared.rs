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
    /// `redis://host:port/db` or `unix:///path/redis.sock` (no TLS client is built in).
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

/// Token buckets in Redis, same arithmetic as `limits::Limiter`, one Lua
/// call per decision (atomic: two nodes cannot both take the last token).
/// Hash fields per (rule, key): `r`, `i`, `o` (available requests, input and
/// output tokens) and `t` (last refill, ms); a counter for concurrency.
const ADMIT: &str = r#"
local now = tonumber(ARGV[1])
local lim = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
local need = {1, tonumber(ARGV[5]), tonumber(ARGV[6])}
local maxc = tonumber(ARGV[7])
local f = {'r', 'i', 'o'}
local h = redis.call('HMGET', KEYS[1], 'r', 'i', 'o', 't')
local t = tonumber(h[4]) or now
local avail = {}
for k = 1, 3 do
  if lim[k] > 0 then
    local a = tonumber(h[k]) or lim[k]
    a = math.min(lim[k], a + math.max(0, now - t) * lim[k] / 60000)
    avail[k] = a
    local n = math.min(need[k], lim[k])
    if a < n then
      return {k, tostring(math.max(0, a)), tostring((n - a) * 60000 / lim[k])}
    end
  end
end
if maxc > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= maxc then
  return {4, '0', '1000'}
end
for k = 1, 3 do
  if lim[k] > 0 then
    redis.call('HSET', KEYS[1], f[k], tostring(avail[k] - math.min(need[k], lim[k])))
  end
end
redis.call('HSET', KEYS[1], 't', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
if maxc > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], 600000)
end
return {0, '0', '0'}
"#;

/// Give back (or take more of) reserved tokens and release a slot.
const SETTLE: &str = r#"
local lim_i, lim_o = tonumber(ARGV[1]), tonumber(ARGV[2])
local d_i, d_o = tonumber(ARGV[3]), tonumber(ARGV[4])
if lim_i > 0 then
  local a = tonumber(redis.call('HGET', KEYS[1], 'i') or lim_i)
  redis.call('HSET', KEYS[1], 'i', tostring(math.min(lim_i, a + d_i)))
end
if lim_o > 0 then
  local a = tonumber(redis.call('HGET', KEYS[1], 'o') or lim_o)
  redis.call('HSET', KEYS[1], 'o', tostring(math.min(lim_o, a + d_o)))
end
if tonumber(ARGV[5]) == 1 then
  local c = tonumber(redis.call('GET', KEYS[2]) or '0')
  if c > 0 then redis.call('DECR', KEYS[2]) end
end
return 0
"#;

pub struct SharedLimits {
    inner: SharedBudgets,
    admit: redis::Script,
    settle: redis::Script,
}

fn limit_keys(rule: &str, key: &str) -> [String; 2] {
    [
        format!("tollgate:limit:{rule}:{key}"),
        format!("tollgate:inflight:{rule}:{key}"),
    ]
}

impl SharedLimits {
    pub fn new(cfg: &StateConfig) -> Result<Self, SharedError> {
        Ok(Self {
            inner: SharedBudgets::new(cfg)?,
            admit: redis::Script::new(ADMIT),
            settle: redis::Script::new(SETTLE),
        })
    }

    /// Take from the cluster's buckets, or say which limit refuses.
    pub async fn admit(
        &self,
        rule: &str,
        key: &str,
        limits: &super::limits::LimitsConfig,
        est: super::limits::Estimate,
    ) -> Result<Result<(), super::limits::Limited>, SharedError> {
        let keys = limit_keys(rule, key);
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let (which, remaining, wait_ms): (u8, String, String) = self
            .inner
            .bounded(async {
                let mut c = self.inner.conn().await?;
                Ok(self
                    .admit
                    .key(&keys[0])
                    .key(&keys[1])
                    .arg(now as i64)
                    .arg(limits.requests_per_minute.unwrap_or(0))
                    .arg(limits.input_tokens_per_minute.unwrap_or(0))
                    .arg(limits.output_tokens_per_minute.unwrap_or(0))
                    .arg(est.input_tokens)
                    .arg(est.output_tokens)
                    .arg(limits.concurrent_requests.unwrap_or(0))
                    .invoke_async(&mut c)
                    .await?)
            })
            .await?;
        let (name, limit) = match which {
            0 => return Ok(Ok(())),
            1 => ("requests", limits.requests_per_minute),
            2 => ("input_tokens", limits.input_tokens_per_minute),
            3 => ("output_tokens", limits.output_tokens_per_minute),
            _ => ("concurrency", limits.concurrent_requests.map(u64::from)),
        };
        Ok(Err(super::limits::Limited {
            which: name,
            limit: limit.unwrap_or(0),
            remaining: remaining.parse::<f64>().unwrap_or(0.0) as u64,
            retry_after: Duration::from_secs_f64(
                wait_ms.parse::<f64>().unwrap_or(1000.0).max(1.0) / 1000.0,
            ),
        }))
    }

    /// Replace a reservation by the real usage, release the slot.
    pub async fn settle(
        &self,
        rule: &str,
        key: &str,
        limits: &super::limits::LimitsConfig,
        delta_in: f64,
        delta_out: f64,
    ) -> Result<(), SharedError> {
        let keys = limit_keys(rule, key);
        self.inner
            .bounded(async {
                let mut c = self.inner.conn().await?;
                let _: i64 = self
                    .settle
                    .key(&keys[0])
                    .key(&keys[1])
                    .arg(limits.input_tokens_per_minute.unwrap_or(0))
                    .arg(limits.output_tokens_per_minute.unwrap_or(0))
                    .arg(delta_in)
                    .arg(delta_out)
                    .arg(u8::from(limits.concurrent_requests.is_some()))
                    .invoke_async(&mut c)
                    .await?;
                Ok(())
            })
            .await
    }
}
