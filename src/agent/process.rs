//! Child processes of the agent: spawning a step's shell in its own process group, killing its process
//! group, and learning of exits (of all children too when the agent is PID 1), and the signals the
//! binary takes.
//!
//! No state here is process-wide: each step's exit is watched through a pidfd of its own (a file
//! descriptor that becomes readable when the process ends), so any number of agents can run in one
//! process and no signal handler is needed for them. Signals (SIGTERM and SIGINT for a stop,
//! SIGHUP for an in-place upgrade, SIGCHLD for the orphans PID 1 adopts) come through a signalfd
//! owned by a value, which needs them blocked in every thread: [`block_signals`] does that and must
//! run before any thread starts.

use nix::errno::Errno;
use nix::sys::signal::{self, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use smol::channel::{bounded, Receiver, Sender};
use smol::{Async, LocalExecutor, Timer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Duration;

/// The signals the binary takes through file descriptors.
const SIGNALS: [Signal; 4] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD];

/// Where pidfds are not available (Linux before 5.3, a seccomp filter that refuses them), a step's
/// exit is polled for: first after this long, then at doubling intervals up to `EXIT_POLL_MAX`.
const EXIT_POLL_MIN: Duration = Duration::from_millis(5);
/// Longest wait between two polls for a step's exit without a pidfd (the most an exit can be
/// noticed late).
const EXIT_POLL_MAX: Duration = Duration::from_millis(200);

/// A handler that does nothing: the signals are blocked and read from a signalfd, but a PID 1
/// only receives the signals it has a handler for.
extern "C" fn no_op(_: nix::libc::c_int) {}

/// Block SIGTERM, SIGINT, SIGHUP and SIGCHLD in the calling thread, and so in every thread it starts later,
/// so that [`TermSignals`] and an orphan-reaping [`Reaper`] can read them from a signalfd. Call it
/// first thing in `main`, before any thread exists. Steps start with an empty signal mask again
/// ([`spawn_shell`]'s hook).
pub fn block_signals() -> std::io::Result<()> {
    let action = signal::SigAction::new(
        SigHandler::Handler(no_op),
        signal::SaFlags::SA_RESTART | signal::SaFlags::SA_NOCLDSTOP,
        SigSet::empty(),
    );
    for sig in SIGNALS {
        unsafe { signal::sigaction(sig, &action) }?;
    }
    let mut set = SigSet::empty();
    for sig in SIGNALS {
        set.add(sig);
    }
    set.thread_block()?;
    Ok(())
}

/// Let SIGHUP do what it does by default again (end the process): for the modes of the binary
/// that do not upgrade in place (`step-server`, `install`). Call it before any thread starts.
pub fn unblock_hangup() -> std::io::Result<()> {
    let dfl = signal::SigAction::new(SigHandler::SigDfl, signal::SaFlags::empty(), SigSet::empty());
    unsafe { signal::sigaction(Signal::SIGHUP, &dfl) }?;
    let mut set = SigSet::empty();
    set.add(Signal::SIGHUP);
    set.thread_unblock()?;
    Ok(())
}

fn signalfd(signals: &[Signal]) -> std::io::Result<Async<SignalFd>> {
    let mut set = SigSet::empty();
    for sig in signals {
        set.add(*sig);
    }
    let blocked = SigSet::thread_get_mask()?;
    if let Some(sig) = signals.iter().find(|s| !blocked.contains(**s)) {
        return Err(std::io::Error::other(format!(
            "{sig} is not blocked, so it cannot be read from a signalfd (call process::block_signals first)"
        )));
    }
    let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    Async::new(fd)
}

/// SIGTERM and SIGINT, read from a signalfd (after [`block_signals`]).
pub struct TermSignals {
    fd: Async<SignalFd>,
}

impl TermSignals {
    /// Start taking SIGTERM and SIGINT through a file descriptor.
    pub fn open() -> std::io::Result<Self> {
        Ok(Self { fd: signalfd(&[Signal::SIGTERM, Signal::SIGINT])? })
    }

    /// Wait for SIGTERM or SIGINT; returns which one came.
    pub async fn next(&self) -> Signal {
        next_signal(&self.fd).await
    }
}

/// SIGHUP, read from a signalfd (after [`block_signals`]): the binary's "upgrade in place".
pub struct Hangups {
    fd: Async<SignalFd>,
}

impl Hangups {
    /// Start taking SIGHUP through a file descriptor.
    pub fn open() -> std::io::Result<Self> {
        Ok(Self { fd: signalfd(&[Signal::SIGHUP])? })
    }

    /// Wait for the next SIGHUP.
    pub async fn next(&self) {
        next_signal(&self.fd).await;
    }
}

async fn next_signal(fd: &Async<SignalFd>) -> Signal {
    loop {
        match fd.get_ref().read_signal() {
            Ok(Some(info)) => {
                if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                    return sig;
                }
            }
            Ok(None) | Err(_) => {
                let _ = fd.readable().await;
            }
        }
    }
}

