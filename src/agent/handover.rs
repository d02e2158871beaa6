//! In-place upgrade: on SIGHUP the agent executes the binary now at the path it was started from,
//! in its own process (same PID), and the new program adopts the running steps.
//!
//! The old agent closes its link, parks every step (its shell keeps running; the read end of its
//! output pipe stays open, with whatever the agent has not read still in it), writes each step's
//! spool to disk ([`super::spool::Spool::flush`]) and writes this module's [`State`] into a memfd
//! that survives `execve`, named by `WISP_AGENT_HANDOVER=FD` in the new program's environment. The
//! state holds the node name and secret (the secret is scrubbed from the command line, so it is
//! never passed there or in the environment), and per step what the protocol knows it by, its
//! process group, its pipe's descriptor, its spool's numbers and what the agent knew of its end.
//! The shells stay children of the process across `execve`, so the new program waits for them as
//! the old one did (a step that ended during the hand-over is a zombie until then).
//!
//! The format is versioned: a first line `wisp-agent-handover VERSION`, then one field per line.
//! A program reads every version it knows (version 1 is the only one so far); anything else is
//! refused with a clear error and the program starts as a fresh agent.

use crate::proto::ExitStatus;
use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The environment variable that names the state's descriptor in the new program.
pub const ENV: &str = "WISP_AGENT_HANDOVER";
/// The first word of the state.
pub const MAGIC: &str = "wisp-agent-handover";
/// The format this agent writes.
pub const VERSION: u32 = 1;
/// Largest state read (a thousand steps take about 300 KiB).
const MAX_STATE: u64 = 16 << 20;

/// What an agent hands to the program it executes.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// The version of the agent that wrote it (what its `--version` says).
    pub agent_version: String,
    /// The node.
    pub name: String,
    /// The node's secret.
    pub secret: String,
    /// The running steps.
    pub steps: Vec<StepState>,
}

/// One running step as it is handed over.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    /// The build the step belongs to, as the protocol knows it.
    pub build: u64,
    /// The step's number in its build.
    pub step: u32,
    /// The shell's pid, also its process group.
    pub pid: i32,
    /// The read end of its output pipe (open across the exec).
    pub fd: RawFd,
    /// Its spool's directory.
    pub spool_dir: PathBuf,
    /// The spool's numbers: acknowledged, produced, written to disk, peak.
    pub spool: [u64; 4],
    /// The pipe reached its end.
    pub eof: bool,
    /// How the shell ended, if the agent already knew.
    pub status: Option<ExitStatus>,
    /// Why the agent stopped it (timed out, cancelled), if it did.
    pub reason: Option<ExitStatus>,
    /// The controller asked for a cancel.
    pub cancelled: bool,
    /// Milliseconds left until its timeout.
    pub deadline_ms: Option<u64>,
    /// Milliseconds since its group was sent TERM.
    pub term_ms: Option<u64>,
    /// Its group was sent KILL.
    pub killed: bool,
    /// The agent failed the step (its output could not be kept).
    pub fault: bool,
    /// Its end was logged.
    pub logged_end: bool,
    /// Pipe reads that brought output.
    pub reads: u64,
    /// What the agent will say in its `Exit`.
    pub message: String,
}

fn hex_field(b: &[u8]) -> String {
    format!("x{}", hex::encode(b))
}

fn unhex_field(s: &str) -> Result<Vec<u8>, String> {
    let h = s.strip_prefix('x').ok_or_else(|| format!("{s:?} is not an x-prefixed hex string"))?;
    hex::decode(h).map_err(|e| format!("{s:?}: {e}"))
}

fn text_field(s: &str) -> Result<String, String> {
    String::from_utf8(unhex_field(s)?).map_err(|_| format!("{s:?} is not UTF-8"))
}

fn status_field(s: Option<ExitStatus>) -> String {
    match s {
        None => "-".into(),
        Some(ExitStatus::Code(c)) => format!("c{c}"),
        Some(ExitStatus::Signal(n)) => format!("s{n}"),
        Some(ExitStatus::StartFailed) => "f".into(),
        Some(ExitStatus::TimedOut) => "t".into(),
        Some(ExitStatus::Cancelled) => "x".into(),
    }
}

fn parse_status(s: &str) -> Result<Option<ExitStatus>, String> {
    let num = |n: &str| n.parse::<i32>().map_err(|_| format!("bad exit status {s:?}"));
    Ok(Some(match s {
        "-" => return Ok(None),
        "f" => ExitStatus::StartFailed,
        "t" => ExitStatus::TimedOut,
        "x" => ExitStatus::Cancelled,
        _ if s.starts_with('c') => ExitStatus::Code(num(&s[1..])?),
        _ if s.starts_with('s') => ExitStatus::Signal(num(&s[1..])?),
        _ => return Err(format!("bad exit status {s:?}")),
    }))
}

