//! The agent: connects out to the controller, authenticates, runs the steps it is sent and
//! streams their output back within the credit the controller grants.
//!
//! Memory is fixed per link and per step (a few frame-sized buffers); nothing grows with the
//! amount of output, with a slow controller, or with what a peer claims.

pub mod connect;
pub mod jnlp;
pub mod process;

use crate::auth::{self, ClientHandshake, ClientStep};
use crate::link::{LinkError, LinkReader, LinkWriter, OutputBuf};
use crate::proto::{ExitStatus, Frame, RejectCode, StepStart, MAX_MESSAGE, MAX_OUTPUT_CHUNK};
pub use connect::Mode;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use process::Reaper;
use smol::channel::{bounded, Receiver, Sender};
use smol::io::AsyncReadExt;
use smol::lock::Mutex;
use smol::{LocalExecutor, Timer};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long each handshake step may take before the attempt is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between TERM and KILL when a step's process group is stopped.
pub const KILL_GRACE: Duration = Duration::from_secs(3);
/// First reconnect delay; doubles per failure up to `BACKOFF_MAX`, with up to 50% jitter added.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest reconnect delay before jitter (Jenkins' agent caps at 10 s too).
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A link is declared dead after this many ping intervals without any frame from the controller.
pub const DEAD_AFTER_PINGS: u32 = 3;

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Controller URL (`http://host:8080/`).
    pub url: String,
    /// Node name.
    pub name: String,
    /// Node secret (64 hex characters).
    pub secret: String,
    /// WebSocket, direct TCP or TCP with port discovery.
    pub mode: Mode,
    /// Directory holding workspaces.
    pub work_dir: PathBuf,
    /// Extra CA certificates (PEM) to trust.
    pub ca_file: Option<PathBuf>,
}

/// Why the agent stopped.
#[derive(Debug)]
pub enum AgentError {
    /// The controller refused this node; retrying would not help.
    Rejected(RejectCode, String),
    /// The peer is not a controller that knows this node's secret.
    Untrusted(String),
    /// The configuration cannot work (bad URL, unreadable certificate).
    Config(String),
}

