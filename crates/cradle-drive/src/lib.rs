//! Config drives: the metadata a guest reads at first boot when it has no
//! network, as a disk image labelled `config-2`.
//!
//! The files are exactly the renderer's: [`tree`] walks the OpenStack and
//! EC2 trees of `cradle-render`, so every file on a drive has the bytes the
//! metadata service serves for the same instance and path. Nothing from the
//! native namespace goes on a drive: a drive is a file that outlives the
//! install, and private and secret parameters reach the guest over the
//! metadata service only.
//!
//! Images are written in-process — ISO 9660 by `cradle-iso9660`, vfat by the
//! `fatfs` crate — without root, loop devices or external tools, and
//! deterministically: timestamps come from the instance's `updated_at`.

#![forbid(unsafe_code)]

use std::cell::Cell;
use std::io::{Cursor, Write};
use std::str::FromStr;

use cradle_model::Instance;
use cradle_render::Context;
use time::OffsetDateTime;

/// The label every config drive carries, as cloud-init looks for it.
pub const LABEL: &str = "config-2";

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Iso9660,
    Vfat,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Iso9660 => "iso9660",
            Format::Vfat => "vfat",
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "iso9660" => Ok(Format::Iso9660),
            "vfat" => Ok(Format::Vfat),
            other => Err(format!(
                "unknown drive format {other:?}: use iso9660 or vfat"
            )),
        }
    }
}

/// Size settings (see `[drive]` in docs/configuration.md).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Size of a vfat image, in bytes (Nova: 64 MiB).
    pub vfat_bytes: u64,
    /// Largest ISO image, and largest content of a vfat image, in bytes.
    pub max_bytes: u64,
}

impl Limits {
    /// Refuse settings that could never produce a drive, so a bad config
    /// fails at start rather than on every request.
    pub fn check(&self) -> Result<(), DriveError> {
        if !VFAT_SIZES.contains(&self.vfat_bytes) {
            return Err(DriveError::VfatSize(self.vfat_bytes));
        }
        Ok(())
    }
}

/// Sizes a vfat image may have: FAT needs a megabyte to be useful, and the
/// sector count must fit 32 bits of bytes here.
const VFAT_SIZES: std::ops::RangeInclusive<u64> = 1024 * 1024..=u32::MAX as u64;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            vfat_bytes: 64 * 1024 * 1024,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("the drive needs {content} bytes; the limit is {max} (drive.max_bytes)")]
    TooLarge { content: u64, max: u64 },
    #[error("the files do not fit a {size}-byte vfat image (drive.vfat_bytes)")]
    VfatFull { size: u64 },
    #[error("vfat image size {0} is out of range (at least 1 MiB and under 4 GiB)")]
    VfatSize(u64),
    #[error("cannot build the ISO 9660 image: {0}")]
    Iso(#[from] cradle_iso9660::Error),
    #[error("cannot write the image: {0}")]
    Io(#[from] std::io::Error),
}

/// The files of a drive, as Nova lays them out: `openstack/<version>/…` for
/// every offered version and `latest`, `openstack/content/NNNN` for
/// injected files, `ec2/2009-04-04/` and `ec2/latest/` with `meta-data.json`
/// and `user-data`. Paths are relative, `/`-separated, in a fixed order.
pub fn tree(inst: &Instance, ctx: &Context<'_>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (path, bytes) in cradle_render::openstack_versions(inst, ctx).files() {
        // The password is the guest's to post over the metadata service;
        // Nova's drives do not carry it either.
        if path.rsplit('/').next() == Some("password") {
            continue;
        }
        out.push((format!("openstack/{path}"), bytes));
    }
    for version in ["2009-04-04", "latest"] {
        if let Some(md) = cradle_render::ec2_meta_data_json(inst, ctx, version) {
            out.push((format!("ec2/{version}/meta-data.json"), md));
        }
        if let Some(user_data) = &inst.user_data {
            out.push((format!("ec2/{version}/user-data"), user_data.clone()));
        }
    }
    out
}

