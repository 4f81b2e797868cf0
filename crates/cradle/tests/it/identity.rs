//! Identity a guest can prove (issue 22): EC2's signed identity documents,
//! verified as AWS's documentation says (openssl dgst, smime, cms) and with
//! Python's `cryptography`; identity tokens verified with PyJWT against the
//! JWKS from the admin API; rotation with SIGHUP; a cluster's hosts signing
//! with one key.
//!
//! PyJWT and cryptography come from PyPI into a venv of Debian's
//! interpreter, built once under the target dir as the troveclient test
//! builds its own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cradle_store::testkit::PgServer;
use serde_json::{Value, json};

use crate::cluster::{Lan, credentials, host_env, within};
use crate::harness::{DEBIAN_PYTHON, Run, Server};

/// What pip installs; the venv is named after it.
const PYPI: &[&str] = &["PyJWT==2.10.1", "cryptography==44.0.3"];

fn venv() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("venvs");
    let dir = root.join(PYPI.join("_").replace("==", "-"));
    let works = |d: &Path| {
        d.join("bin/python").exists()
            && Command::new(d.join("bin/python"))
                .args(["-c", "import jwt, cryptography"])
                .env_remove("PYTHONPATH")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    };
    if works(&dir) {
        return dir;
    }
    std::fs::create_dir_all(&root).unwrap();
    let lock = std::fs::File::create(root.join(".identity.lock")).unwrap();
    lock.lock().expect("lock the venv directory");
    if works(&dir) {
        return dir;
    }
    let partial = root.join(".partial-identity");
    let _ = std::fs::remove_dir_all(&partial);
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd
            .env_remove("PYTHONPATH")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot {what} (cargo xtask ci installs python3-venv): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new(DEBIAN_PYTHON)
            .args(["-m", "venv"])
            .arg(&partial),
        "create the venv",
    );
    run(
        Command::new(partial.join("bin/python"))
            .args(["-m", "pip", "install", "--no-input", "--quiet"])
            .args(PYPI)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        "pip install PyJWT and cryptography from PyPI",
    );
    assert!(works(&partial), "PyJWT does not import after pip install");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::rename(&partial, &dir).unwrap();
    dir
}

fn py(venv: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .env_remove("PYTHONPATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn openssl_ok(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (cargo xtask ci installs it)")
        .status
        .success()
}

/// The plain signature (Python), both CMS forms' certificate (Python).
const PY_VERIFY: &str = r#"
import base64, sys
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import pkcs7
cert = x509.load_pem_x509_certificate(open(sys.argv[1], 'rb').read())
doc = open(sys.argv[2], 'rb').read()
sig = base64.b64decode(open(sys.argv[3], 'rb').read())
inside = pkcs7.load_der_pkcs7_certificates(base64.b64decode(open(sys.argv[4], 'rb').read()))
try:
    cert.public_key().verify(sig, doc, padding.PKCS1v15(), hashes.SHA256())
    # The pkcs7 carries the signer's certificate, this one.
    print("good" if inside == [cert] else "bad")
except InvalidSignature:
    print("bad")
"#;

/// Decode and verify a token against a JWKS; the claims, or the error's name.
const PY_JWT: &str = r#"
import json, sys, jwt
jwks = jwt.PyJWKSet.from_dict(json.loads(sys.argv[1]))
token, aud, iss = sys.argv[2], sys.argv[3], sys.argv[4]
kid = jwt.get_unverified_header(token)["kid"]
key = [k for k in jwks.keys if k.key_id == kid]
if not key:
    print(json.dumps({"error": "no key " + kid}))
    sys.exit(0)
try:
    claims = jwt.decode(token, key[0].key, algorithms=["RS256"], audience=aud, issuer=iss)
    print(json.dumps({"claims": claims, "kid": kid}))
except jwt.PyJWTError as e:
    print(json.dumps({"error": type(e).__name__}))
"#;

struct Forms {
    document: Vec<u8>,
    signature: String,
    pkcs7: String,
    rsa2048: String,
}

fn forms(s: &Server, source: &str) -> Forms {
    let g = s.guest(source);
    let get = |f: &str| {
        let a = g.get(&format!("/latest/dynamic/instance-identity/{f}"));
        assert_eq!(a.status, 200, "{f}: {}", a.text());
        a.text()
    };
    Forms {
        document: get("document").into_bytes(),
        signature: get("signature"),
        pkcs7: get("pkcs7"),
        rsa2048: get("rsa2048"),
    }
}

