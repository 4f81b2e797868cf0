//! Security groups on the admin listener: the Trove-compatible extension
//! under `/v1.0/{tenant}/`, the native API under `/v1/tenants/{tenant}/`,
//! and the firewall under `/v1/firewall`.
//!
//! Every operation names the tenant from the path; another tenant's group
//! or rule answers 404, as if it did not exist (Trove's show-by-instance did
//! not filter; this does). With `[security_groups] enabled = false` every
//! route here answers 404.
//!
//! Rule bodies are taken as JSON values and checked here, so that a wrong
//! type is a 400 naming the field, like every other invalid rule.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cradle_core::Caller;
use cradle_model::answers::{FirewallApplied, FirewallView};
use cradle_secgroups::api::{
    DefaultRules, GroupPatch, GroupRequest, Groups, OneDefaultRule, OneGroup, OneRule, Rules,
    TroveGroup, TroveRule, TroveRuleRequest,
};
use cradle_secgroups::{GroupView, RuleRequest, RuleView};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::{Json, Params};
use crate::{AdminState, ApiError, Shared};

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        // Trove-compatible.
        .routes(routes!(trove_list))
        .routes(routes!(trove_show))
        .routes(routes!(trove_add_rule))
        .routes(routes!(trove_delete_rule))
        // Native.
        .routes(routes!(list, create))
        .routes(routes!(show, update, remove))
        .routes(routes!(rules, add_rule))
        .routes(routes!(attach, detach))
        .routes(routes!(delete_rule))
        .routes(routes!(defaults, add_default))
        .routes(routes!(delete_default))
        .routes(routes!(instance_groups))
        .routes(routes!(firewall_show))
        .routes(routes!(firewall_apply))
}

fn rule_request(body: Value) -> Result<RuleRequest, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = invalid_body("the rule does not fit", e.into_inner());
        match path.as_str() {
            "" | "." => inner,
            _ => ApiError::new(
                inner.status,
                inner.code,
                format!("{path}: {}", inner.message),
            ),
        }
    })
}

fn invalid_body(what: &str, e: serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid",
        format!("{what}: {}", crate::error::describe_json_error(&e)),
    )
}

// ---- native -------------------------------------------------------------

#[utoipa::path(
    operation_id = "sg_list",
    get,
    path = "/v1/tenants/{tenant}/security-groups",
    tag = "security-groups",
    summary = "The tenant's groups",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups")),
    responses((status = 200, description = "The groups", body = Groups<GroupView>), crate::openapi::Errors)
)]
async fn list(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(tenant): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    let security_groups = s.core.security_groups(&caller, &tenant)?;
    Ok(axum::Json(Groups { security_groups }))
}

#[utoipa::path(
    operation_id = "sg_create",
    post,
    path = "/v1/tenants/{tenant}/security-groups",
    tag = "security-groups",
    summary = "Create a shared group",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups")),
    request_body = GroupRequest,
    responses((status = 201, description = "Created", body = OneGroup<GroupView>), crate::openapi::Errors)
)]
async fn create(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(tenant): Params<String>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let g: GroupRequest = serde_json::from_value(body)
        .map_err(|e| invalid_body("a group is {\"name\", \"description\"}", e))?;
    let security_group = s
        .core
        .create_security_group(&caller, &tenant, g.name, g.description)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(OneGroup { security_group })))
}

#[utoipa::path(
    operation_id = "sg_show",
    get,
    path = "/v1/tenants/{tenant}/security-groups/{id}",
    tag = "security-groups",
    summary = "One group",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The group: its id, or the id of the instance whose own group it is")),
    responses((status = 200, description = "The group", body = OneGroup<GroupView>), crate::openapi::Errors)
)]
async fn show(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id)): Params<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let security_group = s.core.security_group(&caller, &tenant, &id)?;
    Ok(axum::Json(OneGroup { security_group }))
}

