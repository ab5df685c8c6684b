//! What the agent tells the outside: metrics and the per-connection log.
pub mod events;
pub mod metrics;
pub mod redact;
