//! The guest-facing metadata listener.
//!
//! A guest is identified by the source address of its TCP connection and by
//! nothing it can write into a request: the instance answered for is the one
//! whose `metadata_address` equals the peer address. Unknown sources get 404.
//! No operator route exists here; the admin API is another listener.
//!
//! Everything a guest may do is an operation of `cradle-core` (its
//! documents, IMDSv2 tokens, the channel, its password, the appliance's
//! install files); this crate parses a request, calls one, and shapes the
//! answer as plain text. Whether a request may read what it asks for
//! (its token, its `Metadata-Flavor` header, the namespace) is decided
//! there too, by `Core::authorize_guest`, before any route. It holds no state and touches no store: the
//! operations run what blocks on the blocking pool.
//!
//! Hardening: connections capped per source (a guest is one address;
//! addresses that are no instance's get a smaller cap) and in total,
//! refused at accept past a cap; a token bucket per instance, past which a
//! guest gets 429 with `Retry-After` and no other guest notices; a deadline
//! for request headers (which also ends idle connections) and another for
//! bodies, size limits on both, replies sent with IP TTL 1 (configurable)
//! so they cannot cross a router, and paths refused when they could mean
//! anything but what they say (`..`, `.`, `//`, `%`).

#![forbid(unsafe_code)]

mod conn;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cradle_core::{Core, Error, Guest, InstallFile, Kind, Namespace, Presented, Wait, Written};
use cradle_limits::{Admission, Buckets, Caps};
use cradle_model::answers::{METADATA_FLAVOR, METADATA_FLAVOR_HEADER};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// Listener settings (see `[metadata]` in docs/configuration.md).
#[derive(Debug, Clone)]
pub struct Settings {
    pub hop_limit: u32,
    /// Connections held at once: in total, per instance address, and per
    /// address that is no instance's. Past one, a connection is refused.
    pub caps: Caps,
    /// Requests a second an instance may make after a burst of `burst`;
    /// 0 meters nothing.
    pub rate: u32,
    pub burst: u32,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            hop_limit: 1,
            caps: Caps {
                total: 4096,
                per_source: 16,
                per_unknown_source: 2,
            },
            rate: 50,
            burst: 200,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: 128 * 1024,
        }
    }
}

/// Everything the listener needs; cheap to share.
pub struct MetadataService {
    core: Arc<Core>,
    settings: Settings,
    /// Shared by every worker: one guest's connections may land on any.
    admission: Arc<Admission>,
    buckets: Buckets<Sender>,
}

/// Whose budget a request spends: its instance's, or for a source that is
/// no instance's, its address's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Sender {
    Instance(uuid::Uuid),
    Unknown(IpAddr),
}

impl MetadataService {
    pub fn new(core: Arc<Core>, settings: Settings) -> Self {
        MetadataService {
            admission: Admission::new(settings.caps),
            buckets: Buckets::new(settings.rate, settings.burst),
            core,
            settings,
        }
    }
}

/// Bind `workers` listening sockets to `addr` with `SO_REUSEPORT`, for
/// [`serve_workers`]. The first socket binds `addr` (port 0 picks a port);
/// the others bind the port it got.
pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out: Vec<std::net::TcpListener> = Vec::new();
    for _ in 0..workers.max(1) {
        let at = match out.first() {
            Some(first) => first.local_addr()?,
            None => addr,
        };
        let sock = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        // 169.254.169.254 lives on the install jobs' taps, which come and
        // go: the listener binds it before any exists.
        if at.is_ipv4() {
            sock.set_freebind_v4(true)?;
        } else {
            sock.set_freebind_v6(true)?;
        }
        sock.set_nonblocking(true)?;
        sock.bind(&at.into())?;
        sock.listen(1024)?;
        out.push(sock.into());
    }
    Ok(out)
}

