//! `wisp-agent step-server` and `wisp-agent install`: running the agent's steps in a sibling
//! container of its pod without the Kubernetes exec API.
//!
//! An init container copies the static agent into a volume the pod's containers share
//! (`wisp-agent install /wisp/wisp-agent`); each sibling container starts
//! `/wisp/wisp-agent step-server --socket /wisp/NAME.sock [-- CMD ARGS...]`, and the agent in the
//! `jnlp` container forwards each step whose `StepStart` names container NAME to that socket
//! ([`super::forward`]). The step server starts the step's shell exactly as the agent starts a
//! local one ([`process::spawn_shell`]: its own process group, stdin empty, stdout and stderr one
//! pipe, the agent's secret variables removed) and hands the agent the pipe's bytes, the shell's
//! wait status and `killpg`: timeout, cancel, the spool and the link to the controller stay the
//! agent's, so a forwarded step behaves as a local one.
//!
//! One connection per step, over the agent's codec on a Unix socket (length-prefixed frames of at
//! most `MAX_FRAME` bytes, untagged: whoever can open the socket file can run commands here
//! anyway), every frame checked against the one step it is about:
//!
//! | agent → server | server → agent |
//! |---|---|
//! | `Hello` (versions, container name) | `Hello` (versions, container name), or `Reject` |
//! | `StepStart` (absolute `dir`, the full environment, initial credit) | |
//! | | `Output`: the pipe's bytes in order, within credit; empty `data` = end of the output |
//! | | `Exit`: the shell's status (`Code`/`Signal`), or `StartFailed` with why, then close |
//! | `Credit{bytes}`: more output may be sent | |
//! | `Cancel`: SIGTERM to the step's group; `Abandon`: SIGKILL to it | |
//! | `Ack`: the agent has what it needs; close and leave the group alone | |
//! | | `Reject`: the server stopped the step (why) |
//!
//! When the connection ends without `Ack` (the agent gave the step up, was stopped or died),
//! the step's process group is killed. Served until SIGTERM, or, with a command after `--`, as long
//! as that command runs (SIGTERM and SIGINT are passed on to it; the server exits with its code).
//! As PID 1 it reaps the orphans the kernel hands it.

use super::process::{self, Reaper, TermSignals};
use crate::auth::frame_kind;
use crate::link::{self, LinkWriter, OutputBuf};
use crate::proto::{self, ExitStatus, Frame, RejectCode, MAX_MESSAGE, MAX_OUTPUT_CHUNK, NONCE_LEN};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use smol::channel::{bounded, Receiver};
use smol::io::AsyncReadExt;
use smol::net::unix::{UnixListener, UnixStream};
use smol::{LocalExecutor, Timer};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::Duration;

/// Connections served at once; more are closed as they come (each holds about 100 KiB of
/// buffers, and a pod runs a handful of steps at a time).
const MAX_CONNECTIONS: usize = 128;
/// How long an `accept` that failed (out of file descriptors) waits before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Most output credit the agent may hold out at once (far above its window).
const MAX_CREDIT: u64 = 16 << 20;

/// What `wisp-agent step-server` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The socket to create (`--socket`), e.g. `/wisp/build.sock`.
    pub socket: PathBuf,
    /// The container's own command, run as a child (after `--`); empty for none.
    pub command: Vec<String>,
}

/// The usage text of `wisp-agent step-server`.
pub const USAGE: &str = "\
Usage: wisp-agent step-server --socket PATH [-- CMD [ARGS...]]