#[utoipa::path(
    operation_id = "sg_update",
    patch,
    path = "/v1/tenants/{tenant}/security-groups/{id}",
    tag = "security-groups",
    summary = "Rename a group or change its description",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The group: its id, or the id of the instance whose own group it is")),
    request_body = GroupPatch,
    responses((status = 200, description = "Changed", body = OneGroup<GroupView>), crate::openapi::Errors)
)]
async fn update(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id)): Params<(String, String)>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let p: GroupPatch = serde_json::from_value(body)
        .map_err(|e| invalid_body("a group change is {\"name\", \"description\"}", e))?;
    let security_group = s
        .core
        .update_security_group(&caller, &tenant, &id, p.name, p.description)
        .await?;
    Ok(axum::Json(OneGroup { security_group }))
}

#[utoipa::path(
    operation_id = "sg_remove",
    delete,
    path = "/v1/tenants/{tenant}/security-groups/{id}",
    tag = "security-groups",
    summary = "Delete a shared group",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The group: its id, or the id of the instance whose own group it is")),
    responses((status = 204, description = "Deleted"), crate::openapi::Errors)
)]
async fn remove(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id)): Params<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_security_group(&caller, &tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    operation_id = "sg_rules",
    get,
    path = "/v1/tenants/{tenant}/security-groups/{id}/rules",
    tag = "security-groups",
    summary = "A group's rules",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The group: its id, or the id of the instance whose own group it is")),
    responses((status = 200, description = "The rules", body = Rules), crate::openapi::Errors)
)]
async fn rules(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id)): Params<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let g = s.core.security_group(&caller, &tenant, &id)?;
    Ok(axum::Json(Rules {
        security_group_rules: g.rules,
    }))
}

#[utoipa::path(
    operation_id = "sg_add_rule",
    post,
    path = "/v1/tenants/{tenant}/security-groups/{id}/rules",
    tag = "security-groups",
    summary = "Add a rule to a group",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The group: its id, or the id of the instance whose own group it is")),
    request_body = RuleRequest,
    responses((status = 201, description = "Added", body = OneRule<RuleView>), crate::openapi::Errors)
)]
async fn add_rule(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id)): Params<(String, String)>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let rule = rule_request(body)?;
    let security_group_rule = s.core.add_rule(&caller, &tenant, &id, rule).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(OneRule {
            security_group_rule,
        }),
    ))
}

#[utoipa::path(
    operation_id = "sg_delete_rule",
    delete,
    path = "/v1/tenants/{tenant}/security-group-rules/{id}",
    tag = "security-groups",
    summary = "Delete a rule",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The rule's id")),
    responses((status = 204, description = "Deleted"), crate::openapi::Errors)
)]
async fn delete_rule(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id)): Params<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_rule(&caller, &tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    operation_id = "sg_trove_delete_rule",
    delete,
    path = "/v1.0/{tenant}/security-group-rules/{id}",
    tag = "trove",
    summary = "Delete a rule (Trove)",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The rule's id")),
    responses((status = 204, description = "Deleted"), crate::openapi::Errors)
)]
async fn trove_delete_rule(
    state: Shared,
    caller: Extension<Caller>,
    params: Params<(String, String)>,
) -> Result<StatusCode, ApiError> {
    delete_rule(state, caller, params).await
}

