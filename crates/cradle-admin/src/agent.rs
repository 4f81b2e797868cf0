//! The guest agent's actions: `POST /v1/instances/{key}/actions` sends one
//! to the instance's agent; `GET /v1/instances/{key}/actions/{id}?wait=S`
//! shows it, waiting up to `wait` seconds (at most 60) for the agent's
//! answer: what `cradle instance run` polls.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cradle_core::Caller;
use cradle_model::agent::{ActionRequest, ActionView};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::{Json, Params, Query};
use crate::{AdminState, ApiError, Shared};

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(send))
        .routes(routes!(show))
}

#[utoipa::path(
    operation_id = "agent_send_action",
    post,
    path = "/v1/instances/{key}/actions",
    tag = "agent",
    summary = "Send an action to the instance's guest agent (on the host that serves it)",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    request_body = ActionRequest,
    responses((status = 202, description = "Queued for the agent", body = ActionView), crate::openapi::Errors)
)]
async fn send(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Json(req): Json<ActionRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let v = s.core.send_action(&caller, &key, req).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(v)))
}

#[derive(Deserialize)]
struct Wait {
    #[serde(default)]
    wait: u64,
}

#[utoipa::path(
    operation_id = "agent_show_action",
    get,
    path = "/v1/instances/{key}/actions/{id}",
    tag = "agent",
    summary = "An action sent to the agent, waiting for its answer",
    params(
        ("key" = String, Path, description = "The instance: its id or its name"),
        ("id" = String, Path, description = "The action's id"),
        ("wait" = Option<u64>, Query, description = "Seconds to wait for the agent's answer (at most 60)")
    ),
    responses((status = 200, description = "The action", body = ActionView), crate::openapi::Errors)
)]
async fn show(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((key, id)): Params<(String, uuid::Uuid)>,
    Query(q): Query<Wait>,
) -> Result<impl IntoResponse, ApiError> {
    let wait = Duration::from_secs(q.wait);
    Ok(axum::Json(s.core.action(&caller, &key, id, wait).await?))
}
