//! Every route of the admin API, once: a function per route that builds
//! its [`Request`]. Keys (instance ids or names, tenants, group and rule
//! ids) are percent-encoded as one path segment each, so a name can hold
//! anything.

use std::time::Duration;

use cradle_model::agent::{ActionRequest, ActionView};
use cradle_model::answers::{
    CallerView, ClusterView, EventList, EventView, FirewallApplied, FirewallView, InstanceList,
    MessageList, MessageQueued, MigrateRequest, MigrationPrepare, MigrationTarget, VmView,
};
use cradle_model::api::{InstancePatch, InstanceSpec, InstanceView, MessageIn, MessageView};
use cradle_model::job::JobView;
use cradle_secgroups::api::{
    DefaultRules, GroupPatch, GroupRequest, Groups, OneDefaultRule, OneGroup, OneRule, Rules,
    TroveGroup, TroveRule, TroveRuleRequest,
};
use cradle_secgroups::{GroupView, RuleRequest, RuleView};
use http::Method;
use serde::de::DeserializeOwned;

use crate::Request;
use crate::body::{self, to_vec};

/// Percent-encode `s` as one path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn json<T: DeserializeOwned>(b: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(b)
}

fn nothing(_: &[u8]) -> Result<(), serde_json::Error> {
    Ok(())
}

fn bytes(b: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    Ok(b.to_vec())
}

fn text(b: &[u8]) -> Result<String, serde_json::Error> {
    Ok(String::from_utf8_lossy(b).into_owned())
}

fn instance_path(key: &str) -> String {
    format!("/v1/instances/{}", encode(key))
}

fn of_instance(key: &str, what: &str) -> String {
    format!("/v1/instances/{}/{what}", encode(key))
}

fn tenant_path(tenant: &str, rest: &str) -> String {
    format!("/v1/tenants/{}/{rest}", encode(tenant))
}

fn group_path(tenant: &str, group: &str) -> String {
    tenant_path(tenant, &format!("security-groups/{}", encode(group)))
}

fn trove_path(tenant: &str, rest: &str) -> String {
    format!("/v1.0/{}/{rest}", encode(tenant))
}

// ---- instances ----------------------------------------------------------

/// `GET /v1/instances`: every instance, oldest first.
pub fn instances() -> Request<Vec<InstanceView>> {
    Request::new(Method::GET, "/v1/instances".into(), |b| {
        json::<InstanceList>(b).map(|l| l.instances)
    })
}

/// `POST /v1/instances`: register an instance (201).
pub fn create_instance(spec: &InstanceSpec) -> Request<InstanceView> {
    Request::new(Method::POST, "/v1/instances".into(), json)
        .json(body::instance_spec(spec))
        .enforced()
}

/// `GET /v1/instances/{key}`: by id or name.
pub fn instance(key: &str) -> Request<InstanceView> {
    Request::new(Method::GET, instance_path(key), json)
}

/// `PATCH /v1/instances/{key}`: only what the patch says changes.
pub fn modify_instance(key: &str, patch: &InstancePatch) -> Request<InstanceView> {
    Request::new(Method::PATCH, instance_path(key), json)
        .json(body::instance_patch(patch))
        .enforced()
}

/// `DELETE /v1/instances/{key}` (204).
pub fn remove_instance(key: &str) -> Request<()> {
    Request::new(Method::DELETE, instance_path(key), nothing).enforced()
}

/// `POST /v1/instances/{key}/reset-state`: clear an error (admin role).
pub fn reset_state(key: &str) -> Request<InstanceView> {
    Request::new(Method::POST, of_instance(key, "reset-state"), json).json(b"{}".to_vec())
}

/// `GET /v1/instances/{key}/events`, oldest first.
pub fn events(key: &str) -> Request<Vec<EventView>> {
    Request::new(Method::GET, of_instance(key, "events"), |b| {
        json::<EventList>(b).map(|l| l.events)
    })
}

