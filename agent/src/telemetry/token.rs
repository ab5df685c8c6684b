//! The bearer token that guards `/metrics` and `/status`: every namespace's
//! models, tokens and spend are there, and the chart's endpoint is on the
//! node's address, which pods can reach.
//!
//! The token is read from a file (a mounted Secret), re-read when the file
//! changes, so a rotated Secret takes effect without a restart; a file that
//! cannot be read keeps the token in force. Compared in constant time.
use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "cannot read the metrics token {path}: {source}\nhint: metrics.bearer_token_file names a file holding the token (e.g. a mounted Secret); leave it empty to serve /metrics without one"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the metrics token file {0} is empty\nhint: write a random token into it, e.g. `openssl rand -hex 32`"
    )]
    Empty(PathBuf),
}

/// The token, and the file it came from.
pub struct BearerToken {
    path: PathBuf,
    current: Mutex<Loaded>,
}

struct Loaded {
    modified: Option<SystemTime>,
    token: Vec<u8>,
}

impl BearerToken {
    /// Read the token from `path` (surrounding whitespace is not part of it).
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let loaded = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            current: Mutex::new(loaded),
        })
    }

    /// Whether an `Authorization` header value carries the token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        self.refresh();
        let Some(given) = authorization.and_then(|h| strip_bearer(h)) else {
            return false;
        };
        let token = self.lock().token.clone();
        constant_time_eq(given, &token)
    }

    /// Re-read the file if it changed since it was last read. Reading runs
    /// without the lock; a failed read keeps the token in force.
    fn refresh(&self) {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified.is_none() || modified == self.lock().modified {
            return;
        }
        match read(&self.path) {
            Ok(fresh) => *self.lock() = fresh,
            Err(e) => tracing::warn!(error = %e, "keeping the metrics token in force"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn read(path: &Path) -> Result<Loaded, TokenError> {
    let err = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let modified = std::fs::metadata(path).map_err(err)?.modified().ok();
    let text = std::fs::read(path).map_err(err)?;
    let token = text.trim_ascii().to_vec();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_path_buf()));
    }
    Ok(Loaded { modified, token })
}

fn strip_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Equal in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_only_the_token_and_follows_the_file() {
        let dir = std::env::temp_dir().join(format!("tg-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret-token\n").unwrap();
        let t = BearerToken::load(&path).unwrap();
        for (header, want) in [
            (Some(&b"Bearer s3cret-token"[..]), true),
            (Some(b"bearer s3cret-token "), true),
            (Some(b"Bearer s3cret-tokeN"), false),
            (Some(b"Bearer s3cret"), false),
            (Some(b"Basic s3cret-token"), false),
            (Some(b"s3cret-token"), false),
            (Some(b""), false),
            (None, false),
        ] {
            assert_eq!(
                t.admits(header),
                want,
                "{:?}",
                header.map(String::from_utf8_lossy)
            );
        }
        // Rotated: the new token, not the old one (a later mtime).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "rotated").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(t.admits(Some(b"Bearer rotated")));
        assert!(!t.admits(Some(b"Bearer s3cret-token")));
        // Emptied by mistake: the token in force stays.
        std::fs::write(&path, "").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(1))
            .unwrap();
        assert!(t.admits(Some(b"Bearer rotated")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_or_empty_file_is_a_clear_error() {
        let e = BearerToken::load(Path::new("/nonexistent/token"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("metrics.bearer_token_file"), "{e}");
        let empty = std::env::temp_dir().join(format!("tg-empty-token-{}", std::process::id()));
        std::fs::write(&empty, "\n").unwrap();
        let e = BearerToken::load(&empty).err().unwrap();
        assert!(e.to_string().contains("empty"), "{e}");
        std::fs::remove_file(&empty).unwrap();
    }
}
