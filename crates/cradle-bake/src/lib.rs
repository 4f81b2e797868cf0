//! Baking cradle's guest agent into an image (Trove's "make rsync for
//! guest optional": the agent and its configuration are in the image, so
//! no guest ever needs SSH to the control plane to get them).
//!
//! [`bake`] writes four entries into the ext2/3/4 filesystem of a raw disk
//! image (whole, or partition N of its MBR or GPT), in user space, with the
//! personalization writer (`cradle_personalize::apply_to_image`: debugfs,
//! no mount, no root):
//!
//! | path | what | mode |
//! |---|---|---|
//! | `/usr/local/bin/cradle-agent` | the static agent | 0755 |
//! | `/etc/cradle/agent.toml` | its configuration ([`DEFAULT_CONFIG`] unless given) | 0644 |
//! | `/etc/systemd/system/cradle-agent.service` | its unit ([`UNIT`]) | 0644 |
//! | `/etc/systemd/system/multi-user.target.wants/cradle-agent.service` | the link that enables it | link |
//!
//! all owned by root and dated 1970-01-01 (so that the same inputs give the
//! same files). Before writing, each is read back: when all four are
//! already what they would be, nothing is written and the image stays
//! byte for byte as it was (baking twice gives the same image). Every
//! check (the image, its filesystem, the paths in it) comes before the
//! first write, so an image that is refused is left untouched.
//!
//! The unit and the default configuration are the files of the
//! diskimage-builder element (`contrib/diskimage-builder/elements/
//! cradle-agent/`), included here, so both ways of baking write the same
//! bytes.

use std::path::{Path, PathBuf};

/// The agent's systemd unit.
pub const UNIT: &str =
    include_str!("../../../contrib/diskimage-builder/elements/cradle-agent/cradle-agent.service");
/// The configuration baked when none is given: every key at its default,
/// no action allowed.
pub const DEFAULT_CONFIG: &str =
    include_str!("../../../contrib/diskimage-builder/elements/cradle-agent/agent.toml");

pub const AGENT_PATH: &str = "usr/local/bin/cradle-agent";
pub const CONFIG_PATH: &str = "etc/cradle/agent.toml";
pub const UNIT_PATH: &str = "etc/systemd/system/cradle-agent.service";
pub const WANTS_PATH: &str = "etc/systemd/system/multi-user.target.wants/cradle-agent.service";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Personalize(#[from] cradle_personalize::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What goes into the image.
#[derive(Debug, Clone)]
pub struct Contents {
    /// The agent binary's bytes.
    pub agent: Vec<u8>,
    pub config: String,
}

/// One entry baked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Baked {
    File {
        path: &'static str,
        mode: u32,
        bytes: Vec<u8>,
    },
    Link {
        path: &'static str,
        target: &'static str,
    },
}

impl Baked {
    pub fn path(&self) -> &'static str {
        match self {
            Baked::File { path, .. } | Baked::Link { path, .. } => path,
        }
    }
}

/// The four entries, in the order they are written.
pub fn entries(c: &Contents) -> Vec<Baked> {
    vec![
        Baked::File {
            path: AGENT_PATH,
            mode: 0o755,
            bytes: c.agent.clone(),
        },
        Baked::File {
            path: CONFIG_PATH,
            mode: 0o644,
            bytes: c.config.as_bytes().to_vec(),
        },
        Baked::File {
            path: UNIT_PATH,
            mode: 0o644,
            bytes: UNIT.as_bytes().to_vec(),
        },
        Baked::Link {
            path: WANTS_PATH,
            target: "/etc/systemd/system/cradle-agent.service",
        },
    ]
}

/// What [`bake`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The entries were written (the paths that differed before).
    Written(Vec<&'static str>),
    /// The image already held exactly these entries: nothing was written.
    AlreadyBaked,
}

/// Bake `contents` into the ext filesystem at `partition` of `image`.
pub fn bake(image: &Path, partition: Option<u32>, contents: &Contents) -> Result<Outcome, Error> {
    let entries = entries(contents);
    let mut differ = Vec::new();
    for e in &entries {
        let found = cradle_personalize::read_back(image, partition, e.path())?;
        let same = match (e, &found) {
            (Baked::File { mode, bytes, .. }, Some(f)) => {
                f.mode == 0o100000 | mode && f.uid == 0 && f.gid == 0 && &f.content == bytes
            }
            (Baked::Link { target, .. }, Some(f)) => {
                f.mode & 0o170000 == 0o120000 && f.content == target.as_bytes()
            }
            (_, None) => false,
        };
        if !same {
            differ.push(e.path());
        }
    }
    if differ.is_empty() {
        return Ok(Outcome::AlreadyBaked);
    }
    let package = package(&entries)?;
    let limits = cradle_personalize::Limits {
        max_uncompressed: 1 << 30,
        ..Default::default()
    };
    cradle_personalize::apply_to_image(package.path(), image, partition, &limits)?;
    Ok(Outcome::Written(differ))
}

/// The entries as a personalization package (a `.tar.gz` in a temporary
/// file, removed when dropped).
fn package(entries: &[Baked]) -> Result<tempfile::NamedTempFile, Error> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| Error::Io { what, source }
    };
    let file = tempfile::Builder::new()
        .prefix("cradle-bake-")
        .suffix(".tar.gz")
        .tempfile()
        .map_err(io("cannot make a temporary file"))?;
    let gz = flate2::write::GzEncoder::new(
        file.reopen().map_err(io("cannot reopen it"))?,
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            Baked::File { path, mode, bytes } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(bytes.len() as u64);
                tar.append_data(&mut h, path, &bytes[..])
                    .map_err(io("cannot write the package"))?;
            }
            Baked::Link { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path, target)
                    .map_err(io("cannot write the package"))?;
            }
        }
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .and_then(|f| f.sync_all())
        .map_err(io("cannot write the package"))?;
    Ok(file)
}

/// The agent's bytes and the configuration's text, read from `agent` and
/// `config` (the default configuration when `None`).
pub fn read_contents(agent: &Path, config: Option<&PathBuf>) -> Result<Contents, Error> {
    let agent_bytes = std::fs::read(agent).map_err(|source| Error::Io {
        what: format!("cannot read the agent {}", agent.display()),
        source,
    })?;
    let config = match config {
        None => DEFAULT_CONFIG.to_string(),
        Some(p) => std::fs::read_to_string(p).map_err(|source| Error::Io {
            what: format!("cannot read the configuration {}", p.display()),
            source,
        })?,
    };
    Ok(Contents {
        agent: agent_bytes,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_agent_from_where_it_is_baked_and_is_wanted_by_multi_user() {
        assert!(UNIT.contains(&format!(
            "ExecStart=/{AGENT_PATH} guest --config /{CONFIG_PATH}"
        )));
        assert!(UNIT.contains("WantedBy=multi-user.target"));
        assert!(WANTS_PATH.starts_with("etc/systemd/system/multi-user.target.wants/"));
        // The default configuration allows nothing.
        let actions = DEFAULT_CONFIG.split("[actions]").nth(1).unwrap();
        assert!(
            actions
                .lines()
                .all(|l| l.trim().is_empty() || l.starts_with('#'))
        );
    }
}
