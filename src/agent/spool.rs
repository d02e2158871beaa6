//! A step's output from the moment it is read from the pipe until the controller says it has
//! stored it, so a dropped link loses nothing: after a reconnect the agent replays from what the
//! controller has.
//!
//! The newest `MEMORY` bytes are held in memory, a ring indexed by output offset. Output the
//! controller acknowledges before it leaves the ring (a step that writes no faster than the link
//! carries and the controller stores) never touches the disk. Bytes that must leave the ring
//! unacknowledged (the link is down, slow or far, or the controller lags behind a fast stream) go
//! to disk first, in fixed-size segment files: segment `i` holds output bytes
//! `[i * SEGMENT, (i + 1) * SEGMENT)`; acknowledged segments are deleted whole. Nothing here
//! allocates in proportion to the output: the disk holds at most the unacknowledged output plus
//! one segment, and the step stops being read once `cap` bytes wait.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes per segment file.
pub const SEGMENT: u64 = 8 << 20;

/// Bytes of output held in memory: the controller's whole credit window for a direct link
/// ([`proto::STEP_WINDOW`](crate::proto::STEP_WINDOW)). On a live link the agent has at most that
/// much sent and not yet stored, so however fast a step writes, nothing goes to disk; a Kafka
/// link (a larger window) or a lost one spills what leaves the ring unacknowledged.
pub const MEMORY: usize = crate::proto::STEP_WINDOW;

/// One step's spool.
pub struct Spool {
    dir: PathBuf,
    /// Output below this offset is stored by the controller; its segments are gone.
    acked: u64,
    /// Output bytes written so far (the step's output length).
    produced: u64,
    /// Output from here to `produced` is in `mem`; below it (and from `acked`), on disk.
    mem_from: u64,
    /// The ring: output byte `o` at `o % MEMORY`. Empty until the first output arrives.
    mem: Vec<u8>,
    /// Output bytes written to disk so far.
    spilled: u64,
    /// Most bytes waiting at once.
    peak: u64,
    cap: u64,
    /// The segment last written to.
    tail: Option<(u64, File)>,
    /// The segment last read from.
    head: Option<(u64, File)>,
    /// Whether `dir` has been made (when output first goes to disk: most steps never make it).
    made: bool,
}

