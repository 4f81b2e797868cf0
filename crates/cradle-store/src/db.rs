//! What the store's logic needs of a database, and no more: run statements
//! with positional parameters (`$1`, `$2`, …) inside one transaction and
//! read rows back as plain values. [`crate::SqlStore`] is written once over
//! this; `sqlite.rs` and `postgres.rs` are the two drivers.

use crate::StoreError;

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// One result row.
pub(crate) struct Row(pub(crate) Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("row has no column {i}")))
    }

    pub(crate) fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?
            .ok_or_else(|| StoreError::Corrupt(format!("column {i} is null")))
    }

    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            other => Err(StoreError::Corrupt(format!(
                "column {i} is {other:?}, not text"
            ))),
        }
    }

    pub(crate) fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.at(i)? {
            Value::Int(n) => Ok(*n),
            other => Err(StoreError::Corrupt(format!(
                "column {i} is {other:?}, not an integer"
            ))),
        }
    }

    pub(crate) fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Blob(b) => Ok(Some(b.clone())),
            _ => Err(StoreError::Corrupt(format!("column {i} is not a blob"))),
        }
    }

    pub(crate) fn blob(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        self.opt_blob(i)?
            .ok_or_else(|| StoreError::Corrupt(format!("column {i} is null")))
    }
}

/// How a statement failed, in the terms the logic decides on.
#[derive(Debug)]
pub(crate) enum DbError {
    /// A UNIQUE or PRIMARY KEY constraint; the text names the constraint or
    /// its columns (`instances.name`, `instances_name_key`).
    Unique(String),
    /// A foreign key pointed at a row that is not there.
    ForeignKey,
    /// The database cannot be reached (down, restarting, connection lost).
    Unavailable(String),
    /// The disk under the database is full (the driver names it).
    Full,
    /// Anything else.
    Other(String),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(m) => StoreError::Unavailable(m),
            DbError::Full => StoreError::Full(String::new()),
            DbError::Unique(m) => StoreError::Backend(format!("constraint failed: {m}")),
            DbError::ForeignKey => StoreError::Backend("foreign key constraint failed".into()),
            DbError::Other(m) => StoreError::Backend(m),
        }
    }
}

/// Statements inside one transaction.
pub(crate) trait Tx {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError>;
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;
    /// Tell other hosts, at commit, that something changed (`payload`
    /// carries ids and versions only). A no-op where no one listens.
    fn notify(&mut self, payload: &str) -> Result<(), DbError>;
}

/// A database the store runs on.
pub trait Driver: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn name(&self) -> &'static str;
    /// Whether other processes may change the database.
    fn shared(&self) -> bool;
    /// See [`crate::Store::subscribe`].
    fn subscribe(&self) -> Result<Option<Box<dyn crate::Subscription>>, StoreError>;
    /// Run `f` in one transaction: committed when it returns `Ok`, rolled
    /// back otherwise.
    #[doc(hidden)]
    #[allow(private_interfaces)]
    fn transaction<T>(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError>;
}
