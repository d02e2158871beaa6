//! Steps the agent runs in a sibling container: the agent's side of the exchange with that
//! container's step server ([`super::stepserver`], where the exchange is described).
//!
//! To the agent's step table a forwarded step is one more kind of child process: its output is
//! read, its process group signalled and its end learned through a Unix socket instead of a pipe,
//! `killpg` and a pidfd, so the spool, credit, resume, timeout and cancel code is the same for
//! both. Memory is fixed per step: the step server may send at most `WINDOW` bytes ahead of what
//! the step's reader has taken, and everything it sends is checked before it is used.

use crate::auth::frame_kind;
use crate::link::{self, LinkReader, LinkWriter};
use crate::proto::{self, ExitStatus, Frame, StepStart, MAX_FRAME, MAX_OUTPUT_CHUNK, NONCE_LEN};
use nix::sys::signal::Signal;
use smol::channel::{bounded, Receiver, Sender};
use smol::{LocalExecutor, Task, Timer};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Where step servers' sockets are when `WISP_STEP_SOCKETS` does not say: the mount point of the
/// volume the pod template shares between its containers.
pub const DEFAULT_SOCKET_DIR: &str = "/wisp";
/// How long a step waits for its container's step server when `WISP_STEP_SOCKET_WAIT` does not
/// say: a container that is still starting (its image being pulled) gets this long.
pub const DEFAULT_SOCKET_WAIT: Duration = Duration::from_secs(60);
/// Time between two tries at a socket that is not there yet.
const SOCKET_RETRY: Duration = Duration::from_millis(200);
/// Output bytes a step server may send ahead of what the step's reader has taken: four full
/// frames keep the socket busy, and this is all the memory a forwarded step holds for its output.
pub const WINDOW: u32 = 4 * MAX_OUTPUT_CHUNK as u32;
/// Credit goes back to the step server in batches of this many bytes read.
const GRANT_BATCH: u32 = WINDOW / 4;
/// Signals kept for the step server while it cannot be told yet (TERM and KILL are all a step
/// sends; the rest are repeats).
const MAX_PENDING_SIGNALS: usize = 4;

/// Where the agent finds step servers: `DIR/NAME.sock` for container NAME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSockets {
    /// The directory holding the sockets (`WISP_STEP_SOCKETS`, default `/wisp`).
    pub dir: PathBuf,
    /// How long a step waits for a socket to appear (`WISP_STEP_SOCKET_WAIT`, default 60 s).
    pub wait: Duration,
}

impl Default for StepSockets {
    fn default() -> Self {
        Self { dir: PathBuf::from(DEFAULT_SOCKET_DIR), wait: DEFAULT_SOCKET_WAIT }
    }
}

impl StepSockets {
    /// The settings from `WISP_STEP_SOCKETS` (a directory) and `WISP_STEP_SOCKET_WAIT` (see
    /// [`parse_wait`]), each defaulted when unset or empty.
    pub fn from_env() -> Result<Self, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut s = Self::default();
        if let Some(dir) = var("WISP_STEP_SOCKETS") {
            s.dir = PathBuf::from(dir);
        }
        if let Some(w) = var("WISP_STEP_SOCKET_WAIT") {
            s.wait = parse_wait(&w).map_err(|e| format!("WISP_STEP_SOCKET_WAIT: {e}"))?;
        }
        Ok(s)
    }

    /// The socket of `container`'s step server; None unless `container` is a valid container name
    /// (so no other path can be formed from it).
    pub fn socket_path(&self, container: &str) -> Option<PathBuf> {
        proto::valid_container_name(container).then(|| self.dir.join(format!("{container}.sock")))
    }
}

/// Longest wait accepted for a step server's socket.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A wait such as `60`, `60s`, `500ms` or `2m` (seconds when no unit is given), at most an hour.
pub fn parse_wait(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a duration: use seconds or e.g. \"2s\", \"500ms\", \"1m\"");
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let d = match &t[digits..] {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if d > MAX_WAIT {
        return Err(format!("{s:?} is longer than the limit of one hour"));
    }
    Ok(d)
}

