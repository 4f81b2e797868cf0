//! The embedded default: one SQLite file in WAL mode.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use cradle_model::{HostAddr, ImdsTokens, Instance, Os, OsParams, Secret, State};
use cradle_secgroups::state::Op;
use cradle_secgroups::{DefaultRule, Group, Rule, RuleSpec};
use rusqlite::{Connection, OptionalExtension, Row, params};
use rusqlite_migration::{M, Migrations};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::{Direction, Event, Message, Store, StoreError};

/// Schema versions, applied in order; the database records how far it got.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_instances.sql"),
    include_str!("../migrations/0002_injected_files.sql"),
    include_str!("../migrations/0003_roles_reasons_events.sql"),
    include_str!("../migrations/0004_security_groups.sql"),
    include_str!("../migrations/0005_personalization.sql"),
    include_str!("../migrations/0006_machine.sql"),
    include_str!("../migrations/0007_install_params.sql"),
];

/// A [`Store`] in one SQLite file. One connection behind a mutex: cradle's
/// writes are small and the metadata hot path reads from memory, not here.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Open (creating if needed) and migrate the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::setup(Connection::open(path)?)
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Self, StoreError> {
        // WAL lets readers run beside the writer; NORMAL sync loses nothing
        // when the process crashes (only, at worst, the last commits on power loss).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let migrations = Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect());
        migrations.to_latest(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each
        // statement is atomic), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .expect("RFC 3339 formats every OffsetDateTime")
}

fn parse_ts(s: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {s:?}: {e}")))
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("maps of strings serialize")
}

fn private_json(p: &OsParams) -> String {
    let exposed: BTreeMap<&str, &str> = p
        .private
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose().as_str()))
        .collect();
    json(&exposed)
}

/// Injected files as a JSON object of path to base64 contents.
fn files_json(files: &BTreeMap<String, Vec<u8>>) -> String {
    use base64::Engine;
    let encoded: BTreeMap<&str, String> = files
        .iter()
        .map(|(p, c)| {
            (
                p.as_str(),
                base64::engine::general_purpose::STANDARD.encode(c),
            )
        })
        .collect();
    json(&encoded)
}

fn parse_files(text: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    use base64::Engine;
    let encoded: BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|e| corrupt("files", e))?;
    encoded
        .into_iter()
        .map(|(p, c)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(c)
                .map_err(|e| corrupt("files", e))?;
            Ok((p, bytes))
        })
        .collect()
}

fn map_conflict(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, Some(msg)) = &e
        && f.code == rusqlite::ErrorCode::ConstraintViolation
    {
        for field in ["name", "metadata_address", "id"] {
            if msg.contains(&format!("instances.{field}")) {
                return StoreError::Conflict(field);
            }
        }
    }
    StoreError::Backend(e)
}

const COLUMNS: &str = "id, name, project_id, hostname, availability_zone, launch_index, \
    instance_type, user_data, metadata, public_keys, metadata_address, mac, local_ipv4, \
    gateway_ipv4, dns_nameservers, public_ipv4, os_type, os_image, os_params_public, \
    os_params_private, imds_tokens, state, created_at, updated_at, random_seed, password, files, boot_roles, state_reason, local_ipv6, interface, \
    personalization_url, personalization_sha256, disks, memory_mib, vcpus, install_params";

