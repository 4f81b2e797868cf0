//! Security groups on the admin listener: the Trove-compatible extension
//! under `/v1.0/{tenant}/`, the native API under `/v1/tenants/{tenant}/`,
//! and the firewall under `/v1/firewall`.
//!
//! Every lookup is filtered by the tenant in the path: another tenant's group
//! or rule answers 404, as if it did not exist (Trove's show-by-instance did
//! not filter; this does). With `[security_groups] enabled = false` every
//! route here answers 404.
//!
//! Rule bodies are taken as JSON values and checked here, so that a wrong
//! type is a 400 naming the field, like every other invalid rule.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use cradle_registry::{Registry, RegistryError};
use cradle_secgroups::nft::{Firewall, Plan};
use cradle_secgroups::{GroupView, RuleRequest, RuleView};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::info;

use crate::{AdminState, ApiError, Caller, Json, run};

type Shared = State<Arc<AdminState>>;

pub fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        // Trove-compatible.
        .route("/v1.0/{tenant}/security-groups", get(trove_list))
        .route("/v1.0/{tenant}/security-groups/{id}", get(trove_show))
        .route("/v1.0/{tenant}/security-group-rules", post(trove_add_rule))
        .route(
            "/v1.0/{tenant}/security-group-rules/{id}",
            delete(delete_rule),
        )
        // Native.
        .route(
            "/v1/tenants/{tenant}/security-groups",
            get(list).post(create),
        )
        .route(
            "/v1/tenants/{tenant}/security-groups/{id}",
            get(show).patch(update).delete(remove),
        )
        .route(
            "/v1/tenants/{tenant}/security-groups/{id}/rules",
            get(rules).post(add_rule),
        )
        .route(
            "/v1/tenants/{tenant}/security-groups/{id}/instances/{instance}",
            put(attach).delete(detach),
        )
        .route(
            "/v1/tenants/{tenant}/security-group-rules/{id}",
            delete(delete_rule),
        )
        .route(
            "/v1/tenants/{tenant}/default-rules",
            get(defaults).post(add_default),
        )
        .route(
            "/v1/tenants/{tenant}/default-rules/{id}",
            delete(delete_default),
        )
        .route("/v1/instances/{key}/security-groups", get(instance_groups))
        .route("/v1/firewall", get(firewall_show))
        .route("/v1/firewall/apply", post(firewall_apply))
}

fn bad_body(e: serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid",
        format!(
            "the rule does not fit: {}",
            crate::error::describe_json_error(&e)
        ),
    )
}

fn rule_request(body: Value) -> Result<RuleRequest, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = bad_body(e.into_inner());
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

/// Run a registry change off the async threads; 204 when it succeeds.
async fn no_content(
    s: &AdminState,
    change: impl FnOnce(&Registry) -> Result<(), RegistryError> + Send + 'static,
) -> Result<StatusCode, ApiError> {
    let registry = s.registry.clone();
    run(move || change(&registry)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- native -------------------------------------------------------------

async fn list(State(s): Shared, Path(tenant): Path<String>) -> Result<Response, ApiError> {
    let groups = s.registry.sg_list(&tenant)?;
    Ok(axum::Json(json!({ "security_groups": groups })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroup {
    name: String,
    #[serde(default)]
    description: String,
}

async fn create(
    State(s): Shared,
    Path(tenant): Path<String>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let g: NewGroup = serde_json::from_value(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "a group is {{\"name\", \"description\"}}: {}",
                crate::error::describe_json_error(&e)
            ),
        )
    })?;
    let registry = s.registry.clone();
    let view = run(move || registry.sg_create(&tenant, &g.name, &g.description)).await?;
    info!(group = %view.id, tenant = %view.tenant, "security group created");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "security_group": view })),
    )
        .into_response())
}

async fn show(
    State(s): Shared,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let g = s.registry.sg_show(&tenant, &id)?;
    Ok(axum::Json(json!({ "security_group": g })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupPatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

async fn update(
    State(s): Shared,
    Path((tenant, id)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let p: GroupPatch = serde_json::from_value(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "a group change is {{\"name\", \"description\"}}: {}",
                crate::error::describe_json_error(&e)
            ),
        )
    })?;
    let registry = s.registry.clone();
    let view =
        run(move || registry.sg_update(&tenant, &id, p.name.as_deref(), p.description.as_deref()))
            .await?;
    Ok(axum::Json(json!({ "security_group": view })).into_response())
}

async fn remove(
    State(s): Shared,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    no_content(&s, move |r| r.sg_delete(&tenant, &id)).await
}

async fn rules(
    State(s): Shared,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let g = s.registry.sg_show(&tenant, &id)?;
    Ok(axum::Json(json!({ "security_group_rules": g.rules })).into_response())
}

async fn add_rule(
    State(s): Shared,
    Path((tenant, id)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let rule = rule_request(body)?;
    let registry = s.registry.clone();
    let view = run(move || registry.sg_add_rule(&tenant, &id, &rule)).await?;
    info!(rule = %view.id, "security group rule added");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "security_group_rule": view })),
    )
        .into_response())
}

async fn delete_rule(
    State(s): Shared,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    no_content(&s, move |r| r.sg_delete_rule(&tenant, &id)).await
}

