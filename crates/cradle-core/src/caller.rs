//! Who asks, and what they may do: [`authorize`] is the one place that
//! decides, and every operation calls it before it reads or changes
//! anything. Front ends only establish who the caller is (the admin API
//! from its bearer token); none of them decides what a caller may do.

use crate::Error;

/// The role that may do operator-only things: reset an instance's state,
/// apply the firewall, read packages from the server's own files.
pub const ADMIN_ROLE: &str = "admin";

/// An authenticated operator, as the admin API found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub roles: Vec<String>,
}

impl Caller {
    /// The server itself (`serve --demo` registering its instance).
    pub fn system() -> Caller {
        Caller {
            name: "cradle".into(),
            roles: vec![ADMIN_ROLE.into()],
        }
    }

    pub fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// What an operation asks to do.
///
/// The variants say what is done, not yet to what: while every caller
/// acts for every project, no decision needs the instance or the tenant.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action {
    /// Read an instance or what hangs off it (events, job, VM, drive).
    See,
    /// Change it, talk to it on the channel, run or install it.
    Change,
    /// Register an instance.
    Create,
    /// Clear an instance's error state.
    ResetState,
    /// Read a package from a `file://` URL, with the server's own rights.
    ReadServerFile { purpose: &'static str },
    /// Read or change a tenant's security groups.
    Tenant,
    /// See the firewall's ruleset, or the server's metrics.
    SeeServer,
    /// Replace the firewall's table.
    ApplyFirewall,
}

/// Whether `caller` may do `action`. Every authenticated caller may do
/// everything but the operator-only actions.
pub(crate) fn authorize(caller: &Caller, action: Action) -> Result<(), Error> {
    let admin_only = |what: &str| {
        if caller.has(ADMIN_ROLE) {
            Ok(())
        } else {
            Err(Error::forbidden(format!(
                "{what} needs the {ADMIN_ROLE:?} role"
            )))
        }
    };
    match action {
        Action::See | Action::Change | Action::Create | Action::Tenant | Action::SeeServer => {
            Ok(())
        }
        Action::ResetState => admin_only("resetting an instance's state"),
        Action::ReadServerFile { purpose } => admin_only(&format!("{purpose} a file:// package")),
        Action::ApplyFirewall => admin_only("applying the firewall"),
    }
}

/// The authorization a package URL needs beyond the instance's own: a
/// `file://` URL is read with the server's rights.
pub(crate) fn authorize_package(
    caller: &Caller,
    url: Option<&str>,
    purpose: &'static str,
) -> Result<(), Error> {
    match url {
        Some(u) if u.starts_with("file://") => {
            authorize(caller, Action::ReadServerFile { purpose })
        }
        _ => Ok(()),
    }
}
