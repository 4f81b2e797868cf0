//! The environment an OS script gets, as the Ganeti OS API defines it.
//!
//! Nothing is inherited from cradle's own environment. Public and private
//! parameters are `OSP_<NAME>` (upper-cased); secret parameters are never
//! in the environment (another process of the same user can read
//! `/proc/PID/environ`): [`crate::run`] hands them over an inherited pipe
//! whose descriptor is named by `CRADLE_SECRETS_FD`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cradle_model::OsParams;

use crate::OsDefinition;

/// The `PATH` scripts get.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One disk of the instance, as the script sees it.
#[derive(Clone, Debug)]
pub struct Disk {
    pub path: PathBuf,
    pub writable: bool,
}

/// Environment variables for one script run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment(BTreeMap<String, String>);

impl Environment {
    /// What every script gets: the API version, the OS and its variant.
    pub fn for_os(os: &OsDefinition, variant: Option<&str>) -> Environment {
        let mut e = BTreeMap::new();
        e.insert("OS_API_VERSION".into(), os.api_version.to_string());
        e.insert("OS_NAME".into(), os.name.clone());
        e.insert(
            "INSTANCE_OS".into(),
            match variant {
                Some(v) => format!("{}+{v}", os.name),
                None => os.name.clone(),
            },
        );
        if let Some(v) = variant {
            e.insert("OS_VARIANT".into(), v.to_string());
        }
        e.insert("DEBUG_LEVEL".into(), "0".into());
        e.insert("PATH".into(), PATH.into());
        Environment(e)
    }

    /// The instance the script works on.
    pub fn instance(mut self, name: &str, hypervisor: &str) -> Environment {
        self.0.insert("INSTANCE_NAME".into(), name.to_string());
        self.0.insert("HYPERVISOR".into(), hypervisor.to_string());
        self
    }

    /// `DISK_COUNT`, and `DISK_<n>_PATH` and `DISK_<n>_ACCESS` (`rw` or
    /// `ro`) from 0.
    pub fn disks(mut self, disks: &[Disk]) -> Environment {
        self.0.insert("DISK_COUNT".into(), disks.len().to_string());
        for (i, d) in disks.iter().enumerate() {
            self.0
                .insert(format!("DISK_{i}_PATH"), d.path.display().to_string());
            self.0.insert(
                format!("DISK_{i}_ACCESS"),
                if d.writable { "rw" } else { "ro" }.into(),
            );
        }
        self
    }

    /// Public and private parameters as `OSP_<NAME>`; secret ones are left
    /// out (they travel over the secrets pipe).
    pub fn params(mut self, p: &OsParams) -> Environment {
        for (k, v) in &p.public {
            self.0.insert(osp(k), v.clone());
        }
        for (k, v) in &p.private {
            self.0.insert(osp(k), v.expose().clone());
        }
        self
    }

    /// Set one more variable.
    pub fn set(mut self, key: &str, value: &str) -> Environment {
        self.0.insert(key.to_string(), value.to_string());
        self
    }

    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

/// The variable a parameter becomes.
pub fn osp(name: &str) -> String {
    format!("OSP_{}", name.to_ascii_uppercase())
}
