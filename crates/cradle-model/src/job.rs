//! An OS job (an install, an export, an import, a rename) as the admin API
//! shows it: its state, the appliance's
//! final status and its events. The job itself (what the appliance is
//! served, the scrubbing) lives in the registry; these are only its views.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The OS operation a job runs (seed 003's four; `verify` is not a job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOperation {
    /// An install: the OS's `create`.
    Create,
    Export,
    Import,
    Rename,
}

impl JobOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            JobOperation::Create => "create",
            JobOperation::Export => "export",
            JobOperation::Import => "import",
            JobOperation::Rename => "rename",
        }
    }

    /// The job as the event log and the CLI name it: "install", "export", …
    pub fn noun(self) -> &'static str {
        match self {
            JobOperation::Create => "install",
            other => other.as_str(),
        }
    }

    /// The instance's state while the job runs.
    pub fn busy_state(self) -> crate::State {
        match self {
            JobOperation::Create => crate::State::Installing,
            JobOperation::Export => crate::State::Exporting,
            JobOperation::Import => crate::State::Importing,
            JobOperation::Rename => crate::State::Renaming,
        }
    }
}

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
    /// What the agent streamed (export) or fed its script (import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamDigest>,
}

/// A data stream's length and SHA-256, as one end counted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamDigest {
    pub bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// Counts and hashes a data stream as it passes: the one way every end
/// (the appliance's agent, the host, the CLI) arrives at its
/// [`StreamDigest`].
#[derive(Default, Clone)]
pub struct StreamCounter {
    bytes: u64,
    hasher: sha2::Sha256,
}

impl StreamCounter {
    pub fn update(&mut self, chunk: &[u8]) {
        use sha2::Digest;
        self.bytes += chunk.len() as u64;
        self.hasher.update(chunk);
    }

    /// The bytes counted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn finish(self) -> StreamDigest {
        use sha2::Digest;
        StreamDigest {
            bytes: self.bytes,
            sha256: self
                .hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }
    }
}

/// What the admin API shows of a job.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub instance: Uuid,
    pub instance_name: String,
    /// The OS operation the job runs: `create` (an install), `export`,
    /// `import` or `rename`.
    #[serde(default = "create")]
    pub operation: String,
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
    /// An export's or import's data stream as the host counted it: the
    /// dump so far, and once the job succeeded, all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamDigest>,
}

fn create() -> String {
    "create".into()
}