/// Build the drive of `inst` in `format` and write it to `out`. Checks the
/// limits before writing anything. Returns the bytes written.
pub fn build(
    inst: &Instance,
    ctx: &Context<'_>,
    format: Format,
    limits: Limits,
    out: &mut impl Write,
) -> Result<u64, DriveError> {
    let files = tree(inst, ctx);
    let content: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    if content > limits.max_bytes {
        return Err(DriveError::TooLarge {
            content,
            max: limits.max_bytes,
        });
    }
    match format {
        Format::Iso9660 => {
            let files: Vec<cradle_iso9660::File> = files
                .into_iter()
                .map(|(path, data)| cradle_iso9660::File { path, data })
                .collect();
            let options = cradle_iso9660::Options {
                volume_id: LABEL.to_string(),
                publisher: "cradle".to_string(),
                timestamp: inst.updated_at,
            };
            let size = cradle_iso9660::image_size(&options, &files)?;
            if size > limits.max_bytes {
                return Err(DriveError::TooLarge {
                    content: size,
                    max: limits.max_bytes,
                });
            }
            Ok(cradle_iso9660::write(&options, &files, out)?)
        }
        Format::Vfat => {
            let image = vfat(&files, limits.vfat_bytes, inst)?;
            out.write_all(&image)?;
            Ok(image.len() as u64)
        }
    }
}

thread_local! {
    /// The time fatfs stamps on what it writes. fatfs asks a `&'static`
    /// provider, and writes synchronously on the calling thread, so the
    /// instance's time is handed over here for the length of one build.
    static VFAT_TIME: Cell<fatfs::DateTime> = const { Cell::new(DOS_EPOCH) };
}

const DOS_EPOCH: fatfs::DateTime = fatfs::DateTime {
    date: fatfs::Date {
        year: 1980,
        month: 1,
        day: 1,
    },
    time: fatfs::Time {
        hour: 0,
        min: 0,
        sec: 0,
        millis: 0,
    },
};

#[derive(Debug)]
struct InstanceTime;

impl fatfs::TimeProvider for InstanceTime {
    fn get_current_date(&self) -> fatfs::Date {
        VFAT_TIME.with(|t| t.get().date)
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        VFAT_TIME.with(|t| t.get())
    }
}

static INSTANCE_TIME: InstanceTime = InstanceTime;

/// FAT stores local-free times from 1980 to 2107, to two seconds.
fn dos_time(t: OffsetDateTime) -> fatfs::DateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    if t.year() < 1980 || t.year() > 2107 {
        return DOS_EPOCH;
    }
    fatfs::DateTime {
        date: fatfs::Date {
            year: t.year() as u16,
            month: u8::from(t.month()) as u16,
            day: t.day() as u16,
        },
        time: fatfs::Time {
            hour: t.hour() as u16,
            min: t.minute() as u16,
            sec: t.second() as u16,
            millis: 0,
        },
    }
}

fn vfat(files: &[(String, Vec<u8>)], size: u64, inst: &Instance) -> Result<Vec<u8>, DriveError> {
    // The volume serial number comes from the instance, not the clock.
    let serial = u32::from_le_bytes(inst.id.as_bytes()[..4].try_into().expect("4 bytes"));
    vfat_image(files, size, serial, inst.updated_at)
}

/// A `size`-byte vfat image labelled `config-2` holding `files`
/// (relative `/`-separated paths; directories are implied), with volume
/// serial `serial` and every time stamp `time`: what [`build`] writes for
/// an instance's tree, for any tree (the property tests give it random
/// ones).
pub fn vfat_image(
    files: &[(String, Vec<u8>)],
    size: u64,
    serial: u32,
    time: OffsetDateTime,
) -> Result<Vec<u8>, DriveError> {
    if !VFAT_SIZES.contains(&size) {
        return Err(DriveError::VfatSize(size));
    }
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    VFAT_TIME.with(|t| t.set(dos_time(time)));
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(serial),
    )?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(
            &mut disk,
            fatfs::FsOptions::new().time_provider(&INSTANCE_TIME),
        )?;
        let root = fs.root_dir();
        let full = |e: std::io::Error| -> DriveError {
            // fatfs reports a full volume as an I/O error of this kind.
            if e.kind() == std::io::ErrorKind::Other && e.to_string().contains("No space") {
                DriveError::VfatFull { size }
            } else {
                DriveError::Io(e)
            }
        };
        let mut made = std::collections::BTreeSet::new();
        for (path, data) in files {
            let mut dir = String::new();
            let parts: Vec<&str> = path.split('/').collect();
            for part in &parts[..parts.len() - 1] {
                if !dir.is_empty() {
                    dir.push('/');
                }
                dir.push_str(part);
                if made.insert(dir.clone()) {
                    root.create_dir(&dir).map_err(full)?;
                }
            }
            let mut f = root.create_file(path).map_err(full)?;
            f.truncate().map_err(full)?;
            f.write_all(data).map_err(full)?;
            f.flush().map_err(full)?;
        }
        drop(root);
        fs.unmount()?;
    }
    VFAT_TIME.with(|t| t.set(DOS_EPOCH));
    let mut image = disk.into_inner();
    fix_dot_entries(&mut image);
    Ok(image)
}

