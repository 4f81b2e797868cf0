//! `POST /v1/instances/{key}/install` starts an install job;
//! `GET /v1/instances/{key}/install?after=N&wait=S` shows the instance's
//! last job with the events after `after`, waiting up to `wait` seconds
//! (at most 60) for something new while it runs: what
//! `cradle instance install --follow` polls.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cradle_install::StartError;
use serde::Deserialize;

use crate::{ADMIN_ROLE, AdminState, ApiError, Caller, Key};

/// Longest a follow request waits for news.
const MAX_WAIT: u64 = 60;

fn installer(s: &AdminState) -> Result<&Arc<cradle_install::Installer>, ApiError> {
    s.installer.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "install_unavailable",
            "this server runs no install jobs",
        )
    })
}

pub async fn start(
    State(s): State<Arc<AdminState>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Key(key): Key,
) -> Result<impl IntoResponse, ApiError> {
    let installer = installer(&s)?;
    let instance = s.registry.get(&key)?;
    // The server would read a file:// package with its own rights.
    if instance
        .personalization_url
        .as_deref()
        .is_some_and(|u| u.starts_with("file://"))
        && !caller.has(ADMIN_ROLE)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("installing with a file:// package needs the {ADMIN_ROLE:?} role"),
        ));
    }
    let job = installer.start(&key).await.map_err(|e| match e {
        StartError::Unavailable(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "install_unavailable", m)
        }
        other => start_error(other),
    })?;
    Ok((StatusCode::ACCEPTED, axum::Json(job.view(0))))
}

#[derive(Deserialize)]
pub struct Follow {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait: u64,
}

pub async fn show(
    State(s): State<Arc<AdminState>>,
    Key(key): Key,
    Query(f): Query<Follow>,
) -> Result<impl IntoResponse, ApiError> {
    let instance = s.registry.get(&key)?;
    let Some(job) = s.registry.install_job(instance.id) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_install_job",
            format!(
                "instance {} has no install job since the server started",
                instance.name
            ),
        ));
    };
    let mut changed = job.subscribe();
    let wait = Duration::from_secs(f.wait.min(MAX_WAIT));
    let until = tokio::time::Instant::now() + wait;
    loop {
        changed.borrow_and_update();
        let view = job.view(f.after);
        if !view.events.is_empty() || view.state != "running" || wait.is_zero() {
            return Ok(axum::Json(view));
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Ok(axum::Json(job.view(f.after))) },
            _ = tokio::time::sleep_until(until) => return Ok(axum::Json(job.view(f.after))),
        }
    }
}

fn start_error(e: StartError) -> ApiError {
    match e {
        StartError::Registry(r) => ApiError::from(r),
        StartError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
        StartError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "vm", m),
    }
}

/// `POST /v1/instances/{key}/start`: boot its VM in run mode.
pub async fn start_vm(
    State(s): State<Arc<AdminState>>,
    Key(key): Key,
) -> Result<impl IntoResponse, ApiError> {
    let i = installer(&s)?.start_vm(&key).await.map_err(start_error)?;
    Ok(axum::Json(cradle_model::api::InstanceView::from(&*i)))
}

#[derive(Deserialize)]
pub struct StopQuery {
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
pub async fn stop_vm(
    State(s): State<Arc<AdminState>>,
    Key(key): Key,
    Query(q): Query<StopQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let i = installer(&s)?
        .stop_vm(&key, q.force, Duration::from_secs(q.grace.min(3600)))
        .await
        .map_err(start_error)?;
    Ok(axum::Json(cradle_model::api::InstanceView::from(&*i)))
}

/// `GET /v1/instances/{key}/vm`: the instance's state and what QEMU says.
pub async fn vm_status(
    State(s): State<Arc<AdminState>>,
    Key(key): Key,
) -> Result<impl IntoResponse, ApiError> {
    let i = s.registry.get(&key)?;
    let vm = installer(&s)?.vm_status(&key).await.map_err(start_error)?;
    let vm = match vm {
        cradle_hypervisor::Status::Stopped => "stopped".to_string(),
        cradle_hypervisor::Status::Running => "running".to_string(),
        cradle_hypervisor::Status::Paused => "paused".to_string(),
        cradle_hypervisor::Status::Other(o) => o,
    };
    Ok(axum::Json(serde_json::json!({
        "instance": i.name,
        "state": i.state.as_str(),
        "vm": vm,
    })))
}

#[derive(Deserialize)]
pub struct ConsoleQuery {
    /// Bytes from the end (default 64 KiB, at most 16 MiB).
    #[serde(default = "default_console")]
    bytes: u64,
}

fn default_console() -> u64 {
    64 * 1024
}

/// `GET /v1/instances/{key}/console?bytes=N`: the end of its serial console.
pub async fn console(
    State(s): State<Arc<AdminState>>,
    Key(key): Key,
    Query(q): Query<ConsoleQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let bytes = installer(&s)?
        .console(&key, q.bytes.min(16 << 20))
        .await
        .map_err(start_error)?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        bytes,
    ))
}
