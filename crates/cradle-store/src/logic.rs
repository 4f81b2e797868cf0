//! The store, written once over [`Driver`]: every statement in the SQL both
//! SQLite and PostgreSQL speak, with `$n` parameters.
//!
//! Every change takes the next value of the `versions` row `change` in its
//! own transaction. Updating that row locks it until commit, so changes
//! commit in version order and a host that has seen version `v` has seen
//! everything up to it: that is what makes [`Store::changes_since`] exact.

use cradle_model::Instance;
use cradle_secgroups::state::Op;
use cradle_secgroups::{DefaultRule, Group, Rule, RuleSpec};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::{DbError, Driver, Row, Tx, Value};
use crate::row::{self, COLUMNS, corrupt, json, parse_ts, ts, uuid};
use crate::{Changes, Direction, Event, HostRecord, Message, Store, StoreError, Subscription};

/// A [`Store`] on a database driver.
pub struct SqlStore<D> {
    pub(crate) driver: D,
}

/// What to do with the change counter.
enum Counter {
    /// Read it.
    Read,
    /// Lock it (a write of the same value): no change commits until this
    /// transaction ends.
    Lock,
    /// Take its next value, locked likewise: a change's version.
    Next,
}

fn counter(tx: &mut dyn Tx, how: Counter) -> Result<i64, StoreError> {
    let sql = match how {
        Counter::Read => "SELECT value FROM versions WHERE name = 'change'",
        Counter::Lock => "UPDATE versions SET value = value WHERE name = 'change' RETURNING value",
        Counter::Next => {
            "UPDATE versions SET value = value + 1 WHERE name = 'change' RETURNING value"
        }
    };
    tx.query(sql, &[])?
        .first()
        .ok_or_else(|| StoreError::Corrupt("the change version is missing".into()))?
        .int(0)
}

/// Constraint failures on `instances` name the field that is taken.
fn instance_conflict(e: DbError) -> StoreError {
    match e {
        DbError::Unique(what) => {
            for field in ["metadata_address", "name"] {
                if what.contains(field) {
                    return StoreError::Conflict(field);
                }
            }
            StoreError::Conflict("id")
        }
        other => other.into(),
    }
}

fn group_conflict(e: DbError) -> StoreError {
    match e {
        DbError::Unique(_) => StoreError::Conflict("security group name"),
        other => other.into(),
    }
}

fn text(s: impl Into<String>) -> Value {
    Value::Text(s.into())
}

/// Persist security-group ops at `version`, and log them for other hosts.
fn write_ops(tx: &mut dyn Tx, version: i64, ops: &[Op]) -> Result<(), StoreError> {
    for (seq, op) in ops.iter().enumerate() {
        match op {
            Op::AddGroup(g) => tx
                .execute(
                    "INSERT INTO security_groups \
                     (id, tenant, name, description, instance_id, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        text(g.id.to_string()),
                        text(&g.tenant),
                        text(&g.name),
                        text(&g.description),
                        g.instance_id.map(|i| i.to_string()).into(),
                        text(ts(g.created_at)),
                    ],
                )
                .map_err(group_conflict)?,
            Op::UpdateGroup(g) => tx
                .execute(
                    "UPDATE security_groups SET name = $2, description = $3 WHERE id = $1",
                    &[text(g.id.to_string()), text(&g.name), text(&g.description)],
                )
                .map_err(group_conflict)?,
            Op::RemoveGroup(id) => tx.execute(
                "DELETE FROM security_groups WHERE id = $1",
                &[text(id.to_string())],
            )?,
            Op::AddRule(r) => tx.execute(
                "INSERT INTO security_group_rules (id, group_id, spec, created_at, seq) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    text(r.id.to_string()),
                    text(r.group_id.to_string()),
                    text(json(&r.spec)),
                    text(ts(r.created_at)),
                    Value::Int(version),
                ],
            )?,
            Op::RemoveRule(id) => tx.execute(
                "DELETE FROM security_group_rules WHERE id = $1",
                &[text(id.to_string())],
            )?,
            Op::Attach { group, instance } => tx.execute(
                "INSERT INTO security_group_members (group_id, instance_id) VALUES ($1, $2)",
                &[text(group.to_string()), text(instance.to_string())],
            )?,
            Op::Detach { group, instance } => tx.execute(
                "DELETE FROM security_group_members WHERE group_id = $1 AND instance_id = $2",
                &[text(group.to_string()), text(instance.to_string())],
            )?,
            Op::AddDefault(d) => tx.execute(
                "INSERT INTO tenant_default_rules (id, tenant, spec, created_at, seq) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    text(d.id.to_string()),
                    text(&d.tenant),
                    text(json(&d.spec)),
                    text(ts(d.created_at)),
                    Value::Int(version),
                ],
            )?,
            Op::RemoveDefault(id) => tx.execute(
                "DELETE FROM tenant_default_rules WHERE id = $1",
                &[text(id.to_string())],
            )?,
        };
        tx.execute(
            "INSERT INTO secgroup_log (version, seq, op) VALUES ($1, $2, $3)",
            &[Value::Int(version), Value::Int(seq as i64), text(json(op))],
        )?;
    }
    if !ops.is_empty() {
        tx.notify(&format!("secgroups {version}"))?;
    }
    Ok(())
}

