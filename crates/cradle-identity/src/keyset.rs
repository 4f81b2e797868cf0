//! The key set: the current key (private key and certificate) and the
//! certificates of the previous keys still inside their overlap, in one
//! file.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::{DecodePem, EncodePem};
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x509_cert::Certificate;

use crate::{Error, crypto};

/// The key set's file in its directory.
pub const FILE: &str = "keyset.json";

/// The bits of every key: what EC2's `rsa2048` names, and what every JWT
/// library takes for RS256.
const BITS: usize = 2048;

/// What a new key's certificate says.
#[derive(Debug, Clone)]
pub struct Params {
    /// The certificate's common name, and the `iss` of tokens.
    pub issuer: String,
    /// How long a new certificate is valid.
    pub cert_validity: Duration,
}

/// A key of the set, by its public half.
pub(crate) struct Key {
    /// RFC 7638 thumbprint of the public key: the JWT `kid`.
    pub(crate) kid: String,
    pub(crate) cert: Certificate,
    pub(crate) cert_pem: String,
    pub(crate) public: RsaPublicKey,
    /// Unix seconds: when it stopped signing, until when it still
    /// verifies. `None` for the current key.
    retired: Option<(u64, u64)>,
}

/// The current key and the previous keys still inside their overlap.
pub struct KeySet {
    pub(crate) signing: SigningKey<Sha256>,
    pub(crate) current: Key,
    pub(crate) previous: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("current", &self.current.kid)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.kid).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    format: u32,
    current: CurrentOnDisk,
    previous: Vec<PreviousOnDisk>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CurrentOnDisk {
    kid: String,
    /// PKCS#8, PEM.
    private_key: String,
    certificate: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviousOnDisk {
    kid: String,
    certificate: String,
    retired_at: u64,
    valid_until: u64,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Key {
    fn from_pem(pem: &str, retired: Option<(u64, u64)>) -> Result<Key, String> {
        let cert =
            Certificate::from_pem(pem.as_bytes()).map_err(|e| format!("a certificate: {e}"))?;
        let public = public_key(&cert)?;
        Ok(Key {
            kid: crate::jwt::thumbprint(&public),
            cert,
            cert_pem: pem.to_string(),
            public,
            retired,
        })
    }
}

fn public_key(cert: &Certificate) -> Result<RsaPublicKey, String> {
    use der::Encode;
    use rsa::pkcs8::DecodePublicKey;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| format!("a certificate's key: {e}"))?;
    RsaPublicKey::from_public_key_der(&spki)
        .map_err(|e| format!("a certificate's key is not RSA: {e}"))
}

impl KeySet {
    /// A new set of one key: RSA-2048 and its self-signed certificate.
    pub fn generate(params: &Params) -> Result<KeySet, Error> {
        let private = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, BITS)
            .map_err(|e| crypto("cannot make an RSA key")(&e))?;
        let signing = SigningKey::<Sha256>::new(private);
        let cert = crate::cert::self_signed(&signing, &params.issuer, params.cert_validity)?;
        let cert_pem = cert
            .to_pem(LineEnding::LF)
            .map_err(|e| crypto("the certificate")(&e))?;
        let public = public_key(&cert).map_err(|why| Error::Crypto {
            what: "the certificate",
            why,
        })?;
        Ok(KeySet {
            signing,
            current: Key {
                kid: crate::jwt::thumbprint(&public),
                cert,
                cert_pem,
                public,
                retired: None,
            },
            previous: Vec::new(),
        })
    }

    /// The set in `dir`, without the previous keys whose overlap ended by
    /// `now` (Unix seconds). Refused when the file is readable by others.
    pub fn load(dir: &Path, now: u64) -> Result<KeySet, Error> {
        let path = dir.join(FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Missing {
                    dir: dir.to_path_buf(),
                });
            }
            Err(error) => return Err(Error::Read { path, error }),
        };
        let mode = std::fs::metadata(&path)
            .map_err(|error| Error::Read {
                path: path.clone(),
                error,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::Exposed {
                path,
                mode: mode & 0o777,
            });
        }
        let bad = |why: String| Error::Malformed {
            path: path.clone(),
            why,
        };
        let disk: OnDisk = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if disk.format != 1 {
            return Err(bad(format!("format {} (this cradle reads 1)", disk.format)));
        }
        let private = RsaPrivateKey::from_pkcs8_pem(&disk.current.private_key)
            .map_err(|e| bad(format!("the private key: {e}")))?;
        let current = Key::from_pem(&disk.current.certificate, None).map_err(&bad)?;
        if current.public != private.to_public_key() {
            return Err(bad(
                "the current certificate is not the private key's".into()
            ));
        }
        let mut previous = Vec::new();
        for p in disk.previous.iter().filter(|p| p.valid_until > now) {
            previous.push(
                Key::from_pem(&p.certificate, Some((p.retired_at, p.valid_until))).map_err(&bad)?,
            );
        }
        Ok(KeySet {
            signing: SigningKey::<Sha256>::new(private),
            current,
            previous,
        })
    }

    /// The set in `dir`, or a new one saved there when it has none; whether
    /// it is new.
    pub fn load_or_create(dir: &Path, params: &Params, now: u64) -> Result<(KeySet, bool), Error> {
        match KeySet::load(dir, now) {
            Ok(set) => Ok((set, false)),
            Err(Error::Missing { .. }) => {
                let set = KeySet::generate(params)?;
                set.save(dir)?;
                Ok((set, true))
            }
            Err(e) => Err(e),
        }
    }

    /// A set whose current key is new and whose previous keys are this
    /// one's current key, valid `overlap` more, and its previous keys whose
    /// overlap has not ended by `now`.
    pub fn rotate(&self, params: &Params, overlap: Duration, now: u64) -> Result<KeySet, Error> {
        let mut next = KeySet::generate(params)?;
        let old = Key::from_pem(&self.current.cert_pem, Some((now, now + overlap.as_secs())))
            .map_err(|why| Error::Crypto {
                what: "the current certificate",
                why,
            })?;
        next.previous.push(old);
        for p in &self.previous {
            if p.retired.is_some_and(|(_, until)| until > now) {
                let again = Key::from_pem(&p.cert_pem, p.retired).map_err(|why| Error::Crypto {
                    what: "a previous certificate",
                    why,
                })?;
                next.previous.push(again);
            }
        }
        Ok(next)
    }

    /// Write the set into `dir` (made, mode 0700, if missing) as
    /// [`FILE`], mode 0600, through a temporary name renamed into place.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |error| Error::Write { path, error }
        };
        std::fs::create_dir_all(dir).map_err(werr(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(werr(dir))?;
        let private_key = self
            .signing
            .as_ref()
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| crypto("the private key")(&e))?;
        let disk = OnDisk {
            format: 1,
            current: CurrentOnDisk {
                kid: self.current.kid.clone(),
                private_key: private_key.to_string(),
                certificate: self.current.cert_pem.clone(),
            },
            previous: self
                .previous
                .iter()
                .map(|k| {
                    let (retired_at, valid_until) = k.retired.unwrap_or((0, 0));
                    PreviousOnDisk {
                        kid: k.kid.clone(),
                        certificate: k.cert_pem.clone(),
                        retired_at,
                        valid_until,
                    }
                })
                .collect(),
        };
        let mut text = serde_json::to_vec_pretty(&disk).expect("the key set serializes");
        text.push(b'\n');
        let path = dir.join(FILE);
        let tmp = dir.join(format!(".{FILE}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr(&tmp))?;
        // A temporary file left by a killed run may have another mode.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(werr(&tmp))?;
        f.write_all(&text).map_err(werr(&tmp))?;
        f.sync_all().map_err(werr(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(werr(&path))?;
        Ok(())
    }

    /// The current key's id (the JWT `kid`).
    pub fn kid(&self) -> &str {
        &self.current.kid
    }

    /// Every key's id, the current one first.
    pub fn kids(&self) -> Vec<&str> {
        self.keys().map(|k| k.kid.as_str()).collect()
    }

    /// The current key, then the previous ones whose overlap has not
    /// ended: a running server drops a key at the end of its overlap, not
    /// only at the next reload.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &Key> {
        let now = unix_now();
        std::iter::once(&self.current).chain(
            self.previous
                .iter()
                .filter(move |k| k.retired.is_none_or(|(_, until)| until > now)),
        )
    }

    /// The certificates to verify with, PEM, the current one first, then
    /// those in their overlap (newest first).
    pub fn certificates_pem(&self) -> String {
        self.keys().map(|k| k.cert_pem.as_str()).collect()
    }

    /// The current certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.current.cert_pem
    }

    /// When each previous key's overlap ends, Unix seconds, by kid.
    pub fn overlaps(&self) -> Vec<(&str, u64)> {
        self.previous
            .iter()
            .filter_map(|k| k.retired.map(|(_, until)| (k.kid.as_str(), until)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            issuer: "https://cradle.example".into(),
            cert_validity: Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_saved_set_loads_as_it_was_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("identity");
        let (set, new) = KeySet::load_or_create(&d, &params(), unix_now()).unwrap();
        assert!(new);
        let mode = std::fs::metadata(d.join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(&d).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
        let (again, new) = KeySet::load_or_create(&d, &params(), unix_now()).unwrap();
        assert!(!new);
        assert_eq!(again.kid(), set.kid());
        assert!(!format!("{again:?}").contains("PRIVATE"));

        std::fs::set_permissions(d.join(FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeySet::load(&d, unix_now()).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn rotation_keeps_the_old_certificate_for_the_overlap_only() {
        let dir = tempfile::tempdir().unwrap();
        let set = KeySet::generate(&params()).unwrap();
        let now = unix_now();
        let next = set
            .rotate(&params(), Duration::from_secs(100), now)
            .unwrap();
        assert_ne!(next.kid(), set.kid());
        assert_eq!(next.kids(), vec![next.kid(), set.kid()]);
        next.save(dir.path()).unwrap();
        assert_eq!(KeySet::load(dir.path(), now + 99).unwrap().kids().len(), 2);
        assert_eq!(KeySet::load(dir.path(), now + 100).unwrap().kids().len(), 1);
        let third = next
            .rotate(&params(), Duration::from_secs(100), now + 150)
            .unwrap();
        assert_eq!(third.kids(), vec![third.kid(), next.kid()]);
        // A set held in memory lets a key go when its overlap ends.
        let long_ago = unix_now() - 10;
        let ended = set
            .rotate(&params(), Duration::from_secs(5), long_ago)
            .unwrap();
        assert_eq!(ended.kids(), vec![ended.kid()]);
        assert_eq!(ended.jwks()["keys"].as_array().unwrap().len(), 1);
    }
}
