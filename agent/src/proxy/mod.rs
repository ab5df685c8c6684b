//! The data path for redirected connections: each accepted connection is
//! either terminated (TLS for a governed provider host, `terminate`) or
//! relayed as bytes (`relay`); `upstream` pools provider connections.
pub mod client_hello;
pub mod relay;
pub mod terminate;
pub mod upstream;