fn message(r: &Row) -> Result<Message, StoreError> {
    Ok(Message {
        id: r.int(0)?,
        created_at: parse_ts(&r.text(1)?)?,
        body: r.blob(2)?,
    })
}

fn host_record(r: &Row) -> Result<HostRecord, StoreError> {
    Ok(HostRecord {
        name: r.text(0)?,
        admin_url: r.text(1)?,
        peer_url: r.text(2)?,
        metadata_address: r.text(3)?,
        started_at: parse_ts(&r.text(4)?)?,
        seen_at: parse_ts(&r.text(5)?)?,
    })
}

impl<D: Driver> SqlStore<D> {
    fn tx<T>(
        &self,
        mut f: impl FnMut(&mut dyn Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.driver.transaction(&mut f)
    }

    fn instances_where(
        tx: &mut dyn Tx,
        clause: &str,
        params: &[Value],
    ) -> Result<Vec<Instance>, StoreError> {
        let sql = format!("SELECT {} FROM instances {clause}", row::select_list());
        tx.query(&sql, params)?.iter().map(row::decode).collect()
    }
}

impl<D: Driver> Store for SqlStore<D> {
    fn backend(&self) -> &'static str {
        self.driver.name()
    }

    fn shared(&self) -> bool {
        self.driver.shared()
    }

    fn version(&self) -> Result<i64, StoreError> {
        self.tx(|tx| counter(tx, Counter::Read))
    }

    fn load_all(&self) -> Result<Vec<Instance>, StoreError> {
        self.tx(|tx| Self::instances_where(tx, "ORDER BY created_at, id", &[]))
    }

    fn get(&self, id: Uuid) -> Result<Option<Instance>, StoreError> {
        self.tx(|tx| {
            Ok(
                Self::instances_where(tx, "WHERE id = $1", &[text(id.to_string())])?
                    .into_iter()
                    .next(),
            )
        })
    }

    fn insert(&self, instance: &Instance, secgroups: &[Op]) -> Result<i64, StoreError> {
        let placeholders = (1..=COLUMNS.len() + 1)
            .map(|n| format!("${n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO instances ({}) VALUES ({placeholders})",
            row::select_list()
        );
        self.tx(|tx| {
            let version = counter(tx, Counter::Next)?;
            let mut values = row::encode(instance);
            values.push(Value::Int(version));
            tx.execute(&sql, &values).map_err(instance_conflict)?;
            write_ops(tx, version, secgroups)?;
            tx.notify(&format!("instance {} {version}", instance.id))?;
            Ok(version)
        })
    }

    fn update(&self, instance: &Instance) -> Result<i64, StoreError> {
        let n = COLUMNS.len();
        let sets = COLUMNS
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, c)| format!("{c} = ${}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE instances SET {sets}, version = ${} WHERE id = $1 AND version = ${}",
            n + 1,
            n + 2
        );
        self.tx(|tx| {
            let version = counter(tx, Counter::Next)?;
            let mut values = row::encode(instance);
            values.push(Value::Int(version));
            values.push(Value::Int(instance.version));
            if tx.execute(&sql, &values).map_err(instance_conflict)? == 1 {
                tx.notify(&format!("instance {} {version}", instance.id))?;
                return Ok(version);
            }
            let exists = tx.query(
                "SELECT version FROM instances WHERE id = $1",
                &[text(instance.id.to_string())],
            )?;
            Err(match exists.is_empty() {
                true => StoreError::NotFound,
                false => StoreError::Stale,
            })
        })
    }

    fn delete(&self, id: Uuid, secgroups: &[Op]) -> Result<Option<i64>, StoreError> {
        self.tx(|tx| {
            let version = counter(tx, Counter::Next)?;
            write_ops(tx, version, secgroups)?;
            let n = tx.execute(
                "DELETE FROM instances WHERE id = $1",
                &[text(id.to_string())],
            )?;
            if n > 0 {
                tx.execute(
                    "INSERT INTO removed_instances (id, version) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    &[text(id.to_string()), Value::Int(version)],
                )?;
                tx.notify(&format!("removed {id} {version}"))?;
            }
            Ok((n > 0).then_some(version))
        })
    }

