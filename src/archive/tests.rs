//! Round trips of real trees through [`pack`] and [`unpack`], and what a [`Selection`] takes.
//! The hostile archives are in tests/archive.rs.

use super::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub(super) struct Tmp(pub PathBuf);

impl Tmp {
    pub(super) fn new(tag: &str) -> Tmp {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "wisp-archive-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What a tree holds, for comparing two: per path, its kind, mode, mtime and content or target.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir { mode: u32, mtime: i64 },
    File { mode: u32, mtime: i64, sha: String, size: u64 },
    Link { target: PathBuf, mtime: i64 },
}

fn sha(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    hex::encode(ctx.finish())
}

pub(super) fn tree(root: &Path) -> BTreeMap<String, NodeView> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, NodeView>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let m = fs::symlink_metadata(&p).unwrap();
            let node = if m.file_type().is_symlink() {
                Node::Link { target: fs::read_link(&p).unwrap(), mtime: m.mtime() }
            } else if m.is_dir() {
                walk(root, &p, out);
                Node::Dir { mode: m.mode() & 0o7777, mtime: m.mtime() }
            } else {
                Node::File { mode: m.mode() & 0o7777, mtime: m.mtime(), sha: sha(&p), size: m.len() }
            };
            out.insert(rel, NodeView(node));
        }
    }
    walk(root, root, &mut out);
    out
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct NodeView(Node);

fn write(path: &Path, data: &[u8], mode: u32, mtime: i64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(path, mtime);
}

fn set_mtime(path: &Path, secs: i64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64);
    let f = fs::File::open(path).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(t)).unwrap();
}

fn link_mtime(path: &Path, secs: i64) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::from(std::time::Duration::from_secs(secs as u64));
    utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
}

/// Pseudo-random bytes (xorshift), so a large file does not compress to nothing.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn all() -> Selection {
    Selection::new(vec!["**".into()], vec![]).unwrap()
}

fn sel(include: &[&str], exclude: &[&str]) -> Selection {
    let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    Selection::new(v(include), v(exclude)).unwrap()
}

fn pack_vec(root: &Path, s: &Selection) -> (Vec<u8>, Packed) {
    let mut out = Vec::new();
    let packed = pack(root, s, &mut out).unwrap();
    assert_eq!(packed.compressed_bytes, out.len() as u64);
    (out, packed)
}

/// The paths an archive holds, in order, with a letter for the kind.
pub(super) fn listing(archive: &[u8]) -> Vec<String> {
    let dec = lz4_flex::frame::FrameDecoder::new(archive);
    let mut a = tar::Archive::new(dec);
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let k = match e.header().entry_type() {
                tar::EntryType::Directory => "d",
                tar::EntryType::Symlink => "l",
                _ => "f",
            };
            format!("{k} {}", String::from_utf8_lossy(&e.path_bytes()))
        })
        .collect()
}

