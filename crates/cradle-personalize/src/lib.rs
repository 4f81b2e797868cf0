//! Personalization packages (seed 003): a `.tar.gz` of files overlaid onto a
//! guest's root filesystem before its first boot.
//!
//! A package is verified completely ([`verify`]) before anything is written:
//! only regular files, directories, symlinks, and hardlinks to earlier files
//! of the same package; no absolute path, no `..`, no path through a
//! symlink, no device node, FIFO or socket, setuid and setgid only when
//! allowed, and caps on size, entry count and compression ratio. Then the
//! target is checked for every entry (no symlink already on the target in
//! the way, no file where a directory must go or the reverse), and only then
//! written ([`apply_to_dir`]), each file through a temporary name renamed
//! into place. A refused package leaves the target as it was. A raw disk
//! image with an ext2/3/4 filesystem (whole, or a partition of its MBR or
//! GPT) is written in user space with debugfs ([`apply_to_image`]).
//!
//! This crate reads the archive with the `tar` and `flate2` crates; the
//! checks are its own, because no crate makes them (tar's `unpack` guards
//! against `..` but follows symlinks already on the target).
//!
//! Downloading (`fetch`) is the default feature `fetch` (reqwest, rustls,
//! tokio underneath). Without it, the crate only verifies and applies: the
//! install appliance's static agent uses it that way.

mod dir;
#[cfg(feature = "fetch")]
mod fetch;
mod image;
mod package;

pub use dir::{apply_to_dir, apply_to_dir_with};
#[cfg(feature = "fetch")]
pub use fetch::{
    Credentials, Fetched, Progress, check_sha256, fetch, fetch_with_progress, receive,
};
pub use image::{Found, apply_to_image, apply_to_image_with, filesystem_offset, read_back};
pub use package::{Entry, Kind, Limits, Manifest, verify, verify_with};

/// What an apply is doing, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the whole package and checking every entry.
    Verify,
    /// Unpacking file data for debugfs (disk images only).
    Stage,
    /// Writing to the target.
    Write,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Verify => "verifying",
            Phase::Stage => "staging",
            Phase::Write => "writing",
        }
    }
}

/// Watches and steers an apply.
///
/// `progress` is called with the phase, the work done and the work in
/// all; the unit is the phase's own (package bytes read while verifying,
/// debugfs commands while writing an image). `cancel` is honoured until
/// the write phase begins, which leaves the target untouched; once writing
/// has begun it runs to its end: a directory is written entry by entry,
/// and a block device in place, where stopping debugfs halfway would leave
/// a filesystem inconsistent. (An image file is written on a copy, see
/// [`apply_to_image`], so even a killed debugfs leaves it as it was.)
#[derive(Clone, Copy, Default)]
pub struct Control<'a> {
    pub progress: Option<&'a (dyn Fn(Phase, u64, u64) + Sync)>,
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

impl Control<'_> {
    pub(crate) fn report(&self, phase: Phase, done: u64, total: u64) {
        if let Some(p) = self.progress {
            p(phase, done, total);
        }
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        match self.cancel {
            Some(c) if c.load(std::sync::atomic::Ordering::Relaxed) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stopped on request before anything was written.
    #[error("cancelled before anything was written; the target is unchanged")]
    Cancelled,
    /// One entry is not allowed; the package is refused as a whole.
    #[error("entry {entry:?} refused: {reason}")]
    Refused { entry: String, reason: String },
    /// A cap on the package was passed.
    #[error("package refused: {0}")]
    Limit(String),
    /// The stream is not a complete gzip-compressed tar archive.
    #[error("package refused: {0}")]
    Format(String),
    /// The target cannot take the package (checked before writing).
    #[error("target refused for entry {entry:?}: {reason}")]
    Target { entry: String, reason: String },
    /// The package could not be downloaded (the URL shown without any
    /// credentials in it).
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    /// debugfs failed or died while writing `image`. A regular file is
    /// written on a copy renamed into place only when debugfs took every
    /// command, so it is `unchanged`; a block device is written in place.
    #[error("{reason} while writing {}; {}", image.display(), left(*unchanged))]
    Debugfs {
        image: std::path::PathBuf,
        reason: String,
        unchanged: bool,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn left(unchanged: bool) -> &'static str {
    if unchanged {
        "the image is unchanged"
    } else {
        "the device may be half-written and should be made again from its source"
    }
}
