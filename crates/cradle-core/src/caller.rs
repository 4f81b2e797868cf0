//! Who asks, and what they may do: [`authorize`] is the one place that
//! decides, and every operation calls it before it reads or changes
//! anything. Front ends only establish who the caller is (the admin API
//! from its bearer token); none of them decides what a caller may do.
//!
//! A caller acts for projects (tenants): every project, for the main token
//! and the `admin` role, or the ones its token names. What belongs to
//! another project is, to it, what does not exist.

use std::collections::BTreeSet;

use crate::Error;

/// The role that may do operator-only things: reset an instance's state,
/// move it between projects, apply the firewall, read packages from the
/// server's own files. It acts for every project.
pub const ADMIN_ROLE: &str = "admin";

/// The projects a caller acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Projects {
    All,
    /// These, and no other (none at all: the caller may only ask who it is).
    Only(BTreeSet<String>),
}

/// An authenticated operator, as the admin API found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub roles: Vec<String>,
    pub projects: Projects,
}

impl From<&Caller> for cradle_model::answers::CallerView {
    fn from(c: &Caller) -> Self {
        let projects = match &c.projects {
            Projects::All => None,
            Projects::Only(p) => Some(p.iter().cloned().collect()),
        };
        cradle_model::answers::CallerView {
            name: c.name.clone(),
            roles: c.roles.clone(),
            all_projects: projects.is_none(),
            projects: projects.unwrap_or_default(),
        }
    }
}

impl Caller {
    /// The server itself (`serve --demo` registering its instance).
    pub fn system() -> Caller {
        Caller::admin("cradle")
    }

    /// A caller with the admin role, acting for every project.
    pub fn admin(name: &str) -> Caller {
        Caller {
            name: name.into(),
            roles: vec![ADMIN_ROLE.into()],
            projects: Projects::All,
        }
    }

    /// A named token's caller: its roles, and the projects it names (every
    /// project with the admin role).
    pub fn named(
        name: &str,
        roles: Vec<String>,
        projects: impl IntoIterator<Item = String>,
    ) -> Caller {
        let projects = if roles.iter().any(|r| r == ADMIN_ROLE) {
            Projects::All
        } else {
            Projects::Only(projects.into_iter().collect())
        };
        Caller {
            name: name.into(),
            roles,
            projects,
        }
    }

    pub fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether the caller acts for `project`.
    pub fn acts_for(&self, project: &str) -> bool {
        match &self.projects {
            Projects::All => true,
            Projects::Only(p) => p.contains(project),
        }
    }
}

/// What an operation asks to do, and to what.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action<'a> {
    /// Read an instance of `project` or what hangs off it (events, job,
    /// VM, drive).
    See { project: &'a str },
    /// Change it, talk to it on the channel, run or install it.
    Change { project: &'a str },
    /// Register an instance in `project`.
    Create { project: &'a str },
    /// Move an instance to another project.
    MoveProject,
    /// Clear an instance's error state.
    ResetState,
    /// Read a package from a `file://` URL, with the server's own rights.
    ReadServerFile { purpose: &'static str },
    /// Point a package URL at another host without giving its credentials
    /// again, so that the old host's credentials go to the new one.
    CarryCredentials,
    /// Read or change a tenant's security groups.
    Tenant { tenant: &'a str },
    /// See what spans every project: the firewall's ruleset, the server's
    /// metrics.
    SeeServer,
    /// Replace the firewall's table.
    ApplyFirewall,
    /// Move an instance to another host, or take one in.
    Migrate,
    /// Read the public keys that verify guests' identity documents and
    /// tokens: public by nature, so any authenticated caller may.
    ReadPublicKeys,
}

/// Whether `caller` may do `action`. Operator-only actions need the admin
/// role; everything else needs the project it touches. Refusals are 403:
/// callers that look instances up turn them into "not found" themselves
/// ([`crate::Core`]'s `visible`), so no instance of another project is
/// confirmed to exist.
pub(crate) fn authorize(caller: &Caller, action: Action<'_>) -> Result<(), Error> {
    let admin_only = |what: &str| {
        if caller.has(ADMIN_ROLE) {
            Ok(())
        } else {
            Err(Error::forbidden(format!(
                "{what} needs the {ADMIN_ROLE:?} role"
            )))
        }
    };
    let project = |p: &str, what: &str| {
        if caller.acts_for(p) {
            Ok(())
        } else {
            Err(Error::forbidden(format!(
                "{what} {p:?} is not one this token acts for"
            )))
        }
    };
    match action {
        Action::See { project: p } | Action::Change { project: p } => project(p, "project"),
        Action::Create { project: p } => project(p, "project"),
        Action::Tenant { tenant } => project(tenant, "tenant"),
        Action::SeeServer => match caller.projects {
            Projects::All => Ok(()),
            Projects::Only(_) => Err(Error::forbidden(
                "this spans every project: it needs a token that acts for all of them",
            )),
        },
        Action::MoveProject => admin_only("moving an instance to another project"),
        Action::ResetState => admin_only("resetting an instance's state"),
        Action::ReadServerFile { purpose } => admin_only(&format!("{purpose} a file:// package")),
        Action::CarryCredentials => admin_only(
            "pointing personalization_url at another host without giving its \
             credentials (os_params.secret personalization_*) again",
        ),
        Action::ApplyFirewall => admin_only("applying the firewall"),
        Action::Migrate => admin_only("migrating an instance to another host"),
        Action::ReadPublicKeys => Ok(()),
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