/// Serve guests with one single-threaded runtime per listener, each on its
/// own thread, until `shutdown` turns true.
///
/// Why not one multi-threaded runtime: a metadata request is tiny, and
/// profiles showed a fifth of the CPU going to workers waking each other.
/// With `SO_REUSEPORT` the kernel spreads connections over the listeners and
/// each connection lives on one thread, as nginx's workers do.
pub fn serve_workers(
    listeners: Vec<std::net::TcpListener>,
    service: Arc<MetadataService>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<std::io::Result<()>>>> {
    let mut handles = Vec::new();
    for (n, listener) in listeners.into_iter().enumerate() {
        let service = service.clone();
        let mut stop = shutdown.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = std::thread::Builder::new()
            .name(format!("metadata-{n}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    let stopped = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    serve_one(listener, service, stopped).await
                })
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Serve guests on `listener` until `shutdown` resolves, then let requests in
/// flight finish (for at most a few seconds).
pub async fn serve(
    listener: TcpListener,
    service: Arc<MetadataService>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_one(listener, service, shutdown).await
}

/// One accept loop; every loop counts against the service's caps.
async fn serve_one(
    listener: TcpListener,
    service: Arc<MetadataService>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // On the listening socket too, so that even the SYN-ACK carries it.
    set_hop_limit(
        &socket2::SockRef::from(&listener),
        listener.local_addr()?,
        service.settings.hop_limit,
    )?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(service.settings.header_timeout)
        .max_buf_size(16 * 1024)
        .keep_alive(true)
        // A client may shut its side down once its request is sent (busybox
        // nc does). Without half-close hyper drops the request in flight,
        // and a channel read would consume a message nobody receives.
        .half_close(true);
    tokio::pin!(shutdown);
    let metrics = service.core.metrics();
    loop {
        // At the limit, accept nothing until a connection closes: new ones
        // wait in the kernel's backlog (see cradle-limits).
        if service.admission.full() {
            metrics.limit_reached("metadata");
            tokio::select! {
                () = service.admission.room() => {}
                () = &mut shutdown => break,
            }
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    warn!(error = %e, "metadata listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // A flood of connects keeps the backlog full, and accept would
        // run on until tokio's budget ran out while requests on the
        // connections this worker serves wait: one accept, then their turn.
        tokio::task::yield_now().await;
        // Before any work for the connection: a refused one costs an
        // accept and a reset.
        let known = service.core.knows_source(peer.ip());
        let admitted = tokio::select! {
            a = service.admission.admit_or_wait(peer.ip(), known) => a,
            () = &mut shutdown => break,
        };
        let admitted = match admitted {
            Ok(a) => a,
            Err(refusal) => {
                metrics.refused("metadata", refusal.label());
                refuse(stream);
                continue;
            }
        };
        metrics.set_connections("metadata", service.admission.held());
        if let Err(e) = prepare(&stream, peer, service.settings.hop_limit) {
            debug!(error = %e, %peer, "cannot set socket options; dropping connection");
            continue;
        }
        let stream = Arc::new(stream);
        let svc = service.clone();
        let shared = stream.clone();
        let conn = http.serve_connection(
            TokioIo::new(conn::Shared(stream)),
            hyper::service::service_fn(move |req| {
                let (svc, shared) = (svc.clone(), shared.clone());
                async move { Ok::<_, Infallible>(handle(&svc, peer.ip(), &shared, req).await) }
            }),
        );
        let conn = graceful.watch(conn);
        let svc = service.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, %peer, "metadata connection ended with an error");
            }
            drop(admitted);
            svc.core
                .metrics()
                .set_connections("metadata", svc.admission.held());
        });
    }
    drop(listener);
    // Requests waiting for a change answer now, or graceful shutdown
    // would wait for their timeouts.
    service.core.end_waits();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
    Ok(())
}

/// Close at once with a reset: no FIN handshake, no TIME_WAIT kept here
/// for a client that is past its cap.
fn refuse(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Replies leave with the configured TTL (hop limit), so they die at the
/// first router.
fn prepare(stream: &TcpStream, peer: SocketAddr, hop_limit: u32) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let sock = socket2::SockRef::from(stream);
    if local.is_ipv6() && peer.ip().to_canonical().is_ipv4() {
        // An IPv4 peer on a dual-stack socket: the IPv4 TTL applies.
        return sock.set_ttl_v4(hop_limit);
    }
    set_hop_limit(&sock, local, hop_limit)
}

fn set_hop_limit(
    sock: &socket2::SockRef<'_>,
    local: SocketAddr,
    hop_limit: u32,
) -> std::io::Result<()> {
    match local {
        SocketAddr::V4(_) => sock.set_ttl_v4(hop_limit),
        SocketAddr::V6(_) => {
            sock.set_unicast_hops_v6(hop_limit)?;
            // Dual-stack listeners also answer IPv4 peers.
            if !sock.only_v6().unwrap_or(true) {
                sock.set_ttl_v4(hop_limit)?;
            }
            Ok(())
        }
    }
}

type Reply = Response<Body>;
/// Every answer's body: whole (every document, unboxed: the hot path), or
/// streamed (an import's dump).
type Body = http_body_util::Either<Full<Bytes>, Streamed>;
type Streamed = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Either::Left(Full::new(b.into()))
}

