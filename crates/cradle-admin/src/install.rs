//! Install jobs and run mode.
//!
//! `GET /v1/instances/{key}/install?after=N&wait=S` shows the instance's
//! last job with the events after `after`, waiting up to `wait` seconds
//! (at most 60) for something new while it runs: what `cradle instance
//! install --follow` polls.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cradle_core::{Caller, StopRequest};
use cradle_model::answers::VmView;
use cradle_model::api::InstanceView;
use cradle_model::job::JobView;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::{Params, Query};
use crate::{AdminState, ApiError, Shared};

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(show, start))
        .routes(routes!(start_vm))
        .routes(routes!(stop_vm))
        .routes(routes!(vm_status))
        .routes(routes!(console))
}

#[utoipa::path(
    operation_id = "install_start",
    post,
    path = "/v1/instances/{key}/install",
    tag = "install",
    summary = "Start an install job",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 202, description = "Started", body = JobView), crate::openapi::Errors)
)]
async fn start(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    let job = s.core.start_install(&caller, &key).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(job)))
}

#[derive(Deserialize)]
struct Follow {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait: u64,
}

#[utoipa::path(
    operation_id = "install_show",
    get,
    path = "/v1/instances/{key}/install",
    tag = "install",
    summary = "The last install job, waiting for news while it runs",
    params(("key" = String, Path, description = "The instance: its id or its name"), ("after" = Option<u64>, Query, description = "Events after this sequence number"), ("wait" = Option<u64>, Query, description = "Seconds to wait for something new (at most 60)")),
    responses((status = 200, description = "The job", body = JobView), crate::openapi::Errors)
)]
async fn show(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Query(f): Query<Follow>,
) -> Result<impl IntoResponse, ApiError> {
    let wait = Duration::from_secs(f.wait);
    Ok(axum::Json(
        s.core.install_job(&caller, &key, f.after, wait).await?,
    ))
}

/// `POST /v1/instances/{key}/start`: boot its VM in run mode.
#[utoipa::path(
    operation_id = "install_start_vm",
    post,
    path = "/v1/instances/{key}/start",
    tag = "install",
    summary = "Boot the instance's VM (run mode)",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 200, description = "Running", body = InstanceView), crate::openapi::Errors)
)]
pub(crate) async fn start_vm(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.start_vm(&caller, &key).await?))
}

#[derive(Deserialize)]
struct StopQuery {
    #[serde(default)]
    force: bool,
    /// Seconds the guest gets to power off after the ACPI request.
    #[serde(default = "default_grace")]
    grace: u64,
}

fn default_grace() -> u64 {
    60
}

/// `POST /v1/instances/{key}/stop?force=false&grace=60`.
#[utoipa::path(
    operation_id = "install_stop_vm",
    post,
    path = "/v1/instances/{key}/stop",
    tag = "install",
    summary = "Stop the instance's VM",
    params(("key" = String, Path, description = "The instance: its id or its name"), ("force" = Option<bool>, Query, description = "Kill it at once"), ("grace" = Option<u64>, Query, description = "Seconds to power off after the ACPI request (60)")),
    responses((status = 200, description = "Stopped", body = InstanceView), crate::openapi::Errors)
)]
async fn stop_vm(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Query(q): Query<StopQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let how = StopRequest {
        force: q.force,
        grace: Duration::from_secs(q.grace),
    };
    Ok(axum::Json(s.core.stop_vm(&caller, &key, how).await?))
}

/// `GET /v1/instances/{key}/vm`: the instance's state and what QEMU says.
#[utoipa::path(
    operation_id = "install_vm_status",
    get,
    path = "/v1/instances/{key}/vm",
    tag = "install",
    summary = "The instance's state and what QEMU says",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 200, description = "The VM", body = VmView), crate::openapi::Errors)
)]
async fn vm_status(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.vm_status(&caller, &key).await?))
}

#[derive(Deserialize)]
struct ConsoleQuery {
    /// Bytes from the end (default 64 KiB, at most 16 MiB).
    #[serde(default = "default_console")]
    bytes: u64,
}

fn default_console() -> u64 {
    64 * 1024
}

/// `GET /v1/instances/{key}/console?bytes=N`: the end of its serial console.
#[utoipa::path(
    operation_id = "install_console",
    get,
    path = "/v1/instances/{key}/console",
    tag = "install",
    summary = "The end of the serial console",
    params(("key" = String, Path, description = "The instance: its id or its name"), ("bytes" = Option<u64>, Query, description = "Bytes from the end (64 KiB; at most 16 MiB)")),
    responses((status = 200, description = "The console text", body = String, content_type = "text/plain"), crate::openapi::Errors)
)]
async fn console(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let bytes = s.core.console(&caller, &key, q.bytes).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        bytes,
    ))
}
