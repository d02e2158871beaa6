//! Protocol v1: the frames agent and controller exchange, and their bounded binary codec.
//!
//! Decoding borrows from the caller's buffer and never allocates: every length the peer
//! claims is checked against the bytes actually present before it is used. See
//! `docs/PROTOCOL.md` for the wire layout. The same frames carry a forwarded step between the agent
//! and a step server in a sibling container (`agent::stepserver`).

use std::fmt;
use std::time::Duration;

/// The protocol versions this build speaks (inclusive range).
pub const VERSION_MIN: u16 = 1;
/// The newest protocol version this build speaks.
pub const VERSION_MAX: u16 = 2;

/// Largest encoded frame, without its tag and the transport's framing. Bounds every buffer on
/// both sides.
pub const MAX_FRAME: usize = 64 * 1024;
/// Bytes of the tag on each frame after the handshake: HMAC-SHA256 truncated to 128 bits, as
/// much as a forger would have to guess.
pub const TAG_LEN: usize = 16;
/// Largest frame a transport carries: a frame and its tag (the TCP length prefix counts both).
pub const MAX_WIRE_FRAME: usize = MAX_FRAME + TAG_LEN;
/// Largest output payload in one `Output` frame: leaves room for the header within `MAX_FRAME`.
pub const MAX_OUTPUT_CHUNK: usize = 32 * 1024;
/// Output bytes of one step that may be sent and not yet stored on a direct link (TCP or
/// WebSocket): the controller's credit window, and the agent's in-memory ring of output
/// (`agent::spool::MEMORY`) is as large, so on a live link output never leaves the agent's memory
/// before the controller has it (the disk spool is for a lost link). 64 KiB: a ring of 128 KiB
/// put the agent over its heap budget on WebSocket (256 KiB, the counting-allocator tests).
pub const STEP_WINDOW: usize = 64 * 1024;
/// Longest node name; also the limit on each label.
pub const MAX_NAME: usize = 64;
/// Longest free-text message (rejections, exit explanations).
pub const MAX_MESSAGE: usize = 1024;
/// Longest workspace directory name: one path component (`NAME_MAX` on Linux).
pub const MAX_WORKSPACE: usize = 255;
/// Longest `dir` and `shell` of a step: `PATH_MAX` on Linux, so any path the agent can open fits.
pub const MAX_PATH: usize = 4096;
/// Size of the handshake nonces and HMAC proofs.
pub const NONCE_LEN: usize = 32;
/// Longest container name a step may name: a DNS-1123 label, as Kubernetes names containers.
pub const MAX_CONTAINER: usize = 63;

/// `Hello` capability bit: the agent can run a step in a sibling container through that
/// container's step server (`StepStart::container`). A controller sends such a step only to an
/// agent that sets it; older agents send 0 and would not know the frame.
pub const CAP_CONTAINER_STEPS: u32 = 1 << 0;

/// `Hello` capability bit: the agent answers `InfoRequest` with `AgentInfo`. A controller asks
/// only an agent that sets it, and an agent answers only when asked, so neither side ever gets a
/// frame it does not know from an older peer.
pub const CAP_AGENT_INFO: u32 = 1 << 1;

/// `Hello` capability bit: the agent packs and unpacks archives (artifacts and stash): it runs a
/// `StepStart` whose shell is [`PACK_SHELL`] or [`UNPACK_SHELL`] itself and takes `Put` frames.
/// A controller sends those only to an agent that sets it.
pub const CAP_ARCHIVE: u32 = 1 << 2;

/// The `shell` of a `StepStart` that packs files of the step's directory into an archive sent
/// as the step's output (see `crate::archive`); its `script` is the selection, one pattern per
/// line, `+PATTERN` to take and `-PATTERN` to leave out. Never a real shell: those are absolute
/// paths.
pub const PACK_SHELL: &str = "wisp:pack";

/// The `shell` of a `StepStart` that unpacks the archive the controller sends in `Put` frames
/// into the step's directory; its `script` is the archive's length in bytes. The step's output
/// is a line saying what was written.
pub const UNPACK_SHELL: &str = "wisp:unpack";

/// Longest `data` of one `Put`.
pub const MAX_PUT_CHUNK: usize = MAX_OUTPUT_CHUNK;

/// Longest field of `AgentInfo`.
pub const MAX_INFO: usize = 64;

/// How long a peer has to answer each handshake exchange before the attempt is given up: a
/// stalled peer (or a slowloris) holds a connection for no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A link is dead after this many ping intervals without any frame from the peer: one or two
/// late pings do not end a link, and a dead one is noticed within a minute at the default 15 s.
pub const DEAD_AFTER_PINGS: u32 = 3;

