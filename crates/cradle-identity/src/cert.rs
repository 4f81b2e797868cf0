//! The key's self-signed certificate.

use std::time::Duration;

use der::asn1::{Any, SetOfVec};
use der::{Encode, Tag};
use rsa::pkcs1v15::SigningKey;
use sha2::Sha256;
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::Certificate;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Validity;

use crate::{Error, crypto};

/// X.520's upper bound for a common name, in characters.
const CN_MAX: usize = 64;

/// `O=cradle, CN=<issuer>` (the issuer cut to 64 characters, X.520's bound),
/// built attribute by attribute so that no character of the issuer needs
/// RFC 4514 escaping.
fn name(issuer: &str) -> Result<Name, Error> {
    let cn: String = issuer.chars().take(CN_MAX).collect();
    let rdn = |oid, value: &str| -> Result<RelativeDistinguishedName, Error> {
        let atv = AttributeTypeAndValue {
            oid,
            value: Any::new(Tag::Utf8String, value.as_bytes()).map_err(|e| crypto("a name")(&e))?,
        };
        Ok(RelativeDistinguishedName::from(
            SetOfVec::try_from(vec![atv]).map_err(|e| crypto("a name")(&e))?,
        ))
    };
    Ok(RdnSequence(vec![
        rdn(const_oid::db::rfc4519::O, "cradle")?,
        rdn(const_oid::db::rfc4519::CN, &cn)?,
    ]))
}

/// A self-signed end-entity certificate for `key`, valid from now for
/// `validity`, with a random 127-bit serial number.
pub(crate) fn self_signed(
    key: &SigningKey<Sha256>,
    issuer: &str,
    validity: Duration,
) -> Result<Certificate, Error> {
    use rsa::rand_core::{OsRng, RngCore};
    use spki::EncodePublicKey;
    let mut serial = [0u8; 16];
    OsRng.fill_bytes(&mut serial);
    // Positive and of full length: RFC 5280 wants a positive integer.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let serial = SerialNumber::new(&serial).map_err(|e| crypto("a serial number")(&e))?;
    let validity = Validity::from_now(validity).map_err(|e| crypto("the validity")(&e))?;
    let subject = name(issuer)?;
    let spki_der = rsa::signature::Keypair::verifying_key(key)
        .to_public_key_der()
        .map_err(|e| crypto("the public key")(&e))?;
    let spki = SubjectPublicKeyInfoOwned::try_from(spki_der.as_bytes())
        .map_err(|e| crypto("the public key")(&e))?;
    let profile = Profile::Leaf {
        issuer: subject.clone(),
        enable_key_agreement: false,
        enable_key_encipherment: false,
    };
    let builder = CertificateBuilder::new(profile, serial, validity, subject, spki, key)
        .map_err(|e| crypto("the certificate")(&e))?;
    let cert = builder
        .build::<rsa::pkcs1v15::Signature>()
        .map_err(|e| crypto("the certificate")(&e))?;
    // A certificate we cannot encode is no certificate.
    cert.to_der().map_err(|e| crypto("the certificate")(&e))?;
    Ok(cert)
}
