//! RS256 identity tokens and the JWKS.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rsa::RsaPublicKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};

use crate::KeySet;

/// The RFC 7638 thumbprint of an RSA public key, base64url: a `kid` any
/// relying party can recompute from the JWK.
pub(crate) fn thumbprint(key: &RsaPublicKey) -> String {
    // The members in lexicographic order, no white space (RFC 7638 §3).
    let canonical = format!(
        r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
        B64URL.encode(key.e().to_bytes_be()),
        B64URL.encode(key.n().to_bytes_be())
    );
    B64URL.encode(Sha256::digest(canonical.as_bytes()))
}

impl KeySet {
    /// A JWT over `claims`, signed RS256 with the current key, its `kid` in
    /// the header.
    pub fn jwt(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "RS256", "kid": self.kid(), "typ": "JWT"});
        let mut token = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let signature = self.signing.sign(token.as_bytes()).to_vec();
        token.push('.');
        token.push_str(&B64URL.encode(signature));
        token
    }

    /// The JWKS (RFC 7517) of every key: the current one first, then those
    /// in their overlap.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys()
            .map(|k| {
                serde_json::json!({
                    "kty": "RSA",
                    "alg": "RS256",
                    "use": "sig",
                    "kid": k.kid,
                    "n": B64URL.encode(k.public.n().to_bytes_be()),
                    "e": B64URL.encode(k.public.e().to_bytes_be()),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}