/// Why a peer refused a connection. The code is stable; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectCode {
    /// No node of that name exists on the controller.
    UnknownNode = 1,
    /// The agent's proof did not match the node's secret.
    WrongSecret = 2,
    /// No protocol version in common.
    UnsupportedVersion = 3,
    /// Another live connection holds this node.
    AlreadyConnected = 4,
    /// The peer broke the protocol.
    ProtocolError = 5,
    /// Too many failed attempts or connections; retry later.
    TryLater = 6,
    /// The controller is busy or rate-limiting new links: retry later with backoff. An agent that
    /// does not know this code cannot decode the frame, counts the attempt as failed and retries
    /// with backoff too.
    Overloaded = 7,
}

impl RejectCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::UnknownNode,
            2 => Self::WrongSecret,
            3 => Self::UnsupportedVersion,
            4 => Self::AlreadyConnected,
            5 => Self::ProtocolError,
            6 => Self::TryLater,
            7 => Self::Overloaded,
            _ => return None,
        })
    }

    /// True when the agent should try again later, with backoff (`AlreadyConnected`, `TryLater`,
    /// `Overloaded`); the other codes need a change of configuration or version first.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::AlreadyConnected | Self::TryLater | Self::Overloaded)
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The shell exited with this code.
    Code(i32),
    /// The shell was killed by this signal.
    Signal(i32),
    /// The step could not be started (no shell, bad directory); the message says why.
    StartFailed,
    /// The step ran past its timeout and its process group was killed.
    TimedOut,
    /// The step was cancelled and its process group was killed.
    Cancelled,
}

