//! The data path for redirected connections: each accepted connection is
//! either terminated (TLS for a governed provider host, `terminate`) or
//! relayed as bytes (`relay`); `upstream` pools provider connections.
mod account;
pub mod client_hello;
mod metered;
pub mod relay;
pub mod send;
pub mod terminate;
pub mod trust;
pub mod upstream;
