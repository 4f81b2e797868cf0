//! `POST /v1/instances/{key}/migrate`: cold migration to another host, its
//! progress streamed as newline-delimited JSON while it runs; and, on the
//! peer listener, `POST /v1/migrations`, where the target says where the
//! disks go.
//!
//! The migration runs in its own task, so that a client that goes away
//! (Ctrl-C on the CLI) cannot cut it off mid-step: hyper drops the
//! response body as soon as it sees the connection closed, and the body
//! cancels the migration as it is dropped, which rolls back. (A failed
//! write of a progress line cancels it too; waiting for one alone left a
//! window at the end of a copy, when no line comes for a while.)

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cradle_core::Caller;
use cradle_model::answers::{MigrateRequest, MigrationPrepare, MigrationProgress};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::{Json, Params};
use crate::{AdminState, ApiError, Shared};

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new().routes(routes!(migrate))
}

#[utoipa::path(
    operation_id = "instances_migrate",
    post,
    path = "/v1/instances/{key}/migrate",
    tag = "instances",
    summary = "Move the instance to another host (operators only): checks, stop, copy, move, start; rolled back on any failure",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    request_body = MigrateRequest,
    responses(
        (status = 200, description = "Its progress, one JSON object a line, ending with step `done` or `failed`", body = MigrationProgress, content_type = "application/x-ndjson"),
        crate::openapi::Errors
    )
)]
async fn migrate(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Json(req): Json<MigrateRequest>,
) -> Result<Response, ApiError> {
    // Refusals before any work are plain errors; the rest is streamed.
    s.core.check_migration(&caller, &key, &req)?;
    let (mut writer, reader) = tokio::io::duplex(64 * 1024);
    let (lines, mut queued) = tokio::sync::mpsc::unbounded_channel::<MigrationProgress>();
    let cancel = CancellationToken::new();
    let report: cradle_core::migrate::Report = Arc::new(move |p| {
        let _ = lines.send(p);
    });
    let (core, stop, dropped) = (s.core.clone(), cancel.clone(), cancel.clone());
    let run = tokio::spawn(async move { core.migrate(&caller, &key, req, stop, report).await });
    // The writer: every line as it comes, then the outcome. A write that
    // fails means nobody reads any more: cancel.
    tokio::spawn(async move {
        let mut run = run;
        let outcome = loop {
            tokio::select! {
                Some(p) = queued.recv() => {
                    if write_line(&mut writer, &p).await.is_err() {
                        cancel.cancel();
                    }
                }
                done = &mut run => break done,
            }
        };
        while let Ok(p) = queued.try_recv() {
            let _ = write_line(&mut writer, &p).await;
        }
        let last = match outcome {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(MigrationProgress {
                code: Some(e.code().to_string()),
                ..MigrationProgress::new("failed", e.public_message())
            }),
            Err(e) => Some(MigrationProgress {
                code: Some("internal".into()),
                ..MigrationProgress::new("failed", format!("internal error: {e}"))
            }),
        };
        if let Some(last) = last {
            let _ = write_line(&mut writer, &last).await;
        }
        let _ = writer.shutdown().await;
    });
    let body = tokio_util::io::ReaderStream::new(CancelOnDrop {
        inner: reader,
        cancel: dropped,
    });
    let mut r = (StatusCode::OK, Body::from_stream(body)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}

/// The progress stream, which cancels the migration when hyper drops it
/// (the client went away). Once the migration has ended, cancelling
/// changes nothing: the stream ends only after it has.
struct CancelOnDrop {
    inner: tokio::io::DuplexStream,
    cancel: CancellationToken,
}

impl tokio::io::AsyncRead for CancelOnDrop {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn write_line(w: &mut tokio::io::DuplexStream, p: &MigrationProgress) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(p).expect("progress serializes");
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// Peer listener: an instance is about to arrive; where do its disks go?
pub(crate) async fn prepare(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    axum::Json(req): axum::Json<MigrationPrepare>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.prepare_migration(&caller, req).await?))
}
