//! The keys a guest's identity is signed with, and what is signed with
//! them: EC2's signed identity documents and GCE-style identity tokens.
//!
//! - `keyset.rs`: [`KeySet`], the current RSA-2048 key with its self-signed
//!   certificate, and the certificates of previous keys still inside their
//!   overlap. One file on disk (`keyset.json`, mode 0600, in a directory of
//!   mode 0700, written through a temporary name renamed into place), so a
//!   reader never sees a key beside another key's certificate. A previous
//!   key keeps only its certificate: it verifies what it signed, it never
//!   signs again.
//! - `cert.rs`: the self-signed certificate (an end-entity profile:
//!   digitalSignature, not a CA; the common name is the issuer). Relying
//!   parties pin it, as they pin AWS's published per-region certificates;
//!   nothing chains to it.
//! - `sign.rs`: `signature` (RSA PKCS#1 v1.5 over SHA-256 of the document
//!   bytes), `pkcs7` (CMS SignedData, detached) and `rsa2048` (the same,
//!   with the document inside), each as EC2 serves them: base64 in
//!   64-column lines without PEM armour (`openssl base64 -d` and
//!   `openssl smime -inform PEM` read lines of at most 64 columns). The CMS
//!   carries the signer's certificate and the two signed attributes RFC
//!   5652 requires (content type, message digest) and no signing time, so
//!   the same document signed twice is the same bytes.
//! - `jwt.rs`: RS256 identity tokens and the JWKS. Written by hand: a JWT
//!   is three base64url parts and one PKCS#1 v1.5 signature, which the
//!   `rsa` key here already makes. `jsonwebtoken` would bring its own
//!   crypto backend (ring with a second copy of the key as DER, or a
//!   RustCrypto one on other versions of these crates) for twenty lines.
//!
//! Why RustCrypto throughout: `ring` (already in the tree, under rustls)
//! signs with RSA but cannot make an RSA key, and neither it nor rcgen
//! builds CMS. `rsa`, `x509-cert` and `cms` share one `der`/`spki`
//! generation, so a key and its certificate are the same types end to end.
//!
//! The private key never leaves this crate but as the key-set file: no
//! `Debug`, `Display` or accessor prints it.

#![forbid(unsafe_code)]

mod cert;
mod jwt;
mod keyset;
mod sign;

use std::path::PathBuf;

pub use keyset::{FILE, KeySet, Params, unix_now};

/// What went wrong with a key set.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory holds no key set.
    #[error("no identity key set in {dir} ({FILE} is missing)")]
    Missing { dir: PathBuf },
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is there but is not one cradle wrote.
    #[error("{path} is not an identity key set: {why}")]
    Malformed { path: PathBuf, why: String },
    /// The private key is readable by others.
    #[error(
        "{path} holds the private signing key but is readable by other users \
         (mode {mode:o}); chmod 600 it"
    )]
    Exposed { path: PathBuf, mode: u32 },
    /// Making a key, a certificate or a signature failed.
    #[error("{what}: {why}")]
    Crypto { what: &'static str, why: String },
}

fn crypto(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error::Crypto {
        what,
        why: e.to_string(),
    }
}

/// `bytes` as base64 in lines of 64 columns, as EC2 serves its signatures
/// (no trailing newline).
pub fn base64_lines(bytes: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    let lines: Vec<&str> = text
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    lines.join("\n")
}