fn bind(i: &Instance) -> Vec<Box<dyn rusqlite::ToSql + '_>> {
    let (os_type, os_image) = match &i.os {
        Some(Os::Type(t)) => (Some(t.as_str()), None),
        Some(Os::Image(m)) => (None, Some(m.as_str())),
        None => (None, None),
    };
    vec![
        Box::new(i.id.to_string()),
        Box::new(i.name.as_str()),
        Box::new(i.project_id.as_str()),
        Box::new(i.hostname.as_str()),
        Box::new(i.availability_zone.as_str()),
        Box::new(i64::from(i.launch_index)),
        Box::new(i.instance_type.as_str()),
        Box::new(i.user_data.as_deref()),
        Box::new(json(&i.metadata)),
        Box::new(json(&i.public_keys)),
        Box::new(i.metadata_address.to_string()),
        Box::new(i.mac.as_str()),
        Box::new(i.local_ipv4.map(|a| a.to_string())),
        Box::new(i.gateway_ipv4.map(|a| a.to_string())),
        Box::new(json(&i.dns_nameservers)),
        Box::new(i.public_ipv4.map(|a| a.to_string())),
        Box::new(os_type),
        Box::new(os_image),
        Box::new(json(&i.os_params.public)),
        Box::new(private_json(&i.os_params)),
        Box::new(i.imds_tokens.as_str()),
        Box::new(i.state.as_str()),
        Box::new(ts(i.created_at)),
        Box::new(ts(i.updated_at)),
        Box::new(i.random_seed.as_slice()),
        Box::new(i.password.as_deref()),
        Box::new(files_json(&i.files)),
        Box::new(json(&i.boot_roles)),
        Box::new(i.state_reason.as_deref()),
        Box::new(i.local_ipv6.map(|a| a.to_string())),
        Box::new(i.interface.as_deref()),
        Box::new(i.personalization_url.as_deref()),
        Box::new(i.personalization_sha256.as_deref()),
        Box::new(json(&i.disks)),
        Box::new(i64::from(i.memory_mib)),
        Box::new(i64::from(i.vcpus)),
        Box::new(json(&i.install_params)),
    ]
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn from_row(r: &Row<'_>) -> Result<Instance, StoreError> {
    let s = |i: usize| -> Result<String, StoreError> { Ok(r.get::<_, String>(i)?) };
    let os_s =
        |i: usize| -> Result<Option<String>, StoreError> { Ok(r.get::<_, Option<String>>(i)?) };
    let id = Uuid::parse_str(&s(0)?).map_err(|e| corrupt("id", e))?;
    let de = |what: &str, text: String| -> Result<BTreeMap<String, String>, StoreError> {
        serde_json::from_str(&text).map_err(|e| corrupt(what, e))
    };
    let private: BTreeMap<String, String> = de("os_params_private", s(19)?)?;
    let ipv4 = |what: &str, v: Option<String>| -> Result<Option<Ipv4Addr>, StoreError> {
        v.map(|v| v.parse().map_err(|e| corrupt(what, e)))
            .transpose()
    };
    let os = match (os_s(16)?, os_s(17)?) {
        (Some(t), _) => Some(Os::Type(t)),
        (None, Some(m)) => Some(Os::Image(m)),
        (None, None) => None,
    };
    Ok(Instance {
        id,
        name: s(1)?,
        project_id: s(2)?,
        hostname: s(3)?,
        availability_zone: s(4)?,
        launch_index: u32::try_from(r.get::<_, i64>(5)?).map_err(|e| corrupt("launch_index", e))?,
        instance_type: s(6)?,
        user_data: r.get(7)?,
        metadata: de("metadata", s(8)?)?,
        public_keys: de("public_keys", s(9)?)?,
        files: parse_files(&s(26)?)?,
        boot_roles: serde_json::from_str(&s(27)?).map_err(|e| corrupt("boot_roles", e))?,
        state_reason: os_s(28)?,
        metadata_address: s(10)?
            .parse::<IpAddr>()
            .map_err(|e| corrupt("metadata_address", e))?,
        mac: s(11)?,
        local_ipv4: os_s(12)?
            .map(|v| v.parse::<HostAddr>().map_err(|e| corrupt("local_ipv4", e)))
            .transpose()?,
        local_ipv6: os_s(29)?
            .map(|v| v.parse().map_err(|e| corrupt("local_ipv6", e)))
            .transpose()?,
        interface: os_s(30)?,
        personalization_url: os_s(31)?,
        personalization_sha256: os_s(32)?,
        disks: serde_json::from_str(&s(33)?).map_err(|e| corrupt("disks", e))?,
        memory_mib: u32::try_from(r.get::<_, i64>(34)?).map_err(|e| corrupt("memory_mib", e))?,
        vcpus: u32::try_from(r.get::<_, i64>(35)?).map_err(|e| corrupt("vcpus", e))?,
        install_params: serde_json::from_str(&s(36)?).map_err(|e| corrupt("install_params", e))?,
        gateway_ipv4: ipv4("gateway_ipv4", os_s(13)?)?,
        dns_nameservers: serde_json::from_str(&s(14)?)
            .map_err(|e| corrupt("dns_nameservers", e))?,
        public_ipv4: ipv4("public_ipv4", os_s(15)?)?,
        os,
        os_params: OsParams {
            public: de("os_params_public", s(18)?)?,
            private: private
                .into_iter()
                .map(|(k, v)| (k, Secret::new(v)))
                .collect(),
            secret: BTreeMap::new(),
        },
        imds_tokens: s(20)?
            .parse::<ImdsTokens>()
            .map_err(|e| corrupt("imds_tokens", e))?,
        state: s(21)?.parse::<State>().map_err(|e| corrupt("state", e))?,
        created_at: parse_ts(&s(22)?)?,
        updated_at: parse_ts(&s(23)?)?,
        random_seed: r.get(24)?,
        password: r.get(25)?,
    })
}