impl AgentError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 2,
            Self::Rejected(RejectCode::UnknownNode, _) => 3,
            Self::Rejected(RejectCode::WrongSecret, _) => 4,
            Self::Rejected(RejectCode::UnsupportedVersion, _) => 5,
            Self::Rejected(..) => 6,
            Self::Untrusted(_) => 7,
        }
    }
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rejected(_, m) => write!(f, "the controller refused this agent: {m}"),
            Self::Untrusted(m) => write!(f, "{m}"),
            Self::Config(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// Fetch the node's descriptor from `jnlp_url` (see [`jnlp`]), retrying with backoff while the
/// controller cannot be reached.
pub fn fetch_descriptor(
    jnlp_url: &str,
    name: &str,
    secret: &str,
    ca_file: Option<&Path>,
) -> Result<jnlp::Descriptor, AgentError> {
    let tls = if connect::parse_url(jnlp_url).map_err(AgentError::Config)?.tls {
        Some(connect::Tls::new(ca_file).map_err(AgentError::Config)?)
    } else {
        None
    };
    smol::block_on(async {
        let mut backoff = Backoff::default();
        loop {
            match jnlp::fetch(jnlp_url, name, secret, tls.as_ref()).await {
                Ok(d) => return Ok(d),
                Err(jnlp::JnlpError::Fatal(m)) => return Err(AgentError::Config(m)),
                Err(jnlp::JnlpError::UnknownNode(m)) => {
                    return Err(AgentError::Rejected(RejectCode::UnknownNode, m))
                }
                Err(jnlp::JnlpError::WrongSecret(m)) => {
                    return Err(AgentError::Rejected(RejectCode::WrongSecret, m))
                }
                Err(jnlp::JnlpError::Retry(m)) => {
                    let delay = backoff.next();
                    log::warn!("fetching the agent descriptor: {m}; retrying in {:.1}s", delay.as_secs_f64());
                    Timer::after(delay).await;
                }
            }
        }
    })
}

/// Run the agent until it is rejected or receives SIGTERM/SIGINT (then `Ok`).
pub fn run(cfg: Config) -> Result<(), AgentError> {
    let ex = Rc::new(LocalExecutor::new());
    smol::block_on(ex.run(run_on(ex.clone(), cfg)))
}

/// Run the agent on an executor the caller drives.
pub async fn run_on(ex: Rc<LocalExecutor<'static>>, cfg: Config) -> Result<(), AgentError> {
    let target = connect::parse_url(&cfg.url).map_err(AgentError::Config)?;
    let tls = if target.tls {
        Some(connect::Tls::new(cfg.ca_file.as_deref()).map_err(AgentError::Config)?)
    } else {
        None
    };
    let reaper =
        Reaper::install(std::process::id() == 1).map_err(|e| AgentError::Config(format!("signals: {e}")))?;
    let agent = Rc::new(Agent { cfg, ex, reaper: reaper.clone(), steps: RefCell::new(HashMap::new()) });
    let main = {
        let agent = agent.clone();
        async move {
            let mut backoff = Backoff::default();
            loop {
                let started = Instant::now();
                match agent.session(&target, tls.as_ref()).await {
                    Ok(()) => {}
                    Err(End::Fatal(e)) => return Err(e),
                    Err(End::Retry(msg)) => log::warn!("{msg}"),
                }
                agent.stop_all_steps();
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Backoff::default();
                }
                let delay = backoff.next();
                log::info!("reconnecting in {:.1}s", delay.as_secs_f64());
                Timer::after(delay).await;
            }
        }
    };
    let stop = async {
        reaper.run().await;
        log::info!("terminating: stopping running steps");
        agent.stop_all_steps();
        // Give the steps' TERM → KILL sequences time to run.
        let deadline = Instant::now() + KILL_GRACE + Duration::from_secs(1);
        while !agent.steps.borrow().is_empty() && Instant::now() < deadline {
            Timer::after(Duration::from_millis(20)).await;
        }
        Ok(())
    };
    smol::future::or(main, stop).await
}

enum End {
    Fatal(AgentError),
    Retry(String),
}

#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = BACKOFF_MIN.saturating_mul(1 << self.failures.min(8)).min(BACKOFF_MAX);
        self.failures += 1;
        let r = auth::random_nonce();
        let jitter = f64::from(u16::from_be_bytes([r[0], r[1]])) / f64::from(u16::MAX) * 0.5;
        base.mul_f64(1.0 + jitter)
    }
}

/// The agent's controls over one running step.
struct StepCtl {
    credit: Cell<u64>,
    cancelled: Cell<bool>,
    /// Link lost: stop at once without reporting.
    abandoned: Cell<bool>,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl StepCtl {
    fn new(credit: u32) -> Self {
        let (wake_tx, wake_rx) = bounded(1);
        Self {
            credit: Cell::new(u64::from(credit)),
            cancelled: Cell::new(false),
            abandoned: Cell::new(false),
            wake_tx,
            wake_rx,
        }
    }
    fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }
}

struct Agent {
    cfg: Config,
    ex: Rc<LocalExecutor<'static>>,
    reaper: Rc<Reaper>,
    steps: RefCell<HashMap<(u64, u32), Rc<StepCtl>>>,
}

type Writer = Rc<Mutex<LinkWriter>>;

async fn timeout<T>(d: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(fut.await) }, async {
        Timer::after(d).await;
        None
    })
    .await
}