/// "60 s", "2 s", "0.5 s": a wait as the step's message gives it.
fn show_wait(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} s", crate::text::Tenths(d))
    }
}

/// How a step ends, as the step's reader learns it: the status and, when there is one, what
/// the agent should say about it.
pub type Ended = (ExitStatus, String);

/// State shared by a forwarded step's reader ([`Remote`]) and the task that talks to its server.
struct Shared {
    /// "the step server of container 'build' (/wisp/build.sock)", for messages.
    what: String,
    /// Output received and not yet read; never more than the credit granted (`WINDOW` in all).
    buf: RefCell<VecDeque<u8>>,
    /// The server said the output ended.
    eof: Cell<bool>,
    /// Why the exchange failed after the step started; the reader gets it once `buf` is drained.
    error: RefCell<Option<String>>,
    /// Wakes the reader.
    readable: (Sender<()>, Receiver<()>),
    /// Bytes read and not yet granted back.
    owed: Cell<u32>,
    /// Signals for the step's process group not yet sent.
    signals: RefCell<Vec<Signal>>,
    /// The step is over: tell the server, and close.
    released: Cell<bool>,
    /// Wakes the task's writer.
    writable: (Sender<()>, Receiver<()>),
    /// The step's end, delivered once.
    ended: Sender<Ended>,
    ended_sent: Cell<bool>,
}

impl Shared {
    fn wake_reader(&self) {
        let _ = self.readable.0.try_send(());
    }

    fn wake_writer(&self) {
        let _ = self.writable.0.try_send(());
    }

    fn end(&self, how: Ended) {
        if !self.ended_sent.replace(true) {
            let _ = self.ended.try_send(how);
        }
    }
}

/// A step run by a step server in a sibling container, as the step's task sees it: output to
/// read, a process group to signal, an end to wait for. Dropping it closes the connection, and
/// the step server then kills the step's process group; [`Remote::release`] ends it cleanly.
pub struct Remote {
    shared: Rc<Shared>,
    ended: Receiver<Ended>,
    task: Option<Task<()>>,
}

