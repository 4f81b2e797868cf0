//! The embedded default: one SQLite file in WAL mode.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode};
use rusqlite_migration::{M, Migrations};

use crate::db::{DbError, Driver, Row, Tx, Value};
use crate::{SqlStore, StoreError, Subscription};

/// Schema versions, applied in order; the database records how far it got
/// (`user_version`). Version N here and in `postgres.rs` is the same schema.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_instances.sql"),
    include_str!("../migrations/sqlite/0002_injected_files.sql"),
    include_str!("../migrations/sqlite/0003_roles_reasons_events.sql"),
    include_str!("../migrations/sqlite/0004_security_groups.sql"),
    include_str!("../migrations/sqlite/0005_personalization.sql"),
    include_str!("../migrations/sqlite/0006_machine.sql"),
    include_str!("../migrations/sqlite/0007_install_params.sql"),
    include_str!("../migrations/sqlite/0008_cluster.sql"),
    include_str!("../migrations/sqlite/0009_agent.sql"),
    include_str!("../migrations/sqlite/0010_link_local.sql"),
    include_str!("../migrations/sqlite/0011_tags_maintenance.sql"),
];

/// One SQLite connection behind a mutex: cradle's writes are small and the
/// metadata hot path reads from memory, not here.
pub struct Sqlite {
    conn: Mutex<Connection>,
    /// The file, to name when its disk is full.
    path: String,
}

/// The store in one SQLite file.
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
    /// Open (creating if needed) and migrate the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::setup(
            Connection::open(path).map_err(backend)?,
            path.display().to_string(),
        )
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::setup(
            Connection::open_in_memory().map_err(backend)?,
            ":memory:".into(),
        )
    }

    fn setup(mut conn: Connection, path: String) -> Result<Self, StoreError> {
        // WAL lets readers run beside the writer; NORMAL sync loses nothing
        // when the process crashes (only, at worst, the last commits on power loss).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(backend)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        let migrations = Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect());
        migrations
            .to_latest(&mut conn)
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(SqlStore {
            driver: Sqlite {
                conn: Mutex::new(conn),
                path,
            },
        })
    }
}

impl Sqlite {
    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each
        // transaction is atomic), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    match db_error(e) {
        DbError::Full => StoreError::Full(String::new()),
        other => other.into(),
    }
}

fn db_error(e: rusqlite::Error) -> DbError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && f.code == ErrorCode::DiskFull
    {
        return DbError::Full;
    }
    if let rusqlite::Error::SqliteFailure(f, msg) = &e
        && f.code == ErrorCode::ConstraintViolation
    {
        let msg = msg.clone().unwrap_or_default();
        if msg.contains("FOREIGN KEY") {
            return DbError::ForeignKey;
        }
        if msg.contains("UNIQUE") || msg.contains("PRIMARY KEY") {
            return DbError::Unique(msg);
        }
    }
    DbError::Other(e.to_string())
}

/// `$1` → `?1`: SQLite's numbered parameters.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

fn params(values: &[Value]) -> impl Iterator<Item = rusqlite::types::Value> + '_ {
    values.iter().map(|v| match v {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(n) => rusqlite::types::Value::Integer(*n),
        Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Value::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
    })
}

struct SqliteTx<'a>(rusqlite::Transaction<'a>);

impl Tx for SqliteTx<'_> {
    fn execute(&mut self, sql: &str, values: &[Value]) -> Result<u64, DbError> {
        let mut stmt = self.0.prepare_cached(&sqlite_sql(sql)).map_err(db_error)?;
        let n = stmt
            .execute(rusqlite::params_from_iter(params(values)))
            .map_err(db_error)?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, values: &[Value]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.0.prepare_cached(&sqlite_sql(sql)).map_err(db_error)?;
        let width = stmt.column_count();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params(values)))
            .map_err(db_error)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(db_error)? {
            let mut cells = Vec::with_capacity(width);
            for i in 0..width {
                cells.push(match r.get_ref(i).map_err(db_error)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::Int(n),
                    ValueRef::Real(f) => Value::Text(f.to_string()),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(Row(cells));
        }
        Ok(out)
    }

    fn notify(&mut self, _payload: &str) -> Result<(), DbError> {
        // One process owns the file: no one else to tell.
        Ok(())
    }
}

impl Driver for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn shared(&self) -> bool {
        // One process owns the file.
        false
    }

    fn subscribe(&self) -> Result<Option<Box<dyn Subscription>>, StoreError> {
        Ok(None)
    }

    // `Tx` is the crate's own: only this crate's logic calls this.
    #[allow(private_interfaces)]
    fn transaction<T>(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        // A full disk is SQLITE_FULL wherever it strikes (a page, the WAL,
        // the commit): the transaction is rolled back, and the error names
        // the file whose disk it is.
        let name = |e: StoreError| match e {
            StoreError::Full(_) => StoreError::Full(self.path.clone()),
            e => e,
        };
        let tx = conn.transaction().map_err(backend).map_err(name)?;
        let mut tx = SqliteTx(tx);
        let out = f(&mut tx).map_err(name)?;
        tx.0.commit().map_err(backend).map_err(name)?;
        Ok(out)
    }
}