/// Make every sub-directory start with plain `.` and `..` entries.
///
/// fatfs 0.3 writes a long-name entry before each of them
/// (rafalh/rust-fatfs#100, #117), so a directory's first slots are
/// `[LFN, ., LFN, ..]`: fsck.fat reports every directory as damaged and,
/// allowed to repair, renames and deletes `.` and `..`. This rewrites those
/// four slots to `[., .., free, free]` and points the `..` of a first-level
/// directory at cluster 0, as the FAT specification has it (fatfs writes
/// the root's cluster there on FAT32). Only directories are walked; file
/// contents are never looked at.
fn fix_dot_entries(image: &mut [u8]) {
    let u16_at = |img: &[u8], o: usize| u16::from_le_bytes([img[o], img[o + 1]]) as u64;
    let u32_at = |img: &[u8], o: usize| {
        u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]) as u64
    };
    let bps = u16_at(image, 11);
    let spc = image[13] as u64;
    let reserved = u16_at(image, 14);
    let fats = image[16] as u64;
    let root_entries = u16_at(image, 17);
    let total = match u16_at(image, 19) {
        0 => u32_at(image, 32),
        n => n,
    };
    let fat_size = match u16_at(image, 22) {
        0 => u32_at(image, 36),
        n => n,
    };
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data_start = reserved + fats * fat_size + root_sectors;
    let clusters = (total - data_start) / spc;
    let bits = if clusters < 4085 {
        12
    } else if clusters < 65525 {
        16
    } else {
        32
    };
    let fat = (reserved * bps) as usize;
    let cluster_size = (spc * bps) as usize;
    let offset = |c: u64| ((data_start + (c - 2) * spc) * bps) as usize;
    let valid = |c: u64| (2..clusters + 2).contains(&c);
    let next = |img: &[u8], c: u64| -> Option<u64> {
        let n = match bits {
            12 => {
                let v = u16_at(img, fat + (c + c / 2) as usize);
                if c % 2 == 1 { v >> 4 } else { v & 0xfff }
            }
            16 => u16_at(img, fat + 2 * c as usize),
            _ => u32_at(img, fat + 4 * c as usize) & 0x0fff_ffff,
        };
        valid(n).then_some(n)
    };
    // Each directory as the byte ranges of its clusters.
    let chain = |img: &[u8], first: u64| -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut c = Some(first).filter(|c| valid(*c));
        while let Some(cl) = c {
            if out.len() as u64 > clusters {
                break;
            }
            out.push(offset(cl)..offset(cl) + cluster_size);
            c = next(img, cl);
        }
        out
    };
    let root = if bits == 32 {
        chain(image, u32_at(image, 44))
    } else {
        let start = ((reserved + fats * fat_size) * bps) as usize;
        let end = start + (root_sectors * bps) as usize;
        std::iter::once(start..end).collect()
    };
    const DOT: &[u8; 11] = b".          ";
    const DOTDOT: &[u8; 11] = b"..         ";
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![(root, true)];
    while let Some((ranges, is_root)) = todo.pop() {
        'entries: for range in ranges {
            for e in range.step_by(32) {
                let attr = image[e + 11];
                match image[e] {
                    0 => break 'entries,
                    0xe5 => continue,
                    _ if attr == 0x0f || attr & 0x08 != 0 || attr & 0x10 == 0 => continue,
                    b'.' => continue,
                    _ => {}
                }
                let first = (u16_at(image, e + 20) << 16) | u16_at(image, e + 26);
                if !valid(first) || !seen.insert(first) {
                    continue;
                }
                let d = offset(first);
                let slot = |i: usize| d + 32 * i;
                if image[slot(0) + 11] == 0x0f
                    && &image[slot(1)..slot(1) + 11] == DOT
                    && image[slot(2) + 11] == 0x0f
                    && &image[slot(3)..slot(3) + 11] == DOTDOT
                {
                    image.copy_within(slot(1)..slot(2), slot(0));
                    image.copy_within(slot(3)..slot(4), slot(1));
                    image[slot(2)..slot(4)].fill(0);
                    image[slot(2)] = 0xe5;
                    image[slot(3)] = 0xe5;
                }
                if is_root && &image[slot(1)..slot(1) + 11] == DOTDOT {
                    image[slot(1) + 20..slot(1) + 22].fill(0);
                    image[slot(1) + 26..slot(1) + 28].fill(0);
                }
                todo.push((chain(image, first), false));
            }
        }
    }
}
