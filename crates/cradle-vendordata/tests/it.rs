//! End-to-end tests against real HTTP(S) servers on 127.0.0.1.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use cradle_model::{ImdsTokens, Instance, Os, OsParams, State};
use cradle_vendordata::{ConfigError, Failure, Fatal, TargetConfig, Vendordata};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use uuid::Uuid;

// ---------------------------------------------------------------- fixtures

fn instance() -> Instance {
    let s = |v: &str| v.to_string();
    Instance {
        id: Uuid::parse_str("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b").unwrap(),
        name: s("web-1"),
        project_id: s("proj-42"),
        host: s("node1"),
        version: 0,
        stored_secret_names: Vec::new(),
        hostname: s("web-1.example"),
        availability_zone: s("eu-west-1a"),
        launch_index: 0,
        instance_type: s("m1.small"),
        user_data: Some(b"#!/bin/sh\necho hi\n".to_vec()),
        metadata: BTreeMap::from([(s("role"), s("web")), (s("tier"), s("front"))]),
        public_keys: BTreeMap::new(),
        files: BTreeMap::new(),
        boot_roles: vec![s("member"), s("mail-server")],
        state_reason: None,
        metadata_address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
        mac: s("fa:16:3e:01:02:03"),
        local_ipv6: None,
        link_local_ipv6: None,
        interface: None,
        local_ipv4: None,
        gateway_ipv4: None,
        dns_nameservers: Vec::new(),
        public_ipv4: None,
        os: Some(Os::Image(s("img-0001"))),
        personalization_url: None,
        personalization_sha256: None,
        disks: Vec::new(),
        memory_mib: 512,
        vcpus: 1,
        install_params: Default::default(),
        run_params: Default::default(),
        agent: None,
        os_params: OsParams::default(),
        imds_tokens: ImdsTokens::Optional,
        state: State::Registered,
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        updated_at: time::OffsetDateTime::UNIX_EPOCH,
        random_seed: vec![0; 16],
        password: None,
        tags: Default::default(),
        metadata_tags: false,
        maintenance: Vec::new(),
    }
}

fn other_instance(n: u128) -> Arc<Instance> {
    let mut i = instance();
    i.id = Uuid::from_u128(n);
    Arc::new(i)
}

fn target(name: &str, addr: SocketAddr) -> TargetConfig {
    TargetConfig::new(name, format!("http://{addr}/vendordata"))
}

fn new_vd(targets: Vec<TargetConfig>) -> Vendordata {
    let mut registry = Registry::with_prefix("cradle");
    Vendordata::new(targets, &mut registry).expect("valid config")
}

fn config_err(targets: Vec<TargetConfig>) -> ConfigError {
    let mut registry = Registry::with_prefix("cradle");
    Vendordata::new(targets, &mut registry).expect_err("invalid config")
}

/// The reason a single fatal target fails with.
async fn fatal_reason(mut cfg: TargetConfig) -> String {
    cfg.failure = Failure::Fatal;
    let name = cfg.name.clone();
    let vd = new_vd(vec![cfg]);
    let err = vd
        .fetch(&Arc::new(instance()))
        .await
        .expect_err("target should fail");
    assert_eq!(err.target, name);
    assert_eq!(vd.counters(&name).3, 1, "failure counted");
    err.reason
}

fn obj(v: Value) -> Value {
    assert!(v.is_object());
    v
}

// ---------------------------------------------------------------- servers

type Reply = Response<Full<Bytes>>;
type Handler =
    Arc<dyn Fn(Parts, Bytes) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Parts, Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    Arc::new(move |parts, body| Box::pin(f(parts, body)))
}

fn reply(status: u16, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

/// Serve `h` on 127.0.0.1, over TLS when an acceptor is given.
async fn serve(h: Handler, tls: Option<TlsAcceptor>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let h = h.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(h(parts, body).await)
                    }
                });
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                    None => {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    }
                }
            });
        }
    });
    addr
}

async fn serve_fixed(status: u16, body: &'static str) -> SocketAddr {
    serve(
        handler(move |_, _| async move { reply(status, body) }),
        None,
    )
    .await
}

/// A raw HTTP/1.1 server: reads the request head and body, then hands the
/// socket to `respond`.
async fn serve_raw<F, Fut>(respond: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let respond = respond.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then as many body bytes as Content-Length says.
                loop {
                    let n = tcp.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                respond(tcp).await;
            });
        }
    });
    addr
}

