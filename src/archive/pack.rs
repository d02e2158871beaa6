//! [`pack`]: walk a tree with directory descriptors (never through a symbolic link, never out of
//! the root) and write the selected entries as one LZ4-framed tar stream.

use super::{show, ArchiveError, Packed, Selection, AGENT_DIR, BUF_SIZE, MAX_PATH, MODE_MASK, SUMS_NAME};
use lz4_flex::frame::FrameEncoder;
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use ring::digest;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tar::{EntryType, Header};

/// Write the entries of `root` that `spec` selects to `out` as one stream: a tar archive (GNU
/// long names past 100 bytes) in one LZ4 frame with a content checksum, ending with the
/// `.wisp-sums` entry (see the [module documentation](super)).
///
/// The walk never follows a symbolic link (a link is stored as a link, its target text as it is)
/// and never leaves `root`; it skips the agent's own `.wisp` and any `.wisp-sums` at the root.
/// Entries come in path order, component by component; each selected entry is preceded by the
/// directories above it (once each). Sockets, fifos and devices that match are left out and
/// counted in [`Packed::skipped`]. A selection that matches nothing is not an error: the archive
/// then holds only the (empty) sums entry, and [`Packed::is_empty`] says so.
///
/// Errors: `root` cannot be opened; an entry cannot be read (for a file that shrinks while it is
/// read too: the archive's header already gave its size); a selected entry's path is not UTF-8,
/// holds a newline (the sums list could not name it) or is over 4096 bytes; `out` fails. Nothing
/// usable is left in `out` then (it has no sums entry).
pub fn pack(root: &Path, spec: &Selection, out: impl Write) -> Result<Packed, ArchiveError> {
    let show_root = || root.display().to_string();
    let root_fd =
        nix::fcntl::open(root, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| ArchiveError::io(format!("opening {}", show_root()), e.into()))?;
    let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
    let mut packer = Packer {
        spec,
        out: Tar { w: FrameEncoder::with_frame_info(info, Counter { w: out, n: 0 }), n: 0 },
        buf: vec![0; BUF_SIZE],
        path: String::new(),
        non_utf8: 0,
        pending: Vec::new(),
        sums: Vec::new(),
        stats: Packed::default(),
    };
    packer.walk(root_fd.as_fd(), 0)?;
    packer.finish()
}

/// The tar layer: counts what goes into the compressor.
struct Tar<W: Write> {
    w: FrameEncoder<Counter<W>>,
    n: u64,
}

impl<W: Write> Tar<W> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        self.n += bytes.len() as u64;
        self.w.write_all(bytes).map_err(|e| ArchiveError::io("writing the archive", e))
    }

    /// Zeros up to the next 512-byte block after `len` bytes of data.
    fn pad(&mut self, len: u64) -> Result<(), ArchiveError> {
        let rem = (len % 512) as usize;
        if rem != 0 {
            self.write(&[0; 512][..512 - rem])?;
        }
        Ok(())
    }

    /// A GNU long-name ('L') or long-link ('K') entry holding `name`.
    fn long_name(&mut self, kind: u8, name: &[u8]) -> Result<(), ArchiveError> {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(EntryType::new(kind));
        h.set_size(name.len() as u64 + 1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        self.write(h.as_bytes())?;
        self.write(name)?;
        self.write(&[0])?;
        self.pad(name.len() as u64 + 1)
    }

    /// An entry's header (after its long-name entries where needed); its data, if any, follows.
    fn header(
        &mut self,
        kind: EntryType,
        path: &[u8],
        link: Option<&[u8]>,
        size: u64,
        mode: u32,
        mtime: u64,
    ) -> Result<(), ArchiveError> {
        let mut h = Header::new_gnu();
        if path.len() > 100 {
            self.long_name(b'L', path)?;
        }
        let n = path.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&path[..n]);
        if let Some(link) = link {
            if link.len() > 100 {
                self.long_name(b'K', link)?;
            }
            let n = link.len().min(100);
            h.as_old_mut().linkname[..n].copy_from_slice(&link[..n]);
        }
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode & MODE_MASK);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_cksum();
        self.write(h.as_bytes())
    }
}

