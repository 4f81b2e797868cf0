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

mod dir;
mod fetch;
mod image;
mod package;

pub use dir::apply_to_dir;
pub use fetch::{Credentials, Fetched, check_sha256, fetch};
pub use image::{apply_to_image, filesystem_offset};
pub use package::{Entry, Kind, Limits, Manifest, verify};

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