/// `POST /v1/instances/{key}/maintenance` (201): schedule a maintenance event.
pub fn schedule_maintenance(
    key: &str,
    request: &cradle_model::maintenance::MaintenanceRequest,
) -> Request<cradle_model::maintenance::MaintenanceEvent> {
    Request::new(Method::POST, of_instance(key, "maintenance"), json).json(to_vec(request))
}

/// `GET /v1/instances/{key}/maintenance`, in scheduling order.
pub fn maintenance(key: &str) -> Request<Vec<cradle_model::maintenance::MaintenanceEvent>> {
    Request::new(Method::GET, of_instance(key, "maintenance"), |b| {
        json::<cradle_model::answers::MaintenanceList>(b).map(|l| l.maintenance)
    })
}

/// `POST /v1/instances/{key}/maintenance/{event}/cancel`.
pub fn cancel_maintenance(
    key: &str,
    event: &str,
) -> Request<cradle_model::maintenance::MaintenanceEvent> {
    Request::new(
        Method::POST,
        of_instance(key, &format!("maintenance/{}/cancel", encode(event))),
        json,
    )
    .json(b"{}".to_vec())
}

/// `POST /v1/instances/{key}/messages` (202): the queued message's id.
pub fn send_message(key: &str, message: &MessageIn) -> Request<i64> {
    Request::new(Method::POST, of_instance(key, "messages"), |b| {
        json::<MessageQueued>(b).map(|q| q.id)
    })
    .json(to_vec(message))
}

/// `GET /v1/instances/{key}/messages`: take every message the guest wrote.
pub fn receive_messages(key: &str) -> Request<Vec<MessageView>> {
    Request::new(Method::GET, of_instance(key, "messages"), |b| {
        json::<MessageList>(b).map(|l| l.messages)
    })
}

/// `GET /v1/instances/{key}/config-drive?format=iso9660|vfat`: the image.
pub fn config_drive(key: &str, format: Option<&str>) -> Request<Vec<u8>> {
    let r = Request::new(Method::GET, of_instance(key, "config-drive"), bytes);
    match format {
        Some(f) => r.query("format", f),
        None => r,
    }
}

/// `GET /v1/instances/{key}/personalization`: the package, fetched now by
/// the server (its SHA-256 in [`crate::SHA256_HEADER`]).
pub fn personalization_package(key: &str) -> Request<Vec<u8>> {
    Request::new(Method::GET, of_instance(key, "personalization"), bytes)
}

/// `GET /v1/instances/{key}/security-groups`: its groups, its own first.
pub fn instance_groups(key: &str) -> Request<Vec<GroupView>> {
    Request::new(Method::GET, of_instance(key, "security-groups"), |b| {
        json::<Groups<GroupView>>(b).map(|g| g.security_groups)
    })
}

// ---- install jobs and run mode -------------------------------------------

/// `POST /v1/instances/{key}/install` (202): start an install job.
pub fn start_install(key: &str) -> Request<JobView> {
    Request::new(Method::POST, of_instance(key, "install"), json).json(b"{}".to_vec())
}

/// `GET /v1/instances/{key}/install?after=N&wait=S`: the last job, with the
/// events after `after`, waiting up to `wait` for news while it runs.
pub fn install_job(key: &str, after: u64, wait: Duration) -> Request<JobView> {
    Request::new(Method::GET, of_instance(key, "install"), json)
        .query("after", after)
        .query("wait", wait.as_secs())
}

/// `POST /v1/instances/{key}/export?disk=N`: run the OS's export; the
/// answer is the dump (read it with `open_stream`; its job id is in
/// `X-Cradle-Job`), and then the job says whether it was whole.
pub fn export(key: &str, disk: usize) -> Request<()> {
    Request::new(Method::POST, of_instance(key, "export"), |_| Ok(()))
        .query("disk", disk)
        .json(b"{}".to_vec())
}