Runs the steps the wisp agent of this pod forwards to this container (a step's `container:`),
on a Unix socket in a volume the pod's containers share: /wisp/NAME.sock for container NAME.
With a command after `--`, starts it too (the container's own command is kept), passes SIGTERM
and SIGINT on to it and exits with its exit code when it ends; without one, serves until SIGTERM.

Options:
  --socket PATH   the socket to create (its directory must exist)
  --help          this text";

/// The usage text of `wisp-agent install`.
pub const INSTALL_USAGE: &str = "\
Usage: wisp-agent install DEST

Copies this wisp-agent binary to DEST (a file, or a directory to put `wisp-agent` in), mode 0755,
through a temporary file in the same directory, so a half-written binary is never run: what an
init container does to share the agent with the pod's other containers.";

/// Parse the arguments after `step-server`. `Ok(None)` asks for the usage text.
pub fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut socket = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => return Ok(None),
            "--socket" => {
                let v = it.next().ok_or("--socket needs a path, e.g. --socket /wisp/build.sock")?;
                socket = Some(PathBuf::from(v));
            }
            "--" => {
                let command: Vec<String> = it.cloned().collect();
                if command.is_empty() {
                    return Err("nothing after `--`: give the command to keep, or leave `--` out".into());
                }
                let socket = socket.ok_or("no socket: give --socket PATH, e.g. /wisp/build.sock")?;
                return Ok(Some(Options { socket, command }));
            }
            other => match other.strip_prefix("--socket=") {
                Some(v) => socket = Some(PathBuf::from(v)),
                None => {
                    return Err(format!(
                        "unexpected argument {other:?}: the container's command goes after `--`, as in \
                         `step-server --socket /wisp/build.sock -- sleep infinity`"
                    ))
                }
            },
        }
    }
    let socket = socket.ok_or("no socket: give --socket PATH, e.g. /wisp/build.sock")?;
    Ok(Some(Options { socket, command: Vec::new() }))
}

/// Copy the running binary (`/proc/self/exe`) to `dest`, or into it when it is a directory, with
/// mode 0755: written to a temporary name in the same directory and renamed into place. Returns
/// the path written.
pub fn install(dest: &Path) -> Result<PathBuf, String> {
    let dest = if dest.is_dir() { dest.join("wisp-agent") } else { dest.to_path_buf() };
    let name = dest
        .file_name()
        .ok_or_else(|| format!("{} names no file to write", dest.display()))?
        .to_string_lossy()
        .into_owned();
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut src = std::fs::File::open("/proc/self/exe").map_err(|e| {
        format!("cannot read this program's own binary at /proc/self/exe ({e}): is /proc mounted?")
    })?;
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o755).open(&tmp)?;
        io::copy(&mut src, &mut out)?;
        // The mode asked for at creation is reduced by the umask.
        out.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        out.sync_all()?;
        std::fs::rename(&tmp, &dest)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!(
            "cannot install wisp-agent as {} ({e}): is {} a mounted, writable volume?",
            dest.display(),
            dir.display()
        )
    })?;
    Ok(dest)
}

/// The step server: run until told to stop (or until the kept command ends); returns the exit
/// code for the process. Needs [`process::block_signals`] first, as the agent does.
pub fn run(opts: Options) -> i32 {
    let ex = Rc::new(LocalExecutor::new());
    smol::future::block_on(ex.run(serve(ex.clone(), opts)))
}

/// The socket a server made, so that it removes only its own at the end.
struct Bound {
    path: PathBuf,
    id: (u64, u64),
}

impl Bound {
    /// Remove the socket file unless another server has put its own there since.
    fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listen on `path`: bound under a temporary name, opened to every user, and renamed into place,
/// so the agent never finds a socket it may not open yet. A socket left by a server that died is
/// replaced; a live server's is not.
async fn bind(path: &Path) -> Result<(UnixListener, Bound), String> {
    let shown = path.display();
    if let Some(Ok(_)) = super::timeout(Duration::from_secs(2), UnixStream::connect(path)).await {
        return Err(format!("a step server is already listening at {shown}; stop it first"));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(format!("{shown} exists and is not a socket; refusing to replace it"))
        }
        _ => {}
    }
    let name = path.file_name().ok_or_else(|| format!("{shown} names no socket file"))?;
    let tmp = path.with_file_name(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let failed = |what: &str, e: io::Error| {
        let _ = std::fs::remove_file(&tmp);
        let dir = path.parent().map(|p| p.display().to_string()).unwrap_or_default();
        format!("cannot {what} the socket {shown} ({e}): is {dir} a mounted, writable volume?")
    };
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| failed("create", e))?;
    // Trade-off: the agent in the jnlp container may run as another user than this container, so
    // the socket is open to every user who can reach the file. That is every container that mounts
    // the pod's shared volume (and any user inside this one): all of them may then run commands
    // here as this server's user, as `kubectl exec` rights would let them. Keep the volume to the
    // pod; to narrow it further, run all containers as one user and make the volume's directory
    // 0700.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| failed("open up", e))?;
    std::fs::rename(&tmp, path).map_err(|e| failed("place", e))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| failed("find", e))?;
    let listener = UnixListener::try_from(listener).map_err(|e| failed("watch", e))?;
    Ok((listener, Bound { path: path.to_path_buf(), id: (m.dev(), m.ino()) }))
}