/// Counts the compressed bytes.
struct Counter<W: Write> {
    w: W,
    n: u64,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// A directory above the entry being looked at, written to the archive only once something in it
/// (or it) is selected.
struct PendingDir {
    /// Its path is `Packer::path[..path_len]`.
    path_len: usize,
    mode: u32,
    mtime: u64,
    written: bool,
}

struct Packer<'a, W: Write> {
    spec: &'a Selection,
    out: Tar<W>,
    buf: Vec<u8>,
    /// The path of the entry being looked at, relative to the root (lossy where a component is
    /// not UTF-8).
    path: String,
    /// How many components of `path` are not UTF-8 (their entries cannot be archived).
    non_utf8: usize,
    pending: Vec<PendingDir>,
    sums: Vec<u8>,
    stats: Packed,
}

/// Sort the names of a directory by their bytes. A heap sort: a few hundred bytes of code where
/// std's sort instantiated for this type is about 3 KB of the static agent.
pub(super) fn heap_sort(v: &mut [(CString, Option<Type>)]) {
    fn sift(v: &mut [(CString, Option<Type>)], mut root: usize, end: usize) {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && v[child].0 < v[child + 1].0 {
                child += 1;
            }
            if v[root].0 >= v[child].0 {
                return;
            }
            v.swap(root, child);
            root = child;
        }
    }
    let n = v.len();
    for i in (0..n / 2).rev() {
        sift(v, i, n);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift(v, 0, end);
    }
}

fn mtime_of(st: &FileStat) -> u64 {
    st.st_mtime.max(0) as u64
}

