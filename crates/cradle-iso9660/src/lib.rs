//! Writes OpenStack config drives: ISO 9660 images with Rock Ridge and Joliet,
//! in-process, without `genisoimage`.
//!
//! The image is what `genisoimage -J -r -V config-2` (as Nova runs it) gives a
//! Linux guest, byte layout aside:
//!
//! * 2048-byte sectors: 16 zeroed system-area sectors, the Primary Volume
//!   Descriptor at sector 16, a Joliet Supplementary Volume Descriptor
//!   (UCS-2 level 3, escape `%/E`) at 17 and the terminator at 18; then the
//!   L and M path tables of both hierarchies, the primary directories, one
//!   or more sectors of Rock Ridge continuation areas, the Joliet
//!   directories, and the file data, each file starting on a sector boundary
//!   and zero-padded to one. Empty files have a zero-length extent at
//!   sector 0.
//! * The primary hierarchy uses ISO 9660 level-1 names (upper-case
//!   d-characters, 8.3, `;1` on files), made unique per directory with a
//!   numeric suffix. Nobody is meant to read them: Rock Ridge carries the real
//!   names. The root's `.` record starts its System Use with `SP`
//!   (check bytes `BE EF`, skip 0) and continues (`CE`) to the `ER`
//!   entry that declares `RRIP_1991A`; every record carries `RR`, a
//!   36-byte `PX` (directories `0o040555`, files `0o100444`, uid and gid 0,
//!   as `genisoimage -r`), `TF` (modify, access, attributes) and, for named
//!   entries, `NM` with the exact name. A record whose entries do not fit in
//!   255 bytes moves its `NM` to a continuation area; continuation areas never
//!   cross a sector (the Linux kernel refuses ones that do).
//! * Joliet names are the exact names in UTF-16 big-endian, without the
//!   `;1` version (as genisoimage writes them); the characters Joliet forbids
//!   (`* : ; ? \`) become `_` there.
//! * Directory records never straddle a sector; a directory's extent is a
//!   whole number of sectors and may span several.
//! * Every timestamp is [`Options::timestamp`] in UTC: the output is a pure
//!   function of the options and the set of files (their order does not
//!   matter). Nothing reads a clock or a random source, and nothing iterates
//!   a hash map.
//!
//! ```
//! use cradle_iso9660::{File, Options, image_size, write};
//!
//! let options = Options {
//!     volume_id: "config-2".to_owned(),
//!     publisher: "cradle".to_owned(),
//!     timestamp: time::OffsetDateTime::UNIX_EPOCH,
//! };
//! let files = [File {
//!     path: "openstack/latest/meta_data.json".to_owned(),
//!     data: br#"{"uuid": "..."}"#.to_vec(),
//! }];
//! let mut image = Vec::new();
//! let written = write(&options, &files, &mut image)?;
//! assert_eq!(written, image.len() as u64);
//! assert_eq!(image_size(&options, &files)?, written);
//! # Ok::<(), cradle_iso9660::Error>(())
//! ```
//!
//! Limits, checked before anything is written: a path is relative with `/`
//! separators and no empty, `.` or `..` segment, and no control character
//! (NUL included); a name is at most [`MAX_JOLIET_UNITS`] UTF-16 code units
//! (Joliet) and at most [`MAX_NAME_BYTES`] bytes of UTF-8 (the Linux kernel
//! drops Rock Ridge names of 254 bytes or more; with the Joliet limit a name
//! has at most 192 bytes anyway); no two names in a directory are the same
//! once the characters Joliet forbids are `_`; a file is under 4 GiB (one extent); the
//! image is at most 2^32 - 1 sectors and has at most 65535 directories
//! (path-table parent numbers are 16-bit). Deep directories are not
//! relocated (no `RR_MOVED`): Linux, libisofs and isoinfo do not need it.
//!
//! # Why not `hadris-iso`
//!
//! The issue asked to evaluate the `hadris-iso` crate first. Checked
//! 2026-11 against crates.io:
//!
//! * 2.5.0, the newest stable release, cannot produce deterministic images:
//!   the writer stamps the volume descriptors, every directory record and
//!   the Rock Ridge `TF` times with `chrono::Utc::now()`
//!   (`DirDateTime::now`, `DecDateTime::now`), with no option to pass a time.
//! * 3.0.0-rc.2, a release candidate and a rewrite of that API, does take a
//!   time (`IsoOptions::with_time`), and a smoke test of it gave an image
//!   with Rock Ridge, Joliet and volume id `config-2` that `isoinfo` read
//!   back correctly. Not used still: it is a pre-release that would have to
//!   be pinned (`=3.0.0-rc.2`) and whose API was just rewritten wholesale;
//!   it brings about 15 crates (hadris-fs/-io/-storage/-part/-iso-raw/-macros,
//!   bytemuck with its derive, async-lock, event-listener, spin, libc, …);
//!   it writes to a block device, not a `std::io::Write` stream (the whole
//!   image would be buffered, then copied); and its defaults differ from what
//!   Nova's genisoimage gives the guest (modes 0755/0644, a 150-sector tail
//!   pad, its own application id). This writer is small enough to own, and
//!   its tests read its images back with isoinfo, isovfy, xorriso and blkid
//!   and compare its listings with genisoimage's.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;

use time::{OffsetDateTime, UtcOffset};

