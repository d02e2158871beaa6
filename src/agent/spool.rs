//! A step's output on disk from the moment it is read from the pipe until the controller says it
//! has stored it, so a dropped link loses nothing: after a reconnect the agent replays from what
//! the controller has.
//!
//! The spool is a directory of fixed-size segment files: segment `i` holds output bytes
//! `[i * SEGMENT, (i + 1) * SEGMENT)`. Appending writes the tail segment; acknowledged segments are
//! deleted whole. Nothing here allocates in proportion to the output: the disk holds at most the
//! unacknowledged output plus one segment, and the step stops being read once `cap` bytes wait.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes per segment file.
pub const SEGMENT: u64 = 8 << 20;

/// One step's spool.
pub struct Spool {
    dir: PathBuf,
    /// Output below this offset is stored by the controller; its segments are gone.
    acked: u64,
    /// Output bytes written so far (the step's output length).
    produced: u64,
    /// Most bytes waiting at once.
    peak: u64,
    cap: u64,
    /// The segment being appended to.
    tail: Option<(u64, File)>,
    /// The segment last read from.
    head: Option<(u64, File)>,
    /// Whether `dir` has been made (on the first output byte: a step with no output costs no
    /// directory).
    made: bool,
}

impl Spool {
    /// A fresh spool in `dir` (anything left there by an earlier agent is removed; the directory
    /// itself is made when the first output arrives).
    pub fn create(dir: PathBuf, cap: u64) -> io::Result<Self> {
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Self { dir, acked: 0, produced: 0, peak: 0, cap: cap.max(1), tail: None, head: None, made: false })
    }

    fn segment(&self, i: u64) -> PathBuf {
        self.dir.join(i.to_string())
    }

    /// Append output bytes.
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let i = self.produced / SEGMENT;
            if self.tail.as_ref().is_none_or(|(t, _)| *t != i) {
                if !self.made {
                    std::fs::create_dir_all(&self.dir)?;
                    self.made = true;
                }
                let f = OpenOptions::new().create(true).append(true).open(self.segment(i))?;
                self.tail = Some((i, f));
            }
            let room = ((i + 1) * SEGMENT - self.produced) as usize;
            let n = room.min(data.len());
            self.tail.as_mut().expect("opened above").1.write_all(&data[..n])?;
            self.produced += n as u64;
            data = &data[n..];
        }
        self.peak = self.peak.max(self.pending());
        Ok(())
    }

    /// Read output from `offset` into `buf` (at most to the end of its segment); returns the count.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset < self.acked || offset > self.produced {
            return Err(io::Error::other(format!(
                "spool holds bytes {}..{}, not offset {offset}",
                self.acked, self.produced
            )));
        }
        let i = offset / SEGMENT;
        let end = ((i + 1) * SEGMENT).min(self.produced);
        let n = ((end - offset) as usize).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        if self.head.as_ref().is_none_or(|(h, _)| *h != i) {
            self.head = Some((i, File::open(self.segment(i))?));
        }
        let f = &self.head.as_ref().expect("opened above").1;
        f.read_exact_at(&mut buf[..n], offset - i * SEGMENT)?;
        Ok(n)
    }

    /// The controller has stored everything below `upto`: delete the segments it covers.
    pub fn release(&mut self, upto: u64) {
        let upto = upto.min(self.produced);
        if upto <= self.acked {
            return;
        }
        for i in self.acked / SEGMENT..upto / SEGMENT {
            if self.head.as_ref().is_some_and(|(h, _)| *h == i) {
                self.head = None;
            }
            if self.tail.as_ref().is_some_and(|(t, _)| *t == i) {
                self.tail = None;
            }
            let _ = std::fs::remove_file(self.segment(i));
        }
        self.acked = upto;
    }

    /// Output bytes produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// The first byte still held.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes held that the controller has not stored yet.
    pub fn pending(&self) -> u64 {
        self.produced - self.acked
    }

    /// Most bytes held at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// True when the cap is reached: stop reading the step's output.
    pub fn full(&self) -> bool {
        self.pending() >= self.cap
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("wisp-spool-{tag}-{}", std::process::id()))
    }

    #[test]
    fn bytes_come_back_across_segments_and_acked_segments_go() {
        let dir = temp("a");
        let mut s = Spool::create(dir.clone(), 64 << 20).unwrap();
        let chunk: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let total = SEGMENT * 2 + 12345;
        let mut written = 0u64;
        while written < total {
            let n = chunk.len().min((total - written) as usize);
            s.append(&chunk[..n]).unwrap();
            written += n as u64;
        }
        assert_eq!(s.produced(), total);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
        // Read across the first segment boundary in pieces.
        let mut buf = vec![0u8; 32 * 1024];
        let mut off = SEGMENT - 1000;
        let n = s.read_at(off, &mut buf).unwrap();
        assert_eq!(n, 1000, "a read stops at its segment's end");
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, (((off + k as u64) % 100_000) % 251) as u8);
        }
        off += n as u64;
        let n = s.read_at(off, &mut buf).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(buf[0], (((off % 100_000) % 251) as u8));
        s.release(SEGMENT + 5);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "the first segment is deleted");
        assert!(s.read_at(10, &mut buf).is_err(), "released bytes are gone");
        assert_eq!(s.pending(), total - SEGMENT - 5);
        assert_eq!(s.peak(), total);
        drop(s);
        assert!(!dir.exists(), "dropping the spool removes it");
    }

    #[test]
    fn the_cap_says_when_to_stop_reading() {
        let dir = temp("b");
        let mut s = Spool::create(dir.clone(), 10).unwrap();
        assert!(!dir.exists(), "no directory before the first output");
        s.append(b"123456789").unwrap();
        assert!(dir.exists());
        assert!(!s.full());
        s.append(b"0").unwrap();
        assert!(s.full());
        s.release(4);
        assert!(!s.full());
        assert_eq!(s.read_at(s.produced(), &mut [0u8; 4]).unwrap(), 0);
    }
}
