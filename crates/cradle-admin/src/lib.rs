//! The admin API: JSON under `/v1/`, behind a bearer token, on its own
//! listener. Handlers parse, call the [`Registry`], and shape the answer;
//! they hold no state of their own.
//!
//! Errors are `{"error": {"code", "message"}}` with a fitting 4xx. Request
//! bodies are never logged: they carry private and secret parameters.

#![forbid(unsafe_code)]

mod error;
mod install;
mod personalization;
mod secgroups;
mod tokens;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cradle_model::api::{InstancePatch, InstanceSpec, InstanceView, MessageIn, MessageView};
use cradle_registry::metrics::Metrics;
use cradle_registry::{ChannelDirection, Registry, RegistryError};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::info;

pub use error::ApiError;
pub use personalization::SHA256_HEADER;
pub use tokens::{ADMIN_ROLE, Caller, Tokens, token_hash};

/// What every handler shares.
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub tokens: Tokens,
    pub max_body_bytes: usize,
    /// Static vendordata, for config drives.
    pub vendor_data: Arc<serde_json::Value>,
    /// Dynamic vendordata, for config drives.
    pub vendordata: Arc<cradle_vendordata::Vendordata>,
    pub drive_limits: cradle_drive::Limits,
    /// Drives built at once: each may hold a whole image (64 MiB for vfat)
    /// in memory, so a burst of requests queues instead of exhausting it.
    pub drive_builds: tokio::sync::Semaphore,
    /// The nftables table security groups render into.
    pub firewall_table: String,
    /// Whether changes reach the kernel (`[firewall] enabled`).
    pub firewall_enforced: bool,
    /// Personalization packages fetched at once: each passes through a
    /// temporary file of up to the compressed cap.
    pub package_fetches: tokio::sync::Semaphore,
    /// Runs install jobs; `None` where the server runs none.
    pub installer: Option<Arc<cradle_install::Installer>>,
}

/// How many personalization packages are fetched at once.
pub const PACKAGE_FETCHES: usize = 4;

/// How many config drives are built at once.
pub const DRIVE_BUILDS: usize = 2;

type Shared = State<Arc<AdminState>>;

/// The admin router. Tests can drive it without a socket.
pub fn app(state: Arc<AdminState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/instances", get(list).post(create))
        .route(
            "/v1/instances/{key}",
            get(show).patch(modify).delete(remove),
        )
        .route("/v1/instances/{key}/messages", get(receive).post(send))
        .route("/v1/instances/{key}/config-drive", get(config_drive))
        .route(
            "/v1/instances/{key}/reset-state",
            axum::routing::post(reset_state),
        )
        .route("/v1/instances/{key}/events", get(events))
        .route(
            "/v1/instances/{key}/install",
            get(install::show).post(install::start),
        )
        .route(
            "/v1/instances/{key}/start",
            axum::routing::post(install::start_vm),
        )
        .route(
            "/v1/instances/{key}/stop",
            axum::routing::post(install::stop_vm),
        )
        .route("/v1/instances/{key}/vm", get(install::vm_status))
        .route("/v1/instances/{key}/console", get(install::console))
        .route(
            "/v1/instances/{key}/personalization",
            get(personalization::package),
        )
        .route("/metrics", get(metrics))
        .merge(secgroups::routes())
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serve the admin API until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn observe(State(s): Shared, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    s.metrics.observe("admin", status, elapsed.as_secs_f64());
    info!(%method, path = %path, status, latency_us = elapsed.as_micros() as u64, "admin request");
    response
}

async fn authenticate(State(s): Shared, mut req: Request, next: Next) -> Response {
    let caller = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        // OpenStack clients (python-troveclient) send the token this way.
        .or_else(|| {
            req.headers()
                .get("x-auth-token")
                .and_then(|v| v.to_str().ok())
        })
        .map(str::trim)
        .and_then(|t| s.tokens.authenticate(t));
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

/// A JSON body whose every failure is one of ours: 400 for malformed JSON,
/// 413 for too large, 422 for JSON that does not fit the request type.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = bytes::Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "the request body is too large",
                )
            } else {
                ApiError::bad_request("the request body could not be read")
            }
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        // The path names the field that did not fit ("os_params.secret.k"),
        // which serde_json's own message leaves out.
        let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Ok(v) => de.end().map(|()| v).map_err(|e| (String::new(), e)),
            Err(e) => Err((e.path().to_string(), e.into_inner())),
        };
        value.map(Json).map_err(|(path, e)| {
            use serde_json::error::Category;
            let described = error::describe_json_error(&e);
            match e.classify() {
                Category::Data if path.is_empty() || path == "." => {
                    ApiError::unprocessable(described)
                }
                Category::Data => ApiError::unprocessable(format!("{path}: {described}")),
                _ => ApiError::bad_request(format!("malformed JSON: {described}")),
            }
        })
    }
}

/// Path parameters as text, with a JSON error when they are not UTF-8.
pub struct Key(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Key {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| Key(p.0))
            .map_err(|_| {
                ApiError::bad_request("the instance id or name in the path is not valid UTF-8")
            })
    }
}

async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(ApiError::from)
}

fn view(i: &cradle_model::Instance) -> axum::Json<InstanceView> {
    axum::Json(InstanceView::from(i))
}

async fn list(State(s): Shared) -> impl IntoResponse {
    let all: Vec<InstanceView> = s
        .registry
        .list()
        .iter()
        .map(|i| InstanceView::from(&**i))
        .collect();
    axum::Json(json!({ "instances": all }))
}