/// The logical sector (block) size of every image.
pub const SECTOR_SIZE: u64 = 2048;
/// The longest name (one path segment), in bytes of UTF-8, that Rock Ridge
/// carries back exactly on Linux: the kernel's `get_rock_ridge_filename`
/// gives up on names of 254 bytes or more.
pub const MAX_NAME_BYTES: usize = 253;
/// The longest name, in UTF-16 code units, that Joliet allows.
pub const MAX_JOLIET_UNITS: usize = 64;

const SECTOR: usize = SECTOR_SIZE as usize;
/// Sector of the Primary Volume Descriptor; the Joliet SVD and the terminator follow.
const PVD_SECTOR: u32 = 16;
/// First sector after the three volume descriptors.
const FIRST_FREE_SECTOR: u32 = 19;
/// Directory records are at most 255 bytes; keep them even.
const MAX_RECORD: usize = 254;
/// Rock Ridge modes, as `genisoimage -r` sets them.
const DIR_MODE: u32 = 0o040_555;
const FILE_MODE: u32 = 0o100_444;

/// Options for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Primary volume id, d-characters/a-characters, at most 32 bytes; padded
    /// with spaces. e.g. "config-2" (Nova writes it lower-case; the case the
    /// caller gives is kept, as genisoimage -V does). Printable ASCII only.
    /// Joliet's copy holds its first 16 characters.
    pub volume_id: String,
    /// Publisher id (at most 128 bytes of printable ASCII). Joliet's copy
    /// holds its first 64 characters.
    pub publisher: String,
    /// Every timestamp in the image (volume creation/modification, every
    /// directory record, Rock Ridge TF), written in UTC. Years 1901 to 2154.
    pub timestamp: OffsetDateTime,
}

/// A file to put on the image: a path relative to the root with `/`
/// separators (no leading slash, no `.`/`..`/empty segments), and its bytes.
/// Directories are implied by paths.
#[derive(Clone, PartialEq, Eq)]
pub struct File {
    /// Relative path, e.g. `openstack/latest/meta_data.json`.
    pub path: String,
    /// The file's contents.
    pub data: Vec<u8>,
}

impl fmt::Debug for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("File")
            .field("path", &self.path)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path is malformed, or clashes with another path.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The offending path, as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A name in a path is longer than Rock Ridge or Joliet can carry.
    #[error("name too long in path {path:?}: {reason}")]
    NameTooLong {
        /// The offending path, as given.
        path: String,
        /// Which name, and which limit.
        reason: String,
    },
    /// A file, or the whole image, exceeds what ISO 9660 can address.
    #[error("image too large: {reason}")]
    TooLarge {
        /// Which limit was hit.
        reason: String,
    },
    /// An [`Options`] field is out of range.
    #[error("invalid option {field}: {reason}")]
    InvalidOption {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The output failed.
    #[error("writing the image: {0}")]
    Io(#[from] std::io::Error),
}

/// Write the image. Returns bytes written. Output is a pure function of
/// (options, files): file order in the slice does not matter.
pub fn write(options: &Options, files: &[File], out: &mut impl Write) -> Result<u64, Error> {
    let plan = Plan::new(options, files)?;
    plan.write(out)
}

/// The exact size `write` would produce, without writing (for limits and
/// Content-Length).
pub fn image_size(options: &Options, files: &[File]) -> Result<u64, Error> {
    Ok(Plan::new(options, files)?.image_bytes())
}

// ---------------------------------------------------------------------------
// The tree.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir(usize),
    File(usize),
}

struct Dir<'a> {
    /// The exact name; empty for the root.
    name: &'a str,
    parent: usize,
    children: Vec<Node>,
    subdirs: u32,
    /// Level-1 identifier (no extension, no version).
    iso_name: Vec<u8>,
    /// UTF-16BE.
    joliet_name: Vec<u8>,
    /// Children in each hierarchy's record order.
    primary_children: Vec<Node>,
    joliet_children: Vec<Node>,
}

struct Leaf<'a> {
    name: &'a str,
    path: &'a str,
    data: &'a [u8],
    iso_name: Vec<u8>,
    iso_ext: Vec<u8>,
    joliet_name: Vec<u8>,
}

struct Tree<'a> {
    dirs: Vec<Dir<'a>>,
    leaves: Vec<Leaf<'a>>,
}

impl<'a> Tree<'a> {
    fn new(files: &'a [File]) -> Result<Self, Error> {
        let mut sorted: Vec<&'a File> = files.iter().collect();
        sorted.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let mut tree = Tree {
            dirs: vec![Dir::new("", 0)],
            leaves: Vec::with_capacity(files.len()),
        };
        let mut lookup: BTreeMap<(usize, &'a str), Node> = BTreeMap::new();
        for file in sorted {
            let path = file.path.as_str();
            let segments = split_path(path)?;
            let Some((last, parents)) = segments.split_last() else {
                unreachable!("split_path returns at least one segment");
            };
            let mut cur = 0;
            for seg in parents {
                cur = match lookup.get(&(cur, *seg)) {
                    Some(Node::Dir(d)) => *d,
                    Some(Node::File(f)) => {
                        return Err(Error::InvalidPath {
                            path: path.to_owned(),
                            reason: format!("{:?} is a file", tree.leaves[*f].path),
                        });
                    }
                    None => {
                        let d = tree.dirs.len();
                        tree.dirs.push(Dir::new(seg, cur));
                        tree.dirs[cur].children.push(Node::Dir(d));
                        tree.dirs[cur].subdirs += 1;
                        lookup.insert((cur, *seg), Node::Dir(d));
                        d
                    }
                };
            }
            match lookup.get(&(cur, *last)) {
                None => {}
                Some(Node::Dir(_)) => {
                    return Err(Error::InvalidPath {
                        path: path.to_owned(),
                        reason: "a directory of that name holds other files".to_owned(),
                    });
                }
                Some(Node::File(_)) => {
                    return Err(Error::InvalidPath {
                        path: path.to_owned(),
                        reason: "given more than once".to_owned(),
                    });
                }
            }
            let f = tree.leaves.len();
            tree.leaves.push(Leaf {
                name: last,
                path,
                data: &file.data,
                iso_name: Vec::new(),
                iso_ext: Vec::new(),
                joliet_name: Vec::new(),
            });
            tree.dirs[cur].children.push(Node::File(f));
            lookup.insert((cur, *last), Node::File(f));
        }
        if tree.dirs.len() > usize::from(u16::MAX) {
            return Err(Error::TooLarge {
                reason: format!(
                    "{} directories; path tables address at most {}",
                    tree.dirs.len(),
                    u16::MAX
                ),
            });
        }
        tree.name_primary()?;
        tree.name_joliet()?;
        Ok(tree)
    }

    fn name(&self, node: Node) -> &'a str {
        match node {
            Node::Dir(d) => self.dirs[d].name,
            Node::File(f) => self.leaves[f].name,
        }
    }