impl Remote {
    /// Start `s` (a step that names a container) in its container: connect to its step server
    /// (waiting for the socket up to `sockets.wait`), and have it run `s.shell -c s.script` in
    /// `dir` (the absolute directory: the workspace volume has the same path in every container)
    /// with `env`. Fails at once only when the step cannot be forwarded at all.
    pub fn start<'a>(
        ex: &LocalExecutor<'static>,
        sockets: &StepSockets,
        s: &StepStart<'_>,
        dir: &Path,
        env: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let container = s.container;
        let path = sockets
            .socket_path(container)
            .ok_or_else(|| format!("refused container name {container:?}: not a DNS-1123 label"))?;
        let dir =
            dir.to_str().ok_or_else(|| format!("the step's directory {} is not UTF-8", dir.display()))?;
        let mut envbuf = vec![0u8; MAX_FRAME];
        let too_large = || {
            format!(
                "the step is too large to forward to container '{container}' with the variables the agent \
                 adds (WORKSPACE, BUILD_NUMBER, NODE_NAME, WISP_BUILD, WISP_STEP) and its directory: shorten \
                 its script or environment"
            )
        };
        let env = proto::encode_env(env, &mut envbuf).map_err(|_| too_large())?;
        let forwarded = StepStart {
            // The agent keeps the timeout; the server only ever runs and signals the shell.
            timeout_secs: 0,
            credit: WINDOW,
            dir,
            env,
            ..*s
        };
        let mut frame = vec![0u8; MAX_FRAME];
        let n = proto::encode(&Frame::StepStart(forwarded), &mut frame).map_err(|_| too_large())?;
        frame.truncate(n);
        drop(envbuf);
        let (ended_tx, ended) = bounded(1);
        let shared = Rc::new(Shared {
            what: format!("the step server of container '{container}' ({})", path.display()),
            buf: RefCell::new(VecDeque::with_capacity(WINDOW as usize)),
            eof: Cell::new(false),
            error: RefCell::new(None),
            readable: bounded(1),
            owed: Cell::new(0),
            signals: RefCell::new(Vec::new()),
            released: Cell::new(false),
            writable: bounded(1),
            ended: ended_tx,
            ended_sent: Cell::new(false),
        });
        let talk = Talk {
            shared: shared.clone(),
            path,
            wait: sockets.wait,
            container: container.to_string(),
            key: (s.build, s.step),
        };
        let task = ex.spawn(talk.run(frame));
        Ok(Self { shared, ended, task: Some(task) })
    }

    /// Read output into `out`; 0 at the end of the output. Cancel-safe: nothing is taken from the
    /// step unless this returns.
    pub async fn read(&self, out: &mut [u8]) -> io::Result<usize> {
        let sh = &self.shared;
        loop {
            {
                let mut buf = sh.buf.borrow_mut();
                if !buf.is_empty() && !out.is_empty() {
                    let n = out.len().min(buf.len());
                    let (a, b) = buf.as_slices();
                    let from_a = n.min(a.len());
                    out[..from_a].copy_from_slice(&a[..from_a]);
                    out[from_a..n].copy_from_slice(&b[..n - from_a]);
                    buf.drain(..n);
                    let owed = sh.owed.get() + n as u32;
                    sh.owed.set(owed);
                    if owed >= GRANT_BATCH {
                        sh.wake_writer();
                    }
                    return Ok(n);
                }
            }
            if let Some(e) = sh.error.borrow().as_ref() {
                return Err(io::Error::other(e.clone()));
            }
            if sh.eof.get() {
                return Ok(0);
            }
            let _ = sh.readable.1.recv().await;
        }
    }

    /// Send `sig` to the step's process group in its container. Before the step has started there,
    /// the step ends at once as if the signal had killed it.
    pub fn kill_group(&self, sig: Signal) {
        let mut pending = self.shared.signals.borrow_mut();
        if !pending.contains(&sig) && pending.len() < MAX_PENDING_SIGNALS {
            pending.push(sig);
        }
        self.shared.wake_writer();
    }

    /// The step's end: its shell's status, or why it could not run or went wrong.
    pub fn ended(&self) -> &Receiver<Ended> {
        &self.ended
    }

    /// The step is over and its end delivered: tell the step server so (it then leaves the
    /// group alone, as the agent does with a local step's leftovers) and close the connection.
    pub fn release(mut self) {
        self.shared.released.set(true);
        self.shared.wake_writer();
        if let Some(t) = self.task.take() {
            t.detach();
        }
    }
}

/// The task that talks to one step's server.
struct Talk {
    shared: Rc<Shared>,
    path: PathBuf,
    wait: Duration,
    container: String,
    key: (u64, u32),
}

/// How the exchange ended early.
enum Fail {
    /// The step never started in the container: it ends with this.
    Before(Ended),
    /// It failed after the step was sent: the reader gets an error with this message.
    After(String),
}

impl Talk {
    async fn run(self, frame: Vec<u8>) {
        let sh = self.shared.clone();
        match self.exchange(&frame).await {
            Ok(()) => {}
            Err(Fail::Before(how)) => {
                sh.eof.set(true);
                sh.end(how);
            }
            Err(Fail::After(msg)) => {
                log::warn!("build {} step {}: {msg}", self.key.0, self.key.1);
                *sh.error.borrow_mut() = Some(msg.clone());
                sh.end((ExitStatus::Code(-1), msg));
            }
        }
        sh.wake_reader();
    }

    fn start_failed(&self, msg: String) -> Fail {
        Fail::Before((ExitStatus::StartFailed, msg))
    }

    /// A signal asked for before the step reached its server ends it unstarted.
    fn signalled(&self) -> Option<Fail> {
        let sig = *self.shared.signals.borrow().first()?;
        log::info!("build {} step {}: stopped before its step server was reached", self.key.0, self.key.1);
        Some(Fail::Before((ExitStatus::Signal(sig as i32), String::new())))
    }