/// What a wait whose guest went away is counted as (nginx's 499); nobody
/// reads it.
const CLIENT_GONE: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

/// Past the sender's budget: when to come back, in whole seconds.
fn throttled(wait: Duration) -> Reply {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut r = reply(
        StatusCode::TOO_MANY_REQUESTS,
        "text/plain; charset=utf-8",
        format!("429 Too Many Requests: over this instance's request rate; retry after {secs} s"),
    );
    r.headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}

fn not_allowed(allow: &'static str) -> Reply {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// The label a request is counted under.
fn namespace(path: &str) -> &'static str {
    if path.trim_end_matches('/') == TOKEN_PATH {
        return "token";
    }
    Namespace::of(&[path.split('/').nth(1).unwrap_or("")]).label()
}

/// Split a path into segments, refusing anything ambiguous. A trailing
/// slash is allowed (it asks for a listing, as a bare directory name does).
fn segments(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    if path.contains('%') || path.contains('\\') {
        return None;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let segs: Vec<&str> = rest.split('/').collect();
    if segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return None;
    }
    Some(segs)
}

/// What a request's query string asks for, percent-decoded (`+` is a
/// space, as forms send it; the path itself refuses `%`, see
/// [`segments`], but a query value may need it: an audience is often a
/// URL). Parameters cradle does not know are ignored, as EC2 and GCE
/// ignore them.
#[derive(Debug, Default)]
struct Query {
    /// `wait=true`, with `last_etag` and `timeout_sec`.
    wait: Option<Wait>,
    /// An identity token's `audience` and `format`.
    audience: Option<String>,
    format: Option<String>,
}

impl Query {
    /// The query, or what is wrong with it.
    fn parse(query: Option<&str>) -> Result<Query, &'static str> {
        let Some(q) = query else {
            return Ok(Query::default());
        };
        let (mut wait, mut last_etag, mut timeout) = (false, None, None);
        let mut query = Query::default();
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "audience" => query.audience = Some(v.into_owned()),
                "format" => query.format = Some(v.into_owned()),
                "wait" => {
                    wait = match &*v {
                        "true" => true,
                        "false" => false,
                        _ => return Err("wait must be true or false"),
                    }
                }
                "last_etag" => last_etag = Some(v.into_owned()),
                "timeout_sec" => {
                    timeout = Some(
                        v.parse::<u64>()
                            .map_err(|_| "timeout_sec must be a whole number of seconds")?,
                    )
                }
                _ => {}
            }
        }
        query.wait = wait.then(|| Wait {
            last_etag,
            timeout: timeout
                .map(Duration::from_secs)
                .unwrap_or(cradle_core::DEFAULT_WAIT),
        });
        Ok(query)
    }
}

fn bad_request(why: &str) -> Reply {
    reply(
        StatusCode::BAD_REQUEST,
        "text/plain; charset=utf-8",
        format!("400 Bad Request: {why}"),
    )
}

async fn handle(
    svc: &MetadataService,
    source: IpAddr,
    conn: &TcpStream,
    req: Request<Incoming>,
) -> Reply {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let waits = matches!(&query, Ok(Query { wait: Some(_), .. }));
    let guest = svc.core.guest(source);
    let ns = if guest.is_some() {
        namespace(&path)
    } else {
        "none"
    };
    let sender = match &guest {
        Some(g) => Sender::Instance(g.id()),
        None => Sender::Unknown(source.to_canonical()),
    };
    let response = match (svc.buckets.take(&sender, started), &guest) {
        (Err(wait), _) => {
            svc.core.metrics().throttled.inc();
            throttled(wait)
        }
        (Ok(()), None) => text(
            StatusCode::NOT_FOUND,
            "404 Not Found: no instance has this source address",
        ),
        (Ok(()), Some(g)) => match query {
            Ok(query) => route(svc, g, &path, query, conn, req).await,
            Err(why) => bad_request(why),
        },
    };
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    if waits {
        svc.core.metrics().count(ns, status);
    } else {
        svc.core
            .metrics()
            .observe(ns, status, elapsed.as_secs_f64());
    }
    match &guest {
        Some(g) => info!(
            instance = %g.id(), %method, path = %path, status, latency_us = elapsed.as_micros() as u64,
            "metadata request"
        ),
        None => {
            info!(%source, %method, path = %path, status, "metadata request from unknown source")
        }
    }
    response
}

