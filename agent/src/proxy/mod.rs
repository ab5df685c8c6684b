//! The data path for redirected connections. Today: the byte relay (observe).
pub mod client_hello;
pub mod relay;
