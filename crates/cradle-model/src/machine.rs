//! What an instance runs on: its disks, memory and vcpus, as the hypervisor
//! driver and the install appliance see them.

use serde::{Deserialize, Serialize};

/// Disks an instance may have (virtio `vda` to `vdp`).
pub const MAX_DISKS: usize = 16;
/// Memory bounds, in MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 64..=1 << 20;
/// Virtual CPU bounds.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=256;
/// Memory when none is given, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 512;

/// A disk image's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One of an instance's disks: an image file on this host, attached in
/// order (the first is `vda` in the guest and `DISK_0_PATH` to OS scripts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub path: String,
    #[serde(default)]
    pub format: DiskFormat,
}

/// Check a list of disks: absolute paths without `..`, control characters
/// or commas' surprises (QEMU's option syntax is quoted by the driver),
/// each path once, at most [`MAX_DISKS`].
pub fn check_disks(disks: &[Disk]) -> Result<(), String> {
    if disks.len() > MAX_DISKS {
        return Err(format!("has {} disks; at most {MAX_DISKS}", disks.len()));
    }
    for (n, d) in disks.iter().enumerate() {
        let p = &d.path;
        if !p.starts_with('/') {
            return Err(format!("disk {n}: {p:?} is not an absolute path"));
        }
        if p.len() > 4096 || p.chars().any(char::is_control) {
            return Err(format!(
                "disk {n}: the path is longer than 4096 bytes or holds control characters"
            ));
        }
        if p.split('/').any(|c| c == "..") {
            return Err(format!("disk {n}: {p:?} holds \"..\""));
        }
        if disks[..n].iter().any(|o| o.path == *p) {
            return Err(format!("disk {n}: {p:?} is given twice"));
        }
    }
    Ok(())
}

pub fn check_memory(mib: u32) -> Result<(), String> {
    if MEMORY_MIB.contains(&mib) {
        Ok(())
    } else {
        Err(format!(
            "{mib} MiB is outside {}..={} MiB",
            MEMORY_MIB.start(),
            MEMORY_MIB.end()
        ))
    }
}

