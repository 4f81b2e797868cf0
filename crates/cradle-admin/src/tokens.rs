//! Who is calling the admin API: the main admin token, or a named token
//! from the tokens file, each with roles and the projects it acts for (the
//! main token and the `admin` role act for all of them; a token that names
//! none may only ask who it is).
//!
//! The tokens file holds only SHA-256 hashes of tokens, so reading it gives
//! nobody a credential. It is re-read when it changes (size or modification
//! time), so roles and tokens change without a restart; a file that no
//! longer parses keeps the last good list and logs why.
//!
//! ```toml
//! [[token]]
//! name = "provisioner"
//! roles = ["mail-server"]
//! projects = ["tenant-a"]
//! sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use cradle_core::Caller;
use cradle_model::Secret;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::warn;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedToken {
    name: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    projects: Vec<String>,
    sha256: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<NamedToken>,
}

type Stamp = (u64, Option<SystemTime>);

pub struct Tokens {
    admin: Secret<String>,
    file: Option<PathBuf>,
    named: Mutex<(Option<Stamp>, Vec<NamedToken>)>,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.len(), m.modified().ok()))
}

fn load(path: &Path) -> Result<Vec<NamedToken>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let parsed: TokensFile =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for t in &parsed.token {
        let hex_ok = t.sha256.len() == 64 && t.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok {
            return Err(format!(
                "{}: token {:?}: sha256 must be 64 hex digits",
                path.display(),
                t.name
            ));
        }
        if t.name.is_empty() {
            return Err(format!("{}: a token has an empty name", path.display()));
        }
        if let Some(p) = t.projects.iter().find(|p| p.is_empty() || p.len() > 255) {
            return Err(format!(
                "{}: token {:?}: project {p:?} must be 1 to 255 bytes",
                path.display(),
                t.name
            ));
        }
    }
    Ok(parsed
        .token
        .into_iter()
        .map(|mut t| {
            t.sha256.make_ascii_lowercase();
            t
        })
        .collect())
}

/// SHA-256 of a token, lower-case hex: what the tokens file stores.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Tokens {
    /// `file`, when given, must parse now: a bad tokens file stops start-up.
    pub fn new(admin: Secret<String>, file: Option<PathBuf>) -> Result<Self, String> {
        let named = match &file {
            Some(path) => {
                let s = stamp(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (Some(s), load(path)?)
            }
            None => (None, Vec::new()),
        };
        Ok(Tokens {
            admin,
            file,
            named: Mutex::new(named),
        })
    }

    /// The main admin token's caller, when `presented` is it. Memory only.
    pub fn main(&self, presented: &str) -> Option<Caller> {
        bool::from(presented.as_bytes().ct_eq(self.admin.expose().as_bytes()))
            .then(|| Caller::admin("admin"))
    }

    /// Whether named tokens come from a file.
    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// The caller a named token from the tokens file belongs to, if any.
    /// Looks at the file (and re-reads it when it changed): call it off
    /// the async workers.
    pub fn named(&self, presented: &str) -> Option<Caller> {
        let path = self.file.as_ref()?;
        let hash = token_hash(presented);
        let mut named = self.named.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(now) = stamp(path)
            && named.0 != Some(now)
        {
            match load(path) {
                Ok(list) => *named = (Some(now), list),
                Err(e) => warn!(error = %e, "keeping the previous admin tokens"),
            }
        }
        named
            .1
            .iter()
            .find(|t| bool::from(t.sha256.as_bytes().ct_eq(hash.as_bytes())))
            .map(|t| Caller::named(&t.name, t.roles.clone(), t.projects.iter().cloned()))
    }
}