async fn route(
    svc: &MetadataService,
    guest: &Guest,
    path: &str,
    query: Query,
    conn: &TcpStream,
    req: Request<Incoming>,
) -> Reply {
    let Some(segs) = segments(path) else {
        return text(StatusCode::BAD_REQUEST, "400 Bad Request: malformed path");
    };

    if path.trim_end_matches('/') == TOKEN_PATH {
        return if req.method() == Method::PUT {
            issue_token(svc, guest, &req)
        } else {
            not_allowed("PUT")
        };
    }

    let presented = Presented {
        token: req.headers().get(TOKEN_HEADER).map(|t| t.as_bytes()),
        flavor: req.headers().get(METADATA_FLAVOR_HEADER).is_some_and(|v| {
            v.as_bytes()
                .eq_ignore_ascii_case(METADATA_FLAVOR.as_bytes())
        }),
    };
    let ns = Namespace::of(&segs);
    if let Err(e) = svc.core.authorize_guest(guest, ns, presented) {
        return failure(&e);
    }

    let native = ns == Namespace::Native;
    match segs.as_slice() {
        [_, "latest", "read"] if native => {
            return if req.method() == Method::GET {
                channel_read(svc, guest).await
            } else {
                not_allowed("GET")
            };
        }
        [_, "latest", "install.json"]
        | [_, "latest", "os", "scripts", _]
        | [_, "latest", "os", "package"]
            if native =>
        {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return not_allowed("GET, HEAD");
            }
            return install_file(svc, guest, &segs[2..]);
        }
        [_, "latest", "os", "stream"] if native => {
            return match *req.method() {
                Method::GET => stream_download(svc, guest),
                Method::PUT | Method::POST => stream_upload(svc, guest, req).await,
                _ => not_allowed("GET, PUT, POST"),
            };
        }
        [_, "latest", "identity"] if native => {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return not_allowed("GET, HEAD");
            }
            return identity_token(svc, guest, &query).await;
        }
        [_, "latest", "write"] if native => {
            return if req.method() == Method::POST {
                channel_write(svc, guest, req).await
            } else {
                not_allowed("POST")
            };
        }
        [_, "latest", "events", event, "ack"] if native => {
            return if req.method() == Method::POST {
                acknowledge(svc, guest, event).await
            } else {
                not_allowed("POST")
            };
        }
        ["openstack", version, "password"] if req.method() == Method::POST => {
            let version = version.to_string();
            return set_password(svc, guest, &version, req).await;
        }
        _ => {}
    }

    if req.method() != Method::GET && req.method() != Method::HEAD {
        let is_password = matches!(segs.as_slice(), ["openstack", _, "password"]);
        return not_allowed(if is_password {
            "GET, HEAD, POST"
        } else {
            "GET, HEAD"
        });
    }

    let doc = match query.wait {
        Some(wait) if req.method() == Method::GET => {
            // A guest that gives up gives its place back at once.
            tokio::select! {
                doc = svc.core.wait_document(guest, path, &segs, wait) => doc,
                () = conn::gone(conn) => return text(CLIENT_GONE, "the client closed the connection"),
            }
        }
        _ => svc.core.document(guest, path, &segs).await,
    };
    match doc {
        Ok(doc) => conditional(&req, doc),
        Err(e) => failure(&e),
    }
}

/// `GET /cradle/latest/identity?audience=AUD[&format=full]`: a signed
/// identity token, as plain text, never cached.
async fn identity_token(svc: &MetadataService, guest: &Guest, query: &Query) -> Reply {
    let full = match query.format.as_deref() {
        None | Some("standard") => false,
        Some("full") => true,
        Some(other) => {
            return bad_request(&format!("format is standard or full, not {other:?}"));
        }
    };
    // GCE's `licenses` and anything else change nothing here.
    match svc
        .core
        .identity_token(guest, query.audience.as_deref(), full)
        .await
    {
        Ok(token) => {
            let mut r = reply(StatusCode::OK, "text/plain; charset=utf-8", token);
            r.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
            r
        }
        Err(e) => failure(&e),
    }
}

