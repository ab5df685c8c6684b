//! What the agent tells the outside: metrics, the audit log (`records`
//! its schema, `events` its writer), and OpenTelemetry spans (`otlp`).
pub mod events;
pub mod metrics;
pub mod otlp;
pub mod records;
pub mod redact;
pub mod series;
pub mod token;
