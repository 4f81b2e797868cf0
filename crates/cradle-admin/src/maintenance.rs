//! Maintenance events: `POST /v1/instances/{key}/maintenance` schedules
//! one, `GET` lists them, `POST …/maintenance/{event}/cancel` cancels one
//! that has not started. The host serving the instance runs them.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cradle_core::Caller;
use cradle_model::answers::MaintenanceList;
use cradle_model::maintenance::{MaintenanceEvent, MaintenanceRequest};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::{Json, Params};
use crate::{AdminState, ApiError, Shared};

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(list, schedule))
        .routes(routes!(cancel))
}

#[utoipa::path(
    operation_id = "maintenance_schedule",
    post,
    path = "/v1/instances/{key}/maintenance",
    tag = "maintenance",
    summary = "Schedule a maintenance event (reboot or stop) on the instance",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    request_body = MaintenanceRequest,
    responses((status = 201, description = "Scheduled", body = MaintenanceEvent), crate::openapi::Errors)
)]
async fn schedule(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Json(req): Json<MaintenanceRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let e = s.core.schedule_maintenance(&caller, &key, req).await?;
    Ok((StatusCode::CREATED, axum::Json(e)))
}

#[utoipa::path(
    operation_id = "maintenance_list",
    get,
    path = "/v1/instances/{key}/maintenance",
    tag = "maintenance",
    summary = "The instance's maintenance events, pending and recent, in scheduling order",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 200, description = "The events", body = MaintenanceList), crate::openapi::Errors)
)]
async fn list(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    let maintenance = s.core.maintenance_events(&caller, &key)?;
    Ok(axum::Json(MaintenanceList { maintenance }))
}

#[utoipa::path(
    operation_id = "maintenance_cancel",
    post,
    path = "/v1/instances/{key}/maintenance/{event}/cancel",
    tag = "maintenance",
    summary = "Cancel a maintenance event that has not started (409 once it has)",
    params(
        ("key" = String, Path, description = "The instance: its id or its name"),
        ("event" = String, Path, description = "The event's id (instance-event-…)")
    ),
    responses((status = 200, description = "Cancelled", body = MaintenanceEvent), crate::openapi::Errors)
)]
async fn cancel(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((key, event)): Params<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(
        s.core.cancel_maintenance(&caller, &key, &event).await?,
    ))
}
