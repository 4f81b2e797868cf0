//! What the security-group routes take and answer, beside the views in
//! [`crate::model`]: the envelopes of the native API and the shapes of the
//! Trove-compatible one. The admin API writes them and the typed client
//! reads them, so both sides name the same fields.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::model::{GroupView, RuleView};

/// `POST /v1/tenants/{tenant}/security-groups`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// `PATCH /v1/tenants/{tenant}/security-groups/{id}`: what is given changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `{"security_groups": [...]}`, native or Trove.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Groups<G> {
    pub security_groups: Vec<G>,
}

/// `{"security_group": ...}`, native or Trove.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OneGroup<G> {
    pub security_group: G,
}

/// `{"security_group_rules": [...]}`: a group's rules.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rules {
    pub security_group_rules: Vec<RuleView>,
}

/// `{"security_group_rule": ...}`: a rule just added. Trove answers a
/// list of one.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OneRule<R> {
    pub security_group_rule: R,
}

/// `{"default_rules": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DefaultRules {
    pub default_rules: Vec<RuleView>,
}

/// `{"default_rule": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OneDefaultRule {
    pub default_rule: RuleView,
}

/// A group as Trove shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TroveGroup {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub instance_id: Option<Uuid>,
    pub rules: Vec<TroveRule>,
    #[schema(value_type = Vec<Object>)]
    pub links: Vec<serde_json::Value>,
    pub created: Option<String>,
    pub updated: Option<String>,
}

/// A rule as Trove shows it: ICMP type and code in the port fields, as Nova
/// and Trove put them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TroveRule {
    pub id: Uuid,
    pub group_id: Option<Uuid>,
    pub security_group_id: Option<Uuid>,
    pub direction: Option<String>,
    pub ethertype: Option<String>,
    pub protocol: Option<String>,
    pub from_port: Option<i64>,
    pub to_port: Option<i64>,
    pub cidr: Option<String>,
    pub remote_group_id: Option<String>,
    pub created: Option<String>,
}

fn rfc3339(t: OffsetDateTime) -> Option<String> {
    t.format(&Rfc3339).ok()
}

impl From<&GroupView> for TroveGroup {
    fn from(g: &GroupView) -> Self {
        TroveGroup {
            id: g.id,
            name: g.name.clone(),
            description: g.description.clone(),
            instance_id: g.instance_id,
            rules: g.rules.iter().map(TroveRule::from).collect(),
            links: Vec::new(),
            created: rfc3339(g.created_at),
            updated: rfc3339(g.created_at),
        }
    }
}

impl From<&RuleView> for TroveRule {
    fn from(r: &RuleView) -> Self {
        let q = &r.rule;
        let (from, to) = match (q.from_port, q.icmp_type) {
            (Some(_), _) => (q.from_port, q.to_port),
            (None, Some(t)) => (Some(t), Some(q.icmp_code.unwrap_or(-1))),
            (None, None) => (None, None),
        };
        TroveRule {
            id: r.id,
            group_id: r.group_id,
            security_group_id: r.group_id,
            direction: q.direction.clone(),
            ethertype: q.ethertype.clone(),
            protocol: q.protocol.clone(),
            from_port: from,
            to_port: to,
            cidr: q.cidr.clone(),
            remote_group_id: q.remote_group_id.clone(),
            created: rfc3339(r.created_at),
        }
    }
}

/// `POST /v1.0/{tenant}/security-group-rules`, as a client sends it (the
/// server also takes ports as numeric strings, as Trove clients send them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TroveRuleRequest {
    pub group_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<i64>,
}
