//! `cargo xtask afterburn`: afterburn, the metadata agent of Fedora CoreOS
//! and Flatcar, built from crates.io at a pinned version for the test that
//! runs it against `cradle serve` (crates/cradle/tests/it/afterburn.rs).
//!
//! It is built once into a cache outside the checkout
//! (`$XDG_CACHE_HOME/cradle-ci/afterburn-<version>`, else under
//! `~/.cache`), so later runs and fresh clones on the same machine reuse
//! it. The build goes to a temporary directory renamed into place when it
//! is whole: an interrupted build leaves nothing that looks done. None of
//! it is linked into cradle (afterburn links OpenSSL through reqwest's
//! native TLS; that is its business as a peer we test against).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The release the test is written against.
pub const VERSION: &str = "5.11.0";

/// The directory `cargo install --root` fills; the binary is `bin/afterburn`.
pub fn root() -> Result<PathBuf> {
    Ok(crate::ci_cache_dir()?.join(format!("afterburn-{VERSION}")))
}

/// The binary, built if it is not there yet or is not the pinned version.
pub fn ensure() -> Result<PathBuf> {
    let root = root()?;
    let bin = root.join("bin/afterburn");
    println!("==> afterburn {VERSION} for the afterburn test");
    if let Some(v) = version_of(&bin)
        && v.contains(VERSION)
    {
        println!("    cached: {} ({v})", bin.display());
        return Ok(bin);
    }
    crate::debian::ensure(
        &["pkg-config", "libssl-dev"],
        "afterburn builds against OpenSSL (through reqwest's native TLS)",
    )?;
    let parent = root.parent().context("cache root has no parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let partial = tempfile::Builder::new()
        .prefix(".afterburn-partial-")
        .tempdir_in(parent)?;
    println!(
        "    building it from crates.io (a few minutes, once) into {}",
        root.display()
    );
    let status = Command::new(crate::cargo())
        .args(["install", "afterburn", "--locked", "--version", VERSION])
        .arg("--root")
        .arg(partial.path())
        // Its own temporary target directory, never this workspace's.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install afterburn --version {VERSION} failed ({status})");
    }
    let built = partial.path().join("bin/afterburn");
    match version_of(&built) {
        Some(v) if v.contains(VERSION) => {}
        other => bail!(
            "{} was built but says {other:?}, not {VERSION}",
            built.display()
        ),
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("cannot replace {}", root.display()))?;
    }
    std::fs::rename(partial.keep(), &root)
        .with_context(|| format!("cannot move the build to {}", root.display()))?;
    println!("    built: {}", bin.display());
    Ok(bin)
}

/// What `afterburn --version` prints, if it runs.
fn version_of(bin: &std::path::Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
