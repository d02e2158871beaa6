//! Follows the LZ4 frame structure of the compressed bytes as the decoder reads them, to tell a
//! stream that ends with a frame's end mark from one cut short: `lz4_flex`'s decoder takes an
//! end of input where a block header should be as the end of the stream.

use std::io::{self, Read};

const MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Collecting a frame's magic number.
    Magic,
    /// Collecting the FLG and BD bytes.
    Descriptor,
    /// Collecting the rest of the frame header (content size, dictionary id, header checksum).
    HeaderRest,
    /// Collecting a block's 4-byte size.
    BlockSize,
    /// Skipping a block's data (and checksum).
    Block,
    /// Skipping the content checksum after the end mark.
    Trailer,
}

/// A reader that checks the LZ4 frame structure of what passes through it.
pub(super) struct FrameCheck<R> {
    inner: R,
    state: State,
    buf: [u8; 16],
    got: usize,
    need: usize,
    skip: u64,
    flags: u8,
    frames: u64,
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

impl<R: Read> FrameCheck<R> {
    pub(super) fn new(inner: R) -> Self {
        FrameCheck { inner, state: State::Magic, buf: [0; 16], got: 0, need: 4, skip: 0, flags: 0, frames: 0 }
    }

    /// Whether what has passed through ends exactly after a whole frame.
    pub(super) fn at_frame_end(&self) -> bool {
        self.frames > 0 && self.state == State::Magic && self.got == 0
    }

    /// Whether the input has nothing more (reads it: call once the decoder has seen the end).
    pub(super) fn at_input_end(&mut self) -> io::Result<bool> {
        let mut byte = [0u8; 1];
        loop {
            match self.inner.read(&mut byte) {
                Ok(n) => return Ok(n == 0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64);
                self.skip -= n;
                data = &data[n as usize..];
                if self.skip == 0 {
                    self.skipped();
                }
                continue;
            }
            let n = (self.need - self.got).min(data.len());
            self.buf[self.got..self.got + n].copy_from_slice(&data[..n]);
            self.got += n;
            data = &data[n..];
            if self.got == self.need {
                self.got = 0;
                self.collected()?;
            }
        }
        Ok(())
    }

    fn collected(&mut self) -> io::Result<()> {
        match self.state {
            State::Magic => {
                if self.buf[..4] != MAGIC {
                    return Err(bad("not an LZ4 frame: a wisp archive is one"));
                }
                self.state = State::Descriptor;
                self.need = 2;
            }
            State::Descriptor => {
                self.flags = self.buf[0];
                if self.flags >> 6 != 1 {
                    return Err(bad("unknown LZ4 frame version"));
                }
                let content_size = if self.flags & 0x08 != 0 { 8 } else { 0 };
                let dict_id = if self.flags & 0x01 != 0 { 4 } else { 0 };
                self.state = State::HeaderRest;
                self.need = content_size + dict_id + 1;
            }
            State::HeaderRest => {
                self.state = State::BlockSize;
                self.need = 4;
            }
            State::BlockSize => {
                let size = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if size == 0 {
                    self.state = State::Trailer;
                    self.skip = if self.flags & 0x04 != 0 { 4 } else { 0 };
                } else {
                    self.state = State::Block;
                    let checksum = if self.flags & 0x10 != 0 { 4 } else { 0 };
                    self.skip = u64::from(size & 0x7fff_ffff) + checksum;
                }
                if self.skip == 0 {
                    self.skipped();
                }
            }
            State::Block | State::Trailer => unreachable!("skipping states collect nothing"),
        }
        Ok(())
    }

    fn skipped(&mut self) {
        match self.state {
            State::Block => {
                self.state = State::BlockSize;
                self.need = 4;
            }
            State::Trailer => {
                self.frames += 1;
                self.state = State::Magic;
                self.need = 4;
            }
            _ => {}
        }
    }
}

impl<R: Read> Read for FrameCheck<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.feed(&out[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::FrameCheck;
    use std::io::{Read, Write};

    fn frame(data: &[u8], info: lz4_flex::frame::FrameInfo) -> Vec<u8> {
        let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn ends_whole(bytes: &[u8], chunk: usize) -> bool {
        let mut check = FrameCheck::new(bytes);
        let mut buf = vec![0; chunk];
        while check.read(&mut buf).unwrap() > 0 {}
        check.at_frame_end()
    }

    #[test]
    fn tells_a_whole_frame_from_a_cut_one() {
        use lz4_flex::frame::{BlockMode, BlockSize, FrameInfo};
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let infos = [
            FrameInfo::new(),
            FrameInfo::new().content_checksum(true),
            FrameInfo::new().block_checksums(true).block_mode(BlockMode::Linked),
            FrameInfo::new().content_size(Some(data.len() as u64)).block_size(BlockSize::Max256KB),
        ];
        for info in infos {
            let bytes = frame(&data, info);
            for chunk in [1, 3, 4096] {
                assert!(ends_whole(&bytes, chunk));
                for cut in [1, 4, 5, 7, 8, 9, bytes.len() / 2, bytes.len() - 1] {
                    assert!(!ends_whole(&bytes[..bytes.len() - cut], chunk), "cut {cut}");
                }
            }
            // Two frames one after the other end whole; empty input does not.
            assert!(ends_whole(&[bytes.clone(), bytes].concat(), 4096));
            assert!(!ends_whole(&[], 4096));
        }
    }

    #[test]
    fn refuses_what_is_not_an_lz4_frame() {
        let mut check = FrameCheck::new(&b"not lz4 at all"[..]);
        let err = std::io::copy(&mut check, &mut std::io::sink()).unwrap_err();
        assert!(err.to_string().contains("not an LZ4 frame"), "{err}");
    }
}