/// What a recording server saw.
#[derive(Clone, Debug)]
struct Seen {
    headers: hyper::HeaderMap,
    body: Value,
}

/// Records every request; answers 401 unless `X-Auth-Token` matches
/// `token` (when one is expected), else `{"hello": "world"}`.
async fn recording_server(token: Option<&str>) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let token = token.map(str::to_string);
    let log = seen.clone();
    let addr = serve(
        handler(move |parts: Parts, body: Bytes| {
            let log = log.clone();
            let token = token.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).expect("request body is JSON");
                log.lock().unwrap().push(Seen {
                    headers: parts.headers.clone(),
                    body,
                });
                let given = parts
                    .headers
                    .get("x-auth-token")
                    .map(|v| v.to_str().unwrap());
                if token.is_some() && given != token.as_deref() {
                    return reply(401, r#"{"error":"bad token"}"#);
                }
                reply(200, r#"{"hello":"world"}"#)
            }
        }),
        None,
    )
    .await;
    (addr, seen)
}

/// Counts calls and answers `{"n": <count>}` after `delay`, with
/// `Cache-Control: <cache_control>` when set and the status in `status`.
struct Counting {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    cache_control: Arc<Mutex<Option<String>>>,
}

async fn counting_server(delay: Duration, cache_control: Option<&str>) -> Counting {
    let calls = Arc::new(AtomicUsize::new(0));
    let status = Arc::new(AtomicU16::new(200));
    let cc = Arc::new(Mutex::new(cache_control.map(str::to_string)));
    let (c, s, h) = (calls.clone(), status.clone(), cc.clone());
    let addr = serve(
        handler(move |_, _| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let status = s.load(Ordering::SeqCst);
            let cc = h.lock().unwrap().clone();
            async move {
                tokio::time::sleep(delay).await;
                let mut r = reply(status, json!({ "n": n }).to_string());
                if let Some(cc) = cc {
                    r.headers_mut().insert("cache-control", cc.parse().unwrap());
                }
                r
            }
        }),
        None,
    )
    .await;
    Counting {
        addr,
        calls,
        status,
        cache_control: cc,
    }
}

// ---------------------------------------------------------------- TLS PKI

struct Pki {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A second, unrelated client identity, to test a key mismatch.
    stray_key: PathBuf,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: Vec<u8>,
    ca_cert: rustls::pki_types::CertificateDer<'static>,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cradle test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    server_params
        .distinguished_name
        .push(DnType::CommonName, "vendordata server");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let mut client_params = CertificateParams::new(vec!["cradle".to_string()]).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "cradle");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();
    let stray_key = KeyPair::generate().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca_file: write("ca.pem", ca_cert.pem()),
        client_cert: write("client.pem", client_cert.pem()),
        client_key: write("client.key", client_key.serialize_pem()),
        stray_key: write("stray.key", stray_key.serialize_pem()),
        server_cert: server_cert.der().clone(),
        server_key: server_key.serialize_der(),
        ca_cert: ca_cert.der().clone(),
        _dir: dir,
    }
}