fn opt_field(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn parse_num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad {what} {s:?}"))
}

fn parse_opt(s: &str, what: &str) -> Result<Option<u64>, String> {
    if s == "-" {
        Ok(None)
    } else {
        parse_num(s, what).map(Some)
    }
}

fn parse_flag(s: &str, what: &str) -> Result<bool, String> {
    match s {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("bad {what} {s:?}")),
    }
}

impl State {
    /// The state in the current format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "{MAGIC} {VERSION}\nagent {}\nname {}\nsecret {}\nsteps {}\n",
            hex_field(self.agent_version.as_bytes()),
            hex_field(self.name.as_bytes()),
            hex_field(self.secret.as_bytes()),
            self.steps.len()
        );
        for s in &self.steps {
            let [acked, produced, spilled, peak] = s.spool;
            let flag = |b: bool| if b { '1' } else { '0' };
            out += &format!(
                "step {} {} {} {} {acked} {produced} {spilled} {peak} {} {} {} {} {} {} {} {} {} {} {} {}\n",
                s.build,
                s.step,
                s.pid,
                s.fd,
                flag(s.eof),
                status_field(s.status),
                status_field(s.reason),
                flag(s.cancelled),
                opt_field(s.deadline_ms),
                opt_field(s.term_ms),
                flag(s.killed),
                flag(s.fault),
                flag(s.logged_end),
                s.reads,
                hex_field(s.spool_dir.as_os_str().as_bytes()),
                hex_field(s.message.as_bytes()),
            );
        }
        out += "end\n";
        out.into_bytes()
    }

    /// Read a state of any version this agent knows; returns it and the version it was in.
    pub fn parse(data: &[u8]) -> Result<(Self, u32), String> {
        let text = std::str::from_utf8(data).map_err(|_| "it is not text".to_string())?;
        let mut lines = text.split('\n');
        let first = lines.next().unwrap_or("");
        let version = match first.split_once(' ') {
            Some((MAGIC, v)) => v.parse::<u32>().map_err(|_| format!("bad version {v:?}"))?,
            _ => {
                let shown: String = first.chars().take(40).collect();
                return Err(format!("it does not start with '{MAGIC} VERSION' (starts with {shown:?})"));
            }
        };
        match version {
            1 => Self::parse_v1(lines).map(|s| (s, 1)),
            v => Err(format!("version {v} is not known to this agent (it reads version 1)")),
        }
    }

    fn parse_v1<'a>(mut lines: impl Iterator<Item = &'a str>) -> Result<Self, String> {
        let mut field = |key: &str| -> Result<&'a str, String> {
            let line = lines.next().ok_or_else(|| format!("it ends before '{key}'"))?;
            match line.split_once(' ') {
                Some((k, v)) if k == key => Ok(v),
                _ if line == key => Ok(""),
                _ => Err(format!("expected '{key}', found {:?}", line.chars().take(40).collect::<String>())),
            }
        };
        let agent_version = text_field(field("agent")?)?;
        let name = text_field(field("name")?)?;
        let secret = text_field(field("secret")?)?;
        let n: usize = parse_num(field("steps")?, "step count")?;
        if name.is_empty() || secret.is_empty() {
            return Err("no node name or secret".into());
        }
        let mut steps = Vec::new();
        for _ in 0..n {
            let f: Vec<&str> = field("step")?.split(' ').collect();
            let [build, step, pid, fd, acked, produced, spilled, peak, eof, status, reason, cancelled, deadline, term, killed, fault, logged, reads, dir, message] =
                f[..]
            else {
                return Err(format!("a step line has {} fields, not 20", f.len()));
            };
            let s = StepState {
                build: parse_num(build, "build")?,
                step: parse_num(step, "step")?,
                pid: parse_num(pid, "pid")?,
                fd: parse_num(fd, "descriptor")?,
                spool_dir: PathBuf::from(OsString::from_vec(unhex_field(dir)?)),
                spool: [
                    parse_num(acked, "offset")?,
                    parse_num(produced, "offset")?,
                    parse_num(spilled, "count")?,
                    parse_num(peak, "count")?,
                ],
                eof: parse_flag(eof, "flag")?,
                status: parse_status(status)?,
                reason: parse_status(reason)?,
                cancelled: parse_flag(cancelled, "flag")?,
                deadline_ms: parse_opt(deadline, "deadline")?,
                term_ms: parse_opt(term, "time")?,
                killed: parse_flag(killed, "flag")?,
                fault: parse_flag(fault, "flag")?,
                logged_end: parse_flag(logged, "flag")?,
                reads: parse_num(reads, "count")?,
                message: text_field(message)?,
            };
            if s.pid <= 1 || s.fd < 3 || !s.spool_dir.is_absolute() || s.spool[0] > s.spool[1] {
                return Err(format!("step {} of build {} is not consistent", s.step, s.build));
            }
            if steps.iter().any(|o: &StepState| o.fd == s.fd || (o.build, o.step) == (s.build, s.step)) {
                return Err(format!("step {} of build {} is listed twice", s.step, s.build));
            }
            steps.push(s);
        }
        field("end")?;
        Ok(Self { agent_version, name, secret, steps })
    }
}

