//! A framed link over WebSocket (one binary message per frame) or TCP (u32 length prefix), split
//! into a reader and a writer half. The TCP reader has a fixed buffer of `MAX_FRAME` bytes; the
//! writer encodes control frames into a small buffer that grows (to `MAX_FRAME` at most) only for
//! the large frames its own side sends, and step output goes out from an [`OutputBuf`] the step
//! reads its pipe into, so the agent never copies output.

use crate::proto::{self, CodecError, Frame, MAX_FRAME, MAX_OUTPUT_CHUNK, OUTPUT_HEADER};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{self, Message};
use async_tungstenite::{WebSocketReceiver, WebSocketSender, WebSocketStream};
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::stream::StreamExt;
use std::fmt;
use std::io;
use std::pin::Pin;

/// Any byte stream a link can run over (TCP, TLS over TCP, an upgraded HTTP connection).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A boxed byte stream.
pub type BoxIo = Pin<Box<dyn Io>>;

/// WebSocket limits: tungstenite's defaults (64 MiB messages, unlimited write buffer) are far
/// beyond what a frame can be, so a peer cannot make us buffer more than one frame.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * MAX_FRAME)
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
    Tcp(smol::io::ReadHalf<BoxIo>),
}

enum WriteKind {
    Ws(WebSocketSender<BoxIo>),
    Tcp(smol::io::WriteHalf<BoxIo>),
}

/// The receiving half of a link.
pub struct LinkReader {
    kind: ReadKind,
    buf: Box<[u8]>,
}

/// The sending half of a link.
pub struct LinkWriter {
    kind: WriteKind,
    /// Room for the TCP length prefix and one encoded frame; starts at `SMALL_SEND`.
    buf: Vec<u8>,
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
        Self { buf: vec![0; 4 + OUTPUT_HEADER + MAX_OUTPUT_CHUNK].into_boxed_slice() }
    }
}

impl OutputBuf {
    /// Where the payload goes: `MAX_OUTPUT_CHUNK` bytes.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf[4 + OUTPUT_HEADER..]
    }
}

/// Split a TCP (or TLS) byte stream into a length-prefixed link.
pub fn tcp(io: BoxIo) -> (LinkReader, LinkWriter) {
    let (r, w) = smol::io::split(io);
    (
        LinkReader { kind: ReadKind::Tcp(r), buf: vec![0; MAX_FRAME].into_boxed_slice() },
        LinkWriter { kind: WriteKind::Tcp(w), buf: vec![0; 4 + SMALL_SEND] },
    )
}

/// Split an established WebSocket into a link.
pub fn websocket(ws: WebSocketStream<BoxIo>) -> (LinkReader, LinkWriter) {
    let (w, r) = ws.split();
    (
        LinkReader { kind: ReadKind::Ws(r, None), buf: Box::new([]) },
        LinkWriter { kind: WriteKind::Ws(w), buf: vec![0; 4 + SMALL_SEND] },
    )
}

impl LinkReader {
    /// The next frame, or None when the peer closed the link cleanly.
    ///
    /// Not cancel-safe: run it in its own task rather than racing it against other futures.
    pub async fn next(&mut self) -> Result<Option<Frame<'_>>, LinkError> {
        match &mut self.kind {
            ReadKind::Tcp(r) => {
                let mut len = [0u8; 4];
                match r.read_exact(&mut len).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
                let len = u32::from_be_bytes(len) as usize;
                if len > MAX_FRAME {
                    return Err(LinkError::Protocol(format!(
                        "length prefix {len} is over the {MAX_FRAME}-byte frame limit (is this a wisp agent port?)"
                    )));
                }
                r.read_exact(&mut self.buf[..len]).await?;
                Ok(Some(proto::decode(&self.buf[..len])?))
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
                    Some(Message::Binary(b)) => Ok(Some(proto::decode(b)?)),
                    _ => unreachable!("a binary message was just stored"),
                }
            }
        }
    }
}

impl LinkWriter {
    /// Encode and send one frame, flushing it to the peer.
    pub async fn send(&mut self, frame: &Frame<'_>) -> Result<(), LinkError> {
        let n = match proto::encode(frame, &mut self.buf[4..]) {
            Err(CodecError::TooLarge) if self.buf.len() < 4 + MAX_FRAME => {
                self.buf.resize(4 + MAX_FRAME, 0);
                proto::encode(frame, &mut self.buf[4..])?
            }
            r => r?,
        };
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
        Self::put(&mut self.kind, &mut out.buf[..4 + OUTPUT_HEADER + len]).await
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
            WriteKind::Ws(w) => {
                w.send(Message::Binary(buf[4..].to_vec().into())).await?;
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
            WriteKind::Ws(w) => {
                let _ = w.close(None).await;
            }
        }
    }
}
