//! The runner: [`Nft`] runs `nft` (optionally in a network namespace,
//! through `ip netns exec`) to apply documents and list tables, and
//! [`NftEnforcer`] keeps one table as the registry says by applying
//! [`Firewall`]'s plans with it. This is the only part that spawns
//! processes; what to apply is decided in `plan` and `render`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde_json::Value;
use uuid::Uuid;

use super::layout::Present;
use super::netlink::{Netlink, NetlinkError};
use super::plan::{Listed, OpRef, OutOfTags};
use super::{Firewall, MarkBits, Plan, Skipped};
use crate::{Enforced, Members, Update};

const FAMILY: &str = "inet";

// ---- running nft ---------------------------------------------------------

/// How to run nft.
#[derive(Debug, Clone)]
pub struct Nft {
    /// The nft program: a path, or a name looked up in `PATH`.
    pub program: PathBuf,
    /// Run it in this network namespace (`ip netns exec NS nft ...`).
    pub netns: Option<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Nft {
            program: PathBuf::from("nft"),
            netns: None,
        }
    }
}

/// nft failed, or could not be run.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("{program} not found: install nftables (or set the path to nft)")]
    Missing { program: String },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// nft said no; `stderr` is what it printed, trimmed (and cut after
    /// 4 KiB), possibly nothing (an nft killed, or a broken wrapper).
    #[error("`{command}` failed ({status}){}", said(.stderr))]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` printed something that is not nft's JSON: {message}")]
    Output { command: String, message: String },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    OutOfTags(#[from] OutOfTags),
}

/// What nft printed, for [`NftError::Failed`]: an empty complaint is said
/// so, rather than ending the message on a bare colon.
fn said(stderr: &str) -> String {
    if stderr.is_empty() {
        " and printed nothing on stderr".into()
    } else {
        format!(": {stderr}")
    }
}

/// At most this much of nft's complaint is kept: with JSON input it quotes
/// the failing command, which can be long.
const MAX_STDERR: usize = 4096;

fn locate(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

impl Nft {
    /// nft from `PATH`, in the current namespace.
    pub fn new() -> Self {
        Nft::default()
    }

    /// The same nft, run in network namespace `netns`.
    pub fn in_netns(mut self, netns: impl Into<String>) -> Self {
        self.netns = Some(netns.into());
        self
    }

    /// Apply a ruleset written in nft's own language (`nft -f -`), as one
    /// transaction: for small fixed tables whose text is clearer than
    /// their JSON (the install jobs' fences).
    pub fn apply_text(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(script.as_bytes().to_vec()))
            .map(drop)
    }

    /// The table as nft lists it (`nft -j list table inet NAME`).
    pub fn list_table(&self, table: &str) -> Result<Value, NftError> {
        self.list(&["list", "table", FAMILY, table])
    }

    /// `nft -j ARGS` (a `list` command), parsed.
    pub fn list(&self, args: &[&str]) -> Result<Value, NftError> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.run(&full, None)?;
        serde_json::from_slice(&out).map_err(|e| NftError::Output {
            command: self.describe(&full),
            message: e.to_string(),
        })
    }

    fn describe(&self, args: &[&str]) -> String {
        let mut s = String::new();
        if let Some(ns) = &self.netns {
            s.push_str(&format!("ip netns exec {ns} "));
        }
        s.push_str(&self.program.display().to_string());
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    fn run(&self, args: &[&str], input: Option<Vec<u8>>) -> Result<Vec<u8>, NftError> {
        let program = locate(&self.program).ok_or_else(|| NftError::Missing {
            program: self.program.display().to_string(),
        })?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let ip = locate(Path::new("ip")).ok_or_else(|| NftError::Missing {
                    program: "ip (iproute2, for `ip netns exec`)".into(),
                })?;
                let mut cmd = Command::new(ip);
                cmd.args([OsString::from("netns"), "exec".into(), ns.into()])
                    .arg(&program);
                cmd
            }
            None => Command::new(&program),
        };
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| NftError::Spawn {
            program: program.display().to_string(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let writer = match (input, child.stdin.take()) {
            // A thread, so that a chatty nft cannot block us on a full pipe
            // while we are still writing.
            (Some(bytes), Some(mut stdin)) => {
                Some(std::thread::spawn(move || stdin.write_all(&bytes)))
            }
            _ => None,
        };
        let out = child.wait_with_output().map_err(spawn_err)?;
        let written = writer.map(|w| w.join());
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if stderr.len() > MAX_STDERR {
                let mut cut = MAX_STDERR;
                while !stderr.is_char_boundary(cut) {
                    cut -= 1;
                }
                stderr.truncate(cut);
                stderr.push_str(" [...]");
            }
            return Err(NftError::Failed {
                command: self.describe(args),
                status: out.status.to_string(),
                stderr,
            });
        }
        if let Some(Ok(Err(e))) = written {
            return Err(spawn_err(e));
        }
        Ok(out.stdout)
    }
}

// ---- the enforcer --------------------------------------------------------