/// The binary this process runs, as `/proc/self/exe` names it now (call at start: after the file
/// is replaced the link says "PATH (deleted)"); None without /proc.
pub fn own_exe() -> Option<PathBuf> {
    let p = std::fs::read_link("/proc/self/exe").ok()?;
    let b = p.as_os_str().as_bytes();
    Some(match b.strip_suffix(b" (deleted)") {
        Some(rest) => PathBuf::from(std::ffi::OsStr::from_bytes(rest)),
        None => p,
    })
}

/// Write `state` to a memfd and execute `exe` with `argv` and this process's environment plus
/// `WISP_AGENT_HANDOVER`; `keep` are the descriptors the new program adopts (their close-on-exec
/// flag is cleared). Returns only if that fails, with why, everything as it was before.
pub fn exec(exe: &Path, argv: &[CString], state: &State, keep: &[RawFd]) -> Result<Infallible, String> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create("wisp-agent-handover", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    let mut file = File::from(fd);
    file.write_all(&state.encode()).map_err(|e| format!("writing the hand-over state: {e}"))?;
    let raw = file.as_raw_fd();
    let path =
        CString::new(exe.as_os_str().as_bytes()).map_err(|_| "the path holds a NUL byte".to_string())?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != ENV)
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{ENV}={raw}")).expect("no NUL"));
    let restore = |upto: usize| {
        for fd in &keep[..upto] {
            let _ = super::process::set_cloexec(*fd, true);
        }
    };
    for (i, fd) in keep.iter().chain(std::iter::once(&raw)).enumerate() {
        if let Err(e) = super::process::set_cloexec(*fd, false) {
            restore(i.min(keep.len()));
            return Err(format!("keeping descriptor {fd} open across the exec: {e}"));
        }
    }
    let err = nix::unistd::execve(&path, argv, &env).expect_err("execve returns only on failure");
    restore(keep.len());
    drop(file);
    let hint = match err {
        nix::errno::Errno::ENOEXEC => {
            " (not a program this system can run: wrong architecture or not a binary)"
        }
        nix::errno::Errno::EACCES => " (not executable)",
        nix::errno::Errno::ENOENT => " (no such file)",
        _ => "",
    };
    Err(format!("exec {}: {err}{hint}", exe.display()))
}

/// The state the previous agent handed over, when `WISP_AGENT_HANDOVER` is set: read, its
/// descriptor closed and the variable removed from the environment (before any step can see
/// it). Call at start, while this is the only thread. `Err` says why it is unusable.
pub fn take_from_env() -> Option<Result<(State, u32), String>> {
    let v = std::env::var_os(ENV)?;
    std::env::remove_var(ENV);
    Some(read_fd(&v.to_string_lossy()).map_err(|e| format!("{ENV}={}: {e}", v.to_string_lossy())))
}

