//! Budget spend shared by every node through Redis (`state.backend: redis`).
//!
//! One round trip per decision: a Lua script that reads the day and month
//! totals and the reservations of calls in flight, refuses or reserves the
//! call's worst-case cost, atomically (two nodes cannot both take the last
//! of a budget). Settling after the call is one more script, off the data
//! path: the reservation goes, the real cost is added.
//! Keys: `tollgate:budget:<rule>:<key>:d:<YYYY-MM-DD>` and `…:m:<YYYY-MM>`,
//! expiring after their period; reservations in `…:r` (call id → expiry)
//! and `…:rh` (call id → USD), each expiring after RESERVATION_TTL, so a
//! node that dies mid-call holds nothing for longer (its journal settles
//! the call when it restarts). When Redis cannot answer within
//! `state.timeout`, the node decides with its own spend (logged and counted
//! in `tollgate_state_errors_total`) and goes on trying Redis.
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::budgets::{BudgetKey, Exhausted, SoftCrossed, verdict};

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

pub struct SharedBudgets {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
    reserve: redis::Script,
    settle: redis::Script,
}

/// How long a reservation outlives a node that never settled it.
const RESERVATION_TTL: Duration = Duration::from_secs(3600);

/// Reserve ARGV[3] USD as call ARGV[2], or refuse: 0 admitted, 1 daily,
/// 2 monthly; with the period's spend and the reservations in flight.
const BUDGET_RESERVE: &str = r#"
local now = tonumber(ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[4], id) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
local reserved = 0
for _, v in ipairs(redis.call('HVALS', KEYS[4])) do reserved = reserved + tonumber(v) end
local d = tonumber(redis.call('GET', KEYS[1]) or '0')
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
local dl, ml = tonumber(ARGV[5]), tonumber(ARGV[6])
if dl > 0 and d + reserved >= dl then return {1, tostring(d), tostring(reserved)} end
if ml > 0 and m + reserved >= ml then return {2, tostring(m), tostring(reserved)} end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[3], now + ttl, ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
return {0, tostring(d), tostring(reserved)}
"#;

/// Drop call ARGV[1]'s reservation and add its cost ARGV[2]; the new totals.
const BUDGET_SETTLE: &str = r#"
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
local d = redis.call('INCRBYFLOAT', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], 172800)
local m = redis.call('INCRBYFLOAT', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], 2764800)
return {tostring(d), tostring(m)}
"#;

/// Day total, month total, reservations (ids by expiry), reservations (USD by id).
fn keys(b: &BudgetKey, now: OffsetDateTime) -> [String; 4] {
    let d = now.date();
    let base = format!("tollgate:budget:{}:{}", b.rule, b.key);
    [
        format!(
            "{base}:d:{:04}-{:02}-{:02}",
            d.year(),
            u8::from(d.month()),
            d.day()
        ),
        format!("{base}:m:{:04}-{:02}", d.year(), u8::from(d.month())),
        format!("{base}:r"),
        format!("{base}:rh"),
    ]
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
            reserve: redis::Script::new(BUDGET_RESERVE),
            settle: redis::Script::new(BUDGET_SETTLE),
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

    /// Reserve `usd` for call `id` under `b` against the cluster's spend
    /// and reservations, or say which period refuses.
    pub async fn reserve(
        &self,
        b: &BudgetKey,
        id: &str,
        usd: f64,
        now: OffsetDateTime,
    ) -> Result<Result<(), Exhausted>, SharedError> {
        let keys = keys(b, now);
        let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
        let (which, spent, reserved): (u8, String, String) = self
            .bounded(async {
                let mut c = self.conn().await?;
                let mut call = self.reserve.prepare_invoke();
                for k in &keys {
                    call.key(k);
                }
                Ok(call
                    .arg(now_ms)
                    .arg(id)
                    .arg(usd)
                    .arg(RESERVATION_TTL.as_millis() as i64)
                    .arg(b.config.daily_usd.unwrap_or(0.0))
                    .arg(b.config.monthly_usd.unwrap_or(0.0))
                    .invoke_async(&mut c)
                    .await?)
            })
            .await?;
        let (spent, reserved) = (
            spent.parse().unwrap_or(0.0),
            reserved.parse().unwrap_or(0.0),
        );
        Ok(match which {
            0 => Ok(()),
            // The same arithmetic as the node's own, for the same answer.
            1 => verdict(b, spent, 0.0, reserved, now),
            _ => verdict(b, 0.0, spent, reserved, now),
        })
    }

    /// Replace call `id`'s reservation by its cost `usd`; the soft limits
    /// this crossed, cluster-wide.
    pub async fn settle(
        &self,
        b: &BudgetKey,
        id: &str,
        usd: f64,
        now: OffsetDateTime,
    ) -> Result<Vec<SoftCrossed>, SharedError> {
        let keys = keys(b, now);
        let started = Instant::now();
        let (d, m): (String, String) = self
            .bounded(async {
                let mut c = self.conn().await?;
                let mut call = self.settle.prepare_invoke();
                for k in &keys {
                    call.key(k);
                }
                Ok(call.arg(id).arg(usd).invoke_async(&mut c).await?)
            })
            .await?;
        let (d, m): (f64, f64) = (d.parse().unwrap_or(0.0), m.parse().unwrap_or(0.0));
        tracing::trace!(took = ?started.elapsed(), "budget settled in Redis");
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
