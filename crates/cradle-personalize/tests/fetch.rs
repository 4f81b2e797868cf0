//! Fetching packages from an HTTP server the test runs on 127.0.0.1, which
//! requires basic auth (and from an HTTPS one whose certificate no root
//! vouches for); the password is a canary that must appear in no
//! error and no Debug output, and nothing of the package may stay on disk.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use base64::Engine;
use cradle_personalize::{Credentials, Error, fetch};

const USER: &str = "installer";
const CANARY: &str = "CANARY-pw-7f3a9c";

struct Server {
    base: String,
    content: Arc<Mutex<Vec<u8>>>,
    hits: Arc<Mutex<Vec<String>>>,
}

fn server() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let content = Arc::new(Mutex::new(b"first".to_vec()));
    let hits = Arc::new(Mutex::new(Vec::new()));
    let (c, h) = (content.clone(), hits.clone());
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{CANARY}"))
    );
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut auth = String::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h
                    .strip_prefix("authorization: ")
                    .or(h.strip_prefix("Authorization: "))
                {
                    auth = v.trim().to_string();
                }
            }
            h.lock().unwrap().push(path.clone());
            let mut s = s;
            let (status, body, extra) = if path == "/loop.tgz" {
                (
                    "302 Found",
                    Vec::new(),
                    "Location: /loop.tgz\r\n".to_string(),
                )
            } else if auth != want {
                ("401 Unauthorized", Vec::new(), String::new())
            } else {
                ("200 OK", c.lock().unwrap().clone(), String::new())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    Server {
        base,
        content,
        hits,
    }
}

fn creds() -> Credentials {
    Credentials::Basic {
        user: USER.into(),
        password: CANARY.into(),
    }
}

fn no_canary(e: &Error) {
    assert!(!e.to_string().contains(CANARY), "{e}");
    assert!(!format!("{e:?}").contains(CANARY), "{e:?}");
}

#[test]
fn basic_auth_fresh_content_pins_and_caps() {
    let s = server();
    let url = format!("{}/web1.tar.gz", s.base);

    let e = fetch(&url, &Credentials::None, 1 << 20, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("401"), "{e}");

    let f = fetch(&url, &creds(), 1 << 20, None).unwrap();
    assert_eq!(std::fs::read(f.path()).unwrap(), b"first");
    // The temporary file never has a name: nothing to leave behind.
    let link = std::fs::read_link(f.path()).unwrap();
    assert!(
        link.to_string_lossy().ends_with(" (deleted)"),
        "the package has a name on disk: {}",
        link.display()
    );
    let first_sha = f.sha256.clone();
    drop(f);

    // The content changes between installs: fetched fresh each time.
    *s.content.lock().unwrap() = b"second".to_vec();
    let f = fetch(&url, &creds(), 1 << 20, None).unwrap();
    assert_eq!(std::fs::read(f.path()).unwrap(), b"second");
    assert_ne!(f.sha256, first_sha);

    // A pin: the right one passes (any case), a wrong one is refused.
    let pinned = f.sha256.to_ascii_uppercase();
    fetch(&url, &creds(), 1 << 20, Some(&pinned)).unwrap();
    let e = fetch(&url, &creds(), 1 << 20, Some(&first_sha))
        .err()
        .unwrap();
    assert!(e.to_string().contains("not the pinned"), "{e}");
    no_canary(&e);

    // Over the cap, refused.
    *s.content.lock().unwrap() = vec![0u8; 4096];
    let e = fetch(&url, &creds(), 1000, None).err().unwrap();
    assert!(matches!(e, Error::Limit(_)), "{e}");
    no_canary(&e);

    // A redirect loop ends.
    let e = fetch(&format!("{}/loop.tgz", s.base), &creds(), 1 << 20, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("too many redirects"), "{e}");
    no_canary(&e);

    // The extension decides the format: refused before any request.
    let before = s.hits.lock().unwrap().len();
    let e = fetch(&format!("{}/web1.zip", s.base), &creds(), 1 << 20, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains(".tar.gz or .tgz"), "{e}");
    assert_eq!(s.hits.lock().unwrap().len(), before);

    // Credentials in the URL itself are not repeated in errors.
    let e = fetch(
        &format!("http://{USER}:{CANARY}@127.0.0.1:1/x.tgz"),
        &Credentials::None,
        1 << 20,
        None,
    )
    .err()
    .unwrap();
    no_canary(&e);
    assert!(e.to_string().contains("must not carry credentials"), "{e}");
    assert!(!format!("{:?}", creds()).contains(CANARY));
}

#[test]
fn file_urls() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.tgz");
    std::fs::write(&p, b"local").unwrap();
    let f = fetch(
        &format!("file://{}", p.display()),
        &Credentials::None,
        1 << 20,
        None,
    )
    .unwrap();
    let mut got = Vec::new();
    std::fs::File::open(f.path())
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, b"local");
    let e = fetch("ftp://h/p.tgz", &Credentials::None, 1 << 20, None)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("scheme \"ftp\" is not supported"),
        "{e}"
    );
}

/// TLS is verified: an HTTPS server (Python's http.server wrapped in ssl)
/// with a self-signed certificate made by openssl is refused before any
/// byte of the package is taken, credentials or not.
#[test]
fn https_with_an_untrusted_certificate_is_refused() {
    use std::process::{Command, Stdio};
    let d = tempfile::tempdir().unwrap();
    let (key, cert) = (d.path().join("key.pem"), d.path().join("cert.pem"));
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(d.path().join("p.tgz"), b"served over tls").unwrap();
    const SCRIPT: &str = r#"
import functools, http.server, ssl, sys
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1]))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(d.path())
        .arg(&cert)
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let url = format!("https://127.0.0.1:{}/p.tgz", port.trim());
    let refused = fetch(&url, &creds(), 1 << 20, None);
    // The server itself is fine: curl, told to skip verification, gets it.
    let insecure = Command::new("curl").args(["-ksS", &url]).output().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(insecure.stdout, b"served over tls");
    let e = refused
        .err()
        .expect("a self-signed certificate was accepted");
    assert!(matches!(e, Error::Fetch { .. }), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    no_canary(&e);
}
