//! Archives of workspace files: what `archive:` (artifacts the agent streams to the controller)
//! and `stash:`/`unstash:` (files passed between the stages of one build) move.
//!
//! One stream format, written by [`pack`] and read by [`unpack`]: a tar archive (GNU long-name
//! entries for paths and link targets over 100 bytes) compressed as one LZ4 frame with a content
//! checksum. Its entries are, in path order (component by component, so a directory's entries
//! follow it): directories, regular files and symbolic links, with their permission bits
//! (setuid, setgid and sticky dropped) and mtimes in whole seconds; owners are not kept (uid and
//! gid are 0 in the archive and the unpacking user owns what is written). The last entry is a
//! regular file named `.wisp-sums`, the end-to-end check: one line `HEX SIZE PATH\n` for each
//! regular file, HEX its SHA-256 in lower case, SIZE its length in bytes, PATH the `/`-separated
//! path of the entry.
//!
//! Both ends are synchronous `std::io`: the callers run them on a thread of their own and move the
//! bytes through a pipe. Memory stays bounded whatever the files' sizes (fixed 64 KiB buffers;
//! nothing reads a whole file), and apart from the list of sums (one line per file, which both
//! ends keep until the end of the stream) and the names of one directory at a time (sorted by
//! [`pack`]), whatever their number.
//!
//! [`unpack`] treats its input as hostile: the controller unpacks what an agent sent and an agent
//! what the controller relays from another agent. See its documentation for what it refuses.

mod lz4end;
mod pack;
mod select;
mod unpack;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;

pub use pack::pack;
pub use select::Selection;
pub use unpack::unpack;

/// The name of the last entry of every archive, the list of its files' SHA-256 sums and sizes.
/// [`pack`] never takes an entry of this name (at the root) from the tree, and [`unpack`] never
/// writes one.
pub const SUMS_NAME: &str = ".wisp-sums";

/// The agent's own directory at the root of its work dir, which [`pack`] skips and [`unpack`]
/// refuses to write into.
pub const AGENT_DIR: &str = ".wisp";

/// The longest path, and the longest symbolic link target, an archive may hold (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// Buffer size for file contents, both ways.
const BUF_SIZE: usize = 64 * 1024;

/// What [`pack`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packed {
    /// Regular files.
    pub files: u64,
    /// Directories (those that matched and the parents of what matched).
    pub dirs: u64,
    /// Symbolic links.
    pub links: u64,
    /// Entries that matched but are of a kind an archive does not hold (sockets, fifos, devices);
    /// left out.
    pub skipped: u64,
    /// Bytes of file contents.
    pub bytes: u64,
    /// Bytes of the uncompressed tar stream (contents, headers, padding and the sums entry).
    pub tar_bytes: u64,
    /// Bytes written to `out`.
    pub compressed_bytes: u64,
}

impl Packed {
    /// Whether the selection matched nothing at all (the caller may want to say so).
    pub fn is_empty(&self) -> bool {
        self.files == 0 && self.dirs == 0 && self.links == 0
    }
}

/// Bounds for [`unpack`] against a decompression bomb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries (files, directories and links; the sums entry does not count).
    pub max_entries: u64,
    /// Most bytes of file contents, all files together.
    pub max_bytes: u64,
}

impl Default for Limits {
    /// One million entries and 10 GiB: generous defaults; callers with a tighter budget (a quota
    /// on the controller's data dir) set their own.
    fn default() -> Self {
        Limits { max_entries: 1_000_000, max_bytes: 10 << 30 }
    }
}

/// One regular file [`unpack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSum {
    /// Its `/`-separated path under `dest`.
    pub path: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its SHA-256 (checked against the archive's `.wisp-sums`).
    pub sha256: [u8; 32],
}

/// What [`unpack`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files (`written.len()`).
    pub files: u64,
    /// Directory entries (directories created only as parents of other entries do not count).
    pub dirs: u64,
    /// Symbolic links.
    pub links: u64,
    /// Bytes of file contents.
    pub bytes: u64,
    /// The regular files, in archive order.
    pub written: Vec<FileSum>,
}

/// Why [`pack`], [`unpack`] or [`Selection::new`] failed.
#[derive(Debug)]
pub enum ArchiveError {
    /// A pattern given to [`Selection::new`] is not accepted.
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file system refused something: `what` says what was being done, to which path.
    Io {
        /// What was being done, e.g. "reading src/main.rs".
        what: String,
        /// The error.
        err: io::Error,
    },
    /// An entry that cannot be packed, or that [`unpack`] refuses (a hostile or broken archive).
    Entry {
        /// The entry's path as the tree or the archive gives it (lossy UTF-8, cut if long).
        path: String,
        /// Why.
        reason: String,
    },
    /// The stream is not a wisp archive, is cut short or corrupt, does not match its sums, or is
    /// over the limits.
    Stream(String),
}

impl ArchiveError {
    fn io(what: impl Into<String>, err: io::Error) -> Self {
        ArchiveError::Io { what: what.into(), err }
    }

    fn entry(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ArchiveError::Entry { path: path.into(), reason: reason.into() }
    }
}

impl fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchiveError::Pattern { pattern, reason } => write!(f, "bad pattern {pattern:?}: {reason}"),
            ArchiveError::Io { what, err } => write!(f, "{what}: {err}"),
            ArchiveError::Entry { path, reason } => write!(f, "entry {path:?}: {reason}"),
            ArchiveError::Stream(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ArchiveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ArchiveError::Io { err, .. } => Some(err),
            _ => None,
        }
    }
}

/// A name for messages: lossy UTF-8, at most 300 bytes.
fn show(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let cut = crate::text::truncate(&s, 300);
    if cut.len() < s.len() {
        format!("{cut}...")
    } else {
        cut.to_string()
    }
}

/// Open a directory given by path (following links: the caller chose it) as a descriptor.
fn open_dir_path(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_DIRECTORY).open(path)?;
    Ok(dir.into())
}

/// Permission bits kept: rwx for user, group and others; never setuid, setgid or sticky.
const MODE_MASK: u32 = 0o777;