/// A document with its `ETag` (the hash of its bytes the document
/// carries, so the same document always has the same tag), or `304 Not
/// Modified` when the request's `If-None-Match` names that tag: what lets
/// a guest agent poll cheaply.
fn conditional(req: &Request<Incoming>, doc: cradle_core::Doc) -> Reply {
    let tag = doc.tag();
    let matches = req
        .headers()
        .get_all(hyper::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == tag
        });
    let mut r = if matches {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        reply(StatusCode::OK, doc.content_type, doc.body)
    };
    if let Ok(v) = HeaderValue::from_str(&tag) {
        r.headers_mut().insert(hyper::header::ETAG, v);
    }
    r
}

/// An operation's failure as a guest sees it: a status line, and what the
/// operation said when that is the guest's to know.
fn failure(e: &Error) -> Reply {
    let said = |status: StatusCode, line: &str| {
        reply(status, "text/plain; charset=utf-8", format!("{line}: {e}"))
    };
    match e.kind() {
        Kind::NotFound => text(StatusCode::NOT_FOUND, "404 Not Found"),
        Kind::Unauthorized => said(StatusCode::UNAUTHORIZED, "401 Unauthorized"),
        Kind::TooMany => said(StatusCode::TOO_MANY_REQUESTS, "429 Too Many Requests"),
        Kind::TooLarge => text(StatusCode::PAYLOAD_TOO_LARGE, "413 Payload Too Large"),
        Kind::Full => {
            warn!(error = %e, "metadata request failed");
            text(
                StatusCode::INSUFFICIENT_STORAGE,
                "507 Insufficient Storage: the host's disk is full",
            )
        }
        Kind::Conflict => said(StatusCode::CONFLICT, "409 Conflict"),
        Kind::Invalid | Kind::BadRequest => said(StatusCode::BAD_REQUEST, "400 Bad Request"),
        Kind::Internal => {
            warn!(error = %e, "metadata request failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error",
            )
        }
        Kind::Forbidden => said(StatusCode::FORBIDDEN, "403 Forbidden"),
        Kind::Upstream | Kind::Unavailable => {
            warn!(error = %e, "metadata request failed");
            text(StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable")
        }
    }
}

fn issue_token(svc: &MetadataService, guest: &Guest, req: &Request<Incoming>) -> Reply {
    // A proxy in front of the listener would make every guest look alike;
    // refusing forwarded requests keeps tokens from being minted through one.
    if req.headers().contains_key("x-forwarded-for") {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: forwarded requests cannot obtain a token",
        );
    }
    let ttl = req
        .headers()
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok());
    let issued = ttl.and_then(|t| svc.core.issue_token(guest, t).ok().map(|tok| (t, tok)));
    let Some((ttl, token)) = issued else {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            format!(
                "400 Bad Request: X-aws-ec2-metadata-token-ttl-seconds must be a whole number of seconds from 1 to {}",
                svc.core.max_token_ttl()
            ),
        );
    };
    let mut r = reply(StatusCode::OK, "text/plain; charset=utf-8", token);
    r.headers_mut().insert(TTL_HEADER, HeaderValue::from(ttl));
    r
}

/// Read a request body within the size cap and the body deadline.
async fn read_body(
    svc: &MetadataService,
    req: Request<Incoming>,
    cap: usize,
) -> Result<Bytes, Reply> {
    // The listener-wide cap bounds every body, whatever the endpoint allows.
    let limited = Limited::new(req.into_body(), cap.min(svc.settings.max_body_bytes));
    match tokio::time::timeout(svc.settings.body_timeout, limited.collect()).await {
        Err(_) => Err(text(
            StatusCode::REQUEST_TIMEOUT,
            "408 Request Timeout: body too slow",
        )),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(text(StatusCode::PAYLOAD_TOO_LARGE, "413 Payload Too Large"))
        }
        Ok(Err(_)) => Err(text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: unreadable body",
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn channel_read(svc: &MetadataService, guest: &Guest) -> Reply {
    match svc.core.read_message(guest).await {
        Ok(Some(m)) => {
            let mut r = reply(StatusCode::OK, "application/octet-stream", m.body);
            r.headers_mut()
                .insert("x-cradle-message-id", HeaderValue::from(m.id));
            r
        }
        Ok(None) => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Err(e) => failure(&e),
    }
}

async fn channel_write(svc: &MetadataService, guest: &Guest, req: Request<Incoming>) -> Reply {
    let body = match read_body(svc, req, svc.core.max_message_bytes()).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match svc.core.write_message(guest, body).await {
        Ok(Written::Job | Written::Agent) => text(StatusCode::CREATED, ""),
        Ok(Written::Queued(n)) => {
            let mut r = text(StatusCode::CREATED, "");
            r.headers_mut()
                .insert("x-cradle-message-id", HeaderValue::from(n));
            r
        }
        Err(e) => failure(&e),
    }
}

/// The appliance uploads its export's dump (what the script printed) as
/// the request's body: taken as it comes, never whole; the answer is the
/// length and SHA-256 the host counted, as JSON.
async fn stream_upload(svc: &MetadataService, guest: &Guest, req: Request<Incoming>) -> Reply {
    match svc.core.stream_upload(guest, req.into_body()).await {
        Ok(d) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&d).unwrap_or_default(),
        ),
        Err(e) => failure(&e),
    }
}