async fn create(
    State(s): Shared,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(spec): Json<InstanceSpec>,
) -> Result<Response, ApiError> {
    let registry = s.registry.clone();
    let roles = caller.roles.clone();
    let created = run(move || registry.create(spec, roles)).await?;
    s.metrics.instances.set(s.registry.len() as i64);
    info!(instance = %created.id, name = %created.name, "instance registered");
    let mut r = (StatusCode::CREATED, view(&created)).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/instances/{}", created.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

async fn show(State(s): Shared, Key(key): Key) -> Result<impl IntoResponse, ApiError> {
    let instance = s.registry.get(&key)?;
    Ok(view(&instance))
}

async fn modify(
    State(s): Shared,
    Key(key): Key,
    Json(patch): Json<InstancePatch>,
) -> Result<impl IntoResponse, ApiError> {
    let registry = s.registry.clone();
    let changed = run(move || registry.modify(&key, patch)).await?;
    info!(instance = %changed.id, "instance modified");
    Ok(view(&changed))
}

async fn remove(State(s): Shared, Key(key): Key) -> Result<StatusCode, ApiError> {
    let registry = s.registry.clone();
    let gone = run(move || registry.remove(&key)).await?;
    s.metrics.instances.set(s.registry.len() as i64);
    info!(instance = %gone.id, "instance removed");
    Ok(StatusCode::NO_CONTENT)
}

async fn send(
    State(s): Shared,
    Key(key): Key,
    Json(msg): Json<MessageIn>,
) -> Result<impl IntoResponse, ApiError> {
    let id = s.registry.get(&key)?.id;
    let body = msg.into_bytes()?;
    let registry = s.registry.clone();
    let n = run(move || registry.push_message(id, ChannelDirection::ToGuest, &body)).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(json!({ "id": n }))))
}

async fn receive(State(s): Shared, Key(key): Key) -> Result<impl IntoResponse, ApiError> {
    let id = s.registry.get(&key)?.id;
    let registry = s.registry.clone();
    let drained = run(move || registry.drain_messages(id, ChannelDirection::ToHost)).await?;
    let messages: Vec<MessageView> = drained
        .into_iter()
        .map(|m| MessageView {
            id: m.id,
            created_at: m.created_at,
            data: B64.encode(&m.body),
            text: String::from_utf8(m.body).ok(),
        })
        .collect();
    Ok(axum::Json(json!({ "messages": messages })))
}

/// Clear an instance's error state. Operators only.
async fn reset_state(
    State(s): Shared,
    axum::Extension(caller): axum::Extension<Caller>,
    Key(key): Key,
) -> Result<impl IntoResponse, ApiError> {
    if !caller.has(ADMIN_ROLE) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("resetting an instance's state needs the {ADMIN_ROLE:?} role"),
        ));
    }
    let registry = s.registry.clone();
    let by = caller.name.clone();
    let reset = run(move || registry.reset_state(&key, &by)).await?;
    info!(instance = %reset.id, by = %caller.name, "instance state reset");
    Ok(view(&reset))
}

async fn events(State(s): Shared, Key(key): Key) -> Result<impl IntoResponse, ApiError> {
    let registry = s.registry.clone();
    let events = run(move || registry.events(&key)).await?;
    let events: Vec<serde_json::Value> = events
        .into_iter()
        .map(|e| {
            json!({
                "id": e.id,
                "created_at": e.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                "kind": e.kind,
                "message": e.message,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "events": events })))
}

#[derive(serde::Deserialize)]
struct DriveQuery {
    format: Option<String>,
}

/// The instance's config drive, built now from the same renderer the
/// metadata service uses.
async fn config_drive(
    State(s): Shared,
    Key(key): Key,
    query: Result<axum::extract::Query<DriveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query.map_err(|_| ApiError::bad_request("the query string is malformed"))?;
    let format: cradle_drive::Format = query
        .0
        .format
        .as_deref()
        .unwrap_or("iso9660")
        .parse()
        .map_err(ApiError::bad_request)?;
    let instance = s.registry.get(&key)?;
    let dynamic = s.vendordata.fetch(&instance).await.map_err(|fatal| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "vendordata_failed",
            fatal.to_string(),
        )
    })?;
    let (vendor_data, limits) = (s.vendor_data.clone(), s.drive_limits);
    let _permit = s
        .drive_builds
        .acquire()
        .await
        .map_err(|_| ApiError::internal())?;
    let built = tokio::task::spawn_blocking(move || {
        let today = cradle_render::date(time::OffsetDateTime::now_utc());
        let ctx = cradle_render::Context::new(&today, &vendor_data).with_dynamic(&dynamic.entries);
        let mut image = Vec::new();
        cradle_drive::build(&instance, &ctx, format, limits, &mut image).map(|_| (image, instance))
    })
    .await
    .map_err(|_| ApiError::internal())?;
    let (image, instance) = built.map_err(|e| match e {
        cradle_drive::DriveError::TooLarge { .. } | cradle_drive::DriveError::VfatFull { .. } => {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "drive_too_large",
                e.to_string(),
            )
        }
        other => {
            tracing::error!(error = %other, "building a config drive failed");
            ApiError::internal()
        }
    })?;
    let (content_type, extension) = match format {
        cradle_drive::Format::Iso9660 => ("application/x-iso9660-image", "iso"),
        cradle_drive::Format::Vfat => ("application/octet-stream", "img"),
    };
    let disposition = format!(
        "attachment; filename=\"config-drive-{}.{extension}\"",
        instance.id
    );
    let mut r = (StatusCode::OK, image).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

async fn metrics(State(s): Shared) -> impl IntoResponse {
    s.metrics.instances.set(s.registry.len() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