impl Agent {
    /// One connection: open, handshake, serve until the link ends.
    async fn session(
        self: &Rc<Self>,
        target: &connect::Target,
        tls: Option<&connect::Tls>,
    ) -> Result<(), End> {
        let (mut reader, writer) =
            connect::open(target, &self.cfg.mode, &self.cfg.name, tls).await.map_err(End::Retry)?;
        let writer: Writer = Rc::new(Mutex::new(writer));
        let ping_ms = self.handshake(&mut reader, &writer).await?;
        log::info!("connected to {} as node '{}'", self.cfg.url, self.cfg.name);
        let interval = Duration::from_millis(u64::from(ping_ms.clamp(100, 600_000)));
        let pinger = {
            let writer = writer.clone();
            self.ex.spawn(async move {
                let mut id = 0u64;
                loop {
                    Timer::after(interval).await;
                    id += 1;
                    if writer.lock().await.send(&Frame::Ping { id }).await.is_err() {
                        break;
                    }
                }
            })
        };
        let result = self.serve(&mut reader, &writer, interval * DEAD_AFTER_PINGS).await;
        drop(pinger);
        writer.lock().await.close().await;
        result
    }

    async fn handshake(&self, reader: &mut LinkReader, writer: &Writer) -> Result<u32, End> {
        let (mut hs, hello) = ClientHandshake::new(&self.cfg.name, &self.cfg.secret, auth::random_nonce(), 0);
        let send_err = |e: LinkError| End::Retry(format!("handshake: {e}"));
        writer.lock().await.send(&hello).await.map_err(send_err)?;
        loop {
            let frame = match timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
                None => return Err(End::Retry("handshake: the controller did not answer in time".into())),
                Some(Err(e)) => return Err(End::Retry(format!("handshake: {e}"))),
                Some(Ok(None)) => {
                    return Err(End::Retry("handshake: the controller closed the connection".into()))
                }
                Some(Ok(Some(f))) => f,
            };
            match hs.on_frame(&frame) {
                ClientStep::Send(f) => writer.lock().await.send(&f).await.map_err(send_err)?,
                ClientStep::Done { ping_interval_ms, .. } => return Ok(ping_interval_ms),
                ClientStep::Rejected(code @ (RejectCode::AlreadyConnected | RejectCode::TryLater), m) => {
                    return Err(End::Retry(format!("the controller said: {m} ({code:?}); will retry")))
                }
                ClientStep::Rejected(code, m) => return Err(End::Fatal(AgentError::Rejected(code, m))),
                ClientStep::Failed(m) => return Err(End::Fatal(AgentError::Untrusted(m))),
            }
        }
    }

    async fn serve(
        self: &Rc<Self>,
        reader: &mut LinkReader,
        writer: &Writer,
        dead_after: Duration,
    ) -> Result<(), End> {
        loop {
            let frame = match timeout(dead_after, reader.next()).await {
                None => {
                    return Err(End::Retry(format!(
                        "no word from the controller for {}s: the link is dead",
                        dead_after.as_secs()
                    )))
                }
                Some(Err(e)) => return Err(End::Retry(format!("link to the controller failed: {e}"))),
                Some(Ok(None)) => return Err(End::Retry("the controller closed the connection".into())),
                Some(Ok(Some(f))) => f,
            };
            match frame {
                Frame::StepStart(s) => self.start_step(&s, writer),
                Frame::Credit { build, step, bytes } => {
                    if let Some(ctl) = self.steps.borrow().get(&(build, step)) {
                        ctl.credit.set(ctl.credit.get().saturating_add(u64::from(bytes)));
                        ctl.wake();
                    }
                }
                Frame::Cancel { build, step } => {
                    if let Some(ctl) = self.steps.borrow().get(&(build, step)) {
                        log::info!("build {build} step {step}: cancel requested");
                        ctl.cancelled.set(true);
                        ctl.wake();
                    }
                }
                Frame::Ack { .. } | Frame::Pong { .. } => {}
                Frame::Ping { id } => {
                    let _ = writer.lock().await.send(&Frame::Pong { id }).await;
                }
                Frame::Reject { message, .. } => {
                    return Err(End::Retry(format!("the controller closed the session: {message}")))
                }
                other => {
                    return Err(End::Retry(format!(
                        "protocol error: unexpected {} frame from the controller",
                        auth::frame_kind(&other)
                    )))
                }
            }
        }
    }

    /// Kill every running step (the link is gone; a later protocol version resumes instead).
    fn stop_all_steps(&self) {
        for ctl in self.steps.borrow().values() {
            ctl.abandoned.set(true);
            ctl.cancelled.set(true);
            ctl.wake();
        }
    }

    fn start_step(self: &Rc<Self>, s: &StepStart<'_>, writer: &Writer) {
        let key = (s.build, s.step);
        if self.steps.borrow().contains_key(&key) {
            log::warn!("build {} step {}: already running, duplicate start ignored", s.build, s.step);
            return;
        }
        log::info!(
            "build {} step {}: starting `{} -c ...` in workspace {}",
            s.build,
            s.step,
            s.shell,
            s.workspace
        );
        let child = self.workspace_dir(s).and_then(|dir| {
            let build = s.build.to_string();
            let step = s.step.to_string();
            let ws = dir.to_string_lossy().into_owned();
            let extra = [
                ("WORKSPACE", ws.as_str()),
                ("BUILD_NUMBER", build.as_str()),
                ("WISP_BUILD", build.as_str()),
                ("WISP_STEP", step.as_str()),
                ("NODE_NAME", self.cfg.name.as_str()),
            ];
            process::spawn_shell(s.shell, s.script, &dir, extra.into_iter().chain(s.env.iter()))
        });
        let writer = writer.clone();
        match child {
            Err(msg) => {
                log::warn!("build {} step {}: {msg}", s.build, s.step);
                let (build, step) = key;
                self.ex
                    .spawn(async move {
                        let exit = Frame::Exit {
                            build,
                            step,
                            status: ExitStatus::StartFailed,
                            offset: 0,
                            message: clip(&msg),
                        };
                        let _ = writer.lock().await.send(&exit).await;
                    })
                    .detach();
            }
            Ok(child) => {
                let ctl = Rc::new(StepCtl::new(s.credit));
                self.steps.borrow_mut().insert(key, ctl.clone());
                let exited = self.reaper.watch(child.pid);
                let deadline = (s.timeout_secs > 0)
                    .then(|| Instant::now() + Duration::from_secs(u64::from(s.timeout_secs)));
                let agent = self.clone();
                self.ex
                    .spawn(async move {
                        let end = run_step(key, child, exited, &ctl, deadline, &writer).await;
                        agent.steps.borrow_mut().remove(&key);
                        if let Some((status, offset)) = end {
                            log::info!("build {} step {}: {status}", key.0, key.1);
                            let exit = Frame::Exit { build: key.0, step: key.1, status, offset, message: "" };
                            let _ = writer.lock().await.send(&exit).await;
                        }
                    })
                    .detach();
            }
        }
    }

    /// The step's directory: WORK_DIR/workspace/WORKSPACE/DIR, created if missing.
    fn workspace_dir(&self, s: &StepStart<'_>) -> Result<PathBuf, String> {
        for part in [s.workspace, s.dir] {
            let p = Path::new(part);
            if p.is_absolute() || p.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(format!("refused workspace path {part:?}: it must stay inside the work dir"));
            }
        }
        if s.workspace.is_empty() {
            return Err("empty workspace name".into());
        }
        let dir = self.cfg.work_dir.join("workspace").join(s.workspace).join(s.dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create workspace {}: {e}", dir.display()))?;
        Ok(dir)
    }
}

