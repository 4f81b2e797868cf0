//! Debian packages: find which are missing and install them when we are root.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Whether we run as root, asked of `id -u` (no libc needed).
pub fn is_root() -> Result<bool> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("cannot run `id -u`")?;
    if !out.status.success() {
        bail!("`id -u` failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Whether dpkg reports `pkg` as installed ("install ok installed"; the
/// third word is what counts, so a held package is installed too).
fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).split_whitespace().nth(2) == Some("installed")
        })
}

/// The packages of `pkgs` that are not installed.
pub fn missing(pkgs: &[&str]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| !installed(p))
        .map(|p| p.to_string())
        .collect()
}

/// Make sure every package of `pkgs` is installed: as root, install the
/// missing ones with apt-get; otherwise say what to run and fail.
pub fn ensure(pkgs: &[&str], why: &str) -> Result<()> {
    let missing = missing(pkgs);
    if missing.is_empty() {
        println!("    installed: {}", pkgs.join(" "));
        return Ok(());
    }
    let install = format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root()? {
        bail!(
            "missing Debian packages ({why}): {}\n\
             run as root:\n  apt-get update && {install}",
            missing.join(" ")
        );
    }
    println!("    missing: {}; installing", missing.join(" "));
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(missing.iter().map(String::as_str));
    apt(&args)?;
    let still = self::missing(pkgs);
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn apt(args: &[&str]) -> Result<()> {
    apt_with(&[], args)
}

/// `apt-get` with configuration `options` (`-o KEY=VALUE` pairs, already
/// split) before `args`, non-interactive; fails unless it succeeds.
pub fn apt_with(options: &[String], args: &[&str]) -> Result<()> {
    println!("    apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(options)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("`apt-get {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_missing_packages() {
        if !std::path::Path::new("/usr/bin/dpkg-query").exists() {
            return; // not Debian: nothing to ask
        }
        // dpkg itself is always installed on Debian.
        assert!(missing(&["dpkg"]).is_empty());
        assert_eq!(
            missing(&["dpkg", "cradle-no-such-package"]),
            vec!["cradle-no-such-package".to_string()]
        );
    }
}
