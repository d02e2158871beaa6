//! Hostile archives for `wisp::archive::unpack`, built by hand (raw tar headers, then one LZ4
//! frame): each must be refused with an error that names the problem, and nothing may appear
//! outside the destination.

use ring::digest;
use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use wisp::archive::{pack, unpack, Limits, Selection};

struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "wisp-hostile-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(p.join("dest")).unwrap();
        fs::create_dir_all(p.join("outside")).unwrap();
        Tmp(p)
    }
    fn dest(&self) -> PathBuf {
        self.0.join("dest")
    }
    fn outside(&self) -> PathBuf {
        self.0.join("outside")
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A tar stream written header by header, any bytes allowed in names.
#[derive(Default)]
struct Tar {
    buf: Vec<u8>,
    files: Vec<(Vec<u8>, Vec<u8>)>,
}

const FILE: u8 = b'0';
const HARD: u8 = b'1';
const LINK: u8 = b'2';
const CHAR: u8 = b'3';
const BLOCK: u8 = b'4';
const DIR: u8 = b'5';
const FIFO: u8 = b'6';

impl Tar {
    /// An entry: its header (after GNU long-name entries for a path or link over 100 bytes) and
    /// its data.
    fn raw(&mut self, kind: u8, path: &[u8], link: &[u8], data: &[u8]) -> &mut Self {
        if path.len() > 100 {
            self.long_name(path);
        }
        if link.len() > 100 {
            self.long(b'K', link);
        }
        let mut h = tar::Header::new_gnu();
        let n = path.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&path[..n]);
        let n = link.len().min(100);
        h.as_old_mut().linkname[..n].copy_from_slice(&link[..n]);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len().next_multiple_of(512), 0);
        self
    }
    /// A regular file, listed in the sums `finish` writes.
    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.files.push((path.as_bytes().to_vec(), data.to_vec()));
        self.raw(FILE, path.as_bytes(), b"", data)
    }
    fn dir(&mut self, path: &str) -> &mut Self {
        self.raw(DIR, path.as_bytes(), b"", b"")
    }
    fn link(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(LINK, path.as_bytes(), target.as_bytes(), b"")
    }
    /// A GNU long-name entry for the next entry.
    fn long_name(&mut self, name: &[u8]) -> &mut Self {
        self.long(b'L', name)
    }
    fn long(&mut self, kind: u8, name: &[u8]) -> &mut Self {
        let mut data = name.to_vec();
        data.push(0);
        self.raw(kind, b"././@LongLink", b"", &data)
    }
    fn sums_text(&self) -> Vec<u8> {
        let mut s = Vec::new();
        for (path, data) in &self.files {
            let sum = hex::encode(digest::digest(&digest::SHA256, data));
            s.extend_from_slice(format!("{sum} {} ", data.len()).as_bytes());
            s.extend_from_slice(path);
            s.push(b'\n');
        }
        s
    }
    fn sums(&mut self, text: &[u8]) -> &mut Self {
        self.raw(FILE, b".wisp-sums", b"", text)
    }
    /// The right sums, the end of the archive, one LZ4 frame.
    fn finish(&mut self) -> Vec<u8> {
        let text = self.sums_text();
        self.sums(&text);
        self.finish_without_sums()
    }
    fn finish_without_sums(&mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0; 1024]);
        lz4(&self.buf)
    }
}

