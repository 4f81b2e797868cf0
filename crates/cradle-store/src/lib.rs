//! Where instances persist.
//!
//! [`Store`] is deliberately narrow, so that a PostgreSQL implementation can
//! drop in beside [`SqliteStore`]. It is synchronous: callers on an async
//! runtime run it on a blocking thread.
//!
//! Invariant: no method takes or returns secret OS parameters; an instance
//! loaded from a store has none. Private parameters are written here and
//! nowhere else.

#![forbid(unsafe_code)]

mod sqlite;

use cradle_model::Instance;
use cradle_secgroups::state::Op;
use time::OffsetDateTime;
use uuid::Uuid;

pub use sqlite::SqliteStore;

/// Which way a channel message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Queued by the operator, read by the guest.
    ToGuest,
    /// Written by the guest, drained by the operator.
    ToHost,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToGuest => "to_guest",
            Direction::ToHost => "to_host",
        }
    }
}

/// One queued channel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: i64,
    pub created_at: OffsetDateTime,
    pub body: Vec<u8>,
}

/// Something that happened to an instance, for operators (e.g. it entered
/// state `error`, and why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub created_at: OffsetDateTime,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another instance already has this {0}")]
    Conflict(&'static str),
    #[error("no such instance")]
    NotFound,
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error("database error")]
    Backend(#[from] rusqlite::Error),
    #[error("database migration failed")]
    Migration(#[from] rusqlite_migration::Error),
}

/// Persistent instance registry and channel queues.
pub trait Store: Send + Sync + 'static {
    /// Every instance, oldest first.
    fn load_all(&self) -> Result<Vec<Instance>, StoreError>;
    /// Fails with `Conflict` when the name or metadata address is taken.
    /// `secgroups` (the instance's own group) are written in the same
    /// transaction: both or neither.
    fn insert(&self, instance: &Instance, secgroups: &[Op]) -> Result<(), StoreError>;
    /// Replace the stored instance with the same id.
    fn update(&self, instance: &Instance) -> Result<(), StoreError>;
    /// Remove an instance and its queued messages, with `secgroups` (its
    /// groups and the rules naming them) in the same transaction. False if
    /// there was none.
    fn delete(&self, id: Uuid, secgroups: &[Op]) -> Result<bool, StoreError>;
    /// Set the guest password unless one is set. True if this call set it.
    fn set_password_once(&self, id: Uuid, password: &str) -> Result<bool, StoreError>;
    /// Append a message unless `cap` are already queued that way; `None` when full.
    fn push_message(
        &self,
        id: Uuid,
        direction: Direction,
        body: &[u8],
        cap: usize,
    ) -> Result<Option<i64>, StoreError>;
    /// Remove and return the oldest queued message.
    fn pop_message(&self, id: Uuid, direction: Direction) -> Result<Option<Message>, StoreError>;
    /// Remove and return every queued message, oldest first.
    fn drain_messages(&self, id: Uuid, direction: Direction) -> Result<Vec<Message>, StoreError>;
    /// Append to the instance's event log.
    fn record_event(&self, id: Uuid, kind: &str, message: &str) -> Result<(), StoreError>;
    /// The instance's events, oldest first.
    fn events(&self, id: Uuid) -> Result<Vec<Event>, StoreError>;
    /// Every security group, rule, attachment and default rule, as the ops
    /// that recreate them: groups first, then rules, attachments, defaults.
    fn load_secgroups(&self) -> Result<Vec<Op>, StoreError>;
    /// Persist security-group changes, all or none.
    fn apply_secgroups(&self, ops: &[Op]) -> Result<(), StoreError>;
}
