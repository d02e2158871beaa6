//! Step logs: where they live (`DATA/builds/ID/STEP.log`), appends that are all or nothing, and
//! reads for the API. Every file operation here runs off the executor (`smol::unblock`): a slow or
//! full disk holds up only the step it belongs to.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Where the logs of a controller live.
#[derive(Debug, Clone)]
pub struct Logs {
    dir: PathBuf,
}

impl Logs {
    /// The logs under `data/builds`.
    pub fn new(data: &Path) -> Self {
        Self { dir: data.join("builds") }
    }

    /// The directory of one build's logs.
    pub fn build_dir(&self, build: u64) -> PathBuf {
        self.dir.join(build.to_string())
    }

    /// The directory of every build's directory.
    pub fn builds_root(&self) -> PathBuf {
        self.dir.clone()
    }

    /// The log of one step.
    pub fn step_path(&self, build: u64, step: u32) -> PathBuf {
        self.build_dir(build).join(format!("{step}.log"))
    }

    /// Open a step's log for reading; None when it has no file yet.
    pub async fn reader(&self, build: u64, step: u32) -> io::Result<Option<LogReader>> {
        let path = self.step_path(build, step);
        smol::unblock(move || match File::open(&path) {
            Ok(f) => Ok(Some(LogReader { file: Some(f), buf: Some(vec![0; READ_CHUNK]) })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }
}

/// Bytes read from a log at a time.
pub const READ_CHUNK: usize = 64 * 1024;

/// Reads a log file off the executor, a chunk at a time.
pub struct LogReader {
    file: Option<File>,
    buf: Option<Vec<u8>>,
}

impl LogReader {
    /// Move up to `n` bytes forward without reading them (at most to the current end of the
    /// file): how many were skipped, and the last of them.
    pub async fn skip(&mut self, n: u64) -> io::Result<(u64, Option<u8>)> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileExt;
        let Some(mut file) = self.file.take() else {
            return Err(io::Error::other("log reader used after an error"));
        };
        let (file, r) = smol::unblock(move || {
            let r = (|| {
                let pos = file.stream_position()?;
                let k = n.min(file.metadata()?.len().saturating_sub(pos));
                if k == 0 {
                    return Ok((0, None));
                }
                let mut last = [0u8];
                file.read_exact_at(&mut last, pos + k - 1)?;
                file.seek(SeekFrom::Start(pos + k))?;
                Ok((k, Some(last[0])))
            })();
            (file, r)
        })
        .await;
        self.file = Some(file);
        r
    }

    /// The next chunk (empty at the current end of the file; a live log may grow later).
    pub async fn next(&mut self) -> io::Result<bytes::Bytes> {
        let (mut file, mut buf) = match (self.file.take(), self.buf.take()) {
            (Some(f), Some(b)) => (f, b),
            _ => return Err(io::Error::other("log reader used after an error")),
        };
        let (file, buf, n) = smol::unblock(move || {
            buf.resize(READ_CHUNK, 0);
            let n = file.read(&mut buf);
            (file, buf, n)
        })
        .await;
        let n = n?;
        let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
        self.file = Some(file);
        self.buf = Some(buf);
        Ok(chunk)
    }
}

/// A step's log file as its output is appended. The file is made with the step's first byte:
/// a step with no output costs no directory and no file.
pub struct StepLog {
    path: PathBuf,
    file: Option<File>,
    /// Bytes in the file: everything before this offset is on disk.
    stored: u64,
}

impl StepLog {
    /// The log at `path`, appending to what it holds (a controller restarted mid-step).
    pub fn open(path: PathBuf) -> io::Result<Self> {
        let stored = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(Self { path, file: None, stored })
    }

    /// A new log at `path` for a step that has never run: nothing is touched until its first byte.
    pub fn new(path: PathBuf) -> Self {
        Self { path, file: None, stored: 0 }
    }

    /// A new, empty log at `path`: a file left by an earlier start of the step is removed.
    pub fn create(path: PathBuf) -> io::Result<Self> {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(Self { path, file: None, stored: 0 }),
        }
    }

    /// Bytes on disk.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Append all of `data` or nothing: after a failed or partial write (a full disk) the file is
    /// cut back to what it held, so a retry never stores a byte twice. Blocking: call it off the
    /// executor.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                create_private_dir(dir)?;
            }
            self.file = Some(private_file(&self.path)?);
        }
        let file = self.file.as_mut().expect("opened above");
        match file.write_all(data) {
            Ok(()) => {
                self.stored += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = file.set_len(self.stored) {
                    log::error!("{}: cannot cut back to {} bytes: {cut}", self.path.display(), self.stored);
                    // Reopened on the next append; its length is read again then.
                    self.file = None;
                    if let Ok(m) = std::fs::metadata(&self.path) {
                        self.stored = m.len();
                    }
                }
                Err(e)
            }
        }
    }
}

/// Make `dir` (and its parents) with mode 0700 where they are new.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Open `path` for appending, made with mode 0600 if new.
fn private_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

/// True if `e` says the disk (or a quota) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    // ENOSPC, EDQUOT
    matches!(e.raw_os_error(), Some(28 | 122))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_append_leaves_the_file_as_it_was() {
        let dir = std::env::temp_dir().join(format!("wisp-logs-{}", std::process::id()));
        let path = dir.join("1").join("1.log");
        let mut log = StepLog::create(path.clone()).unwrap();
        log.append(b"hello ").unwrap();
        // /dev/full fails every write with ENOSPC, as a full disk does.
        let mut full = StepLog { path: "/dev/full".into(), file: None, stored: 0 };
        let e = full.append(b"x").unwrap_err();
        assert!(is_disk_full(&e), "{e}");
        log.append(b"world").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        assert_eq!(log.stored(), 11);
        let again = StepLog::open(path).unwrap();
        assert_eq!(again.stored(), 11);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
