//! [`unpack`]: read an archive as hostile input and write it under `dest` with directory
//! descriptors, never through a symbolic link.

use super::lz4end::FrameCheck;
use super::{
    show, ArchiveError, FileSum, Limits, Unpacked, AGENT_DIR, BUF_SIZE, MAX_PATH, MODE_MASK, SUMS_NAME,
};
use lz4_flex::frame::FrameDecoder;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, mkdirat, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{symlinkat, unlinkat, UnlinkatFlags};
use ring::digest;
use std::ffi::{CStr, CString};
use std::fs::{File, FileTimes, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};
use tar::{EntryType, Header};

/// The longest name of one path component (Linux's NAME_MAX).
const MAX_NAME: usize = 255;

/// The longest line of `.wisp-sums`: 64 hex digits, a size of up to 20 digits, a path, two spaces
/// and the newline.
const MAX_SUMS_LINE: usize = 64 + 1 + 20 + 1 + MAX_PATH + 1;

/// What may follow the end of the tar archive inside the frame: zeros (the second end block, or a
/// writer's padding to a record size), up to this many.
const MAX_TRAILER: u64 = 1 << 20;

/// Unpack an archive written by [`pack`](super::pack) from `input` into `dest` (created if
/// missing), treating the input as hostile.
///
/// Refused, each with an error naming the entry: an absolute path, a `..` component, a path
/// through a symbolic link (one the archive made earlier or one already in `dest`: every
/// directory on the way is opened with `O_NOFOLLOW`, relative to its parent's descriptor, so
/// nothing is ever written through a link), a name with a NUL or a newline, a path over 4096
/// bytes or a component over 255, a name that is not UTF-8, anything under `.wisp` at the top
/// (the agent's own directory), hard links, devices, fifos, sparse files, PAX headers and
/// unknown entry types, a file or link that would replace a directory, a directory that would
/// replace a file or link, entries not in [`pack`](super::pack)'s order (each path once, by
/// path component by component: a path given twice is refused), more than
/// `limits.max_entries` entries or `limits.max_bytes` bytes of file contents (checked from the
/// headers before anything is written), and a `.wisp-sums` that does not match what was
/// written: every file's SHA-256 is computed while it is written and checked against the sums
/// entry, which must come last and list the files in the archive's order; a missing sums entry,
/// a file it lacks or one it lists that the archive did not hold are errors too. A stream that is
/// not one LZ4 frame, has a bad header checksum, is corrupt, is cut short or has bytes after its
/// end is refused.
///
/// Written: directories (empty ones too; their modes and mtimes are applied once their entries
/// are done, so a read-only directory can still be filled), regular files (a new file is created
/// with `O_EXCL`; an existing file or link in its place is replaced by writing a temporary file
/// in the same directory and renaming it over, never by opening it) and symbolic links (their
/// target text as given, never resolved). Modes are the archive's permission bits without
/// setuid, setgid or sticky; mtimes are applied; the owner is whoever runs this.
///
/// On error, what was written before the error stays (including a file whose sums did not match,
/// and directories whose modes were not applied yet): the caller removes `dest` if it wants
/// nothing of a failed unpack. Nothing is ever written outside `dest`.
pub fn unpack(input: impl Read, dest: &Path, limits: &Limits) -> Result<Unpacked, ArchiveError> {
    let shown = dest.display().to_string();
    if let Err(e) = std::fs::create_dir_all(dest) {
        return Err(ArchiveError::io(format!("creating {shown}"), e));
    }
    let root = super::open_dir_path(dest).map_err(|e| ArchiveError::io(format!("opening {shown}"), e))?;
    let mut tin = TarIn { r: FrameDecoder::new(FrameCheck::new(input)) };
    let mut u = Unpacker {
        root,
        stack: Vec::new(),
        limits: *limits,
        out: Unpacked::default(),
        buf: vec![0; BUF_SIZE],
        entries: 0,
        tmp: 0,
    };
    let mut header = Header::new_old();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut prev = String::new();
    let mut sums_done = false;
    loop {
        if !tin.block(header.as_mut_bytes())? {
            return Err(ArchiveError::Stream(if sums_done {
                "the stream is cut short: no end-of-archive block".into()
            } else {
                format!("no {SUMS_NAME} entry: the archive is cut short or was not written by wisp")
            }));
        }
        if header.as_bytes().iter().all(|b| *b == 0) {
            break;
        }
        check_header_sum(&header)?;
        if sums_done {
            return Err(ArchiveError::Stream(format!("{SUMS_NAME} is not the last entry of the archive")));
        }
        let kind = header.entry_type();
        let size = header.entry_size().map_err(stream_err)?;
        if kind == EntryType::GNULongName || kind == EntryType::GNULongLink {
            let slot = if kind == EntryType::GNULongName { &mut long_name } else { &mut long_link };
            if slot.is_some() {
                return Err(ArchiveError::Stream("two GNU long-name entries for one entry".into()));
            }
            *slot = Some(tin.long_name(size)?);
            continue;
        }
        let raw_path = match long_name.take() {
            Some(p) => p,
            None => header.path_bytes().into_owned(),
        };
        let link = match long_link.take() {
            Some(l) => Some(l),
            None => header.link_name_bytes().map(|l| l.into_owned()),
        };
        let path = check_path(&raw_path)?;
        if path == SUMS_NAME {
            if kind != EntryType::Regular {
                return Err(ArchiveError::entry(path, "the sums entry is not a regular file"));
            }
            u.check_sums(&mut tin, size)?;
            sums_done = true;
            continue;
        }
        // pack writes each path once, in order component by component: anything else (a path
        // twice, a directory come back to) is not one of its archives.
        if !prev.is_empty() && path.split('/').cmp(prev.split('/')) != std::cmp::Ordering::Greater {
            return Err(ArchiveError::entry(path, "out of order or given twice"));
        }
        prev.clear();
        prev.push_str(&path);
        u.entries += 1;
        if u.entries > u.limits.max_entries {
            return Err(ArchiveError::Stream(format!(
                "more than {} entries: over the limit",
                u.limits.max_entries
            )));
        }
        u.entry(&mut tin, &header, kind, size, &path, link.as_deref())?;
    }
    if long_name.is_some() || long_link.is_some() {
        return Err(ArchiveError::Stream("a GNU long-name entry with no entry after it".into()));
    }
    if !sums_done {
        return Err(ArchiveError::Stream(format!(
            "no {SUMS_NAME} entry: the archive is cut short or was not written by wisp"
        )));
    }
    u.close_to(0)?;
    // After the tar archive's end: only zeros, then the frame's end mark, then nothing.
    let mut trailer = 0u64;
    loop {
        let n = match tin.r.read(&mut u.buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(stream_err(e)),
        };
        trailer += n as u64;
        if trailer > MAX_TRAILER || u.buf[..n].iter().any(|b| *b != 0) {
            return Err(ArchiveError::Stream("data after the end of the archive".into()));
        }
    }
    let check = tin.r.get_mut();
    if !check.at_frame_end() {
        return Err(ArchiveError::Stream("the stream is cut short: it has no LZ4 end mark".into()));
    }
    if !check.at_input_end().map_err(stream_err)? {
        return Err(ArchiveError::Stream("data after the end of the LZ4 frame".into()));
    }
    Ok(u.out)
}

