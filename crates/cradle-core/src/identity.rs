//! Identity a guest can prove: its EC2 identity document signed (the
//! renderer is handed a signer, see `guest/mod.rs`), GCE-style identity
//! tokens, and the public keys that verify both.
//!
//! The key set is read at start and again on [`Core::reload_identity`]
//! (`cradle serve` calls it on SIGHUP, after `cradle identity rotate`):
//! readers take the set behind an `Arc`, so a reload never changes a key
//! under a signature being made. Signed documents are deterministic (no
//! signing time): the render cache keeps them under their key's id, so a
//! rotated key's are never served again. Tokens are signed anew each time.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use cradle_identity::KeySet;
use serde_json::json;

use crate::caller::{Action, authorize};
use crate::{Caller, Core, Error, Guest, Kind, blocking};

/// The longest an identity token may live, in seconds: GCE's hour.
pub const MAX_TOKEN_LIFETIME: u64 = 3600;

/// The most bytes an audience may have.
pub const MAX_AUDIENCE_BYTES: usize = 256;

/// The key set and what tokens say.
pub struct Identity {
    /// Where the set is re-read from on a reload; `None` keeps it as given.
    dir: Option<PathBuf>,
    keys: RwLock<Arc<KeySet>>,
    issuer: String,
    token_lifetime: u64,
}

impl Identity {
    /// `keys`, read from `dir` (re-read from there on a reload), with the
    /// tokens' `iss` and lifetime (seconds, at most [`MAX_TOKEN_LIFETIME`]).
    pub fn new(
        dir: Option<PathBuf>,
        keys: KeySet,
        issuer: String,
        token_lifetime: u64,
    ) -> Result<Identity, String> {
        if !(1..=MAX_TOKEN_LIFETIME).contains(&token_lifetime) {
            return Err(format!(
                "the token lifetime must be from 1 to {MAX_TOKEN_LIFETIME} seconds, not {token_lifetime}"
            ));
        }
        if issuer.trim().is_empty() {
            return Err("the issuer is empty".into());
        }
        Ok(Identity {
            dir,
            keys: RwLock::new(Arc::new(keys)),
            issuer,
            token_lifetime,
        })
    }

    /// A fresh key set kept in memory only (tests): tokens live an hour.
    pub fn generated(issuer: &str) -> Identity {
        let params = cradle_identity::Params {
            issuer: issuer.into(),
            cert_validity: std::time::Duration::from_secs(86_400),
        };
        let keys = KeySet::generate(&params).expect("an RSA key can be made");
        Identity::new(None, keys, issuer.into(), MAX_TOKEN_LIFETIME).expect("valid settings")
    }

    pub(crate) fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The renderer's signer: the key set of the moment.
#[derive(Debug)]
pub(crate) struct Signer(pub(crate) Arc<KeySet>);

impl cradle_render::IdentitySigner for Signer {
    fn signature(&self, document: &[u8]) -> Vec<u8> {
        self.0.signature(document).into_bytes()
    }
    // A SignedData of a key, its certificate and a document of bytes
    // always encodes: a failure here is a bug, not anything a guest sent.
    fn pkcs7(&self, document: &[u8]) -> Vec<u8> {
        self.0
            .pkcs7(document)
            .expect("the identity document signs")
            .into_bytes()
    }
    fn rsa2048(&self, document: &[u8]) -> Vec<u8> {
        self.0
            .rsa2048(document)
            .expect("the identity document signs")
            .into_bytes()
    }
}

fn bad(message: String) -> Error {
    Error::refused(Kind::BadRequest, "bad_request", message)
}

impl Core {
    /// The PEM certificates that verify identity documents: the current
    /// key's first, then those still inside their overlap.
    pub fn identity_certificates(&self, caller: &Caller) -> Result<String, Error> {
        authorize(caller, Action::ReadPublicKeys)?;
        Ok(self.identity.keys().certificates_pem())
    }

    /// The JWKS that verifies identity tokens: every key of the set.
    pub fn identity_jwks(&self, caller: &Caller) -> Result<serde_json::Value, Error> {
        authorize(caller, Action::ReadPublicKeys)?;
        Ok(self.identity.keys().jwks())
    }

    /// Read the key set again from its directory (after `cradle identity
    /// rotate`, or a copy of the cluster's set); the kids it now holds.
    /// A set that cannot be read leaves the one in use as it was.
    pub async fn reload_identity(&self) -> Result<Vec<String>, Error> {
        let Some(dir) = self.identity.dir.clone() else {
            return Ok(self
                .identity
                .keys()
                .kids()
                .iter()
                .map(|k| k.to_string())
                .collect());
        };
        let keys = blocking(move || {
            KeySet::load(&dir, cradle_identity::unix_now())
                .map_err(|e| Error::Internal(format!("cannot reload the identity key set: {e}")))
        })
        .await?;
        let kids = keys.kids().iter().map(|k| k.to_string()).collect();
        *self
            .identity
            .keys
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(kids)
    }

    /// An identity token for the guest (RS256, the current key's `kid`):
    /// `iss`, `aud` (required, 1 to 256 bytes), `sub` (the instance's id),
    /// `iat`, `exp`; with `full`, a `cradle` object naming the instance,
    /// its project and its host. Never cached: each is signed now, on the
    /// blocking pool (an RSA signature is a millisecond of CPU, which the
    /// metadata service's workers do not spend).
    pub async fn identity_token(
        &self,
        guest: &Guest,
        audience: Option<&str>,
        full: bool,
    ) -> Result<String, Error> {
        let audience = match audience {
            None => {
                return Err(bad(
                    "the query parameter audience is required (?audience=...)".into(),
                ));
            }
            Some("") => return Err(bad("the audience is empty".into())),
            Some(a) if a.len() > MAX_AUDIENCE_BYTES => {
                return Err(bad(format!(
                    "the audience is {} bytes; at most {MAX_AUDIENCE_BYTES} are allowed",
                    a.len()
                )));
            }
            Some(a) => a,
        };
        let inst = guest.instance();
        let now = cradle_identity::unix_now();
        let mut claims = json!({
            "iss": self.identity.issuer,
            "aud": audience,
            "sub": inst.id.to_string(),
            "iat": now,
            "exp": now + self.identity.token_lifetime,
        });
        if full {
            claims["cradle"] = json!({
                "instance_id": inst.id.to_string(),
                "instance_name": inst.name,
                "project_id": inst.project_id,
                "host": inst.host,
                "availability_zone": inst.availability_zone,
            });
        }
        let keys = self.identity.keys();
        blocking(move || Ok(keys.jwt(&claims))).await
    }
}
