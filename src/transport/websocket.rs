//! Frames on a WebSocket: one binary message per frame, within the limits of [`config`].
//!
//! A received frame is lent out of the message tungstenite assembled; a frame is sent from a
//! buffer whose allocation is reclaimed for the next message once tungstenite has copied the last
//! one out, so neither direction allocates per frame (with musl's allocator that would be an mmap
//! and a munmap per 32 KiB of output).

use super::{BoxIo, FrameRecv, FrameSend, Transport, TransportError, HEADROOM};
use crate::proto::MAX_WIRE_FRAME;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{self, Message};
use async_tungstenite::{WebSocketReceiver, WebSocketSender, WebSocketStream};
use bytes::{Bytes, BytesMut};
use smol::stream::StreamExt;

/// WebSocket limits: tungstenite's defaults (64 MiB messages, 16 MiB frames, an unlimited write
/// buffer) are far beyond what a frame can be, so a peer cannot make us buffer more than one frame.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_WIRE_FRAME))
        .max_frame_size(Some(MAX_WIRE_FRAME))
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * MAX_WIRE_FRAME)
}

/// The agent's side: what comes to an agent is mostly small control frames (a step's output
/// goes the other way), so it reads with a smaller buffer and its heap stays within budget.
pub fn agent_config() -> WebSocketConfig {
    config().read_buffer_size(4 * 1024)
}

impl Transport for WebSocketStream<BoxIo> {
    type Recv = Reader;
    type Send = Writer;
    fn split(self) -> (Reader, Writer) {
        split(self)
    }
}

/// Split an established WebSocket into its frame halves.
pub fn split(ws: WebSocketStream<BoxIo>) -> (Reader, Writer) {
    let (w, r) = ws.split();
    (Reader { r, held: BytesMut::new() }, Writer { w })
}

/// The receiving half.
pub struct Reader {
    r: WebSocketReceiver<BoxIo>,
    /// The last message received, kept until the next call so the frame lent out can borrow it.
    held: BytesMut,
}

/// The sending half.
pub struct Writer {
    w: WebSocketSender<BoxIo>,
}

impl FrameRecv for Reader {
    async fn recv(&mut self, max: usize) -> Result<Option<&mut [u8]>, TransportError> {
        let b = loop {
            match self.r.next().await {
                None | Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(b))) => break b,
                Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Text(_))) => {
                    return Err(TransportError::Protocol("text message on a binary link".into()))
                }
            }
        };
        if b.len() > max {
            return Err(TransportError::Protocol(format!(
                "a {}-byte message is over the {max}-byte frame limit",
                b.len()
            )));
        }
        Ok(Some(super::hold(&mut self.held, b)))
    }
}

impl FrameSend for Writer {
    async fn send(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        // A message of exactly the frame's size, freed once tungstenite has framed it: a buffer
        // kept here would grow past the frame while the last message is still held.
        self.w.send(Message::Binary(Bytes::copy_from_slice(&buf[HEADROOM..]))).await?;
        Ok(())
    }

    async fn close(&mut self) {
        let _ = self.w.close(None).await;
    }
}