    /// A path naming `node`, for errors.
    fn path(&self, node: Node) -> String {
        match node {
            Node::File(f) => self.leaves[f].path.to_owned(),
            Node::Dir(mut d) => {
                let mut parts = Vec::new();
                while d != 0 {
                    parts.push(self.dirs[d].name);
                    d = self.dirs[d].parent;
                }
                parts.reverse();
                parts.join("/")
            }
        }
    }

    fn primary_key(&self, node: Node) -> (&[u8], &[u8]) {
        match node {
            Node::Dir(d) => (&self.dirs[d].iso_name, &[]),
            Node::File(f) => (&self.leaves[f].iso_name, &self.leaves[f].iso_ext),
        }
    }

    fn joliet_key(&self, node: Node) -> &[u8] {
        match node {
            Node::Dir(d) => &self.dirs[d].joliet_name,
            Node::File(f) => &self.leaves[f].joliet_name,
        }
    }

    /// Level-1 names, unique within each directory (files and directories
    /// share one namespace, so that a reader without extensions cannot
    /// confuse `FOO.;1` with `FOO`).
    fn name_primary(&mut self) -> Result<(), Error> {
        for d in 0..self.dirs.len() {
            let mut kids = self.dirs[d].children.clone();
            kids.sort_by(|a, b| self.name(*a).as_bytes().cmp(self.name(*b).as_bytes()));
            let mut used: BTreeSet<(Vec<u8>, Vec<u8>)> = BTreeSet::new();
            let mut next_suffix: BTreeMap<(Vec<u8>, Vec<u8>), u32> = BTreeMap::new();
            for &kid in &kids {
                let base = level1_base(self.name(kid), matches!(kid, Node::Dir(_)));
                let chosen = if used.contains(&base) {
                    let mut n = next_suffix.get(&base).copied().unwrap_or(1);
                    loop {
                        let digits = n.to_string();
                        if digits.len() >= 8 {
                            return Err(Error::TooLarge {
                                reason: format!(
                                    "too many names in directory {:?} map to {:?}",
                                    self.path(Node::Dir(d)),
                                    String::from_utf8_lossy(&base.0)
                                ),
                            });
                        }
                        let keep = base.0.len().min(8 - digits.len());
                        let mut name = base.0[..keep].to_vec();
                        name.extend_from_slice(digits.as_bytes());
                        n += 1;
                        let candidate = (name, base.1.clone());
                        if !used.contains(&candidate) {
                            next_suffix.insert(base.clone(), n);
                            break candidate;
                        }
                    }
                } else {
                    base
                };
                used.insert(chosen.clone());
                match kid {
                    Node::Dir(c) => self.dirs[c].iso_name = chosen.0,
                    Node::File(f) => {
                        self.leaves[f].iso_name = chosen.0;
                        self.leaves[f].iso_ext = chosen.1;
                    }
                }
            }
            kids.sort_by(|a, b| self.primary_key(*a).cmp(&self.primary_key(*b)));
            self.dirs[d].primary_children = kids;
        }
        Ok(())
    }

    fn name_joliet(&mut self) -> Result<(), Error> {
        for d in 0..self.dirs.len() {
            for kid in self.dirs[d].children.clone() {
                let name = joliet_name(self.name(kid));
                match kid {
                    Node::Dir(c) => self.dirs[c].joliet_name = name,
                    Node::File(f) => self.leaves[f].joliet_name = name,
                }
            }
            let mut kids = self.dirs[d].children.clone();
            kids.sort_by(|a, b| self.joliet_key(*a).cmp(self.joliet_key(*b)));
            if let Some(pair) = kids
                .windows(2)
                .find(|w| self.joliet_key(w[0]) == self.joliet_key(w[1]))
            {
                return Err(Error::InvalidPath {
                    path: self.path(pair[1]),
                    reason: format!(
                        "its Joliet name (with * : ; ? \\ replaced by _) is the same as {:?}'s",
                        self.path(pair[0])
                    ),
                });
            }
            self.dirs[d].joliet_children = kids;
        }
        Ok(())
    }

    /// Breadth-first directory order, children in the hierarchy's order: the
    /// path table's order, and the order directory extents are laid out in.
    fn bfs(&self, joliet: bool) -> Vec<usize> {
        let mut order = vec![0];
        let mut i = 0;
        while i < order.len() {
            let d = order[i];
            let kids = if joliet {
                &self.dirs[d].joliet_children
            } else {
                &self.dirs[d].primary_children
            };
            order.extend(kids.iter().filter_map(|k| match k {
                Node::Dir(c) => Some(*c),
                Node::File(_) => None,
            }));
            i += 1;
        }
        order
    }
}