/// The appliance reads its import's dump, streamed from the spool file
/// with its length and SHA-256 in the head.
fn stream_download(svc: &MetadataService, guest: &Guest) -> Reply {
    let (file, digest) = match svc.core.stream_download(guest) {
        Ok(f) => f,
        Err(e) => return failure(&e),
    };
    let reader =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 1 << 20);
    let body = http_body_util::StreamBody::new(futures_util::TryStreamExt::map_ok(
        reader,
        hyper::body::Frame::data,
    ));
    let mut r = Response::new(http_body_util::Either::Right(body.boxed_unsync()));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut().insert(
        hyper::header::CONTENT_LENGTH,
        HeaderValue::from(digest.bytes),
    );
    if let Ok(v) = HeaderValue::from_str(&digest.sha256) {
        r.headers_mut()
            .insert(cradle_model::answers::STREAM_SHA256_HEADER, v);
    }
    r
}

/// The guest acknowledges one of its maintenance events (which then runs
/// at once): the event after, as JSON. Another instance's event, or none,
/// is a 404; one that started or finished, a 409.
async fn acknowledge(svc: &MetadataService, guest: &Guest, event: &str) -> Reply {
    match svc.core.acknowledge_event(guest, event).await {
        Ok(e) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&e).unwrap_or_default(),
        ),
        Err(e) => failure(&e),
    }
}

/// What the install appliance reads while its job runs: the manifest
/// (`install.json`), the OS definition's untrusted scripts and the
/// personalization package, the last from the job's one buffer.
fn install_file(svc: &MetadataService, guest: &Guest, rest: &[&str]) -> Reply {
    let (file, content_type) = match rest {
        ["install.json"] => (InstallFile::Manifest, "application/json"),
        ["os", "scripts", name] => (InstallFile::Script(name), "application/octet-stream"),
        _ => (InstallFile::Package, "application/gzip"),
    };
    match svc.core.install_file(guest, file) {
        Ok((bytes, sha256)) => {
            let mut r = reply(StatusCode::OK, content_type, bytes);
            if let Some(v) = sha256.and_then(|s| HeaderValue::from_str(&s).ok()) {
                r.headers_mut()
                    .insert(cradle_model::answers::PACKAGE_SHA256_HEADER, v);
            }
            r
        }
        Err(e) if e.kind() == Kind::NotFound => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("404 Not Found: {e}"),
        ),
        Err(e) => failure(&e),
    }
}

async fn set_password(
    svc: &MetadataService,
    guest: &Guest,
    version: &str,
    req: Request<Incoming>,
) -> Reply {
    // Only versions that have a password file take one.
    if !svc.core.has_password_file(guest, version) {
        return text(StatusCode::NOT_FOUND, "404 Not Found");
    }
    let body = match read_body(svc, req, cradle_model::MAX_PASSWORD).await {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return text(
                StatusCode::BAD_REQUEST,
                "400 Bad Request: password longer than 1020 bytes",
            );
        }
        Err(r) => return r,
    };
    let Ok(password) = String::from_utf8(body.to_vec()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: password is not UTF-8",
        );
    };
    match svc.core.set_password(guest, password).await {
        Ok(()) => text(StatusCode::OK, ""),
        Err(e) => failure(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_failure_is_a_500_never_a_404() {
        let r = failure(&Error::Internal("a task panicked".into()));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(segments("/"), Some(vec![]));
        assert_eq!(
            segments("/latest/meta-data/"),
            Some(vec!["latest", "meta-data"])
        );
        for bad in [
            "/latest/../openstack",
            "//latest",
            "/latest//meta-data",
            "/a/./b",
            "/latest/%2e%2e/x",
            "latest",
        ] {
            assert_eq!(segments(bad), None, "{bad}");
        }
    }
}