impl<W: Write> Packer<'_, W> {
    fn walk(&mut self, dir: BorrowedFd<'_>, depth: usize) -> Result<(), ArchiveError> {
        let mut names = Vec::new();
        {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
            let mut listing =
                Dir::openat(dir, c".", flags, Mode::empty()).map_err(|e| self.io_err("listing", e))?;
            for ent in listing.iter() {
                let ent = ent.map_err(|e| self.io_err("listing", e))?;
                let name = ent.file_name();
                if name == c"." || name == c".." {
                    continue;
                }
                names.push((name.to_owned(), ent.file_type()));
            }
        }
        heap_sort(&mut names);
        for (name, kind) in names {
            let bytes = name.as_bytes();
            if depth == 0 && (bytes == AGENT_DIR.as_bytes() || bytes == SUMS_NAME.as_bytes()) {
                continue;
            }
            let base = self.path.len();
            if !self.path.is_empty() {
                self.path.push('/');
            }
            let utf8 = std::str::from_utf8(bytes).is_ok();
            self.path.push_str(&String::from_utf8_lossy(bytes));
            if !utf8 {
                self.non_utf8 += 1;
            }
            let result = self.entry(dir, &name, kind, depth);
            if !utf8 {
                self.non_utf8 -= 1;
            }
            self.path.truncate(base);
            result?;
        }
        Ok(())
    }

    fn io_err(&self, what: &str, e: Errno) -> ArchiveError {
        let path = if self.path.is_empty() { "the root" } else { &self.path };
        ArchiveError::io(format!("{what} {path}"), e.into())
    }

    fn selected(&self) -> bool {
        self.spec.is_included(&self.path) && !self.spec.is_excluded(&self.path)
    }

    /// The current entry is to be written: check its path, then write the directories above it.
    fn take(&mut self) -> Result<(), ArchiveError> {
        if self.non_utf8 > 0 {
            return Err(ArchiveError::entry(&self.path, "its path is not UTF-8 and cannot be archived"));
        }
        if self.path.contains('\n') {
            return Err(ArchiveError::entry(&self.path, "a name with a newline cannot be archived"));
        }
        if self.path.len() > MAX_PATH {
            return Err(ArchiveError::entry(show(self.path.as_bytes()), "path longer than 4096 bytes"));
        }
        for i in 0..self.pending.len() {
            if self.pending[i].written {
                continue;
            }
            let d = &self.pending[i];
            let (len, mode, mtime) = (d.path_len, d.mode, d.mtime);
            self.out.header(EntryType::Directory, &self.path.as_bytes()[..len], None, 0, mode, mtime)?;
            self.pending[i].written = true;
            self.stats.dirs += 1;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        kind: Option<Type>,
        depth: usize,
    ) -> Result<(), ArchiveError> {
        let kind = match kind {
            Some(k) => k,
            None => {
                let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| self.io_err("reading", e))?;
                let fmt = st.st_mode & SFlag::S_IFMT.bits();
                if fmt == SFlag::S_IFDIR.bits() {
                    Type::Directory
                } else if fmt == SFlag::S_IFREG.bits() {
                    Type::File
                } else if fmt == SFlag::S_IFLNK.bits() {
                    Type::Symlink
                } else {
                    Type::Socket
                }
            }
        };
        match kind {
            Type::Directory => self.directory(dir, name, depth),
            Type::File => {
                if self.selected() {
                    self.file(dir, name)?;
                }
                Ok(())
            }
            Type::Symlink => {
                if self.selected() {
                    self.symlink(dir, name)?;
                }
                Ok(())
            }
            _ => {
                if self.selected() {
                    self.stats.skipped += 1;
                }
                Ok(())
            }
        }
    }

    fn directory(&mut self, dir: BorrowedFd<'_>, name: &CStr, depth: usize) -> Result<(), ArchiveError> {
        if self.spec.is_excluded(&self.path) {
            return Ok(());
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(dir, name, flags, Mode::empty()).map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => {
                ArchiveError::entry(&self.path, "changed while it was being packed")
            }
            e => self.io_err("opening", e),
        })?;
        let st = fstat(&fd).map_err(|e| self.io_err("reading", e))?;
        self.pending.push(PendingDir {
            path_len: self.path.len(),
            mode: st.st_mode,
            mtime: mtime_of(&st),
            written: false,
        });
        let mut result = Ok(());
        if self.spec.is_included(&self.path) {
            result = self.take();
        }
        if result.is_ok() {
            result = self.walk(fd.as_fd(), depth + 1);
        }
        self.pending.pop();
        result
    }

    fn file(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), ArchiveError> {
        let flags =
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let fd = openat(dir, name, flags, Mode::empty()).map_err(|e| match e {
            Errno::ELOOP => ArchiveError::entry(&self.path, "changed while it was being packed"),
            e => self.io_err("opening", e),
        })?;
        let st = fstat(&fd).map_err(|e| self.io_err("reading", e))?;
        if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
            return Err(ArchiveError::entry(&self.path, "changed while it was being packed"));
        }
        self.take()?;
        let size = st.st_size as u64;
        let Packer { out, buf, path, .. } = self;
        out.header(EntryType::Regular, path.as_bytes(), None, size, st.st_mode, mtime_of(&st))?;
        let mut file = File::from(fd);
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => return Err(ArchiveError::entry(path.as_str(), "shrank while it was being packed")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ArchiveError::io(format!("reading {path}"), e)),
            };
            ctx.update(&buf[..n]);
            out.write(&buf[..n])?;
            left -= n as u64;
        }
        out.pad(size)?;
        let line = format!("{} {size} {path}\n", hex::encode(ctx.finish()));
        self.sums.extend_from_slice(line.as_bytes());
        self.stats.files += 1;
        self.stats.bytes += size;
        Ok(())
    }

    fn symlink(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), ArchiveError> {
        let target = readlinkat(dir, name).map_err(|e| match e {
            Errno::EINVAL => ArchiveError::entry(&self.path, "changed while it was being packed"),
            e => self.io_err("reading", e),
        })?;
        let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| self.io_err("reading", e))?;
        let target = target.as_bytes();
        if target.len() > MAX_PATH {
            return Err(ArchiveError::entry(&self.path, "link target longer than 4096 bytes"));
        }
        self.take()?;
        self.out.header(EntryType::Symlink, self.path.as_bytes(), Some(target), 0, 0o777, mtime_of(&st))?;
        self.stats.links += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<Packed, ArchiveError> {
        let sums = std::mem::take(&mut self.sums);
        self.out.header(EntryType::Regular, SUMS_NAME.as_bytes(), None, sums.len() as u64, 0o644, 0)?;
        self.out.write(&sums)?;
        self.out.pad(sums.len() as u64)?;
        // The end of the archive: two zero blocks.
        self.out.write(&[0; 1024])?;
        let mut counter =
            self.out.w.finish().map_err(|e| ArchiveError::io("writing the archive", e.into()))?;
        counter.flush().map_err(|e| ArchiveError::io("writing the archive", e))?;
        self.stats.tar_bytes = self.out.n;
        self.stats.compressed_bytes = counter.n;
        Ok(self.stats)
    }
}
