//! Finding and checking OS definitions: one directory per OS under a
//! search path, laid out as the Ganeti OS API has it, plus an `untrusted/`
//! subdirectory whose files only ever run inside the install appliance.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Error;

/// The OS API versions cradle speaks, highest first.
pub const API_VERSIONS: &[u32] = &[20, 15];
/// At most this many files in `untrusted/`, each at most this large: they
/// are served to the appliance over the metadata service.
pub const MAX_UNTRUSTED_FILES: usize = 64;
pub const MAX_UNTRUSTED_BYTES: u64 = 1 << 20;

/// What an OS script does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Create,
    Export,
    Import,
    Rename,
    Verify,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Create,
        Operation::Export,
        Operation::Import,
        Operation::Rename,
        Operation::Verify,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Export => "export",
            Operation::Import => "import",
            Operation::Rename => "rename",
            Operation::Verify => "verify",
        }
    }
}

/// A parameter the OS declares in `parameters.list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Parameter {
    pub name: String,
    pub description: String,
}

/// A file of `untrusted/`: served to the appliance, never run on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UntrustedFile {
    pub path: PathBuf,
    pub bytes: u64,
}

/// One checked OS definition.
#[derive(Clone, Debug, Serialize)]
pub struct OsDefinition {
    pub name: String,
    pub dir: PathBuf,
    /// The highest version both the OS and cradle speak.
    pub api_version: u32,
    pub variants: Vec<String>,
    pub parameters: Vec<Parameter>,
    /// Scripts that run on the host, as an unprivileged user.
    pub trusted: BTreeMap<Operation, PathBuf>,
    /// Every file of `untrusted/`, by name.
    pub untrusted: BTreeMap<String, UntrustedFile>,
}

/// `debian+minimal` → (`debian`, `Some("minimal")`), as Ganeti writes it.
pub fn split_name(full: &str) -> (&str, Option<&str>) {
    match full.split_once('+') {
        Some((n, v)) => (n, Some(v)),
        None => (full, None),
    }
}

/// A search path written like `PATH`: directories separated by `:`.
pub fn search_path(s: &str) -> Vec<PathBuf> {
    s.split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// An OS, variant or file name: letters, digits, `.`, `_` and `-`, not
/// starting with `.`, at most 64 bytes.
fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One entry of a listing: a name found in the search path and whether its
/// definition is good.
pub struct Listed {
    pub name: String,
    pub dir: PathBuf,
    pub definition: Result<OsDefinition, Error>,
}

/// Every OS in the search path, by name. A name in an earlier directory
/// hides the same name later, as `PATH` does. Missing directories are
/// skipped.
pub fn list(search: &[PathBuf]) -> Vec<Listed> {
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for root in search {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            found.entry(name).or_insert_with(|| e.path());
        }
    }
    found
        .into_iter()
        .map(|(name, dir)| Listed {
            definition: load(&name, &dir),
            name,
            dir,
        })
        .collect()
}

/// The OS named `name` (without a variant) in the search path.
pub fn find(search: &[PathBuf], name: &str) -> Result<OsDefinition, Error> {
    if !is_name(name) {
        return Err(Error::NotFound {
            name: name.to_string(),
            path: display_search_path(search),
        });
    }
    for root in search {
        let dir = root.join(name);
        if dir.is_dir() {
            return load(name, &dir);
        }
    }
    Err(Error::NotFound {
        name: name.to_string(),
        path: display_search_path(search),
    })
}

