//! The cluster's store: PostgreSQL, shared by every host.
//!
//! A few connections per process for statements (each behind a mutex, so
//! that catching up with other hosts does not wait behind this host's
//! writes), each reconnected when it is lost, and one more per subscriber
//! for LISTEN.
//! While the server is away every call fails at once with
//! [`StoreError::Unavailable`]; the next call after it is back reconnects.
//! Changes are announced with `pg_notify` on the channel `cradle_changes`,
//! inside their transaction (so only committed ones are heard), carrying
//! ids and versions only, never values.

use std::collections::{HashMap, HashSet};
use std::error::Error as _;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, Config, NoTls, Statement};

use crate::db::{DbError, Driver, Row, Tx, Value};
use crate::{SqlStore, StoreError, Subscription};

/// Schema versions, applied in order; `schema_version` records how far the
/// database got. Version N here and in `sqlite.rs` is the same schema.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_instances.sql"),
    // The same SQL in both dialects.
    include_str!("../migrations/sqlite/0002_injected_files.sql"),
    include_str!("../migrations/postgres/0003_roles_reasons_events.sql"),
    include_str!("../migrations/postgres/0004_security_groups.sql"),
    // The same SQL in both dialects.
    include_str!("../migrations/sqlite/0005_personalization.sql"),
    include_str!("../migrations/postgres/0006_machine.sql"),
    // The same SQL in both dialects.
    include_str!("../migrations/sqlite/0007_install_params.sql"),
    include_str!("../migrations/postgres/0008_cluster.sql"),
    // The same SQL in both dialects.
    include_str!("../migrations/sqlite/0009_agent.sql"),
    // The same SQL in both dialects.
    include_str!("../migrations/sqlite/0010_link_local.sql"),
    // The same SQL in both dialects.
    include_str!("../migrations/sqlite/0011_tags_maintenance.sql"),
];

/// The LISTEN/NOTIFY channel.
const CHANNEL: &str = "cradle_changes";
/// Held while migrating, so that hosts starting together migrate once.
const MIGRATION_LOCK: i64 = 0x6372_6164_6c65;

/// The server processes behind this process's statement connections: a
/// notification one of them sent is this host's own change, which wakes no
/// one here.
type OwnPids = Arc<Mutex<HashSet<i32>>>;

struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
    pid: i32,
    own: OwnPids,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The server may give the number to another host's session next.
        self.own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid);
    }
}

/// Statement connections per process. Writes serialize on the change
/// counter anyway; more connections let reads run beside them.
const CONNECTIONS: usize = 3;

/// A PostgreSQL server, through a few reconnecting connections.
pub struct Postgres {
    config: Config,
    conns: Vec<Mutex<Option<Conn>>>,
    next: std::sync::atomic::AtomicUsize,
    own: OwnPids,
}

/// The store in PostgreSQL.
pub type PgStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
    /// Connect to `url` (`postgres://user@host:port/db`, or libpq's
    /// `host=/run/postgresql dbname=cradle` form) and migrate the schema.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config = Config::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("store.url is not valid: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let pg = Postgres {
            config,
            conns: (0..CONNECTIONS).map(|_| Mutex::new(None)).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
            own: OwnPids::default(),
        };
        pg.migrate()?;
        Ok(SqlStore { driver: pg })
    }
}

impl Postgres {
    fn open(&self) -> Result<Client, StoreError> {
        let mut client = self
            .config
            .connect(NoTls)
            .map_err(|e| StoreError::Unavailable(describe(&e)))?;
        // Statements are prepared once per connection; a generic plan for
        // `version > $1` would scan every row where the index finds the few
        // new ones. Plan each execution for its own parameters.
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .map_err(|e| StoreError::Unavailable(describe(&e)))?;
        Ok(client)
    }

    /// A free connection, or else the next one in turn.
    fn lock(&self) -> MutexGuard<'_, Option<Conn>> {
        for c in &self.conns {
            if let Ok(g) = c.try_lock() {
                return g;
            }
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.conns.len();
        self.conns[n].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.open()?;
        let fail = |e: postgres::Error| StoreError::Migration(describe(&e));
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .map_err(fail)?;
        let result = (|| {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL); \
                     INSERT INTO schema_version SELECT 0 \
                     WHERE NOT EXISTS (SELECT 1 FROM schema_version)",
                )
                .map_err(fail)?;
            let at: i64 = client
                .query_one("SELECT version FROM schema_version", &[])
                .map_err(fail)?
                .get(0);
            if at > MIGRATIONS.len() as i64 {
                return Err(StoreError::Migration(format!(
                    "the database is at schema version {at}, newer than this cradle's {}",
                    MIGRATIONS.len()
                )));
            }
            for (n, sql) in MIGRATIONS.iter().enumerate().skip(at as usize) {
                let mut tx = client.transaction().map_err(fail)?;
                tx.batch_execute(sql).map_err(fail)?;
                tx.execute("UPDATE schema_version SET version = $1", &[&(n as i64 + 1)])
                    .map_err(fail)?;
                tx.commit().map_err(fail)?;
            }
            Ok(())
        })();
        let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
        result
    }
}

