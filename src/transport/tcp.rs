//! Frames on a byte stream (TCP, or TLS over TCP): a `u32` big-endian length, then the frame.
//!
//! The reader has one fixed buffer of the largest wire frame and reads ahead into it: one read
//! fetches as much as has arrived, so small frames cost no read each and a length prefix no read of
//! its own, and a frame is lent out of that buffer in place. A length over the limit ends the link
//! before anything more is read or allocated.

use super::{BoxIo, FrameRecv, FrameSend, Transport, TransportError, HEADROOM};
use crate::proto::MAX_WIRE_FRAME;
use smol::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use std::io;

/// Bytes of the length prefix in front of each frame.
const PREFIX: usize = 4;
const _: () = assert!(PREFIX <= HEADROOM);

/// A byte stream that carries length-prefixed frames.
pub struct Tcp(pub BoxIo);

impl Transport for Tcp {
    type Recv = Reader;
    type Send = Writer;
    fn split(self) -> (Reader, Writer) {
        split(self.0)
    }
}

/// Split a byte stream into its frame halves.
pub fn split(io: BoxIo) -> (Reader, Writer) {
    let (r, w) = smol::io::split(io);
    (Reader { r, buf: vec![0; MAX_WIRE_FRAME].into_boxed_slice(), start: 0, end: 0 }, Writer { w })
}

/// The receiving half: bytes read ahead into a buffer of one wire frame, `buf[start..end]` not yet
/// taken.
pub struct Reader {
    r: ReadHalf<BoxIo>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// The sending half.
pub struct Writer {
    w: WriteHalf<BoxIo>,
}

fn cut_off() -> TransportError {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended in the middle of a frame").into()
}

impl Reader {
    /// Read until `need` bytes (at most the buffer) are held, moving what is held to the front when
    /// the rest would not fit. False on end of stream with nothing held; end of stream with part
    /// of what is needed is an `UnexpectedEof` error.
    async fn fill(&mut self, need: usize) -> Result<bool, TransportError> {
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
                return Err(cut_off());
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

impl FrameRecv for Reader {
    async fn recv(&mut self, max: usize) -> Result<Option<&[u8]>, TransportError> {
        let max = max.min(self.buf.len());
        if !self.fill(PREFIX).await? {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.take(PREFIX).try_into().expect("4 bytes")) as usize;
        if len > max {
            return Err(TransportError::Protocol(format!(
                "length prefix {len} is over the {max}-byte frame limit (is this a wisp agent port?)"
            )));
        }
        if !self.fill(len).await? {
            return Err(cut_off());
        }
        Ok(Some(self.take(len)))
    }
}

impl FrameSend for Writer {
    async fn send(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let len = buf.len() - HEADROOM;
        let at = HEADROOM - PREFIX;
        buf[at..HEADROOM].copy_from_slice(&(len as u32).to_be_bytes());
        self.w.write_all(&buf[at..]).await?;
        self.w.flush().await?;
        Ok(())
    }

    async fn close(&mut self) {
        let _ = self.w.close().await;
    }
}