/// A search path as it is written: directories joined by `:`.
pub fn display_search_path(search: &[PathBuf]) -> String {
    if search.is_empty() {
        return "empty".into();
    }
    search
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Read and check the definition in `dir`.
pub fn load(name: &str, dir: &Path) -> Result<OsDefinition, Error> {
    let bad = |reason: String| Error::Invalid {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        reason,
    };
    if !is_name(name) {
        return Err(bad(
            "the name must be letters, digits, '.', '_' and '-' (not starting with '.')".into(),
        ));
    }
    let meta = std::fs::metadata(dir).map_err(|e| bad(format!("cannot read it: {e}")))?;
    check_not_writable_by_others(&meta, "the directory").map_err(&bad)?;

    let text = |file: &str| -> Result<Option<String>, Error> {
        match std::fs::read_to_string(dir.join(file)) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(bad(format!("cannot read {file}: {e}"))),
        }
    };
    let lines = |t: &str| -> Vec<String> {
        t.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };

    let Some(versions) = text("ganeti_api_version")? else {
        return Err(bad("has no ganeti_api_version file".into()));
    };
    let mut spoken = Vec::new();
    for l in lines(&versions) {
        let v: u32 = l
            .parse()
            .map_err(|_| bad(format!("ganeti_api_version: {l:?} is not a version number")))?;
        spoken.push(v);
    }
    let Some(&api_version) = API_VERSIONS.iter().find(|v| spoken.contains(v)) else {
        return Err(bad(format!(
            "speaks OS API {spoken:?}; cradle speaks {API_VERSIONS:?}"
        )));
    };

    let mut variants = Vec::new();
    for v in lines(&text("variants.list")?.unwrap_or_default()) {
        if !is_name(&v) {
            return Err(bad(format!("variants.list: {v:?} is not a variant name")));
        }
        if variants.contains(&v) {
            return Err(bad(format!("variants.list: {v:?} is listed twice")));
        }
        variants.push(v);
    }

    let mut parameters: Vec<Parameter> = Vec::new();
    for l in lines(&text("parameters.list")?.unwrap_or_default()) {
        let (name, description) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(bad(format!(
                "parameters.list: {name:?} is not a parameter name (1-64 letters, digits, '_')"
            )));
        }
        if parameters.iter().any(|p| p.name.eq_ignore_ascii_case(name)) {
            return Err(bad(format!("parameters.list: {name:?} is listed twice")));
        }
        parameters.push(Parameter {
            name: name.to_string(),
            description: description.trim().to_string(),
        });
    }

    let mut trusted = BTreeMap::new();
    for op in Operation::ALL {
        let p = dir.join(op.as_str());
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if !meta.is_file() {
            return Err(bad(format!("{} is not a regular file", op.as_str())));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(bad(format!("{} is not executable", op.as_str())));
        }
        check_not_writable_by_others(&meta, op.as_str()).map_err(&bad)?;
        trusted.insert(op, p);
    }

    let mut untrusted = BTreeMap::new();
    let udir = dir.join("untrusted");
    match std::fs::symlink_metadata(&udir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(format!("cannot read untrusted/: {e}"))),
        Ok(m) if !m.is_dir() => return Err(bad("untrusted is not a directory".into())),
        Ok(_) => {
            let entries = std::fs::read_dir(&udir)
                .map_err(|e| bad(format!("cannot read untrusted/: {e}")))?;
            for e in entries {
                let e = e.map_err(|e| bad(format!("cannot read untrusted/: {e}")))?;
                let fname = e.file_name().to_string_lossy().into_owned();
                // Not followed: a link could hand the appliance any file of
                // the host.
                let m = std::fs::symlink_metadata(e.path())
                    .map_err(|err| bad(format!("cannot read untrusted/{fname}: {err}")))?;
                if !m.is_file() {
                    return Err(bad(format!(
                        "untrusted/{fname} is not a regular file (links and directories are refused)"
                    )));
                }
                if !is_name(&fname) {
                    return Err(bad(format!(
                        "untrusted/{fname:?} is not a file name cradle serves"
                    )));
                }
                if m.len() > MAX_UNTRUSTED_BYTES {
                    return Err(bad(format!(
                        "untrusted/{fname} is {} bytes; at most {MAX_UNTRUSTED_BYTES}",
                        m.len()
                    )));
                }
                untrusted.insert(
                    fname,
                    UntrustedFile {
                        path: e.path(),
                        bytes: m.len(),
                    },
                );
            }
            if untrusted.len() > MAX_UNTRUSTED_FILES {
                return Err(bad(format!(
                    "untrusted/ holds {} files; at most {MAX_UNTRUSTED_FILES}",
                    untrusted.len()
                )));
            }
        }
    }

    let has = |op: Operation| trusted.contains_key(&op) || untrusted.contains_key(op.as_str());
    if !has(Operation::Create) {
        return Err(bad(
            "has no create script (neither create nor untrusted/create)".into(),
        ));
    }
    Ok(OsDefinition {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        api_version,
        variants,
        parameters,
        trusted,
        untrusted,
    })
}

/// A trusted script, or the directory holding it, that another user could
/// change would let that user run code as cradle's script user.
fn check_not_writable_by_others(meta: &std::fs::Metadata, what: &str) -> Result<(), String> {
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(format!("{what} is writable by group or others"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(format!(
            "{what} is owned by uid {}, neither root nor cradle (uid {euid})",
            meta.uid()
        ));
    }
    Ok(())
}

/// Where an operation's scripts run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Host,
    Appliance,
    Both,
}

impl OsDefinition {
    /// The untrusted script for `op`, if the OS has one.
    pub fn untrusted_script(&self, op: Operation) -> Option<&UntrustedFile> {
        self.untrusted.get(op.as_str())
    }

    /// Where `op` runs: its trusted script on the host, its untrusted one
    /// in the appliance, or both; `None` when the OS has neither.
    pub fn placement(&self, op: Operation) -> Option<Placement> {
        match (
            self.trusted.contains_key(&op),
            self.untrusted_script(op).is_some(),
        ) {
            (true, true) => Some(Placement::Both),
            (true, false) => Some(Placement::Host),
            (false, true) => Some(Placement::Appliance),
            (false, false) => None,
        }
    }

    /// `variant` must be one the OS lists; an OS that lists variants needs one.
    pub fn check_variant(&self, variant: Option<&str>) -> Result<(), Error> {
        let bad = |m: String| Error::Parameters(format!("OS {}: {m}", self.name));
        match variant {
            None if !self.variants.is_empty() => Err(bad(format!(
                "a variant is required: {}",
                self.variants.join(", ")
            ))),
            Some(v) if !self.variants.iter().any(|x| x == v) => {
                Err(bad(if self.variants.is_empty() {
                    format!("has no variants, so {v:?} is not one")
                } else {
                    format!(
                        "{v:?} is not a variant; it has {}",
                        self.variants.join(", ")
                    )
                }))
            }
            _ => Ok(()),
        }
    }

    /// Every parameter given must be declared in `parameters.list` (an OS
    /// without one takes none), ignoring case as OSP_<NAME> does.
    pub fn check_parameters<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Error> {
        for n in names {
            if !self
                .parameters
                .iter()
                .any(|p| p.name.eq_ignore_ascii_case(n))
            {
                let known: Vec<&str> = self.parameters.iter().map(|p| p.name.as_str()).collect();
                return Err(Error::Parameters(format!(
                    "OS {} does not take parameter {n:?} ({})",
                    self.name,
                    if known.is_empty() {
                        "it declares none".to_string()
                    } else {
                        format!("it takes {}", known.join(", "))
                    }
                )));
            }
        }
        Ok(())
    }
}
