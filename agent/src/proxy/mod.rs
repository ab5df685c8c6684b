//! The data path for redirected connections, in the order a connection
//! meets it: `accept` (who, where, first bytes) → `plan` (terminate, relay
//! or refuse: a pure decision) → `relay` (bytes, counted) or `terminate`
//! (TLS, HTTP) → `forward` (one request: read, admit, send; its provider
//! leg moved to a task only when the client leaves: `detach`) → `send`
//! (attempts, failover) over `upstream` (pooled provider connections) →
//! `metered` (the response on its way back) → `account` (price, metrics,
//! audit); a WebSocket upgrade (the Realtime API) is a `realtime` session
//! instead of a request. `rescue` answers what the proxy refuses itself; `restart`
//! records the calls a killed run left unfinished (the call journal);
//! `context` holds what they share.
pub mod accept;
pub mod account;
pub mod buffered;
pub mod client_hello;
pub mod context;
mod detach;
pub mod dial;
mod forward;
mod mcp;
mod metered;
pub mod plan;
pub mod pooled;
mod realtime;
pub mod relay;
mod rescue;
pub mod restart;
pub mod send;
pub mod terminate;
pub mod trust;
pub mod upstream;