/// Tracks the agent's children and delivers each one's exit status to whoever waits for it.
pub struct Reaper {
    waiters: RefCell<HashMap<i32, Sender<WaitStatus>>>,
    /// SIGCHLD, when this agent also reaps the orphans it adopts as PID 1.
    orphans: Option<Async<SignalFd>>,
}

impl Reaper {
    /// A reaper for the children this agent starts; with `reap_orphans` (the agent is PID 1) also
    /// for every other child of the process, learned of through SIGCHLD, which must be blocked
    /// ([`block_signals`]).
    pub fn new(reap_orphans: bool) -> std::io::Result<Rc<Self>> {
        let orphans = if reap_orphans { Some(signalfd(&[Signal::SIGCHLD])?) } else { None };
        Ok(Rc::new(Self { waiters: RefCell::new(HashMap::new()), orphans }))
    }

    /// Reap adopted orphans whenever a child of the process ends; never returns. Without
    /// `reap_orphans` there is nothing to do and it just waits.
    pub async fn run(&self) {
        let Some(fd) = &self.orphans else { return std::future::pending().await };
        loop {
            while let Ok(Some(_)) = fd.get_ref().read_signal() {}
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(st) => self.deliver(st),
                }
            }
            let _ = fd.readable().await;
        }
    }

    /// Register interest in `pid`'s exit, watched by a task on `ex`. Call right after spawning it
    /// (before anything else runs on the executor).
    pub fn watch(self: &Rc<Self>, ex: &LocalExecutor<'static>, pid: i32) -> Receiver<WaitStatus> {
        let (tx, rx) = bounded(1);
        self.waiters.borrow_mut().insert(pid, tx);
        ex.spawn(watch_child(self.clone(), pid)).detach();
        rx
    }

    fn deliver(&self, st: WaitStatus) {
        if let WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _) = st {
            if let Some(tx) = self.waiters.borrow_mut().remove(&pid.as_raw()) {
                let _ = tx.try_send(st);
            }
        }
    }
}

/// A pidfd for `pid`, readable once it has ended; None where the kernel has none to give.
fn pidfd(pid: i32) -> Option<Async<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor (close-on-exec) or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        log::debug!("no pidfd for pid {pid} ({}): polling for its exit", std::io::Error::last_os_error());
        return None;
    }
    // SAFETY: a descriptor the kernel just gave us and nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    Async::new(fd).ok()
}

/// Wait for child `pid` to end and deliver its status (unless the orphan reaper got it first).
async fn watch_child(reaper: Rc<Reaper>, pid: i32) {
    let fd = pidfd(pid);
    let mut poll = EXIT_POLL_MIN;
    loop {
        if !reaper.waiters.borrow().contains_key(&pid) {
            return;
        }
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
            Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return reaper.deliver(st),
            Ok(_) => {}
            Err(e) => {
                // Not our child any more: someone else waited for it. Say so rather than leave
                // the step waiting forever.
                log::warn!("lost track of process {pid}: {e}; its step is reported as exit code -1");
                return reaper.deliver(WaitStatus::Exited(Pid::from_raw(pid), -1));
            }
        }
        match &fd {
            Some(fd) => {
                let _ = fd.readable().await;
            }
            None => {
                Timer::after(poll).await;
                poll = (poll * 2).min(EXIT_POLL_MAX);
            }
        }
    }
}

/// A step's running shell: its pid (also its process group id) and the read end of its output.
pub struct Child {
    /// Process id and process group id.
    pub pid: i32,
    /// Merged stdout and stderr.
    pub output: Async<File>,
}

