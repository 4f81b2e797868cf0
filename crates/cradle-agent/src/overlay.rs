//! The personalization package, applied to the target disk from inside the
//! appliance: downloaded from the metadata service to `/run` (a tmpfs),
//! the disk or partition mounted at `/mnt/target`, the package verified
//! and overlaid with `cradle_personalize::apply_to_dir` (default limits,
//! no setuid or setgid), the filesystem unmounted.
//!
//! The filesystem type is found by trying: ext4 (which also mounts ext2
//! and ext3), vfat, then whatever else the kernel has that needs a device
//! (`/proc/filesystems` without `nodev`).

use std::path::Path;
use std::time::Duration;

use cradle_personalize::{Kind, Limits};

use crate::http::Client;
use crate::job::Personalization;
use crate::system::{mount, sync, umount, wait_for};

pub const PACKAGE: &str = "/run/cradle/package.tar.gz";
pub const TARGET: &str = "/mnt/target";
/// How long a partition the script just made may take to show in /dev.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// Download the package and apply it. Returns what was done, for the
/// host.
pub fn apply(client: &Client, p: &Personalization) -> Result<String, String> {
    let limits = Limits::default();
    let package = Path::new(PACKAGE);
    let size = client.get_to_file(&p.path, package, limits.max_compressed)?;
    let device = p.device();
    if !wait_for(Path::new(&device), DEVICE_WAIT) {
        return Err(format!(
            "{device} does not exist (personalization disk {}{})",
            p.disk,
            p.partition
                .map(|n| format!(", partition {n}"))
                .unwrap_or_default()
        ));
    }
    let fstype = mount_any(&device, TARGET)?;
    let applied = cradle_personalize::apply_to_dir(package, Path::new(TARGET), &limits);
    sync();
    let unmounted = umount(TARGET);
    let _ = std::fs::remove_file(package);
    let manifest = applied.map_err(|e| format!("cannot apply the package to {device}: {e}"))?;
    unmounted.map_err(|e| format!("cannot unmount {device} from {TARGET}: {e}"))?;
    let file_bytes: u64 = manifest
        .entries
        .iter()
        .map(|e| match e.kind {
            Kind::File { size } => size,
            _ => 0,
        })
        .sum();
    Ok(format!(
        "{} entries, {file_bytes} bytes of file data (package {size} bytes) onto {device} ({fstype})",
        manifest.entries.len(),
    ))
}

/// Mount `device` at `target` as the first filesystem type that takes it.
fn mount_any(device: &str, target: &str) -> Result<String, String> {
    let proc = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mut errors = Vec::new();
    for fstype in fstypes(&proc) {
        match mount(device, target, &fstype, "") {
            Ok(()) => return Ok(fstype),
            Err(e) => errors.push(format!("as {fstype}: {e}")),
        }
    }
    Err(format!("cannot mount {device}: {}", errors.join("; ")))
}

/// The filesystem types to try: ext4, vfat, then those in
/// `/proc/filesystems` that need a device.
fn fstypes(proc_filesystems: &str) -> Vec<String> {
    let mut out = vec!["ext4".to_string(), "vfat".to_string()];
    for line in proc_filesystems.lines() {
        let mut words = line.split_whitespace();
        let (Some(first), second) = (words.next(), words.next()) else {
            continue;
        };
        if first == "nodev" {
            continue;
        }
        // A device filesystem's line is its name alone.
        if second.is_none() && !out.iter().any(|f| f == first) {
            out.push(first.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_and_vfat_come_first_then_device_filesystems() {
        let proc = "nodev\tsysfs\nnodev\ttmpfs\n\text3\n\text2\n\text4\nnodev\tdevtmpfs\n\tvfat\n\tmsdos\n";
        assert_eq!(fstypes(proc), ["ext4", "vfat", "ext3", "ext2", "msdos"]);
        assert_eq!(fstypes(""), ["ext4", "vfat"]);
    }
}