impl ExitStatus {
    /// True only for exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    fn split(self) -> (u8, i32) {
        match self {
            Self::Code(c) => (0, c),
            Self::Signal(s) => (1, s),
            Self::StartFailed => (2, 0),
            Self::TimedOut => (3, 0),
            Self::Cancelled => (4, 0),
        }
    }

    fn join(kind: u8, value: i32) -> Option<Self> {
        Some(match kind {
            0 => Self::Code(value),
            1 => Self::Signal(value),
            2 => Self::StartFailed,
            3 => Self::TimedOut,
            4 => Self::Cancelled,
            _ => return None,
        })
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
            Self::StartFailed => f.write_str("could not start"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Environment variables of a step, kept encoded; iterate with [`EnvList::iter`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EnvList<'a> {
    count: u16,
    raw: &'a [u8],
}

impl<'a> EnvList<'a> {
    /// The (name, value) pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let mut r = Reader { buf: self.raw };
        (0..self.count).map(move |_| {
            // Validated when the frame was decoded.
            let k = r.str().expect("validated env");
            let v = r.str().expect("validated env");
            (k, v)
        })
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True when there are no variables.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl fmt::Debug for EnvList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The steps listed in a [`Frame::Running`], kept encoded: `(build, step, produced)` each.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StepList<'a> {
    count: u16,
    raw: &'a [u8],
}

/// Bytes per entry of a [`StepList`].
const STEP_ENTRY: usize = 8 + 4 + 8;

impl<'a> StepList<'a> {
    /// The (build, step, produced) entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32, u64)> + 'a {
        self.raw.chunks_exact(STEP_ENTRY).map(|e| {
            let b = u64::from_be_bytes(e[..8].try_into().unwrap());
            let s = u32::from_be_bytes(e[8..12].try_into().unwrap());
            let p = u64::from_be_bytes(e[12..].try_into().unwrap());
            (b, s, p)
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl fmt::Debug for StepList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Encode `(build, step, produced)` entries into `buf` for use in a [`Frame::Running`].
pub fn encode_steps(
    entries: impl IntoIterator<Item = (u64, u32, u64)>,
    buf: &mut [u8],
) -> Result<StepList<'_>, CodecError> {
    let mut w = Writer { buf, pos: 0 };
    let mut count: u16 = 0;
    for (b, s, p) in entries {
        count = count.checked_add(1).ok_or(CodecError::TooLarge)?;
        w.u64(b)?;
        w.u32(s)?;
        w.u64(p)?;
    }
    let n = w.pos;
    Ok(StepList { count, raw: &buf[..n] })
}

/// Everything the agent needs to run one `sh` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepStart<'a> {
    /// Build number.
    pub build: u64,
    /// Step index within the build, from 1.
    pub step: u32,
    /// Seconds before the step's process group is killed; 0 for none.
    pub timeout_secs: u32,
    /// Output bytes the agent may send before it needs more credit.
    pub credit: u32,
    /// Workspace directory name under the agent's work dir (already sanitised by the controller).
    pub workspace: &'a str,
    /// Directory relative to the workspace to run in ("" for the workspace itself).
    pub dir: &'a str,
    /// Shell program; the script runs as `SHELL -c SCRIPT`.
    pub shell: &'a str,
    /// The script.
    pub script: &'a str,
    /// Extra environment variables.
    pub env: EnvList<'a>,
    /// The sibling container to run the step in, through its step server; "" for the agent's own
    /// container. Always "" or a valid name ([`valid_container_name`]) once decoded.
    pub container: &'a str,
}

/// Whether `name` is a DNS-1123 label, as Kubernetes requires of container names:
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most `MAX_CONTAINER` bytes. Such a name is also one safe
/// path component (no `/`, no `.`, never empty).
pub fn valid_container_name(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= MAX_CONTAINER
        && inner(&b[0])
        && inner(&b[b.len() - 1])
        && b.iter().all(|c| inner(c) || *c == b'-')
}

/// One protocol frame. Borrowed from the buffer it was decoded from.
#[allow(missing_docs)] // fields are described in each variant's line
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Agent → controller, first frame: versions it speaks, its node name, capabilities, its nonce.
    Hello { min_version: u16, max_version: u16, name: &'a str, capabilities: u32, nonce: [u8; NONCE_LEN] },
    /// Controller → agent: the version chosen and the controller's nonce.
    Challenge { version: u16, nonce: [u8; NONCE_LEN] },
    /// Agent → controller: proof that the agent knows the node's secret.
    Auth { proof: [u8; NONCE_LEN] },
    /// Controller → agent: accepted; proof that the controller knows the secret too.
    Welcome { proof: [u8; NONCE_LEN], ping_interval_ms: u32 },
    /// Either way: refused, with a code and a sentence to print. The sender closes after it.
    Reject { code: RejectCode, message: &'a str },
    /// Controller → agent: run a step (type 10, or 19 when it names a container).
    StepStart(StepStart<'a>),
    /// Agent → controller: output bytes of a step starting at byte `offset` of its output.
    Output { build: u64, step: u32, offset: u64, data: &'a [u8] },
    /// Agent → controller: a step ended. `offset` is the total output length.
    Exit { build: u64, step: u32, status: ExitStatus, offset: u64, message: &'a str },
    /// Controller → agent: kill a step's process group.
    Cancel { build: u64, step: u32 },
    /// Controller → agent: output of a step is stored up to `stored` (the agent may forget it), and
    /// permission to send `bytes` more.
    Credit { build: u64, step: u32, bytes: u32, stored: u64 },
    /// Controller → agent: output of a step is stored up to `offset`.
    Ack { build: u64, step: u32, offset: u64 },
    /// Agent → controller, right after `Welcome`: the steps the agent is still running (or holds
    /// unsent output or an undelivered exit of), with the output length each has produced.
    Running { steps: StepList<'a> },
    /// Controller → agent, answering `Running`: go on with this step, sending output from `offset`
    /// (what the controller has stored), with `credit` bytes of credit.
    Resume { build: u64, step: u32, offset: u64, credit: u32 },
    /// Controller → agent, answering `Running`: the controller gave this step up (the build ended
    /// while the agent was away); kill its process group and forget it, reporting nothing.
    Abandon { build: u64, step: u32 },
    /// Either way: are you there? Answer with `Pong` carrying the same id.
    Ping { id: u64 },
    /// Either way: answer to `Ping`.
    Pong { id: u64 },
    /// Controller → agent (one that set [`CAP_AGENT_INFO`]): say what you are.
    InfoRequest,
    /// Agent → controller, answering `InfoRequest`: its version, CPU architecture and OS.
    AgentInfo { version: &'a str, arch: &'a str, os: &'a str },
    /// Controller → agent (one that set [`CAP_ARCHIVE`]): bytes of the archive an unpack step
    /// reads, from byte `offset`; empty `data` at the archive's length ends it.
    Put { build: u64, step: u32, offset: u64, data: &'a [u8] },
    /// Agent → controller: an unpack step has taken its archive up to `offset` (the controller
    /// keeps at most a window beyond it in flight, and sends again from here after a resume).
    Taken { build: u64, step: u32, offset: u64 },
}

const T_HELLO: u8 = 1;
const T_CHALLENGE: u8 = 2;
const T_AUTH: u8 = 3;
const T_WELCOME: u8 = 4;
const T_REJECT: u8 = 5;
const T_STEP_START: u8 = 10;
const T_OUTPUT: u8 = 11;
const T_EXIT: u8 = 12;
const T_CANCEL: u8 = 13;
const T_CREDIT: u8 = 14;
const T_ACK: u8 = 15;
const T_RUNNING: u8 = 16;
const T_RESUME: u8 = 17;
const T_ABANDON: u8 = 18;
/// A `StepStart` that names a container: the fields of type 10, then `container str`. A step for
/// the agent's own container keeps type 10 and its layout, so agents that predate containers
/// decode every step they can run; a controller sends type 19 only to an agent with
/// [`CAP_CONTAINER_STEPS`].
const T_STEP_START_IN: u8 = 19;
const T_PING: u8 = 20;
const T_PONG: u8 = 21;
const T_INFO_REQUEST: u8 = 22;
const T_AGENT_INFO: u8 = 23;
const T_PUT: u8 = 24;
const T_TAKEN: u8 = 25;

/// Why a frame could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    /// The frame is empty or ends before a field it announces.
    Truncated,
    /// The frame is larger than `MAX_FRAME`.
    TooLarge,
    /// The frame type byte is not one this version knows.
    UnknownType(u8),
    /// A field holds a value outside its range (bad enum, over-long name, invalid UTF-8).
    BadField(&'static str),
    /// Bytes remain after the last field.
    TrailingBytes,
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("truncated frame"),
            Self::TooLarge => write!(f, "frame larger than {MAX_FRAME} bytes"),
            Self::UnknownType(t) => write!(f, "unknown frame type {t}"),
            Self::BadField(name) => write!(f, "invalid field `{name}`"),
            Self::TrailingBytes => f.write_str("trailing bytes after frame"),
        }
    }
}

impl std::error::Error for CodecError {}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn i32(&mut self) -> Result<i32, CodecError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn nonce(&mut self) -> Result<[u8; NONCE_LEN], CodecError> {
        Ok(self.take(NONCE_LEN)?.try_into().unwrap())
    }
    fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<&'a str, CodecError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| CodecError::BadField("utf-8 string"))
    }
    fn short_str(&mut self, field: &'static str, max: usize) -> Result<&'a str, CodecError> {
        let s = self.str()?;
        if s.len() > max {
            return Err(CodecError::BadField(field));
        }
        Ok(s)
    }
}

/// Decode one frame from exactly `buf` (what a transport delivered, less the tag).
pub fn decode(buf: &[u8]) -> Result<Frame<'_>, CodecError> {
    if buf.len() > MAX_FRAME {
        return Err(CodecError::TooLarge);
    }
    let mut r = Reader { buf };
    let frame = match r.u8()? {
        T_HELLO => Frame::Hello {
            min_version: r.u16()?,
            max_version: r.u16()?,
            name: r.short_str("name", MAX_NAME)?,
            capabilities: r.u32()?,
            nonce: r.nonce()?,
        },
        T_CHALLENGE => Frame::Challenge { version: r.u16()?, nonce: r.nonce()? },
        T_AUTH => Frame::Auth { proof: r.nonce()? },
        T_WELCOME => Frame::Welcome { proof: r.nonce()?, ping_interval_ms: r.u32()? },
        T_REJECT => {
            let code = RejectCode::from_u8(r.u8()?).ok_or(CodecError::BadField("reject code"))?;
            Frame::Reject { code, message: r.short_str("message", MAX_MESSAGE)? }
        }
        t @ (T_STEP_START | T_STEP_START_IN) => {
            let build = r.u64()?;
            let step = r.u32()?;
            let timeout_secs = r.u32()?;
            let credit = r.u32()?;
            let workspace = r.short_str("workspace", MAX_WORKSPACE)?;
            let dir = r.short_str("dir", MAX_PATH)?;
            let shell = r.short_str("shell", MAX_PATH)?;
            let script = r.str()?;
            let count = r.u16()?;
            let start = r.buf;
            for _ in 0..count {
                r.str()?;
                r.str()?;
            }
            let raw = &start[..start.len() - r.buf.len()];
            let container = if t == T_STEP_START_IN {
                // Never "": a step for the agent itself has its own type, so each frame has one encoding.
                let c = r.short_str("container", MAX_CONTAINER)?;
                if !valid_container_name(c) {
                    return Err(CodecError::BadField("container"));
                }
                c
            } else {
                ""
            };
            Frame::StepStart(StepStart {
                build,
                step,
                timeout_secs,
                credit,
                workspace,
                dir,
                shell,
                script,
                env: EnvList { count, raw },
                container,
            })
        }
        T_OUTPUT => {
            let build = r.u64()?;
            let step = r.u32()?;
            let offset = r.u64()?;
            let data = r.bytes()?;
            if data.len() > MAX_OUTPUT_CHUNK {
                return Err(CodecError::BadField("output length"));
            }
            Frame::Output { build, step, offset, data }
        }
        T_EXIT => {
            let build = r.u64()?;
            let step = r.u32()?;
            let kind = r.u8()?;
            let value = r.i32()?;
            let status = ExitStatus::join(kind, value).ok_or(CodecError::BadField("exit kind"))?;
            let offset = r.u64()?;
            Frame::Exit { build, step, status, offset, message: r.short_str("message", MAX_MESSAGE)? }
        }
        T_CANCEL => Frame::Cancel { build: r.u64()?, step: r.u32()? },
        T_CREDIT => Frame::Credit { build: r.u64()?, step: r.u32()?, bytes: r.u32()?, stored: r.u64()? },
        T_RUNNING => {
            let count = r.u16()?;
            let raw = r.take(count as usize * STEP_ENTRY)?;
            Frame::Running { steps: StepList { count, raw } }
        }
        T_RESUME => Frame::Resume { build: r.u64()?, step: r.u32()?, offset: r.u64()?, credit: r.u32()? },
        T_ABANDON => Frame::Abandon { build: r.u64()?, step: r.u32()? },
        T_ACK => Frame::Ack { build: r.u64()?, step: r.u32()?, offset: r.u64()? },
        T_PING => Frame::Ping { id: r.u64()? },
        T_PONG => Frame::Pong { id: r.u64()? },
        T_INFO_REQUEST => Frame::InfoRequest,
        T_AGENT_INFO => Frame::AgentInfo {
            version: r.short_str("version", MAX_INFO)?,
            arch: r.short_str("arch", MAX_INFO)?,
            os: r.short_str("os", MAX_INFO)?,
        },
        T_PUT => {
            let build = r.u64()?;
            let step = r.u32()?;
            let offset = r.u64()?;
            let data = r.bytes()?;
            if data.len() > MAX_PUT_CHUNK {
                return Err(CodecError::BadField("put length"));
            }
            Frame::Put { build, step, offset, data }
        }
        T_TAKEN => Frame::Taken { build: r.u64()?, step: r.u32()?, offset: r.u64()? },
        t => return Err(CodecError::UnknownType(t)),
    };
    if !r.buf.is_empty() {
        return Err(CodecError::TrailingBytes);
    }
    Ok(frame)
}

/// Writes a frame into a caller-owned, fixed-size buffer.
struct Writer<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), CodecError> {
        let end = self.pos.checked_add(bytes.len()).ok_or(CodecError::TooLarge)?;
        if end > self.buf.len() || end > MAX_FRAME {
            return Err(CodecError::TooLarge);
        }
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
    fn u8(&mut self, v: u8) -> Result<(), CodecError> {
        self.put(&[v])
    }
    fn u16(&mut self, v: u16) -> Result<(), CodecError> {
        self.put(&v.to_be_bytes())
    }
    fn u32(&mut self, v: u32) -> Result<(), CodecError> {
        self.put(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) -> Result<(), CodecError> {
        self.put(&v.to_be_bytes())
    }
    fn bytes(&mut self, b: &[u8]) -> Result<(), CodecError> {
        let n = u32::try_from(b.len()).map_err(|_| CodecError::TooLarge)?;
        self.u32(n)?;
        self.put(b)
    }
    fn short_str(&mut self, s: &str, field: &'static str, max: usize) -> Result<(), CodecError> {
        if s.len() > max {
            return Err(CodecError::BadField(field));
        }
        self.bytes(s.as_bytes())
    }
}

/// Encode a frame into `buf`, returning the number of bytes written.
///
/// Fails with `TooLarge` when the frame does not fit `buf` or `MAX_FRAME`, and with `BadField`
/// when a field breaks a limit the decoder enforces, so whatever encodes also decodes.
pub fn encode(frame: &Frame<'_>, buf: &mut [u8]) -> Result<usize, CodecError> {
    let mut w = Writer { buf, pos: 0 };
    match *frame {
        Frame::Hello { min_version, max_version, name, capabilities, nonce } => {
            w.u8(T_HELLO)?;
            w.u16(min_version)?;
            w.u16(max_version)?;
            w.short_str(name, "name", MAX_NAME)?;
            w.u32(capabilities)?;
            w.put(&nonce)?;
        }
        Frame::Challenge { version, nonce } => {
            w.u8(T_CHALLENGE)?;
            w.u16(version)?;
            w.put(&nonce)?;
        }
        Frame::Auth { proof } => {
            w.u8(T_AUTH)?;
            w.put(&proof)?;
        }
        Frame::Welcome { proof, ping_interval_ms } => {
            w.u8(T_WELCOME)?;
            w.put(&proof)?;
            w.u32(ping_interval_ms)?;
        }
        Frame::Reject { code, message } => {
            w.u8(T_REJECT)?;
            w.u8(code as u8)?;
            w.short_str(message, "message", MAX_MESSAGE)?;
        }
        Frame::StepStart(s) => {
            if !s.container.is_empty() && !valid_container_name(s.container) {
                return Err(CodecError::BadField("container"));
            }
            w.u8(if s.container.is_empty() { T_STEP_START } else { T_STEP_START_IN })?;
            w.u64(s.build)?;
            w.u32(s.step)?;
            w.u32(s.timeout_secs)?;
            w.u32(s.credit)?;
            w.short_str(s.workspace, "workspace", MAX_WORKSPACE)?;
            w.short_str(s.dir, "dir", MAX_PATH)?;
            w.short_str(s.shell, "shell", MAX_PATH)?;
            w.bytes(s.script.as_bytes())?;
            w.u16(s.env.count)?;
            w.put(s.env.raw)?;
            if !s.container.is_empty() {
                w.bytes(s.container.as_bytes())?;
            }
        }
        Frame::Output { build, step, offset, data } => {
            if data.len() > MAX_OUTPUT_CHUNK {
                return Err(CodecError::BadField("output length"));
            }
            w.u8(T_OUTPUT)?;
            w.u64(build)?;
            w.u32(step)?;
            w.u64(offset)?;
            w.bytes(data)?;
        }
        Frame::Exit { build, step, status, offset, message } => {
            let (kind, value) = status.split();
            w.u8(T_EXIT)?;
            w.u64(build)?;
            w.u32(step)?;
            w.u8(kind)?;
            w.u32(value as u32)?;
            w.u64(offset)?;
            w.short_str(message, "message", MAX_MESSAGE)?;
        }
        Frame::Cancel { build, step } => {
            w.u8(T_CANCEL)?;
            w.u64(build)?;
            w.u32(step)?;
        }
        Frame::Credit { build, step, bytes, stored } => {
            w.u8(T_CREDIT)?;
            w.u64(build)?;
            w.u32(step)?;
            w.u32(bytes)?;
            w.u64(stored)?;
        }
        Frame::Running { steps } => {
            w.u8(T_RUNNING)?;
            w.u16(steps.count)?;
            w.put(steps.raw)?;
        }
        Frame::Resume { build, step, offset, credit } => {
            w.u8(T_RESUME)?;
            w.u64(build)?;
            w.u32(step)?;
            w.u64(offset)?;
            w.u32(credit)?;
        }
        Frame::Abandon { build, step } => {
            w.u8(T_ABANDON)?;
            w.u64(build)?;
            w.u32(step)?;
        }
        Frame::Ack { build, step, offset } => {
            w.u8(T_ACK)?;
            w.u64(build)?;
            w.u32(step)?;
            w.u64(offset)?;
        }
        Frame::Ping { id } => {
            w.u8(T_PING)?;
            w.u64(id)?;
        }
        Frame::Pong { id } => {
            w.u8(T_PONG)?;
            w.u64(id)?;
        }
        Frame::InfoRequest => w.u8(T_INFO_REQUEST)?,
        Frame::Put { build, step, offset, data } => {
            if data.len() > MAX_PUT_CHUNK {
                return Err(CodecError::BadField("put length"));
            }
            w.u8(T_PUT)?;
            w.u64(build)?;
            w.u32(step)?;
            w.u64(offset)?;
            w.bytes(data)?;
        }
        Frame::Taken { build, step, offset } => {
            w.u8(T_TAKEN)?;
            w.u64(build)?;
            w.u32(step)?;
            w.u64(offset)?;
        }
        Frame::AgentInfo { version, arch, os } => {
            w.u8(T_AGENT_INFO)?;
            w.short_str(version, "version", MAX_INFO)?;
            w.short_str(arch, "arch", MAX_INFO)?;
            w.short_str(os, "os", MAX_INFO)?;
        }
    }
    Ok(w.pos)
}

/// Bytes in front of the payload of an encoded `Output` frame: type, build, step, offset, length.
pub const OUTPUT_HEADER: usize = 1 + 8 + 4 + 8 + 4;

/// Write the header of an `Output` frame whose `len` payload bytes follow it directly in the same
/// buffer, so a step's output can be read straight into place and sent without a copy. The
/// header plus payload is byte for byte what [`encode`] makes of the same frame.
pub fn encode_output_header(
    build: u64,
    step: u32,
    offset: u64,
    len: usize,
    buf: &mut [u8; OUTPUT_HEADER],
) -> Result<(), CodecError> {
    if len > MAX_OUTPUT_CHUNK {
        return Err(CodecError::BadField("output length"));
    }
    let mut w = Writer { buf, pos: 0 };
    w.u8(T_OUTPUT)?;
    w.u64(build)?;
    w.u32(step)?;
    w.u64(offset)?;
    w.u32(len as u32)
}

/// Encode an environment list into `buf` for use in a [`StepStart`]; returns the list.
pub fn encode_env<'b, 'k>(
    vars: impl IntoIterator<Item = (&'k str, &'k str)>,
    buf: &'b mut [u8],
) -> Result<EnvList<'b>, CodecError> {
    let mut w = Writer { buf, pos: 0 };
    let mut count: u16 = 0;
    for (k, v) in vars {
        w.bytes(k.as_bytes())?;
        w.bytes(v.as_bytes())?;
        count = count.checked_add(1).ok_or(CodecError::TooLarge)?;
    }
    let len = w.pos;
    Ok(EnvList { count, raw: &buf[..len] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame<'_>) {
        let mut buf = vec![0u8; MAX_FRAME];
        let n = encode(&f, &mut buf).unwrap();
        assert_eq!(decode(&buf[..n]).unwrap(), f);
        // Every strict prefix is rejected as truncated, never accepted or panicking.
        for cut in 0..n {
            assert!(decode(&buf[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
    }

    #[test]
    fn every_frame_type_round_trips() {
        let mut envbuf = [0u8; 256];
        let env = encode_env([("A", "1"), ("PATH", "/bin")], &mut envbuf).unwrap();
        round_trip(Frame::Hello {
            min_version: 1,
            max_version: 3,
            name: "n1",
            capabilities: 7,
            nonce: [9; 32],
        });
        round_trip(Frame::Challenge { version: 1, nonce: [1; 32] });
        round_trip(Frame::Auth { proof: [2; 32] });
        round_trip(Frame::Welcome { proof: [3; 32], ping_interval_ms: 1000 });
        round_trip(Frame::Reject { code: RejectCode::WrongSecret, message: "no" });
        round_trip(Frame::Reject { code: RejectCode::Overloaded, message: "busy" });
        round_trip(Frame::StepStart(StepStart {
            build: 7,
            step: 1,
            timeout_secs: 5,
            credit: 65536,
            workspace: "hello",
            dir: "sub",
            shell: "/bin/sh",
            script: "echo hi",
            env,
            container: "",
        }));
        round_trip(Frame::StepStart(StepStart {
            build: 7,
            step: 2,
            timeout_secs: 0,
            credit: 1,
            workspace: "hello",
            dir: "/abs/dir",
            shell: "/bin/sh",
            script: "make",
            env,
            container: "build-1",
        }));
        round_trip(Frame::Output { build: 1, step: 2, offset: 3, data: b"\0\xffabc" });
        // The in-place header matches what encode makes of the whole frame.
        let data = b"\0\xffabc";
        let mut whole = [0u8; 64];
        let n = encode(&Frame::Output { build: 1, step: 2, offset: 3, data }, &mut whole).unwrap();
        let mut head = [0u8; OUTPUT_HEADER];
        encode_output_header(1, 2, 3, data.len(), &mut head).unwrap();
        assert_eq!(n, OUTPUT_HEADER + data.len());
        assert_eq!(&whole[..OUTPUT_HEADER], &head);
        assert!(encode_output_header(1, 2, 3, MAX_OUTPUT_CHUNK + 1, &mut head).is_err());
        round_trip(Frame::Exit { build: 1, step: 2, status: ExitStatus::Signal(9), offset: 10, message: "" });
        round_trip(Frame::Cancel { build: 1, step: 2 });
        round_trip(Frame::Credit { build: 1, step: 2, bytes: 3, stored: 4 });
        let mut sb = [0u8; 64];
        let steps = encode_steps([(1, 2, 3), (u64::MAX, 9, 1 << 40)], &mut sb).unwrap();
        assert_eq!(steps.iter().collect::<Vec<_>>(), vec![(1, 2, 3), (u64::MAX, 9, 1 << 40)]);
        round_trip(Frame::Running { steps });
        round_trip(Frame::Running { steps: encode_steps([], &mut sb).unwrap() });
        round_trip(Frame::Resume { build: 1, step: 2, offset: 3, credit: 4 });
        round_trip(Frame::Abandon { build: 1, step: 2 });
        // A Running frame claiming more entries than it carries.
        assert_eq!(decode(&[T_RUNNING, 0, 2, 0, 0]), Err(CodecError::Truncated));
        round_trip(Frame::Ack { build: 1, step: 2, offset: 3 });
        round_trip(Frame::Ping { id: 4 });
        round_trip(Frame::Pong { id: 4 });
        round_trip(Frame::InfoRequest);
        round_trip(Frame::AgentInfo { version: "0.1.0", arch: "aarch64", os: "linux" });
        round_trip(Frame::Put { build: 3, step: 4, offset: 1 << 40, data: &[1, 2, 3] });
        round_trip(Frame::Put { build: 3, step: 4, offset: 9, data: &[] });
        round_trip(Frame::Taken { build: 3, step: 4, offset: 65536 });
    }

    #[test]
    fn reject_codes_keep_their_wire_values_and_unknown_ones_do_not_decode() {
        let mut buf = [0u8; 64];
        let n = encode(&Frame::Reject { code: RejectCode::Overloaded, message: "" }, &mut buf).unwrap();
        assert_eq!(&buf[..2], &[T_REJECT, 7]);
        // What an agent that predates a code sees: a frame it cannot decode.
        buf[1] = 8;
        assert_eq!(decode(&buf[..n]), Err(CodecError::BadField("reject code")));
        assert!(RejectCode::Overloaded.is_retryable() && RejectCode::TryLater.is_retryable());
        assert!(!RejectCode::WrongSecret.is_retryable() && !RejectCode::ProtocolError.is_retryable());
    }

    #[test]
    fn a_step_for_the_agent_itself_keeps_the_old_layout_and_container_names_are_checked() {
        let mut envbuf = [0u8; 64];
        let env = encode_env([("A", "1")], &mut envbuf).unwrap();
        let local = StepStart {
            build: 1,
            step: 1,
            timeout_secs: 0,
            credit: 9,
            workspace: "w",
            dir: "",
            shell: "/bin/sh",
            script: "true",
            env,
            container: "",
        };
        let mut buf = [0u8; 256];
        let n = encode(&Frame::StepStart(local), &mut buf).unwrap();
        // Type 10, ending with the environment: what agents before containers decode.
        assert_eq!(buf[0], T_STEP_START);
        assert!(buf[..n].ends_with(b"\0\0\0\x01A\0\0\0\x011"));
        let mut inbuild = [0u8; 256];
        let m = encode(&Frame::StepStart(StepStart { container: "build", ..local }), &mut inbuild).unwrap();
        assert_eq!((inbuild[0], m), (T_STEP_START_IN, n + 4 + 5));
        assert_eq!(&inbuild[1..n], &buf[1..n]);
        for bad in ["Build", "-a", "a-", "a.b", "a/b", "..", &"a".repeat(MAX_CONTAINER + 1)] {
            assert!(!valid_container_name(bad), "{bad}");
            let f = Frame::StepStart(StepStart { container: bad, ..local });
            assert_eq!(encode(&f, &mut [0u8; 512]), Err(CodecError::BadField("container")), "{bad}");
        }
        for good in ["a", "build", "b-1", "0", &"a".repeat(MAX_CONTAINER)] {
            assert!(valid_container_name(good), "{good}");
        }
        // Type 19 with an empty or invalid name does not decode: "" has its own type.
        let mut raw = buf[..n].to_vec();
        raw[0] = T_STEP_START_IN;
        let mut empty = raw.clone();
        empty.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(decode(&empty), Err(CodecError::BadField("container")));
        raw.extend_from_slice(&[0, 0, 0, 3, b'a', b'/', b'b']);
        assert_eq!(decode(&raw), Err(CodecError::BadField("container")));
    }

    #[test]
    fn env_iterates_in_order() {
        let mut envbuf = [0u8; 256];
        let env = encode_env([("A", "1"), ("B", "two")], &mut envbuf).unwrap();
        assert_eq!(env.iter().collect::<Vec<_>>(), vec![("A", "1"), ("B", "two")]);
    }

    #[test]
    fn claimed_lengths_beyond_the_frame_are_truncation_not_allocation() {
        // An Output frame claiming a 4 GiB payload in a 30-byte frame.
        let mut f = vec![T_OUTPUT];
        f.extend_from_slice(&[0; 8 + 4 + 8]);
        f.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&f), Err(CodecError::Truncated));
    }

    #[test]
    fn oversized_unknown_and_trailing_frames_are_rejected() {
        assert_eq!(decode(&vec![T_PING; MAX_FRAME + 1]), Err(CodecError::TooLarge));
        assert_eq!(decode(&[200]), Err(CodecError::UnknownType(200)));
        assert_eq!(decode(&[]), Err(CodecError::Truncated));
        let mut f = vec![T_PING];
        f.extend_from_slice(&[0; 9]);
        assert_eq!(decode(&f), Err(CodecError::TrailingBytes));
    }

    #[test]
    fn over_long_fields_are_refused_when_encoding() {
        let mut buf = vec![0u8; MAX_FRAME];
        let long = "x".repeat(MAX_NAME + 1);
        let f = Frame::Hello { min_version: 1, max_version: 1, name: &long, capabilities: 0, nonce: [0; 32] };
        assert_eq!(encode(&f, &mut buf), Err(CodecError::BadField("name")));
        let big = vec![0u8; MAX_OUTPUT_CHUNK + 1];
        let f = Frame::Output { build: 1, step: 1, offset: 0, data: &big };
        assert!(encode(&f, &mut buf).is_err());
    }
}
