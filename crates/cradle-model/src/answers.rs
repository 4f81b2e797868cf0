//! What the admin API answers besides an instance: lists, events, queued
//! messages, a VM's state and the firewall. The admin API builds them and
//! the typed client reads them, so the two cannot disagree on a field name.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::api::{InstanceView, MessageView};

/// The header a personalization package is served with (to operators and
/// to the install appliance): its SHA-256, lower-case hex.
pub const PACKAGE_SHA256_HEADER: &str = "x-cradle-package-sha256";
/// The SHA-256 of an import's dump, on the answer the appliance reads it from.
pub const STREAM_SHA256_HEADER: &str = "x-cradle-stream-sha256";
/// The job an export's answer (its dump) comes from.
pub const JOB_HEADER: &str = "x-cradle-job";

/// What a rename did: the instance after it, and the job that runs its
/// OS's `rename` script, if it has one (the name changes when the job
/// succeeds).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RenameView {
    pub instance: crate::api::InstanceView,
    #[serde(default)]
    pub job: Option<crate::job::JobView>,
}

/// The header every read of the metadata service's native namespace
/// carries (or else an IMDSv2 token), with [`METADATA_FLAVOR`] as its value:
/// a request whose only choice is the URL cannot add it.
pub const METADATA_FLAVOR_HEADER: &str = "metadata-flavor";

/// The value of [`METADATA_FLAVOR_HEADER`].
pub const METADATA_FLAVOR: &str = "cradle";

/// `GET /v1/whoami`: who the presented token is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallerView {
    pub name: String,
    pub roles: Vec<String>,
    /// Whether it acts for every project (the main token, the admin role).
    pub all_projects: bool,
    /// The projects it acts for, when not all.
    pub projects: Vec<String>,
}

/// `GET /v1/cluster`: this host and every host of its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// The host that answered.
    pub host: String,
    /// `sqlite` (one host) or `postgres` (a cluster).
    pub store: String,
    pub hosts: Vec<HostView>,
}

/// A host, as it last recorded itself in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostView {
    pub name: String,
    pub admin_url: String,
    /// Empty when it has no peer listener.
    pub peer_url: String,
    pub metadata_address: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub seen_at: time::OffsetDateTime,
    /// Heard of within the last minute.
    pub up: bool,
    /// Instances placed on it.
    pub instances: usize,
}

/// `POST /v1/instances/{key}/migrate`: where to, and over what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The host to move it to.
    pub to: String,
    /// `ssh` or `rsync`; left out, `[remote] transport`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Seconds the guest gets to power off before it is killed (at most
    /// 3600); left out, 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<u64>,
}

/// One line of a migration's answer (newline-delimited JSON): each step as
/// it starts, copy progress, then `done` (with the instance) or `failed`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationProgress {
    /// `check`, `stop`, `copy`, `move`, `start`, `done`, `failed` or
    /// `rollback`.
    pub step: String,
    pub message: String,
    /// The disk being copied, and its bytes done of total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// On `failed`: the error's code, as the admin API's error bodies say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// On `done`: the instance where it now is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<Box<crate::api::InstanceView>>,
}

impl MigrationProgress {
    /// A line of `step` saying `message`, with nothing else set.
    pub fn new(step: &str, message: impl Into<String>) -> MigrationProgress {
        MigrationProgress {
            step: step.into(),
            message: message.into(),
            disk: None,
            done: None,
            total: None,
            code: None,
            instance: None,
        }
    }
}

/// A host asks the target of a migration where its disks go (peer API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPrepare {
    pub instance: uuid::Uuid,
    /// Each disk's file name and the bytes it occupies (sparse files: only
    /// what is allocated).
    pub disks: Vec<(String, u64)>,
}

/// The target's answer: where to copy to, and the paths the disks get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationTarget {
    pub ssh_address: String,
    pub dir: String,
    pub paths: Vec<String>,
}

/// `GET /v1/instances`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceList {
    pub instances: Vec<InstanceView>,
}

/// `POST /v1/instances/{key}/messages`: the queued message's id.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageQueued {
    pub id: i64,
}

/// `GET /v1/instances/{key}/messages`: every message the guest wrote, now
/// taken off its queue.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageList {
    pub messages: Vec<MessageView>,
}

/// Something that happened to an instance.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventView {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub kind: String,
    pub message: String,
}

/// `GET /v1/instances/{key}/events`, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventList {
    pub events: Vec<EventView>,
}

/// `GET /v1/instances/{key}/vm`: the instance's state and what QEMU says of
/// its VM (`stopped`, `running`, `paused`, or QEMU's own word).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmView {
    pub instance: String,
    pub state: String,
    pub vm: String,
}

/// `GET /v1/firewall`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FirewallView {
    /// Whether changes reach the kernel (`[firewall] enabled`).
    pub enforced: bool,
    /// Whether the last transaction failed (the worker retries with a full
    /// apply).
    pub dirty: bool,
    pub table: String,
    /// The number of the last change handed to the firewall.
    pub wanted_generation: u64,
    /// The number of the last change the kernel enforces: equal to
    /// `wanted_generation` when nothing is pending.
    pub applied_generation: u64,
    /// Why the last transaction failed, while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Elements in the table.
    pub elements: u64,
    /// The whole table in nft's language, as `nft -f` takes it (the table
    /// is replaced when loaded by hand).
    pub ruleset: String,
}

/// `POST /v1/firewall/apply[?dry_run=true]`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FirewallApplied {
    /// False for a dry run.
    pub applied: bool,
    /// False when the apply did not take within the wait (see `GET
    /// /v1/firewall` for why).
    #[serde(default = "yes")]
    pub enforced: bool,
    /// What would be applied, for a dry run (in nft's language).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ruleset: Option<String>,
}

fn yes() -> bool {
    true
}

/// `GET /v1/instances/{key}/maintenance`: its maintenance events, pending
/// and recent, in scheduling order.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MaintenanceList {
    pub maintenance: Vec<crate::maintenance::MaintenanceEvent>,
}
