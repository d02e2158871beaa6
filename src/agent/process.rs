//! Child processes of the agent: spawning a step's shell in its own process group, killing its process
//! group, and reaping exits (all children when the agent is PID 1).
//!
//! Exits are learned from SIGCHLD through a self-pipe, so no thread blocks in `waitpid`.

use nix::errno::Errno;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use smol::channel::{bounded, Receiver, Sender};
use smol::io::AsyncReadExt;
use smol::Async;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static SELF_PIPE: AtomicI32 = AtomicI32::new(-1);
static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    if sig == nix::libc::SIGTERM || sig == nix::libc::SIGINT {
        TERMINATE.store(true, Ordering::SeqCst);
    }
    let fd = SELF_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // write(2) is async-signal-safe; a full pipe already means "wake up".
        unsafe { nix::libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

/// True once SIGTERM or SIGINT arrived.
pub fn terminate_requested() -> bool {
    TERMINATE.load(Ordering::SeqCst)
}

/// Tracks the agent's children and delivers each one's exit status to whoever waits for it.
pub struct Reaper {
    waiters: RefCell<HashMap<i32, Sender<WaitStatus>>>,
    reap_all: bool,
    wake: Async<File>,
}

impl Reaper {
    /// Install the SIGCHLD/SIGTERM/SIGINT handlers. `reap_all` also reaps adopted orphans (PID 1).
    pub fn install(reap_all: bool) -> std::io::Result<Rc<Self>> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        SELF_PIPE.store(w.as_raw_fd(), Ordering::SeqCst);
        std::mem::forget(w); // lives as long as the process: the handler writes to it
        let action = signal::SigAction::new(
            SigHandler::Handler(on_signal),
            signal::SaFlags::SA_RESTART | signal::SaFlags::SA_NOCLDSTOP,
            signal::SigSet::empty(),
        );
        for sig in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
            unsafe { signal::sigaction(sig, &action) }?;
        }
        let wake = Async::new(File::from(r))?;
        Ok(Rc::new(Self { waiters: RefCell::new(HashMap::new()), reap_all, wake }))
    }

    /// Wait for signals forever, reaping children; returns when termination was requested.
    pub async fn run(&self) {
        let mut buf = [0u8; 64];
        loop {
            self.reap();
            if terminate_requested() {
                return;
            }
            let _ = (&self.wake).read(&mut buf).await;
        }
    }

    /// Register interest in `pid`'s exit. Call right after spawning it.
    pub fn watch(&self, pid: i32) -> Receiver<WaitStatus> {
        let (tx, rx) = bounded(1);
        self.waiters.borrow_mut().insert(pid, tx);
        // It may already have exited before we registered.
        self.reap();
        rx
    }

    fn reap(&self) {
        if self.reap_all {
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(st) => self.deliver(st),
                }
            }
        } else {
            let pids: heapless::Vec<i32, 64> = self.waiters.borrow().keys().copied().take(64).collect();
            for pid in pids {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {}
                    Ok(st) => self.deliver(st),
                    Err(Errno::ECHILD) => {
                        self.waiters.borrow_mut().remove(&pid);
                    }
                    Err(_) => {}
                }
            }
        }
    }

    fn deliver(&self, st: WaitStatus) {
        if let WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _) = st {
            if let Some(tx) = self.waiters.borrow_mut().remove(&pid.as_raw()) {
                let _ = tx.try_send(st);
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
    // Its own process group, so a cancel or timeout reaches everything the step started. No
    // pre_exec hook: std can then use posix_spawn (vfork + exec), much cheaper than a fork. std
    // also resets SIGPIPE (which the agent ignores) and the signal mask for the child; caught
    // signals reset on exec.
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

/// Send `sig` to the whole process group `pgid`; a group that is already gone is not an error.
pub fn kill_group(pgid: i32, sig: Signal) {
    match signal::killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => log::warn!("could not send {sig} to process group {pgid}: {e}"),
    }
}
