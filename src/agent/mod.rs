//! The agent: connects out to the controller, authenticates, runs the steps it is sent and
//! streams their output back within the credit the controller grants.
//!
//! Memory is fixed per link and per step (a few frame-sized buffers); nothing grows with the
//! amount of output, with a slow controller, or with what a peer claims. Steps outlive links:
//! each step's output goes through a spool file until the controller has stored it, and after a
//! reconnect the agent reports its steps (`Running`), the controller answers each with `Resume`
//! (replay from what it has) or `Abandon`, and the output continues with nothing lost or doubled.
//!
//! A step whose `StepStart` names a container is forwarded to that container's step server
//! ([`forward`], [`stepserver`]) and otherwise goes through the same code as a local one.
//!
//! Nothing here is process-wide: an agent is the value [`run`] builds, stopped by the
//! [`Shutdown`] it is given, so several agents can run in one process. (Where step servers'
//! sockets are is read from the environment at start: `WISP_STEP_SOCKETS`, `WISP_STEP_SOCKET_WAIT`.)

pub mod forward;
pub mod handover;
pub mod jnlp;
pub mod jobs;
pub mod process;
pub mod scrub;
pub mod spool;
pub mod stepserver;

use crate::auth::{self, ClientHandshake, ClientStep};
pub use crate::dial::Mode;
use crate::dial::{self, DialError};
use crate::link::{LinkError, LinkReader, LinkWriter, OutputBuf, Watchdog};
use crate::proto::{
    self, CodecError, ExitStatus, Frame, RejectCode, StepStart, MAX_MESSAGE, MAX_OUTPUT_CHUNK,
};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use process::Reaper;
use smol::channel::{bounded, Receiver, Sender};
use smol::io::AsyncReadExt;
use smol::lock::Mutex;
use smol::{LocalExecutor, Timer};
use spool::Spool;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
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
/// Longest wait a refusing controller can ask for ("try again in 60s"): a controller that asks for
/// more (or a bad one) cannot park the agent for longer than this.
pub const MAX_RETRY_HINT: Duration = Duration::from_secs(300);
/// Consecutive tries whose TLS certificate check fails before the agent gives up (exit code 8):
/// with the backoff that is about 15-23 s, enough to ride out a controller restarting with a new
/// certificate, short enough that a wrong pin or a missing CA is reported instead of retried forever.
pub const MAX_CERT_FAILURES: u32 = 5;
/// A link is declared dead after this many ping intervals without any frame from the controller.
pub const DEAD_AFTER_PINGS: u32 = 3;
/// Default most output bytes a step may hold in its spool while the controller is away.
pub const DEFAULT_SPOOL_CAP: u64 = 1 << 30;
/// Most steps listed in one `Running` frame (far above any executor count).
const MAX_REPORTED: usize = 1000;
/// How long a clean stop waits for the controller to take the link's close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Directory holding workspaces; a relative one is taken from the current directory at start.
    pub work_dir: PathBuf,
    /// How the controller's TLS certificate is checked.
    pub trust: crate::tls::Trust,
    /// Most output bytes a step holds in its spool while the controller is away; then the step
    /// is not read (it blocks on write) until the controller is back.
    pub spool_cap: u64,
}

/// Why the agent stopped.
#[derive(Debug)]
pub enum AgentError {
    /// The controller refused this node for good (see [`is_permanent`]); retrying would not help.
    Rejected(RejectCode, String),
    /// The peer is not a controller that knows this node's secret.
    Untrusted(String),
    /// The configuration cannot work (bad URL, unreadable certificate).
    Config(String),
    /// The controller's certificate failed its check `MAX_CERT_FAILURES` times in a row.
    Certificate(String),
}