fn stream_err(e: io::Error) -> ArchiveError {
    ArchiveError::Stream(format!("reading the archive: {e}"))
}

fn cut_short() -> ArchiveError {
    ArchiveError::Stream("the stream is cut short".into())
}

/// A header's checksum: the sum of its bytes with the checksum field taken as spaces.
fn check_header_sum(h: &Header) -> Result<(), ArchiveError> {
    let b = h.as_bytes();
    let sum: u32 = b[..148].iter().chain(&[b' '; 8]).chain(&b[156..]).map(|x| u32::from(*x)).sum();
    if h.cksum().ok() != Some(sum) {
        return Err(ArchiveError::Stream("a tar header with a bad checksum".into()));
    }
    Ok(())
}

/// The tar layer over the decompressed stream: 512-byte blocks.
struct TarIn<R> {
    r: R,
}

impl<R: Read> TarIn<R> {
    /// Fill `buf`, or give false at a clean end before its first byte.
    fn block(&mut self, buf: &mut [u8]) -> Result<bool, ArchiveError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(cut_short()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(stream_err(e)),
            }
        }
        Ok(true)
    }

    /// Fill `buf` or fail.
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), ArchiveError> {
        if buf.is_empty() || self.block(buf)? {
            Ok(())
        } else {
            Err(cut_short())
        }
    }

    /// Some of an entry's data: at most `buf.len()` bytes, at least one.
    fn some(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        loop {
            match self.r.read(buf) {
                Ok(0) => return Err(cut_short()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(stream_err(e)),
            }
        }
    }

    /// The zeros after `len` bytes of data, up to the next block.
    fn pad(&mut self, len: u64) -> Result<(), ArchiveError> {
        let rem = ((512 - len % 512) % 512) as usize;
        self.exact(&mut [0u8; 512][..rem])
    }

    /// The data of a GNU long-name entry of `size` bytes, without its terminating NUL.
    fn long_name(&mut self, size: u64) -> Result<Vec<u8>, ArchiveError> {
        if size > MAX_PATH as u64 + 1 {
            return Err(ArchiveError::entry("(a GNU long name)", "path longer than 4096 bytes"));
        }
        let mut name = vec![0; size as usize];
        self.exact(&mut name)?;
        self.pad(size)?;
        if name.last() == Some(&0) {
            name.pop();
        }
        Ok(name)
    }
}