async fn attach(
    State(s): Shared,
    Path((tenant, id, instance)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    no_content(&s, move |r| r.sg_attach(&tenant, &id, &instance)).await
}

async fn detach(
    State(s): Shared,
    Path((tenant, id, instance)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    no_content(&s, move |r| r.sg_detach(&tenant, &id, &instance)).await
}

async fn defaults(State(s): Shared, Path(tenant): Path<String>) -> Result<Response, ApiError> {
    let rules = s.registry.sg_defaults(&tenant)?;
    Ok(axum::Json(json!({ "default_rules": rules })).into_response())
}

async fn add_default(
    State(s): Shared,
    Path(tenant): Path<String>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let rule = rule_request(body)?;
    let registry = s.registry.clone();
    let view = run(move || registry.sg_add_default(&tenant, &rule)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "default_rule": view })),
    )
        .into_response())
}

async fn delete_default(
    State(s): Shared,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    no_content(&s, move |r| r.sg_delete_default(&tenant, &id)).await
}

async fn instance_groups(State(s): Shared, Path(key): Path<String>) -> Result<Response, ApiError> {
    let groups = s.registry.sg_instance_groups(&key)?;
    Ok(axum::Json(json!({ "security_groups": groups })).into_response())
}

// ---- firewall -------------------------------------------------------------

/// The whole table as it would be applied now. A plan serializes straight
/// to the `{"nftables": [...]}` document, several times faster than going
/// through a `Value` (seconds for 10,000 instances), on a blocking thread.
async fn ruleset(s: &Arc<AdminState>) -> Result<Plan, ApiError> {
    if !s.registry.security_groups_enabled() {
        return Err(ApiError::not_found(
            "no such route (security groups are disabled)",
        ));
    }
    let (registry, table) = (s.registry.clone(), s.firewall_table.clone());
    tokio::task::spawn_blocking(move || {
        let (instances, groups) = registry.firewall_desired();
        Firewall::new(table).plan_full(instances, &groups)
    })
    .await
    .map_err(|_| ApiError::internal())
}

#[derive(Serialize)]
struct Shown<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    enforced: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dirty: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<bool>,
    ruleset: &'a Plan,
}

async fn firewall_show(State(s): Shared) -> Result<Response, ApiError> {
    let ruleset = ruleset(&s).await?;
    Ok(axum::Json(Shown {
        enforced: Some(s.firewall_enforced),
        dirty: Some(s.registry.firewall_dirty()),
        table: Some(&s.firewall_table),
        applied: None,
        ruleset: &ruleset,
    })
    .into_response())
}

fn applied(applied: bool, ruleset: &Plan) -> Response {
    axum::Json(Shown {
        enforced: None,
        dirty: None,
        table: None,
        applied: Some(applied),
        ruleset,
    })
    .into_response()
}

async fn firewall_apply(
    State(s): Shared,
    axum::Extension(caller): axum::Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
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
    let ruleset = ruleset(&s).await?;
    if dry_run {
        return Ok(applied(false, &ruleset));
    }
    if !caller.roles.iter().any(|r| r == crate::ADMIN_ROLE) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "applying the firewall needs the admin role",
        ));
    }
    if !s.firewall_enforced {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "firewall_off",
            "the firewall is off ([firewall] enabled = false); use --dry-run to see the ruleset",
        ));
    }
    let registry = s.registry.clone();
    run(move || registry.enforce_all()).await?;
    info!(by = %caller.name, "firewall re-applied");
    Ok(applied(true, &ruleset))
}

// ---- Trove-compatible ---------------------------------------------------

/// A group as Trove shows it.
fn trove_group(g: &GroupView) -> Value {
    json!({
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "instance_id": g.instance_id,
        "rules": g.rules.iter().map(trove_rule).collect::<Vec<_>>(),
        "links": [],
        "created": g.created_at.format(&time::format_description::well_known::Rfc3339).ok(),
        "updated": g.created_at.format(&time::format_description::well_known::Rfc3339).ok(),
    })
}

/// A rule as Trove shows it: ICMP type and code in the port fields, as Nova
/// and Trove put them.
fn trove_rule(r: &RuleView) -> Value {
    let q = &r.rule;
    let (from, to) = match (q.from_port, q.icmp_type) {
        (Some(_), _) => (q.from_port, q.to_port),
        (None, Some(t)) => (Some(t), Some(q.icmp_code.unwrap_or(-1))),
        (None, None) => (None, None),
    };
    json!({
        "id": r.id,
        "group_id": r.group_id,
        "security_group_id": r.group_id,
        "direction": q.direction,
        "ethertype": q.ethertype,
        "protocol": q.protocol,
        "from_port": from,
        "to_port": to,
        "cidr": q.cidr,
        "remote_group_id": q.remote_group_id,
        "created": r.created_at.format(&time::format_description::well_known::Rfc3339).ok(),
    })
}

async fn trove_list(State(s): Shared, Path(tenant): Path<String>) -> Result<Response, ApiError> {
    let groups = s.registry.sg_list(&tenant)?;
    let groups: Vec<Value> = groups.iter().map(trove_group).collect();
    Ok(axum::Json(json!({ "security_groups": groups })).into_response())
}

async fn trove_show(
    State(s): Shared,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let g = s.registry.sg_show(&tenant, &id)?;
    Ok(axum::Json(json!({ "security_group": trove_group(&g) })).into_response())
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
async fn trove_add_rule(
    State(s): Shared,
    Path(tenant): Path<String>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
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
    let registry = s.registry.clone();
    let view = run(move || registry.sg_add_rule(&tenant, &group, &request)).await?;
    info!(rule = %view.id, "security group rule added (trove API)");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "security_group_rule": [trove_rule(&view)] })),
    )
        .into_response())
}