impl<'a> Dir<'a> {
    fn new(name: &'a str, parent: usize) -> Self {
        Dir {
            name,
            parent,
            children: Vec::new(),
            subdirs: 0,
            iso_name: Vec::new(),
            joliet_name: Vec::new(),
            primary_children: Vec::new(),
            joliet_children: Vec::new(),
        }
    }

    fn nlink(&self) -> u32 {
        2 + self.subdirs
    }
}

fn split_path(path: &str) -> Result<Vec<&str>, Error> {
    let invalid = |reason: &str| Error::InvalidPath {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if path.is_empty() {
        return Err(invalid("empty path"));
    }
    let segments: Vec<&str> = path.split('/').collect();
    for seg in &segments {
        if seg.is_empty() {
            return Err(invalid(
                "empty segment (leading, trailing or doubled slash)",
            ));
        }
        if *seg == "." || *seg == ".." {
            return Err(invalid("`.` or `..` segment"));
        }
        if seg.contains('\0') {
            return Err(invalid("NUL character"));
        }
        if seg.chars().any(char::is_control) {
            return Err(invalid("control character"));
        }
        if seg.len() > MAX_NAME_BYTES {
            return Err(Error::NameTooLong {
                path: path.to_owned(),
                reason: format!(
                    "{:?} is {} bytes; Rock Ridge names read back on Linux up to {MAX_NAME_BYTES}",
                    seg,
                    seg.len()
                ),
            });
        }
        let units = seg.encode_utf16().count();
        if units > MAX_JOLIET_UNITS {
            return Err(Error::NameTooLong {
                path: path.to_owned(),
                reason: format!(
                    "{seg:?} is {units} UTF-16 units; Joliet names are at most {MAX_JOLIET_UNITS}"
                ),
            });
        }
    }
    Ok(segments)
}

/// The level-1 name and extension a name starts from: upper-case
/// d-characters, 8.3 for files, 8 for directories.
fn level1_base(name: &str, is_dir: bool) -> (Vec<u8>, Vec<u8>) {
    fn map(s: &str, max: usize) -> Vec<u8> {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase() as u8
                } else {
                    b'_'
                }
            })
            .take(max)
            .collect()
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !is_dir && !stem.is_empty() => (map(stem, 8), map(ext, 3)),
        _ => (map(name, 8), Vec::new()),
    };
    if stem.is_empty() {
        (b"_".to_vec(), ext)
    } else {
        (stem, ext)
    }
}

fn joliet_name(name: &str) -> Vec<u8> {
    name.chars()
        .map(|c| match c {
            '*' | ':' | ';' | '?' | '\\' => '_',
            c => c,
        })
        .collect::<String>()
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect()
}

// ---------------------------------------------------------------------------
// Layout.

struct Plan<'a> {
    tree: Tree<'a>,
    volume_id: &'a str,
    publisher: &'a str,
    /// 7-byte directory-record time.
    record_time: [u8; 7],
    /// 17-byte volume-descriptor time.
    volume_time: [u8; 17],
    primary_order: Vec<usize>,
    joliet_order: Vec<usize>,
    /// Path table sizes in bytes, and L/M locations.
    primary_pt_size: u32,
    primary_pt: (u32, u32),
    joliet_pt_size: u32,
    joliet_pt: (u32, u32),
    /// Per directory index: (extent, sectors).
    primary_dirs: Vec<(u32, u32)>,
    joliet_dirs: Vec<(u32, u32)>,
    continuation_start: u32,
    /// First sector of file data; everything before it is metadata.
    data_start: u32,
    /// Per leaf: extent (0 for empty files).
    file_extents: Vec<u32>,
    total_sectors: u32,
}

