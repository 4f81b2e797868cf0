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

/// [`ensure`] `pkgs` together with qemu-system-x86. This machine image
/// carries qemu-utils from bookworm-backports, which breaks bookworm's own
/// qemu-system-common, so a plain install fails there: qemu-system-x86
/// (and the seabios it needs) then come from bookworm-backports too,
/// through a sources list and lists directory of our own; `/etc/apt` is
/// left as it is.
pub fn ensure_with_qemu(pkgs: &[&str], why: &str) -> Result<()> {
    let mut all = vec!["qemu-system-x86"];
    all.extend_from_slice(pkgs);
    if missing(&all).is_empty() {
        println!("    installed: {}", all.join(" "));
        return Ok(());
    }
    let qemu_utils = version_of("qemu-utils");
    if !qemu_utils.contains("bpo") {
        return ensure(&all, why);
    }
    if !is_root()? {
        bail!(
            "missing Debian packages ({why}): {}; qemu-utils {qemu_utils} is from \
             bookworm-backports, so take qemu-system-x86 from there too (as root)",
            missing(&all).join(" ")
        );
    }
    println!(
        "    qemu-utils {qemu_utils} is from bookworm-backports; taking qemu-system-x86 from there too"
    );
    let dir = tempfile::Builder::new().prefix("cradle-apt-").tempdir()?;
    let parts = dir.path().join("sources.list.d");
    let lists = dir.path().join("lists");
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::create_dir_all(&parts)?;
    for e in std::fs::read_dir("/etc/apt/sources.list.d")?.flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n.ends_with(".sources") || n.ends_with(".list") {
            std::fs::copy(e.path(), parts.join(&name))?;
        }
    }
    std::fs::write(
        parts.join("bookworm-backports.sources"),
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )?;
    let opts = [
        "-o".to_string(),
        format!("Dir::Etc::SourceParts={}", parts.display()),
        "-o".to_string(),
        format!("Dir::State::Lists={}", lists.display()),
    ];
    apt_with(&opts, &["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(pkgs);
    args.extend_from_slice(&[
        "qemu-system-x86/bookworm-backports",
        "qemu-system-common/bookworm-backports",
        "qemu-system-data/bookworm-backports",
        "seabios/bookworm-backports",
    ]);
    apt_with(&opts, &args)?;
    let still = missing(&all);
    if !still.is_empty() {
        bail!("still not installed after apt-get: {}", still.join(" "));
    }
    Ok(())
}

/// The appliance tests download the installed kernel's package
/// (`cradle appliance build`, with the machine's own package lists). Those
/// lists can be older than the kernel when it came in through the
/// backports lists of [`ensure_with_qemu`]; then refresh them, once.
pub fn ensure_kernel_downloadable() -> Result<()> {
    let pkg = cradle_appliance::kernel_package()?;
    let downloadable = || {
        Command::new("apt-get")
            .args(["download", "--print-uris", &pkg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if downloadable() {
        println!("    {pkg}: downloadable");
        return Ok(());
    }
    if !is_root()? {
        bail!("the package lists do not know the installed {pkg}; run `apt-get update` as root");
    }
    println!("    the package lists do not know the installed {pkg}; refreshing them");
    apt(&["update"])?;
    if !downloadable() {
        bail!("apt-get cannot download the installed {pkg}, even after apt-get update");
    }
    Ok(())
}

/// dpkg's version of an installed package, or "".
fn version_of(pkg: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
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
