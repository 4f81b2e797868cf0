//! Python tools from PyPI, pinned, each in a venv of its own under the CI
//! cache (`~/.cache/cradle-ci/venv-<name>-<version>`), made once with
//! Debian's python3 and kept while it still runs the tool.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// The venv holding `requirement` (`name==version`), made (again) when
/// `bin/<tool> <probe>` does not run in it.
pub fn ensure(requirement: &str, tool: &str, probe: &str) -> Result<PathBuf> {
    let root = crate::ci_cache_dir()?;
    let dir = root.join(format!("venv-{}", requirement.replace("==", "-")));
    if works(&dir, tool, probe) {
        println!("    cached: {}", dir.display());
        return Ok(dir);
    }
    println!(
        "    making {} ({requirement} from PyPI, once)",
        dir.display()
    );
    crate::debian::ensure(&["python3-venv"], "Python tools from PyPI run in venvs")?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&root)?;
    let step = |cmd: &mut Command, what: &str| -> Result<()> {
        let status = cmd
            .env_remove("PYTHONPATH")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("cannot {what}"))?;
        if !status.success() {
            bail!("cannot {what} ({status})");
        }
        Ok(())
    };
    step(
        Command::new(DEBIAN_PYTHON).args(["-m", "venv"]).arg(&dir),
        "make the venv",
    )?;
    step(
        Command::new(dir.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--quiet",
            requirement,
        ]),
        &format!("pip install {requirement}"),
    )?;
    if !works(&dir, tool, probe) {
        bail!("{} does not run {tool} after pip install", dir.display());
    }
    Ok(dir)
}

fn works(dir: &Path, tool: &str, probe: &str) -> bool {
    Command::new(dir.join("bin").join(tool))
        .arg(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