    async fn connect(&self) -> Result<smol::net::unix::UnixStream, Fail> {
        let deadline = Instant::now() + self.wait;
        let mut told = false;
        loop {
            if let Some(f) = self.signalled() {
                return Err(f);
            }
            let e = match smol::net::unix::UnixStream::connect(&self.path).await {
                Ok(s) => return Ok(s),
                Err(e) => e,
            };
            // Not there yet, or left by a step server that died: the container may be starting.
            let absent = matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused);
            if !absent {
                return Err(self.start_failed(format!(
                    "cannot connect to {}: {e} (the socket must let this agent's user connect)",
                    self.shared.what
                )));
            }
            if Instant::now() >= deadline {
                return Err(self.start_failed(format!(
                    "container '{}' has no step server at {} after {} (is the container running, and does \
                     its pod template mount the wisp-tools volume?)",
                    self.container,
                    self.path.display(),
                    show_wait(self.wait)
                )));
            }
            if !told {
                log::info!(
                    "build {} step {}: waiting up to {} for {} ({e})",
                    self.key.0,
                    self.key.1,
                    show_wait(self.wait),
                    self.shared.what
                );
                told = true;
            }
            let next = (Instant::now() + SOCKET_RETRY).min(deadline);
            smol::future::or(
                async {
                    Timer::at(next).await;
                },
                async {
                    let _ = self.shared.writable.1.recv().await;
                },
            )
            .await;
        }
    }

    async fn exchange(&self, frame: &[u8]) -> Result<(), Fail> {
        let stream = self.connect().await?;
        let (mut reader, mut writer) = link::tcp(Box::pin(stream));
        let what = &self.shared.what;
        let hello = Frame::Hello {
            min_version: proto::VERSION_MIN,
            max_version: proto::VERSION_MAX,
            name: &self.container,
            capabilities: 0,
            nonce: [0; NONCE_LEN],
        };
        let lost = |e: &dyn std::fmt::Display| self.start_failed(format!("{what}: {e}"));
        writer.send(&hello).await.map_err(|e| lost(&e))?;
        let answer = smol::future::or(async { Some(reader.next().await) }, async {
            Timer::after(proto::HANDSHAKE_TIMEOUT).await;
            None
        });
        match answer.await {
            None => return Err(lost(&"it did not answer within 10 s")),
            Some(Err(e)) => return Err(lost(&e)),
            Some(Ok(None)) => return Err(lost(&"it closed the connection")),
            Some(Ok(Some(Frame::Hello { min_version, max_version, .. }))) => {
                if min_version > proto::VERSION_MAX || max_version < proto::VERSION_MIN {
                    return Err(self.start_failed(format!(
                        "{what} speaks protocol versions {min_version} to {max_version} and this agent {} to {}: \
                         install the same wisp-agent in both containers",
                        proto::VERSION_MIN,
                        proto::VERSION_MAX
                    )));
                }
            }
            Some(Ok(Some(Frame::Reject { message, .. }))) => {
                return Err(self.start_failed(format!("{what} refused the step: {message}")))
            }
            Some(Ok(Some(f))) => return Err(lost(&format!("unexpected {} frame", frame_kind(&f)))),
        }
        if let Some(f) = self.signalled() {
            return Err(f);
        }
        let start = proto::decode(frame).expect("encoded by Remote::start");
        writer.send(&start).await.map_err(|e| Fail::After(format!("{what} went away mid-step: {e}")))?;
        let granted = Cell::new(u64::from(WINDOW));
        let result =
            smol::future::or(self.receive(&mut reader, &granted), self.send(&mut writer, &granted)).await;
        result.map_err(Fail::After)
    }

    /// Take the server's frames until it has sent the step's exit and the end of its output and
    /// closed; checks every frame against what it may send.
    async fn receive(&self, reader: &mut LinkReader, granted: &Cell<u64>) -> Result<(), String> {
        let sh = &self.shared;
        let what = &sh.what;
        let broke = |m: String| format!("{what} broke the protocol: {m}; the step is stopped");
        let (mut received, mut eof, mut exited) = (0u64, false, false);
        loop {
            let frame = match reader.next().await {
                Ok(Some(f)) => f,
                Ok(None) if eof && exited => return Ok(()),
                Ok(None) => return Err(format!("{what} went away mid-step (the connection closed)")),
                Err(link::LinkError::Io(e)) => return Err(format!("{what} went away mid-step: {e}")),
                Err(e) => return Err(broke(e.to_string())),
            };
            match frame {
                Frame::Output { build, step, offset, data } if (build, step) == self.key => {
                    if eof {
                        return Err(broke("output after the end of the output".into()));
                    }
                    if offset != received {
                        return Err(broke(format!("output at offset {offset}, expected {received}")));
                    }
                    if data.is_empty() {
                        eof = true;
                        sh.eof.set(true);
                    } else {
                        if received + data.len() as u64 > granted.get() {
                            return Err(broke("more output than its credit".into()));
                        }
                        sh.buf.borrow_mut().extend(data);
                        received += data.len() as u64;
                    }
                    sh.wake_reader();
                }
                Frame::Exit { build, step, status, offset, message } if (build, step) == self.key => {
                    if exited || offset != received {
                        return Err(broke(format!(
                            "an exit after {offset} bytes of {received}, or a second"
                        )));
                    }
                    exited = true;
                    match status {
                        ExitStatus::Code(_) | ExitStatus::Signal(_) => sh.end((status, String::new())),
                        ExitStatus::StartFailed if received == 0 => {
                            eof = true;
                            sh.eof.set(true);
                            sh.end((status, format!("in container '{}': {message}", self.container)));
                            sh.wake_reader();
                        }
                        other => return Err(broke(format!("an exit status of {other}"))),
                    }
                }
                Frame::Reject { message, .. } => return Err(format!("{what} stopped the step: {message}")),
                other => return Err(broke(format!("an unexpected {} frame", frame_kind(&other)))),
            }
        }
    }

    /// Send the step server what the step's reader and `kill_group` ask for: credit for output
    /// read, TERM (`Cancel`) and KILL (`Abandon`), and at the end `Ack`. Returns after the `Ack`.
    async fn send(&self, writer: &mut LinkWriter, granted: &Cell<u64>) -> Result<(), String> {
        let sh = &self.shared;
        let (build, step) = self.key;
        let failed = |e: link::LinkError| format!("{} went away mid-step: {e}", sh.what);
        loop {
            let signals = std::mem::take(&mut *sh.signals.borrow_mut());
            for sig in signals {
                let f = match sig {
                    Signal::SIGKILL => Frame::Abandon { build, step },
                    Signal::SIGTERM => Frame::Cancel { build, step },
                    other => {
                        log::debug!("build {build} step {step}: {other} is not forwarded");
                        continue;
                    }
                };
                writer.send(&f).await.map_err(failed)?;
            }
            let owed = sh.owed.replace(0);
            if owed > 0 {
                // Counted first: the server may use the credit before this send returns.
                granted.set(granted.get() + u64::from(owed));
                writer.send(&Frame::Credit { build, step, bytes: owed, stored: 0 }).await.map_err(failed)?;
            }
            if sh.released.get() {
                let _ = writer.send(&Frame::Ack { build, step, offset: 0 }).await;
                writer.close().await;
                return Ok(());
            }
            let _ = sh.writable.1.recv().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse_in_seconds_and_milliseconds_and_are_bounded() {
        assert_eq!(parse_wait("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_wait(" 2s "), Ok(Duration::from_secs(2)));
        assert_eq!(parse_wait("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_wait("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_wait("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "2 s", "1.5s", "-1", "2h", "99999999999999999999"] {
            assert!(parse_wait(bad).unwrap_err().contains("is not a duration"), "{bad}");
        }
        assert!(parse_wait("61m").unwrap_err().contains("limit of one hour"));
        assert_eq!(show_wait(Duration::from_secs(60)), "60 s");
        assert_eq!(show_wait(Duration::from_millis(2500)), "2.5 s");
    }

    #[test]
    fn only_container_names_make_socket_paths() {
        let s = StepSockets::default();
        assert_eq!(s.socket_path("build"), Some(PathBuf::from("/wisp/build.sock")));
        for bad in ["", "..", "../etc/x", "a/b", "Build", "a.b"] {
            assert_eq!(s.socket_path(bad), None, "{bad}");
        }
    }
}
