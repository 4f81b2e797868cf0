//! Instances, the channel, events, config drives, personalization packages,
//! metrics, and who the caller is.

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cradle_core::{Caller, DriveFormat};
use cradle_model::answers::{CallerView, ClusterView};
use cradle_model::answers::{
    EventList, InstanceList, MessageList, MessageQueued, PACKAGE_SHA256_HEADER,
};
use cradle_model::api::{InstancePatch, InstanceSpec, InstanceView, MessageIn};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::{Json, Params, Query};
use crate::{AdminState, ApiError, Shared};

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, modify, remove))
        .routes(routes!(receive, send))
        .routes(routes!(config_drive))
        .routes(routes!(reset_state))
        .routes(routes!(events))
        .routes(routes!(package))
        .routes(routes!(metrics))
        .routes(routes!(whoami))
        .routes(routes!(cluster))
}

#[utoipa::path(
    operation_id = "cluster_show",
    get,
    path = "/v1/cluster",
    tag = "instances",
    summary = "This host and every host of its cluster, with when each was last heard of (operators only)",
    responses((status = 200, description = "The cluster", body = ClusterView), crate::openapi::Errors)
)]
async fn cluster(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.cluster(&caller).await?))
}

#[utoipa::path(
    operation_id = "instances_whoami",
    get,
    path = "/v1/whoami",
    tag = "instances",
    summary = "Who the presented token is: name, roles, projects",
    responses((status = 200, description = "The caller", body = CallerView), crate::openapi::Errors)
)]
async fn whoami(State(s): Shared, Extension(caller): Extension<Caller>) -> impl IntoResponse {
    axum::Json(s.core.whoami(&caller))
}

#[utoipa::path(
    operation_id = "instances_list",
    get,
    path = "/v1/instances",
    tag = "instances",
    summary = "Every instance of the projects the token acts for, oldest first",
    responses((status = 200, description = "The instances", body = InstanceList), crate::openapi::Errors)
)]
async fn list(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    let instances = s.core.instances(&caller)?;
    Ok(axum::Json(InstanceList { instances }))
}

#[utoipa::path(
    operation_id = "instances_create",
    post,
    path = "/v1/instances",
    tag = "instances",
    summary = "Register an instance",
    request_body = InstanceSpec,
    responses(
        (status = 201, description = "Registered", body = InstanceView,
         headers(("Location" = String, description = "/v1/instances/{id} of the new instance"))),
        crate::openapi::Errors
    )
)]
pub(crate) async fn create(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Json(spec): Json<InstanceSpec>,
) -> Result<Response, ApiError> {
    let created = s.core.create_instance(&caller, spec).await?;
    let location = HeaderValue::from_str(&format!("/v1/instances/{}", created.id));
    let mut r = (StatusCode::CREATED, axum::Json(created)).into_response();
    if let Ok(loc) = location {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

#[utoipa::path(
    operation_id = "instances_show",
    get,
    path = "/v1/instances/{key}",
    tag = "instances",
    summary = "One instance",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 200, description = "The instance", body = InstanceView), crate::openapi::Errors)
)]
pub(crate) async fn show(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.instance(&caller, &key)?))
}

#[utoipa::path(
    operation_id = "instances_modify",
    patch,
    path = "/v1/instances/{key}",
    tag = "instances",
    summary = "Change an instance; nothing changes unless all of the patch is valid",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    request_body = InstancePatch,
    responses((status = 200, description = "Changed", body = InstanceView), crate::openapi::Errors)
)]
pub(crate) async fn modify(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Json(patch): Json<InstancePatch>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(
        s.core.modify_instance(&caller, &key, patch).await?,
    ))
}

#[utoipa::path(
    operation_id = "instances_remove",
    delete,
    path = "/v1/instances/{key}",
    tag = "instances",
    summary = "Remove an instance, its messages, secrets and last job",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 204, description = "Removed"), crate::openapi::Errors)
)]
async fn remove(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<StatusCode, ApiError> {
    s.core.remove_instance(&caller, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    operation_id = "instances_send",
    post,
    path = "/v1/instances/{key}/messages",
    tag = "instances",
    summary = "Queue a message for the guest",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    request_body = MessageIn,
    responses((status = 202, description = "Queued", body = MessageQueued), crate::openapi::Errors)
)]
async fn send(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Json(msg): Json<MessageIn>,
) -> Result<impl IntoResponse, ApiError> {
    let id = s.core.send_message(&caller, &key, msg).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(MessageQueued { id })))
}

