//! The guest-facing metadata listener.
//!
//! A guest is identified by the source address of its TCP connection and by
//! nothing it can write into a request: the instance answered for is the one
//! whose `metadata_address` equals the peer address. Unknown sources get 404.
//! No operator route exists here; the admin API is another listener.
//!
//! Content comes from `cradle-render`; this crate only routes, checks IMDSv2
//! tokens, and carries the two side effects a guest may cause: setting its
//! password once and using the host-guest channel.
//!
//! Hardening: a bounded number of connections, a deadline for request
//! headers and another for bodies, size limits on both, replies sent with IP
//! TTL 1 (configurable) so they cannot cross a router, and paths refused when
//! they could mean anything but what they say (`..`, `.`, `//`, `%`).

#![forbid(unsafe_code)]

mod cache;
mod token;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cradle_model::{ImdsTokens, Instance, State};
use cradle_registry::metrics::Metrics;
use cradle_registry::{ChannelDirection, Registry, RegistryError};
use cradle_render::{Context, Resolved};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use token::{TokenError, TokenKey};

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// Listener settings (see `[metadata]` in docs/configuration.md).
#[derive(Debug, Clone)]
pub struct Settings {
    pub hop_limit: u32,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_token_ttl: u32,
    /// Bytes of rendered EC2 and OpenStack answers kept; 0 disables.
    pub cache_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            hop_limit: 1,
            max_connections: 4096,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: 128 * 1024,
            max_token_ttl: 21600,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Everything the listener needs; cheap to share.
pub struct MetadataService {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    tokens: TokenKey,
    vendor_data: serde_json::Value,
    settings: Settings,
    cache: cache::RenderCache,
    vendordata: Arc<cradle_vendordata::Vendordata>,
}

impl MetadataService {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        vendor_data: serde_json::Value,
        vendordata: Arc<cradle_vendordata::Vendordata>,
        settings: Settings,
    ) -> Self {
        let cache = cache::RenderCache::new(settings.cache_bytes);
        MetadataService {
            registry,
            metrics,
            tokens: TokenKey::generate(),
            vendor_data,
            settings,
            cache,
            vendordata,
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
    let workers = listeners.len().max(1);
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
                    serve_one(listener, service, stopped, workers).await
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
    serve_one(listener, service, shutdown, 1).await
}

/// One accept loop; `share` listeners split `max_connections` between them.
async fn serve_one(
    listener: TcpListener,
    service: Arc<MetadataService>,
    shutdown: impl Future<Output = ()>,
    share: usize,
) -> std::io::Result<()> {
    // On the listening socket too, so that even the SYN-ACK carries it.
    set_hop_limit(
        &socket2::SockRef::from(&listener),
        listener.local_addr()?,
        service.settings.hop_limit,
    )?;
    let permits = Arc::new(Semaphore::new(
        (service.settings.max_connections / share.max(1)).max(1),
    ));
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
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            () = &mut shutdown => break,
        };
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
        if let Err(e) = prepare(&stream, peer, service.settings.hop_limit) {
            debug!(error = %e, %peer, "cannot set socket options; dropping connection");
            continue;
        }
        let svc = service.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                let svc = svc.clone();
                async move { Ok::<_, Infallible>(handle(&svc, peer.ip(), req).await) }
            }),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, %peer, "metadata connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
    Ok(())
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

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