/// A tree with most of what an archive must carry.
fn sample(root: &Path) {
    write(&root.join("README"), b"hello\n", 0o644, 1_600_000_000);
    write(&root.join("bin/run.sh"), b"#!/bin/sh\necho hi\n", 0o755, 1_600_000_001);
    write(&root.join("secret/key"), b"k", 0o600, 1_600_000_002);
    write(&root.join("big/blob"), &noise(20 << 20, 7), 0o644, 1_600_000_003);
    write(&root.join("a/b/c/d/e/nested.txt"), b"deep", 0o640, 1_600_000_004);
    write(&root.join("empty-file"), b"", 0o644, 1_600_000_005);
    let long = root.join("long").join("x".repeat(60)).join("y".repeat(60)).join("z".repeat(70) + ".txt");
    write(&long, b"long path", 0o644, 1_600_000_006);
    write(&root.join("ünïcødé/日本語 ファイル.txt"), "ünï".as_bytes(), 0o644, 1_600_000_007);
    write(&root.join("with space/and 'quotes'"), b"q", 0o644, 1_600_000_008);
    fs::create_dir_all(root.join("empty/dir")).unwrap();
    fs::set_permissions(root.join("empty/dir"), fs::Permissions::from_mode(0o700)).unwrap();
    set_mtime(&root.join("empty/dir"), 1_500_000_000);
    symlink("../README", root.join("bin/readme-link")).unwrap();
    symlink("a/b", root.join("dir-link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("/etc/passwd", root.join("absolute-link")).unwrap();
    let long_target = "t/".repeat(80) + "end";
    symlink(&long_target, root.join("long-target")).unwrap();
    link_mtime(&root.join("dangling"), 1_400_000_000);
    // Directory mtimes last: writing into a directory changes its mtime.
    for (i, d) in ["bin", "secret", "big", "a/b/c", "long", "empty"].iter().enumerate() {
        set_mtime(&root.join(d), 1_300_000_000 + i as i64);
    }
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_tree_round_trips() {
    let t = Tmp::new("roundtrip");
    let (src, dst) = (t.0.join("src"), t.0.join("dst"));
    sample(&src);
    let (bytes, packed) = pack_vec(&src, &all());
    assert_eq!(packed.files, 9, "{packed:?}");
    assert_eq!(packed.links, 5, "{packed:?}");
    assert!(packed.bytes > 20 << 20 && packed.tar_bytes > packed.bytes, "{packed:?}");
    // Noise does not compress; the rest does a little.
    assert!(packed.compressed_bytes < packed.tar_bytes + (1 << 20), "{packed:?}");
    let un = unpack(&bytes[..], &dst, &Limits::default()).unwrap();
    assert_eq!(tree(&src), tree(&dst));
    assert_eq!((un.files, un.links, un.dirs), (packed.files, packed.links, packed.dirs));
    assert_eq!(un.bytes, packed.bytes);
    let blob = un.written.iter().find(|f| f.path == "big/blob").unwrap();
    assert_eq!(blob.size, 20 << 20);
    assert_eq!(hex::encode(blob.sha256), sha(&src.join("big/blob")));
    // Path order, component by component: a directory's entries follow it.
    let names = listing(&bytes);
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap_or_else(|| panic!("{n} in {names:?}"));
    assert!(pos("d a") < pos("d a/b") && pos("d a/b/c/d/e") < pos("f a/b/c/d/e/nested.txt"));
    assert!(pos("f a/b/c/d/e/nested.txt") < pos("l absolute-link"));
    assert_eq!(names.last().unwrap(), "f .wisp-sums");
}

#[test]
fn packing_is_deterministic_and_unpacking_twice_replaces() {
    let t = Tmp::new("determ");
    let (src, dst) = (t.0.join("src"), t.0.join("dst"));
    write(&src.join("a.txt"), b"one", 0o644, 1_000);
    write(&src.join("d/b.txt"), b"two", 0o755, 2_000);
    symlink("a.txt", src.join("l")).unwrap();
    let (one, _) = pack_vec(&src, &all());
    let (two, _) = pack_vec(&src, &all());
    assert_eq!(one, two);
    unpack(&one[..], &dst, &Limits::default()).unwrap();
    // Again over what is there: files and links are replaced, directories kept.
    write(&src.join("a.txt"), b"changed", 0o600, 3_000);
    let (three, _) = pack_vec(&src, &all());
    unpack(&three[..], &dst, &Limits::default()).unwrap();
    assert_eq!(tree(&src), tree(&dst));
    // No temporary file is left behind.
    assert!(fs::read_dir(&dst).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".wisp")));
}

#[test]
fn an_existing_link_is_replaced_not_followed() {
    let t = Tmp::new("replace-link");
    let (src, dst, outside) = (t.0.join("src"), t.0.join("dst"), t.0.join("outside"));
    write(&src.join("f"), b"from the archive", 0o644, 1_000);
    write(&src.join("g"), b"g", 0o644, 1_000);
    symlink("f", src.join("h")).unwrap();
    write(&outside.join("victim"), b"untouched", 0o644, 1_000);
    fs::create_dir_all(&dst).unwrap();
    symlink(outside.join("victim"), dst.join("f")).unwrap();
    symlink(outside.join("victim"), dst.join("h")).unwrap();
    write(&dst.join("g"), b"old", 0o644, 1_000);
    let (bytes, _) = pack_vec(&src, &all());
    unpack(&bytes[..], &dst, &Limits::default()).unwrap();
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"untouched");
    assert_eq!(tree(&src), tree(&dst));
}

