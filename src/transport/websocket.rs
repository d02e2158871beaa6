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
    (Reader { r, held: None }, Writer { w, msg: BytesMut::new() })
}

/// The receiving half.
pub struct Reader {
    r: WebSocketReceiver<BoxIo>,
    /// The last message received, kept until the next call so the frame lent out can borrow it.
    held: Option<Bytes>,
}

/// The sending half, and the buffer each message is built in.
pub struct Writer {
    w: WebSocketSender<BoxIo>,
    msg: BytesMut,
}

impl FrameRecv for Reader {
    async fn recv(&mut self, max: usize) -> Result<Option<&[u8]>, TransportError> {
        // Let go of the last message first, so tungstenite may reuse its memory for the next.
        self.held = None;
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
        Ok(Some(self.held.insert(b)))
    }
}

impl FrameSend for Writer {
    async fn send(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let frame = &buf[HEADROOM..];
        self.msg.reserve(frame.len());
        self.msg.extend_from_slice(frame);
        self.w.send(Message::Binary(self.msg.split().freeze())).await?;
        Ok(())
    }

    async fn close(&mut self) {
        let _ = self.w.close(None).await;
    }
}
