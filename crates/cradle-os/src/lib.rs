//! OS definitions, as the Ganeti OS API lays them out (seed 003): a
//! directory per OS under a search path, with `create`, `export`,
//! `import`, `rename` and `verify` scripts, `ganeti_api_version`,
//! `variants.list` and `parameters.list`, plus cradle's `untrusted/`
//! subdirectory, whose scripts never run on the host: the install appliance
//! runs them, with the instance's disks attached.
//!
//! [`definition`] finds and checks definitions; [`env`] builds the
//! environment scripts get; [`run`] runs a trusted script on the host as an
//! unprivileged user, with no shell and its secrets on a pipe.

pub mod definition;
pub mod env;
pub mod run;

pub use definition::{
    API_VERSIONS, Listed, Operation, OsDefinition, Parameter, Placement, UntrustedFile,
    display_search_path, find, list, load, search_path, split_name,
};
pub use env::{Disk, Environment, osp};
pub use run::{
    DATA_CHUNK, DataSink, Finished, Runner, SECRETS_FD, SecretsHandoff, Streams, User, read_full,
    run_trusted, run_trusted_with, running_as_root,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no OS definition {name:?} in the search path ({path})")]
    NotFound { name: String, path: String },
    /// The definition on disk is not one cradle will use.
    #[error("OS definition {name:?} ({}): {reason}", dir.display())]
    Invalid {
        name: String,
        dir: std::path::PathBuf,
        reason: String,
    },
    /// A variant or parameter the OS does not take.
    #[error("{0}")]
    Parameters(String),
    #[error("script user {name:?}: {reason}")]
    User { name: String, reason: String },
    #[error("{script} ran past its {}s deadline and was killed", after.as_secs())]
    Timeout {
        script: String,
        after: std::time::Duration,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