/// The entry's path, normalised (no empty or `.` components, `/`-separated), or why it is refused.
fn check_path(raw: &[u8]) -> Result<String, ArchiveError> {
    let refuse = |why: &str| Err(ArchiveError::entry(show(raw), why));
    if raw.len() > MAX_PATH {
        return refuse("path longer than 4096 bytes");
    }
    if raw.contains(&0) {
        return refuse("a NUL in the name");
    }
    if raw.contains(&b'\n') {
        return refuse("a newline in the name");
    }
    let Ok(s) = std::str::from_utf8(raw) else {
        return refuse("the name is not UTF-8");
    };
    if s.starts_with('/') {
        return refuse("an absolute path");
    }
    let mut path = String::with_capacity(s.len());
    for comp in s.split('/') {
        match comp {
            "" | "." => continue,
            ".." => return refuse("a .. component"),
            c if c.len() > MAX_NAME => return refuse("a name longer than 255 bytes"),
            c => {
                if !path.is_empty() {
                    path.push('/');
                }
                path.push_str(c);
            }
        }
    }
    if path.is_empty() {
        return refuse("an empty path");
    }
    if path == AGENT_DIR || path.starts_with(".wisp/") {
        return refuse("the agent's own directory .wisp is not written by an archive");
    }
    Ok(path)
}

/// A directory of the current entry's path, open.
struct OpenDir {
    name: String,
    fd: OwnedFd,
    /// The mode and mtime of its directory entry, applied when it is closed.
    apply: Option<(u32, u64)>,
}

struct Unpacker {
    root: OwnedFd,
    /// The directories from `root` down to the last entry's parent (or the last directory entry).
    stack: Vec<OpenDir>,
    limits: Limits,
    out: Unpacked,
    buf: Vec<u8>,
    entries: u64,
    tmp: u64,
}

/// An archive's mtime for `File::set_times`. time_t is 32 bits on 32-bit musl targets (armv7),
/// where std refuses a later time: clamped to its range there, as for links.
fn mtime(secs: u64) -> SystemTime {
    #[cfg(target_pointer_width = "32")]
    let secs = secs.min(i32::MAX as u64);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.min(i64::MAX as u64 / 2))
}

fn file_kind(dir: BorrowedFd<'_>, name: &CStr) -> Option<u32> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok().map(|st| st.st_mode & SFlag::S_IFMT.bits())
}

impl Unpacker {
    fn entry<R: Read>(
        &mut self,
        tin: &mut TarIn<R>,
        header: &Header,
        kind: EntryType,
        size: u64,
        path: &str,
        link: Option<&[u8]>,
    ) -> Result<(), ArchiveError> {
        let refuse = |why: &str| Err(ArchiveError::entry(path, why));
        match kind {
            EntryType::Regular | EntryType::Continuous => {}
            EntryType::Directory | EntryType::Symlink => {
                if size != 0 {
                    return refuse("a directory or link entry with data");
                }
            }
            EntryType::Link => return refuse("hard links are not accepted"),
            EntryType::Char | EntryType::Block => return refuse("device files are not accepted"),
            EntryType::Fifo => return refuse("fifos are not accepted"),
            EntryType::GNUSparse => return refuse("sparse files are not accepted"),
            EntryType::XHeader | EntryType::XGlobalHeader => return refuse("PAX headers are not accepted"),
            other => return refuse(&format!("unknown entry type {:?}", other.as_byte() as char)),
        }
        let mode = header.mode().map_err(stream_err)? & MODE_MASK;
        let mtime = header.mtime().map_err(stream_err)?;
        let (parents, leaf) = match path.rsplit_once('/') {
            Some((p, l)) => (p, l),
            None => ("", path),
        };
        self.enter(parents, path)?;
        let leaf = &cstr(leaf);
        match kind {
            EntryType::Directory => self.directory(leaf, path, mode, mtime),
            EntryType::Symlink => self.symlink(leaf, path, link.unwrap_or_default(), mtime),
            _ => self.file(tin, size, leaf, path, mode, mtime),
        }
    }

