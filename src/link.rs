//! A framed link over WebSocket (one binary message per frame) or TCP (u32 length prefix), split
//! into a reader and a writer half. The TCP reader has a fixed buffer of one wire frame that it reads
//! ahead into (one read can bring several small frames); the writer encodes control frames into a
//! small buffer that grows (to `MAX_FRAME` at most) only for the large frames its own side sends,
//! and step output goes out from an [`OutputBuf`] the step reads its pipe into, so the agent never
//! copies output.
//!
//! Once the handshake is done both halves are keyed ([`LinkReader::authenticate`],
//! [`LinkWriter::authenticate`]): every frame then carries a `TAG_LEN`-byte tag, the first bytes of
//! HMAC-SHA256(direction key, sequence number ‖ frame), and a frame whose tag does not verify ends
//! the link. Frames cannot be forged, replayed, reordered or dropped by anyone in the middle.

use crate::proto::{self, CodecError, Frame, MAX_FRAME, MAX_OUTPUT_CHUNK, OUTPUT_HEADER};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{self, Message};
use async_tungstenite::{WebSocketReceiver, WebSocketSender, WebSocketStream};
use ring::hmac;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::stream::StreamExt;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// Any byte stream a link can run over (TCP, TLS over TCP, an upgraded HTTP connection).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A boxed byte stream.
pub type BoxIo = Pin<Box<dyn Io>>;

/// Bytes of the authentication tag on each frame after the handshake.
pub const TAG_LEN: usize = 16;

/// Largest frame on the wire: a frame and its tag.
pub const MAX_WIRE_FRAME: usize = MAX_FRAME + TAG_LEN;

/// Per-direction frame authentication: key and sequence number.
struct Mac {
    key: hmac::Key,
    seq: u64,
}

impl Mac {
    fn new(key: &[u8; 32]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, key), seq: 0 }
    }

    fn tag(&mut self, frame: &[u8]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&self.seq.to_be_bytes());
        ctx.update(frame);
        self.seq += 1;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
        t
    }

    /// Check the tag at the end of `wire`; returns the frame before it.
    fn open<'a>(&mut self, wire: &'a [u8]) -> Result<&'a [u8], LinkError> {
        let Some(split) = wire.len().checked_sub(TAG_LEN) else {
            return Err(LinkError::Protocol("frame shorter than its authentication tag".into()));
        };
        let (frame, tag) = wire.split_at(split);
        if !crate::auth::constant_time_eq(&self.tag(frame), tag) {
            return Err(LinkError::Protocol(
                "frame authentication failed: the frame was altered, replayed or forged on the way".into(),
            ));
        }
        Ok(frame)
    }
}

/// Notices a link that went quiet: [`Watchdog::expired`] completes once no frame was
/// [fed](Watchdog::fed) for the whole period.
///
/// One timer serves the link's life and is re-armed only when it fires. A fresh timer per frame
/// (racing each read against `Timer::after`) costs a reactor wake-up per frame, because async-io
/// wakes its poller whenever a timer is added: a context switch per frame while streaming.
pub struct Watchdog {
    timer: smol::Timer,
    last: Instant,
    period: Duration,
}

impl Watchdog {
    /// A watchdog that expires `period` after the last frame (counting from now).
    pub fn new(period: Duration) -> Self {
        Self { timer: smol::Timer::after(period), last: Instant::now(), period }
    }

    /// A frame arrived.
    pub fn fed(&mut self) {
        self.last = Instant::now();
    }

    /// `fut`'s output (which counts as a frame), or None when the link went quiet first.
    pub async fn guard<T>(&mut self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        let out = smol::future::or(async { Some(fut.await) }, async {
            self.expired().await;
            None
        })
        .await;
        if out.is_some() {
            self.fed();
        }
        out
    }

    /// Completes when `period` has passed since the last frame; cancel-safe.
    async fn expired(&mut self) {
        loop {
            (&mut self.timer).await;
            let due = self.last + self.period;
            if Instant::now() >= due {
                return;
            }
            self.timer.set_at(due);
        }
    }
}

/// WebSocket limits: tungstenite's defaults (64 MiB messages, unlimited write buffer) are far
/// beyond what a frame can be, so a peer cannot make us buffer more than one frame.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_WIRE_FRAME))
        .max_frame_size(Some(MAX_WIRE_FRAME))
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * MAX_WIRE_FRAME)
}