#[utoipa::path(
    operation_id = "instances_receive",
    get,
    path = "/v1/instances/{key}/messages",
    tag = "instances",
    summary = "Take every message the guest wrote",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 200, description = "The messages, oldest first", body = MessageList), crate::openapi::Errors)
)]
async fn receive(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    let messages = s.core.receive_messages(&caller, &key).await?;
    Ok(axum::Json(MessageList { messages }))
}

#[utoipa::path(
    operation_id = "instances_reset_state",
    post,
    path = "/v1/instances/{key}/reset-state",
    tag = "instances",
    summary = "Clear an error state (admin role)",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 200, description = "Back to registered", body = InstanceView), crate::openapi::Errors)
)]
async fn reset_state(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.reset_state(&caller, &key).await?))
}

#[utoipa::path(
    operation_id = "instances_events",
    get,
    path = "/v1/instances/{key}/events",
    tag = "instances",
    summary = "What happened to the instance, oldest first",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 200, description = "The events", body = EventList), crate::openapi::Errors)
)]
async fn events(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    let events = s.core.events(&caller, &key).await?;
    Ok(axum::Json(EventList { events }))
}

#[derive(Deserialize)]
struct DriveQuery {
    format: Option<String>,
}

/// The instance's config drive, built now.
#[utoipa::path(
    operation_id = "instances_config_drive",
    get,
    path = "/v1/instances/{key}/config-drive",
    tag = "instances",
    summary = "The instance's config drive, built now",
    params(("key" = String, Path, description = "The instance: its id or its name"), ("format" = Option<String>, Query, description = "iso9660 (the default) or vfat")),
    responses((status = 200, description = "The image (vfat drives as application/octet-stream)", body = Vec<u8>, content_type = "application/x-iso9660-image"), crate::openapi::Errors)
)]
async fn config_drive(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
    Query(q): Query<DriveQuery>,
) -> Result<Response, ApiError> {
    let drive = s
        .core
        .config_drive(&caller, &key, q.format.as_deref())
        .await?;
    let (content_type, extension) = match drive.format {
        DriveFormat::Iso9660 => ("application/x-iso9660-image", "iso"),
        DriveFormat::Vfat => ("application/octet-stream", "img"),
    };
    let disposition = format!(
        "attachment; filename=\"config-drive-{}.{extension}\"",
        drive.instance
    );
    let mut r = (StatusCode::OK, drive.image).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// The instance's personalization package, fetched now by the server (its
/// credentials are secret parameters, which exist only in the server's
/// memory) and streamed from an anonymous file that goes with the response.
#[utoipa::path(
    operation_id = "instances_package",
    get,
    path = "/v1/instances/{key}/personalization",
    tag = "instances",
    summary = "The personalization package, fetched now with its credentials",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses(
        (status = 200, description = "The package", body = Vec<u8>, content_type = "application/gzip",
         headers(("X-Cradle-Package-Sha256" = String, description = "Its SHA-256, lower-case hex"))),
        crate::openapi::Errors
    )
)]
async fn package(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<Response, ApiError> {
    let p = s.core.personalization_package(&caller, &key).await?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(p.file));
    let mut r = (StatusCode::OK, Body::from_stream(stream)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(p.bytes));
    if let Ok(v) = HeaderValue::from_str(&p.sha256) {
        h.insert(PACKAGE_SHA256_HEADER, v);
    }
    Ok(r)
}

#[utoipa::path(
    operation_id = "instances_metrics",
    get,
    path = "/metrics",
    tag = "instances",
    summary = "Prometheus text exposition (a token acting for every project)",
    responses((status = 200, description = "The metrics", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"), crate::openapi::Errors)
)]
async fn metrics(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.core.metrics_text(&caller)?,
    ))
}