/// The container's name as its socket gives it (`/wisp/build.sock` is container `build`), if the
/// file is named so.
fn container_of(socket: &Path) -> Option<String> {
    let name = socket.file_name()?.to_str()?.strip_suffix(".sock")?;
    proto::valid_container_name(name).then(|| name.to_string())
}

/// One step server.
struct Server {
    ex: Rc<LocalExecutor<'static>>,
    reaper: Rc<Reaper>,
    /// The container name from the socket's file name, if it has one.
    name: Option<String>,
    /// Process groups of the running steps, by connection.
    groups: RefCell<HashMap<u64, i32>>,
    connections: Cell<usize>,
}

/// Start the container's own command, with the signals this process blocks (to read them from
/// signalfds) unblocked again: the spawned process inherits the mask, and a command that cannot
/// get SIGTERM would never stop.
fn keep(prog: &str, args: &[String]) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    // SAFETY: the hook only calls sigprocmask, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| nix::sys::signal::SigSet::empty().thread_set_mask().map_err(io::Error::from));
    }
    cmd.spawn()
}

/// A command's exit code as a shell gives it: its own, or 128 + the signal that killed it.
fn exit_code(st: WaitStatus) -> i32 {
    match st {
        WaitStatus::Exited(_, c) => c,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 1,
    }
}

async fn serve(ex: Rc<LocalExecutor<'static>>, opts: Options) -> i32 {
    let signals = match TermSignals::open() {
        Ok(s) => s,
        Err(e) => {
            log::error!("signals: {e}");
            return 2;
        }
    };
    let reaper = match Reaper::new(std::process::id() == 1) {
        Ok(r) => r,
        Err(e) => {
            log::error!("watching child processes: {e}");
            return 2;
        }
    };
    let (listener, bound) = match bind(&opts.socket).await {
        Ok(b) => b,
        Err(e) => {
            log::error!("{e}");
            return 2;
        }
    };
    let kept = match opts.command.split_first() {
        None => None,
        Some((prog, args)) => match keep(prog, args) {
            Ok(child) => {
                let pid = child.id() as i32;
                Some((pid, reaper.watch(&ex, pid)))
            }
            Err(e) => {
                log::error!("cannot start the container's command `{prog}`: {e}");
                bound.remove();
                return if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
            }
        },
    };
    let server = Rc::new(Server {
        ex: ex.clone(),
        reaper: reaper.clone(),
        name: container_of(&opts.socket),
        groups: RefCell::new(HashMap::new()),
        connections: Cell::new(0),
    });
    match &kept {
        Some((pid, _)) => log::info!(
            "step server listening on {}; keeping `{}` (pid {pid})",
            opts.socket.display(),
            opts.command.join(" ")
        ),
        None => log::info!("step server listening on {}", opts.socket.display()),
    }
    let accept = async {
        let mut id = 0u64;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if server.connections.get() >= MAX_CONNECTIONS {
                        log::warn!("{MAX_CONNECTIONS} connections already; closing a new one");
                        continue;
                    }
                    id += 1;
                    server.connections.set(server.connections.get() + 1);
                    let s = server.clone();
                    ex.spawn(async move {
                        serve_step(&s, stream, id).await;
                        s.groups.borrow_mut().remove(&id);
                        s.connections.set(s.connections.get() - 1);
                    })
                    .detach();
                }
                Err(e) => {
                    log::warn!("accepting a connection: {e}");
                    Timer::after(ACCEPT_RETRY).await;
                }
            }
        }
    };
    let stop = async {
        match &kept {
            None => {
                let sig = signals.next().await;
                log::info!("{sig} received: stopping");
                0
            }
            Some((pid, exited)) => loop {
                let ev =
                    smol::future::or(async { Err(signals.next().await) }, async { Ok(exited.recv().await) });
                match ev.await {
                    Err(sig) => {
                        log::info!("{sig} received: passing it on to pid {pid}");
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), sig);
                    }
                    Ok(Ok(st)) => {
                        let code = exit_code(st);
                        let how = match st {
                            WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
                            _ => format!("exited with {code}"),
                        };
                        log::info!("the container's command {how}: exiting with {code}");
                        break code;
                    }
                    Ok(Err(_)) => break 1,
                }
            },
        }
    };
    let orphans = async {
        reaper.run().await;
        0
    };
    let code = smol::future::or(stop, smol::future::or(accept, orphans)).await;
    drop(listener);
    bound.remove();
    let groups: Vec<i32> = server.groups.borrow().values().copied().collect();
    if !groups.is_empty() {
        log::info!("stopping: killing {} running step(s)", groups.len());
    }
    for pgid in groups {
        process::kill_group(pgid, Signal::SIGKILL);
    }
    code
}