fn read_fd(v: &str) -> Result<(State, u32), String> {
    let fd: RawFd = v.parse().map_err(|_| "not a file descriptor number".to_string())?;
    if fd < 3 {
        return Err("not a descriptor a hand-over uses".into());
    }
    // SAFETY: F_GETFD only reads the descriptor's flags (EBADF when it is not open).
    if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } == -1 {
        return Err(format!("descriptor {fd}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: an open descriptor (above) that the variable hands to us: nothing else in this
    // process owns it. It is closed when read.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let meta = file.metadata().map_err(|e| format!("descriptor {fd}: {e}"))?;
    // A pipe, a socket or a terminal could block the read: only a (memfd's) regular file is read.
    if !meta.file_type().is_file() || meta.len() > MAX_STATE {
        return Err(format!("descriptor {fd} is not a hand-over state (a regular file of at most 16 MiB)"));
    }
    let mut data = vec![0u8; meta.len() as usize];
    file.read_exact_at(&mut data, 0).map_err(|e| format!("reading descriptor {fd}: {e}"))?;
    State::parse(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            agent_version: "0.1.0 (0123456789ab)".into(),
            name: "builder1".into(),
            secret: "s3cr3t!".into(),
            steps: vec![
                StepState {
                    build: 7,
                    step: 2,
                    pid: 4242,
                    fd: 9,
                    spool_dir: "/var/lib/wisp-agent/.wisp/spool/7-2".into(),
                    spool: [100, 2000, 1900, 1950],
                    eof: false,
                    status: None,
                    reason: None,
                    cancelled: false,
                    deadline_ms: Some(59_000),
                    term_ms: None,
                    killed: false,
                    fault: false,
                    logged_end: false,
                    reads: 12,
                    message: String::new(),
                },
                StepState {
                    build: 8,
                    step: 1,
                    pid: 4300,
                    fd: 11,
                    spool_dir: "/w/.wisp/spool/8-1".into(),
                    spool: [0, 0, 0, 0],
                    eof: true,
                    status: Some(ExitStatus::Signal(9)),
                    reason: Some(ExitStatus::TimedOut),
                    cancelled: true,
                    deadline_ms: None,
                    term_ms: Some(1500),
                    killed: true,
                    fault: true,
                    logged_end: true,
                    reads: 0,
                    message: "the agent stopped the step: é".into(),
                },
            ],
        }
    }

    /// Version 1 exactly as the first agent with hand-over writes it: a later agent must keep
    /// reading these bytes (a new format gets a new version, and this test stays).
    const V1: &[u8] = b"wisp-agent-handover 1
agent x302e312e30202830313233343536373839616229
name x6275696c64657231
secret x73336372337421
steps 2
step 7 2 4242 9 100 2000 1900 1950 0 - - 0 59000 - 0 0 0 12 x2f7661722f6c69622f776973702d6167656e742f2e776973702f73706f6f6c2f372d32 x
step 8 1 4300 11 0 0 0 0 1 s9 t 1 - 1500 1 1 1 0 x2f772f2e776973702f73706f6f6c2f382d31 x746865206167656e742073746f707065642074686520737465703a20c3a9
end
";

    #[test]
    fn version_1_state_parses_the_same_for_good() {
        let want = sample();
        let (got, version) = State::parse(V1).unwrap();
        assert_eq!(version, 1);
        assert_eq!(got, want);
        assert_eq!(want.encode(), V1, "this agent writes version 1 the same way");
    }

    #[test]
    fn a_state_round_trips() {
        let s = sample();
        assert_eq!(State::parse(&s.encode()).unwrap(), (s, VERSION));
        let none = State { steps: vec![], ..sample() };
        assert_eq!(State::parse(&none.encode()).unwrap().0, none);
    }

    #[test]
    fn garbage_and_unknown_versions_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "does not start with"),
            (b"hello world\n", "does not start with"),
            (b"\xff\xfe", "not text"),
            (b"wisp-agent-handover 2\nagent x\n", "version 2 is not known"),
            (b"wisp-agent-handover one\n", "bad version"),
            (b"wisp-agent-handover 1\nagent x30\n", "expected 'name'"),
            (b"wisp-agent-handover 1\nagent x30\nname x61\nsecret x62\nsteps 1\nstep 1 2\nend\n", "20"),
            (b"wisp-agent-handover 1\nagent x30\nname x61\nsecret x62\nsteps 0\n", "expected 'end'"),
            (b"wisp-agent-handover 1\nagent 30\nname x61\nsecret x62\nsteps 0\nend\n", "hex"),
            (b"wisp-agent-handover 1\nagent x30\nname x\nsecret x62\nsteps 0\nend\n", "no node name"),
        ];
        for (data, want) in cases {
            let e = State::parse(data).unwrap_err();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(data));
        }
        let mut twice = sample();
        twice.steps[1].fd = 9;
        assert!(State::parse(&twice.encode()).unwrap_err().contains("twice"));
        let mut bad = sample();
        bad.steps[0].spool = [5, 4, 0, 0];
        assert!(State::parse(&bad.encode()).unwrap_err().contains("not consistent"));
    }

    #[test]
    fn the_state_is_read_from_a_regular_file_and_not_from_a_pipe() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let e = read_fd(&r.as_raw_fd().to_string()).unwrap_err();
        assert!(e.contains("not a hand-over state"), "{e}");
        std::mem::forget(r); // read_fd took it
        drop(w);
        assert!(read_fd("1").is_err() && read_fd("abc").is_err());
        let path = std::env::temp_dir().join(format!("wisp-handover-{}", std::process::id()));
        std::fs::write(&path, sample().encode()).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(File::open(&path).unwrap());
        assert_eq!(read_fd(&fd.to_string()).unwrap().0, sample());
        let _ = std::fs::remove_file(&path);
    }
}
