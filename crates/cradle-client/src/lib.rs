//! The typed client of cradle's admin API.
//!
//! Every route is defined once, in [`route`], as a function that builds a
//! [`Request`]: its method, its path (segments percent-encoded), its query,
//! its body, and how its answer is read into a view type. Two faces send
//! them: [`Client`] (async, for host-to-host calls) and
//! [`blocking::Client`] (the CLI, tests, benches). Neither face knows a
//! route; no caller builds a path or an HTTP request by hand.
//!
//! Errors come back as [`Error::Api`] with the API's status, code and
//! message. Request bodies that carry private or secret parameters are
//! built in one place (`body.rs`) from the typed requests.
//!
//! [`announce`] is the other contract with a running server: the lines
//! `cradle serve` prints to say where it listens, written and read there.

#![forbid(unsafe_code)]

pub mod announce;
pub mod blocking;
mod body;
pub mod route;

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cradle_model::Secret;
use cradle_model::api::ErrorBody;
pub use http::{HeaderMap, Method};

pub use cradle_model::answers::PACKAGE_SHA256_HEADER as SHA256_HEADER;

/// How long a request may take, whole, by default. Long enough for a
/// follow request's wait and a large drive.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API refused, with its error body.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// An answer that is not the API's (a proxy, a server that is not
    /// cradle's).
    #[error("the admin API answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// The API could not be reached, or the connection broke.
    #[error("cannot reach the admin API at {base}: {source}")]
    Transport {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// A successful answer that does not read as the route's view.
    #[error("the admin API's answer to {what} does not fit: {reason}")]
    Decode { what: String, reason: String },
    /// Writing a download out failed.
    #[error("the download was cut short: {0}")]
    Io(#[from] std::io::Error),
    /// The token could not be read.
    #[error("{0}")]
    Token(String),
}

impl Error {
    /// The HTTP status of a refusal, if it came to one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } | Error::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's error code (`not_found`, `invalid`, …), if it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// One call of a route, ready to send, whose successful answer reads as `T`.
pub struct Request<T> {
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    read: fn(&[u8]) -> Result<T, serde_json::Error>,
    _answer: PhantomData<fn() -> T>,
}

impl<T> Request<T> {
    pub(crate) fn new(
        method: Method,
        path: String,
        read: fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Self {
        Request {
            method,
            path,
            query: Vec::new(),
            body: None,
            read,
            _answer: PhantomData,
        }
    }

    pub(crate) fn query(mut self, key: &'static str, value: impl ToString) -> Self {
        self.query.push((key, value.to_string()));
        self
    }

    /// Answer once the firewall enforces what the call changed
    /// (`?wait=true`): what the CLI asks of every write the firewall
    /// follows.
    pub(crate) fn enforced(self) -> Self {
        self.query("wait", true)
    }

    pub(crate) fn json(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The path, percent-encoded, without the query.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The same route with `body` sent as its JSON body instead: for
    /// tests of what the API makes of bodies the typed request cannot say
    /// (malformed, unknown fields, wrong types).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// The same route with one more query parameter, as given.
    pub fn with_query(self, key: &'static str, value: impl ToString) -> Self {
        self.query(key, value)
    }

    /// The same route, its answer read as plain JSON.
    pub fn as_json(self) -> Request<serde_json::Value> {
        Request {
            method: self.method,
            path: self.path,
            query: self.query,
            body: self.body,
            read: |b| serde_json::from_slice(b),
            _answer: PhantomData,
        }
    }

    fn what(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A whole answer, whatever its status: for the few callers that look at
/// headers or at a refusal's raw body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// How a token is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `X-Auth-Token: <token>`, as OpenStack clients send it.
    AuthToken,
    /// The token is the whole `Authorization` value (another scheme).
    Authorization,
    /// Not at all.
    Anonymous,
}

impl PeerTls {
    /// This host's cluster credentials from the directory `cradle cluster
    /// join` wrote: `ca.pem`, `host.pem` and `host.key`.
    pub fn from_dir(dir: &Path) -> Result<PeerTls, Error> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| {
                Error::Token(format!(
                    "cannot read the cluster credential {}: {e}",
                    path.display()
                ))
            })
        };
        let mut identity = read("host.pem")?;
        identity.push(b'\n');
        identity.extend(read("host.key")?);
        Ok(PeerTls {
            ca_pem: read("ca.pem")?,
            identity_pem: Secret::new(identity),
        })
    }
}

/// Where the API is and how to authenticate to it.
#[derive(Clone)]
pub struct Target {
    base: String,
    token: Secret<String>,
    presented: Presented,
    timeout: Duration,
    use_proxy: bool,
    tls: Option<Arc<PeerTls>>,
    /// Headers sent with every request, beside authentication.
    extra: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Mutual TLS to another host of a cluster: trust only the cluster's CA,
/// and present this host's certificate.
pub struct PeerTls {
    /// The cluster CA's certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// This host's certificate and its private key (PEM, one after the other).
    pub identity_pem: Secret<Vec<u8>>,
}

impl Target {
    /// `base` is the API's URL (`http://127.0.0.1:8774`).
    pub fn new(base: &str, token: impl Into<String>) -> Target {
        Target {
            base: base.trim_end_matches('/').to_string(),
            token: Secret::new(token.into()),
            presented: Presented::Bearer,
            timeout: DEFAULT_TIMEOUT,
            use_proxy: true,
            tls: None,
            extra: Vec::new(),
        }
    }

    /// Speak mutual TLS, as `tls` says (for `https://` peers).
    pub fn with_tls(mut self, tls: Arc<PeerTls>) -> Target {
        self.tls = Some(tls);
        self
    }

    /// The same credentials and settings, for the API at `base`.
    pub fn at(&self, base: &str) -> Target {
        Target {
            base: base.trim_end_matches('/').to_string(),
            ..self.clone()
        }
    }

    /// Send `name: value` with every request.
    pub fn with_header(mut self, name: &'static str, value: &str) -> Result<Target, Error> {
        let value = http::HeaderValue::from_str(value)
            .map_err(|_| Error::Token(format!("the {name} header is not valid")))?;
        self.extra
            .push((http::HeaderName::from_static(name), value));
        Ok(self)
    }

    /// With the token read from `path` (what `serve` writes to
    /// `<data-dir>/admin.token`).
    pub fn with_token_file(base: &str, path: &Path) -> Result<Target, Error> {
        Ok(Target::new(base, read_token(path)?))
    }

    /// Each request may take at most `timeout`, whole.
    pub fn timeout(mut self, timeout: Duration) -> Target {
        self.timeout = timeout;
        self
    }

    /// Ignore proxy settings from the environment (the API is local).
    pub fn no_proxy(mut self) -> Target {
        self.use_proxy = false;
        self
    }

    /// The same API with another token.
    pub fn with_token(&self, token: impl Into<String>) -> Target {
        Target {
            token: Secret::new(token.into()),
            ..self.clone()
        }
    }

    /// The same API, the token presented as `presented` says.
    pub fn presented(&self, presented: Presented) -> Target {
        Target {
            presented,
            ..self.clone()
        }
    }

    /// The request's authentication, as this target presents its token.
    fn authenticate(&self, headers: &mut HeaderMap) {
        let t = self.token.expose();
        let (name, value) = match self.presented {
            Presented::Bearer => (http::header::AUTHORIZATION, format!("Bearer {t}")),
            Presented::AuthToken => (http::HeaderName::from_static("x-auth-token"), t.clone()),
            Presented::Authorization => (http::header::AUTHORIZATION, t.clone()),
            Presented::Anonymous => return,
        };
        if let Ok(mut v) = http::HeaderValue::from_str(&value) {
            v.set_sensitive(true);
            headers.insert(name, v);
        }
    }

    fn headers<T>(&self, req: &Request<T>) -> HeaderMap {
        let mut h = HeaderMap::new();
        self.authenticate(&mut h);
        for (k, v) in &self.extra {
            h.insert(k.clone(), v.clone());
        }
        if req.body.is_some() {
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        h
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url<T>(&self, req: &Request<T>) -> String {
        let mut url = format!("{}{}", self.base, req.path);
        for (n, (k, v)) in req.query.iter().enumerate() {
            url.push(if n == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&route::encode(v));
        }
        url
    }

    fn transport(&self, source: reqwest::Error) -> Error {
        Error::Transport {
            base: self.base.clone(),
            source,
        }
    }
}

/// Read a bearer token from a file; surrounding whitespace is not part of it.
pub fn read_token(path: &Path) -> Result<String, Error> {
    let t = std::fs::read_to_string(path).map_err(|e| {
        Error::Token(format!(
            "cannot read the admin token from {}: {e}",
            path.display()
        ))
    })?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(Error::Token(format!("{} is empty", path.display())));
    }
    Ok(t)
}

/// A refusal as the caller sees it: the API's error body when there is one.
fn refusal(status: u16, body: &[u8]) -> Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => Error::Api {
            status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => Error::Http {
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

fn read_answer<T>(req: &Request<T>, body: &[u8]) -> Result<T, Error> {
    (req.read)(body).map_err(|e| Error::Decode {
        what: req.what(),
        reason: e.to_string(),
    })
}

/// The async face: each call is one request on a shared connection pool.
#[derive(Clone)]
pub struct Client {
    target: Target,
    http: reqwest::Client,
}

impl Client {
    pub fn new(target: Target) -> Result<Client, Error> {
        let mut b = reqwest::Client::builder().timeout(target.timeout);
        if !target.use_proxy {
            b = b.no_proxy();
        }
        if let Some(tls) = &target.tls {
            let ca =
                reqwest::Certificate::from_pem(&tls.ca_pem).map_err(|e| target.transport(e))?;
            let id = reqwest::Identity::from_pem(tls.identity_pem.expose())
                .map_err(|e| target.transport(e))?;
            b = b
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca)
                .identity(id)
                .https_only(true);
        }
        let http = b.build().map_err(|e| target.transport(e))?;
        Ok(Client { target, http })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The same connection pool and TLS set-up for `target` (a peer's URL
    /// and headers): its own TLS, proxy and timeout settings are not
    /// applied, this client's are.
    pub fn retarget(&self, target: Target) -> Client {
        Client {
            target,
            http: self.http.clone(),
        }
    }

    async fn start<T>(&self, req: &Request<T>) -> Result<reqwest::Response, Error> {
        let mut r = self
            .http
            .request(req.method.clone(), self.target.url(req))
            .headers(self.target.headers(req));
        if let Some(b) = &req.body {
            r = r.body(b.clone());
        }
        r.send().await.map_err(|e| self.target.transport(e))
    }

    /// Send `req`; its answer as the route's view, or the API's refusal.
    pub async fn send<T>(&self, req: Request<T>) -> Result<T, Error> {
        let reply = self.fetch(&req).await?;
        if !(200..300).contains(&reply.status) {
            return Err(refusal(reply.status, &reply.body));
        }
        read_answer(&req, &reply.body)
    }

    /// Send `req` and take whatever comes back.
    pub async fn fetch<T>(&self, req: &Request<T>) -> Result<Reply, Error> {
        let resp = self.start(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| self.target.transport(e))?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Send `req`; a successful answer's body is left to read as it comes.
    pub async fn open<T>(&self, req: Request<T>) -> Result<reqwest::Response, Error> {
        let resp = self.start(&req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| self.target.transport(e))?;
        Err(refusal(status, &body))
    }
}