fn tls_acceptor(pki: &Pki, require_client_cert: bool) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_cert.clone()).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server_key.clone().into());
    let config = builder
        .with_single_cert(vec![pki.server_cert.clone()], key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

async fn hello_server(tls: TlsAcceptor) -> SocketAddr {
    serve(
        handler(|_, _| async { reply(200, r#"{"hello":"tls"}"#) }),
        Some(tls),
    )
    .await
}

fn https_target(name: &str, addr: SocketAddr) -> TargetConfig {
    TargetConfig::new(name, format!("https://{addr}/vendordata"))
}

fn write_token(path: &Path, token: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(token.as_bytes()).unwrap();
    f.write_all(b"\n").unwrap();
}

// ---------------------------------------------------------------- request

#[tokio::test]
async fn request_has_novas_body_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    write_token(&token_file, "svc-token-1");
    let (addr, seen) = recording_server(Some("svc-token-1")).await;
    let mut cfg = target("rec", addr);
    cfg.token_file = Some(token_file);
    cfg.cache_ttl = 0;
    let vd = new_vd(vec![cfg]);
    assert!(!vd.is_empty());

    let inst = Arc::new(instance());
    let got = vd.fetch(&inst).await.unwrap();
    assert_eq!(got.entries.len(), 1);
    assert_eq!(got.entries["rec"], json!({"hello": "world"}));

    let req = seen.lock().unwrap()[0].clone();
    assert_eq!(
        req.body,
        json!({
            "project-id": "proj-42",
            "instance-id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
            "image-id": "img-0001",
            "user-data": "IyEvYmluL3NoCmVjaG8gaGkK",
            "hostname": "web-1.example",
            "metadata": {"role": "web", "tier": "front"},
            "boot-roles": "member,mail-server",
        })
    );
    let h = &req.headers;
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["accept"], "application/json");
    assert_eq!(h["user-agent"], "cradle-vendordata");
    assert_eq!(h["x-auth-token"], "svc-token-1");
    assert_eq!(h.get_all("x-auth-token").iter().count(), 1);

    // An OS definition stands in for the image; no user data is null; no
    // roles is the empty string, as Nova sends it.
    let mut i = instance();
    i.os = Some(Os::Type("debian-bookworm".into()));
    i.user_data = None;
    i.boot_roles.clear();
    i.metadata.clear();
    vd.fetch(&Arc::new(i)).await.unwrap();
    let body = seen.lock().unwrap()[1].body.clone();
    assert_eq!(body["image-id"], "debian-bookworm");
    assert_eq!(body["user-data"], Value::Null);
    assert_eq!(body["boot-roles"], "");
    assert_eq!(body["metadata"], json!({}));

    let mut i = instance();
    i.os = None;
    vd.fetch(&Arc::new(i)).await.unwrap();
    assert_eq!(seen.lock().unwrap()[2].body["image-id"], Value::Null);
    assert_eq!(vd.counters("rec"), (3, 0, 3, 0));
}

#[tokio::test]
async fn no_token_file_sends_no_token() {
    let (addr, seen) = recording_server(None).await;
    let vd = new_vd(vec![target("plain", addr)]);
    vd.fetch(&Arc::new(instance())).await.unwrap();
    assert!(
        seen.lock().unwrap()[0]
            .headers
            .get("x-auth-token")
            .is_none()
    );
}

#[tokio::test]
async fn targets_are_independent_and_in_parallel() {
    let (a, _) = recording_server(None).await;
    let slow = serve(
        handler(|_, _| async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            reply(200, r#"{"slow":true}"#)
        }),
        None,
    )
    .await;
    let slow2 = serve(
        handler(|_, _| async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            reply(200, r#"{"slow":2}"#)
        }),
        None,
    )
    .await;
    let broken = serve_fixed(500, "{}").await;
    let vd = new_vd(vec![
        target("a", a),
        target("s1", slow),
        target("s2", slow2),
        target("broken", broken),
    ]);
    let start = Instant::now();
    let got = vd.fetch(&Arc::new(instance())).await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(1100), "parallel");
    assert_eq!(
        got.entries,
        BTreeMap::from([
            ("a".to_string(), json!({"hello": "world"})),
            ("broken".to_string(), json!({})),
            ("s1".to_string(), json!({"slow": true})),
            ("s2".to_string(), json!({"slow": 2})),
        ])
    );
}

// ---------------------------------------------------------------- failures

#[tokio::test]
async fn slow_server_is_a_soft_or_fatal_failure() {
    let slow = serve(
        handler(|_, _| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            reply(200, "{}")
        }),
        None,
    )
    .await;
    let mut cfg = target("slow", slow);
    cfg.read_timeout = 1;

    let vd = new_vd(vec![cfg.clone()]);
    let start = Instant::now();
    let got = vd.fetch(&Arc::new(instance())).await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(2500));
    assert_eq!(got.entries["slow"], json!({}));
    assert_eq!(vd.counters("slow"), (1, 0, 1, 1));

    let reason = fatal_reason(cfg.clone()).await;
    assert_eq!(reason, "no complete response within 1s (read_timeout)");

    // Fatal is reported only after every target was tried.
    let (ok_addr, seen) = recording_server(None).await;
    cfg.failure = Failure::Fatal;
    let vd = new_vd(vec![cfg, target("ok", ok_addr)]);
    let Fatal { target, reason } = vd.fetch(&Arc::new(instance())).await.unwrap_err();
    assert_eq!(target, "slow");
    assert!(reason.contains("read_timeout"));
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(vd.counters("ok").0, 1);
    let err = Fatal {
        target: "slow".into(),
        reason: "x".into(),
    };
    assert_eq!(err.to_string(), r#"vendordata target "slow" failed: x"#);
}