/// A constraint failure on `security_groups` is a name taken in the tenant.
fn group_conflict(e: rusqlite::Error) -> StoreError {
    match map_conflict(e) {
        StoreError::Backend(rusqlite::Error::SqliteFailure(f, _))
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict("security group name")
        }
        other => other,
    }
}

/// Persist security-group ops inside the caller's transaction.
fn write_ops(tx: &rusqlite::Transaction<'_>, ops: &[Op]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            Op::AddGroup(g) => tx
                .execute(
                    "INSERT INTO security_groups \
                     (id, tenant, name, description, instance_id, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        g.id.to_string(),
                        g.tenant,
                        g.name,
                        g.description,
                        g.instance_id.map(|i| i.to_string()),
                        ts(g.created_at)
                    ],
                )
                .map_err(group_conflict)?,
            Op::UpdateGroup(g) => tx
                .execute(
                    "UPDATE security_groups SET name = ?2, description = ?3 WHERE id = ?1",
                    params![g.id.to_string(), g.name, g.description],
                )
                .map_err(group_conflict)?,
            Op::RemoveGroup(id) => tx.execute(
                "DELETE FROM security_groups WHERE id = ?1",
                [id.to_string()],
            )?,
            Op::AddRule(r) => tx.execute(
                "INSERT INTO security_group_rules (id, group_id, spec, created_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    r.id.to_string(),
                    r.group_id.to_string(),
                    json(&r.spec),
                    ts(r.created_at)
                ],
            )?,
            Op::RemoveRule(id) => tx.execute(
                "DELETE FROM security_group_rules WHERE id = ?1",
                [id.to_string()],
            )?,
            Op::Attach { group, instance } => tx.execute(
                "INSERT INTO security_group_members (group_id, instance_id) VALUES (?1, ?2)",
                [group.to_string(), instance.to_string()],
            )?,
            Op::Detach { group, instance } => tx.execute(
                "DELETE FROM security_group_members WHERE group_id = ?1 AND instance_id = ?2",
                [group.to_string(), instance.to_string()],
            )?,
            Op::AddDefault(d) => tx.execute(
                "INSERT INTO tenant_default_rules (id, tenant, spec, created_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![d.id.to_string(), d.tenant, json(&d.spec), ts(d.created_at)],
            )?,
            Op::RemoveDefault(id) => tx.execute(
                "DELETE FROM tenant_default_rules WHERE id = ?1",
                [id.to_string()],
            )?,
        };
    }
    Ok(())
}

