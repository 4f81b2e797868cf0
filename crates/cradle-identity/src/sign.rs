//! EC2's three signed forms of the identity document.

use cms::builder::{SignedDataBuilder, SignerInfoBuilder};
use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::signed_data::{EncapsulatedContentInfo, SignerIdentifier};
use der::Encode;
use der::asn1::{Any, OctetString};
use rsa::signature::{SignatureEncoding, Signer};
use sha2::{Digest, Sha256};
use spki::AlgorithmIdentifierOwned;

use crate::{Error, KeySet, base64_lines, crypto};

impl KeySet {
    /// `signature`: RSA PKCS#1 v1.5 over SHA-256 of `document`, base64.
    pub fn signature(&self, document: &[u8]) -> String {
        base64_lines(&self.signing.sign(document).to_vec())
    }

    /// `pkcs7`: CMS SignedData over `document`, detached, base64 without
    /// armour.
    pub fn pkcs7(&self, document: &[u8]) -> Result<String, Error> {
        Ok(base64_lines(&self.signed_data(document, false)?))
    }

    /// `rsa2048`: the same SignedData with `document` inside.
    pub fn rsa2048(&self, document: &[u8]) -> Result<String, Error> {
        Ok(base64_lines(&self.signed_data(document, true)?))
    }

    /// DER of a CMS ContentInfo holding SignedData over `document` (id-data),
    /// SHA-256 and RSA, the current certificate included.
    fn signed_data(&self, document: &[u8], embed: bool) -> Result<Vec<u8>, Error> {
        let err = crypto("cannot sign the identity document");
        let econtent = match embed {
            true => {
                let octets = OctetString::new(document).map_err(|e| err(&e))?;
                Some(Any::encode_from(&octets).map_err(|e| err(&e))?)
            }
            false => None,
        };
        let content = EncapsulatedContentInfo {
            econtent_type: const_oid::db::rfc5911::ID_DATA,
            econtent,
        };
        let digest = Sha256::digest(document);
        let sha256 = AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::ID_SHA_256,
            parameters: None,
        };
        let tbs = &self.current.cert.tbs_certificate;
        let sid = SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: tbs.issuer.clone(),
            serial_number: tbs.serial_number.clone(),
        });
        // Detached, the builder cannot hash what it does not hold: it is
        // given the digest.
        let external = (!embed).then_some(digest.as_slice());
        let signer = SignerInfoBuilder::new(&self.signing, sid, sha256.clone(), &content, external)
            .map_err(|e| err(&e))?;
        let info = SignedDataBuilder::new(&content)
            .add_digest_algorithm(sha256)
            .map_err(|e| err(&e))?
            .add_certificate(CertificateChoices::Certificate(self.current.cert.clone()))
            .map_err(|e| err(&e))?
            .add_signer_info::<_, rsa::pkcs1v15::Signature>(signer)
            .map_err(|e| err(&e))?
            .build()
            .map_err(|e| err(&e))?;
        info.to_der().map_err(|e| err(&e))
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use crate::{KeySet, Params};

    fn openssl(args: &[&str], dir: &std::path::Path) -> std::process::Output {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (cargo xtask ci installs it)")
    }

    fn armour(body: &str) -> String {
        format!("-----BEGIN PKCS7-----\n{body}\n-----END PKCS7-----\n")
    }

    /// Each form verifies with openssl as AWS's documentation says, and
    /// fails once the document differs by one byte.
    #[test]
    fn every_form_verifies_with_openssl_and_only_for_its_document() {
        let set = KeySet::generate(&Params {
            issuer: "https://cradle.example/identity, with a comma".into(),
            cert_validity: Duration::from_secs(86_400),
        })
        .unwrap();
        let doc = b"{\n  \"instanceId\" : \"i-0123\"\n}";
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |n: &str, b: &[u8]| std::fs::write(d.join(n), b).unwrap();
        write("document", doc);
        write("other", b"{\n  \"instanceId\" : \"i-0124\"\n}");
        write("cert.pem", set.certificate_pem().as_bytes());
        let pub_pem = openssl(&["x509", "-in", "cert.pem", "-pubkey", "-noout"], d);
        assert!(pub_pem.status.success());
        write("pub.pem", &pub_pem.stdout);
        write("signature", set.signature(doc).as_bytes());
        let sig = openssl(&["base64", "-d", "-in", "signature", "-out", "sig.bin"], d);
        assert!(sig.status.success());
        write("pkcs7", armour(&set.pkcs7(doc).unwrap()).as_bytes());
        write("rsa2048", armour(&set.rsa2048(doc).unwrap()).as_bytes());

        for content in ["document", "other"] {
            let good = content == "document";
            let dgst = openssl(
                &[
                    "dgst",
                    "-sha256",
                    "-verify",
                    "pub.pem",
                    "-signature",
                    "sig.bin",
                    content,
                ],
                d,
            );
            assert_eq!(dgst.status.success(), good, "{dgst:?}");
            // `openssl cms` reads detached content as MIME text (LF made
            // CRLF) unless told it is binary; `smime` hashes it as it is.
            for tool in [&["smime"][..], &["cms", "-binary"]] {
                let mut args = tool.to_vec();
                args.extend([
                    "-verify",
                    "-in",
                    "pkcs7",
                    "-inform",
                    "PEM",
                    "-content",
                    content,
                    "-certfile",
                    "cert.pem",
                    "-noverify",
                ]);
                let p7 = openssl(&args, d);
                assert_eq!(p7.status.success(), good, "{tool:?}: {p7:?}");
            }
        }
        for tool in ["smime", "cms"] {
            let out = openssl(
                &[
                    tool,
                    "-verify",
                    "-in",
                    "rsa2048",
                    "-inform",
                    "PEM",
                    "-certfile",
                    "cert.pem",
                    "-noverify",
                ],
                d,
            );
            assert!(out.status.success(), "{tool}: {out:?}");
            assert_eq!(out.stdout, doc);
        }
        // The same document signs to the same bytes: nothing but the key
        // and the document goes in.
        assert_eq!(set.pkcs7(doc).unwrap(), set.pkcs7(doc).unwrap());
        assert!(set.pkcs7(doc).unwrap().lines().all(|l| l.len() <= 64));
    }
}