/// Stdin for a step: /dev/null, or where there is none (an empty root, a scratch image without
/// /dev) a pipe whose write end is already closed, which reads the same: end of file at once.
fn empty_stdin() -> Result<Stdio, String> {
    match File::open("/dev/null") {
        Ok(f) => Ok(Stdio::from(f)),
        Err(_) => {
            let (r, w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
            drop(w);
            Ok(Stdio::from(r))
        }
    }
}

/// Size asked for a step's output pipe.
const STEP_PIPE_BYTES: i32 = 1 << 20;

/// Start `shell -c script` in `dir` in a process group of its own, stdin empty (/dev/null), stdout and stderr
/// merged into one pipe.
pub fn spawn_shell<'a>(
    shell: &str,
    script: &str,
    dir: &std::path::Path,
    env: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<Child, String> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let w2 = w.try_clone().map_err(|e| format!("pipe: {e}"))?;
    let mut cmd = Command::new(shell);
    cmd.arg("-c").arg(script).current_dir(dir);
    cmd.stdin(empty_stdin()?).stdout(Stdio::from(w)).stderr(Stdio::from(w2));
    // The agent's own credentials must not leak into builds.
    for k in ["JENKINS_SECRET", "WISP_SECRET"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Its own process group, so a cancel or timeout reaches everything the step started. The
    // agent blocks the signals it reads from signalfds, and a child inherits the mask (std does
    // not reset it): a step whose TERM stayed blocked would only ever end by KILL, so the hook
    // empties it. (The hook costs std's posix_spawn path: the step is forked. Caught signals reset
    // on exec, and std resets the SIGPIPE the agent ignores.)
    // SAFETY: the hook only calls sigprocmask, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| SigSet::empty().thread_set_mask().map_err(std::io::Error::from));
    }
    cmd.process_group(0);
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && !std::path::Path::new(shell).exists() {
            format!(
                "no shell: `{shell}` does not exist on this agent, so `sh` steps cannot run here; \
                 use an image with a shell, mount one at {shell}, or set `shell:` on the step"
            )
        } else {
            format!("could not start `{shell}` in {}: {e}", dir.display())
        }
    })?;
    drop(cmd); // closes our copies of the write end so EOF comes when the step's processes finish

    // A 1 MiB pipe (the most an unprivileged process may ask for by default) instead of 64 KiB: a
    // fast step writes ahead while the agent sends, the agent reads full frames, and both sides
    // sleep and wake far less often (measured: about 20% more throughput on 2 cores). Bounded
    // kernel memory per running step; where the kernel refuses, the default stays.
    if let Err(e) = nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETPIPE_SZ(STEP_PIPE_BYTES)) {
        log::debug!("output pipe stays at the default size: {e}");
    }
    let output = Async::new(File::from(r)).map_err(|e| format!("pipe: {e}"))?;
    Ok(Child { pid: child.id() as i32, output })
}

/// Whether `fd` is closed when this process executes another program.
pub fn set_cloexec(fd: std::os::fd::RawFd, on: bool) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: only the descriptor's flags change; a closed `fd` makes fcntl fail with EBADF.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = if on { FdFlag::FD_CLOEXEC } else { FdFlag::empty() };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// A step's shell that an earlier agent process started and handed over (see
/// [`super::handover`]): `output` is the read end of its pipe, which this process now owns.
pub fn adopt_child(pid: i32, output: OwnedFd) -> std::io::Result<Child> {
    set_cloexec(std::os::fd::AsRawFd::as_raw_fd(&output), true)?;
    Ok(Child { pid, output: Async::new(File::from(output))? })
}

/// Send `sig` to the whole process group `pgid`; a group that is already gone is not an error.
pub fn kill_group(pgid: i32, sig: Signal) {
    match signal::killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => log::warn!("could not send {sig} to process group {pgid}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_is_delivered_with_more_children_than_the_old_64_pid_batch() {
        let ex = Rc::new(LocalExecutor::new());
        let reaper = Reaper::new(false).unwrap();
        let dir = std::env::temp_dir();
        let n = 300;
        let waits: Vec<(i32, Receiver<WaitStatus>)> = (0..n)
            .map(|i| {
                let child =
                    spawn_shell("/bin/sh", &format!("exit {}", i % 100), &dir, std::iter::empty()).unwrap();
                (child.pid, reaper.watch(&ex, child.pid))
            })
            .collect();
        smol::future::block_on(ex.run(async {
            for (i, (pid, rx)) in waits.into_iter().enumerate() {
                let st = rx.recv().await.unwrap();
                assert_eq!(st, WaitStatus::Exited(Pid::from_raw(pid), (i % 100) as i32));
            }
        }));
    }
}
