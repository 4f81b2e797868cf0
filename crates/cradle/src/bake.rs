//! `cradle bake IMAGE`: the guest agent, its configuration and its enabled
//! systemd unit, written into an ext4 guest image (`cradle-bake`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

pub const ABOUT: &str = "\
Writes /usr/local/bin/cradle-agent (the static agent), /etc/cradle/agent.toml (--config, or the \
default: no action allowed), /etc/systemd/system/cradle-agent.service and its \
multi-user.target.wants link into the ext2/3/4 filesystem of a raw image, in user space (debugfs: \
no mount, no root). The agent must be static (`cargo xtask agent`) and the configuration is \
checked by the agent itself (`cradle-agent guest --check-config`) before anything is written; an \
image that is refused is left byte for byte as it was, and baking an image that already holds \
exactly these files writes nothing. The configuration is a file of the image: never put a \
secret in it. See docs/baking.md.\n\nExample:\n  cradle bake debian.img --config agent.toml\n  \
cradle bake disk.img --partition 1";

#[derive(Args, Debug)]
pub struct BakeArgs {
    /// The raw disk image (the whole image an ext filesystem, or see --partition).
    image: PathBuf,
    /// The static agent [default: cradle-agent beside this binary].
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// The agent's configuration [default: every key at its default, no action allowed].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The filesystem is partition N (from 1) of the image's MBR or GPT.
    #[arg(long, value_name = "N")]
    partition: Option<u32>,
}

pub fn run(a: BakeArgs) -> Result<()> {
    let agent = match a.agent {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this binary's directory")?
            .with_file_name("cradle-agent"),
    };
    if !a.image.is_file() {
        bail!("{}: no such image file", a.image.display());
    }
    cradle_appliance::check_agent(&agent)?;
    let contents = cradle_bake::read_contents(&agent, a.config.as_ref())?;
    check_config(&agent, &contents.config)?;
    match cradle_bake::bake(&a.image, a.partition, &contents)? {
        cradle_bake::Outcome::AlreadyBaked => {
            println!("{}: already baked; nothing written", a.image.display())
        }
        cradle_bake::Outcome::Written(paths) => {
            println!("{}: baked", a.image.display());
            for p in paths {
                println!("  /{p}");
            }
        }
    }
    Ok(())
}

/// The agent's own verdict on `config` (`cradle-agent guest --check-config`).
fn check_config(agent: &std::path::Path, config: &str) -> Result<()> {
    let mut f = tempfile::Builder::new()
        .prefix("agent-")
        .suffix(".toml")
        .tempfile()?;
    std::io::Write::write_all(&mut f, config.as_bytes())?;
    let out = Command::new(agent)
        .args(["guest", "--check-config"])
        .arg(f.path())
        .output()
        .with_context(|| format!("cannot run {}", agent.display()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why
            .trim()
            .replace(&f.path().display().to_string(), "the configuration");
        bail!("the agent refuses the configuration: {why}");
    }
    Ok(())
}
