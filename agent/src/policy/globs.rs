//! What policy compilation shares: its error (with the field path), and
//! glob lists compiled into one matcher.
use globset::{Glob, GlobSet, GlobSetBuilder};

/// A policy that does not compile, and where.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// Path below `policy`, e.g. `rules[2].models[0]`.
    pub field: String,
    pub message: String,
}

/// Compile `patterns` (the list at `field`); None when there are none.
pub(super) fn globs(patterns: &[String], field: &str) -> Result<Option<GlobSet>, PolicyError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for (i, p) in patterns.iter().enumerate() {
        b.add(Glob::new(p).map_err(|e| PolicyError {
            field: format!("{field}[{i}]"),
            message: format!("`{p}` is not a valid glob: {}", e.kind()),
        })?);
    }
    b.build().map(Some).map_err(|e| PolicyError {
        field: field.into(),
        message: e.to_string(),
    })
}
