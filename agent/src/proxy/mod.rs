//! The data path for redirected connections. Today: the byte relay (observe).
pub mod relay;
