//! One error for every operation. It wraps the per-module errors and says,
//! through [`Error::kind`] and [`Error::code`], what class of failure each
//! is; the admin API turns the kind into an HTTP status and the metadata
//! service into its plain-text answers, each in one place.

use cradle_model::api::Invalid;
use cradle_registry::RegistryError;
use cradle_secgroups::state::SgError;
use cradle_store::StoreError;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the registry: lookups, uniqueness, the store, security groups.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The request says something cradle refuses; the message names the field.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A guest presented no token where one is required, or a bad one.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Refused by an operation itself, of `kind`, with the admin API's
    /// `code` and a message for the caller.
    #[error("{message}")]
    Refused {
        kind: Kind,
        code: &'static str,
        message: String,
    },
    /// A failure of cradle itself. The detail is for the log; callers are
    /// told only that something broke.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The class of a failure, which front ends map to their own answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    Invalid,
    TooLarge,
    TooMany,
    /// The disk under the store is full: nothing was changed.
    Full,
    Upstream,
    Unavailable,
    Internal,
}

impl Error {
    pub(crate) fn refused(kind: Kind, code: &'static str, message: impl Into<String>) -> Error {
        Error::Refused {
            kind,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Error {
        Error::refused(Kind::Forbidden, "forbidden", message)
    }

    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Error {
        Error::refused(Kind::NotFound, code, message)
    }

    pub(crate) fn unavailable(code: &'static str, message: impl Into<String>) -> Error {
        Error::refused(Kind::Unavailable, code, message)
    }

    pub fn kind(&self) -> Kind {
        match self {
            Error::Registry(r) => registry_kind(r),
            Error::Invalid(_) => Kind::Invalid,
            Error::Unauthorized(_) => Kind::Unauthorized,
            Error::Refused { kind, .. } => *kind,
            Error::Internal(_) => Kind::Internal,
        }
    }

    /// The machine-readable code the admin API puts in its error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Registry(r) => registry_code(r),
            Error::Invalid(_) => "invalid",
            Error::Unauthorized(_) => "unauthorized",
            Error::Refused { code, .. } => code,
            Error::Internal(_) => "internal",
        }
    }

    /// What a caller may be told. Internal and storage failures say only
    /// where to look: their detail can name paths and database state.
    pub fn public_message(&self) -> String {
        match self {
            Error::Internal(_) => "internal error; see the server log".into(),
            Error::Registry(RegistryError::Store(StoreError::Unavailable(_))) => {
                "the store (database) is unavailable, so nothing was changed; guests are \
                 still served; try again when it is back"
                    .into()
            }
            Error::Registry(RegistryError::Store(StoreError::Full(disk))) => format!(
                "no space left on the disk holding the store ({disk}), so nothing was \
                 changed; guests are still served; free space and try again"
            ),
            Error::Registry(RegistryError::Store(_)) => "storage failed; see the server log".into(),
            Error::Registry(RegistryError::SecGroupsDisabled) => {
                "no such route (security groups are disabled)".into()
            }
            other => other.to_string(),
        }
    }

    /// Whether the detail belongs in the server's log (it is not the
    /// caller's mistake).
    pub fn is_server_side(&self) -> bool {
        matches!(
            self.kind(),
            Kind::Internal | Kind::Unavailable | Kind::Upstream | Kind::Full
        )
    }
}

fn registry_kind(e: &RegistryError) -> Kind {
    match e {
        RegistryError::NotFound(_) | RegistryError::SecGroupsDisabled => Kind::NotFound,
        RegistryError::NoEvent(_) => Kind::NotFound,
        RegistryError::EventState(_) => Kind::Conflict,
        RegistryError::Conflict(_)
        | RegistryError::PasswordSet
        | RegistryError::Busy(_)
        | RegistryError::WrongHost(_) => Kind::Conflict,
        RegistryError::Invalid(_) | RegistryError::PasswordTooLong => Kind::Invalid,
        RegistryError::QueueFull(_) => Kind::TooMany,
        RegistryError::MessageTooLarge(..) => Kind::TooLarge,
        RegistryError::SecGroup(sg) => match sg {
            SgError::Invalid(_) => Kind::BadRequest,
            SgError::NoGroup(_)
            | SgError::NoRule(_)
            | SgError::NoDefault(_)
            | SgError::NotAttached(_) => Kind::NotFound,
            SgError::Conflict(_) | SgError::InUse(_) | SgError::TooManyRules(_) => Kind::Conflict,
        },
        RegistryError::Store(StoreError::Full(_)) => Kind::Full,
        RegistryError::Store(_) => Kind::Unavailable,
    }
}

fn registry_code(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::NotFound(_) | RegistryError::SecGroupsDisabled => "not_found",
        RegistryError::Conflict(_) | RegistryError::PasswordSet => "conflict",
        RegistryError::Busy(_) => "busy",
        RegistryError::NoEvent(_) => "no_event",
        RegistryError::EventState(_) => "event_state",
        RegistryError::WrongHost(_) => "wrong_host",
        RegistryError::Invalid(_) | RegistryError::PasswordTooLong => "invalid",
        RegistryError::QueueFull(_) => "queue_full",
        RegistryError::MessageTooLarge(..) => "too_large",
        RegistryError::SecGroup(sg) => match sg {
            SgError::Invalid(_) => "invalid",
            SgError::NoGroup(_)
            | SgError::NoRule(_)
            | SgError::NoDefault(_)
            | SgError::NotAttached(_) => "not_found",
            SgError::Conflict(_) => "conflict",
            SgError::InUse(_) => "in_use",
            SgError::TooManyRules(_) => "quota",
        },
        RegistryError::Store(StoreError::Unavailable(_)) => "store_unavailable",
        RegistryError::Store(StoreError::Full(_)) => "disk_full",
        RegistryError::Store(_) => "storage",
    }
}

impl From<cradle_install::StartError> for Error {
    fn from(e: cradle_install::StartError) -> Self {
        match e {
            cradle_install::StartError::Registry(r) => Error::Registry(r),
            cradle_install::StartError::Invalid(m) | cradle_install::StartError::NoScript(m) => {
                Error::refused(Kind::Invalid, "invalid", m)
            }
            cradle_install::StartError::Unavailable(m) => Error::unavailable("vm", m),
        }
    }
}

impl From<SgError> for Error {
    fn from(e: SgError) -> Self {
        Error::Registry(RegistryError::SecGroup(e))
    }
}