/// The error and, for server errors, the server's message (never values:
/// cradle's constraint failures name columns that hold no secrets).
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match e.source() {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

fn is_unavailable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(code)
        }
        // No server error: the connection itself failed.
        None => e.as_db_error().is_none(),
    }
}

fn db_error(e: postgres::Error) -> DbError {
    if is_unavailable(&e) {
        return DbError::Unavailable(describe(&e));
    }
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => DbError::Unique(
            e.as_db_error()
                .and_then(|d| d.constraint())
                .unwrap_or_default()
                .to_string(),
        ),
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => DbError::ForeignKey,
        Some(c) if *c == SqlState::DISK_FULL => DbError::Full,
        _ => DbError::Other(describe(&e)),
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                _ => n.to_sql(ty, out),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn cell(row: &postgres::Row, i: usize) -> Result<Value, postgres::Error> {
    let ty = row.columns()[i].type_();
    Ok(match *ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|n| Value::Int(n.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|n| Value::Int(n.into())),
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
        _ => row.try_get::<_, Option<String>>(i)?.map(Value::Text),
    }
    .unwrap_or(Value::Null))
}

struct PgTx<'a> {
    tx: postgres::Transaction<'a>,
    statements: &'a mut HashMap<String, Statement>,
}

impl PgTx<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql).map_err(db_error)?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

fn refs(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl Tx for PgTx<'_> {
    fn execute(&mut self, sql: &str, values: &[Value]) -> Result<u64, DbError> {
        let stmt = self.statement(sql)?;
        self.tx.execute(&stmt, &refs(values)).map_err(db_error)
    }

    fn query(&mut self, sql: &str, values: &[Value]) -> Result<Vec<Row>, DbError> {
        let stmt = self.statement(sql)?;
        let rows = self.tx.query(&stmt, &refs(values)).map_err(db_error)?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| cell(r, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Row)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_error)
    }

    fn notify(&mut self, payload: &str) -> Result<(), DbError> {
        self.execute(
            "SELECT pg_notify($1, $2)",
            &[Value::Text(CHANNEL.into()), Value::Text(payload.into())],
        )
        .map(|_| ())
    }
}

impl Driver for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn shared(&self) -> bool {
        true
    }

    fn subscribe(&self) -> Result<Option<Box<dyn Subscription>>, StoreError> {
        let mut client = self.open()?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(|e| StoreError::Unavailable(describe(&e)))?;
        Ok(Some(Box::new(Listener {
            client,
            own: self.own.clone(),
        })))
    }

    // `Tx` is the crate's own: only this crate's logic calls this.
    #[allow(private_interfaces)]
    fn transaction<T>(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.lock();
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            *guard = None;
            *guard = Some(Conn {
                client: self.open()?,
                statements: HashMap::new(),
                pid: 0,
                own: self.own.clone(),
            });
            let conn = guard.as_mut().expect("connected above");
            let pid: i32 = conn
                .client
                .query_one("SELECT pg_backend_pid()", &[])
                .map_err(|e| StoreError::Unavailable(describe(&e)))?
                .get(0);
            conn.pid = pid;
            self.own
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(pid);
        }
        let conn = guard.as_mut().expect("connected above");
        let result = (|| {
            let tx = conn.client.transaction().map_err(db_error)?;
            let mut tx = PgTx {
                tx,
                statements: &mut conn.statements,
            };
            let out = f(&mut tx)?;
            tx.tx.commit().map_err(db_error)?;
            Ok(out)
        })();
        if matches!(result, Err(StoreError::Unavailable(_))) {
            // Reconnect next time, with fresh prepared statements.
            *guard = None;
        }
        result.map_err(|e| match e {
            StoreError::Full(_) => {
                StoreError::Full("the PostgreSQL server's data directory".into())
            }
            e => e,
        })
    }
}

/// A LISTEN connection.
struct Listener {
    client: Client,
    own: OwnPids,
}

impl Subscription for Listener {
    /// Woken by another host's change only: this host's own were applied
    /// when they were made.
    fn wait(&mut self, timeout: Duration) -> Result<bool, StoreError> {
        let deadline = std::time::Instant::now() + timeout;
        let own = self.own.clone();
        let foreign = |n: &postgres::Notification| {
            !own.lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&n.process_id())
        };
        let heard = {
            let mut notes = self.client.notifications();
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let next = notes.timeout_iter(left).next();
                match next {
                    Ok(Some(n)) if foreign(&n) => {
                        // Take every other pending one: one catch-up covers them all.
                        while let Ok(Some(_)) = notes.iter().next() {}
                        break Ok(true);
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => break Ok(false),
                    Err(e) => break Err(e),
                }
            }
        };
        match heard {
            Ok(true) => Ok(true),
            Err(e) => Err(StoreError::Unavailable(describe(&e))),
            Ok(false) if self.client.is_closed() => Err(StoreError::Unavailable(
                "the notification connection closed".into(),
            )),
            Ok(false) => Ok(false),
        }
    }
}
