//! The service token: read from a file at use, re-read when the file changes.

use std::fs::Metadata;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use reqwest::header::HeaderValue;

/// What identifies one version of the token file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

impl Stamp {
    fn of(meta: &Metadata) -> Stamp {
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            dev,
            ino,
        }
    }
}

/// A token file and the header value last read from it.
///
/// Each use costs one `stat`; the file is read again only when its mtime,
/// length or inode changed. Error messages name the file, never its
/// contents, and the header value is marked sensitive.
pub(crate) struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(Stamp, HeaderValue)>>,
}

impl TokenFile {
    pub fn new(path: PathBuf) -> Self {
        TokenFile {
            path,
            cached: Mutex::new(None),
        }
    }

    /// The current token as an `X-Auth-Token` value.
    pub fn get(&self) -> Result<HeaderValue, String> {
        let unreadable =
            |e: std::io::Error| format!("cannot read token_file {}: {e}", self.path.display());
        // Stat before reading: should the file change in between, the stamp
        // is older than the contents and the next use reads it again.
        let stamp = Stamp::of(&std::fs::metadata(&self.path).map_err(unreadable)?);
        if let Some((cached, value)) = &*self.cached.lock().unwrap_or_else(PoisonError::into_inner)
            && *cached == stamp
        {
            return Ok(value.clone());
        }
        let contents = std::fs::read(&self.path).map_err(unreadable)?;
        let token = contents.trim_ascii();
        if token.is_empty() {
            return Err(format!("token_file {} is empty", self.path.display()));
        }
        let mut value = HeaderValue::from_bytes(token).map_err(|_| {
            format!(
                "token_file {} holds characters not allowed in an HTTP header",
                self.path.display()
            )
        })?;
        value.set_sensitive(true);
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some((stamp, value.clone()));
        Ok(value)
    }
}
