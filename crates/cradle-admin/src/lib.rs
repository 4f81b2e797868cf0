//! The admin API: JSON under `/v1/`, behind a bearer token, on its own
//! listener. This crate authenticates the caller (its token), parses a
//! request, calls one operation of `cradle-core` and shapes its answer; it
//! holds no state and decides nothing about who may do what (the
//! operation does).
//!
//! Every failure is `{"error": {"code", "message"}}` with a fitting status,
//! rejections of paths, queries and bodies included. Request bodies are
//! never logged: they carry private and secret parameters.
//!
//! - `instances.rs`: instances, the channel, events, config drives,
//!   personalization packages, metrics.
//! - `install.rs`: install jobs and run mode.
//! - `os_jobs.rs`: export (the dump streamed as the answer), import (the
//!   dump as the body) and rename.
//! - `secgroups.rs`: security groups (native and Trove-compatible) and the
//!   firewall.
//! - `identity.rs`: the certificates and JWKS that verify guests' identity.
//! - `extract.rs`: the extractors whose every failure is one of ours.
//! - `tokens.rs`: who a bearer token belongs to.
//! - `openapi.rs`: the OpenAPI document, from the handlers' declarations.

#![forbid(unsafe_code)]

mod agent;
mod error;
mod extract;
mod identity;
mod install;
mod instances;
mod listen;
mod maintenance;
mod migrate;
mod openapi;
mod os_jobs;
mod peer;
mod secgroups;
mod tokens;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use cradle_core::Core;
use tokio::net::TcpListener;
use tracing::info;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;
pub use tokens::{Tokens, token_hash};

/// What every handler shares.
pub struct AdminState {
    pub core: Arc<Core>,
    pub tokens: Tokens,
    pub max_body_bytes: usize,
    /// Connection caps and the header deadline of both listeners.
    pub limits: Limits,
}

type Shared = State<Arc<AdminState>>;

/// Every route, and the OpenAPI document of them: one declaration per
/// handler (`#[utoipa::path]`) makes both, so neither can miss one.
fn api() -> (Router<Arc<AdminState>>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi;
    OpenApiRouter::with_openapi(openapi::Base::openapi())
        .routes(utoipa_axum::routes!(openapi::document))
        .merge(instances::routes())
        .merge(install::routes())
        .merge(os_jobs::routes())
        .merge(agent::routes())
        .merge(maintenance::routes())
        .merge(migrate::routes())
        .merge(identity::routes())
        .merge(secgroups::routes())
        .split_for_parts()
}

/// The OpenAPI 3.1 document of the admin API as pretty JSON, as `GET
/// /v1/openapi.json` serves it and docs/openapi.json holds it.
/// Built once: the handler serves the same text on every request.
pub fn document_json() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let mut doc = serde_json::to_value(api().1).expect("the document always serializes");
        openapi::open_flattened(&mut doc);
        let mut text = serde_json::to_string_pretty(&doc).expect("a value serializes");
        text.push('\n');
        text
    })
}

/// Every route of the admin router as (method, path), from the router's
/// own declarations, in a stable order. The isolation tests walk it, so
/// a route added later without a row fails them.
pub fn route_table() -> Vec<(String, String)> {
    let (_, doc) = api();
    let mut out = Vec::new();
    for (path, item) in doc.paths.paths {
        for (method, op) in [
            ("GET", &item.get),
            ("PUT", &item.put),
            ("POST", &item.post),
            ("DELETE", &item.delete),
            ("PATCH", &item.patch),
            ("HEAD", &item.head),
            ("OPTIONS", &item.options),
            ("TRACE", &item.trace),
        ] {
            if op.is_some() {
                out.push((method.to_string(), path.clone()));
            }
        }
    }
    out.sort();
    out
}

/// The admin router. Tests can drive it without a socket.
pub fn app(state: Arc<AdminState>) -> Router {
    let limit = state.max_body_bytes;
    let (routes, _) = api();
    routes
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            wait_for_firewall,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

pub use listen::Limits;
pub use peer::{serve_peers, server_tls};

/// Serve the admin API until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (limits, core) = (state.limits, state.core.clone());
    let plain = |tcp: tokio::net::TcpStream, _| async move { Some(tcp) };
    listen::serve("admin", listener, app(state), limits, core, plain, shutdown).await
}

async fn observe(State(s): Shared, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    s.core
        .metrics()
        .observe("admin", status, elapsed.as_secs_f64());
    info!(%method, path = %path, status, latency_us = elapsed.as_micros() as u64, "admin request");
    response
}

/// `?wait=true` on a write (any method but GET and HEAD): answer once the
/// firewall enforces every change handed to it by then, at most
/// `cradle_core::FIREWALL_WAIT`; the answer says which with
/// `Cradle-Firewall: enforced` or `pending`. The parameter is taken off
/// before the route sees the request. No lock is held while waiting.
async fn wait_for_firewall(State(s): Shared, mut req: Request, next: Next) -> Response {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let Some(query) = req.uri().query().filter(|_| write).map(String::from) else {
        return next.run(req).await;
    };
    let mut wait = false;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair {
            "wait" | "wait=true" | "wait=1" => wait = true,
            "wait=false" | "wait=0" => wait = false,
            p if p.starts_with("wait=") => {
                return ApiError::bad_request(format!("{p:?}: wait takes true or false"))
                    .into_response();
            }
            p => rest.push(p),
        }
    }
    let path = req.uri().path();
    let uri = if rest.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", rest.join("&"))
    };
    match uri.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return ApiError::bad_request("a malformed query").into_response(),
    }
    let mut response = next.run(req).await;
    if wait && response.status().is_success() {
        let enforced = s.core.wait_firewall(0).await;
        response.headers_mut().insert(
            "cradle-firewall",
            HeaderValue::from_static(if enforced { "enforced" } else { "pending" }),
        );
    }
    response
}

/// The bearer token, as `Authorization: Bearer …` or, as OpenStack clients
/// (python-troveclient) send it, `X-Auth-Token`.
fn presented(req: &Request) -> Option<String> {
    let h = req.headers();
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-auth-token").and_then(|v| v.to_str().ok()))
        .map(|t| t.trim().to_string())
}

async fn authenticate(State(s): Shared, mut req: Request, next: Next) -> Response {
    let caller = match presented(&req) {
        None => None,
        Some(token) => match s.tokens.main(&token) {
            Some(c) => Some(c),
            None if !s.tokens.has_file() => None,
            // A named token means looking at the tokens file (it is re-read
            // when it changes): file work, on the blocking pool.
            None => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.tokens.named(&token))
                    .await
                    .unwrap_or(None)
            }
        },
    };
    let Some(caller) = caller else {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
        .into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}