/// `POST /v1/instances/{key}/import?disk=N&sha256=HEX` (202), the dump as
/// the body (send it with `upload`).
pub fn import(key: &str, disk: usize, sha256: &str) -> Request<JobView> {
    Request::new(Method::POST, of_instance(key, "import"), json)
        .query("disk", disk)
        .query("sha256", sha256)
}

/// `POST /v1/instances/{key}/rename`: through the OS's rename script when
/// it has one (then `job` is set, and the name changes when it succeeds).
pub fn rename(key: &str, name: &str) -> Request<cradle_model::answers::RenameView> {
    let body = serde_json::json!({ "name": name });
    Request::new(Method::POST, of_instance(key, "rename"), json).json(to_vec(&body))
}

/// `POST /v1/instances/{key}/start`: boot its VM (run mode).
pub fn start_vm(key: &str) -> Request<InstanceView> {
    Request::new(Method::POST, of_instance(key, "start"), json).json(b"{}".to_vec())
}

/// `POST /v1/instances/{key}/stop?force=…&grace=…`.
pub fn stop_vm(key: &str, force: bool, grace: Duration) -> Request<InstanceView> {
    Request::new(Method::POST, of_instance(key, "stop"), json)
        .query("force", force)
        .query("grace", grace.as_secs())
        .json(b"{}".to_vec())
}

/// `POST /v1/instances/{key}/migrate`: move it to another host. The answer
/// is a stream of [`cradle_model::answers::MigrationProgress`] lines (read
/// it with `open`).
pub fn migrate(key: &str, to: &MigrateRequest) -> Request<()> {
    Request::new(Method::POST, of_instance(key, "migrate"), |_| Ok(())).json(to_vec(to))
}

/// `POST /v1/migrations` on a peer: where an arriving instance's disks go.
pub fn prepare_migration(req: &MigrationPrepare) -> Request<MigrationTarget> {
    Request::new(Method::POST, "/v1/migrations".into(), json).json(to_vec(req))
}

/// `POST /v1/instances/{key}/actions` (202): send an action to the
/// instance's guest agent.
pub fn send_action(key: &str, action: &str) -> Request<ActionView> {
    let body = ActionRequest {
        action: action.to_string(),
    };
    Request::new(Method::POST, of_instance(key, "actions"), json).json(to_vec(&body))
}

/// `GET /v1/instances/{key}/actions/{id}?wait=SECONDS`: the action, once
/// the agent has answered or `wait` has passed.
pub fn action(key: &str, id: uuid::Uuid, wait: Duration) -> Request<ActionView> {
    Request::new(
        Method::GET,
        of_instance(key, &format!("actions/{id}")),
        json,
    )
    .query("wait", wait.as_secs())
}

/// `GET /v1/instances/{key}/vm`: its state and what QEMU says.
pub fn vm_status(key: &str) -> Request<VmView> {
    Request::new(Method::GET, of_instance(key, "vm"), json)
}

/// `GET /v1/instances/{key}/console?bytes=N`: the end of its serial console.
pub fn console(key: &str, bytes_from_end: u64) -> Request<Vec<u8>> {
    Request::new(Method::GET, of_instance(key, "console"), bytes).query("bytes", bytes_from_end)
}

/// `GET /v1/whoami`: the presented token's name, roles and projects.
pub fn whoami() -> Request<CallerView> {
    Request::new(Method::GET, "/v1/whoami".into(), json)
}

/// `GET /v1/cluster`: the hosts of the cluster (operators only).
pub fn cluster() -> Request<ClusterView> {
    Request::new(Method::GET, "/v1/cluster".into(), json)
}

/// `GET /metrics`: Prometheus' text exposition.
pub fn metrics() -> Request<String> {
    Request::new(Method::GET, "/metrics".into(), text)
}

// ---- identity -----------------------------------------------------------

