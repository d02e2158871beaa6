//! Steps the agent runs itself instead of a shell: packing files of the step's directory into
//! an archive that becomes the step's output (`archive:` and `stash:`), and unpacking an archive
//! the controller sends in `Put` frames (`unstash:`). Each runs [`crate::archive`] on a thread of
//! its own behind a pipe, so the step's output goes through the same spool, credit, replay and
//! exit as a shell's: a link lost halfway loses nothing.

use crate::archive::{self, Limits, Selection};
use crate::proto::ExitStatus;
use bytes::Bytes;
use nix::fcntl::OFlag;
use smol::channel::{bounded, Receiver, Sender};
use smol::Async;
use std::cell::Cell;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Chunks the feed holds: the controller's window (256 KiB beyond the last `Taken`) in the
/// smallest chunks it sends, and room to spare.
const FEED_CHUNKS: usize = 64;
/// A `Taken` goes out every this many bytes written.
pub const TAKEN_EVERY: u64 = 64 * 1024;

/// A pack or unpack running on its thread.
pub struct Job {
    /// What the step's output is read from.
    pub output: Async<File>,
    /// Set to stop the thread at its next read or write.
    cancel: Arc<AtomicBool>,
    /// How it ended, with what to say.
    done: Receiver<(ExitStatus, String)>,
}

impl Job {
    /// Stop it: its thread gives up at its next read or write (a cancel or timeout).
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// How it ended; delivered once.
    pub async fn ended(&self) -> Option<(ExitStatus, String)> {
        self.done.recv().await.ok()
    }
}

/// An unpack step's input: `Put` bytes go in here, a task writes them to the unpacker's pipe.
pub struct Feed {
    /// Bytes of the archive taken into the feed (a resent `Put` below this is dropped).
    pub received: Cell<u64>,
    /// Bytes written to the unpacker (what `Taken` reports).
    pub written: Rc<Cell<u64>>,
    tx: Option<Sender<Bytes>>,
}

impl Feed {
    /// Take `Put` bytes at `offset`: a resent part is dropped, a gap ignored (the controller
    /// sends again from the last `Taken`); empty data at the end closes the input. Err when the
    /// controller sent beyond its window.
    pub fn put(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let have = self.received.get();
        if offset > have {
            return Ok(());
        }
        if data.is_empty() {
            if offset == have {
                self.tx.take();
            }
            return Ok(());
        }
        let skip = (have - offset) as usize;
        if skip >= data.len() {
            return Ok(());
        }
        let Some(tx) = &self.tx else { return Ok(()) };
        let fresh = &data[skip..];
        tx.try_send(Bytes::copy_from_slice(fresh))
            .map_err(|_| "the controller sent more of the archive than the agent asked for".to_string())?;
        self.received.set(have + fresh.len() as u64);
        Ok(())
    }

    /// Stop taking input (the step was stopped).
    pub fn close(&mut self) {
        self.tx.take();
    }
}

fn pipe() -> Result<(File, File), String> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // As for a shell's output (see `process`): fewer, larger reads; the default where refused.
    let _ = nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    Ok((File::from(r), File::from(w)))
}

/// A writer that fails once the job is stopped.
struct Stoppable<T> {
    inner: T,
    cancel: Arc<AtomicBool>,
}

impl<T: Write> Write for Stoppable<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("stopped"));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Stoppable<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("stopped"));
        }
        self.inner.read(buf)
    }
}

/// The selection a pack step's script gives: `+PATTERN` lines to take, `-PATTERN` to leave out.
pub fn selection(script: &str) -> Result<Selection, String> {
    let (mut include, mut exclude) = (Vec::new(), Vec::new());
    for line in script.lines().filter(|l| !l.is_empty()) {
        match line.split_at(1) {
            ("+", p) => include.push(p.to_string()),
            ("-", p) => exclude.push(p.to_string()),
            _ => return Err(format!("bad selection line {line:?} from the controller")),
        }
    }
    Selection::new(include, exclude).map_err(|e| e.to_string())
}

fn spawn(
    name: &str,
    cancel: &Arc<AtomicBool>,
    work: impl FnOnce() -> (ExitStatus, String) + Send + 'static,
) -> Result<Receiver<(ExitStatus, String)>, String> {
    let (tx, rx) = bounded(1);
    let cancel = cancel.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let end = work();
            let end = if cancel.load(Ordering::SeqCst) && end.0 != ExitStatus::Code(0) {
                (ExitStatus::Signal(nix::sys::signal::Signal::SIGTERM as i32), "stopped".to_string())
            } else {
                end
            };
            let _ = tx.send_blocking(end);
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    Ok(rx)
}

/// Start packing what `script` selects under `dir`; the archive is the job's output.
pub fn start_pack(dir: &Path, script: &str) -> Result<Job, String> {
    let sel = selection(script)?;
    let (r, w) = pipe()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let dir = dir.to_path_buf();
    let c = cancel.clone();
    let done = spawn("wisp-pack", &cancel, move || {
        let out = Stoppable { inner: w, cancel: c };
        match archive::pack(&dir, &sel, out) {
            Ok(p) if p.is_empty() => (
                ExitStatus::Code(1),
                format!("no file matches {} in {}", sel.include().join(", "), dir.display()),
            ),
            Ok(p) => (
                ExitStatus::Code(0),
                format!(
                    "{} files, {} directories, {} links: {} bytes ({} compressed)",
                    p.files, p.dirs, p.links, p.bytes, p.compressed_bytes
                ),
            ),
            Err(e) => (ExitStatus::Code(1), e.to_string()),
        }
    })?;
    Ok(Job { output: Async::new(r).map_err(|e| format!("pipe: {e}"))?, cancel, done })
}

/// Start unpacking into `dir` what the controller will send; returns the job, its feed, and
/// the pipe the feed task writes to.
pub fn start_unpack(dir: &Path) -> Result<(Job, Feed, Receiver<Bytes>, Async<File>), String> {
    let (out_r, mut out_w) = pipe()?;
    let (in_r, in_w) = pipe()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let dir = dir.to_path_buf();
    let c = cancel.clone();
    let done = spawn("wisp-unpack", &cancel, move || {
        let input = Stoppable { inner: in_r, cancel: c };
        let limits = Limits::default();
        match archive::unpack(input, &dir, &limits) {
            Ok(u) => {
                let line = format!(
                    "{} files, {} directories, {} links: {} bytes, checksums verified\n",
                    u.files, u.dirs, u.links, u.bytes
                );
                let _ = out_w.write_all(line.as_bytes());
                (ExitStatus::Code(0), String::new())
            }
            Err(e) => (ExitStatus::Code(1), e.to_string()),
        }
    })?;
    let (tx, rx) = bounded(FEED_CHUNKS);
    let feed = Feed { received: Cell::new(0), written: Rc::new(Cell::new(0)), tx: Some(tx) };
    let writer = Async::new(in_w).map_err(|e| format!("pipe: {e}"))?;
    Ok((Job { output: Async::new(out_r).map_err(|e| format!("pipe: {e}"))?, cancel, done }, feed, rx, writer))
}