/// Every verification of `f` with `cert`, on the document and on the
/// document altered by one byte: whether each passed.
fn verify(venv: &Path, dir: &Path, cert: &str, f: &Forms) -> Vec<(String, bool)> {
    let w = |n: &str, b: &[u8]| std::fs::write(dir.join(n), b).unwrap();
    let armour = |b: &str| format!("-----BEGIN PKCS7-----\n{b}\n-----END PKCS7-----\n");
    w("cert.pem", cert.as_bytes());
    let pubkey = Command::new("openssl")
        .args(["x509", "-in", "cert.pem", "-pubkey", "-noout"])
        .current_dir(dir)
        .output()
        .unwrap();
    w("pub.pem", &pubkey.stdout);
    w("signature", f.signature.as_bytes());
    assert!(openssl_ok(
        dir,
        &["base64", "-d", "-in", "signature", "-out", "sig.bin"]
    ));
    w("pkcs7.b64", f.pkcs7.as_bytes());
    w("pkcs7", armour(&f.pkcs7).as_bytes());
    w("rsa2048", armour(&f.rsa2048).as_bytes());
    let mut altered = f.document.clone();
    altered[10] ^= 1;
    let mut out = Vec::new();
    for (name, doc) in [("document", &f.document), ("altered", &altered)] {
        w(name, doc);
        let tag = |t: &str| format!("{name}: {t}");
        out.push((
            tag("dgst"),
            openssl_ok(
                dir,
                &[
                    "dgst",
                    "-sha256",
                    "-verify",
                    "pub.pem",
                    "-signature",
                    "sig.bin",
                    name,
                ],
            ),
        ));
        // As AWS's documentation says, then pinned (-nointern: only the
        // given certificate, not the one the CMS carries, may have signed).
        for tool in [&["smime"][..], &["cms", "-binary"]] {
            for pin in [None, Some("-nointern")] {
                let mut args = tool.to_vec();
                args.extend([
                    "-verify", "-in", "pkcs7", "-inform", "PEM", "-content", name,
                ]);
                args.extend(["-certfile", "cert.pem", "-noverify", "-out", "/dev/null"]);
                args.extend(pin);
                let t = match pin {
                    None => format!("{} as AWS", tool[0]),
                    Some(p) => format!("{} {p}", tool[0]),
                };
                out.push((tag(&t), openssl_ok(dir, &args)));
            }
        }
        let at = |n: &str| dir.join(n).display().to_string();
        let files = [at("cert.pem"), at(name), at("signature"), at("pkcs7.b64")];
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        let p = py(venv, PY_VERIFY, &files);
        out.push((tag("python"), p == "good"));
    }
    // rsa2048 carries the document: verified, it prints it.
    for tool in ["smime", "cms"] {
        for pin in [None, Some("-nointern")] {
            let o = Command::new("openssl")
                .args([tool, "-verify", "-in", "rsa2048", "-inform", "PEM"])
                .args(["-certfile", "cert.pem", "-noverify"])
                .args(pin)
                .current_dir(dir)
                .output()
                .unwrap();
            let t = match pin {
                None => format!("rsa2048: {tool} as AWS"),
                Some(p) => format!("rsa2048: {tool} {p}"),
            };
            out.push((t, o.status.success() && o.stdout == f.document));
        }
    }
    out
}

/// That every check of the document passed (`want_document`) or failed,
/// and every check of the altered document failed. With another
/// certificate, AWS's own commands still pass: they trust the certificate
/// the CMS carries (`-certfile` only adds one), so only the pinned checks
/// can tell.
#[track_caller]
fn all(results: &[(String, bool)], want_document: bool) {
    for (what, ok) in results {
        if !want_document && what.ends_with("as AWS") && !what.starts_with("altered") {
            continue;
        }
        let want = if what.starts_with("altered") {
            false
        } else {
            want_document
        };
        assert_eq!(*ok, want, "{what}");
    }
}

fn cli_out(s: &Server, args: &[&str]) -> String {
    let run = Run::of(&mut s.cli(args)).success();
    run.stdout.clone()
}

fn token(s: &Server, source: &str, query: &str) -> (u16, String) {
    let a = s
        .guest(source)
        .get(&format!("/cradle/latest/identity{query}"));
    (a.status, a.text())
}

const ISS: &str = "https://cradle.test/identity";
const AUD: &str = "https://relying.example/x?y=1";
const AUD_Q: &str = "https%3A%2F%2Frelying.example%2Fx%3Fy%3D1";