fn not_allowed(allow: &'static str) -> Reply {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// The label a request is counted under.
fn namespace(path: &str) -> &'static str {
    match path.split('/').nth(1).unwrap_or("") {
        "openstack" => "openstack",
        "cradle" | "ganeti" => "cradle",
        _ if path == TOKEN_PATH => "token",
        _ => "ec2",
    }
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

/// Milliseconds since the Unix epoch. Token expiry is kept in milliseconds:
/// in whole seconds a token issued late in a second would lose most of its
/// first second (a one-second token could be dead on arrival).
fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Days since the epoch: cached answers are valid for one day, since the
/// OpenStack versions offered depend on the date.
fn unix_day() -> u64 {
    unix_now_ms() / 86_400_000
}

fn today() -> String {
    cradle_render::date(time::OffsetDateTime::now_utc())
}

async fn handle(svc: &MetadataService, source: IpAddr, req: Request<Incoming>) -> Reply {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let instance = svc.registry.by_address(source);
    let ns = if instance.is_some() {
        namespace(&path)
    } else {
        "none"
    };
    let response = match &instance {
        None => text(
            StatusCode::NOT_FOUND,
            "404 Not Found: no instance has this source address",
        ),
        Some(i) => {
            // Only an instance being installed has a job: the state in hand
            // says so without taking the jobs' lock on every request.
            if i.state == State::Installing
                && let Some(job) = svc.registry.running_install(i.id)
            {
                job.saw_request();
            }
            route(svc, i, &path, req).await
        }
    };
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    svc.metrics.observe(ns, status, elapsed.as_secs_f64());
    match &instance {
        Some(i) => info!(
            instance = %i.id, %method, path = %path, status, latency_us = elapsed.as_micros() as u64,
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
    inst: &Arc<Instance>,
    path: &str,
    req: Request<Incoming>,
) -> Reply {
    let Some(segs) = segments(path) else {
        return text(StatusCode::BAD_REQUEST, "400 Bad Request: malformed path");
    };

    if path.trim_end_matches('/') == TOKEN_PATH {
        return if req.method() == Method::PUT {
            issue_token(svc, inst, &req)
        } else {
            not_allowed("PUT")
        };
    }

    // A token that is presented must be good; one that is missing must not
    // be required. This guards every namespace: an SSRF that reaches
    // /openstack would otherwise read what EC2 protects.
    match req.headers().get(TOKEN_HEADER) {
        Some(t) => {
            let ok = t
                .to_str()
                .ok()
                .map(|t| svc.tokens.check(t, inst.id, unix_now_ms()));
            if ok != Some(Ok(())) {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "401 Unauthorized: invalid or expired token",
                );
            }
        }
        None if inst.imds_tokens == ImdsTokens::Required => {
            return text(
                StatusCode::UNAUTHORIZED,
                "401 Unauthorized: this instance requires an IMDSv2 token",
            );
        }
        None => {}
    }

    let native = matches!(segs.first(), Some(&"cradle") | Some(&"ganeti"));
    match segs.as_slice() {
        [_, "latest", "read"] if native => {
            return if req.method() == Method::GET {
                channel_read(svc, inst).await
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
            return install_file(svc, inst, &segs[2..]).await;
        }
        [_, "latest", "write"] if native => {
            return if req.method() == Method::POST {
                channel_write(svc, inst, req).await
            } else {
                not_allowed("POST")
            };
        }
        ["openstack", version, "password"] if req.method() == Method::POST => {
            let version = version.to_string();
            return set_password(svc, inst, &version, req).await;
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

    // Dynamic vendordata has its own cache (per target TTLs, single flight);
    // a fatal failure puts the instance in error and the guest gets 503.
    let dynamic = match segs.as_slice() {
        ["openstack", _, "vendor_data2.json"] if !svc.vendordata.is_empty() => {
            match svc.vendordata.fetch(inst).await {
                Ok(d) => Some(d.entries),
                Err(fatal) => return vendordata_failed(svc, inst, &fatal).await,
            }
        }
        _ => None,
    };
    // The native namespace carries OS parameters: never cached.
    let cacheable = !native && dynamic.is_none();
    let day = unix_day();
    if cacheable && let Some(doc) = svc.cache.get(inst, day, path) {
        return reply(StatusCode::OK, doc.content_type, doc.body);
    }
    let today = today();
    let ctx = match &dynamic {
        Some(d) => Context::new(&today, &svc.vendor_data).with_dynamic(d),
        None => Context::new(&today, &svc.vendor_data),
    };
    let root = cradle_render::root(inst, &ctx);
    let doc = match root.resolve(&segs) {
        Some(Resolved::File(bytes)) => {
            let last = segs.last().copied().unwrap_or("");
            let content_type = if last.ends_with(".json") || last == "document" {
                "application/json"
            } else if last == "user-data" || last == "user_data" {
                "application/octet-stream"
            } else {
                "text/plain; charset=utf-8"
            };
            cache::Doc {
                content_type,
                body: bytes.into(),
            }
        }
        Some(Resolved::Listing(bytes)) => cache::Doc {
            content_type: "text/plain; charset=utf-8",
            body: bytes.into(),
        },
        None => return text(StatusCode::NOT_FOUND, "404 Not Found"),
    };
    if cacheable {
        svc.cache.put(inst, day, path, doc.clone());
    }
    reply(StatusCode::OK, doc.content_type, doc.body)
}

/// A fatal vendordata failure: the instance moves to state `error` (with an
/// event), and the guest is told to come back later.
async fn vendordata_failed(
    svc: &MetadataService,
    inst: &Instance,
    fatal: &cradle_vendordata::Fatal,
) -> Reply {
    let reason = fatal.to_string();
    warn!(instance = %inst.id, reason = %reason, "fatal vendordata failure; instance set to error");
    let (registry, id) = (svc.registry.clone(), inst.id);
    if let Err(e) =
        blocking(move || registry.set_error(id, "vendordata", &reason).map(|_| ())).await
    {
        warn!(instance = %inst.id, error = %e, "cannot record the vendordata failure");
    }
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "503 Service Unavailable: vendordata is unavailable",
    )
}

fn issue_token(svc: &MetadataService, inst: &Instance, req: &Request<Incoming>) -> Reply {
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
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|t| (1..=svc.settings.max_token_ttl).contains(t));
    let Some(ttl) = ttl else {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: X-aws-ec2-metadata-token-ttl-seconds must be a whole number of seconds from 1 to 21600",
        );
    };
    let token = svc
        .tokens
        .issue(inst.id, unix_now_ms() + u64::from(ttl) * 1000);
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(RegistryError::NotFound(format!(
            "internal task failed: {e}"
        ))),
    }
}

fn registry_failure(e: &RegistryError) -> Reply {
    match e {
        RegistryError::NotFound(_) => text(StatusCode::NOT_FOUND, "404 Not Found"),
        RegistryError::QueueFull(_) => text(
            StatusCode::TOO_MANY_REQUESTS,
            "429 Too Many Requests: queue full",
        ),
        RegistryError::MessageTooLarge(..) => {
            text(StatusCode::PAYLOAD_TOO_LARGE, "413 Payload Too Large")
        }
        RegistryError::PasswordSet => {
            text(StatusCode::CONFLICT, "409 Conflict: password already set")
        }
        RegistryError::PasswordTooLong => text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: password too long",
        ),
        other => {
            warn!(error = %other, "metadata request failed");
            text(StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable")
        }
    }
}

async fn channel_read(svc: &MetadataService, inst: &Instance) -> Reply {
    let (registry, id) = (svc.registry.clone(), inst.id);
    match blocking(move || registry.pop_message(id, ChannelDirection::ToGuest)).await {
        Ok(Some(m)) => {
            let mut r = reply(StatusCode::OK, "application/octet-stream", m.body);
            r.headers_mut()
                .insert("x-cradle-message-id", HeaderValue::from(m.id));
            r
        }
        Ok(None) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Err(e) => registry_failure(&e),
    }
}

async fn channel_write(svc: &MetadataService, inst: &Instance, req: Request<Incoming>) -> Reply {
    let cap = svc.registry.limits().message_bytes;
    let body = match read_body(svc, req, cap).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // While an install runs, the agent reports on the channel: its messages
    // are the job's, not the queue's.
    // Anything else goes to the job's trusted script, when one runs: the
    // two halves of an OS definition talk through the channel.
    if let Some(job) = svc.registry.running_install(inst.id)
        && (job.agent_message(&body) || job.forward(&body))
    {
        return text(StatusCode::CREATED, "");
    }
    let (registry, id) = (svc.registry.clone(), inst.id);
    match blocking(move || registry.push_message(id, ChannelDirection::ToHost, &body)).await {
        Ok(n) => {
            let mut r = text(StatusCode::CREATED, "");
            r.headers_mut()
                .insert("x-cradle-message-id", HeaderValue::from(n));
            r
        }
        Err(e) => registry_failure(&e),
    }
}

/// What the install appliance reads while its job runs: the manifest
/// (`install.json`), the OS definition's untrusted scripts and the
/// personalization package. Only the instance being installed has a job, and
/// the listener knows instances by source address, so no other guest can
/// read them.
async fn install_file(svc: &MetadataService, inst: &Instance, rest: &[&str]) -> Reply {
    let Some(job) = svc.registry.running_install(inst.id) else {
        return text(
            StatusCode::NOT_FOUND,
            "404 Not Found: no install job is running for this instance",
        );
    };
    match rest {
        ["install.json"] => reply(StatusCode::OK, "application/json", job.manifest.clone()),
        ["os", "scripts", name] => match job.scripts.get(*name) {
            Some(b) => reply(StatusCode::OK, "application/octet-stream", b.clone()),
            None => text(
                StatusCode::NOT_FOUND,
                "404 Not Found: the OS definition has no such untrusted script",
            ),
        },
        _ => {
            if job.package.is_none() {
                return text(
                    StatusCode::NOT_FOUND,
                    "404 Not Found: the instance has no personalization package",
                );
            }
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let p = job.package.as_ref().expect("checked above");
                let mut buf = vec![0u8; usize::try_from(p.len).unwrap_or(usize::MAX)];
                p.file
                    .read_exact_at(&mut buf, 0)
                    .map(|()| (buf, p.sha256.clone()))
            })
            .await;
            match read {
                Ok(Ok((bytes, sha))) => {
                    let mut r = reply(StatusCode::OK, "application/gzip", bytes);
                    if let Ok(v) = HeaderValue::from_str(&sha) {
                        r.headers_mut().insert("x-cradle-package-sha256", v);
                    }
                    r
                }
                other => {
                    warn!(instance = %inst.id, error = ?other.map(|r| r.map(|_| ()).map_err(|e| e.to_string())), "cannot read the personalization package");
                    text(StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable")
                }
            }
        }
    }
}

async fn set_password(
    svc: &MetadataService,
    inst: &Instance,
    version: &str,
    req: Request<Incoming>,
) -> Reply {
    // Only versions that have a password file take one.
    let today = today();
    let ctx = Context::new(&today, &svc.vendor_data);
    let has_password = cradle_render::openstack_versions(inst, &ctx)
        .resolve(&[version, "password"])
        .is_some();
    if !has_password {
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
    let (registry, id) = (svc.registry.clone(), inst.id);
    match blocking(move || registry.set_password(id, &password)).await {
        Ok(()) => text(StatusCode::OK, ""),
        Err(e) => registry_failure(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
