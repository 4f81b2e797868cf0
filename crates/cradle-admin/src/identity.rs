//! The public keys that verify what guests prove about themselves: the
//! certificates of their signed identity documents, the JWKS of their
//! identity tokens. Behind the bearer token like every route here (any
//! valid token; `authorize` lets every caller read public keys): the admin
//! API is an operator's listener, and relying parties are given the keys
//! by publishing `cradle identity jwks` and `cradle identity cert`.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use cradle_core::Caller;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{AdminState, ApiError, Shared};

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(certificate))
        .routes(routes!(jwks))
}

#[utoipa::path(
    operation_id = "identity_certificate",
    get,
    path = "/v1/identity/certificate",
    tag = "identity",
    summary = "The PEM certificates that verify identity documents: the current key's first, then those still inside their rotation overlap",
    responses((status = 200, description = "One or more PEM certificates", body = String, content_type = "application/x-pem-file"), crate::openapi::Errors)
)]
async fn certificate(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        s.core.identity_certificates(&caller)?,
    ))
}

#[utoipa::path(
    operation_id = "identity_jwks",
    get,
    path = "/v1/identity/jwks.json",
    tag = "identity",
    summary = "The JWKS that verifies identity tokens: every key of the set (RSA, RS256, use sig)",
    responses((status = 200, description = "A JSON Web Key Set (RFC 7517)", body = Object, content_type = "application/json"), crate::openapi::Errors)
)]
async fn jwks(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.identity_jwks(&caller)?))
}