/// Why a link failed.
#[derive(Debug)]
pub enum LinkError {
    /// The byte stream failed.
    Io(io::Error),
    /// The WebSocket layer failed (bad framing, limits exceeded).
    Ws(tungstenite::Error),
    /// A frame could not be decoded.
    Codec(CodecError),
    /// The peer sent a text message or a length prefix over `MAX_FRAME`.
    Protocol(String),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "connection error: {e}"),
            Self::Ws(e) => write!(f, "websocket error: {e}"),
            Self::Codec(e) => write!(f, "bad frame: {e}"),
            Self::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for LinkError {}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<tungstenite::Error> for LinkError {
    fn from(e: tungstenite::Error) -> Self {
        Self::Ws(e)
    }
}

impl From<CodecError> for LinkError {
    fn from(e: CodecError) -> Self {
        Self::Codec(e)
    }
}

enum ReadKind {
    Ws(WebSocketReceiver<BoxIo>, Option<Message>),
    Tcp(ReadAhead),
}

/// The TCP read side: bytes read ahead into a buffer of one wire frame, `buf[start..end]` not yet
/// taken. One read fetches as much as has arrived, so small frames cost no read each and a length
/// prefix no read of its own.
struct ReadAhead {
    r: smol::io::ReadHalf<BoxIo>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    /// Read until `need` bytes (at most the buffer) are held, moving what is held to the front when
    /// the rest would not fit. False on end of stream with nothing held; end of stream with part
    /// of what is needed is an `UnexpectedEof` error.
    async fn fill(&mut self, need: usize) -> Result<bool, LinkError> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        while self.end - self.start < need {
            if self.start + need > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            let n = self.r.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                if self.start == self.end {
                    return Ok(false);
                }
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            self.end += n;
        }
        Ok(true)
    }

    /// Take the next `n` bytes held (after a `fill` of at least `n`).
    fn take(&mut self, n: usize) -> &[u8] {
        let at = self.start;
        self.start += n;
        &self.buf[at..at + n]
    }
}

enum WriteKind {
    /// The sender, and the buffer each message is built in: its allocation is reclaimed for the
    /// next message once the WebSocket layer has copied the last one out (no allocation per frame,
    /// which with musl's allocator would be an mmap and a munmap per 32 KiB of output).
    Ws(WebSocketSender<BoxIo>, bytes::BytesMut),
    Tcp(smol::io::WriteHalf<BoxIo>),
}

/// The receiving half of a link.
pub struct LinkReader {
    kind: ReadKind,
    mac: Option<Mac>,
}

/// The sending half of a link.
pub struct LinkWriter {
    kind: WriteKind,
    /// Room for the TCP length prefix, one encoded frame and its tag; starts at `SMALL_SEND`.
    buf: Vec<u8>,
    mac: Option<Mac>,
}

/// Encoding room a writer starts with: every control frame fits (the largest, `Exit` and
/// `Reject`, carry a message of at most `MAX_MESSAGE` bytes).
const SMALL_SEND: usize = 2 * 1024;

/// One `Output` frame under construction: a step reads its pipe into [`OutputBuf::space`], and
/// [`LinkWriter::send_output`] sends header and payload from here as they lie.
pub struct OutputBuf {
    buf: Box<[u8]>,
}

impl Default for OutputBuf {
    fn default() -> Self {
        Self { buf: vec![0; 4 + OUTPUT_HEADER + MAX_OUTPUT_CHUNK + TAG_LEN].into_boxed_slice() }
    }
}

impl OutputBuf {
    /// Where the payload goes: `MAX_OUTPUT_CHUNK` bytes.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf[4 + OUTPUT_HEADER..4 + OUTPUT_HEADER + MAX_OUTPUT_CHUNK]
    }
}

