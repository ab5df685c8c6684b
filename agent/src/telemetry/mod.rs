//! What the agent tells the outside: metrics, and the audit log (`records`
//! its schema, `events` its writer).
pub mod events;
pub mod metrics;
pub mod records;
pub mod redact;
pub mod series;
pub mod token;
