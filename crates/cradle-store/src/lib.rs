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

mod db;
mod logic;
mod postgres;
mod row;
mod sqlite;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::time::Duration;

use cradle_model::Instance;
use cradle_secgroups::state::Op;
use time::OffsetDateTime;
use uuid::Uuid;

pub use logic::SqlStore;
pub use postgres::{PgStore, Postgres};
pub use sqlite::{Sqlite, SqliteStore};

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

/// What changed after a version: see [`Store::changes_since`].
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Everything up to this version is in this answer (or was before).
    pub version: i64,
    /// Instances stored or changed since, each at its own version.
    pub instances: Vec<Instance>,
    /// Instances removed since.
    pub removed: Vec<Uuid>,
    /// Security-group ops made since, in order, with their versions.
    pub secgroups: Vec<(i64, Op)>,
}

/// A host of the cluster, as it last said it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    pub name: String,
    /// Where its admin API listens.
    pub admin_url: String,
    /// Where other hosts hand it secrets (mutual TLS); empty when it has
    /// no peer listener.
    pub peer_url: String,
    /// Where its metadata service listens.
    pub metadata_address: String,
    pub started_at: OffsetDateTime,
    pub seen_at: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another instance already has this {0}")]
    Conflict(&'static str),
    #[error("no such instance")]
    NotFound,
    /// The stored copy is newer than the one the change was made from.
    #[error("the instance was changed elsewhere meanwhile")]
    Stale,
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Backend(String),
    /// The database cannot be reached; nothing was written.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The disk holding the database (named) is full; nothing was written.
    #[error("no space left on the disk holding the store ({0})")]
    Full(String),
}

/// Wakes a host when another changed something (PostgreSQL's LISTEN).
pub trait Subscription: Send {
    /// Wait up to `timeout` for a notification. `Ok(true)`: something
    /// changed; `Ok(false)`: nothing within the timeout; `Err`: the
    /// connection is gone (subscribe again).
    fn wait(&mut self, timeout: Duration) -> Result<bool, StoreError>;
}

/// Persistent instance registry and channel queues.
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Whether other processes (hosts) may change this store.
    fn shared(&self) -> bool;
    /// The version of the last change stored: read it before
    /// [`Store::load_all`], then ask [`Store::changes_since`] it.
    fn version(&self) -> Result<i64, StoreError>;
    /// Every instance, oldest first.
    fn load_all(&self) -> Result<Vec<Instance>, StoreError>;
    /// One instance as stored now.
    fn get(&self, id: Uuid) -> Result<Option<Instance>, StoreError>;
    /// Fails with `Conflict` when the name or metadata address is taken.
    /// `secgroups` (the instance's own group) are written in the same
    /// transaction: both or neither. Returns the instance's version.
    fn insert(&self, instance: &Instance, secgroups: &[Op]) -> Result<i64, StoreError>;
    /// Replace the stored instance with the same id, if the stored one is
    /// still at `instance.version` (else `Stale`). Returns the new version.
    fn update(&self, instance: &Instance) -> Result<i64, StoreError>;
    /// Remove an instance and its queued messages, with `secgroups` (its
    /// groups and the rules naming them) in the same transaction. False if
    /// there was none; else the removal's version.
    fn delete(&self, id: Uuid, secgroups: &[Op]) -> Result<Option<i64>, StoreError>;
    /// Set the guest password unless one is set: the new version if this
    /// call set it, `None` if one was set already.
    fn set_password_once(&self, id: Uuid, password: &str) -> Result<Option<i64>, StoreError>;
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
    /// that recreate them (groups first, then rules, attachments, defaults),
    /// and the version they are exactly the state of (no change commits
    /// while they are read).
    fn load_secgroups(&self) -> Result<(Vec<Op>, i64), StoreError>;
    /// Persist security-group changes, all or none. Returns their version.
    fn apply_secgroups(&self, ops: &[Op]) -> Result<i64, StoreError>;
    /// Everything changed after `version`: instances at a higher version,
    /// removals and security-group ops after it.
    fn changes_since(&self, version: i64) -> Result<Changes, StoreError>;
    /// Record that `host` is up (insert or replace its record).
    fn heartbeat(&self, host: &HostRecord) -> Result<(), StoreError>;
    /// Every host that ever said it was up, by name.
    fn hosts(&self) -> Result<Vec<HostRecord>, StoreError>;
    /// A way to be woken by other hosts' changes; `None` where no other
    /// process shares the store.
    fn subscribe(&self) -> Result<Option<Box<dyn Subscription>>, StoreError>;
}