    fn top(&self) -> BorrowedFd<'_> {
        top(&self.root, &self.stack)
    }

    /// Close the open directories below the first `keep`, applying their modes and mtimes.
    fn close_to(&mut self, keep: usize) -> Result<(), ArchiveError> {
        while self.stack.len() > keep {
            let dir = self.stack.pop().expect("a directory above keep");
            if let Some((mode, secs)) = dir.apply {
                let f = File::from(dir.fd);
                let what = || format!("setting the mode and mtime of {}", self.dir_path(&dir.name));
                f.set_permissions(Permissions::from_mode(mode)).map_err(|e| ArchiveError::io(what(), e))?;
                f.set_times(FileTimes::new().set_modified(self::mtime(secs)))
                    .map_err(|e| ArchiveError::io(what(), e))?;
            }
        }
        Ok(())
    }

    /// The path of a directory just popped from the stack (for messages).
    fn dir_path(&self, name: &str) -> String {
        let mut p: Vec<&str> = self.stack.iter().map(|d| d.name.as_str()).collect();
        p.push(name);
        p.join("/")
    }

    /// Make the open directories those of `parents` (a `/`-separated path, maybe empty), opening
    /// each component with `O_NOFOLLOW` under the one before and creating the missing ones.
    fn enter(&mut self, parents: &str, path: &str) -> Result<(), ArchiveError> {
        let comps: Vec<&str> = if parents.is_empty() { Vec::new() } else { parents.split('/').collect() };
        let same = self.stack.iter().zip(&comps).take_while(|(d, c)| d.name == **c).count();
        self.close_to(same)?;
        for (i, comp) in comps.iter().enumerate().skip(same) {
            let fd = open_dir(self.top(), &cstr(comp), path, &comps[..=i])?;
            self.stack.push(OpenDir { name: comp.to_string(), fd, apply: None });
        }
        Ok(())
    }

    fn directory(&mut self, leaf: &CStr, path: &str, mode: u32, mtime: u64) -> Result<(), ArchiveError> {
        let fd = open_dir(self.top(), leaf, path, &[path])?;
        let name = path.rsplit('/').next().unwrap_or(path).to_string();
        self.stack.push(OpenDir { name, fd, apply: Some((mode, mtime)) });
        self.out.dirs += 1;
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        tin: &mut TarIn<R>,
        size: u64,
        leaf: &CStr,
        path: &str,
        mode: u32,
        mtime: u64,
    ) -> Result<(), ArchiveError> {
        if self.out.bytes.saturating_add(size) > self.limits.max_bytes {
            return Err(ArchiveError::Stream(format!(
                "more than {} bytes of files: over the limit (at {path})",
                self.limits.max_bytes
            )));
        }
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let private = Mode::from_bits_truncate(0o600);
        // A new file is made in place; an existing file or link is replaced by a temporary file
        // renamed over it (O_EXCL never opens what is there, a link included).
        let (fd, temp) = {
            let parent = top(&self.root, &self.stack);
            match openat(parent, leaf, flags, private) {
                Ok(fd) => (fd, None),
                Err(Errno::EEXIST) => {
                    if file_kind(parent, leaf) == Some(SFlag::S_IFDIR.bits()) {
                        return Err(ArchiveError::entry(path, "a file would replace a directory"));
                    }
                    let mut fd = None;
                    let name = temp_name(&mut self.tmp, path, |name| {
                        fd = Some(openat(parent, name, flags, private)?);
                        Ok(())
                    })?;
                    (fd.expect("made with the name"), Some(name))
                }
                Err(e) => return Err(ArchiveError::io(format!("creating {path}"), e.into())),
            }
        };
        let result = write_file(tin, &mut self.buf, File::from(fd), path, size, mode, mtime);
        let parent = top(&self.root, &self.stack);
        let result = result.and_then(|sum| match &temp {
            None => Ok(sum),
            Some(name) => match renameat(parent, name.as_c_str(), parent, leaf) {
                Ok(()) => Ok(sum),
                Err(Errno::EISDIR) => Err(ArchiveError::entry(path, "a file would replace a directory")),
                Err(e) => Err(ArchiveError::io(format!("renaming over {path}"), e.into())),
            },
        });
        let sha256 = match result {
            Ok(sum) => sum,
            Err(e) => {
                if let Some(name) = &temp {
                    let _ = unlinkat(parent, name.as_c_str(), UnlinkatFlags::NoRemoveDir);
                }
                return Err(e);
            }
        };
        self.out.written.push(FileSum { path: path.to_string(), size, sha256 });
        self.out.files += 1;
        self.out.bytes += size;
        Ok(())
    }

    fn symlink(&mut self, leaf: &CStr, path: &str, target: &[u8], mtime: u64) -> Result<(), ArchiveError> {
        if target.is_empty() {
            return Err(ArchiveError::entry(path, "a link with an empty target"));
        }
        if target.len() > MAX_PATH {
            return Err(ArchiveError::entry(path, "a link target longer than 4096 bytes"));
        }
        if target.contains(&0) {
            return Err(ArchiveError::entry(path, "a NUL in the link target"));
        }
        let target = CString::new(target).unwrap_or_default();
        let target = target.as_c_str();
        let parent = top(&self.root, &self.stack);
        match symlinkat(target, parent, leaf) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                if file_kind(parent, leaf) == Some(SFlag::S_IFDIR.bits()) {
                    return Err(ArchiveError::entry(path, "a link would replace a directory"));
                }
                let name = temp_name(&mut self.tmp, path, |name| symlinkat(target, parent, name))?;
                match renameat(parent, name.as_c_str(), parent, leaf) {
                    Ok(()) => {}
                    Err(e) => {
                        let _ = unlinkat(parent, name.as_c_str(), UnlinkatFlags::NoRemoveDir);
                        return Err(match e {
                            Errno::EISDIR => ArchiveError::entry(path, "a link would replace a directory"),
                            e => ArchiveError::io(format!("renaming over {path}"), e.into()),
                        });
                    }
                }
            }
            Err(e) => return Err(ArchiveError::io(format!("creating the link {path}"), e.into())),
        }
        // time_t is 32 bits on 32-bit musl targets (armv7): a later mtime is clamped to its range.
        #[cfg(target_pointer_width = "32")]
        let mtime = mtime.min(i32::MAX as u64);
        let at = TimeSpec::from(std::time::Duration::from_secs(mtime.min(i64::MAX as u64 / 2)));
        utimensat(parent, leaf, &TimeSpec::UTIME_OMIT, &at, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| ArchiveError::io(format!("setting the mtime of {path}"), e.into()))?;
        self.out.links += 1;
        Ok(())
    }

    /// Read `.wisp-sums` (`size` bytes) and check it against the files written, line by line in
    /// the same order: the same paths, sizes and sums.
    fn check_sums<R: Read>(&mut self, tin: &mut TarIn<R>, size: u64) -> Result<(), ArchiveError> {
        let files = self.out.written.len() as u64;
        if size > files.saturating_mul(MAX_SUMS_LINE as u64) {
            return Err(ArchiveError::Stream(format!("{SUMS_NAME} is larger than its {files} files need")));
        }
        let mut line = Vec::with_capacity(256);
        let mut i = 0;
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = tin.some(&mut self.buf[..want])?;
            left -= n as u64;
            for piece in self.buf[..n].split_inclusive(|b| *b == b'\n') {
                line.extend_from_slice(piece);
                if line.len() > MAX_SUMS_LINE {
                    return Err(ArchiveError::Stream(format!("{SUMS_NAME}: a line too long")));
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                    sum_line(&self.out.written, i, &line)?;
                    i += 1;
                    line.clear();
                }
            }
        }
        tin.pad(size)?;
        if !line.is_empty() {
            return Err(ArchiveError::Stream(format!("{SUMS_NAME}: the last line has no newline")));
        }
        if let Some(f) = self.out.written.get(i) {
            return Err(ArchiveError::entry(&f.path, format!("not listed in {SUMS_NAME}")));
        }
        Ok(())
    }
}