    fn set_password_once(&self, id: Uuid, password: &str) -> Result<Option<i64>, StoreError> {
        self.tx(|tx| {
            let version = counter(tx, Counter::Next)?;
            let n = tx.execute(
                "UPDATE instances SET password = $2, version = $3 \
                 WHERE id = $1 AND password IS NULL",
                &[text(id.to_string()), text(password), Value::Int(version)],
            )?;
            if n == 1 {
                tx.notify(&format!("instance {id} {version}"))?;
                return Ok(Some(version));
            }
            let exists = tx.query(
                "SELECT 1 FROM instances WHERE id = $1",
                &[text(id.to_string())],
            )?;
            match exists.is_empty() {
                true => Err(StoreError::NotFound),
                false => Ok(None),
            }
        })
    }

    fn push_message(
        &self,
        id: Uuid,
        direction: Direction,
        body: &[u8],
        cap: usize,
    ) -> Result<Option<i64>, StoreError> {
        self.tx(|tx| {
            let queued = tx.query(
                "SELECT count(*) FROM messages WHERE instance_id = $1 AND direction = $2",
                &[text(id.to_string()), text(direction.as_str())],
            )?;
            let queued = queued.first().map(|r| r.int(0)).transpose()?.unwrap_or(0);
            if queued as usize >= cap {
                return Ok(None);
            }
            let inserted = tx.query(
                "INSERT INTO messages (instance_id, direction, body, created_at) \
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[
                    text(id.to_string()),
                    text(direction.as_str()),
                    Value::Blob(body.to_vec()),
                    text(ts(OffsetDateTime::now_utc())),
                ],
            );
            match inserted {
                Err(DbError::ForeignKey) => Err(StoreError::NotFound),
                Err(e) => Err(e.into()),
                Ok(rows) => Ok(Some(
                    rows.first()
                        .ok_or_else(|| StoreError::Corrupt("no message id".into()))?
                        .int(0)?,
                )),
            }
        })
    }

    fn pop_message(&self, id: Uuid, direction: Direction) -> Result<Option<Message>, StoreError> {
        // One statement: the row is deleted and returned atomically, so two
        // readers can never get the same message.
        self.tx(|tx| {
            tx.query(
                "DELETE FROM messages WHERE id = (SELECT id FROM messages \
                 WHERE instance_id = $1 AND direction = $2 ORDER BY id LIMIT 1) \
                 RETURNING id, created_at, body",
                &[text(id.to_string()), text(direction.as_str())],
            )?
            .first()
            .map(message)
            .transpose()
        })
    }

    fn drain_messages(&self, id: Uuid, direction: Direction) -> Result<Vec<Message>, StoreError> {
        self.tx(|tx| {
            let mut out = tx
                .query(
                    "DELETE FROM messages WHERE instance_id = $1 AND direction = $2 \
                     RETURNING id, created_at, body",
                    &[text(id.to_string()), text(direction.as_str())],
                )?
                .iter()
                .map(message)
                .collect::<Result<Vec<_>, _>>()?;
            out.sort_by_key(|m| m.id);
            Ok(out)
        })
    }

    fn record_event(&self, id: Uuid, kind: &str, message: &str) -> Result<(), StoreError> {
        self.tx(|tx| {
            tx.execute(
                "INSERT INTO events (instance_id, created_at, kind, message) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    text(id.to_string()),
                    text(ts(OffsetDateTime::now_utc())),
                    text(kind),
                    text(message),
                ],
            )?;
            Ok(())
        })
    }

    fn events(&self, id: Uuid) -> Result<Vec<Event>, StoreError> {
        self.tx(|tx| {
            tx.query(
                "SELECT id, created_at, kind, message FROM events \
                 WHERE instance_id = $1 ORDER BY id",
                &[text(id.to_string())],
            )?
            .iter()
            .map(|r| {
                Ok(Event {
                    id: r.int(0)?,
                    created_at: parse_ts(&r.text(1)?)?,
                    kind: r.text(2)?,
                    message: r.text(3)?,
                })
            })
            .collect()
        })
    }

    fn load_secgroups(&self) -> Result<(Vec<Op>, i64), StoreError> {
        let spec = |s: String| -> Result<RuleSpec, StoreError> {
            serde_json::from_str(&s).map_err(|e| corrupt("security group rule", e))
        };
        self.tx(|tx| {
            // No change commits while the state is read: it is exactly the
            // state at `version`.
            let version = counter(tx, Counter::Lock)?;
            let mut ops = Vec::new();
            for r in tx.query(
                "SELECT id, tenant, name, description, instance_id, created_at \
                 FROM security_groups ORDER BY created_at, id",
                &[],
            )? {
                ops.push(Op::AddGroup(Group {
                    id: uuid("security group id", &r.text(0)?)?,
                    tenant: r.text(1)?,
                    name: r.text(2)?,
                    description: r.text(3)?,
                    instance_id: r
                        .opt_text(4)?
                        .map(|i| uuid("security group instance", &i))
                        .transpose()?,
                    created_at: parse_ts(&r.text(5)?)?,
                }));
            }
            for r in tx.query(
                "SELECT id, group_id, spec, created_at FROM security_group_rules \
                 ORDER BY seq, created_at, id",
                &[],
            )? {
                ops.push(Op::AddRule(Rule {
                    id: uuid("rule id", &r.text(0)?)?,
                    group_id: uuid("rule group", &r.text(1)?)?,
                    spec: spec(r.text(2)?)?,
                    created_at: parse_ts(&r.text(3)?)?,
                }));
            }
            for r in tx.query(
                "SELECT group_id, instance_id FROM security_group_members \
                 ORDER BY group_id, instance_id",
                &[],
            )? {
                ops.push(Op::Attach {
                    group: uuid("member group", &r.text(0)?)?,
                    instance: uuid("member instance", &r.text(1)?)?,
                });
            }
            for r in tx.query(
                "SELECT id, tenant, spec, created_at FROM tenant_default_rules \
                 ORDER BY seq, created_at, id",
                &[],
            )? {
                ops.push(Op::AddDefault(DefaultRule {
                    id: uuid("default rule id", &r.text(0)?)?,
                    tenant: r.text(1)?,
                    spec: spec(r.text(2)?)?,
                    created_at: parse_ts(&r.text(3)?)?,
                }));
            }
            Ok((ops, version))
        })
    }

    fn apply_secgroups(&self, ops: &[Op]) -> Result<i64, StoreError> {
        self.tx(|tx| {
            let version = counter(tx, Counter::Next)?;
            write_ops(tx, version, ops)?;
            Ok(version)
        })
    }

    fn changes_since(&self, since: i64) -> Result<Changes, StoreError> {
        self.tx(|tx| {
            // The version first: everything at or below it has committed
            // (see the module doc), so it is safe to resume from.
            let version = counter(tx, Counter::Read)?;
            let instances = Self::instances_where(
                tx,
                "WHERE version > $1 ORDER BY version",
                &[Value::Int(since)],
            )?;
            let removed = tx
                .query(
                    "SELECT id FROM removed_instances WHERE version > $1 ORDER BY version",
                    &[Value::Int(since)],
                )?
                .iter()
                .map(|r| uuid("removed instance", &r.text(0)?))
                .collect::<Result<Vec<_>, StoreError>>()?;
            let secgroups = tx
                .query(
                    "SELECT version, op FROM secgroup_log WHERE version > $1 \
                     ORDER BY version, seq",
                    &[Value::Int(since)],
                )?
                .iter()
                .map(|r| {
                    let op: Op = serde_json::from_str(&r.text(1)?)
                        .map_err(|e| corrupt("security group log", e))?;
                    Ok((r.int(0)?, op))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Changes {
                version,
                instances,
                removed,
                secgroups,
            })
        })
    }

    fn heartbeat(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.tx(|tx| {
            tx.execute(
                "INSERT INTO hosts \
                 (name, admin_url, peer_url, metadata_address, started_at, seen_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET \
                 admin_url = excluded.admin_url, peer_url = excluded.peer_url, \
                 metadata_address = excluded.metadata_address, \
                 started_at = excluded.started_at, seen_at = excluded.seen_at",
                &[
                    text(&host.name),
                    text(&host.admin_url),
                    text(&host.peer_url),
                    text(&host.metadata_address),
                    text(ts(host.started_at)),
                    text(ts(host.seen_at)),
                ],
            )?;
            Ok(())
        })
    }

    fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.tx(|tx| {
            tx.query(
                "SELECT name, admin_url, peer_url, metadata_address, started_at, seen_at \
                 FROM hosts ORDER BY name",
                &[],
            )?
            .iter()
            .map(host_record)
            .collect()
        })
    }

    fn subscribe(&self) -> Result<Option<Box<dyn Subscription>>, StoreError> {
        self.driver.subscribe()
    }
}