pub fn check_vcpus(n: u32) -> Result<(), String> {
    if VCPUS.contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "{n} is outside {}..={}",
            VCPUS.start(),
            VCPUS.end()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(p: &str) -> Disk {
        Disk {
            path: p.into(),
            format: DiskFormat::Raw,
        }
    }

    #[test]
    fn disks_are_checked() {
        assert!(check_disks(&[d("/srv/a.img"), d("/srv/b,c.img")]).is_ok());
        assert!(
            check_disks(&[d("rel.img")])
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            check_disks(&[d("/a/../etc/shadow")])
                .unwrap_err()
                .contains("..")
        );
        assert!(check_disks(&[d("/a\n")]).unwrap_err().contains("control"));
        assert!(
            check_disks(&[d("/a"), d("/a")])
                .unwrap_err()
                .contains("twice")
        );
        let many: Vec<Disk> = (0..17).map(|i| d(&format!("/d{i}"))).collect();
        assert!(check_disks(&many).unwrap_err().contains("at most 16"));
        assert!(check_memory(32).is_err() && check_memory(512).is_ok());
        assert!(check_vcpus(0).is_err() && check_vcpus(2).is_ok());
    }

    #[test]
    fn disk_json() {
        let v: Disk = serde_json::from_str(r#"{"path":"/x.qcow2","format":"qcow2"}"#).unwrap();
        assert_eq!(v.format, DiskFormat::Qcow2);
        let v: Disk = serde_json::from_str(r#"{"path":"/x.img"}"#).unwrap();
        assert_eq!(v.format, DiskFormat::Raw);
        assert!(serde_json::from_str::<Disk>(r#"{"path":"/x","format":"vmdk"}"#).is_err());
    }
}

/// What a `self_install` boots with besides the instance's disks, stored
/// apart from what it runs with, so a reinstall repeats it (seed 003: "the
/// set of self_install parameters will be stored as part of the instance
/// configuration"). Paths are files on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallParams {
    /// An installation CD-ROM image (ISO), attached read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<String>,
    /// A kernel booted directly (network installers, live kernels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel's command line (with `kernel` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Boot from `disk` or `cdrom` (default: the CD-ROM when there is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootDevice>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Disk,
    Cdrom,
}

impl InstallParams {
    pub fn is_empty(&self) -> bool {
        *self == InstallParams::default()
    }
}

fn check_path(what: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{what}: {p:?} is not an absolute path"));
    }
    if p.len() > 4096 || p.chars().any(char::is_control) || p.split('/').any(|c| c == "..") {
        return Err(format!(
            "{what}: the path is longer than 4096 bytes, holds control characters or \"..\""
        ));
    }
    Ok(())
}

/// How the instance's own VM runs (`cradle instance start`), beside its
/// disks: whether it gets the communication NIC (seed 003: on in the
/// install modes, in run mode only when asked for), and a kernel booted
/// directly (as Ganeti's `kernel_path`, `initrd_path` and `kernel_args`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunParams {
    /// Add the fenced communication NIC as the VM's last NIC, so that a
    /// guest agent reaches the metadata service (and nothing else) on it.
    #[serde(default)]
    pub communication: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<RunKernel>,
}

/// A kernel the instance boots directly in run mode. Paths are files on
/// this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunKernel {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel's command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// Check a run-mode kernel: absolute paths, a command line without control
/// characters.
pub fn check_run_kernel(k: &RunKernel) -> Result<(), String> {
    check_install_params(&InstallParams {
        kernel: Some(k.path.clone()),
        initrd: k.initrd.clone(),
        cmdline: k.cmdline.clone(),
        ..InstallParams::default()
    })
}

/// Check install parameters: absolute paths, an initrd or command line only
/// with a kernel, booting from a CD-ROM only with one.
pub fn check_install_params(p: &InstallParams) -> Result<(), String> {
    for (what, v) in [
        ("cdrom", &p.cdrom),
        ("kernel", &p.kernel),
        ("initrd", &p.initrd),
    ] {
        if let Some(v) = v {
            check_path(what, v)?;
        }
    }
    if p.kernel.is_none() && (p.initrd.is_some() || p.cmdline.is_some()) {
        return Err("initrd and cmdline need a kernel".into());
    }
    if let Some(c) = &p.cmdline
        && (c.len() > 4096 || c.chars().any(char::is_control))
    {
        return Err("cmdline: longer than 4096 bytes or holds control characters".into());
    }
    if p.boot == Some(BootDevice::Cdrom) && p.cdrom.is_none() {
        return Err("boot = cdrom needs a cdrom".into());
    }
    Ok(())
}

#[cfg(test)]
mod install_params_tests {
    use super::*;

    #[test]
    fn install_params_are_checked() {
        let ok = InstallParams {
            cdrom: Some("/srv/iso/debian.iso".into()),
            kernel: Some("/srv/k".into()),
            initrd: Some("/srv/i".into()),
            cmdline: Some("console=ttyS0".into()),
            boot: Some(BootDevice::Cdrom),
        };
        assert!(check_install_params(&ok).is_ok());
        let bad = |f: fn(&mut InstallParams)| {
            let mut p = ok.clone();
            f(&mut p);
            check_install_params(&p).unwrap_err()
        };
        assert!(bad(|p| p.cdrom = Some("x.iso".into())).contains("absolute"));
        assert!(bad(|p| p.kernel = None).contains("need a kernel"));
        assert!(bad(|p| p.cmdline = Some("a\nb".into())).contains("control"));
        assert!(bad(|p| p.cdrom = None).contains("needs a cdrom"));
        let v: InstallParams = serde_json::from_str(r#"{"boot":"disk"}"#).unwrap();
        assert_eq!(v.boot, Some(BootDevice::Disk));
        assert!(serde_json::from_str::<InstallParams>(r#"{"floppy":"/x"}"#).is_err());
    }
}
