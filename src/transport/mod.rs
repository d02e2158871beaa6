//! Frame transports: how one whole frame crosses one kind of wire. [`crate::link`] tags, encodes
//! and decodes frames over any of them and never knows which wire it uses.
//!
//! A connected wire ([`Transport`]) splits into a receiving half ([`FrameRecv`]) and a sending half
//! ([`FrameSend`]), which the link's reader and writer tasks use apart. Neither half copies or
//! allocates per frame: a received frame is lent out of a buffer the half keeps and reuses (valid
//! until the next receive), and a frame is sent from where the caller built it, with
//! [`HEADROOM`] bytes free in front for the wire's own header.
//!
//! - [`tcp`]: a byte stream (TCP, or TLS over TCP): a `u32` big-endian length, then the frame.
//! - [`websocket`]: one binary WebSocket message per frame.
//! - `kafka` (feature `kafka`): one Kafka record per frame, a partition per direction of a
//!   topic per node.

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod tcp;
pub mod websocket;

use async_tungstenite::tungstenite;
use smol::io::{AsyncRead, AsyncWrite};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;

/// Any byte stream a transport can run over (TCP, TLS over TCP, an upgraded HTTP connection).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A boxed byte stream.
pub type BoxIo = Pin<Box<dyn Io>>;

/// Bytes in front of every frame handed to [`FrameSend::send`] that the transport may overwrite
/// with its own header: the most any wire here needs (TCP's length prefix).
pub const HEADROOM: usize = 4;

/// A connected wire that carries whole frames, split into its two halves.
pub trait Transport {
    /// The receiving half.
    type Recv: FrameRecv;
    /// The sending half.
    type Send: FrameSend;
    /// Split into halves that can be used from different tasks.
    fn split(self) -> (Self::Recv, Self::Send);
}

/// The receiving half of a transport.
pub trait FrameRecv: Send {
    /// The next whole frame, lent from this half's buffer until the next call (mutable, so a
    /// sealed frame is opened where it lies); None when the peer closed cleanly between frames. A frame over `max` bytes is an error (refused before it is
    /// read where the wire announces lengths), and so is the wire ending inside a frame.
    ///
    /// Not cancel-safe: run it in its own task rather than racing it against other futures.
    fn recv(&mut self, max: usize) -> impl Future<Output = Result<Option<&mut [u8]>, TransportError>> + Send;
}

/// The sending half of a transport.
pub trait FrameSend: Send {
    /// Send one frame and flush it to the peer: the frame is `buf[HEADROOM..]`, and the transport
    /// may write its own header into `buf[..HEADROOM]`.
    fn send(&mut self, buf: &mut [u8]) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Close politely (TCP shutdown, WebSocket close frame); errors are ignored.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Why a transport failed.
#[derive(Debug)]
pub enum TransportError {
    /// The byte stream failed or ended inside a frame.
    Io(io::Error),
    /// The WebSocket layer failed (bad framing, its size limits).
    WebSocket(tungstenite::Error),
    /// The peer sent what no wisp peer sends (a frame over the limit, a text message); the
    /// sentence says what and hints why.
    Protocol(String),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "connection error: {e}"),
            Self::WebSocket(e) => write!(f, "websocket error: {e}"),
            Self::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for TransportError {}

impl From<io::Error> for TransportError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<tungstenite::Error> for TransportError {
    fn from(e: tungstenite::Error) -> Self {
        Self::WebSocket(e)
    }
}

/// The receiving half of any wire this build has, so a link's type does not name its wire.
pub enum AnyRecv {
    /// Length-prefixed frames on a byte stream.
    Tcp(tcp::Reader),
    /// One binary message per frame.
    WebSocket(websocket::Reader),
    /// One Kafka record per frame.
    #[cfg(feature = "kafka")]
    Kafka(kafka::Reader),
}

/// The sending half of any wire this build has.
pub enum AnySend {
    /// Length-prefixed frames on a byte stream.
    Tcp(tcp::Writer),
    /// One binary message per frame.
    WebSocket(websocket::Writer),
    /// One Kafka record per frame.
    #[cfg(feature = "kafka")]
    Kafka(kafka::Writer),
}

/// A received message as a mutable frame kept in `held` until the next one: `b`'s own memory
/// when nothing else shares it, else a copy in `held`'s memory (reused from frame to frame).
fn hold(held: &mut bytes::BytesMut, b: bytes::Bytes) -> &mut [u8] {
    match b.try_into_mut() {
        Ok(m) => *held = m,
        Err(b) => {
            held.clear();
            held.extend_from_slice(&b);
        }
    }
    &mut held[..]
}

impl FrameRecv for AnyRecv {
    async fn recv(&mut self, max: usize) -> Result<Option<&mut [u8]>, TransportError> {
        match self {
            Self::Tcp(r) => r.recv(max).await,
            Self::WebSocket(r) => r.recv(max).await,
            #[cfg(feature = "kafka")]
            Self::Kafka(r) => r.recv(max).await,
        }
    }
}

impl FrameSend for AnySend {
    async fn send(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        match self {
            Self::Tcp(w) => w.send(buf).await,
            Self::WebSocket(w) => w.send(buf).await,
            #[cfg(feature = "kafka")]
            Self::Kafka(w) => w.send(buf).await,
        }
    }

    async fn close(&mut self) {
        match self {
            Self::Tcp(w) => w.close().await,
            Self::WebSocket(w) => w.close().await,
            #[cfg(feature = "kafka")]
            Self::Kafka(w) => w.close().await,
        }
    }
}

#[cfg(test)]
mod tests;