/// `GET /v1/identity/certificate`: the PEM certificates that verify
/// identity documents, the current key's first.
pub fn identity_certificate() -> Request<String> {
    Request::new(Method::GET, "/v1/identity/certificate".into(), text)
}

/// `GET /v1/identity/jwks.json`: the JWKS that verifies identity tokens.
pub fn identity_jwks() -> Request<serde_json::Value> {
    Request::new(Method::GET, "/v1/identity/jwks.json".into(), json)
}

// ---- security groups (native) -------------------------------------------

/// `GET /v1/tenants/{tenant}/security-groups`.
pub fn security_groups(tenant: &str) -> Request<Vec<GroupView>> {
    Request::new(Method::GET, tenant_path(tenant, "security-groups"), |b| {
        json::<Groups<GroupView>>(b).map(|g| g.security_groups)
    })
}

/// `POST /v1/tenants/{tenant}/security-groups` (201).
pub fn create_security_group(tenant: &str, group: &GroupRequest) -> Request<GroupView> {
    Request::new(Method::POST, tenant_path(tenant, "security-groups"), |b| {
        json::<OneGroup<GroupView>>(b).map(|g| g.security_group)
    })
    .json(to_vec(group))
    .enforced()
}

/// `GET /v1/tenants/{tenant}/security-groups/{group}`: by group id or
/// instance id.
pub fn security_group(tenant: &str, group: &str) -> Request<GroupView> {
    Request::new(Method::GET, group_path(tenant, group), |b| {
        json::<OneGroup<GroupView>>(b).map(|g| g.security_group)
    })
}

/// `PATCH /v1/tenants/{tenant}/security-groups/{group}`.
pub fn update_security_group(tenant: &str, group: &str, patch: &GroupPatch) -> Request<GroupView> {
    Request::new(Method::PATCH, group_path(tenant, group), |b| {
        json::<OneGroup<GroupView>>(b).map(|g| g.security_group)
    })
    .json(to_vec(patch))
}

/// `DELETE /v1/tenants/{tenant}/security-groups/{group}` (204).
pub fn delete_security_group(tenant: &str, group: &str) -> Request<()> {
    Request::new(Method::DELETE, group_path(tenant, group), nothing).enforced()
}

/// `GET /v1/tenants/{tenant}/security-groups/{group}/rules`.
pub fn group_rules(tenant: &str, group: &str) -> Request<Vec<RuleView>> {
    Request::new(
        Method::GET,
        format!("{}/rules", group_path(tenant, group)),
        |b| json::<Rules>(b).map(|r| r.security_group_rules),
    )
}

/// `POST /v1/tenants/{tenant}/security-groups/{group}/rules` (201).
pub fn add_rule(tenant: &str, group: &str, rule: &RuleRequest) -> Request<RuleView> {
    Request::new(
        Method::POST,
        format!("{}/rules", group_path(tenant, group)),
        |b| json::<OneRule<RuleView>>(b).map(|r| r.security_group_rule),
    )
    .json(to_vec(rule))
    .enforced()
}

/// `DELETE /v1/tenants/{tenant}/security-group-rules/{id}` (204).
pub fn delete_rule(tenant: &str, id: &str) -> Request<()> {
    Request::new(
        Method::DELETE,
        tenant_path(tenant, &format!("security-group-rules/{}", encode(id))),
        nothing,
    )
    .enforced()
}

fn membership(tenant: &str, group: &str, instance: &str) -> String {
    format!(
        "{}/instances/{}",
        group_path(tenant, group),
        encode(instance)
    )
}

/// `PUT /v1/tenants/{tenant}/security-groups/{group}/instances/{instance}` (204).
pub fn attach_group(tenant: &str, group: &str, instance: &str) -> Request<()> {
    Request::new(Method::PUT, membership(tenant, group, instance), nothing).enforced()
}