#[test]
fn documents_and_tokens_verify_and_survive_a_rotation() {
    let venv = venv();
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start_with(crate::harness::Opts {
        env: &[("CRADLE_IDENTITY_ISSUER", ISS)],
        ..Default::default()
    });
    let keydir = s.data_dir.join("identity");
    let file = keydir.join("keyset.json");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&keydir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let a = s
        .admin()
        .create(&json!({"name": "id-a", "project_id": "pa", "metadata_address": "127.0.0.2"}));
    let b = s
        .admin()
        .create(&json!({"name": "id-b", "project_id": "pb", "metadata_address": "127.0.0.3"}));
    let mut seen = String::new();

    let listing = s
        .guest("127.0.0.2")
        .get("/latest/dynamic/instance-identity")
        .text();
    assert_eq!(listing, "document\npkcs7\nrsa2048\nsignature");
    let cert1 = cli_out(&s, &["identity", "cert"]);
    assert_eq!(cert1.matches("BEGIN CERTIFICATE").count(), 1);
    let fa = forms(&s, "127.0.0.2");
    all(&verify(&venv, tmp.path(), &cert1, &fa), true);
    let fb = forms(&s, "127.0.0.3");
    all(&verify(&venv, tmp.path(), &cert1, &fb), true);
    assert_ne!(fa.document, fb.document);
    let doc_a: Value = serde_json::from_slice(&fa.document).unwrap();
    assert_eq!(doc_a["accountId"], "pa");

    // Tokens: each names its own instance.
    let jwks1 = cli_out(&s, &["identity", "jwks"]);
    let (st, ta) = token(&s, "127.0.0.2", &format!("?audience={AUD_Q}&format=full"));
    assert_eq!(st, 200, "{ta}");
    let (st, tb) = token(&s, "127.0.0.3", &format!("?audience={AUD_Q}&format=full"));
    assert_eq!(st, 200, "{tb}");
    let (_, plain) = token(&s, "127.0.0.2", "?audience=plain-aud");
    for (t, inst, project) in [(&ta, &a, "pa"), (&tb, &b, "pb")] {
        let v: Value = serde_json::from_str(&py(&venv, PY_JWT, &[&jwks1, t, AUD, ISS])).unwrap();
        let c = &v["claims"];
        assert_eq!(c["sub"], inst["id"], "{v}");
        assert_eq!(c["cradle"]["instance_name"], inst["name"]);
        assert_eq!(c["cradle"]["project_id"], project);
        assert_eq!(c["aud"], AUD);
        let (iat, exp) = (c["iat"].as_u64().unwrap(), c["exp"].as_u64().unwrap());
        assert!(exp > iat && exp <= iat + 3600, "{c}");
        let wrong = py(&venv, PY_JWT, &[&jwks1, t, "https://other.example", ISS]);
        assert!(wrong.contains("InvalidAudienceError"), "{wrong}");
        seen.push_str(t);
    }
    let v: Value =
        serde_json::from_str(&py(&venv, PY_JWT, &[&jwks1, &plain, "plain-aud", ISS])).unwrap();
    assert!(
        v["claims"].get("cradle").is_none(),
        "standard format has no cradle object: {v}"
    );

    // Refusals name the problem.
    for (q, needle) in [
        ("", "audience is required"),
        ("?audience=", "audience is empty"),
        (
            &format!("?audience={}", "a".repeat(257)) as &str,
            "257 bytes",
        ),
        ("?audience=x&format=huge", "format is standard or full"),
    ] {
        let (st, body) = token(&s, "127.0.0.2", q);
        assert_eq!(st, 400, "{q}: {body}");
        assert!(body.contains(needle), "{q}: {body}");
    }
    assert_eq!(
        token(&s, "127.0.0.2", &format!("?audience={}", "a".repeat(256))).0,
        200
    );
    let bare = s
        .bare_guest("127.0.0.2")
        .get(&format!("/cradle/latest/identity?audience={AUD_Q}"));
    assert_eq!(bare.status, 403, "no Metadata-Flavor, no token");

    // Rotation: offline, then SIGHUP.
    let rotated = Run::of(
        crate::harness::cradle_command()
            .args(["identity", "rotate", "--dir", keydir.to_str().unwrap()])
            .env("CRADLE_IDENTITY_ISSUER", ISS),
    )
    .success();
    assert!(rotated.stdout.contains("rotated"), "{}", rotated.stdout);
    assert!(send_hangup(s.pid()));
    within(
        Duration::from_secs(10),
        "the server takes the new key set",
        || {
            cli_out(&s, &["identity", "cert"])
                .matches("BEGIN CERTIFICATE")
                .count()
                == 2
        },
    );
    let certs = cli_out(&s, &["identity", "cert"]);
    let new_cert = certs[..certs.find("-----END CERTIFICATE-----").unwrap() + 26].to_string();
    assert!(
        certs.ends_with(&cert1),
        "the previous certificate follows the current one"
    );
    let fa2 = forms(&s, "127.0.0.2");
    all(&verify(&venv, tmp.path(), &new_cert, &fa2), true);
    all(&verify(&venv, tmp.path(), &cert1, &fa2), false);
    let jwks2 = cli_out(&s, &["identity", "jwks"]);
    let kids: Vec<String> = serde_json::from_str::<Value>(&jwks2).unwrap()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert_eq!(
                (k["kty"].as_str(), k["alg"].as_str(), k["use"].as_str()),
                (Some("RSA"), Some("RS256"), Some("sig"))
            );
            k["kid"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(kids.len(), 2);
    let old = py(&venv, PY_JWT, &[&jwks2, &ta, AUD, ISS]);
    assert!(
        old.contains("\"claims\""),
        "a token from before the rotation still verifies: {old}"
    );
    let (_, t2) = token(&s, "127.0.0.2", &format!("?audience={AUD_Q}"));
    let new: Value = serde_json::from_str(&py(&venv, PY_JWT, &[&jwks2, &t2, AUD, ISS])).unwrap();
    assert_eq!(new["kid"], kids[0], "new tokens are signed by the new key");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The private key reaches no log line and no answer.
    let set: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let pem = set["current"]["private_key"].as_str().unwrap();
    let body_line = pem.lines().nth(3).unwrap();
    seen.push_str(&certs);
    seen.push_str(&jwks2);
    seen.push_str(&fa2.pkcs7);
    seen.push_str(&fa2.rsa2048);
    s.stop();
    assert!(
        !s.log().contains(body_line),
        "the private key is in the log"
    );
    assert!(!seen.contains(body_line), "the private key is in an answer");
    assert!(!s.log().contains("PRIVATE KEY"));
}

/// SIGHUP to the server, through kill(1): no shell, no unsafe.
fn send_hangup(pid: u32) -> bool {
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn every_host_of_a_cluster_signs_with_the_clusters_key() {
    let pg = PgServer::start().expect("start PostgreSQL");
    let url = pg.url();
    let tmp = tempfile::tempdir().unwrap();
    let lan = Lan::new(2);
    let (ca, tls) = credentials(
        tmp.path(),
        &[("node-a", &lan.host_ip(0)), ("node-b", &lan.host_ip(1))],
    );
    let read = |d: &Path| std::fs::read(d.join("identity/keyset.json")).unwrap();
    assert_eq!(read(&ca), read(&tls[0]));
    assert_eq!(read(&ca), read(&tls[1]));
    let mode = std::fs::metadata(tls[0].join("identity/keyset.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A host whose tls_dir lacks the key set refuses to start, saying how to fix it.
    let bare = tmp.path().join("tls-bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["ca.pem", "host.pem", "host.key"] {
        std::fs::copy(tls[0].join(f), bare.join(f)).unwrap();
    }
    let data = tmp.path().join("bare-data");
    let said = crate::harness::serve_refuses(
        tmp.path(),
        &[std::ffi::OsStr::new("--data-dir"), data.as_os_str()],
        &[
            ("CRADLE_CLUSTER_TLS_DIR", bare.to_str().unwrap()),
            ("CRADLE_STORE_URL", &url),
            ("RUST_LOG", "warn"),
        ],
    );
    for needle in ["has no identity key set", "cradle cluster join"] {
        assert!(said.contains(needle), "{said}");
    }

    let hosts: Vec<Server> = (0..2)
        .map(|i| {
            let name = ["node-a", "node-b"][i];
            lan.host_with(i, host_env(&url, name, Some(&tls[i])), None)
        })
        .collect();
    let (g1, g2) = (lan.guest(41), lan.guest(42));
    hosts[0]
        .admin()
        .create(&json!({"name": "c-a", "host": "node-a", "metadata_address": g1}));
    hosts[0]
        .admin()
        .create(&json!({"name": "c-b", "host": "node-b", "metadata_address": g2}));
    within(Duration::from_secs(5), "B serves c-b", || {
        hosts[1]
            .guest(&g2)
            .get("/latest/dynamic/instance-identity/document")
            .status
            == 200
    });
    // Their token is in the environment, not a file: the typed client.
    let cert = hosts[0]
        .admin()
        .send(cradle_client::route::identity_certificate());
    assert_eq!(
        cert,
        hosts[1]
            .admin()
            .send(cradle_client::route::identity_certificate())
    );
    assert_eq!(cert.matches("BEGIN CERTIFICATE").count(), 1);
    let venv = venv();
    for (h, g) in [(&hosts[0], &g1), (&hosts[1], &g2)] {
        let f = forms(h, g);
        all(&verify(&venv, tmp.path(), &cert, &f), true);
    }
}