/// Check line `i` of the sums (without its newline) against the `i`th file written.
fn sum_line(written: &[FileSum], i: usize, line: &[u8]) -> Result<(), ArchiveError> {
    let bad = |why: &str| ArchiveError::Stream(format!("{SUMS_NAME}: {why}"));
    let text = std::str::from_utf8(line).map_err(|_| bad("not UTF-8"))?;
    let mut parts = text.splitn(3, ' ');
    let (Some(hex), Some(size), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad(&format!("a malformed line {:?}", show(line))));
    };
    let mut sum = [0u8; 32];
    if hex.len() != 64 || hex::decode_to_slice(hex, &mut sum).is_err() {
        return Err(bad(&format!("a malformed sum for {:?}", show(path.as_bytes()))));
    }
    let size: u64 =
        size.parse().map_err(|_| bad(&format!("a malformed size for {:?}", show(path.as_bytes()))))?;
    let Some(f) = written.get(i) else {
        return Err(ArchiveError::entry(path, format!("listed in {SUMS_NAME} but not in the archive")));
    };
    if f.path != path {
        return Err(ArchiveError::entry(&f.path, format!("not listed in {SUMS_NAME} in its place")));
    }
    if f.size != size || f.sha256 != sum {
        return Err(ArchiveError::entry(path, format!("does not match its SHA-256 and size in {SUMS_NAME}")));
    }
    Ok(())
}

