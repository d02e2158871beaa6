//! Frames on a byte stream (TCP, or TLS over TCP): a `u32` big-endian length, then the frame.
//!
//! The reader has one buffer and reads ahead into it: one read fetches as much as has arrived, so
//! small frames cost no read each and a length prefix no read of its own, and a frame is lent out
//! of that buffer in place. The buffer starts small (every control frame fits), grows to hold a
//! large frame when one comes, and shrinks back once frames have been small for a while: an idle
//! link holds `SMALL` bytes, not the largest wire frame. A length over the limit ends the link
//! before anything more is read or allocated.

use super::{BoxIo, FrameRecv, FrameSend, Transport, TransportError, HEADROOM};
use crate::proto::MAX_WIRE_FRAME;
use smol::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use std::io;

/// Bytes of the length prefix in front of each frame.
const PREFIX: usize = 4;
const _: () = assert!(PREFIX <= HEADROOM);

/// Bytes of the reader's buffer while frames are small.
const SMALL: usize = 2 * 1024;
/// Small frames in a row after which a grown buffer shrinks back to `SMALL`.
const SHRINK_AFTER: u32 = 64;

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
    (Reader { r, buf: vec![0; SMALL], start: 0, end: 0, small_run: 0 }, Writer { w })
}

/// The receiving half: bytes read ahead into a buffer, `buf[start..end]` not yet taken.
pub struct Reader {
    r: ReadHalf<BoxIo>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Frames in a row that fitted in `SMALL` bytes.
    small_run: u32,
}

/// The sending half.
pub struct Writer {
    w: WriteHalf<BoxIo>,
}

fn cut_off() -> TransportError {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended in the middle of a frame").into()
}

impl Reader {
    /// Read until `need` bytes are held, growing the buffer when they would not fit in it and
    /// moving what is held to the front when the rest would not fit behind it. False on end of stream with nothing held; end of stream with part
    /// of what is needed is an `UnexpectedEof` error.
    async fn fill(&mut self, need: usize) -> Result<bool, TransportError> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
            if self.buf.len() > SMALL && self.small_run >= SHRINK_AFTER {
                self.buf = vec![0; SMALL];
            }
        }
        if need > self.buf.len() {
            // Room for a large frame: what is held moves to the front of the bigger buffer.
            let mut bigger = vec![0; need.next_power_of_two().min(MAX_WIRE_FRAME).max(need)];
            bigger[..self.end - self.start].copy_from_slice(&self.buf[self.start..self.end]);
            (self.buf, self.start, self.end) = (bigger, 0, self.end - self.start);
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
    fn take(&mut self, n: usize) -> &mut [u8] {
        let at = self.start;
        self.start += n;
        &mut self.buf[at..at + n]
    }
}

impl FrameRecv for Reader {
    async fn recv(&mut self, max: usize) -> Result<Option<&mut [u8]>, TransportError> {
        let max = max.min(MAX_WIRE_FRAME);
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
        self.small_run = if PREFIX + len <= SMALL { self.small_run.saturating_add(1) } else { 0 };
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

#[cfg(test)]
mod tests {
    use super::*;
    use smol::net::{TcpListener, TcpStream};

    #[test]
    fn the_buffer_grows_for_a_large_frame_and_shrinks_back_once_frames_are_small() {
        smol::block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (a, b) = smol::future::zip(TcpStream::connect(addr), l.accept()).await;
            let (_ra, mut w) = split(Box::pin(a.unwrap()));
            let (mut r, _wb) = split(Box::pin(b.unwrap().0));
            let frame = |n: usize, fill: u8| {
                let mut v = vec![0u8; HEADROOM];
                v.extend(std::iter::repeat_n(fill, n));
                v
            };
            let sizes: Vec<usize> = [10, 40_000, MAX_WIRE_FRAME]
                .into_iter()
                .chain(std::iter::repeat_n(100, SHRINK_AFTER as usize + 1))
                .chain([30_000, 5])
                .collect();
            // One frame at a time, each read before the next is sent, as on a link at rest.
            let mut lens = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                w.send(&mut frame(*n, i as u8)).await.unwrap();
                let got = r.recv(MAX_WIRE_FRAME).await.unwrap().unwrap();
                assert_eq!(got.len(), *n);
                assert!(got.iter().all(|b| *b == i as u8), "frame {i} intact");
                lens.push(r.buf.len());
            }
            assert_eq!(lens[0], SMALL, "small frames fit the first buffer");
            assert_eq!(lens[2], MAX_WIRE_FRAME, "grown for the largest frame");
            assert!(lens[3 + SHRINK_AFTER as usize] <= 64 * 1024, "{lens:?}");
            assert!(lens[3..].contains(&SMALL), "shrunk back after small frames: {lens:?}");
        })
    }
}