impl Store for SqliteStore {
    fn load_secgroups(&self) -> Result<Vec<Op>, StoreError> {
        let conn = self.conn();
        let mut ops = Vec::new();
        let uuid = |what: &str, s: String| Uuid::parse_str(&s).map_err(|e| corrupt(what, e));
        let spec = |s: String| -> Result<RuleSpec, StoreError> {
            serde_json::from_str(&s).map_err(|e| corrupt("security group rule", e))
        };
        let mut stmt = conn.prepare(
            "SELECT id, tenant, name, description, instance_id, created_at \
             FROM security_groups ORDER BY created_at, id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            ops.push(Op::AddGroup(Group {
                id: uuid("security group id", r.get(0)?)?,
                tenant: r.get(1)?,
                name: r.get(2)?,
                description: r.get(3)?,
                instance_id: r
                    .get::<_, Option<String>>(4)?
                    .map(|i| uuid("security group instance", i))
                    .transpose()?,
                created_at: parse_ts(&r.get::<_, String>(5)?)?,
            }));
        }
        let mut stmt = conn.prepare(
            "SELECT id, group_id, spec, created_at FROM security_group_rules \
             ORDER BY created_at, rowid",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            ops.push(Op::AddRule(Rule {
                id: uuid("rule id", r.get(0)?)?,
                group_id: uuid("rule group", r.get(1)?)?,
                spec: spec(r.get(2)?)?,
                created_at: parse_ts(&r.get::<_, String>(3)?)?,
            }));
        }
        let mut stmt = conn.prepare("SELECT group_id, instance_id FROM security_group_members")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            ops.push(Op::Attach {
                group: uuid("member group", r.get(0)?)?,
                instance: uuid("member instance", r.get(1)?)?,
            });
        }
        let mut stmt = conn.prepare(
            "SELECT id, tenant, spec, created_at FROM tenant_default_rules \
             ORDER BY created_at, rowid",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            ops.push(Op::AddDefault(DefaultRule {
                id: uuid("default rule id", r.get(0)?)?,
                tenant: r.get(1)?,
                spec: spec(r.get(2)?)?,
                created_at: parse_ts(&r.get::<_, String>(3)?)?,
            }));
        }
        Ok(ops)
    }

    fn apply_secgroups(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        write_ops(&tx, ops)?;
        tx.commit()?;
        Ok(())
    }

    fn record_event(&self, id: Uuid, kind: &str, message: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO events (instance_id, created_at, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![id.to_string(), ts(OffsetDateTime::now_utc()), kind, message],
        )?;
        Ok(())
    }

    fn events(&self, id: Uuid) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, created_at, kind, message FROM events WHERE instance_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([id.to_string()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, kind, message) = row?;
            out.push(Event {
                id,
                created_at: parse_ts(&at)?,
                kind,
                message,
            });
        }
        Ok(out)
    }

    fn load_all(&self) -> Result<Vec<Instance>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM instances ORDER BY created_at, id"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(from_row(row)?);
        }
        Ok(out)
    }

    fn insert(&self, instance: &Instance, secgroups: &[Op]) -> Result<(), StoreError> {
        let placeholders = (1..=COLUMNS.split(", ").count())
            .map(|n| format!("?{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let values = bind(instance);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            &format!("INSERT INTO instances ({COLUMNS}) VALUES ({placeholders})"),
            rusqlite::params_from_iter(values.iter()),
        )
        .map_err(map_conflict)?;
        write_ops(&tx, secgroups)?;
        tx.commit()?;
        Ok(())
    }

    fn update(&self, instance: &Instance) -> Result<(), StoreError> {
        let sets = COLUMNS
            .split(", ")
            .enumerate()
            .skip(1)
            .map(|(n, c)| format!("{} = ?{}", c.trim(), n + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let values = bind(instance);
        let n = self
            .conn()
            .execute(
                &format!("UPDATE instances SET {sets} WHERE id = ?1"),
                rusqlite::params_from_iter(values.iter()),
            )
            .map_err(map_conflict)?;
        if n == 0 {
            Err(StoreError::NotFound)
        } else {
            Ok(())
        }
    }

    fn delete(&self, id: Uuid, secgroups: &[Op]) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        write_ops(&tx, secgroups)?;
        let n = tx.execute("DELETE FROM instances WHERE id = ?1", [id.to_string()])?;
        tx.commit()?;
        Ok(n > 0)
    }

    fn set_password_once(&self, id: Uuid, password: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE instances SET password = ?2 WHERE id = ?1 AND password IS NULL",
            params![id.to_string(), password],
        )?;
        if n == 1 {
            return Ok(true);
        }
        let exists: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM instances WHERE id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        exists.map(|_| false).ok_or(StoreError::NotFound)
    }

    fn push_message(
        &self,
        id: Uuid,
        direction: Direction,
        body: &[u8],
        cap: usize,
    ) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let queued: i64 = tx.query_row(
            "SELECT count(*) FROM messages WHERE instance_id = ?1 AND direction = ?2",
            params![id.to_string(), direction.as_str()],
            |r| r.get(0),
        )?;
        if queued as usize >= cap {
            return Ok(None);
        }
        let inserted = tx.execute(
            "INSERT INTO messages (instance_id, direction, body, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id.to_string(), direction.as_str(), body, ts(OffsetDateTime::now_utc())],
        );
        match inserted {
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::NotFound);
            }
            other => other?,
        };
        let rowid = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Some(rowid))
    }

    fn pop_message(&self, id: Uuid, direction: Direction) -> Result<Option<Message>, StoreError> {
        // One statement: the row is deleted and returned atomically, so two
        // readers can never get the same message.
        let conn = self.conn();
        let row = conn
            .query_row(
                "DELETE FROM messages WHERE id = (SELECT id FROM messages \
                 WHERE instance_id = ?1 AND direction = ?2 ORDER BY id LIMIT 1) \
                 RETURNING id, created_at, body",
                params![id.to_string(), direction.as_str()],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(id, at, body)| {
            Ok(Message {
                id,
                created_at: parse_ts(&at)?,
                body,
            })
        })
        .transpose()
    }

    fn drain_messages(&self, id: Uuid, direction: Direction) -> Result<Vec<Message>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "DELETE FROM messages WHERE instance_id = ?1 AND direction = ?2 \
             RETURNING id, created_at, body",
        )?;
        let rows = stmt.query_map(params![id.to_string(), direction.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, body) = row?;
            out.push(Message {
                id,
                created_at: parse_ts(&at)?,
                body,
            });
        }
        out.sort_by_key(|m| m.id);
        Ok(out)
    }
}