/// `s` for a system call (names are checked for NUL before).
fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// The innermost open directory.
fn top<'a>(root: &'a OwnedFd, stack: &'a [OpenDir]) -> BorrowedFd<'a> {
    stack.last().map_or(root.as_fd(), |d| d.fd.as_fd())
}

/// A free name for a temporary file or link next to `path`, made by `make`.
fn temp_name(
    counter: &mut u64,
    path: &str,
    mut make: impl FnMut(&CStr) -> Result<(), Errno>,
) -> Result<CString, ArchiveError> {
    loop {
        *counter += 1;
        let name = cstr(&format!(".wisp-unpack-{}-{}", std::process::id(), counter));
        match make(&name) {
            Ok(()) => return Ok(name),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(ArchiveError::io(format!("writing {path}"), e.into())),
        }
    }
}

/// Write `size` bytes of `entry` to `file`, apply `mode` and `mtime`, and give their SHA-256.
fn write_file<R: Read>(
    tin: &mut TarIn<R>,
    buf: &mut [u8],
    mut file: File,
    path: &str,
    size: u64,
    mode: u32,
    mtime: u64,
) -> Result<[u8; 32], ArchiveError> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut left = size;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = tin.some(&mut buf[..want])?;
        ctx.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| ArchiveError::io(format!("writing {path}"), e))?;
        left -= n as u64;
    }
    tin.pad(size)?;
    let what = || format!("setting the mode and mtime of {path}");
    file.set_permissions(Permissions::from_mode(mode)).map_err(|e| ArchiveError::io(what(), e))?;
    file.set_times(FileTimes::new().set_modified(self::mtime(mtime)))
        .map_err(|e| ArchiveError::io(what(), e))?;
    let mut sum = [0; 32];
    sum.copy_from_slice(ctx.finish().as_ref());
    Ok(sum)
}

/// Open directory `name` under `parent` without following a link, creating it if missing.
/// `comps` is the path of it (for messages) within the entry `path`.
fn open_dir(
    parent: BorrowedFd<'_>,
    name: &CStr,
    path: &str,
    comps: &[&str],
) -> Result<OwnedFd, ArchiveError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let shown = || comps.join("/");
    let mut created = false;
    loop {
        match openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) if !created => match mkdirat(parent, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => created = true,
                Err(e) => return Err(ArchiveError::io(format!("creating {}", shown()), e.into())),
            },
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                let why = if file_kind(parent, name) == Some(SFlag::S_IFLNK.bits()) {
                    format!("{} is a symbolic link: nothing is written through one", shown())
                } else {
                    format!("{} is not a directory", shown())
                };
                return Err(ArchiveError::entry(path, why));
            }
            Err(e) => return Err(ArchiveError::io(format!("opening {}", shown()), e.into())),
        }
    }
}
