//! `cargo xtask dib`: diskimage-builder from PyPI (pinned, in a venv under
//! the CI cache) and the Debian tools it drives, for the test that builds
//! an image with the cradle-agent element (crates/cradle/tests/it/bake.rs).
//! It builds `-t tar` images of `debian-minimal` here; partitioned images
//! need device-mapper (kpartx), which these machines' kernel lacks.

use std::path::PathBuf;

use anyhow::Result;

/// The release the element is tested with.
pub const REQUIREMENT: &str = "diskimage-builder==3.43.0";

/// The venv; `bin/disk-image-create` is in it.
pub fn ensure() -> Result<PathBuf> {
    println!("==> diskimage-builder for the cradle-agent element's test");
    crate::debian::ensure(
        &["sudo", "debootstrap", "kpartx", "dmsetup"],
        "disk-image-create runs debootstrap (through sudo, even as root)",
    )?;
    crate::venv::ensure(REQUIREMENT, "disk-image-create", "--version")
}