#[utoipa::path(
    operation_id = "sg_attach",
    put,
    path = "/v1/tenants/{tenant}/security-groups/{id}/instances/{instance}",
    tag = "security-groups",
    summary = "Put one of the tenant's instances in a group",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The group: its id, or the id of the instance whose own group it is"), ("instance" = String, Path, description = "The instance: its id or its name")),
    responses((status = 204, description = "Attached"), crate::openapi::Errors)
)]
async fn attach(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id, instance)): Params<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core
        .attach_group(&caller, &tenant, &id, &instance)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    operation_id = "sg_detach",
    delete,
    path = "/v1/tenants/{tenant}/security-groups/{id}/instances/{instance}",
    tag = "security-groups",
    summary = "Take an instance out of a group",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The group: its id, or the id of the instance whose own group it is"), ("instance" = String, Path, description = "The instance: its id or its name")),
    responses((status = 204, description = "Detached"), crate::openapi::Errors)
)]
async fn detach(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id, instance)): Params<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core
        .detach_group(&caller, &tenant, &id, &instance)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    operation_id = "sg_defaults",
    get,
    path = "/v1/tenants/{tenant}/default-rules",
    tag = "security-groups",
    summary = "The rules every new instance of the tenant starts with",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups")),
    responses((status = 200, description = "The default rules", body = DefaultRules), crate::openapi::Errors)
)]
async fn defaults(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(tenant): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    let default_rules = s.core.default_rules(&caller, &tenant)?;
    Ok(axum::Json(DefaultRules { default_rules }))
}

#[utoipa::path(
    operation_id = "sg_add_default",
    post,
    path = "/v1/tenants/{tenant}/default-rules",
    tag = "security-groups",
    summary = "Add a default rule",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups")),
    request_body = RuleRequest,
    responses((status = 201, description = "Added", body = OneDefaultRule), crate::openapi::Errors)
)]
async fn add_default(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(tenant): Params<String>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let rule = rule_request(body)?;
    let default_rule = s.core.add_default_rule(&caller, &tenant, rule).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(OneDefaultRule { default_rule }),
    ))
}

#[utoipa::path(
    operation_id = "sg_delete_default",
    delete,
    path = "/v1/tenants/{tenant}/default-rules/{id}",
    tag = "security-groups",
    summary = "Delete a default rule",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The rule's id")),
    responses((status = 204, description = "Deleted"), crate::openapi::Errors)
)]
async fn delete_default(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id)): Params<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.core.delete_default_rule(&caller, &tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    operation_id = "sg_instance_groups",
    get,
    path = "/v1/instances/{key}/security-groups",
    tag = "security-groups",
    summary = "The groups an instance is in, its own first",
    params(("key" = String, Path, description = "The instance: its id or its name")),
    responses((status = 200, description = "The groups", body = Groups<GroupView>), crate::openapi::Errors)
)]
async fn instance_groups(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(key): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    let security_groups = s.core.instance_groups(&caller, &key)?;
    Ok(axum::Json(Groups { security_groups }))
}

// ---- firewall -------------------------------------------------------------

/// The whole table as it would be applied now, and where enforcement
/// stands.
#[utoipa::path(
    operation_id = "sg_firewall_show",
    get,
    path = "/v1/firewall",
    tag = "firewall",
    summary = "The nftables ruleset and where enforcement stands (a token acting for every project)",
    responses((status = 200, description = "The ruleset", body = FirewallView), crate::openapi::Errors)
)]
async fn firewall_show(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(s.core.firewall(&caller).await?))
}

#[utoipa::path(
    operation_id = "sg_firewall_apply",
    post,
    path = "/v1/firewall/apply",
    tag = "firewall",
    summary = "Re-apply the whole ruleset and wait until the kernel enforces it (admin role), or only show it",
    params(("dry_run" = Option<bool>, Query, description = "Apply nothing; answer the ruleset")),
    responses((status = 200, description = "Applied, or what would be", body = FirewallApplied), crate::openapi::Errors)
)]
async fn firewall_apply(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let mut dry_run = false;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        dry_run = match pair {
            "dry_run" | "dry_run=true" | "dry_run=1" => true,
            "dry_run=false" | "dry_run=0" => false,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query {other:?}; the one parameter is dry_run=true|false"
                )));
            }
        };
    }
    Ok(axum::Json(s.core.apply_firewall(&caller, dry_run).await?))
}

// ---- Trove-compatible ---------------------------------------------------