/// Why a step's connection ended, for the log.
enum Closed {
    /// The agent acknowledged the step's end and closed.
    Done,
    /// Anything else: the step's group is killed.
    Early(String),
}

/// Refuse a connection: say why to the agent and in the log.
async fn refuse(writer: &mut LinkWriter, code: RejectCode, m: String) {
    log::warn!("refused a connection: {m}");
    let message = crate::text::truncate(&m, MAX_MESSAGE);
    let _ = writer.send(&Frame::Reject { code, message }).await;
}

/// Serve one connection: one step, from the agent's `Hello` to the connection's end.
async fn serve_step(server: &Server, stream: UnixStream, id: u64) {
    let (mut reader, mut writer) = link::tcp(Box::pin(stream));
    let first = super::timeout(proto::HANDSHAKE_TIMEOUT, reader.next()).await;
    match first {
        Some(Ok(Some(Frame::Hello { min_version, max_version, name, .. }))) => {
            if min_version > proto::VERSION_MAX || max_version < proto::VERSION_MIN {
                let m = format!(
                    "the agent speaks protocol versions {min_version} to {max_version} and this step server {} \
                     to {}: install the same wisp-agent in both containers",
                    proto::VERSION_MIN,
                    proto::VERSION_MAX
                );
                return refuse(&mut writer, RejectCode::UnsupportedVersion, m).await;
            }
            if let Some(mine) = server.name.as_deref().filter(|mine| *mine != name) {
                let m = format!("this is the step server of container '{mine}', not of '{name}'");
                return refuse(&mut writer, RejectCode::ProtocolError, m).await;
            }
        }
        Some(Ok(Some(f))) => {
            return refuse(
                &mut writer,
                RejectCode::ProtocolError,
                format!("expected Hello, got {}", frame_kind(&f)),
            )
            .await
        }
        Some(Err(e)) => return refuse(&mut writer, RejectCode::ProtocolError, e.to_string()).await,
        Some(Ok(None)) => return,
        None => return log::debug!("a connection sent no Hello within 10 s"),
    }
    let hello = Frame::Hello {
        min_version: proto::VERSION_MIN,
        max_version: proto::VERSION_MAX,
        name: server.name.as_deref().unwrap_or(""),
        capabilities: 0,
        nonce: [0; NONCE_LEN],
    };
    if writer.send(&hello).await.is_err() {
        return;
    }
    let start = match super::timeout(proto::HANDSHAKE_TIMEOUT, reader.next()).await {
        Some(Ok(Some(Frame::StepStart(s)))) => s,
        Some(Ok(Some(f))) => {
            let m = format!("expected StepStart, got {}", frame_kind(&f));
            return refuse(&mut writer, RejectCode::ProtocolError, m).await;
        }
        Some(Err(e)) => return refuse(&mut writer, RejectCode::ProtocolError, e.to_string()).await,
        Some(Ok(None)) | None => return,
    };
    let key = (start.build, start.step);
    let credit = u64::from(start.credit).min(MAX_CREDIT);
    let spawned = step_dir(start.dir).and_then(|dir| {
        process::spawn_shell(start.shell, start.script, dir, start.env.iter()).map(|c| (c, dir))
    });
    let (child, dir) = match spawned {
        Ok(c) => c,
        Err(m) => {
            log::warn!("build {} step {}: {m}", key.0, key.1);
            let message = crate::text::truncate(&m, MAX_MESSAGE);
            let exit = Frame::Exit {
                build: key.0,
                step: key.1,
                status: ExitStatus::StartFailed,
                offset: 0,
                message,
            };
            let _ = writer.send(&exit).await;
            writer.close().await;
            return;
        }
    };
    let exited = server.reaper.watch(&server.ex, child.pid);
    let pid = child.pid;
    log::info!(
        "build {} step {}: started `{} -c ...` in {} (pid {pid})",
        key.0,
        key.1,
        start.shell,
        dir.display()
    );
    server.groups.borrow_mut().insert(id, pid);
    let credit = Cell::new(credit);
    let (wake_tx, wake) = bounded::<()>(1);
    let from_agent = async {
        let mut done = false;
        loop {
            let f = match reader.next().await {
                Ok(Some(f)) => f,
                Ok(None) if done => return Closed::Done,
                Ok(None) => return Closed::Early("the agent closed the connection".into()),
                Err(e) => return Closed::Early(format!("the agent's link failed: {e}")),
            };
            let ours = |b: u64, s: u32| (b, s) == key;
            match f {
                Frame::Credit { build, step, bytes, .. } if ours(build, step) => {
                    credit.set(credit.get().saturating_add(u64::from(bytes)).min(MAX_CREDIT));
                    let _ = wake_tx.try_send(());
                }
                Frame::Cancel { build, step } if ours(build, step) => {
                    process::kill_group(pid, Signal::SIGTERM)
                }
                Frame::Abandon { build, step } if ours(build, step) => {
                    process::kill_group(pid, Signal::SIGKILL)
                }
                Frame::Ack { build, step, .. } if ours(build, step) => done = true,
                other => {
                    return Closed::Early(format!("protocol error: unexpected {} frame", frame_kind(&other)))
                }
            }
        }
    };
    let why = smol::future::or(from_agent, to_agent(&mut writer, key, &child, &exited, &credit, &wake)).await;
    match why {
        Closed::Done => log::info!("build {} step {}: done", key.0, key.1),
        Closed::Early(m) => {
            log::info!("build {} step {}: {m}; killing its process group", key.0, key.1);
            process::kill_group(pid, Signal::SIGKILL);
        }
    }
}