fn clip(msg: &str) -> &str {
    if msg.len() <= MAX_MESSAGE {
        return msg;
    }
    let mut end = MAX_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

enum Ev {
    Read(std::io::Result<usize>),
    Exited(WaitStatus),
    Wake,
    Timer,
}

/// Stream one step's output within credit until its shell has exited and the pipe is drained.
/// Returns how it ended and its output length, or None when the link was lost.
async fn run_step(
    key: (u64, u32),
    mut child: process::Child,
    exited: Receiver<WaitStatus>,
    ctl: &StepCtl,
    deadline: Option<Instant>,
    writer: &Writer,
) -> Option<(ExitStatus, u64)> {
    let mut out = OutputBuf::default();
    let mut offset = 0u64;
    let mut eof = false;
    let mut status: Option<ExitStatus> = None;
    let mut reason: Option<ExitStatus> = None; // TimedOut or Cancelled
    let mut term_at: Option<Instant> = None; // when TERM was sent to the group
    let mut killed = false;
    loop {
        if eof && status.is_some() {
            break;
        }
        if ctl.abandoned.get() {
            process::kill_group(child.pid, Signal::SIGKILL);
            return None;
        }
        if reason.is_none() && ctl.cancelled.get() {
            reason = Some(ExitStatus::Cancelled);
        }
        if reason.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            log::info!("build {} step {}: timed out", key.0, key.1);
            reason = Some(ExitStatus::TimedOut);
        }
        // Stop the group when the step was cancelled or timed out, and clear out leftover
        // background processes once the shell itself has exited.
        if (reason.is_some() || status.is_some()) && term_at.is_none() {
            process::kill_group(child.pid, Signal::SIGTERM);
            term_at = Some(Instant::now());
        }
        if let Some(t) = term_at {
            if !killed && t.elapsed() >= KILL_GRACE {
                process::kill_group(child.pid, Signal::SIGKILL);
                killed = true;
            } else if killed && status.is_some() && ctl.credit.get() > 0 && t.elapsed() >= KILL_GRACE * 2 {
                // A process that left the group holds the pipe open; stop waiting for it.
                log::warn!("build {} step {}: output pipe still open after KILL, not waiting", key.0, key.1);
                break;
            }
        }
        let next_timer = match (term_at, deadline, reason) {
            (Some(_), _, _) if killed && ctl.credit.get() == 0 => None,
            (Some(t), _, _) => Some(t + if killed { KILL_GRACE * 2 } else { KILL_GRACE }),
            (None, Some(d), None) => Some(d),
            _ => None,
        };
        let credit = ctl.credit.get().min(MAX_OUTPUT_CHUNK as u64) as usize;
        let read = async {
            if eof || credit == 0 {
                std::future::pending().await
            }
            Ev::Read(child.output.read(&mut out.space()[..credit]).await)
        };
        let exit = async {
            if status.is_some() {
                std::future::pending().await
            }
            match exited.recv().await {
                Ok(st) => Ev::Exited(st),
                Err(_) => std::future::pending().await,
            }
        };
        let wake = async {
            let _ = ctl.wake_rx.recv().await;
            Ev::Wake
        };
        let timer = async {
            match next_timer {
                Some(t) => Timer::at(t).await,
                None => std::future::pending().await,
            };
            Ev::Timer
        };
        let ev = smol::future::or(smol::future::or(read, exit), smol::future::or(wake, timer)).await;
        match ev {
            Ev::Read(Ok(0)) => eof = true,
            Ev::Read(Ok(n)) => {
                if writer.lock().await.send_output(&mut out, key.0, key.1, offset, n).await.is_err() {
                    process::kill_group(child.pid, Signal::SIGKILL);
                    return None;
                }
                offset += n as u64;
                ctl.credit.set(ctl.credit.get() - n as u64);
            }
            Ev::Read(Err(e)) => {
                log::warn!("build {} step {}: reading output: {e}", key.0, key.1);
                eof = true;
            }
            Ev::Exited(st) => {
                status = Some(match st {
                    WaitStatus::Exited(_, code) => ExitStatus::Code(code),
                    WaitStatus::Signaled(_, sig, _) => ExitStatus::Signal(sig as i32),
                    _ => ExitStatus::Code(-1),
                });
            }
            Ev::Wake | Ev::Timer => {}
        }
    }
    let status = reason.or(status).unwrap_or(ExitStatus::Code(-1));
    Some((status, offset))
}
