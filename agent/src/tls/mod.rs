//! TLS toward workloads: the node CA and the leaf certificates it issues.
pub mod ca;
pub mod leaf;

pub use ca::{CaError, NodeCa};
pub use leaf::LeafCache;