/// `DELETE /v1/tenants/{tenant}/security-groups/{group}/instances/{instance}` (204).
pub fn detach_group(tenant: &str, group: &str, instance: &str) -> Request<()> {
    Request::new(Method::DELETE, membership(tenant, group, instance), nothing).enforced()
}

/// `GET /v1/tenants/{tenant}/default-rules`.
pub fn default_rules(tenant: &str) -> Request<Vec<RuleView>> {
    Request::new(Method::GET, tenant_path(tenant, "default-rules"), |b| {
        json::<DefaultRules>(b).map(|r| r.default_rules)
    })
}

/// `POST /v1/tenants/{tenant}/default-rules` (201).
pub fn add_default_rule(tenant: &str, rule: &RuleRequest) -> Request<RuleView> {
    Request::new(Method::POST, tenant_path(tenant, "default-rules"), |b| {
        json::<OneDefaultRule>(b).map(|r| r.default_rule)
    })
    .json(to_vec(rule))
    .enforced()
}

/// `DELETE /v1/tenants/{tenant}/default-rules/{id}` (204).
pub fn delete_default_rule(tenant: &str, id: &str) -> Request<()> {
    Request::new(
        Method::DELETE,
        tenant_path(tenant, &format!("default-rules/{}", encode(id))),
        nothing,
    )
    .enforced()
}

// ---- security groups (Trove-compatible) ---------------------------------

/// `GET /v1.0/{tenant}/security-groups`.
pub fn trove_security_groups(tenant: &str) -> Request<Vec<TroveGroup>> {
    Request::new(Method::GET, trove_path(tenant, "security-groups"), |b| {
        json::<Groups<TroveGroup>>(b).map(|g| g.security_groups)
    })
}

/// `GET /v1.0/{tenant}/security-groups/{id}`.
pub fn trove_security_group(tenant: &str, id: &str) -> Request<TroveGroup> {
    Request::new(
        Method::GET,
        trove_path(tenant, &format!("security-groups/{}", encode(id))),
        |b| json::<OneGroup<TroveGroup>>(b).map(|g| g.security_group),
    )
}

/// `POST /v1.0/{tenant}/security-group-rules` (201): the rule, as a list of
/// one, as Trove answers.
pub fn trove_add_rule(tenant: &str, rule: &TroveRuleRequest) -> Request<Vec<TroveRule>> {
    Request::new(
        Method::POST,
        trove_path(tenant, "security-group-rules"),
        |b| json::<OneRule<Vec<TroveRule>>>(b).map(|r| r.security_group_rule),
    )
    .json(to_vec(&OneRule {
        security_group_rule: rule,
    }))
}

/// `DELETE /v1.0/{tenant}/security-group-rules/{id}` (204).
pub fn trove_delete_rule(tenant: &str, id: &str) -> Request<()> {
    Request::new(
        Method::DELETE,
        trove_path(tenant, &format!("security-group-rules/{}", encode(id))),
        nothing,
    )
}

// ---- firewall -----------------------------------------------------------

/// `GET /v1/firewall`: the ruleset (nft's text) and where enforcement
/// stands.
pub fn firewall() -> Request<FirewallView> {
    Request::new(Method::GET, "/v1/firewall".into(), json)
}

/// `POST /v1/firewall/apply[?dry_run=true]`: re-apply the whole ruleset
/// (admin role), or with `dry_run` only show it.
pub fn apply_firewall(dry_run: bool) -> Request<FirewallApplied> {
    let r = Request::new(Method::POST, "/v1/firewall/apply".into(), json).json(b"{}".to_vec());
    if dry_run { r.query("dry_run", true) } else { r }
}

// ---- for tests ----------------------------------------------------------

/// A request the functions above cannot make (a path the API does not
/// have, another method on one it has, a path no key encodes to: `%FF` is
/// not UTF-8), for tests of how the API answers those. Every route the API
/// has is a function above.
pub fn unlisted(method: Method, path: &str) -> Request<serde_json::Value> {
    Request::new(method, path.to_string(), json)
}
