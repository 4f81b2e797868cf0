//! Export, import and rename: the OS definition's other operations.
//!
//! - `POST /v1/instances/{key}/export?disk=N` starts the export and
//!   answers the dump itself, streamed as the script prints it (the job's
//!   id in `X-Cradle-Job`). When the body ends, the client reads the job
//!   (`GET …/install`, the instance's last job of any operation) to learn
//!   whether it succeeded and the SHA-256 the host counted; a body cut
//!   short by a failed job is never a dump.
//! - `POST /v1/instances/{key}/import?disk=N&sha256=HEX` takes the dump
//!   as its body; the job starts (202) only once all of it is spooled and
//!   its SHA-256 is the one given.
//! - `POST /v1/instances/{key}/rename` with `{"name": NEW}`.

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cradle_core::Caller;
use cradle_model::answers::{JOB_HEADER, RenameView};
use cradle_model::job::JobView;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::{Json, Params, Query};
use crate::{AdminState, ApiError, Shared};

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(export))
        .routes(routes!(import))
        .routes(routes!(rename))
}

#[derive(Deserialize)]
struct ExportQuery {
    #[serde(default)]
    disk: usize,
}

#[utoipa::path(
    operation_id = "os_export",
    post,
    path = "/v1/instances/{key}/export",
    tag = "install",
    summary = "Run the OS's export and stream the dump it prints",
    params(("key" = String, Path, description = "The instance: its id or its name"), ("disk" = Option<usize>, Query, description = "The disk to export (0)")),
    responses(
        (status = 200, description = "The dump, as the export script prints it; then read the job for its outcome and SHA-256", content_type = "application/octet-stream", body = Vec<u8>),
        crate::openapi::Errors
    )
)]
async fn export(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let export = s.core.start_export(&caller, &key, q.disk).await?;
    let id = export.job.id;
    let changed = export.running.subscribe();
    let state = (export.source, changed, export.running);
    // The dump as it comes; when the job ends with chunks still unsent by
    // a sender that never finished, the body is cut with an error, so a
    // client cannot take it for a whole dump.
    let body = futures_util::stream::unfold(Some(state), |state| async move {
        use tokio::sync::mpsc::error::TryRecvError;
        let (mut rx, mut changed, job) = state?;
        let chunk = tokio::select! {
            chunk = rx.recv() => chunk,
            _ = changed.wait_for(|_| !job.is_running()) => match rx.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Disconnected) => None,
                Err(TryRecvError::Empty) => {
                    let cut = std::io::Error::other("the export job ended before its dump did");
                    return Some((Err(cut), None));
                }
            },
        };
        chunk.map(|c| (Ok(c), Some((rx, changed, job))))
    });
    let mut r = (StatusCode::OK, Body::from_stream(body)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        r.headers_mut().insert(JOB_HEADER, v);
    }
    Ok(r)
}

#[derive(Deserialize)]
struct ImportQuery {
    #[serde(default)]
    disk: usize,
    sha256: String,
}

#[utoipa::path(
    operation_id = "os_import",
    post,
    path = "/v1/instances/{key}/import",
    tag = "install",
    summary = "Import a dump: spooled and checked, then the OS's import runs",
    params(("key" = String, Path, description = "The instance: its id or its name"), ("disk" = Option<usize>, Query, description = "The disk to write (0)"), ("sha256" = String, Query, description = "The dump's SHA-256, as the export wrote it beside the dump")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The dump"),
    responses((status = 202, description = "Checked and started", body = JobView), crate::openapi::Errors)
)]
async fn import(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Query(q): Query<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let job = s
        .core
        .start_import(&caller, &key, q.disk, &q.sha256, length, body)
        .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(job)))
}

/// `POST /v1/instances/{key}/rename`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    /// The new name.
    pub name: String,
}

#[utoipa::path(
    operation_id = "os_rename",
    post,
    path = "/v1/instances/{key}/rename",
    tag = "install",
    summary = "Rename the instance, through its OS's rename script when it has one",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    request_body = RenameRequest,
    responses((status = 200, description = "Renamed, or its rename job started (`job`); the new name is taken when the job succeeds", body = RenameView), crate::openapi::Errors)
)]
async fn rename(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Json(req): Json<RenameRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.rename(&caller, &key, &req.name).await?))
}