impl Spool {
    /// A fresh spool in `dir` (anything left there by an earlier agent is removed; the directory
    /// itself is made when output first has to go to disk).
    pub fn create(dir: PathBuf, cap: u64) -> io::Result<Self> {
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Self {
            dir,
            acked: 0,
            produced: 0,
            mem_from: 0,
            mem: Vec::new(),
            spilled: 0,
            peak: 0,
            cap: cap.max(1),
            tail: None,
            head: None,
            made: false,
        })
    }

    /// The spool a previous agent process left in `dir` (see [`super::handover`]): output bytes
    /// `acked..produced` are in its segment files, none in memory ([`Spool::flush`] put them
    /// there before the hand-over).
    pub fn adopt(dir: PathBuf, cap: u64, [acked, produced, spilled, peak]: [u64; 4]) -> io::Result<Self> {
        if acked > produced {
            return Err(io::Error::other(format!("acknowledged {acked} bytes of only {produced}")));
        }
        Ok(Self {
            made: dir.exists(),
            dir,
            acked,
            produced,
            mem_from: produced,
            mem: Vec::new(),
            spilled,
            peak,
            cap: cap.max(1),
            tail: None,
            head: None,
        })
    }

    /// Write what only the memory ring holds to disk, so that the segment files hold every
    /// unacknowledged byte (before a hand-over to another process).
    pub fn flush(&mut self) -> io::Result<()> {
        self.spill(self.produced)
    }

    fn segment(&self, i: u64) -> PathBuf {
        self.dir.join(i.to_string())
    }

    /// Append output bytes.
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.mem.is_empty() && !data.is_empty() {
            self.mem = vec![0; MEMORY];
        }
        while !data.is_empty() {
            let n = data.len().min(MEMORY);
            // The oldest bytes leave the ring to make room: to disk unless already stored.
            let over = (self.produced - self.mem_from + n as u64).saturating_sub(MEMORY as u64);
            if over > 0 {
                self.spill(self.mem_from + over)?;
            }
            let at = (self.produced % MEMORY as u64) as usize;
            let first = n.min(MEMORY - at);
            self.mem[at..at + first].copy_from_slice(&data[..first]);
            self.mem[..n - first].copy_from_slice(&data[first..n]);
            self.produced += n as u64;
            data = &data[n..];
        }
        self.peak = self.peak.max(self.pending());
        Ok(())
    }

    /// Move the ring's bytes below `end` out of it, writing those not yet stored to disk.
    fn spill(&mut self, end: u64) -> io::Result<()> {
        let mut from = self.mem_from.max(self.acked);
        while from < end {
            let i = from / SEGMENT;
            let at = (from % MEMORY as u64) as usize;
            let n = (((i + 1) * SEGMENT).min(end) - from).min((MEMORY - at) as u64) as usize;
            if self.tail.as_ref().is_none_or(|(t, _)| *t != i) {
                if !self.made {
                    std::fs::create_dir_all(&self.dir)?;
                    self.made = true;
                }
                let f = OpenOptions::new().create(true).write(true).truncate(false).open(self.segment(i))?;
                self.tail = Some((i, f));
            }
            let f = &self.tail.as_ref().expect("opened above").1;
            f.write_all_at(&self.mem[at..at + n], from - i * SEGMENT)?;
            from += n as u64;
            self.spilled += n as u64;
        }
        self.mem_from = end;
        Ok(())
    }

    /// Read output from `offset` into `buf` (at most to the end of the memory ring's contiguous
    /// part, or of a segment); returns the count.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset < self.acked || offset > self.produced {
            return Err(io::Error::other(format!(
                "spool holds bytes {}..{}, not offset {offset}",
                self.acked, self.produced
            )));
        }
        if offset >= self.mem_from {
            let at = (offset % MEMORY as u64) as usize;
            let n = ((self.produced - offset) as usize).min(MEMORY - at).min(buf.len());
            buf[..n].copy_from_slice(&self.mem[at..at + n]);
            return Ok(n);
        }
        let i = offset / SEGMENT;
        let end = ((i + 1) * SEGMENT).min(self.mem_from);
        let n = ((end - offset) as usize).min(buf.len());
        if self.head.as_ref().is_none_or(|(h, _)| *h != i) {
            self.head = Some((i, File::open(self.segment(i))?));
        }
        let f = &self.head.as_ref().expect("opened above").1;
        f.read_exact_at(&mut buf[..n], offset - i * SEGMENT)?;
        Ok(n)
    }

    /// The controller has stored everything below `upto`: forget it (deleting the segments it
    /// covers).
    pub fn release(&mut self, upto: u64) {
        let upto = upto.min(self.produced);
        if upto <= self.acked {
            return;
        }
        if self.made {
            // Segments that nothing was spilled to are not there; removing them fails harmlessly.
            for i in self.acked / SEGMENT..upto / SEGMENT {
                if self.head.as_ref().is_some_and(|(h, _)| *h == i) {
                    self.head = None;
                }
                if self.tail.as_ref().is_some_and(|(t, _)| *t == i) {
                    self.tail = None;
                }
                let _ = std::fs::remove_file(self.segment(i));
            }
        }
        self.acked = upto;
        self.mem_from = self.mem_from.max(upto);
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

    /// Output bytes that went to disk.
    pub fn spilled(&self) -> u64 {
        self.spilled
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

    fn byte(off: u64) -> u8 {
        ((off % 100_000) % 251) as u8
    }

    fn pattern() -> Vec<u8> {
        (0..100_000u64).map(byte).collect()
    }

    /// Read everything from `from` to the end back in pieces of at most `piece` bytes and check it.
    fn check_back(s: &mut Spool, from: u64, piece: usize) {
        let mut buf = vec![0u8; piece];
        let mut off = from;
        while off < s.produced() {
            let n = s.read_at(off, &mut buf).unwrap();
            assert!(n > 0, "a read at {off} of {} returned nothing", s.produced());
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, byte(off + k as u64), "byte {}", off + k as u64);
            }
            off += n as u64;
        }
    }

    #[test]
    fn bytes_come_back_across_segments_and_acked_segments_go() {
        let dir = temp("a");
        let mut s = Spool::create(dir.clone(), 64 << 20).unwrap();
        let chunk = pattern();
        let total = SEGMENT * 2 + 12345 + MEMORY as u64;
        let mut written = 0u64;
        while written < total {
            let n = chunk.len().min((total - written) as usize);
            s.append(&chunk[..n]).unwrap();
            written += n as u64;
        }
        assert_eq!(s.produced(), total);
        // All but the newest MEMORY bytes went to disk: three segments.
        assert_eq!(s.spilled(), total - MEMORY as u64);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
        // Read across the first segment boundary in pieces.
        let mut buf = vec![0u8; 32 * 1024];
        let off = SEGMENT - 1000;
        let n = s.read_at(off, &mut buf).unwrap();
        assert_eq!(n, 1000, "a read stops at its segment's end");
        check_back(&mut s, off, 32 * 1024);
        s.release(SEGMENT + 5);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "the first segment is deleted");
        assert!(s.read_at(10, &mut buf).is_err(), "released bytes are gone");
        assert_eq!(s.pending(), total - SEGMENT - 5);
        assert_eq!(s.peak(), total);
        check_back(&mut s, SEGMENT + 5, 7000);
        drop(s);
        assert!(!dir.exists(), "dropping the spool removes it");
    }

    #[test]
    fn output_stored_before_it_leaves_memory_never_reaches_the_disk() {
        let dir = temp("m");
        let mut s = Spool::create(dir.clone(), 64 << 20).unwrap();
        let chunk = pattern();
        // A link that keeps up: the controller has stored all but the last window when more comes.
        let mut at = 0u64;
        for k in 0..4000u64 {
            let n = (7919 * (k + 1) % 32768 + 1) as usize;
            let start = (at % 100_000) as usize;
            let n = n.min(100_000 - start);
            s.append(&chunk[start..start + n]).unwrap();
            at += n as u64;
            s.release(at.saturating_sub((MEMORY - 32768) as u64));
            if k % 97 == 0 {
                let acked = s.acked();
                check_back(&mut s, acked, 32768);
            }
        }
        assert_eq!(s.spilled(), 0);
        assert!(!dir.exists(), "no directory was made");
        // The link goes down: what waits goes to disk as more comes, and all of it reads back.
        let acked = s.acked();
        for _ in 0..200 {
            let start = (at % 100_000) as usize;
            let n = 30_000.min(100_000 - start);
            s.append(&chunk[start..start + n]).unwrap();
            at += n as u64;
        }
        assert!(s.spilled() > 0 && dir.exists());
        assert_eq!(s.pending(), at - acked);
        check_back(&mut s, acked, 32768);
        check_back(&mut s, acked + 12345, 1000);
        // Stored again: the ring and disk both let go.
        s.release(at - 10);
        check_back(&mut s, at - 10, 4);
        drop(s);
        assert!(!dir.exists());
    }

    #[test]
    fn a_flushed_spool_is_adopted_from_its_files_and_goes_on() {
        let dir = temp("h");
        let mut s = Spool::create(dir.clone(), 64 << 20).unwrap();
        let chunk = pattern();
        s.append(&chunk[..30_000]).unwrap();
        s.release(1000);
        assert!(!dir.exists(), "all of it still in memory");
        s.flush().unwrap();
        s.flush().unwrap(); // again: nothing more to write
        let numbers = [s.acked(), s.produced(), s.spilled(), s.peak()];
        assert_eq!(numbers, [1000, 30_000, 29_000, 30_000]);
        // The hand-over: this process forgets the spool without removing it.
        s.made = false;
        drop(s);
        let mut s = Spool::adopt(dir.clone(), 64 << 20, numbers).unwrap();
        check_back(&mut s, 1000, 4096);
        s.append(&chunk[30_000..100_000]).unwrap();
        check_back(&mut s, 1000, 7000);
        s.release(50_000);
        check_back(&mut s, 50_000, 333);
        assert!(Spool::adopt(dir.clone(), 1, [5, 4, 0, 0]).is_err());
        drop(s);
        assert!(!dir.exists(), "the adopted spool is removed when done");
    }

    #[test]
    fn the_cap_says_when_to_stop_reading() {
        let dir = temp("b");
        let mut s = Spool::create(dir.clone(), 10).unwrap();
        s.append(b"123456789").unwrap();
        assert!(!dir.exists(), "no directory while the output fits in memory");
        assert!(!s.full());
        s.append(b"0").unwrap();
        assert!(s.full());
        s.release(4);
        assert!(!s.full());
        assert_eq!(s.read_at(s.produced(), &mut [0u8; 4]).unwrap(), 0);
        let mut b = [0u8; 6];
        assert_eq!(s.read_at(4, &mut b).unwrap(), 6);
        assert_eq!(&b, b"567890");
    }
}