#[test]
fn setuid_setgid_and_sticky_are_dropped() {
    let t = Tmp::new("suid");
    let (src, dst) = (t.0.join("src"), t.0.join("dst"));
    write(&src.join("suid"), b"x", 0o4755, 1_000);
    write(&src.join("sgid"), b"x", 0o2750, 1_000);
    fs::create_dir_all(src.join("sticky")).unwrap();
    fs::set_permissions(src.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    let (bytes, _) = pack_vec(&src, &all());
    unpack(&bytes[..], &dst, &Limits::default()).unwrap();
    let mode = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap().mode() & 0o7777;
    assert_eq!((mode("suid"), mode("sgid"), mode("sticky")), (0o755, 0o750, 0o777));
}

#[test]
fn a_read_only_directory_is_filled_before_its_mode_is_applied() {
    let t = Tmp::new("readonly");
    let (src, dst) = (t.0.join("src"), t.0.join("dst"));
    write(&src.join("ro/inner/file"), b"x", 0o444, 1_000);
    fs::set_permissions(src.join("ro/inner"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    let (bytes, _) = pack_vec(&src, &all());
    unpack(&bytes[..], &dst, &Limits::default()).unwrap();
    assert_eq!(tree(&src), tree(&dst));
    for d in [&src, &dst] {
        for p in ["ro", "ro/inner"] {
            fs::set_permissions(d.join(p), fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

#[test]
fn include_and_exclude() {
    let t = Tmp::new("select");
    let src = t.0.join("src");
    for p in [
        "target/app.tar.gz",
        "target/app.zip",
        "target/sub/deep.tar.gz",
        "dist/index.html",
        "dist/js/app.js",
        "dist/js/app.js.map",
        "dist/node_modules/x/index.js",
        "src/main.rs",
        "logs/a.log",
        "logs/old/b.log",
        ".wisp/spool/1-1",
        ".wisp-sums",
    ] {
        write(&src.join(p), p.as_bytes(), 0o644, 1_000);
    }
    fs::create_dir_all(src.join("dist/empty")).unwrap();
    let names = |s: &Selection| -> Vec<String> { listing(&pack_vec(&src, s).0) };
    assert_eq!(
        names(&sel(&["target/*.tar.gz"], &[])),
        ["d target", "f target/app.tar.gz", "f .wisp-sums"],
        "* does not cross /"
    );
    assert_eq!(
        names(&sel(&["dist/**"], &["**/*.map", "**/node_modules"])),
        ["d dist", "d dist/empty", "f dist/index.html", "d dist/js", "f dist/js/app.js", "f .wisp-sums"]
    );
    assert_eq!(
        names(&sel(&["**/*.log"], &["logs/old"])),
        ["d logs", "f logs/a.log", "f .wisp-sums"],
        "an excluded directory is not entered"
    );
    assert_eq!(
        names(&sel(&["**/*.{rs,zip}"], &[])),
        ["d src", "f src/main.rs", "d target", "f target/app.zip", "f .wisp-sums"]
    );
    assert_eq!(
        names(&sel(&["dist/[a-j]*.html", "./src/*"], &["src/*"])),
        ["d dist", "f dist/index.html", "f .wisp-sums"]
    );
    // The agent's .wisp and a .wisp-sums at the root are never taken.
    let every = names(&all());
    assert!(!every.iter().any(|n| n.contains(" .wisp/") || n.ends_with(" .wisp")), "{every:?}");
    assert_eq!(every.iter().filter(|n| n.ends_with(".wisp-sums")).count(), 1, "{every:?}");
    assert_eq!(every.last().unwrap(), "f .wisp-sums");
    // Nothing matched is not an error.
    let (_, p) = pack_vec(&src, &sel(&["nothing/**"], &[]));
    assert!(p.is_empty());
    let (_, p) = pack_vec(&src, &sel(&["dist"], &[]));
    assert_eq!((p.dirs, p.files), (1, 0), "a matched directory alone: {p:?}");
}

#[test]
fn bad_patterns_are_refused_clearly() {
    let bad = |inc: &str, needle: &str| {
        let e = Selection::new(vec![inc.into()], vec![]).unwrap_err().to_string();
        assert!(e.contains(needle), "{inc:?}: {e}");
        let e = Selection::new(vec!["**".into()], vec![inc.into()]).unwrap_err().to_string();
        assert!(e.contains(needle), "exclude {inc:?}: {e}");
    };
    bad("/etc/passwd", "absolute");
    bad("../x", "..");
    bad("a/../../x", "..");
    bad("a/{b,c", "unclosed brace");
    bad("a/[bc", "unclosed character class");
    bad("a\\", "trailing backslash");
    bad("", "empty");
    bad("dist/", "dir/**");
    bad("!x", "exclude");
    bad("a//b", "empty path component");
    bad(".", "**");
    let e = Selection::new(vec![], vec![]).unwrap_err().to_string();
    assert!(e.contains("no include"), "{e}");
    assert_eq!(sel(&["./dist/**"], &[]).include(), ["dist/**"]);
}

#[test]
fn names_that_cannot_be_archived() {
    use std::os::unix::ffi::OsStrExt;
    let t = Tmp::new("names");
    let src = t.0.join("src");
    write(&src.join("ok"), b"x", 0o644, 1_000);
    write(&src.join(std::ffi::OsStr::from_bytes(b"bad\xff")), b"x", 0o644, 1_000);
    write(&src.join("new\nline"), b"x", 0o644, 1_000);
    // Not selected: not a problem.
    let (_, p) = pack_vec(&src, &sel(&["ok"], &[]));
    assert_eq!(p.files, 1);
    let err = |s: &Selection| pack(&src, s, std::io::sink()).unwrap_err().to_string();
    assert!(err(&sel(&["bad*"], &[])).contains("not UTF-8"));
    assert!(err(&sel(&["new*"], &[])).contains("newline"));
    // A fifo that matches is left out and counted.
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let (_, p) = pack_vec(&src, &sel(&["ok", "fifo"], &[]));
    assert_eq!((p.files, p.skipped), (1, 1));
}

#[test]
fn an_empty_selection_round_trips_to_nothing() {
    let t = Tmp::new("empty");
    let (src, dst) = (t.0.join("src"), t.0.join("dst"));
    write(&src.join("a"), b"x", 0o644, 1_000);
    let (bytes, p) = pack_vec(&src, &sel(&["nope"], &[]));
    assert!(p.is_empty());
    let un = unpack(&bytes[..], &dst, &Limits::default()).unwrap();
    assert_eq!(un, Unpacked::default());
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 0);
}

mod random {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Item {
        File(Vec<u8>, u32),
        Dir(u32),
        Link(String),
    }

    fn name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c.txt", "ü", "x y", "dd", "e.tar.gz", "Z"])
            .prop_map(String::from)
    }

    fn item() -> impl Strategy<Value = Item> {
        prop_oneof![
            4 => (prop::collection::vec(any::<u8>(), 0..3000), prop::sample::select(vec![0o644u32, 0o755, 0o600, 0o400])).prop_map(|(d, m)| Item::File(d, m)),
            2 => prop::sample::select(vec![0o755u32, 0o700, 0o750]).prop_map(Item::Dir),
            1 => name().prop_map(Item::Link),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_trees_round_trip(items in prop::collection::vec((prop::collection::vec(name(), 1..4), item()), 0..24)) {
            let t = Tmp::new("prop");
            let (src, dst) = (t.0.join("src"), t.0.join("dst"));
            fs::create_dir_all(&src).unwrap();
            for (path, item) in &items {
                let p = path.iter().fold(src.clone(), |p, c| p.join(c));
                // Skip what collides with something made before (a file where a directory goes).
                if p.parent().is_some_and(|d| fs::symlink_metadata(d).is_ok_and(|m| !m.is_dir())) || fs::symlink_metadata(&p).is_ok() {
                    continue;
                }
                if fs::create_dir_all(p.parent().unwrap()).is_err() { continue; }
                match item {
                    Item::File(data, mode) => write(&p, data, *mode, 1_000_000),
                    Item::Dir(mode) => {
                        fs::create_dir(&p).unwrap();
                        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
                    }
                    Item::Link(target) => symlink(target, &p).unwrap(),
                }
            }
            let (bytes, packed) = pack_vec(&src, &all());
            let un = unpack(&bytes[..], &dst, &Limits::default()).unwrap();
            prop_assert_eq!(un.files, packed.files);
            // Directory mtimes changed as the tree was made; compare all else.
            let strip = |m: BTreeMap<String, NodeView>| -> Vec<(String, String)> {
                m.into_iter().map(|(k, v)| match v.0 {
                    Node::Dir { mode, .. } => (k, format!("dir {mode:o}")),
                    other => (k, format!("{other:?}")),
                }).collect()
            };
            prop_assert_eq!(strip(tree(&src)), strip(tree(&dst)));
        }
    }
}

#[test]
fn the_heap_sort_sorts_like_std() {
    use std::ffi::CString;
    let mut x = 12345u64;
    for n in [0, 1, 2, 3, 7, 64, 500] {
        let mut v: Vec<(CString, Option<nix::dir::Type>)> = (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let len = (x >> 60) as usize;
                let name: Vec<u8> =
                    (0..len).map(|i| b"ab.\xc3\xa9z"[((x >> (i * 3)) % 6) as usize]).collect();
                (CString::new(name).unwrap(), None)
            })
            .collect();
        let mut want: Vec<Vec<u8>> = v.iter().map(|(c, _)| c.as_bytes().to_vec()).collect();
        want.sort();
        pack::heap_sort(&mut v);
        let got: Vec<Vec<u8>> = v.iter().map(|(c, _)| c.as_bytes().to_vec()).collect();
        assert_eq!(got, want, "{n} names");
    }
}

#[test]
fn an_mtime_past_2038_round_trips_where_time_t_holds_it() {
    // Built by hand: on a 32-bit target the tree could not be given such mtimes to pack.
    let far = 1u64 << 33; // the year 2242
    let mut tar = Vec::new();
    let mut entry = |kind: tar::EntryType, path: &str, link: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_mtime(far);
        h.set_cksum();
        tar.extend_from_slice(h.as_bytes());
        tar.extend_from_slice(data);
        tar.resize(tar.len().next_multiple_of(512), 0);
    };
    entry(tar::EntryType::Directory, "d", "", b"");
    entry(tar::EntryType::Regular, "d/f", "", b"x");
    entry(tar::EntryType::Symlink, "d/l", "f", b"");
    let sums = format!("{} 1 d/f\n", hex::encode(ring::digest::digest(&ring::digest::SHA256, b"x")));
    entry(tar::EntryType::Regular, SUMS_NAME, "", sums.as_bytes());
    tar.extend_from_slice(&[0; 1024]);
    let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
    std::io::Write::write_all(&mut enc, &tar).unwrap();
    let bytes = enc.finish().unwrap();
    let t = Tmp::new("y2038");
    unpack(&bytes[..], &t.0, &Limits::default()).unwrap();
    // Where time_t is 32 bits (armv7 musl) the mtime is clamped to its end, early 2038.
    let want = if cfg!(target_pointer_width = "32") { i32::MAX as i64 } else { far as i64 };
    for p in ["d", "d/f", "d/l"] {
        assert_eq!(fs::symlink_metadata(t.0.join(p)).unwrap().mtime(), want, "{p}");
    }
}