/// Split a TCP (or TLS) byte stream into a length-prefixed link.
pub fn tcp(io: BoxIo) -> (LinkReader, LinkWriter) {
    let (r, w) = smol::io::split(io);
    (
        LinkReader {
            kind: ReadKind::Tcp(ReadAhead {
                r,
                buf: vec![0; MAX_WIRE_FRAME].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            mac: None,
        },
        LinkWriter { kind: WriteKind::Tcp(w), buf: vec![0; 4 + SMALL_SEND + TAG_LEN], mac: None },
    )
}

/// Split an established WebSocket into a link.
pub fn websocket(ws: WebSocketStream<BoxIo>) -> (LinkReader, LinkWriter) {
    let (w, r) = ws.split();
    (
        LinkReader { kind: ReadKind::Ws(r, None), mac: None },
        LinkWriter {
            kind: WriteKind::Ws(w, bytes::BytesMut::new()),
            buf: vec![0; 4 + SMALL_SEND + TAG_LEN],
            mac: None,
        },
    )
}

impl LinkReader {
    /// From now on every frame must carry a valid tag under `key`.
    pub fn authenticate(&mut self, key: &[u8; 32]) {
        self.mac = Some(Mac::new(key));
    }

    /// The next frame, or None when the peer closed the link cleanly.
    ///
    /// Not cancel-safe: run it in its own task rather than racing it against other futures.
    pub async fn next(&mut self) -> Result<Option<Frame<'_>>, LinkError> {
        match &mut self.kind {
            ReadKind::Tcp(ra) => {
                if !ra.fill(4).await? {
                    return Ok(None);
                }
                let len = u32::from_be_bytes(ra.take(4).try_into().expect("4 bytes")) as usize;
                let limit = if self.mac.is_some() { MAX_WIRE_FRAME } else { MAX_FRAME };
                if len > limit {
                    return Err(LinkError::Protocol(format!(
                        "length prefix {len} is over the {limit}-byte frame limit (is this a wisp agent port?)"
                    )));
                }
                if !ra.fill(len).await? {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
                let wire = ra.take(len);
                let frame = match &mut self.mac {
                    Some(mac) => mac.open(wire)?,
                    None => wire,
                };
                Ok(Some(proto::decode(frame)?))
            }
            ReadKind::Ws(r, held) => {
                loop {
                    match r.next().await {
                        None => return Ok(None),
                        Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(None),
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(m @ Message::Binary(_))) => {
                            // Kept until the next call so the decoded frame can borrow from it.
                            *held = Some(m);
                            break;
                        }
                        Some(Ok(Message::Close(_))) => return Ok(None),
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Text(_))) => {
                            return Err(LinkError::Protocol("text message on a binary link".into()))
                        }
                    }
                }
                match held {
                    Some(Message::Binary(b)) => {
                        let frame = match &mut self.mac {
                            Some(mac) => mac.open(b)?,
                            None => &b[..],
                        };
                        Ok(Some(proto::decode(frame)?))
                    }
                    _ => unreachable!("a binary message was just stored"),
                }
            }
        }
    }
}

impl LinkWriter {
    /// From now on every frame carries a tag under `key`.
    pub fn authenticate(&mut self, key: &[u8; 32]) {
        self.mac = Some(Mac::new(key));
    }

    /// Encode and send one frame, flushing it to the peer.
    pub async fn send(&mut self, frame: &Frame<'_>) -> Result<(), LinkError> {
        let room = self.buf.len() - TAG_LEN;
        let mut n = match proto::encode(frame, &mut self.buf[4..room]) {
            Err(CodecError::TooLarge) if self.buf.len() < 4 + MAX_WIRE_FRAME => {
                self.buf.resize(4 + MAX_WIRE_FRAME, 0);
                proto::encode(frame, &mut self.buf[4..4 + MAX_FRAME])?
            }
            r => r?,
        };
        if let Some(mac) = &mut self.mac {
            let tag = mac.tag(&self.buf[4..4 + n]);
            self.buf[4 + n..4 + n + TAG_LEN].copy_from_slice(&tag);
            n += TAG_LEN;
        }
        Self::put(&mut self.kind, &mut self.buf[..4 + n]).await
    }

    /// Send the first `len` bytes of `out`'s space as the output of `step` of `build` at `offset`.
    pub async fn send_output(
        &mut self,
        out: &mut OutputBuf,
        build: u64,
        step: u32,
        offset: u64,
        len: usize,
    ) -> Result<(), LinkError> {
        let head: &mut [u8; OUTPUT_HEADER] = (&mut out.buf[4..4 + OUTPUT_HEADER]).try_into().unwrap();
        proto::encode_output_header(build, step, offset, len, head)?;
        let mut end = 4 + OUTPUT_HEADER + len;
        if let Some(mac) = &mut self.mac {
            let tag = mac.tag(&out.buf[4..end]);
            out.buf[end..end + TAG_LEN].copy_from_slice(&tag);
            end += TAG_LEN;
        }
        Self::put(&mut self.kind, &mut out.buf[..end]).await
    }

    /// Send one encoded frame that lies in `buf` after 4 bytes of room for the length prefix.
    async fn put(kind: &mut WriteKind, buf: &mut [u8]) -> Result<(), LinkError> {
        let n = buf.len() - 4;
        match kind {
            WriteKind::Tcp(w) => {
                buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
                w.write_all(buf).await?;
                w.flush().await?;
            }
            WriteKind::Ws(w, msg) => {
                msg.reserve(n);
                msg.extend_from_slice(&buf[4..]);
                w.send(Message::Binary(msg.split().freeze())).await?;
            }
        }
        Ok(())
    }

    /// Close the link politely (WebSocket close frame or TCP shutdown); errors are ignored.
    pub async fn close(&mut self) {
        match &mut self.kind {
            WriteKind::Tcp(w) => {
                let _ = w.close().await;
            }
            WriteKind::Ws(w, _) => {
                let _ = w.close(None).await;
            }
        }
    }
}