#[tokio::test]
async fn trickling_body_hits_the_deadline() {
    // Headers at once, then one byte every 300 ms: each read is quick, the
    // whole response is not.
    let addr = serve_raw(|mut tcp| async move {
        let body = br#"{"k":"0123456789abcdef"}"#;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = tcp.write_all(head.as_bytes()).await;
        for b in body {
            if tcp.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    let mut cfg = target("trickle", addr);
    cfg.read_timeout = 1;
    let start = Instant::now();
    let reason = fatal_reason(cfg).await;
    assert!(reason.contains("read_timeout"), "{reason}");
    assert!(start.elapsed() < Duration::from_millis(2500));
}

#[tokio::test]
async fn failures_have_precise_reasons() {
    let garbage = serve_fixed(200, "<html>secret-body not json</html>").await;
    let reason = fatal_reason(target("garbage", garbage)).await;
    assert!(reason.starts_with("response is not JSON: "), "{reason}");
    assert!(!reason.contains("secret-body"), "{reason}");

    let error = serve_fixed(500, r#"{"detail":"secret-body"}"#).await;
    let reason = fatal_reason(target("error", error)).await;
    assert_eq!(reason, "upstream answered HTTP 500 Internal Server Error");

    let array = serve_fixed(200, "[1, 2, 3]").await;
    let reason = fatal_reason(target("array", array)).await;
    assert_eq!(reason, "response is JSON an array, not an object");

    let string = serve_fixed(200, r#""just a string""#).await;
    let reason = fatal_reason(target("string", string)).await;
    assert_eq!(reason, "response is JSON a string, not an object");

    let empty = serve_fixed(200, "").await;
    let reason = fatal_reason(target("empty", empty)).await;
    assert_eq!(reason, "response is empty, not a JSON object");

    let big = serve_fixed(
        200,
        r#"{"padding":"0123456789012345678901234567890123456789"}"#,
    )
    .await;
    let mut cfg = target("big", big);
    cfg.max_response_bytes = 16;
    let reason = fatal_reason(cfg).await;
    assert_eq!(reason, "response larger than 16 bytes");

    // Without a Content-Length, the cap applies as the body streams in.
    let chunked = serve_raw(|mut tcp| async move {
        let _ = tcp
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        for _ in 0..50 {
            if tcp.write_all(b"a\r\n0123456789\r\n").await.is_err() {
                return;
            }
        }
        let _ = tcp.write_all(b"0\r\n\r\n").await;
    })
    .await;
    let mut cfg = target("chunked", chunked);
    cfg.max_response_bytes = 100;
    let reason = fatal_reason(cfg).await;
    assert_eq!(reason, "response larger than 100 bytes");

    // Exactly at the cap is fine.
    let exact = serve_fixed(200, r#"{"a":"bcdefghij"}"#).await;
    let mut cfg = target("exact", exact);
    cfg.max_response_bytes = r#"{"a":"bcdefghij"}"#.len();
    let vd = new_vd(vec![cfg]);
    let got = vd.fetch(&Arc::new(instance())).await.unwrap();
    assert_eq!(got.entries["exact"], json!({"a": "bcdefghij"}));

    let redirect = serve(
        handler(|_, _| async {
            let mut r = reply(302, "");
            r.headers_mut()
                .insert("location", "http://127.0.0.1:1/".parse().unwrap());
            r
        }),
        None,
    )
    .await;
    let reason = fatal_reason(target("redirect", redirect)).await;
    assert_eq!(
        reason,
        "upstream answered HTTP 302 Found (redirects are not followed)"
    );

    // A port nobody listens on: bind one, then let it go.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let reason = fatal_reason(target("refused", refused)).await;
    assert!(
        reason.starts_with("cannot connect: tcp connect error: "),
        "{reason}"
    );
    assert!(reason.to_lowercase().contains("refused"), "{reason}");
    assert!(!reason.contains("http://"), "no URL: {reason}");
}

// ---------------------------------------------------------------- TLS

#[tokio::test]
async fn tls_with_and_without_the_ca() {
    let pki = pki();
    let addr = hello_server(tls_acceptor(&pki, false)).await;

    let mut cfg = https_target("tls", addr);
    cfg.ca_file = Some(pki.ca_file.clone());
    let vd = new_vd(vec![cfg]);
    let got = vd.fetch(&Arc::new(instance())).await.unwrap();
    assert_eq!(got.entries["tls"], json!({"hello": "tls"}));

    // The built-in roots don't know the test CA.
    let reason = fatal_reason(https_target("tls", addr)).await;
    assert_eq!(reason, "TLS error: invalid peer certificate: UnknownIssuer");

    // Nor does an unrelated CA replacing them.
    let other = self::pki();
    let mut cfg = https_target("tls", addr);
    cfg.ca_file = Some(other.ca_file.clone());
    let reason = fatal_reason(cfg).await;
    assert!(reason.starts_with("TLS error: "), "{reason}");
}

#[tokio::test]
async fn tls_client_certificate() {
    let pki = pki();
    let addr = hello_server(tls_acceptor(&pki, true)).await;

    let mut cfg = https_target("mtls", addr);
    cfg.ca_file = Some(pki.ca_file.clone());
    cfg.client_cert = Some(pki.client_cert.clone());
    cfg.client_key = Some(pki.client_key.clone());
    let vd = new_vd(vec![cfg]);
    let got = vd.fetch(&Arc::new(instance())).await.unwrap();
    assert_eq!(got.entries["mtls"], json!({"hello": "tls"}));
    assert_eq!(vd.counters("mtls"), (1, 0, 1, 0));

    // Without a client certificate the server refuses the handshake.
    let mut cfg = https_target("mtls", addr);
    cfg.ca_file = Some(pki.ca_file.clone());
    let reason = fatal_reason(cfg).await;
    // TLS 1.3: the client learns of the refusal from the server's alert.
    assert!(reason.starts_with("TLS error: "), "{reason}");
    assert!(reason.contains("CertificateRequired"), "{reason}");
}

// ---------------------------------------------------------------- cache

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_then_cache() {
    let server = counting_server(Duration::from_millis(300), None).await;
    let vd = Arc::new(new_vd(vec![target("count", server.addr)]));
    let inst = Arc::new(instance());

    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let vd = vd.clone();
        let inst = inst.clone();
        set.spawn(async move { vd.fetch(&inst).await.unwrap() });
    }
    let results = set.join_all().await;
    assert_eq!(results.len(), 100);
    for r in &results {
        assert_eq!(r.entries["count"], json!({"n": 1}));
    }
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    assert_eq!(vd.counters("count"), (1, 99, 1, 0));

    // Within the TTL: a hit.
    let got = vd.fetch(&inst).await.unwrap();
    assert_eq!(got.entries["count"], json!({"n": 1}));
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    assert_eq!(vd.counters("count"), (1, 100, 1, 0));

    // A modified instance is a new Arc: fetched afresh, then cached.
    let mut changed = (*inst).clone();
    changed.hostname = "renamed".into();
    let changed = Arc::new(changed);
    let got = vd.fetch(&changed).await.unwrap();
    assert_eq!(got.entries["count"], json!({"n": 2}));
    let got = vd.fetch(&changed).await.unwrap();
    assert_eq!(got.entries["count"], json!({"n": 2}));
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);

    // Another instance has its own entry.
    vd.fetch(&other_instance(7)).await.unwrap();
    assert_eq!(server.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_shares_a_failure() {
    let server = counting_server(Duration::from_millis(300), None).await;
    server.status.store(503, Ordering::SeqCst);
    let mut cfg = target("down", server.addr);
    cfg.failure = Failure::Fatal;
    let vd = Arc::new(new_vd(vec![cfg]));
    let inst = Arc::new(instance());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let vd = vd.clone();
        let inst = inst.clone();
        set.spawn(async move { vd.fetch(&inst).await });
    }
    for r in set.join_all().await {
        assert_eq!(
            r.unwrap_err().reason,
            "upstream answered HTTP 503 Service Unavailable"
        );
    }
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    assert_eq!(vd.counters("down"), (1, 19, 1, 1));
    // Failures are not cached.
    vd.fetch(&inst).await.unwrap_err();
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_leader_does_not_strand_waiters() {
    let server = counting_server(Duration::from_millis(400), None).await;
    let vd = Arc::new(new_vd(vec![target("c", server.addr)]));
    let inst = Arc::new(instance());
    let leader = {
        let (vd, inst) = (vd.clone(), inst.clone());
        tokio::spawn(async move { vd.fetch(&inst).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = {
        let (vd, inst) = (vd.clone(), inst.clone());
        tokio::spawn(async move { vd.fetch(&inst).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    // The waiter takes over with a call of its own.
    let got = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("waiter finished")
        .unwrap()
        .unwrap();
    assert_eq!(got.entries["c"], json!({"n": 2}));
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    assert_eq!(vd.counters("c"), (2, 0, 2, 0));
    // And it was cached.
    vd.fetch(&inst).await.unwrap();
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn max_age_governs_expiry() {
    let server = counting_server(Duration::ZERO, Some("public, max-age=1")).await;
    let vd = new_vd(vec![target("ma", server.addr)]);
    let inst = Arc::new(instance());
    vd.fetch(&inst).await.unwrap();
    vd.fetch(&inst).await.unwrap();
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);

    let start = Instant::now();
    loop {
        let got = vd.fetch(&inst).await.unwrap();
        if server.calls.load(Ordering::SeqCst) == 2 {
            assert_eq!(got.entries["ma"], json!({"n": 2}));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(800));

    // no-store: nothing is kept.
    *server.cache_control.lock().unwrap() = Some("no-store".into());
    let fresh = other_instance(99);
    vd.fetch(&fresh).await.unwrap();
    vd.fetch(&fresh).await.unwrap();
    assert_eq!(server.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn cache_ttl_zero_disables_caching() {
    let server = counting_server(Duration::ZERO, Some("max-age=600")).await;
    let mut cfg = target("nocache", server.addr);
    cfg.cache_ttl = 0;
    let vd = new_vd(vec![cfg]);
    let inst = Arc::new(instance());
    for n in 1..=3 {
        let got = vd.fetch(&inst).await.unwrap();
        assert_eq!(got.entries["nocache"], json!({ "n": n }));
    }
    assert_eq!(vd.counters("nocache"), (3, 0, 3, 0));
    assert_eq!(vd.cached_len(), 1, "a slot, but no entry");
}

#[tokio::test]
async fn entries_die_with_the_instance() {
    let server = counting_server(Duration::ZERO, None).await;
    let vd = new_vd(vec![target("gc", server.addr)]);
    let inst = Arc::new(instance());
    vd.fetch(&inst).await.unwrap();
    assert_eq!(vd.cached_len(), 1);
    drop(inst);
    vd.sweep();
    assert_eq!(vd.cached_len(), 0);

    // Opportunistic sweeping keeps the cache bounded by live instances.
    for n in 0..300 {
        vd.fetch(&other_instance(1000 + n)).await.unwrap();
    }
    assert!(vd.cached_len() <= 64, "{}", vd.cached_len());
    let live: Vec<_> = (0..100).map(|n| other_instance(5000 + n)).collect();
    for i in &live {
        vd.fetch(i).await.unwrap();
    }
    vd.sweep();
    assert_eq!(vd.cached_len(), 100);
    // The live ones are still cached.
    let calls = server.calls.load(Ordering::SeqCst);
    for i in &live {
        vd.fetch(i).await.unwrap();
    }
    assert_eq!(server.calls.load(Ordering::SeqCst), calls);
}

#[tokio::test]
async fn stale_if_error_serves_the_old_answer() {
    let server = counting_server(Duration::ZERO, Some("max-age=1")).await;
    let mut cfg = target("stale", server.addr);
    cfg.failure = Failure::Fatal;
    cfg.stale_if_error = 60;
    let vd = new_vd(vec![cfg]);
    let inst = Arc::new(instance());
    let got = vd.fetch(&inst).await.unwrap();
    assert_eq!(got.entries["stale"], json!({"n": 1}));

    server.status.store(500, Ordering::SeqCst);
    let start = Instant::now();
    loop {
        let got = vd.fetch(&inst).await.expect("stale entry served");
        assert_eq!(obj(got.entries["stale"].clone()), json!({"n": 1}));
        if server.calls.load(Ordering::SeqCst) >= 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never refreshed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (calls, _, _, failures) = vd.counters("stale");
    assert_eq!((calls, failures), (2, 1));

    // Recovery replaces the stale entry.
    server.status.store(200, Ordering::SeqCst);
    let got = vd.fetch(&inst).await.unwrap();
    assert_eq!(got.entries["stale"], json!({"n": 3}));
}

#[tokio::test]
async fn stale_if_error_window_ends() {
    let server = counting_server(Duration::ZERO, Some("max-age=1")).await;
    let mut cfg = target("brief", server.addr);
    cfg.failure = Failure::Fatal;
    cfg.stale_if_error = 1;
    let vd = new_vd(vec![cfg]);
    let inst = Arc::new(instance());
    vd.fetch(&inst).await.unwrap();
    server.status.store(500, Ordering::SeqCst);
    let start = Instant::now();
    let reason = loop {
        match vd.fetch(&inst).await {
            Ok(got) => assert_eq!(got.entries["brief"], json!({"n": 1})),
            Err(fatal) => break fatal.reason,
        }
        assert!(start.elapsed() < Duration::from_secs(6), "stale forever");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reason, "upstream answered HTTP 500 Internal Server Error");
    assert!(start.elapsed() >= Duration::from_millis(1500));
}

// ---------------------------------------------------------------- token

#[tokio::test]
async fn token_rotation_needs_no_restart() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    write_token(&token_file, "first-token");
    let (addr, seen) = recording_server(None).await;
    let mut cfg = target("rot", addr);
    cfg.token_file = Some(token_file.clone());
    cfg.cache_ttl = 0;
    cfg.failure = Failure::Fatal;
    let vd = new_vd(vec![cfg]);
    let inst = Arc::new(instance());
    let last_token = || {
        seen.lock().unwrap().last().unwrap().headers["x-auth-token"]
            .to_str()
            .unwrap()
            .to_string()
    };

    vd.fetch(&inst).await.unwrap();
    assert_eq!(last_token(), "first-token");

    // A different length.
    write_token(&token_file, "second-token-longer");
    vd.fetch(&inst).await.unwrap();
    assert_eq!(last_token(), "second-token-longer");

    // The same length, rewritten in place: the mtime tells.
    write_token(&token_file, "rotated-token-12345");
    std::fs::File::options()
        .write(true)
        .open(&token_file)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    vd.fetch(&inst).await.unwrap();
    assert_eq!(last_token(), "rotated-token-12345");

    // Replaced by rename (a new inode), as a rotation should be done.
    let next = dir.path().join("token.new");
    write_token(&next, "renamed-token-54321");
    std::fs::rename(&next, &token_file).unwrap();
    vd.fetch(&inst).await.unwrap();
    assert_eq!(last_token(), "renamed-token-54321");

    // Unchanged: not read again, still sent.
    vd.fetch(&inst).await.unwrap();
    assert_eq!(last_token(), "renamed-token-54321");
    assert_eq!(seen.lock().unwrap().len(), 5);

    // Empty or missing: that call fails, nothing is sent.
    std::fs::write(&token_file, "\n").unwrap();
    let err = vd.fetch(&inst).await.unwrap_err();
    assert_eq!(
        err.reason,
        format!("token_file {} is empty", token_file.display())
    );
    std::fs::remove_file(&token_file).unwrap();
    let err = vd.fetch(&inst).await.unwrap_err();
    assert!(
        err.reason.starts_with(&format!(
            "cannot read token_file {}: ",
            token_file.display()
        )),
        "{}",
        err.reason
    );
    assert_eq!(seen.lock().unwrap().len(), 5);
    let (calls, _, misses, failures) = vd.counters("rot");
    assert_eq!((calls, misses, failures), (5, 7, 2));

    // Back: works again.
    write_token(&token_file, "restored");
    vd.fetch(&inst).await.unwrap();
    assert_eq!(last_token(), "restored");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn soft_failure_is_logged_without_secrets() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    write_token(&token_file, "very-secret-token");
    let addr = serve_fixed(500, r#"{"leak":"secret-body"}"#).await;
    let mut cfg = target("soft", addr);
    cfg.token_file = Some(token_file);
    let vd = new_vd(vec![cfg]);
    let got = vd.fetch(&Arc::new(instance())).await.unwrap();
    assert_eq!(got.entries["soft"], json!({}));

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("WARN"), "{logs}");
    assert!(
        logs.contains("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"),
        "{logs}"
    );
    assert!(logs.contains("soft"), "{logs}");
    assert!(logs.contains("HTTP 500"), "{logs}");
    assert!(!logs.contains("very-secret-token"), "{logs}");
    assert!(!logs.contains("secret-body"), "{logs}");
}

// ---------------------------------------------------------------- metrics

#[tokio::test]
async fn metrics_are_exported() {
    let (addr, _) = recording_server(None).await;
    let mut registry = Registry::with_prefix("cradle");
    let vd = Vendordata::new(
        vec![target("m", addr), target("other", addr)],
        &mut registry,
    )
    .unwrap();
    let inst = Arc::new(instance());
    vd.fetch(&inst).await.unwrap();
    vd.fetch(&inst).await.unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        r#"cradle_vendordata_upstream_calls_total{target="m"} 1"#,
        r#"cradle_vendordata_cache_hits_total{target="m"} 1"#,
        r#"cradle_vendordata_cache_misses_total{target="m"} 1"#,
        r#"cradle_vendordata_failures_total{target="m"} 0"#,
        r#"cradle_vendordata_upstream_calls_total{target="other"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert_eq!(vd.counters("nope"), (0, 0, 0, 0));
}

// ---------------------------------------------------------------- config

#[test]
fn config_defaults_and_serde() {
    let cfg: TargetConfig =
        serde_json::from_value(json!({"name": "a", "url": "http://x/"})).unwrap();
    assert_eq!(cfg, TargetConfig::new("a", "http://x/"));
    assert_eq!(cfg.connect_timeout, 5);
    assert_eq!(cfg.read_timeout, 5);
    assert_eq!(cfg.failure, Failure::Soft);
    assert_eq!(cfg.max_response_bytes, 1024 * 1024);
    assert_eq!(cfg.cache_ttl, 300);
    assert_eq!(cfg.stale_if_error, 0);

    let cfg: TargetConfig = serde_json::from_value(
        json!({"name": "a", "url": "http://x/", "failure": "fatal", "token_file": "/t"}),
    )
    .unwrap();
    assert_eq!(cfg.failure, Failure::Fatal);
    assert_eq!(cfg.token_file, Some(PathBuf::from("/t")));

    let err = serde_json::from_value::<TargetConfig>(
        json!({"name": "a", "url": "http://x/", "timeout": 3}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field `timeout`"), "{err}");
    let err = serde_json::from_value::<TargetConfig>(
        json!({"name": "a", "url": "http://x/", "failure": "hard"}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown variant `hard`"), "{err}");

    assert!(new_vd(vec![]).is_empty());
}

#[test]
fn config_errors_name_target_and_field() {
    let ok = || TargetConfig::new("t", "http://127.0.0.1:9/");
    let check = |cfgs: Vec<TargetConfig>, target: &str, field: &str, needle: &str| {
        let e = config_err(cfgs);
        assert_eq!((e.target.as_str(), e.field), (target, field), "{e}");
        assert!(e.message.contains(needle), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("vendordata target {target:?}: {field}: "))
        );
    };

    let mut c = ok();
    c.name = "static".into();
    check(vec![c], "static", "name", "reserved");
    let mut c = ok();
    c.name = String::new();
    check(vec![c], "", "name", "empty");
    check(vec![ok(), ok()], "t", "name", "more than one");

    let mut c = ok();
    c.url = "ftp://127.0.0.1/x".into();
    check(vec![c], "t", "url", "http or https, not \"ftp\"");
    let mut c = ok();
    c.url = "not a url".into();
    check(vec![c], "t", "url", "not a valid URL");

    let mut c = ok();
    c.read_timeout = 0;
    check(vec![c], "t", "read_timeout", "at least 1 second");
    let mut c = ok();
    c.max_response_bytes = 0;
    check(vec![c], "t", "max_response_bytes", "at least 1");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let mut c = ok();
    c.token_file = Some(missing.clone());
    check(vec![c], "t", "token_file", "cannot read");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let mut c = ok();
    c.token_file = Some(empty.clone());
    check(vec![c], "t", "token_file", "is empty");

    let mut c = ok();
    c.url = "https://127.0.0.1:9/".into();
    c.ca_file = Some(missing.clone());
    check(vec![c], "t", "ca_file", "cannot read");
    let mut c = ok();
    c.url = "https://127.0.0.1:9/".into();
    c.ca_file = Some(empty.clone());
    check(vec![c], "t", "ca_file", "no PEM certificate");
    let pki = pki();
    let mut c = ok();
    c.ca_file = Some(pki.ca_file.clone());
    check(vec![c], "t", "ca_file", "not https");

    let https = || {
        let mut c = ok();
        c.url = "https://127.0.0.1:9/".into();
        c
    };
    let mut c = https();
    c.client_cert = Some(pki.client_cert.clone());
    check(vec![c], "t", "client_key", "must be set");
    let mut c = https();
    c.client_key = Some(pki.client_key.clone());
    check(vec![c], "t", "client_cert", "must be set");
    let mut c = https();
    c.client_cert = Some(pki.client_cert.clone());
    c.client_key = Some(pki.stray_key.clone());
    check(vec![c], "t", "client_key", "does not belong");
    let mut c = https();
    c.client_cert = Some(pki.client_cert.clone());
    c.client_key = Some(pki.client_cert.clone());
    check(vec![c], "t", "client_key", "no usable PEM private key");

    // And all of it together is fine.
    let mut c = https();
    c.ca_file = Some(pki.ca_file.clone());
    c.client_cert = Some(pki.client_cert.clone());
    c.client_key = Some(pki.client_key.clone());
    let mut registry = Registry::default();
    Vendordata::new(vec![c], &mut registry).unwrap();
}