impl<'a> Plan<'a> {
    fn new(options: &'a Options, files: &'a [File]) -> Result<Self, Error> {
        check_ascii("volume_id", &options.volume_id, 32)?;
        check_ascii("publisher", &options.publisher, 128)?;
        let (record_time, volume_time) = times(options.timestamp)?;
        for file in files {
            if u32::try_from(file.data.len()).is_err() {
                return Err(Error::TooLarge {
                    reason: format!(
                        "file {:?} is {} bytes; one extent holds at most {}",
                        file.path,
                        file.data.len(),
                        u32::MAX
                    ),
                });
            }
        }
        let tree = Tree::new(files)?;
        let primary_order = tree.bfs(false);
        let joliet_order = tree.bfs(true);
        let n = tree.dirs.len();
        let leaves = tree.leaves.len();
        let mut plan = Plan {
            tree,
            volume_id: &options.volume_id,
            publisher: &options.publisher,
            record_time,
            volume_time,
            primary_order,
            joliet_order,
            primary_pt_size: 0,
            primary_pt: (0, 0),
            joliet_pt_size: 0,
            joliet_pt: (0, 0),
            primary_dirs: vec![(0, 0); n],
            joliet_dirs: vec![(0, 0); n],
            continuation_start: 0,
            data_start: 0,
            file_extents: vec![0; leaves],
            total_sectors: 0,
        };

        // Sizes: record lengths do not depend on extents, so lay out with
        // every extent 0 first.
        plan.primary_pt_size = plan.path_table(false, false).len() as u32;
        plan.joliet_pt_size = plan.path_table(true, false).len() as u32;
        let mut continuations = Continuations::default();
        let mut primary_sectors = vec![0; n];
        for &d in &plan.primary_order {
            primary_sectors[d] = sectors_of(plan.primary_dir(d, &mut continuations).len());
        }
        let continuation_sectors = continuations.sectors();
        let mut joliet_sectors = vec![0; n];
        for &d in &plan.joliet_order {
            joliet_sectors[d] = sectors_of(plan.joliet_dir(d).len());
        }
        let largest = primary_sectors.iter().chain(&joliet_sectors).max();
        if largest.is_some_and(|&s| u64::from(s) * SECTOR_SIZE > u64::from(u32::MAX)) {
            return Err(Error::TooLarge {
                reason: "a directory's records exceed 4 GiB".to_owned(),
            });
        }

        // Extents.
        let mut next = u64::from(FIRST_FREE_SECTOR);
        let mut take = |sectors: u64| {
            let at = next;
            next += sectors;
            at
        };
        let primary_pt_sectors = u64::from(sectors_of(plan.primary_pt_size as usize));
        let joliet_pt_sectors = u64::from(sectors_of(plan.joliet_pt_size as usize));
        let pl = take(primary_pt_sectors);
        let pm = take(primary_pt_sectors);
        let jl = take(joliet_pt_sectors);
        let jm = take(joliet_pt_sectors);
        let mut primary_at = vec![0; n];
        for &d in &plan.primary_order {
            primary_at[d] = take(u64::from(primary_sectors[d]));
        }
        let continuation_start = take(u64::from(continuation_sectors));
        let mut joliet_at = vec![0; n];
        for &d in &plan.joliet_order {
            joliet_at[d] = take(u64::from(joliet_sectors[d]));
        }
        let data_start = take(0);
        let mut file_at = Vec::with_capacity(plan.tree.leaves.len());
        for leaf in &plan.tree.leaves {
            if leaf.data.is_empty() {
                file_at.push(0);
            } else {
                file_at.push(take(sectors_of_u64(leaf.data.len() as u64)));
            }
        }
        let total = take(0);
        let sector = |s: u64| -> Result<u32, Error> {
            u32::try_from(s).map_err(|_| Error::TooLarge {
                reason: format!(
                    "{total} sectors of {SECTOR_SIZE} bytes; ISO 9660 addresses at most {}",
                    u32::MAX
                ),
            })
        };
        plan.total_sectors = sector(total)?;
        plan.primary_pt = (sector(pl)?, sector(pm)?);
        plan.joliet_pt = (sector(jl)?, sector(jm)?);
        for d in 0..n {
            plan.primary_dirs[d] = (sector(primary_at[d])?, primary_sectors[d]);
            plan.joliet_dirs[d] = (sector(joliet_at[d])?, joliet_sectors[d]);
        }
        plan.continuation_start = sector(continuation_start)?;
        plan.data_start = sector(data_start)?;
        plan.file_extents = file_at.into_iter().map(sector).collect::<Result<_, _>>()?;
        Ok(plan)
    }

    fn image_bytes(&self) -> u64 {
        u64::from(self.total_sectors) * SECTOR_SIZE
    }

    fn write(&self, out: &mut impl Write) -> Result<u64, Error> {
        let mut meta = vec![0u8; self.data_start as usize * SECTOR];
        let at = |sector: u32| sector as usize * SECTOR;

        self.volume_descriptor(false, &mut meta[at(PVD_SECTOR)..at(PVD_SECTOR + 1)]);
        self.volume_descriptor(true, &mut meta[at(PVD_SECTOR + 1)..at(PVD_SECTOR + 2)]);
        let terminator = &mut meta[at(PVD_SECTOR + 2)..at(PVD_SECTOR + 3)];
        terminator[0] = 255;
        terminator[1..6].copy_from_slice(b"CD001");
        terminator[6] = 1;

        for (joliet, (l, m)) in [(false, self.primary_pt), (true, self.joliet_pt)] {
            let table = self.path_table(joliet, false);
            meta[at(l)..at(l) + table.len()].copy_from_slice(&table);
            let table = self.path_table(joliet, true);
            meta[at(m)..at(m) + table.len()].copy_from_slice(&table);
        }

        let mut continuations = Continuations::default();
        for &d in &self.primary_order {
            let bytes = self.primary_dir(d, &mut continuations);
            let start = at(self.primary_dirs[d].0);
            meta[start..start + bytes.len()].copy_from_slice(&bytes);
        }
        let start = at(self.continuation_start);
        meta[start..start + continuations.buf.len()].copy_from_slice(&continuations.buf);
        for &d in &self.joliet_order {
            let bytes = self.joliet_dir(d);
            let start = at(self.joliet_dirs[d].0);
            meta[start..start + bytes.len()].copy_from_slice(&bytes);
        }

        out.write_all(&meta)?;
        let mut written = meta.len() as u64;
        let zeros = [0u8; SECTOR];
        for leaf in &self.tree.leaves {
            out.write_all(leaf.data)?;
            let pad = (SECTOR - leaf.data.len() % SECTOR) % SECTOR;
            out.write_all(&zeros[..pad])?;
            written += (leaf.data.len() + pad) as u64;
        }
        debug_assert_eq!(written, self.image_bytes());
        Ok(written)
    }