#[utoipa::path(
    operation_id = "sg_trove_list",
    get,
    path = "/v1.0/{tenant}/security-groups",
    tag = "trove",
    summary = "The tenant's groups (Trove)",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups")),
    responses((status = 200, description = "The groups", body = Groups<TroveGroup>), crate::openapi::Errors)
)]
async fn trove_list(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(tenant): Params<String>,
) -> Result<impl IntoResponse, ApiError> {
    let groups = s.core.security_groups(&caller, &tenant)?;
    let security_groups: Vec<TroveGroup> = groups.iter().map(TroveGroup::from).collect();
    Ok(axum::Json(Groups { security_groups }))
}

#[utoipa::path(
    operation_id = "sg_trove_show",
    get,
    path = "/v1.0/{tenant}/security-groups/{id}",
    tag = "trove",
    summary = "One group (Trove)",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups"), ("id" = String, Path, description = "The group: its id, or the id of the instance whose own group it is")),
    responses((status = 200, description = "The group", body = OneGroup<TroveGroup>), crate::openapi::Errors)
)]
async fn trove_show(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params((tenant, id)): Params<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let g = s.core.security_group(&caller, &tenant, &id)?;
    Ok(axum::Json(OneGroup {
        security_group: TroveGroup::from(&g),
    }))
}

/// A number or a numeric string, as Trove clients send either.
fn number(field: &str, v: &Value) -> Result<Option<i64>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_i64().map(Some).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("{field}: {n} is not a whole number"),
            )
        }),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => s.trim().parse().map(Some).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("{field}: {s:?} is not a whole number"),
            )
        }),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{field}: expected a number"),
        )),
    }
}

fn text(field: &str, v: &Value) -> Result<Option<String>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{field}: expected a string"),
        )),
    }
}

/// `{"security_group_rule": {"group_id", "cidr", "protocol", "from_port",
/// "to_port"}}`. Unlike Trove, protocol and ports are honoured; for ICMP the
/// ports are the type and code, `-1` meaning any.
#[utoipa::path(
    operation_id = "sg_trove_add_rule",
    post,
    path = "/v1.0/{tenant}/security-group-rules",
    tag = "trove",
    summary = "Add a rule (Trove)",
    params(("tenant" = String, Path, description = "The tenant (project) that owns the groups")),
    request_body = OneRule<TroveRuleRequest>,
    responses((status = 201, description = "Added", body = OneRule<Vec<TroveRule>>), crate::openapi::Errors)
)]
async fn trove_add_rule(
    State(s): Shared,
    Extension(caller): Extension<Caller>,
    Params(tenant): Params<String>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "invalid", m.to_string());
    let rule = body
        .get("security_group_rule")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("the body is {\"security_group_rule\": {\"group_id\", \"cidr\", …}}"))?;
    const KNOWN: &[&str] = &["group_id", "cidr", "protocol", "from_port", "to_port"];
    if let Some(k) = rule.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(&format!(
            "unknown field {k:?}; a rule has {}",
            KNOWN.join(", ")
        )));
    }
    let field = |k: &str| rule.get(k).unwrap_or(&Value::Null);
    let group = text("group_id", field("group_id"))?.ok_or_else(|| bad("group_id is required"))?;
    let protocol = text("protocol", field("protocol"))?;
    let from = number("from_port", field("from_port"))?;
    let to = number("to_port", field("to_port"))?;
    let is_icmp = protocol
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case("icmp") || p.eq_ignore_ascii_case("icmpv6"));
    let any = |v: Option<i64>| v.filter(|v| *v != -1);
    let request = RuleRequest {
        protocol,
        cidr: text("cidr", field("cidr"))?,
        from_port: if is_icmp { None } else { from },
        to_port: if is_icmp { None } else { to },
        icmp_type: if is_icmp { any(from) } else { None },
        icmp_code: if is_icmp { any(to) } else { None },
        ..RuleRequest::default()
    };
    let view = s.core.add_rule(&caller, &tenant, &group, request).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(OneRule {
            security_group_rule: vec![TroveRule::from(&view)],
        }),
    ))
}