impl AgentError {
    /// The process exit code for this error (README, `wisp-agent`).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 2,
            Self::Rejected(RejectCode::UnknownNode, _) => 3,
            Self::Rejected(RejectCode::WrongSecret, _) => 4,
            Self::Rejected(RejectCode::UnsupportedVersion, _) => 5,
            // Not used: other refusals are retried.
            Self::Rejected(..) => 6,
            Self::Untrusted(_) => 7,
            Self::Certificate(_) => 8,
        }
    }
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rejected(_, m) => write!(f, "the controller refused this agent: {m}"),
            Self::Untrusted(m) | Self::Config(m) | Self::Certificate(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// Whether a refusal is for good: the node does not exist, the secret is wrong, or no protocol
/// version is shared. Everything else (a protocol error while connecting, "already connected", a
/// controller that is overloaded or rate-limits, codes added later) is retried with backoff.
pub fn is_permanent(code: RejectCode) -> bool {
    matches!(code, RejectCode::UnknownNode | RejectCode::WrongSecret | RejectCode::UnsupportedVersion)
}

/// The controller identity to pin, as `--instance-identity`, `JENKINS_INSTANCE_IDENTITY` or a
/// descriptor's `-instanceIdentity` give it: wisp's fingerprint (`sha256:HEX`, see
/// [`crate::tls::parse_fingerprint`]), or what Jenkins and its Kubernetes plugin pass, the base64
/// of the controller's public key (its DER SubjectPublicKeyInfo), whose SHA-256 is that fingerprint.
pub fn parse_instance_identity(s: &str) -> Result<[u8; 32], String> {
    let t = s.trim();
    let hexish = t.starts_with("sha256:")
        || t.starts_with("SHA256:")
        || t.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
    if hexish {
        return crate::tls::parse_fingerprint(t);
    }
    // A DER SEQUENCE, longer than any fingerprint.
    match base64_decode(t).filter(|der| der.len() > 32 && der[0] == 0x30) {
        Some(der) => {
            let mut fp = [0u8; 32];
            fp.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
            Ok(fp)
        }
        None => Err(format!(
            "bad instance identity {s:?}: expected sha256: and 64 hex digits, as `wisp node add` prints \
             it, or the base64 public key Jenkins passes"
        )),
    }
}

/// Standard or URL-safe base64, padding optional, whitespace ignored.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// What stops a running agent: SIGTERM or SIGINT in the binary, a [`Stopper`] where the agent runs
/// inside another program (or twice in one test).
pub struct Shutdown {
    fut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Shutdown {
    /// Stop when `fut` completes.
    pub fn new(fut: impl Future<Output = ()> + Send + 'static) -> Self {
        Self { fut: Some(Box::pin(fut)) }
    }

    /// Never stop (run until refused for good).
    pub fn never() -> Self {
        Self::new(std::future::pending())
    }

    /// A shutdown and the handle that triggers it (from any thread). Dropping every handle does
    /// not stop the agent.
    pub fn stopper() -> (Stopper, Self) {
        let (tx, rx) = bounded::<()>(1);
        let fut = async move {
            if rx.recv().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        (Stopper(tx), Self::new(fut))
    }

    /// Wait until the agent is told to stop (at once if it already was).
    pub async fn wait(&mut self) {
        if let Some(fut) = &mut self.fut {
            fut.await;
            self.fut = None;
        }
    }
}

/// Stops the agent whose [`Shutdown`] it came with.
#[derive(Clone, Debug)]
pub struct Stopper(Sender<()>);

impl Stopper {
    /// Tell the agent to stop: its steps are killed, its link closed, and [`run`] returns `Ok`.
    pub fn stop(&self) {
        let _ = self.0.try_send(());
    }
}

/// Why a try at the controller failed in a way worth another try.
struct Setback {
    msg: String,
    kind: SetbackKind,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum SetbackKind {
    /// The link could not be opened or it failed; back off and try again.
    Link,
    /// The controller refuses for now (overloaded, rate limit, lockout); it may say how long.
    Busy(Option<Duration>),
    /// The controller's certificate did not pass the check.
    Certificate,
}

impl Setback {
    fn link(msg: impl Into<String>) -> Self {
        Self { msg: msg.into(), kind: SetbackKind::Link }
    }

    fn busy(msg: impl Into<String>) -> Self {
        let msg = msg.into();
        Self { kind: SetbackKind::Busy(retry_hint(&msg)), msg }
    }

    /// What the agent logs before waiting `delay`.
    fn describe(&self, delay: Duration) -> String {
        match self.kind {
            SetbackKind::Busy(_) => format!(
                "the controller is overloaded / refusing for now ({}); retrying in {}s",
                self.msg,
                crate::text::Tenths(delay)
            ),
            _ => format!("{}; retrying in {}s", self.msg, crate::text::Tenths(delay)),
        }
    }
}

/// "try again in 60s" in a refusal: how long the controller asked us to wait (at most
/// `MAX_RETRY_HINT`).
fn retry_hint(msg: &str) -> Option<Duration> {
    let rest = &msg[msg.find("try again in ")? + "try again in ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if !rest[digits.len()..].starts_with('s') {
        return None;
    }
    Some(Duration::from_secs(digits.parse().ok()?).min(MAX_RETRY_HINT))
}

/// What a failed dial (TCP, TLS, WebSocket upgrade, port discovery) means for the agent.
fn classify_dial_error(e: &DialError) -> Setback {
    match e {
        DialError::CertificateUntrusted { .. } => {
            Setback { msg: e.to_string(), kind: SetbackKind::Certificate }
        }
        // A controller with too many connections in the TLS handshake closes new ones on accept:
        // that is not a certificate problem, so the certificate advice would mislead.
        DialError::HandshakeCut { addr } => {
            Setback::busy(format!("{addr} closed the connection during the TLS handshake"))
        }
        DialError::Http { status: Some(503 | 429), .. } => Setback::busy(e.to_string()),
        _ => Setback::link(e.to_string()),
    }
}

/// A refusal the agent retries, as a setback.
fn refusal(code: RejectCode, m: String) -> Setback {
    // "Already connected" and a protocol error are retried at the agent's own pace. Any other code
    // (rate limits, overload, codes added later) means the controller refuses for now, and so
    // does a protocol error that asks to try again (its lockout after failed handshakes).
    let ours = matches!(code, RejectCode::AlreadyConnected | RejectCode::ProtocolError);
    if ours && !m.contains("try again") {
        Setback::link(format!("the controller said: {m} ({code:?})"))
    } else {
        Setback::busy(m)
    }
}

/// Open a link in `mode`; also says where it went: "HOST:PORT over TRANSPORT[ with TLS]".
async fn dial(
    target: &dial::Target,
    mode: &Mode,
    name: &str,
    tls: Option<&dial::Tls>,
) -> Result<(LinkReader, LinkWriter, String), DialError> {
    let host_port = |port: u16| {
        if target.host.contains(':') {
            format!("[{}]:{port}", target.host)
        } else {
            format!("{}:{port}", target.host)
        }
    };
    let discovered;
    let (mode, addr, transport) = match mode {
        Mode::WebSocket => (mode, host_port(target.port), "WebSocket"),
        Mode::Direct(addr) => (mode, addr.clone(), "TCP"),
        Mode::Discover => {
            let addr = host_port(dial::discover_port(target, tls).await?);
            discovered = Mode::Direct(addr.clone());
            (&discovered, addr, "TCP")
        }
        #[cfg(feature = "kafka")]
        Mode::Kafka(k) => {
            let (reader, writer) = dial::open_kafka(&k.0, name).await?;
            let via = format!("Kafka {} (topic wisp.{name})", k.0.brokers.join(","));
            return Ok((reader, writer, via));
        }
    };
    let (reader, writer) = dial::open(target, mode, name, tls).await?;
    let with = if tls.is_some() { " with TLS" } else { "" };
    Ok((reader, writer, format!("{addr} over {transport}{with}")))
}

/// Counts consecutive certificate failures and turns the `MAX_CERT_FAILURES`th into an error.
#[derive(Default)]
struct CertFailures(u32);

impl CertFailures {
    fn note(&mut self, s: &Setback) -> Result<(), AgentError> {
        if s.kind != SetbackKind::Certificate {
            self.0 = 0;
            return Ok(());
        }
        self.0 += 1;
        if self.0 < MAX_CERT_FAILURES {
            return Ok(());
        }
        Err(AgentError::Certificate(format!(
            "giving up after {} tries in a row whose certificate check failed: {}",
            self.0, s.msg
        )))
    }
}

/// How long to wait after `s`: the backoff, or what a refusing controller asked for if longer.
fn delay_after(s: &Setback, backoff: &mut Backoff) -> Duration {
    let d = backoff.next();
    match s.kind {
        SetbackKind::Busy(Some(hint)) => d.max(hint),
        _ => d,
    }
}

/// Fetch the node's descriptor from `jnlp_url` (see [`jnlp`]), retrying with backoff while the
/// controller cannot be reached. `None` if `shutdown` came first.
///
/// Unless the command line says how to check the controller's certificate (`--cert`,
/// `--instance-identity`), an `https://` descriptor is fetched without a check: its content is
/// sealed with the node secret (ChaCha20-Poly1305 under a key derived from it), so whoever
/// answers cannot forge or alter it, and the request carries no secret or token for them to
/// learn. At worst someone in the middle can refuse to answer or replay an older descriptor of this
/// node. The identity the descriptor carries (`-instanceIdentity`) is then pinned for every link.
pub fn fetch_descriptor(
    jnlp_url: &str,
    name: &str,
    secret: &str,
    trust: &crate::tls::Trust,
    shutdown: &mut Shutdown,
) -> Result<Option<jnlp::Descriptor>, AgentError> {
    let tls = if dial::parse_url(jnlp_url).map_err(|e| AgentError::Config(e.to_string()))?.tls {
        let explicit = trust.pin.is_some() || trust.ca_file.is_some() || trust.insecure;
        Some(
            if explicit { dial::Tls::new(trust) } else { dial::Tls::unchecked_for_sealed_content() }
                .map_err(AgentError::Config)?,
        )
    } else {
        None
    };
    let fetch = async {
        let mut backoff = Backoff::default();
        let mut cert = CertFailures::default();
        loop {
            let setback = match jnlp::fetch(jnlp_url, name, secret, tls.as_ref()).await {
                Ok(d) => return Ok(Some(d)),
                Err(jnlp::JnlpError::Fatal(m)) => return Err(AgentError::Config(m)),
                Err(jnlp::JnlpError::UnknownNode(m)) => {
                    return Err(AgentError::Rejected(RejectCode::UnknownNode, m))
                }
                Err(jnlp::JnlpError::WrongSecret(m)) => {
                    return Err(AgentError::Rejected(RejectCode::WrongSecret, m))
                }
                Err(jnlp::JnlpError::Dial(e)) => {
                    let s = classify_dial_error(&e);
                    Setback { msg: format!("fetching the agent descriptor: {}", s.msg), ..s }
                }
                Err(jnlp::JnlpError::Retry(m)) => Setback::busy(m),
            };
            cert.note(&setback)?;
            let delay = delay_after(&setback, &mut backoff);
            log::warn!("{}", setback.describe(delay));
            Timer::after(delay).await;
        }
    };
    smol::block_on(smol::future::or(fetch, async {
        shutdown.wait().await;
        Ok(None)
    }))
}

/// Run the agent until it is refused for good or `shutdown` completes (then `Ok`: its steps are
/// killed and its link closed).
pub fn run(cfg: Config, shutdown: Shutdown) -> Result<(), AgentError> {
    run_upgradable(cfg, shutdown, None)
}

/// In-place upgrades of the agent the binary runs: on each request (SIGHUP) it executes `exe`
/// in its own process and hands its running steps over (see [`handover`]).
pub struct Upgrade {
    /// The binary to execute: the path this one was started from. None where it is not known
    /// (no /proc at start); a request then only says so.
    pub exe: Option<PathBuf>,
    /// The command line to execute it with: this one's, the secret overwritten.
    pub argv: Vec<std::ffi::CString>,
    /// The requests.
    pub requests: process::Hangups,
    /// What the previous agent handed over to this one, and the format version it came in.
    pub adopted: Option<(handover::State, u32)>,
}

/// [`run`], upgrading in place on `upgrade`'s requests and adopting the steps a previous agent
/// handed over.
pub fn run_upgradable(cfg: Config, shutdown: Shutdown, upgrade: Option<Upgrade>) -> Result<(), AgentError> {
    let ex = Rc::new(LocalExecutor::new());
    // The executor parks between wake-ups and async-io's own thread waits on I/O alone. With
    // `smol::block_on` this thread would poll I/O itself, but async-io's helper thread then wakes
    // on a back-off timer (50 µs up to 10 ms) after each burst and takes the poller over between
    // builds: with 100 agents on 2 cores that cost each agent about a third more CPU per build.
    smol::future::block_on(ex.run(run_on_with(ex.clone(), cfg, shutdown, upgrade)))
}

/// The work dir as an absolute path, created if missing (a step that changes directory can still
/// use `$WORKSPACE`).
fn absolute_work_dir(dir: &Path) -> Result<PathBuf, AgentError> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        let cwd = std::env::current_dir().map_err(|e| {
            AgentError::Config(format!(
                "the work dir {} is relative but the current directory is unknown ({e}): give an absolute --work-dir",
                dir.display()
            ))
        })?;
        cwd.join(dir)
    };
    if let Err(e) = std::fs::create_dir_all(&abs) {
        log::warn!("cannot create the work dir {}: {e}", abs.display());
    }
    // Canonical once it exists: no `..` or symlinks in what steps are given.
    Ok(std::fs::canonicalize(&abs).unwrap_or(abs))
}

/// Run the agent on an executor the caller drives.
pub async fn run_on(
    ex: Rc<LocalExecutor<'static>>,
    cfg: Config,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    run_on_with(ex, cfg, shutdown, None).await
}

async fn run_on_with(
    ex: Rc<LocalExecutor<'static>>,
    mut cfg: Config,
    mut shutdown: Shutdown,
    mut upgrade: Option<Upgrade>,
) -> Result<(), AgentError> {
    let target = dial::parse_url(&cfg.url).map_err(|e| AgentError::Config(e.to_string()))?;
    let step_sockets = forward::StepSockets::from_env().map_err(AgentError::Config)?;
    let tls = if target.tls { Some(dial::Tls::new(&cfg.trust).map_err(AgentError::Config)?) } else { None };
    cfg.work_dir = absolute_work_dir(&cfg.work_dir)?;
    // As PID 1 (a container's init) the agent also reaps the orphans the kernel hands it.
    let reaper = Reaper::new(std::process::id() == 1)
        .map_err(|e| AgentError::Config(format!("watching child processes: {e}")))?;
    let adopted = upgrade.as_mut().and_then(|u| u.adopted.take());
    // Spools of an earlier agent process belong to steps that died with it, unless it handed
    // them over.
    let spools = cfg.work_dir.join(".wisp").join("spool");
    match &adopted {
        None => {
            let _ = std::fs::remove_dir_all(&spools);
        }
        Some((state, _)) => {
            for e in std::fs::read_dir(&spools).into_iter().flatten().flatten() {
                if !state.steps.iter().any(|s| s.spool_dir == e.path()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    log::debug!("work dir {}", cfg.work_dir.display());
    let agent = Rc::new(Agent {
        cfg,
        step_sockets,
        ex,
        reaper: reaper.clone(),
        steps: RefCell::new(HashMap::new()),
        link: RefCell::new(None),
        generation: Cell::new(0),
        stopping: Cell::new(false),
        parked: RefCell::new(Vec::new()),
    });
    if let Some((state, version)) = adopted {
        let n = state.steps.len();
        for s in state.steps {
            agent.adopt_handed_over(s);
        }
        log::info!("resumed {n} running step(s) from the previous agent (version {})", state.agent_version);
        log::debug!("hand-over state format version {version}");
    }
    let connect = || {
        let agent = agent.clone();
        let (target, tls) = (&target, tls.as_ref());
        async move {
            let mut backoff = Backoff::default();
            let mut cert = CertFailures::default();
            loop {
                let started = Instant::now();
                let setback = match agent.session(target, tls).await {
                    Ok(()) => Setback::link("the link ended"),
                    Err(End::Fatal(e)) => return Err(e),
                    Err(End::Retry(s)) => s,
                };
                if agent.stopping.get() {
                    return std::future::pending().await;
                }
                cert.note(&setback)?;
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Backoff::default();
                }
                let delay = delay_after(&setback, &mut backoff);
                if let SetbackKind::Busy(_) = setback.kind {
                    log::warn!("{}", setback.describe(delay));
                } else {
                    log::warn!("{}", setback.msg);
                    log::info!("reconnecting in {}s", crate::text::Tenths(delay));
                }
                Timer::after(delay).await;
            }
        }
    };
    // The link, until an upgrade is asked for: then the link is closed (the connecting loop is
    // dropped where it is), the steps are handed to the new program, and if it cannot be
    // executed the agent goes on with them and connects again.
    let main = async {
        loop {
            let requested = async {
                match &upgrade {
                    Some(u) => {
                        u.requests.next().await;
                        agent.until_transferable().await;
                        Ok(())
                    }
                    None => std::future::pending().await,
                }
            };
            smol::future::or(connect(), requested).await?;
            if let Some(u) = &upgrade {
                agent.upgrade(u).await;
            }
        }
    };
    let stop = async {
        shutdown.wait().await;
        agent.stopping.set(true);
        // Steps parked for a hand-over that will not happen now.
        for p in agent.parked.borrow_mut().drain(..) {
            p.child.kill_group(Signal::SIGKILL);
        }
        let running = agent.steps.borrow().len();
        if running > 0 {
            log::info!("stopping: killing {running} running step(s)");
        }
        agent.stop_all_steps();
        // Give the steps' tasks time to kill their groups and end.
        let deadline = Instant::now() + KILL_GRACE + Duration::from_secs(1);
        while !agent.steps.borrow().is_empty() && Instant::now() < deadline {
            Timer::after(Duration::from_millis(20)).await;
        }
        let link = agent.link.borrow().clone();
        if let Some(link) = link {
            let _ = timeout(CLOSE_TIMEOUT, async { link.writer.lock().await.close().await }).await;
        }
        log::info!("agent stopped");
        Ok(())
    };
    let orphans = async {
        reaper.run().await;
        Ok(())
    };
    smol::future::or(smol::future::or(stop, main), orphans).await
}

enum End {
    Fatal(AgentError),
    Retry(Setback),
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

/// The agent's controls over one step, shared by the step's task and the link.
struct StepCtl {
    /// Output bytes the controller lets us send.
    credit: Cell<u64>,
    /// Output below this offset is stored by the controller.
    stored: Cell<u64>,
    /// Output bytes read from the step so far (reported in `Running`).
    produced: Cell<u64>,
    /// The link generation this step sends on: the link that started or resumed it.
    generation: Cell<u64>,
    /// Set by `Resume`: send again from this offset.
    resume_at: Cell<Option<u64>>,
    /// The controller acknowledged the step's exit.
    exit_acked: Cell<bool>,
    cancelled: Cell<bool>,
    /// Stop at once and forget the step, reporting nothing (the controller gave it up, or the
    /// agent is terminating).
    abandoned: Cell<bool>,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
    /// An unpack step's input (`Put` frames go here).
    feed: RefCell<Option<jobs::Feed>>,
    /// A shell of this agent's own (not a pack, unpack or a container's step): one that can be
    /// handed over to another program.
    local: Cell<bool>,
    /// Park for a hand-over: the step's task ends, leaving its processes running.
    handover: Cell<bool>,
}

impl StepCtl {
    fn new(credit: u32, generation: u64) -> Self {
        let (wake_tx, wake_rx) = bounded(1);
        Self {
            credit: Cell::new(u64::from(credit)),
            stored: Cell::new(0),
            produced: Cell::new(0),
            generation: Cell::new(generation),
            resume_at: Cell::new(None),
            exit_acked: Cell::new(false),
            cancelled: Cell::new(false),
            abandoned: Cell::new(false),
            wake_tx,
            wake_rx,
            feed: RefCell::new(None),
            local: Cell::new(false),
            handover: Cell::new(false),
        }
    }
    fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }
}

/// The current link to the controller, as steps see it.
#[derive(Clone)]
struct Link {
    writer: Writer,
    generation: u64,
    /// Fails (its sender is dropped) when the link ends, so a send stuck on a dead link gives up.
    closed: Receiver<()>,
    /// Tells the session that a send failed, so it ends the link at once.
    broken: Sender<()>,
}

impl Link {
    /// A send on this link failed: end its session and wait until it is gone. Without the wait
    /// a step would retry the send at once, forever, and starve the task that reads the link.
    async fn failed(&self) {
        let _ = self.broken.try_send(());
        let _ = self.closed.recv().await;
    }
}

/// Send `frame` on `link`; false if the link ended first (the frame may or may not have gone).
async fn send_on(link: &Link, frame: &Frame<'_>) -> bool {
    smol::future::or(async { link.writer.lock().await.send(frame).await.is_ok() }, async {
        let _ = link.closed.recv().await;
        false
    })
    .await
}

/// Send `len` bytes of step output from `out` at `offset` on `link`, as [`send_on`].
async fn send_output_on(link: &Link, out: &mut OutputBuf, key: (u64, u32), offset: u64, len: usize) -> bool {
    smol::future::or(
        async { link.writer.lock().await.send_output(out, key.0, key.1, offset, len).await.is_ok() },
        async {
            let _ = link.closed.recv().await;
            false
        },
    )
    .await
}

struct Agent {
    cfg: Config,
    /// Where the step servers of sibling containers are.
    step_sockets: forward::StepSockets,
    ex: Rc<LocalExecutor<'static>>,
    reaper: Rc<Reaper>,
    steps: RefCell<HashMap<(u64, u32), Rc<StepCtl>>>,
    /// The live link, if any.
    link: RefCell<Option<Link>>,
    /// Counts links; a step sends only on the link of its generation.
    generation: Cell<u64>,
    /// Told to stop: no more reconnecting.
    stopping: Cell<bool>,
    /// Steps parked for a hand-over to another program.
    parked: RefCell<Vec<Parked>>,
}

/// What a step's task knew when it stopped short: a step parked for a hand-over, or one
/// adopted from the previous agent.
#[derive(Default)]
struct Progress {
    eof: bool,
    status: Option<ExitStatus>,
    reason: Option<ExitStatus>,
    term_at: Option<Instant>,
    killed: bool,
    message: String,
    fault: bool,
    logged_end: bool,
    reads: u64,
}

/// A step whose task has ended for a hand-over, its processes still running.
struct Parked {
    key: (u64, u32),
    child: StepChild,
    spool: Spool,
    deadline: Option<Instant>,
    cancelled: bool,
    progress: Progress,
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
    /// One connection: open, handshake, report held steps, serve until the link ends.
    async fn session(self: &Rc<Self>, target: &dial::Target, tls: Option<&dial::Tls>) -> Result<(), End> {
        let (mut reader, writer, dialled) = dial(target, &self.cfg.mode, &self.cfg.name, tls)
            .await
            .map_err(|e| End::Retry(classify_dial_error(&e)))?;
        let writer: Writer = Rc::new(Mutex::new(writer));
        let ping_ms = self.handshake(&mut reader, &writer).await?;
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        // Tell the controller which steps this agent still holds; it answers Resume or Abandon.
        let held: Vec<(u64, u32, u64)> = self
            .steps
            .borrow()
            .iter()
            .map(|(k, c)| (k.0, k.1, c.produced.get()))
            .take(MAX_REPORTED)
            .collect();
        let mut buf = vec![0u8; held.len() * 20];
        let steps = proto::encode_steps(held.iter().copied(), &mut buf)
            .map_err(|e| End::Retry(Setback::link(format!("listing held steps: {e}"))))?;
        match timeout(HANDSHAKE_TIMEOUT, async { writer.lock().await.send(&Frame::Running { steps }).await })
            .await
        {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(End::Retry(Setback::link(format!("handshake: {e}")))),
            None => {
                return Err(End::Retry(Setback::link(
                    "handshake: the controller did not take our step list in time",
                )))
            }
        }
        drop(buf);
        if held.is_empty() {
            log::info!("connected to {dialled} as node '{}'", self.cfg.name);
        } else {
            log::info!(
                "connected to {dialled} as node '{}'; {} step(s) to resume",
                self.cfg.name,
                held.len()
            );
        }
        drop(held);
        let (close_tx, closed) = bounded::<()>(1);
        let (broken, broken_rx) = bounded::<()>(1);
        *self.link.borrow_mut() = Some(Link { writer: writer.clone(), generation, closed, broken });
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
        let result =
            self.serve(&mut reader, &writer, generation, interval * DEAD_AFTER_PINGS, &broken_rx).await;
        drop(pinger);
        // Steps stop sending on this link (sends stuck on it give up) and keep spooling.
        *self.link.borrow_mut() = None;
        drop(close_tx);
        for (k, c) in self.steps.borrow().iter() {
            if c.generation.get() == generation && !c.abandoned.get() {
                log::info!("build {} step {}: link lost; output goes to the spool", k.0, k.1);
            }
            c.wake();
        }
        let _ = timeout(Duration::from_secs(2), async { writer.lock().await.close().await }).await;
        result
    }

    async fn handshake(&self, reader: &mut LinkReader, writer: &Writer) -> Result<u32, End> {
        let caps = proto::CAP_CONTAINER_STEPS | proto::CAP_AGENT_INFO | proto::CAP_ARCHIVE;
        let (mut hs, hello) =
            ClientHandshake::new(&self.cfg.name, &self.cfg.secret, auth::random_nonce(), caps);
        let send_err = |e: LinkError| End::Retry(Setback::link(format!("handshake: {e}")));
        writer.lock().await.send(&hello).await.map_err(send_err)?;
        loop {
            let frame = match timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
                None => {
                    return Err(End::Retry(Setback::link("handshake: the controller did not answer in time")))
                }
                // A refusal with a code this agent does not know yet (added to the protocol later):
                // all of those are for now, not for good.
                Some(Err(LinkError::Codec(CodecError::BadField("reject code")))) => {
                    return Err(End::Retry(Setback::busy(
                        "it refused with a reason this agent does not know",
                    )))
                }
                Some(Err(e)) => return Err(End::Retry(Setback::link(format!("handshake: {e}")))),
                Some(Ok(None)) => {
                    return Err(End::Retry(Setback::link("handshake: the controller closed the connection")))
                }
                Some(Ok(Some(f))) => f,
            };
            match hs.on_frame(&frame) {
                ClientStep::Send(f) => writer.lock().await.send(&f).await.map_err(send_err)?,
                ClientStep::Done { ping_interval_ms, .. } => {
                    let keys = hs.session_keys().expect("keys are known once the controller answered");
                    reader.authenticate(&keys.to_agent, keys.version);
                    writer.lock().await.authenticate(&keys.to_controller, keys.version);
                    return Ok(ping_interval_ms);
                }
                ClientStep::Rejected(code, m) if is_permanent(code) => {
                    return Err(End::Fatal(AgentError::Rejected(code, m)))
                }
                ClientStep::Rejected(code, m) => return Err(End::Retry(refusal(code, m))),
                ClientStep::Failed(m) => return Err(End::Fatal(AgentError::Untrusted(m))),
            }
        }
    }

    async fn serve(
        self: &Rc<Self>,
        reader: &mut LinkReader,
        writer: &Writer,
        generation: u64,
        dead_after: Duration,
        broken: &Receiver<()>,
    ) -> Result<(), End> {
        let mut watchdog = Watchdog::new(dead_after);
        loop {
            let next = async { Some(reader.next().await) };
            let failed = async {
                let _ = broken.recv().await;
                None
            };
            let frame = match watchdog.guard(smol::future::or(next, failed)).await {
                Some(None) => {
                    return Err(End::Retry(Setback::link(
                        "sending to the controller failed: the link is broken",
                    )))
                }
                Some(Some(r)) => Some(r),
                None => None,
            };
            let frame = match frame {
                None => {
                    return Err(End::Retry(Setback::link(format!(
                        "no word from the controller for {}s: the link is dead",
                        dead_after.as_secs()
                    ))))
                }
                Some(Err(e)) => {
                    return Err(End::Retry(Setback::link(format!("link to the controller failed: {e}"))))
                }
                Some(Ok(None)) => {
                    return Err(End::Retry(Setback::link("the controller closed the connection")))
                }
                Some(Ok(Some(f))) => f,
            };
            let step = |build: u64, step: u32| self.steps.borrow().get(&(build, step)).cloned();
            match frame {
                Frame::StepStart(s) => self.start_step(&s, generation),
                Frame::Credit { build, step: st, bytes, stored } => {
                    if let Some(c) = step(build, st) {
                        c.credit.set(c.credit.get().saturating_add(u64::from(bytes)));
                        c.stored.set(c.stored.get().max(stored));
                        c.wake();
                    }
                }
                Frame::Ack { build, step: st, offset } => {
                    if let Some(c) = step(build, st) {
                        c.stored.set(c.stored.get().max(offset));
                        c.exit_acked.set(true);
                        c.wake();
                    }
                }
                Frame::Resume { build, step: st, offset, credit } => match step(build, st) {
                    Some(c) => {
                        c.resume_at.set(Some(offset));
                        c.stored.set(c.stored.get().max(offset));
                        c.credit.set(u64::from(credit));
                        c.exit_acked.set(false);
                        c.generation.set(generation);
                        c.wake();
                        // An unpack step: tell the controller where to send its archive from.
                        let written = c.feed.borrow().as_ref().map(|f| f.written.get());
                        if let Some(offset) = written {
                            let taken = Frame::Taken { build, step: st, offset };
                            if timeout(dead_after, async { writer.lock().await.send(&taken).await })
                                .await
                                .is_none_or(|r| r.is_err())
                            {
                                return Err(End::Retry(Setback::link("could not resume an unstash")));
                            }
                        }
                    }
                    None => log::warn!("build {build} step {st}: resume for a step this agent does not hold"),
                },
                Frame::Abandon { build, step: st } => {
                    if let Some(c) = step(build, st) {
                        log::warn!(
                            "build {build} step {st}: the controller gave this step up while we were apart; \
                             killing its process group"
                        );
                        c.abandoned.set(true);
                        c.wake();
                    }
                }
                Frame::Cancel { build, step: st } => {
                    if let Some(c) = step(build, st) {
                        log::info!("build {build} step {st}: cancel requested");
                        c.cancelled.set(true);
                        c.wake();
                    }
                }
                Frame::Put { build, step: st, offset, data } => {
                    if let Some(c) = step(build, st) {
                        let r = c.feed.borrow_mut().as_mut().map(|f| f.put(offset, data));
                        if let Some(Err(m)) = r {
                            log::warn!("build {build} step {st}: {m}; stopping the unstash");
                            if let Some(f) = c.feed.borrow_mut().as_mut() {
                                f.close();
                            }
                            c.cancelled.set(true);
                            c.wake();
                        }
                    }
                }
                Frame::Pong { .. } => {}
                Frame::InfoRequest => {
                    let info = Frame::AgentInfo {
                        version: env!("WISP_VERSION"),
                        arch: std::env::consts::ARCH,
                        os: std::env::consts::OS,
                    };
                    if timeout(dead_after, async { writer.lock().await.send(&info).await })
                        .await
                        .is_none_or(|r| r.is_err())
                    {
                        return Err(End::Retry(Setback::link(
                            "could not tell the controller what this agent is",
                        )));
                    }
                }
                Frame::Ping { id } => {
                    if timeout(dead_after, async { writer.lock().await.send(&Frame::Pong { id }).await })
                        .await
                        .is_none_or(|r| r.is_err())
                    {
                        return Err(End::Retry(Setback::link(
                            "could not answer the controller's ping: the link is dead",
                        )));
                    }
                }
                Frame::Reject { code, message } => {
                    return Err(End::Retry(match refusal(code, message.to_string()) {
                        s if matches!(s.kind, SetbackKind::Busy(_)) => s,
                        _ => Setback::link(format!("the controller closed the session: {message}")),
                    }))
                }
                other => {
                    return Err(End::Retry(Setback::link(format!(
                        "protocol error: unexpected {} frame from the controller",
                        auth::frame_kind(&other)
                    ))))
                }
            }
        }
    }

    /// Kill every step and forget it (the agent is terminating).
    fn stop_all_steps(&self) {
        for ctl in self.steps.borrow().values() {
            ctl.abandoned.set(true);
            ctl.wake();
        }
    }

    /// The live link, if it is the one of `generation`.
    fn link_for(&self, generation: u64) -> Option<Link> {
        self.link.borrow().as_ref().filter(|l| l.generation == generation).cloned()
    }

    fn start_step(self: &Rc<Self>, s: &StepStart<'_>, generation: u64) {
        let key = (s.build, s.step);
        if self.steps.borrow().contains_key(&key) {
            log::warn!("build {} step {}: already running, duplicate start ignored", s.build, s.step);
            return;
        }
        let inside =
            if s.container.is_empty() { String::new() } else { format!(" in container '{}'", s.container) };
        log::info!(
            "build {} step {}: starting `{} -c ...` in workspace {}{inside}",
            s.build,
            s.step,
            s.shell,
            s.workspace
        );
        let spool_dir = self.cfg.work_dir.join(".wisp").join("spool").join(format!("{}-{}", s.build, s.step));
        let started = Spool::create(spool_dir.clone(), self.cfg.spool_cap)
            .map_err(|e| format!("cannot create the output spool {}: {e}", spool_dir.display()))
            .and_then(|spool| Ok((spool, self.workspace_dir(s)?)))
            .and_then(|(spool, dir)| {
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
                let env = extra.into_iter().chain(s.env.iter());
                let mut feed = None;
                let mut local = false;
                let child = if s.shell == proto::PACK_SHELL {
                    StepChild::Job(jobs::start_pack(&dir, s.script)?)
                } else if s.shell == proto::UNPACK_SHELL {
                    let (job, f, rx, writer) = jobs::start_unpack(&dir)?;
                    feed = Some((f, rx, writer));
                    StepChild::Job(job)
                } else if s.container.is_empty() {
                    let child = process::spawn_shell(s.shell, s.script, &dir, env)?;
                    local = true;
                    let exited = self.reaper.watch(&self.ex, child.pid);
                    StepChild::Local(child, exited)
                } else {
                    StepChild::Remote(forward::Remote::start(&self.ex, &self.step_sockets, s, &dir, env)?)
                };
                Ok((spool, child, feed, local))
            });
        match started {
            Err(msg) => {
                log::warn!("build {} step {}: {msg}", s.build, s.step);
                let Some(link) = self.link_for(generation) else { return };
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
                        send_on(&link, &exit).await;
                    })
                    .detach();
            }
            Ok((spool, child, feed, local)) => {
                let ctl = Rc::new(StepCtl::new(s.credit, generation));
                ctl.local.set(local);
                self.steps.borrow_mut().insert(key, ctl.clone());
                if let Some((f, rx, writer)) = feed {
                    let written = f.written.clone();
                    *ctl.feed.borrow_mut() = Some(f);
                    self.ex
                        .spawn(feed_unpacker(self.clone(), key, ctl.clone(), rx, writer, written))
                        .detach();
                }
                let deadline = (s.timeout_secs > 0)
                    .then(|| Instant::now() + Duration::from_secs(u64::from(s.timeout_secs)));
                self.spawn_step(key, ctl, child, deadline, spool, Progress::default());
            }
        }
    }

    /// Run a step's task; a step parked for a hand-over goes to `parked`.
    fn spawn_step(
        self: &Rc<Self>,
        key: (u64, u32),
        ctl: Rc<StepCtl>,
        child: StepChild,
        deadline: Option<Instant>,
        spool: Spool,
        progress: Progress,
    ) {
        let agent = self.clone();
        self.ex
            .spawn(async move {
                let parked = run_step(key, child, &ctl, deadline, &agent, spool, progress).await;
                agent.parked.borrow_mut().extend(parked);
                agent.steps.borrow_mut().remove(&key);
            })
            .detach();
    }

    /// Take a parked step back (its hand-over did not happen) or an adopted one: it reports
    /// itself at the next connect and the controller resumes it.
    fn adopt(self: &Rc<Self>, p: Parked) {
        let ctl = Rc::new(StepCtl::new(0, 0));
        ctl.local.set(true);
        ctl.stored.set(p.spool.acked());
        ctl.produced.set(p.spool.produced());
        ctl.cancelled.set(p.cancelled);
        self.steps.borrow_mut().insert(p.key, ctl.clone());
        self.spawn_step(p.key, ctl, p.child, p.deadline, p.spool, p.progress);
    }

    /// Adopt a step the previous agent handed over.
    fn adopt_handed_over(self: &Rc<Self>, s: handover::StepState) {
        use std::os::fd::FromRawFd;
        let (build, step) = (s.build, s.step);
        let now = Instant::now();
        // SAFETY: the previous agent handed this descriptor over, and the state was checked to
        // name each descriptor once; `fd_is_pipe` checks it is open and a pipe first.
        let child = fd_is_pipe(s.fd)
            .and_then(|()| process::adopt_child(s.pid, unsafe { std::os::fd::OwnedFd::from_raw_fd(s.fd) }))
            .map_err(|e| format!("its output pipe (descriptor {}): {e}", s.fd))
            .and_then(|child| {
                let spool = Spool::adopt(s.spool_dir.clone(), self.cfg.spool_cap, s.spool)
                    .map_err(|e| format!("its spool {}: {e}", s.spool_dir.display()))?;
                Ok((child, spool))
            });
        let (child, spool) = match child {
            Ok(c) => c,
            Err(m) => {
                // Its output cannot be delivered: the controller hears it is gone at the connect.
                log::error!(
                    "build {build} step {step}: cannot adopt it from the previous agent: {m}; killing it"
                );
                process::kill_group(s.pid, Signal::SIGKILL);
                return;
            }
        };
        // An end the previous agent already knew of must not be waited for again (the pid may
        // be reused); otherwise its exit comes as any step's, even if it ended meanwhile.
        let exited = if s.status.is_some() { bounded(1).1 } else { self.reaper.watch(&self.ex, s.pid) };
        log::info!(
            "build {build} step {step}: adopted from the previous agent (pid {}, {} output bytes, {} not yet \
             stored)",
            s.pid,
            spool.produced(),
            spool.pending()
        );
        self.adopt(Parked {
            key: (build, step),
            child: StepChild::Local(child, exited),
            spool,
            deadline: s.deadline_ms.map(|ms| now + Duration::from_millis(ms)),
            cancelled: s.cancelled,
            progress: Progress {
                eof: s.eof,
                status: s.status,
                reason: s.reason,
                term_at: s.term_ms.map(|ms| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)),
                killed: s.killed,
                message: s.message,
                fault: s.fault,
                logged_end: s.logged_end,
                reads: s.reads,
            },
        });
    }

    /// Wait until every step can be handed over (packs, unpacks and steps in other containers
    /// run inside this process or through its sockets: they are waited for).
    async fn until_transferable(&self) {
        let mut said = false;
        loop {
            let n = self.steps.borrow().values().filter(|c| !c.local.get()).count();
            if n == 0 {
                return;
            }
            if !said {
                log::warn!(
                    "SIGHUP: {n} archive or container step(s) cannot be handed over to another program; \
                     upgrading once they have ended"
                );
                said = true;
            }
            Timer::after(Duration::from_millis(100)).await;
        }
    }

    /// Upgrade in place: close the link, park every step, flush their spools and execute the new
    /// binary with the hand-over state. Returns only if that fails; the steps then go on here.
    async fn upgrade(self: &Rc<Self>, u: &Upgrade) {
        let Some(exe) = &u.exe else {
            log::error!(
                "SIGHUP: cannot upgrade in place: the path of this agent's binary was not known at start \
                 (no /proc/self/exe); restart the agent instead"
            );
            return;
        };
        log::info!("SIGHUP: upgrading in place: exec {}", exe.display());
        // The connecting loop is gone (its session with it); the link is closed cleanly.
        let link = self.link.borrow_mut().take();
        if let Some(link) = link {
            let _ = timeout(CLOSE_TIMEOUT, async { link.writer.lock().await.close().await }).await;
        }
        for c in self.steps.borrow().values() {
            c.handover.set(true);
            c.wake();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.steps.borrow().is_empty() && Instant::now() < deadline {
            Timer::after(Duration::from_millis(5)).await;
        }
        let error = if self.stopping.get() {
            return;
        } else if !self.steps.borrow().is_empty() {
            "a step did not stop for the hand-over within 10s".to_string()
        } else {
            // No await from here to the exec: nothing else runs, so no exit is collected unseen.
            self.exec(u, exe)
        };
        let parked: Vec<Parked> = self.parked.borrow_mut().drain(..).collect();
        log::error!(
            "SIGHUP: could not upgrade in place: {error}; this agent goes on with its {} running step(s)",
            parked.len() + self.steps.borrow().len()
        );
        for c in self.steps.borrow().values() {
            c.handover.set(false);
        }
        for p in parked {
            self.adopt(p);
        }
    }

    /// Hand the parked steps over and execute the new binary; returns why that failed.
    fn exec(&self, u: &Upgrade, exe: &Path) -> String {
        use std::os::fd::AsRawFd;
        let mut parked = self.parked.borrow_mut();
        let mut steps = Vec::new();
        let mut fds = Vec::new();
        for p in parked.iter_mut() {
            let StepChild::Local(child, exited) = &p.child else {
                return format!("build {} step {} cannot be handed over", p.key.0, p.key.1);
            };
            if let Err(e) = p.spool.flush() {
                return format!(
                    "build {} step {}: cannot write its spool to disk in {}: {e}",
                    p.key.0,
                    p.key.1,
                    p.spool.dir().display()
                );
            }
            // An exit collected while the link was closing, not yet seen by the step's task.
            if p.progress.status.is_none() {
                if let Ok(st) = exited.try_recv() {
                    p.progress.status = Some(exit_status(st));
                }
            }
            let now = Instant::now();
            let pr = &p.progress;
            fds.push(child.output.as_raw_fd());
            steps.push(handover::StepState {
                build: p.key.0,
                step: p.key.1,
                pid: child.pid,
                fd: child.output.as_raw_fd(),
                spool_dir: p.spool.dir().to_path_buf(),
                spool: [p.spool.acked(), p.spool.produced(), p.spool.spilled(), p.spool.peak()],
                eof: pr.eof,
                status: pr.status,
                reason: pr.reason,
                cancelled: p.cancelled,
                deadline_ms: p.deadline.map(|d| d.saturating_duration_since(now).as_millis() as u64),
                term_ms: pr.term_at.map(|t| now.duration_since(t).as_millis() as u64),
                killed: pr.killed,
                fault: pr.fault,
                logged_end: pr.logged_end,
                reads: pr.reads,
                message: pr.message.clone(),
            });
        }
        let state = handover::State {
            agent_version: env!("WISP_VERSION").to_string(),
            name: self.cfg.name.clone(),
            secret: self.cfg.secret.clone(),
            steps,
        };
        match handover::exec(exe, &u.argv, &state, &fds) {
            Ok(never) => match never {},
            Err(e) => e,
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
        // A symlink an earlier step left in the workspace must not lead out of it: no component
        // below the work dir may be one (checked before anything is created).
        let mut dir = self.cfg.work_dir.join("workspace");
        for part in Path::new(s.workspace).components().chain(Path::new(s.dir).components()) {
            dir.push(part);
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(format!(
                    "refused workspace path {:?}: a symlink leads out of the workspace",
                    s.dir
                ));
            }
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create workspace {}: {e}", dir.display()))?;
        Ok(dir)
    }
}

/// Write an unpack step's archive, as `Put` frames bring it, into its unpacker's pipe, and tell
/// the controller how far it got (`Taken`: at the start, every [`jobs::TAKEN_EVERY`] bytes, and
/// at the end; after a resume the link's handler tells it again).
async fn feed_unpacker(
    agent: Rc<Agent>,
    (build, step): (u64, u32),
    ctl: Rc<StepCtl>,
    rx: Receiver<bytes::Bytes>,
    mut writer: smol::Async<std::fs::File>,
    written: Rc<Cell<u64>>,
) {
    use smol::io::AsyncWriteExt;
    let tell = |offset: u64| {
        let link = agent.link_for(ctl.generation.get());
        async move {
            if let Some(link) = link {
                send_on(&link, &Frame::Taken { build, step, offset }).await;
            }
        }
    };
    tell(0).await;
    let mut told = 0u64;
    while let Ok(chunk) = rx.recv().await {
        if writer.write_all(&chunk).await.is_err() {
            // The unpacker stopped (its exit says why).
            break;
        }
        written.set(written.get() + chunk.len() as u64);
        if written.get() - told >= jobs::TAKEN_EVERY {
            told = written.get();
            tell(told).await;
        }
    }
    drop(writer);
    tell(written.get()).await;
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

/// The agent failed a running step (its output cannot be spooled, read or replayed): kill its
/// group and say why in the step's `Exit`. The exit status stays what the step's shell ends with
/// (SIGKILL, if it was still running): the step did start, so this is not `StartFailed`.
fn fail(child: &StepChild, (build, step): (u64, u32), fault: &mut bool, what: String, message: &mut String) {
    log::error!("build {build} step {step}: {what}; killing the step");
    child.kill_group(Signal::SIGKILL);
    if !*fault {
        *message = format!("the agent stopped the step: {what}");
        *fault = true;
    }
}

/// A shell's end as the protocol says it.
fn exit_status(st: WaitStatus) -> ExitStatus {
    match st {
        WaitStatus::Exited(_, code) => ExitStatus::Code(code),
        WaitStatus::Signaled(_, sig, _) => ExitStatus::Signal(sig as i32),
        _ => ExitStatus::Code(-1),
    }
}

/// Whether `fd` is an open pipe (a handed-over step's output).
fn fd_is_pipe(fd: i32) -> std::io::Result<()> {
    // SAFETY: fstat only fills `st`; a descriptor that is not open makes it fail with EBADF.
    let mut st: nix::libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { nix::libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFIFO {
        return Err(std::io::Error::other("not a pipe"));
    }
    Ok(())
}

/// A step's processes as [`run_step`] drives them.
enum StepChild {
    /// A shell this agent started: its pipe, and its exit as the reaper learns it.
    Local(process::Child, Receiver<WaitStatus>),
    /// A shell the step server of a sibling container started.
    Remote(forward::Remote),
    /// A pack or unpack the agent runs itself.
    Job(jobs::Job),
}

impl StepChild {
    /// Read output (0 at its end); cancel-safe.
    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Local(child, _) => {
                let mut pipe = &child.output;
                pipe.read(buf).await
            }
            Self::Remote(r) => r.read(buf).await,
            Self::Job(j) => {
                let mut pipe = &j.output;
                pipe.read(buf).await
            }
        }
    }

    /// Signal the step's whole process group.
    fn kill_group(&self, sig: Signal) {
        match self {
            Self::Local(child, _) => process::kill_group(child.pid, sig),
            Self::Remote(r) => r.kill_group(sig),
            Self::Job(j) => j.stop(),
        }
    }

    /// How the shell ended, with what to say about it when there is something. Delivered once;
    /// a second wait never completes.
    async fn exited(&self) -> (ExitStatus, String) {
        let got = match self {
            Self::Local(_, rx) => rx.recv().await.ok().map(|st| (exit_status(st), String::new())),
            Self::Remote(r) => r.ended().recv().await.ok(),
            Self::Job(j) => j.ended().await,
        };
        match got {
            Some(end) => end,
            None => std::future::pending().await,
        }
    }

    /// The step is over and delivered: let its processes go.
    fn release(self) {
        if let Self::Remote(r) = self {
            r.release();
        }
    }
}

enum Ev {
    Read(std::io::Result<usize>),
    Exited((ExitStatus, String)),
    Wake,
    Timer,
}

/// Run one step to its end: read its output into the spool, send it within credit while a link
/// of the step's generation is up, replay from the spool after a resume, deliver the exit and
/// wait for the controller to acknowledge it. Returns when the step is acknowledged or abandoned.
async fn run_step(
    key: (u64, u32),
    child: StepChild,
    ctl: &StepCtl,
    deadline: Option<Instant>,
    agent: &Agent,
    mut spool: Spool,
    progress: Progress,
) -> Option<Parked> {
    let (build, step) = key;
    let mut out = OutputBuf::default();
    let mut sent = 0u64; // output sent on the current link (what the controller will have)
    let Progress {
        mut eof,
        mut status,
        mut reason,  // TimedOut or Cancelled
        mut term_at, // when TERM was sent to the group
        mut killed,
        mut message, // for the Exit: what went wrong on the agent's side
        mut fault,   // the agent failed the step after it had started (see `fail`)
        mut logged_end,
        mut reads, // pipe reads that brought output
    } = progress;
    let mut exit_sent_on = 0u64; // the link generation the Exit went out on
    let mut drain_since: Option<Instant> = None;
    loop {
        if ctl.abandoned.get() {
            child.kill_group(Signal::SIGKILL);
            log::info!("build {build} step {step}: abandoned; process group killed, output dropped");
            return None;
        }
        // A hand-over: what was read is in the spool, the rest waits in the pipe.
        if ctl.handover.get() && matches!(child, StepChild::Local(..)) {
            let progress =
                Progress { eof, status, reason, term_at, killed, message, fault, logged_end, reads };
            return Some(Parked { key, child, spool, deadline, cancelled: ctl.cancelled.get(), progress });
        }
        if let Some(off) = ctl.resume_at.take() {
            if off < spool.acked() || off > spool.produced() {
                // Cannot happen unless the controller lost stored output; say so and end the step.
                let what = format!(
                    "the controller has {off} output bytes but the agent holds bytes {}..{}; output lost",
                    spool.acked(),
                    spool.produced()
                );
                fail(&child, key, &mut fault, what, &mut message);
                eof = true;
                spool.release(spool.produced());
                sent = spool.produced();
            } else {
                log::info!(
                    "build {build} step {step}: resuming at offset {off}: {} bytes to replay from the spool",
                    spool.produced() - off
                );
                sent = off;
                spool.release(off);
            }
            exit_sent_on = 0;
        }
        spool.release(ctl.stored.get().min(sent));
        if ctl.exit_acked.get() && exit_sent_on != 0 {
            log::info!(
                "build {build} step {step}: done; {} output bytes in {reads} reads; spool peak {} bytes, {} bytes \
                 of it written to disk",
                spool.produced(),
                spool.peak(),
                spool.spilled()
            );
            child.release();
            return None;
        }
        if reason.is_none() && ctl.cancelled.get() {
            reason = Some(ExitStatus::Cancelled);
        }
        if reason.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            log::info!("build {build} step {step}: timed out");
            reason = Some(ExitStatus::TimedOut);
        }
        // Stop the group when the step was cancelled or timed out, and clear out leftover
        // background processes once the shell itself has exited.
        if (reason.is_some() || status.is_some()) && term_at.is_none() {
            child.kill_group(Signal::SIGTERM);
            term_at = Some(Instant::now());
        }
        let link = agent.link_for(ctl.generation.get());
        // How much of the pipe to read now: while connected only within credit, caught up with
        // the spool; while apart, until the spool is full (then the step blocks on its write,
        // nothing is lost).
        let limit = match &link {
            Some(_) if sent == spool.produced() => ctl.credit.get().min(MAX_OUTPUT_CHUNK as u64) as usize,
            Some(_) => 0,
            None if spool.full() => 0,
            None => MAX_OUTPUT_CHUNK,
        };
        // Since when the pipe could have been read all along (credit on the link, or room in the
        // spool while apart) without bringing anything: only that long a silence after the KILL
        // says a process outside the group holds the pipe open. Output left in the pipe while the
        // agent could not read it (the link starved of credit, then lost) is not such a silence.
        if limit == 0 {
            drain_since = None;
        } else if drain_since.is_none() {
            drain_since = Some(Instant::now());
        }
        if let Some(t) = term_at {
            if !killed && t.elapsed() >= KILL_GRACE {
                child.kill_group(Signal::SIGKILL);
                killed = true;
            } else if killed
                && !eof
                && status.is_some()
                && drain_since.is_some_and(|d| d.elapsed() >= KILL_GRACE * 2)
                && t.elapsed() >= KILL_GRACE * 2
            {
                // A process that left the group holds the pipe open; stop waiting for it.
                log::warn!("build {build} step {step}: output pipe still open after KILL, not waiting");
                eof = true;
            }
        }
        if let Some(link) = &link {
            let credit = ctl.credit.get().min(MAX_OUTPUT_CHUNK as u64) as usize;
            if sent < spool.produced() && credit > 0 {
                match spool.read_at(sent, &mut out.space()[..credit]) {
                    Ok(n) => {
                        if send_output_on(link, &mut out, key, sent, n).await {
                            sent += n as u64;
                            ctl.credit.set(ctl.credit.get() - n as u64);
                        } else {
                            link.failed().await;
                        }
                    }
                    Err(e) => {
                        let what = format!("reading the output spool: {e}");
                        fail(&child, key, &mut fault, what, &mut message);
                        eof = true;
                        sent = spool.produced();
                    }
                }
                continue;
            }
            if eof && status.is_some() && sent == spool.produced() && exit_sent_on != link.generation {
                let st = match reason.or(status).unwrap_or(ExitStatus::Code(-1)) {
                    // The step itself succeeded, but the agent lost part of its output: that must
                    // not pass as a success. (Killed by the agent, it ends with SIGKILL.)
                    ExitStatus::Code(0) if fault => ExitStatus::Code(-1),
                    st => st,
                };
                if !logged_end {
                    log::info!("build {build} step {step}: {st}");
                    logged_end = true;
                }
                let exit = Frame::Exit { build, step, status: st, offset: sent, message: clip(&message) };
                if send_on(link, &exit).await {
                    exit_sent_on = link.generation;
                } else {
                    link.failed().await;
                }
                continue;
            }
        }
        let next_timer = match (term_at, deadline, reason) {
            (Some(_), _, _) if eof || (killed && ctl.credit.get() == 0 && link.is_some()) => None,
            (Some(t), _, _) if killed => drain_since.map(|d| (d + KILL_GRACE * 2).max(t + KILL_GRACE * 2)),
            (Some(t), _, _) => Some(t + KILL_GRACE),
            (None, Some(d), None) => Some(d),
            _ => None,
        };
        let read = async {
            if eof || limit == 0 {
                std::future::pending().await
            }
            Ev::Read(child.read(&mut out.space()[..limit]).await)
        };
        let exit = async {
            if status.is_some() {
                std::future::pending().await
            }
            Ev::Exited(child.exited().await)
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
                drain_since = Some(Instant::now());
                reads += 1;
                let at = spool.produced();
                if let Err(e) = spool.append(&out.space()[..n]) {
                    let what = format!("cannot write the output spool in {}: {e}", spool.dir().display());
                    fail(&child, key, &mut fault, what, &mut message);
                    eof = true;
                    continue;
                }
                ctl.produced.set(spool.produced());
                if let Some(link) = &link {
                    if at == sent {
                        if send_output_on(link, &mut out, key, at, n).await {
                            sent += n as u64;
                            ctl.credit.set(ctl.credit.get().saturating_sub(n as u64));
                        } else {
                            link.failed().await;
                        }
                    }
                }
            }
            Ev::Read(Err(e)) => {
                // Nobody would read the pipe any more, so the step would block on its next write.
                fail(&child, key, &mut fault, format!("reading the step's output failed: {e}"), &mut message);
                eof = true;
            }
            Ev::Exited((st, why)) => {
                status = Some(st);
                // What the agent knows of a forwarded step's end (it could not start there, or
                // its step server went away), unless the agent has already said why it stopped it.
                if !why.is_empty() && !fault {
                    message = why;
                }
            }
            Ev::Wake | Ev::Timer => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_identities_parse_in_wisp_and_jenkins_forms() {
        // A P-256 key as `openssl x509 -pubkey` prints it (the body of its PEM is Jenkins' form),
        // and its fingerprint from `openssl pkey -pubin -outform DER | sha256sum`.
        let jenkins = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEjMgDxZBkqaDYZIDwDQBBV2R+y0Qk\
                       /cYrT0xfW0xnxUZ/W4RULc7yn24Op2/bfaOQmnIULgBdmI61Xfk4rkK8+Q==";
        let wisp = "sha256:a33efe75eb72437789fb551072d6ff1e40fbf837e927926bfe64af4a6c2f8e4a";
        let fp = parse_instance_identity(wisp).unwrap();
        assert_eq!(parse_instance_identity(jenkins).unwrap(), fp);
        assert_eq!(parse_instance_identity(&jenkins.replace('=', "")).unwrap(), fp);
        assert_eq!(parse_instance_identity(&wisp["sha256:".len()..]).unwrap(), fp);
        for bad in ["sha256:zz", "abcd", "not base64!", "QUJD", ""] {
            assert!(parse_instance_identity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_for_good_and_for_now() {
        for code in [RejectCode::UnknownNode, RejectCode::WrongSecret, RejectCode::UnsupportedVersion] {
            assert!(is_permanent(code));
        }
        for code in [RejectCode::AlreadyConnected, RejectCode::ProtocolError, RejectCode::TryLater] {
            assert!(!is_permanent(code));
        }
        let lockout = refusal(
            RejectCode::ProtocolError,
            "too many failed handshakes from 127.0.0.1; try again in 60s".into(),
        );
        assert_eq!(lockout.kind, SetbackKind::Busy(Some(Duration::from_secs(60))));
        let d = delay_after(&lockout, &mut Backoff::default());
        assert!(d >= Duration::from_secs(60));
        assert!(lockout.describe(d).starts_with("the controller is overloaded / refusing for now (too many"));
        assert_eq!(refusal(RejectCode::TryLater, "busy".into()).kind, SetbackKind::Busy(None));
        assert_eq!(refusal(RejectCode::ProtocolError, "bad frame".into()).kind, SetbackKind::Link);
        assert_eq!(refusal(RejectCode::AlreadyConnected, "stop it".into()).kind, SetbackKind::Link);
        assert_eq!(retry_hint("try again in 9999s"), Some(MAX_RETRY_HINT));
        assert_eq!(retry_hint("try again in a while"), None);
    }

    #[test]
    fn dial_errors_are_told_apart() {
        let cert = DialError::CertificateUntrusted { addr: "h:1".into(), reason: "UnknownIssuer".into() };
        assert_eq!(classify_dial_error(&cert).kind, SetbackKind::Certificate);
        // A controller that closes connections in the TLS handshake is busy, not untrusted.
        let s = classify_dial_error(&DialError::HandshakeCut { addr: "h:1".into() });
        assert_eq!(s.kind, SetbackKind::Busy(None));
        assert!(!s.describe(Duration::from_secs(1)).contains("certificate"), "{}", s.msg);
        let busy = DialError::Http { message: "h:1 answered HTTP 503".into(), status: Some(503) };
        assert_eq!(classify_dial_error(&busy).kind, SetbackKind::Busy(None));
        let refused = DialError::Unreachable {
            addr: "h:1".into(),
            error: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(classify_dial_error(&refused).kind, SetbackKind::Link);
    }

    #[test]
    fn certificate_failures_end_the_agent_only_in_a_row() {
        let cert = || Setback { msg: "invalid peer certificate".into(), kind: SetbackKind::Certificate };
        let mut c = CertFailures::default();
        for _ in 1..MAX_CERT_FAILURES {
            c.note(&cert()).unwrap();
        }
        c.note(&Setback::link("connection refused")).unwrap();
        for _ in 1..MAX_CERT_FAILURES {
            c.note(&cert()).unwrap();
        }
        let e = c.note(&cert()).unwrap_err();
        assert_eq!(e.exit_code(), 8);
        assert!(e.to_string().contains("5 tries"), "{e}");
    }

    #[test]
    fn a_stopper_stops_and_dropping_it_does_not() {
        let (stopper, mut shutdown) = Shutdown::stopper();
        let waited = smol::future::block_on(timeout(Duration::from_millis(50), shutdown.wait()));
        assert!(waited.is_none());
        std::thread::spawn(move || stopper.stop()).join().unwrap();
        smol::future::block_on(shutdown.wait());
        smol::future::block_on(shutdown.wait()); // again: at once
        let (stopper, mut shutdown) = Shutdown::stopper();
        drop(stopper);
        assert!(smol::future::block_on(timeout(Duration::from_millis(50), shutdown.wait())).is_none());
    }
}