    fn volume_descriptor(&self, joliet: bool, vd: &mut [u8]) {
        let text = |field: &mut [u8], s: &str| {
            if joliet {
                put_ucs2(field, s);
            } else {
                put_ascii(field, s);
            }
        };
        vd[0] = if joliet { 2 } else { 1 };
        vd[1..6].copy_from_slice(b"CD001");
        vd[6] = 1;
        text(&mut vd[8..40], "LINUX");
        text(&mut vd[40..72], self.volume_id);
        vd[80..88].copy_from_slice(&both32(self.total_sectors));
        if joliet {
            vd[88..91].copy_from_slice(b"%/E");
        }
        vd[120..124].copy_from_slice(&both16(1));
        vd[124..128].copy_from_slice(&both16(1));
        vd[128..132].copy_from_slice(&both16(SECTOR as u16));
        let (size, (l, m)) = if joliet {
            (self.joliet_pt_size, self.joliet_pt)
        } else {
            (self.primary_pt_size, self.primary_pt)
        };
        vd[132..140].copy_from_slice(&both32(size));
        vd[140..144].copy_from_slice(&l.to_le_bytes());
        vd[148..152].copy_from_slice(&m.to_be_bytes());
        let (extent, sectors) = if joliet {
            self.joliet_dirs[0]
        } else {
            self.primary_dirs[0]
        };
        let mut root = Vec::with_capacity(34);
        record(
            &mut root,
            extent,
            sectors * SECTOR as u32,
            true,
            &[0],
            &[],
            &self.record_time,
        );
        vd[156..190].copy_from_slice(&root);
        text(&mut vd[190..318], ""); // volume set
        text(&mut vd[318..446], self.publisher);
        text(&mut vd[446..574], ""); // data preparer
        text(&mut vd[574..702], ""); // application
        text(&mut vd[702..739], ""); // copyright file
        text(&mut vd[739..776], ""); // abstract file
        text(&mut vd[776..813], ""); // bibliographic file
        vd[813..830].copy_from_slice(&self.volume_time);
        vd[830..847].copy_from_slice(&self.volume_time);
        vd[847..863].fill(b'0'); // expiration: unspecified
        vd[864..880].fill(b'0'); // effective: unspecified
        vd[881] = 1; // file structure version
    }

    /// The L (little-endian) or M (big-endian) path table of a hierarchy.
    fn path_table(&self, joliet: bool, big_endian: bool) -> Vec<u8> {
        let (order, dirs) = if joliet {
            (&self.joliet_order, &self.joliet_dirs)
        } else {
            (&self.primary_order, &self.primary_dirs)
        };
        let mut number = vec![0u16; self.tree.dirs.len()];
        for (i, &d) in order.iter().enumerate() {
            number[d] = (i + 1) as u16; // at most u16::MAX directories, checked
        }
        let mut table = Vec::new();
        for &d in order {
            let dir = &self.tree.dirs[d];
            let id: &[u8] = match (d, joliet) {
                (0, _) => &[0],
                (_, true) => &dir.joliet_name,
                (_, false) => &dir.iso_name,
            };
            table.push(id.len() as u8);
            table.push(0);
            let (extent, parent) = (dirs[d].0, number[dir.parent]);
            if big_endian {
                table.extend_from_slice(&extent.to_be_bytes());
                table.extend_from_slice(&parent.to_be_bytes());
            } else {
                table.extend_from_slice(&extent.to_le_bytes());
                table.extend_from_slice(&parent.to_le_bytes());
            }
            table.extend_from_slice(id);
            if id.len() % 2 == 1 {
                table.push(0);
            }
        }
        table
    }

    /// A primary directory's extent, whole sectors, with Rock Ridge entries;
    /// continuation areas go to `continuations`.
    fn primary_dir(&self, d: usize, continuations: &mut Continuations) -> Vec<u8> {
        let dir = &self.tree.dirs[d];
        let mut out = DirBuf::default();
        let mut rec = Vec::with_capacity(256);
        let mut fixed = Vec::with_capacity(128);
        let mut moved = Vec::with_capacity(256);
        let (extent, sectors) = self.primary_dirs[d];
        let (p_extent, p_sectors) = self.primary_dirs[dir.parent];
        let p_nlink = self.tree.dirs[dir.parent].nlink();
        let entries = [
            (extent, sectors * SECTOR as u32, 0u8, dir.nlink()),
            (p_extent, p_sectors * SECTOR as u32, 1u8, p_nlink),
        ];
        let mut id = Vec::with_capacity(16);
        for (i, (extent, size, dot_id, nlink)) in entries.into_iter().enumerate() {
            fixed.clear();
            moved.clear();
            if d == 0 && i == 0 {
                fixed.extend_from_slice(&[b'S', b'P', 7, 1, 0xBE, 0xEF, 0]);
            }
            self.rock_ridge(&mut fixed, &mut moved, DIR_MODE, nlink, None);
            if d == 0 && i == 0 {
                moved.extend_from_slice(&er());
            }
            self.primary_record(
                &mut rec,
                extent,
                size,
                true,
                &[dot_id],
                &fixed,
                &moved,
                continuations,
            );
            out.push(&rec);
        }
        for &kid in &dir.primary_children {
            fixed.clear();
            moved.clear();
            id.clear();
            let (extent, size, is_dir, mode, nlink, name) = match kid {
                Node::Dir(c) => {
                    let (extent, sectors) = self.primary_dirs[c];
                    let child = &self.tree.dirs[c];
                    id.extend_from_slice(&child.iso_name);
                    let size = sectors * SECTOR as u32;
                    (extent, size, true, DIR_MODE, child.nlink(), child.name)
                }
                Node::File(f) => {
                    let leaf = &self.tree.leaves[f];
                    id.extend_from_slice(&leaf.iso_name);
                    id.push(b'.');
                    id.extend_from_slice(&leaf.iso_ext);
                    id.extend_from_slice(b";1");
                    let extent = self.file_extents[f];
                    (
                        extent,
                        leaf.data.len() as u32,
                        false,
                        FILE_MODE,
                        1,
                        leaf.name,
                    )
                }
            };
            self.rock_ridge(&mut fixed, &mut moved, mode, nlink, Some(name));
            self.primary_record(
                &mut rec,
                extent,
                size,
                is_dir,
                &id,
                &fixed,
                &moved,
                continuations,
            );
            out.push(&rec);
        }
        out.finish()
    }

