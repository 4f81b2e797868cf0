//! IMDSv2 session tokens, stateless as Firecracker's MMDS makes them.
//!
//! A token is AES-256-GCM over its expiry time, with the instance's id as
//! associated data, under a key drawn at start-up. Nothing is stored per
//! token; a token presented by another instance fails authentication because
//! the associated data differs; tokens die with the process, as the key does.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rand::RngCore;
use uuid::Uuid;

const NONCE_LEN: usize = 12;

/// Why a presented token was refused. Never says more than that to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    WrongInstanceOrForged,
    Expired,
}

pub struct TokenKey {
    cipher: Aes256Gcm,
}

impl TokenKey {
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        TokenKey {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
        }
    }

    /// A token for `instance`, valid until `expires` (Unix milliseconds).
    pub fn issue(&self, instance: Uuid, expires: u64) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &expires.to_be_bytes(),
                    aad: instance.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of 8 bytes cannot fail");
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&sealed);
        B64.encode(raw)
    }

    /// Accept `token` only if it was issued to `instance` and `now` (Unix
    /// milliseconds) is before its expiry.
    pub fn check(&self, token: &str, instance: Uuid, now: u64) -> Result<(), TokenError> {
        let raw = B64
            .decode(token.trim())
            .map_err(|_| TokenError::Malformed)?;
        if raw.len() != NONCE_LEN + 8 + 16 {
            return Err(TokenError::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: instance.as_bytes(),
                },
            )
            .map_err(|_| TokenError::WrongInstanceOrForged)?;
        let expires = u64::from_be_bytes(plain.try_into().map_err(|_| TokenError::Malformed)?);
        if now >= expires {
            Err(TokenError::Expired)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_bound_to_its_instance_and_expires() {
        let key = TokenKey::generate();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let t = key.issue(a, 1000);
        assert_eq!(key.check(&t, a, 999), Ok(()));
        assert_eq!(key.check(&t, a, 1000), Err(TokenError::Expired));
        assert_eq!(
            key.check(&t, b, 999),
            Err(TokenError::WrongInstanceOrForged)
        );
        assert_eq!(key.check("garbage", a, 1), Err(TokenError::Malformed));
        assert_eq!(
            TokenKey::generate().check(&t, a, 999),
            Err(TokenError::WrongInstanceOrForged)
        );
    }
}