fn lz4(data: &[u8]) -> Vec<u8> {
    let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Everything under `dir`, as paths relative to it.
fn contents(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Unpack must fail with an error containing `needle`, and write nothing outside dest.
fn refused_with(t: &Tmp, archive: &[u8], limits: &Limits, needle: &str) -> String {
    let err = unpack(archive, &t.dest(), limits).expect_err("a hostile archive must be refused").to_string();
    assert!(err.contains(needle), "error {err:?} should say {needle:?}");
    assert_eq!(contents(&t.outside()), Vec::<String>::new(), "written outside dest ({err})");
    let mut top: Vec<_> = fs::read_dir(&t.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    top.sort();
    assert_eq!(top, ["dest", "outside"], "written beside dest ({err})");
    assert!(!Path::new("/etc/evil").exists() && !Path::new("/tmp/evil").exists());
    err
}

fn refused(t: &Tmp, archive: &[u8], needle: &str) -> String {
    refused_with(t, archive, &Limits::default(), needle)
}

#[test]
fn a_hand_built_archive_is_accepted() {
    // The helpers make archives unpack takes, so the refusals below are about what they test.
    let t = Tmp::new("ok");
    let a = Tar::default().dir("d").file("d/f", b"data").link("d/l", "f").file("g", b"").finish();
    let un = unpack(&a[..], &t.dest(), &Limits::default()).unwrap();
    assert_eq!((un.files, un.dirs, un.links), (2, 1, 1));
    assert_eq!(fs::read(t.dest().join("d/f")).unwrap(), b"data");
    assert_eq!(contents(&t.dest()), ["d", "d/f", "d/l", "g"]);
}

#[test]
fn paths_that_leave_dest() {
    let t = Tmp::new("paths");
    let outside_evil = format!("{}/evil", t.outside().display());
    refused(&t, &Tar::default().file("../evil", b"x").finish(), "a .. component");
    refused(&t, &Tar::default().file("../outside/evil", b"x").finish(), "a .. component");
    refused(&t, &Tar::default().file("/etc/evil", b"x").finish(), "absolute");
    refused(&t, &Tar::default().file(&outside_evil, b"x").finish(), "absolute");
    refused(&t, &Tar::default().file("a/../../evil", b"x").finish(), "a .. component");
    refused(&t, &Tar::default().file("a/../../outside/evil", b"x").finish(), "a .. component");
    refused(&t, &Tar::default().dir("..").finish(), "a .. component");
    refused(&t, &Tar::default().link("../evil", "x").finish(), "a .. component");
    // The same through a GNU long name.
    let long = format!("{}/../../../outside/evil", "d/".repeat(60));
    let a = Tar::default().long_name(long.as_bytes()).raw(FILE, b"short", b"", b"x").finish();
    refused(&t, &a, "a .. component");
}

#[test]
fn writing_through_a_link_the_archive_made() {
    let t = Tmp::new("archive-link");
    let out = t.outside().display().to_string();
    refused(
        &t,
        &Tar::default().link("link", &out).file("link/evil", b"x").finish(),
        "link is a symbolic link",
    );
    let _ = fs::remove_dir_all(t.dest());
    refused(&t, &Tar::default().link("link", "/tmp").file("link/evil", b"x").finish(), "symbolic link");
    let _ = fs::remove_dir_all(t.dest());
    refused(&t, &Tar::default().link("up", "..").file("up/outside/evil", b"x").finish(), "symbolic link");
    let _ = fs::remove_dir_all(t.dest());
    let a = Tar::default().dir("a").link("a/b", &out).file("a/b/evil", b"x").finish();
    refused(&t, &a, "a/b is a symbolic link");
    let _ = fs::remove_dir_all(t.dest());
    let a = Tar::default().link("l", &out).dir("l/sub").file("l/sub/evil", b"x").finish();
    refused(&t, &a, "symbolic link");
    let _ = fs::remove_dir_all(t.dest());
    // A link over a directory the archive made, then a file through it: a path given twice.
    let a = Tar::default().dir("d").link("d", &out).file("d/evil", b"x").finish();
    refused(&t, &a, "out of order or given twice");
}

#[test]
fn writing_through_a_link_already_in_dest() {
    let t = Tmp::new("dest-link");
    symlink(t.outside(), t.dest().join("escape")).unwrap();
    fs::create_dir_all(t.dest().join("real")).unwrap();
    symlink(t.outside(), t.dest().join("real/escape")).unwrap();
    refused(&t, &Tar::default().file("escape/evil", b"x").finish(), "escape is a symbolic link");
    refused(&t, &Tar::default().dir("escape").file("escape/evil", b"x").finish(), "symbolic link");
    refused(&t, &Tar::default().file("escape/sub/evil", b"x").finish(), "symbolic link");
    refused(&t, &Tar::default().file("real/escape/evil", b"x").finish(), "real/escape is a symbolic link");
    refused(&t, &Tar::default().link("escape/l", "x").finish(), "symbolic link");
    // A file or link of the same name replaces the link itself; its target is not touched.
    fs::write(t.outside().join("victim"), b"keep").unwrap();
    symlink(t.outside().join("victim"), t.dest().join("v1")).unwrap();
    symlink(t.outside().join("victim"), t.dest().join("v2")).unwrap();
    let a = Tar::default().file("v1", b"new").link("v2", "v1").finish();
    unpack(&a[..], &t.dest(), &Limits::default()).unwrap();
    assert_eq!(fs::read(t.outside().join("victim")).unwrap(), b"keep");
    assert_eq!(fs::read(t.dest().join("v1")).unwrap(), b"new");
    assert_eq!(fs::read_link(t.dest().join("v2")).unwrap(), Path::new("v1"));
}

#[test]
fn kinds_that_are_not_accepted() {
    let t = Tmp::new("kinds");
    fs::write(t.outside().join("target"), b"x").unwrap();
    let target = t.outside().join("target").display().to_string();
    let hard = Tar::default().raw(HARD, b"hl", target.as_bytes(), b"").finish();
    let e = unpack(&hard[..], &t.dest(), &Limits::default()).unwrap_err().to_string();
    assert!(e.contains("\"hl\": hard links are not accepted"), "the error names the entry: {e}");
    assert_eq!(contents(&t.outside()), ["target"]);
    assert_eq!(contents(&t.dest()), Vec::<String>::new());
    fs::remove_file(t.outside().join("target")).unwrap();
    refused(&t, &Tar::default().raw(HARD, b"hl", b"/etc/passwd", b"").finish(), "hard links");
    refused(&t, &Tar::default().raw(CHAR, b"null", b"", b"").finish(), "device files");
    refused(&t, &Tar::default().raw(BLOCK, b"sda", b"", b"").finish(), "device files");
    refused(&t, &Tar::default().raw(FIFO, b"fifo", b"", b"").finish(), "fifos");
    refused(&t, &Tar::default().raw(b'S', b"sparse", b"", b"").finish(), "sparse");
    refused(&t, &Tar::default().raw(b'x', b"pax", b"", b"11 path=/x\n").finish(), "PAX");
    refused(&t, &Tar::default().raw(b'g', b"pax", b"", b"11 path=/x\n").finish(), "PAX");
    refused(&t, &Tar::default().raw(b'Q', b"what", b"", b"").finish(), "unknown entry type");
    refused(&t, &Tar::default().raw(DIR, b"d", b"", b"data").finish(), "with data");
    assert_eq!(contents(&t.dest()), Vec::<String>::new());
}

#[test]
fn names_that_are_not_accepted() {
    let t = Tmp::new("names");
    refused(&t, &Tar::default().long_name(b"a\0/../../evil").raw(FILE, b"a", b"", b"").finish(), "NUL");
    refused(&t, &Tar::default().file("new\nline", b"").finish(), "newline");
    refused(&t, &Tar::default().raw(FILE, b"bad\xff", b"", b"").finish(), "not UTF-8");
    let long = "d/".repeat(2100);
    refused(&t, &Tar::default().long_name(long.as_bytes()).raw(FILE, b"x", b"", b"").finish(), "4096");
    let long_target = "t/".repeat(2100);
    refused(&t, &Tar::default().link("l", &long_target).finish(), "4096");
    refused(&t, &Tar::default().file(&"n".repeat(256), b"").finish(), "255");
    refused(&t, &Tar::default().file(".wisp/spool/evil", b"x").finish(), ".wisp");
    refused(&t, &Tar::default().dir(".wisp").finish(), ".wisp");
    refused(&t, &Tar::default().file(".", b"x").finish(), "empty path");
    refused(&t, &Tar::default().link("l", "").finish(), "empty target");
    refused(&t, &Tar::default().dir(".wisp-sums").finish(), "not a regular file");
    let two = Tar::default().long_name(b"a").long_name(b"b").raw(FILE, b"c", b"", b"").finish();
    refused(&t, &two, "two GNU long-name entries");
    refused(
        &t,
        &Tar::default().long_name(b"dangling").finish_without_sums(),
        "long-name entry with no entry",
    );
}

#[test]
fn replacing_across_kinds() {
    let t = Tmp::new("kinds-replace");
    // What is in dest already: a directory, a file.
    fs::create_dir_all(t.dest().join("d/inner")).unwrap();
    fs::write(t.dest().join("f"), b"x").unwrap();
    refused(&t, &Tar::default().file("d", b"x").finish(), "\"d\": a file would replace a directory");
    refused(&t, &Tar::default().link("d", "/tmp").finish(), "a link would replace a directory");
    refused(&t, &Tar::default().dir("f").finish(), "f is not a directory");
    refused(&t, &Tar::default().file("f/g", b"y").finish(), "f is not a directory");
    assert_eq!(contents(&t.dest()), ["d", "d/inner", "f"]);
    // Within one archive a path comes once, and in order.
    refused(&t, &Tar::default().file("f", b"1").file("f", b"2").finish(), "out of order or given twice");
    refused(&t, &Tar::default().dir("d").file("d", b"x").finish(), "out of order or given twice");
    refused(&t, &Tar::default().file("b", b"").file("a", b"").finish(), "out of order");
    refused(&t, &Tar::default().file("a/b", b"").dir("a").finish(), "out of order");
}

#[test]
fn bombs_over_the_limits() {
    let t = Tmp::new("bomb");
    // 64 MiB of zeros is a few hundred KiB compressed; the header's size is checked before any
    // of it is written.
    let zeros = vec![0u8; 64 << 20];
    let a = Tar::default().file("zeros", &zeros).finish();
    assert!(a.len() < 1 << 20, "{}", a.len());
    let limits = Limits { max_bytes: 16 << 20, ..Limits::default() };
    refused_with(&t, &a, &limits, "over the limit");
    assert!(!t.dest().join("zeros").exists());
    // Bytes add up over files.
    let mut tar = Tar::default();
    for i in 0..5 {
        tar.file(&format!("f{i}"), &zeros[..4 << 20]);
    }
    let e = refused_with(&t, &tar.finish(), &limits, "over the limit");
    assert!(e.contains("f4"), "{e}");
    assert!(!t.dest().join("f4").exists());
    // Entries: files, directories and links all count.
    let mut tar = Tar::default();
    for i in 0..40 {
        tar.dir(&format!("d{i:02}"));
        tar.file(&format!("d{i:02}/f"), b"");
        tar.link(&format!("d{i:02}/l"), "x");
    }
    let limits = Limits { max_entries: 100, ..Limits::default() };
    refused_with(&t, &tar.finish(), &limits, "more than 100 entries");
    // A header claiming far more than the stream holds.
    let mut tar = Tar::default();
    tar.raw(FILE, b"huge", b"", b"");
    let at = tar.buf.len() - 512;
    let mut h = tar::Header::new_gnu();
    h.as_mut_bytes().copy_from_slice(&tar.buf[at..]);
    h.set_size(1 << 50);
    h.set_cksum();
    tar.buf[at..].copy_from_slice(h.as_bytes());
    refused(&t, &tar.finish_without_sums(), "over the limit");
}

#[test]
fn sums_that_do_not_match() {
    let t = Tmp::new("sums");
    let mut tar = Tar::default();
    tar.file("a", b"hello").file("b", b"world");
    let good = tar.sums_text();
    // One bit of one sum flipped.
    let mut wrong = good.clone();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let e = refused(&t, &Tar::default().file("lonely", b"").sums(b"").finish_without_sums(), "not listed");
    assert!(e.contains("\"lonely\""), "{e}");
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    refused(&t, &again.sums(&wrong).finish_without_sums(), "\"a\": does not match");
    // The right sum with a wrong size.
    let wrong_size = String::from_utf8(good.clone()).unwrap().replacen(" 5 a\n", " 6 a\n", 1);
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    refused(&t, &again.sums(wrong_size.as_bytes()).finish_without_sums(), "does not match");
    // A file missing from the sums, one listed that is not there, one listed twice.
    let only_a = &good[..good.iter().position(|b| *b == b'\n').unwrap() + 1];
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    refused(&t, &again.sums(only_a).finish_without_sums(), "\"b\": not listed");
    let extra = [good.clone(), format!("{} 0 c\n", "0".repeat(64)).into_bytes()].concat();
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    refused(
        &t,
        &again.sums(&extra).finish_without_sums(),
        "\"c\": listed in .wisp-sums but not in the archive",
    );
    let twice = [good.clone(), only_a.to_vec()].concat();
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    refused(&t, &again.sums(&twice).finish_without_sums(), "listed in .wisp-sums but not in the archive");
    // The lines in another order than the files.
    let swapped = [&good[only_a.len()..], only_a].concat();
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    refused(&t, &again.sums(&swapped).finish_without_sums(), "\"a\": not listed in .wisp-sums in its place");
    // Malformed lines.
    for bad in [&b"nonsense\n"[..], b"zz 5 a\n", &good[..good.len() - 1]] {
        let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
        refused(&t, &again.sums(bad).finish_without_sums(), ".wisp-sums");
    }
    // No sums entry at all; and entries after it.
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    refused(&t, &again.finish_without_sums(), "no .wisp-sums");
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    again.sums(&good).raw(FILE, b"late", b"", b"x");
    refused(&t, &again.finish_without_sums(), "not the last entry");
    // And with the right sums it goes through.
    let mut again = Tar { buf: tar.buf.clone(), ..Tar::default() };
    unpack(&again.sums(&good).finish_without_sums()[..], &t.dest(), &Limits::default()).unwrap();
}

/// A real archive from `pack`, for the stream-level tests.
fn packed(t: &Tmp) -> Vec<u8> {
    let src = t.0.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/a"), vec![7u8; 300_000]).unwrap();
    let noise: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(src.join("b"), noise).unwrap();
    let mut out = Vec::new();
    pack(&src, &Selection::new(vec!["**".into()], vec![]).unwrap(), &mut out).unwrap();
    fs::remove_dir_all(&src).unwrap();
    out
}

#[test]
fn a_stream_cut_short() {
    let t = Tmp::new("cut");
    let whole = packed(&t);
    unpack(&whole[..], &t.dest(), &Limits::default()).unwrap();
    let mut cuts: Vec<usize> = (1..=16).chain((1..16).map(|i| whole.len() * i / 16)).collect();
    cuts.sort();
    cuts.dedup();
    for cut in cuts {
        let _ = fs::remove_dir_all(t.dest());
        let short = &whole[..whole.len() - cut];
        let err = unpack(short, &t.dest(), &Limits::default()).expect_err(&format!("cut {cut}")).to_string();
        assert!(
            ["cut short", "reading the archive", "no .wisp-sums"].iter().any(|n| err.contains(n)),
            "cut {cut}: {err}"
        );
        assert_eq!(contents(&t.outside()), Vec::<String>::new());
    }
}

#[test]
fn what_is_not_a_wisp_archive() {
    let t = Tmp::new("garbage");
    refused(&t, b"this is not LZ4 at all, just text", "not an LZ4 frame");
    refused(&t, &[0u8; 4096], "not an LZ4 frame");
    refused(&t, b"", "no .wisp-sums");
    // A plain tar, not compressed.
    let plain = {
        let mut tar = Tar::default();
        tar.file("a", b"x");
        tar.sums(&tar.sums_text());
        tar.buf.clone()
    };
    refused(&t, &plain, "not an LZ4 frame");
    // LZ4 holding something that is not tar.
    refused(&t, &lz4(&[0xa5; 5000]), "a tar header with a bad checksum");
    // A good archive with bytes after the end of the tar inside the frame, or after the frame.
    let mut tar = Tar::default();
    tar.file("a", b"x");
    let text = tar.sums_text();
    tar.sums(&text);
    tar.buf.extend_from_slice(&[0; 1024]);
    tar.buf.extend_from_slice(b"trailing");
    refused(&t, &lz4(&tar.buf), "data after the end");
    let _ = fs::remove_dir_all(t.dest());
    let whole = packed(&t);
    refused(&t, &[&whole[..], b"junk"].concat(), "data after the end of the LZ4 frame");
    // A flipped byte in the middle: the frame's checksums or the tar checks catch it.
    let _ = fs::remove_dir_all(t.dest());
    let mut flipped = whole.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let err = unpack(&flipped[..], &t.dest(), &Limits::default()).unwrap_err();
    assert_eq!(contents(&t.outside()), Vec::<String>::new(), "{err}");
}

/// Timing of pack and unpack against `tar c | tar x` through a pipe, on a tree like node_modules
/// (40,000 files of about 5 KiB in 400 directories) and on one 1 GiB file:
///
/// `cargo test --release --test archive -- --ignored --nocapture` (WISP_BENCH_DIR for the place
/// of the trees, about 3.5 GB; default the temp dir; WISP_BENCH_PIPE_SIZE to set the pipe's
/// buffer, e.g. 1048576).
#[test]
#[ignore = "a benchmark"]
fn bench_pack_and_unpack() {
    use std::time::Instant;
    let base = std::env::var_os("WISP_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let work = base.join(format!("wisp-archive-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Source-like text: words from a small vocabulary (compresses about as well as JavaScript).
    let words: Vec<&str> = "function return const let var if else for while module exports require \
        this that value key index length push map filter reduce object array string number true \
        false null undefined async await promise then catch error new class extends super import"
        .split_whitespace()
        .collect();
    let small = work.join("small");
    let t = Instant::now();
    for d in 0..400 {
        let dir = small.join(format!("node_modules/pkg{:03}/lib/sub{}", d / 4, d % 4));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let len = 1024 + (next() % 8192) as usize;
            let mut text = String::with_capacity(len + 16);
            while text.len() < len {
                text.push_str(words[(next() % words.len() as u64) as usize]);
                text.push(if next() % 9 == 0 { '\n' } else { ' ' });
            }
            fs::write(dir.join(format!("file{f:03}.js")), text).unwrap();
        }
    }
    let big = work.join("big");
    fs::create_dir_all(&big).unwrap();
    {
        let mut f = std::io::BufWriter::new(fs::File::create(big.join("artifact.bin")).unwrap());
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            for c in block.chunks_mut(8) {
                c.copy_from_slice(&next().to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
    }
    println!("trees made in {:.1}s (page cache warm for every run)", t.elapsed().as_secs_f64());
    let all = Selection::new(vec!["**".into()], vec![]).unwrap();
    let mib = |b: u64, s: f64| b as f64 / 1048576.0 / s;
    let sh = |cmd: &str| {
        let t = Instant::now();
        let st = std::process::Command::new("sh").arg("-c").arg(cmd).status().unwrap();
        assert!(st.success(), "{cmd}");
        t.elapsed().as_secs_f64()
    };
    // Every run writes into a new empty directory after a sync (not timed); each is run twice
    // and the faster time kept. Outputs of the small-file tree are kept until the end: removing
    // 40,000 files just before a run made the next run's times swing tenfold on this ext4.
    let runs = std::cell::Cell::new(0);
    let fresh = |keep_old: bool| {
        let n = runs.get() + 1;
        runs.set(n);
        if !keep_old {
            let _ = fs::remove_dir_all(work.join(format!("out{}", n - 1)));
        }
        let out = work.join(format!("out{n}"));
        fs::create_dir_all(&out).unwrap();
        sh("sync");
        out
    };
    for (name, tree) in [("40,000 files of ~5 KiB", &small), ("one 1 GiB file", &big)] {
        let file = work.join("archive.tar.lz4");
        let keep = tree == &small;
        let mut best = [f64::MAX; 5];
        let mut packed = None;
        for _ in 0..2 {
            // pack to a file, then unpack from it.
            fresh(keep);
            let t = Instant::now();
            let p = pack(tree, &all, std::io::BufWriter::new(fs::File::create(&file).unwrap())).unwrap();
            best[0] = best[0].min(t.elapsed().as_secs_f64());
            let out = fresh(keep);
            let t = Instant::now();
            let u = unpack(fs::File::open(&file).unwrap(), &out, &Limits::default()).unwrap();
            best[1] = best[1].min(t.elapsed().as_secs_f64());
            assert_eq!((u.files, u.bytes), (p.files, p.bytes));
            // pack | unpack through a pipe, one thread each.
            let out = fresh(keep);
            let (r, w) = nix::unistd::pipe().unwrap();
            if let Some(size) = std::env::var("WISP_BENCH_PIPE_SIZE").ok().and_then(|v| v.parse().ok()) {
                nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)).unwrap();
            }
            let t = Instant::now();
            let (tree2, all2) = (tree.clone(), all.clone());
            let packer = std::thread::spawn(move || pack(&tree2, &all2, fs::File::from(w)).unwrap());
            let u = unpack(fs::File::from(r), &out, &Limits::default()).unwrap();
            packer.join().unwrap();
            best[2] = best[2].min(t.elapsed().as_secs_f64());
            assert_eq!(u.bytes, p.bytes);
            let src = tree.display();
            let out = fresh(keep);
            best[3] = best[3].min(sh(&format!("tar -C {src} -cf - . | tar -C {} -xf -", out.display())));
            let out = fresh(keep);
            let lz4 =
                format!("tar -C {src} -cf - . | lz4 -1 -q | lz4 -d -q | tar -C {} -xf -", out.display());
            best[4] = best[4].min(sh(&lz4));
            packed = Some(p);
        }
        let p = packed.unwrap();
        println!(
            "\n{name}: {} files, {:.1} MiB, archive {:.1} MiB ({:.0}% of the tar stream)",
            p.files,
            p.bytes as f64 / 1048576.0,
            p.compressed_bytes as f64 / 1048576.0,
            100.0 * p.compressed_bytes as f64 / p.tar_bytes as f64
        );
        let whats = [
            "pack to a file",
            "unpack from the file",
            "pack | unpack (pipe, 2 threads)",
            "tar c | tar x (pipe)",
            "tar c | lz4 -1 | lz4 -d | tar x",
        ];
        for (what, s) in whats.iter().zip(best) {
            println!("  {what:<34} {s:7.2} s {:8.0} MiB/s", mib(p.bytes, s));
        }
        let _ = fs::remove_file(&file);
    }
    let _ = fs::remove_dir_all(&work);
}
