//! The admin API's OpenAPI 3.1 document, generated from the handlers'
//! own declarations (`#[utoipa::path]` beside each one, `ToSchema` on the
//! bodies), served at `GET /v1/openapi.json` and committed as
//! docs/openapi.json (`cargo xtask openapi`; CI fails when they differ).

use axum::extract::State;
use axum::response::IntoResponse;
use cradle_model::api::ErrorBody;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, SecurityRequirement};
use utoipa::{Modify, OpenApi};

use crate::Shared;

/// The error answers a route may give: `{"error": {"code", "message"}}`
/// (docs/admin-api.md lists which code goes with which status).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Errors {
    /// Malformed JSON, path or query.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No valid bearer token.
    #[response(
        status = 401,
        headers(("WWW-Authenticate" = String, description = "Bearer"))
    )]
    Unauthorized(ErrorBody),
    /// The token lacks the role, or does not act for the tenant or project.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such object (or one of a project the token does not act for).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The route exists with another method.
    #[response(status = 405)]
    MethodNotAllowed(ErrorBody),
    /// A name, address or rule that is taken, or a state that forbids it.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is too large.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Well-formed, but refused: the message names the field.
    #[response(status = 422)]
    Invalid(ErrorBody),
    /// The guest's queue is full.
    #[response(status = 429)]
    TooMany(ErrorBody),
    /// A failure of cradle itself.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// Storage, the hypervisor or an upstream is unavailable.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// The disk holding the store is full (named): nothing was changed.
    #[response(status = 507)]
    Full(ErrorBody),
}

/// The bearer token every route needs, also as OpenStack clients send it.
struct Auth;

impl Modify for Auth {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "x_auth_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Auth-Token"))),
        );
        doc.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("x_auth_token", Vec::<String>::new()),
        ]);
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cradle admin API",
        description = "The operator's API of cradle: instances, their channel, config drives, \
                       installs, run mode, security groups (native and Trove-compatible) and the \
                       firewall. See docs/admin-api.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&Auth),
    components(schemas(ErrorBody, cradle_model::api::ErrorDetail)),
    tags(
        (name = "instances", description = "Instances, the channel, events, drives, packages"),
        (name = "install", description = "Install jobs and run mode"),
        (name = "agent", description = "The guest agent: actions sent to it"),
        (name = "maintenance", description = "Maintenance events: scheduled reboots and stops"),
        (name = "security-groups", description = "Security groups, rules and default rules"),
        (name = "trove", description = "The Trove-compatible security-group extension"),
        (name = "firewall", description = "The nftables ruleset that enforces them"),
        (name = "identity", description = "The public keys that verify guests' signed identity documents and tokens"),
    )
)]
pub struct Base;

#[utoipa::path(
    operation_id = "openapi_document",
    get,
    path = "/v1/openapi.json",
    tag = "instances",
    summary = "This document",
    responses((status = 200, description = "The OpenAPI document", body = Object), Errors)
)]
pub async fn document(State(_): Shared) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::document_json(),
    )
}

/// A view that flattens a request type in (`RuleView` holds a
/// `RuleRequest`) becomes `allOf` that type's schema and its own fields;
/// the request's `additionalProperties: false` (it refuses unknown fields)
/// would then refuse the view's own. Inline those parts, open.
pub fn open_flattened(doc: &mut serde_json::Value) {
    let Some(schemas) = doc
        .pointer("/components/schemas")
        .and_then(serde_json::Value::as_object)
        .cloned()
    else {
        return;
    };
    open_in(doc, &schemas);
}

fn open_in(v: &mut serde_json::Value, schemas: &serde_json::Map<String, serde_json::Value>) {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            if let Some(Value::Array(parts)) = o.get_mut("allOf") {
                for part in parts.iter_mut() {
                    let referenced = part
                        .get("$ref")
                        .and_then(Value::as_str)
                        .and_then(|r| r.strip_prefix("#/components/schemas/"))
                        .and_then(|name| schemas.get(name));
                    if let Some(Value::Object(inner)) = referenced
                        && inner.get("additionalProperties") == Some(&Value::Bool(false))
                    {
                        let mut open = inner.clone();
                        open.remove("additionalProperties");
                        *part = Value::Object(open);
                    }
                }
            }
            for child in o.values_mut() {
                open_in(child, schemas);
            }
        }
        Value::Array(items) => {
            for child in items {
                open_in(child, schemas);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    /// docs/openapi.json is what the code generates: `cargo xtask openapi`
    /// writes it after a change to a route or a body.
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crate::document_json(),
            "docs/openapi.json differs from what the code generates; run `cargo xtask openapi`"
        );
    }
}
