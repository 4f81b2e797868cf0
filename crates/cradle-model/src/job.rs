//! An install job as the admin API shows it: its state, the appliance's
//! final status and its events. The job itself (what the appliance is
//! served, the scrubbing) lives in the registry; these are only its views.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// What an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The installer's own steps (booting the appliance, the timeout, …).
    Job,
    /// A step the agent reports.
    Progress,
    /// A line an untrusted script wrote (inside the appliance).
    Log,
    /// A line a trusted script wrote (on the host).
    Trusted,
    /// The agent's final status.
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobEvent {
    pub seq: u64,
    /// Milliseconds since the job started.
    pub ms: u64,
    pub kind: EventKind,
    pub text: String,
}

/// The agent's final word.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentStatus {
    pub exit_code: i32,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub log_tail: String,
}

/// What the admin API shows of a job.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub instance: Uuid,
    pub instance_name: String,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
    /// The last step the agent reported.
    #[serde(default)]
    pub step: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    pub elapsed_ms: u64,
    /// When the appliance's first metadata request came, after the start.
    #[serde(default)]
    pub first_request_ms: Option<u64>,
    #[serde(default)]
    pub status: Option<AgentStatus>,
    /// The events after the `after` asked for.
    pub events: Vec<JobEvent>,
    /// Ask for `after = next` to get only what is new.
    pub next: u64,
    /// Events dropped because the job had more events than it keeps.
    #[serde(default)]
    pub dropped: u64,
}