    /// RR, PX and TF go in `fixed` (always in the record), NM in `moved`
    /// (in the record if it fits, else in a continuation area).
    fn rock_ridge(
        &self,
        fixed: &mut Vec<u8>,
        moved: &mut Vec<u8>,
        mode: u32,
        nlink: u32,
        name: Option<&str>,
    ) {
        const RR_PX: u8 = 0x01;
        const RR_NM: u8 = 0x08;
        const RR_TF: u8 = 0x80;
        let flags = if name.is_some() {
            RR_PX | RR_NM | RR_TF
        } else {
            RR_PX | RR_TF
        };
        fixed.extend_from_slice(&[b'R', b'R', 5, 1, flags]);
        fixed.extend_from_slice(&[b'P', b'X', 36, 1]);
        fixed.extend_from_slice(&both32(mode));
        fixed.extend_from_slice(&both32(nlink));
        fixed.extend_from_slice(&both32(0)); // uid
        fixed.extend_from_slice(&both32(0)); // gid
        // TF: modify, access, attributes (as genisoimage), short form.
        fixed.extend_from_slice(&[b'T', b'F', 5 + 3 * 7, 1, 0x0E]);
        for _ in 0..3 {
            fixed.extend_from_slice(&self.record_time);
        }
        if let Some(name) = name {
            // At most MAX_NAME_BYTES (253) bytes: one NM entry.
            moved.extend_from_slice(&[b'N', b'M', 5 + name.len() as u8, 1, 0]);
            moved.extend_from_slice(name.as_bytes());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn primary_record(
        &self,
        rec: &mut Vec<u8>,
        extent: u32,
        size: u32,
        is_dir: bool,
        id: &[u8],
        fixed: &[u8],
        moved: &[u8],
        continuations: &mut Continuations,
    ) {
        let budget = MAX_RECORD - (33 + id.len() + usize::from(id.len().is_multiple_of(2)));
        rec.clear();
        if fixed.len() + moved.len() <= budget {
            let mut su = Vec::with_capacity(fixed.len() + moved.len());
            su.extend_from_slice(fixed);
            su.extend_from_slice(moved);
            record(rec, extent, size, is_dir, id, &su, &self.record_time);
        } else {
            debug_assert!(fixed.len() + 28 <= budget);
            let (sector, offset) = continuations.push(moved);
            let mut su = Vec::with_capacity(fixed.len() + 28);
            su.extend_from_slice(fixed);
            su.extend_from_slice(&[b'C', b'E', 28, 1]);
            su.extend_from_slice(&both32(self.continuation_start + sector));
            su.extend_from_slice(&both32(offset));
            su.extend_from_slice(&both32(moved.len() as u32));
            record(rec, extent, size, is_dir, id, &su, &self.record_time);
        }
    }

    fn joliet_dir(&self, d: usize) -> Vec<u8> {
        let dir = &self.tree.dirs[d];
        let mut out = DirBuf::default();
        let mut rec = Vec::with_capacity(256);
        let (extent, sectors) = self.joliet_dirs[d];
        let (p_extent, p_sectors) = self.joliet_dirs[dir.parent];
        let t = &self.record_time;
        record(
            &mut rec,
            extent,
            sectors * SECTOR as u32,
            true,
            &[0],
            &[],
            t,
        );
        out.push(&rec);
        rec.clear();
        record(
            &mut rec,
            p_extent,
            p_sectors * SECTOR as u32,
            true,
            &[1],
            &[],
            t,
        );
        out.push(&rec);
        for &kid in &dir.joliet_children {
            rec.clear();
            match kid {
                Node::Dir(c) => {
                    let (extent, sectors) = self.joliet_dirs[c];
                    let id = &self.tree.dirs[c].joliet_name;
                    record(&mut rec, extent, sectors * SECTOR as u32, true, id, &[], t);
                }
                Node::File(f) => {
                    let leaf = &self.tree.leaves[f];
                    let size = leaf.data.len() as u32;
                    let id = &leaf.joliet_name;
                    record(&mut rec, self.file_extents[f], size, false, id, &[], t);
                }
            }
            out.push(&rec);
        }
        out.finish()
    }
}

/// Appends a directory record.
fn record(
    out: &mut Vec<u8>,
    extent: u32,
    size: u32,
    is_dir: bool,
    id: &[u8],
    system_use: &[u8],
    time: &[u8; 7],
) {
    let pad = usize::from(id.len().is_multiple_of(2));
    let unpadded = 33 + id.len() + pad + system_use.len();
    let len = unpadded + unpadded % 2;
    debug_assert!(len <= 255, "directory record of {len} bytes");
    out.push(len as u8);
    out.push(0); // extended attribute record length
    out.extend_from_slice(&both32(extent));
    out.extend_from_slice(&both32(size));
    out.extend_from_slice(time);
    out.push(if is_dir { 2 } else { 0 });
    out.push(0); // file unit size
    out.push(0); // interleave gap
    out.extend_from_slice(&both16(1)); // volume sequence number
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.resize(out.len() + pad, 0);
    out.extend_from_slice(system_use);
    out.resize(out.len() + unpadded % 2, 0);
}

/// A directory's records, none straddling a sector.
#[derive(Default)]
struct DirBuf {
    buf: Vec<u8>,
}

impl DirBuf {
    fn push(&mut self, rec: &[u8]) {
        if self.buf.len() % SECTOR + rec.len() > SECTOR {
            pad_to_sector(&mut self.buf);
        }
        self.buf.extend_from_slice(rec);
    }

    fn finish(mut self) -> Vec<u8> {
        pad_to_sector(&mut self.buf);
        self.buf
    }
}

/// Rock Ridge continuation areas, none crossing a sector.
#[derive(Default)]
struct Continuations {
    buf: Vec<u8>,
}

impl Continuations {
    /// Returns the area's sector (relative to the first continuation sector)
    /// and offset.
    fn push(&mut self, area: &[u8]) -> (u32, u32) {
        if self.buf.len() % SECTOR + area.len() > SECTOR {
            pad_to_sector(&mut self.buf);
        }
        let at = self.buf.len();
        self.buf.extend_from_slice(area);
        ((at / SECTOR) as u32, (at % SECTOR) as u32)
    }

    fn sectors(&self) -> u32 {
        sectors_of(self.buf.len())
    }
}

fn pad_to_sector(buf: &mut Vec<u8>) {
    let rem = buf.len() % SECTOR;
    if rem != 0 {
        buf.resize(buf.len() + SECTOR - rem, 0);
    }
}

/// Sectors of a metadata structure (always small).
fn sectors_of(len: usize) -> u32 {
    len.div_ceil(SECTOR) as u32
}

fn sectors_of_u64(len: u64) -> u64 {
    len.div_ceil(SECTOR_SIZE)
}

/// The `ER` entry declaring RRIP 1.09 (RRIP_1991A), with the texts
/// genisoimage and the RRIP specification use.
fn er() -> Vec<u8> {
    const ID: &[u8] = b"RRIP_1991A";
    const DES: &[u8] =
        b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
    const SRC: &[u8] = b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  \
SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";
    let len = 8 + ID.len() + DES.len() + SRC.len();
    let mut e = Vec::with_capacity(len);
    e.extend_from_slice(&[
        b'E',
        b'R',
        len as u8,
        1,
        ID.len() as u8,
        DES.len() as u8,
        SRC.len() as u8,
        1,
    ]);
    e.extend_from_slice(ID);
    e.extend_from_slice(DES);
    e.extend_from_slice(SRC);
    e
}

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

fn put_ascii(field: &mut [u8], s: &str) {
    field.fill(b' ');
    field[..s.len()].copy_from_slice(s.as_bytes());
}

/// UCS-2 big-endian, truncated to the field, padded with UCS-2 spaces (a
/// last odd byte stays 0).
fn put_ucs2(field: &mut [u8], s: &str) {
    field.fill(0);
    let mut units = s.encode_utf16().chain(std::iter::repeat(u16::from(b' ')));
    for pair in field.chunks_exact_mut(2) {
        if let Some(u) = units.next() {
            pair.copy_from_slice(&u.to_be_bytes());
        }
    }
}

fn check_ascii(field: &'static str, s: &str, max: usize) -> Result<(), Error> {
    if s.len() > max {
        return Err(Error::InvalidOption {
            field,
            reason: format!("{s:?} is {} bytes, at most {max}", s.len()),
        });
    }
    if let Some(c) = s.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(Error::InvalidOption {
            field,
            reason: format!("{s:?} holds {c:?}; only printable ASCII is allowed"),
        });
    }
    Ok(())
}

/// The 7-byte directory-record time and the 17-byte volume-descriptor time,
/// both in UTC.
fn times(t: OffsetDateTime) -> Result<([u8; 7], [u8; 17]), Error> {
    // Directory records hold years 1900..=2155; keep a day's margin so the
    // conversion to UTC cannot leave that range.
    if !(1901..=2154).contains(&t.year()) {
        return Err(Error::InvalidOption {
            field: "timestamp",
            reason: format!("{t} is outside the years 1901 to 2154"),
        });
    }
    let t = t.to_offset(UtcOffset::UTC);
    let record = [
        (t.year() - 1900) as u8,
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        0,
    ];
    let digits = format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 10_000_000
    );
    let mut volume = [0u8; 17];
    volume[..16].copy_from_slice(digits.as_bytes());
    Ok((record, volume))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level1_names() {
        assert_eq!(
            level1_base("meta_data.json", false),
            (b"META_DAT".to_vec(), b"JSO".to_vec())
        );
        assert_eq!(
            level1_base("user_data", false),
            (b"USER_DAT".to_vec(), vec![])
        );
        assert_eq!(
            level1_base("2016-10-06", true),
            (b"2016_10_".to_vec(), vec![])
        );
        assert_eq!(level1_base(".hidden", false), (b"_HIDDEN".to_vec(), vec![]));
        assert_eq!(
            level1_base("ü.x.y", false),
            (b"__X".to_vec(), b"Y".to_vec())
        );
    }

    #[test]
    fn both_endian() {
        assert_eq!(both16(0x0102), [2, 1, 1, 2]);
        assert_eq!(both32(0x01020304), [4, 3, 2, 1, 1, 2, 3, 4]);
    }

    #[test]
    fn er_is_237_bytes() {
        assert_eq!(er().len(), 237);
    }
}