/// The directory a forwarded step runs in: absolute, as the agent resolved it in its own container,
/// and present here (the workspace volume must be mounted at the same path in both).
fn step_dir(dir: &str) -> Result<&Path, String> {
    let p = Path::new(dir);
    if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("refused the step's directory {dir:?}: the agent must send an absolute path"));
    }
    if !p.is_dir() {
        return Err(format!(
            "the step's directory {dir} does not exist in this container: mount the workspace volume here \
             at the same path as in the agent's container"
        ));
    }
    Ok(p)
}

/// Send the agent the step's output within credit, its end of output and its shell's status;
/// returns only when the link fails or reading the pipe does (then the agent is told why).
async fn to_agent(
    writer: &mut LinkWriter,
    (build, step): (u64, u32),
    child: &process::Child,
    exited: &Receiver<WaitStatus>,
    credit: &Cell<u64>,
    wake: &Receiver<()>,
) -> Closed {
    enum Ev {
        Read(io::Result<usize>),
        Exited(WaitStatus),
        Wake,
    }
    let mut out = OutputBuf::default();
    let (mut sent, mut eof, mut exit_sent) = (0u64, false, false);
    let gone = |e: link::LinkError| Closed::Early(format!("sending to the agent failed: {e}"));
    loop {
        let limit = if eof { 0 } else { credit.get().min(MAX_OUTPUT_CHUNK as u64) as usize };
        let read = async {
            if limit == 0 {
                std::future::pending().await
            }
            let mut pipe = &child.output;
            Ev::Read(pipe.read(&mut out.space()[..limit]).await)
        };
        let exit = async {
            if exit_sent {
                std::future::pending().await
            }
            match exited.recv().await {
                Ok(st) => Ev::Exited(st),
                Err(_) => std::future::pending().await,
            }
        };
        let woken = async {
            let _ = wake.recv().await;
            Ev::Wake
        };
        match smol::future::or(smol::future::or(read, exit), woken).await {
            Ev::Read(Ok(0)) => {
                eof = true;
                let end = Frame::Output { build, step, offset: sent, data: &[] };
                if let Err(e) = writer.send(&end).await {
                    return gone(e);
                }
            }
            Ev::Read(Ok(n)) => {
                if let Err(e) = writer.send_output(&mut out, build, step, sent, n).await {
                    return gone(e);
                }
                sent += n as u64;
                credit.set(credit.get() - n as u64);
            }
            Ev::Read(Err(e)) => {
                let m = format!("reading the step's output failed: {e}");
                let message = crate::text::truncate(&m, MAX_MESSAGE);
                let _ = writer.send(&Frame::Reject { code: RejectCode::ProtocolError, message }).await;
                return Closed::Early(m);
            }
            Ev::Exited(st) => {
                let status = match st {
                    WaitStatus::Exited(_, code) => ExitStatus::Code(code),
                    WaitStatus::Signaled(_, sig, _) => ExitStatus::Signal(sig as i32),
                    _ => ExitStatus::Code(-1),
                };
                exit_sent = true;
                let exit = Frame::Exit { build, step, status, offset: sent, message: "" };
                if let Err(e) = writer.send(&exit).await {
                    return gone(e);
                }
            }
            Ev::Wake => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_name_the_socket_and_keep_the_command_after_the_dashes() {
        let o = parse_args(&args(&["--socket", "/wisp/build.sock"])).unwrap().unwrap();
        assert_eq!(o, Options { socket: "/wisp/build.sock".into(), command: vec![] });
        let o = parse_args(&args(&["--socket=/w/b.sock", "--", "sleep", "--", "-x"])).unwrap().unwrap();
        assert_eq!(o.command, args(&["sleep", "--", "-x"]));
        assert_eq!(parse_args(&args(&["--help"])), Ok(None));
        assert!(parse_args(&args(&[])).unwrap_err().contains("no socket"));
        assert!(parse_args(&args(&["--socket"])).unwrap_err().contains("needs a path"));
        assert!(parse_args(&args(&["--socket", "s", "sleep"])).unwrap_err().contains("goes after `--`"));
        assert!(parse_args(&args(&["--socket", "s", "--"])).unwrap_err().contains("nothing after"));
    }

    #[test]
    fn the_container_name_comes_from_the_socket_file() {
        assert_eq!(container_of(Path::new("/wisp/build.sock")).as_deref(), Some("build"));
        assert_eq!(container_of(Path::new("/wisp/Build.sock")), None);
        assert_eq!(container_of(Path::new("/wisp/build")), None);
    }

    #[test]
    fn a_step_directory_must_be_absolute_and_present() {
        assert!(step_dir("/").is_ok());
        assert!(step_dir("rel/dir").unwrap_err().contains("absolute path"));
        assert!(step_dir("/tmp/../etc").unwrap_err().contains("absolute path"));
        assert!(step_dir("/no/such/wisp/dir").unwrap_err().contains("mount the workspace volume"));
    }
}