/// Keeps one nftables table equal to what it is given, through
/// [`Firewall`] plans: the skeleton with `nft -f` (when it changes), the
/// elements over a netlink socket kept open. Calls are serialized; the
/// applied state changes only when the kernel took the change.
pub struct NftEnforcer {
    nft: Nft,
    netlink: Mutex<Option<Netlink>>,
    fw: Mutex<Firewall>,
}

impl NftEnforcer {
    pub fn new(nft: Nft, table: impl Into<String>) -> Self {
        NftEnforcer::with_mark(nft, table, MarkBits::DEFAULT)
    }

    /// Group tags in the mark bits `mark` (see [`MarkBits`]).
    pub fn with_mark(nft: Nft, table: impl Into<String>, mark: MarkBits) -> Self {
        NftEnforcer {
            nft,
            netlink: Mutex::new(None),
            fw: Mutex::new(Firewall::with_mark(table, mark)),
        }
    }

    pub fn nft(&self) -> &Nft {
        &self.nft
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Firewall> {
        self.fw.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the applied state.
    pub fn applied(&self) -> Firewall {
        self.lock().clone()
    }

    /// How many elements the table holds (without copying the state).
    pub fn elements(&self) -> usize {
        self.lock().elements()
    }

    /// Instances given but not enforced (see [`Firewall::unenforced`]).
    /// They are not errors: the rest is applied, and applying again would
    /// not change them.
    pub fn unenforced(&self) -> Vec<Skipped> {
        self.lock().unenforced()
    }

    /// Replace the table's contents with exactly these instances and the
    /// members of the groups their rules name. The elements are replaced in
    /// one batch, so no packet sees a table half old and half new.
    pub fn full(
        &self,
        instances: Vec<Enforced>,
        groups: BTreeMap<Uuid, Members>,
    ) -> Result<(), NftError> {
        let mut fw = self.lock();
        let plan = fw.plan_full(instances, &groups)?;
        let mut present = Present::default();
        self.with_netlink(|nl| {
            present = nl.present(fw.table())?;
            Ok(())
        })?;
        self.nft.apply_text(&plan.script(Some(&present)))?;
        let table = fw.table().to_string();
        self.with_netlink(|nl| {
            let mut listed = Listed::new();
            for set in plan.sets() {
                let elems = nl.elements(&table, &set.name())?;
                let tags = elems.into_iter().map(|(key, chain)| {
                    let tag = chain.and_then(|c| c.strip_prefix("id-")?.parse().ok());
                    (key, tag)
                });
                listed.insert(set, tags.collect());
            }
            let (dels, adds) = plan.against(&listed);
            let ops: Vec<OpRef> = dels
                .iter()
                .map(|e| (false, e))
                .chain(adds.into_iter().map(|e| (true, e)))
                .collect();
            nl.apply(&table, &ops)
        })?;
        let cleanup = plan.cleanup(&present);
        fw.commit(plan);
        if !cleanup.is_empty() {
            // What is left is unused and harmless; the next full apply
            // tries again.
            if let Err(e) = self.nft.apply_text(&cleanup) {
                tracing::warn!(error = %e, "unused group tag chains stay in the table");
            }
        }
        Ok(())
    }

    /// Apply one change. On failure nothing of the elements changed (the
    /// kernel applies a batch all or nothing) and the applied state stays
    /// as it was; the caller should apply the full ruleset again.
    pub fn update(&self, update: &Update) -> Result<(), NftError> {
        let mut fw = self.lock();
        let Some(plan) = fw.plan_update(update)? else {
            return Ok(());
        };
        let script = plan.script(None);
        if !script.is_empty() {
            self.nft.apply_text(&script)?;
        }
        self.apply_elements(fw.table(), &plan)?;
        fw.commit(plan);
        Ok(())
    }

    fn apply_elements(&self, table: &str, plan: &Plan) -> Result<(), NftError> {
        self.with_netlink(|nl| nl.apply(table, &plan.pairs()))
    }

    /// Run `f` with the netlink socket, opened on first use. A socket that
    /// failed is not trusted again.
    fn with_netlink(
        &self,
        f: impl FnOnce(&mut Netlink) -> Result<(), NetlinkError>,
    ) -> Result<(), NftError> {
        let mut nl = self.netlink.lock().unwrap_or_else(|e| e.into_inner());
        if nl.is_none() {
            *nl = Some(Netlink::open(self.nft.netns.as_deref())?);
        }
        let result = f(nl.as_mut().expect("just opened"));
        if let Err(NetlinkError::Io(_)) = &result {
            *nl = None;
        }
        Ok(result?)
    }
}

impl crate::Enforce for NftEnforcer {
    fn full(
        &self,
        instances: Vec<Enforced>,
        groups: BTreeMap<Uuid, Members>,
    ) -> Result<(), String> {
        NftEnforcer::full(self, instances, groups).map_err(|e| e.to_string())
    }

    fn update(&self, update: &Update) -> Result<(), String> {
        NftEnforcer::update(self, update).map_err(|e| e.to_string())
    }
}
