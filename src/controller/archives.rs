//! Artifacts and stashes on the controller. A pack step's output (the archive an agent streams,
//! through the same spool, credit and replay as any step's output) goes to `builds/ID/N.pack`;
//! when the step succeeds it becomes stash `NAME` (`builds/ID/stash/NAME.wisp`, removed when the
//! build ends) or is unpacked, as hostile input, into the build's artifacts
//! (`builds/ID/artifacts/files/`, listed in `builds/ID/artifacts/index`, one `SHA256 SIZE PATH`
//! line per file). An unstash step gets the stash's bytes in `Put` frames, at most a window
//! ahead of what its agent has taken.

use super::build::LiveBuild;
use super::pipeline::{Kind, Planned, Step};
use super::session::Out;
use super::steps::Slot;
use super::Controller;
use crate::archive::{self, Limits, Unpacked};
use crate::proto::{MAX_PUT_CHUNK, PACK_SHELL, UNPACK_SHELL};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of a stash in flight to an agent beyond what it has taken.
pub const PUT_WINDOW: u64 = 256 * 1024;

/// Where a pack step's archive is kept while it arrives.
pub fn pack_path(ctl: &Controller, build: u64, step: u32) -> PathBuf {
    ctl.logs.build_dir(build).join(format!("{step}.pack"))
}

/// The build's stashes.
pub fn stash_dir(ctl: &Controller, build: u64) -> PathBuf {
    ctl.logs.build_dir(build).join("stash")
}

/// Stash `name` of a build.
pub fn stash_path(ctl: &Controller, build: u64, name: &str) -> PathBuf {
    stash_dir(ctl, build).join(format!("{name}.wisp"))
}

/// The build's artifacts: `files/` and `index`.
pub fn artifacts_dir(ctl: &Controller, build: u64) -> PathBuf {
    ctl.logs.build_dir(build).join("artifacts")
}

/// The names of the build's stashes.
pub async fn stash_names(ctl: &Controller, build: u64) -> Vec<String> {
    let dir = stash_dir(ctl, build);
    smol::unblock(move || {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".wisp").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_artifacts_go_and_new_ones_stay() {
        let root = std::env::temp_dir().join(format!("wisp-expire-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (b, age_days) in [(1u64, 40u64), (2, 1)] {
            let arts = root.join(b.to_string()).join("artifacts");
            std::fs::create_dir_all(arts.join("files")).unwrap();
            std::fs::write(arts.join("files/a"), b"12345").unwrap();
            std::fs::write(arts.join("index"), format!("{} 5 a\n", "0".repeat(64))).unwrap();
            let t = std::time::SystemTime::now() - Duration::from_secs(age_days * 86_400);
            std::fs::File::options().write(true).open(arts.join("index")).unwrap().set_modified(t).unwrap();
        }
        std::fs::create_dir_all(root.join("3")).unwrap();
        assert_eq!(expire(&root, Duration::from_secs(30 * 86_400)), (1, 5));
        assert!(!root.join("1/artifacts").exists());
        assert!(root.join("2/artifacts/files/a").exists());
        assert_eq!(list(&root.join("2/artifacts")).unwrap()[0].path, "a");
        let _ = std::fs::remove_dir_all(&root);
    }

    fn scratch(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("wisp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn a_merge_joins_directories_replaces_files_and_never_writes_through_a_link() {
        let root = scratch("merge");
        let (from, to, outside) = (root.join("from"), root.join("to"), root.join("outside"));
        std::fs::create_dir_all(from.join("d/e")).unwrap();
        std::fs::create_dir_all(from.join("l")).unwrap();
        std::fs::create_dir_all(to.join("d")).unwrap();
        std::fs::create_dir_all(to.join("f")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(from.join("d/e/new"), b"new").unwrap();
        std::fs::write(from.join("d/same"), b"second").unwrap();
        std::fs::write(from.join("f"), b"a file where a directory was").unwrap();
        std::fs::write(from.join("l/x"), b"x").unwrap();
        std::fs::write(to.join("d/same"), b"first").unwrap();
        std::fs::write(to.join("d/kept"), b"kept").unwrap();
        std::fs::write(to.join("f/old"), b"old").unwrap();
        std::os::unix::fs::symlink(&outside, to.join("l")).unwrap();
        merge(&from, &to).unwrap();
        let read = |p: &str| std::fs::read_to_string(to.join(p)).unwrap();
        assert_eq!(read("d/e/new"), "new");
        assert_eq!(read("d/same"), "second");
        assert_eq!(read("d/kept"), "kept");
        assert_eq!(read("f"), "a file where a directory was");
        assert_eq!(read("l/x"), "x");
        assert!(!std::fs::symlink_metadata(to.join("l")).unwrap().is_symlink());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written through the link");
        assert!(!from.exists());
        // Into nothing yet: the staging directory itself becomes the artifacts.
        std::fs::create_dir_all(root.join("again")).unwrap();
        std::fs::write(root.join("again/a"), b"a").unwrap();
        merge(&root.join("again"), &root.join("fresh/files")).unwrap();
        assert_eq!(std::fs::read(root.join("fresh/files/a")).unwrap(), b"a");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_follower_reads_a_file_as_it_grows_and_ends_only_when_told() {
        use std::io::{Read, Write};
        let root = scratch("follow");
        let path = root.join("n.pack");
        let state = Arc::new(AtomicU8::new(ARRIVING));
        let mut follow = Follow { path: path.clone(), file: None, state: state.clone() };
        let writer = std::thread::spawn({
            let (path, state) = (path.clone(), state.clone());
            move || {
                // The file appears late and grows in pieces.
                std::thread::sleep(Duration::from_millis(30));
                let mut f = std::fs::File::create(&path).unwrap();
                for i in 0..20u8 {
                    f.write_all(&[i; 1000]).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
                state.store(COMPLETE, Ordering::SeqCst);
            }
        });
        let mut got = Vec::new();
        follow.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got.len(), 20_000);
        assert!(got.chunks(1000).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));
        // Abandoned: the reader gives up instead of waiting for bytes that will not come.
        let mut follow = Follow { path: root.join("never"), file: None, state: state.clone() };
        state.store(ABANDONED, Ordering::SeqCst);
        assert!(follow.read(&mut [0u8; 16]).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// The `StepStart` of a pack step: the selection as `+`/`-` lines in the script.
pub fn pack_step(p: &Planned) -> Step {
    let sel = match &p.kind {
        Kind::Stash { sel, .. } | Kind::Archive { sel } => sel,
        _ => unreachable!("only stash and archive pack"),
    };
    let mut script = String::new();
    for s in &sel.paths {
        script.push('+');
        script.push_str(s);
        script.push('\n');
    }
    for s in &sel.exclude {
        script.push('-');
        script.push_str(s);
        script.push('\n');
    }
    Step { script, shell: PACK_SHELL.into(), env: Vec::new(), ..p.step.clone() }
}

/// The `StepStart` of an unpack step for an archive of `size` bytes.
pub fn unpack_step(p: &Planned, size: u64) -> Step {
    Step { script: size.to_string(), shell: UNPACK_SHELL.into(), env: Vec::new(), ..p.step.clone() }
}

/// A pack step succeeded (`summary` is its agent's word on it): its archive becomes the stash,
/// or the build's artifacts (from what `unpacking` unpacked while the archive arrived, or, if it
/// failed, from the stored archive). Returns the line its log keeps.
pub async fn after_pack(
    ctl: &Arc<Controller>,
    build: u64,
    step: u32,
    kind: &Kind,
    summary: &str,
    unpacking: Option<Unpacking>,
) -> Result<String, String> {
    let pack = pack_path(ctl, build, step);
    match kind {
        Kind::Stash { name, .. } => {
            let dir = stash_dir(ctl, build);
            let to = stash_path(ctl, build, name);
            let name = name.clone();
            let summary = summary.to_string();
            smol::unblock(move || {
                std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                std::fs::rename(&pack, &to).map_err(|e| format!("cannot keep stash {name}: {e}"))?;
                Ok(format!("stashed {name}: {summary}\n"))
            })
            .await
        }
        Kind::Archive { .. } => {
            let dir = artifacts_dir(ctl, build);
            let staged = staging_dir(ctl, build, step);
            let got = match unpacking {
                Some(u) => u.complete().await,
                None => Err("not unpacked while it arrived".to_string()),
            };
            smol::unblock(move || {
                let got = match got {
                    Ok(got) => Ok(got),
                    Err(why) => {
                        // Unpacked again from the stored archive, the one that counts (the
                        // stream may have read bytes a failed write later cut back).
                        log::info!("{}: unpacking it again from the stored archive ({why})", pack.display());
                        unpack_file(&pack, &staged)
                    }
                };
                let _ = std::fs::remove_file(&pack);
                let got = match got {
                    Ok(got) => got,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&staged);
                        return Err(e);
                    }
                };
                merge(&staged, &dir.join("files"))
                    .map_err(|e| format!("cannot move the artifacts into {}: {e}", dir.display()))?;
                let mut index = String::new();
                for f in &got.written {
                    index.push_str(&format!("{} {} {}\n", hex::encode(f.sha256), f.size, f.path));
                }
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("index"))
                    .and_then(|mut f| f.write_all(index.as_bytes()))
                    .map_err(|e| format!("cannot write the artifact index: {e}"))?;
                Ok(format!("archived {} files, {} bytes (SHA-256 checked)\n", got.files, got.bytes))
            })
            .await
        }
        _ => Ok(String::new()),
    }
}

/// Where an archive step's files are unpacked before they join the build's artifacts: a failed
/// or repeated step never leaves half an archive among them.
fn staging_dir(ctl: &Controller, build: u64, step: u32) -> PathBuf {
    artifacts_dir(ctl, build).join(format!(".incoming-{step}"))
}

/// Unpack the stored archive `pack` into `dest` (which is emptied first).
fn unpack_file(pack: &Path, dest: &Path) -> Result<Unpacked, String> {
    let _ = std::fs::remove_dir_all(dest);
    let input = std::fs::File::open(pack).map_err(|e| format!("cannot read {}: {e}", pack.display()))?;
    archive::unpack(std::io::BufReader::with_capacity(64 << 10, input), dest, &Limits::default())
        .map_err(|e| format!("the agent's archive was refused: {e}"))
}

/// Move what `from` holds into `to`, entry by entry: a directory merges with a directory of the
/// same name, anything else replaces what is there (a link is never followed: an earlier
/// archive's `d -> /etc` is replaced by this one's directory `d`, not written through). `from`
/// is gone afterwards.
fn merge(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            return std::fs::rename(from, to);
        }
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => {
            std::fs::remove_file(to)?;
            return std::fs::rename(from, to);
        }
        Ok(_) => {}
    }
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            merge(&src, &dst)?;
        } else {
            if std::fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
                std::fs::remove_dir_all(&dst)?;
            }
            std::fs::rename(&src, &dst)?;
        }
    }
    std::fs::remove_dir_all(from)
}

const ARRIVING: u8 = 0;
const COMPLETE: u8 = 1;
const ABANDONED: u8 = 2;

/// An archive step's artifacts unpacked on a thread while the archive arrives (the thread reads
/// the stored archive as it grows), so the step ends soon after its last byte instead of one
/// whole unpack later. Dropped before [`Unpacking::complete`], the thread stops and removes what
/// it wrote.
pub struct Unpacking {
    state: Arc<AtomicU8>,
    done: smol::channel::Receiver<Result<Unpacked, String>>,
}

impl Unpacking {
    /// Start following step `step`'s stored archive.
    pub fn start(ctl: &Controller, build: u64, step: u32) -> Result<Unpacking, String> {
        let (pack, staged) = (pack_path(ctl, build, step), staging_dir(ctl, build, step));
        let state = Arc::new(AtomicU8::new(ARRIVING));
        let (tx, done) = smol::channel::bounded(1);
        let follow = Follow { path: pack, file: None, state: state.clone() };
        let seen = state.clone();
        std::thread::Builder::new()
            .name("wisp-artifacts".into())
            .spawn(move || {
                let _ = std::fs::remove_dir_all(&staged);
                let input = std::io::BufReader::with_capacity(64 << 10, follow);
                let got = archive::unpack(input, &staged, &Limits::default())
                    .map_err(|e| format!("the agent's archive was refused: {e}"));
                if seen.load(Ordering::SeqCst) == ABANDONED || got.is_err() {
                    let _ = std::fs::remove_dir_all(&staged);
                }
                let _ = tx.send_blocking(got);
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(Unpacking { state, done })
    }

    /// The archive is complete: what the thread made of it, once it has read the end.
    async fn complete(self) -> Result<Unpacked, String> {
        self.state.store(COMPLETE, Ordering::SeqCst);
        self.done.recv().await.unwrap_or_else(|_| Err("the unpacking thread stopped".into()))
    }
}

impl Drop for Unpacking {
    fn drop(&mut self) {
        let _ = self.state.compare_exchange(ARRIVING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Reads a file that is still being written: at its end it waits for more until the writer is
/// done ([`COMPLETE`]: then the end is the end) or gone ([`ABANDONED`]: an error).
struct Follow {
    path: PathBuf,
    file: Option<std::fs::File>,
    state: Arc<AtomicU8>,
}

impl std::io::Read for Follow {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut idle = Duration::from_micros(200);
        loop {
            // Read the state first: COMPLETE seen before a read that finds nothing means the end.
            let state = self.state.load(Ordering::SeqCst);
            if state == ABANDONED {
                return Err(std::io::Error::other("the archive step ended without its archive"));
            }
            if self.file.is_none() {
                match std::fs::File::open(&self.path) {
                    Ok(f) => self.file = Some(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && state == ARRIVING => {}
                    Err(e) => return Err(e),
                }
            }
            if let Some(f) = &mut self.file {
                let n = f.read(buf)?;
                if n > 0 || state == COMPLETE {
                    return Ok(n);
                }
            }
            std::thread::sleep(idle);
            idle = (idle * 2).min(Duration::from_millis(20));
        }
    }
}

/// How often old artifacts are looked for.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(3600);

/// Remove the artifacts of every build under `builds` archived more than `keep` ago (by their
/// index's time: the build's last archive); returns how many builds' and bytes. Stashes are not
/// touched (they go with their build).
pub fn expire(builds: &Path, keep: Duration) -> (u64, u64) {
    let now = std::time::SystemTime::now();
    let (mut count, mut bytes) = (0, 0);
    let Ok(dir) = std::fs::read_dir(builds) else { return (0, 0) };
    for e in dir.flatten() {
        let arts = e.path().join("artifacts");
        let Ok(m) = std::fs::metadata(arts.join("index")) else { continue };
        let old = m.modified().ok().and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age > keep);
        if !old {
            continue;
        }
        let size: u64 = list(&arts).map(|l| l.iter().map(|a| a.size).sum()).unwrap_or(0);
        match std::fs::remove_dir_all(&arts) {
            Ok(()) => {
                count += 1;
                bytes += size;
            }
            Err(err) => log::warn!("cannot remove old artifacts {}: {err}", arts.display()),
        }
    }
    (count, bytes)
}

/// Remove old artifacts at start and every [`EXPIRE_EVERY`].
pub async fn expire_loop(ctl: Arc<Controller>, keep: Duration) {
    let builds = ctl.logs.builds_root();
    loop {
        let b = builds.clone();
        let (n, bytes) = smol::unblock(move || expire(&b, keep)).await;
        if n > 0 {
            log::info!(
                "removed the artifacts of {n} builds ({bytes} bytes) archived more than {} days ago",
                keep.as_secs() / 86_400
            );
        }
        smol::Timer::after(EXPIRE_EVERY).await;
    }
}

/// One artifact as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Artifact {
    /// `/`-separated path.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// A build's artifacts, by path (a later archive of a path replaces the earlier one).
pub fn list(dir: &Path) -> std::io::Result<Vec<Artifact>> {
    let text = match std::fs::read_to_string(dir.join("index")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut by_path = std::collections::BTreeMap::new();
    for line in text.lines() {
        let mut it = line.splitn(3, ' ');
        if let (Some(sha), Some(size), Some(path)) = (it.next(), it.next(), it.next()) {
            if let Ok(size) = size.parse() {
                by_path.insert(
                    path.to_string(),
                    Artifact { path: path.to_string(), size, sha256: sha.to_string() },
                );
            }
        }
    }
    Ok(by_path.into_values().collect())
}

/// Send stash `path` (`size` bytes) to step `slot`'s agent as `Put` frames, at most
/// [`PUT_WINDOW`] beyond what it has taken, from where it last said it was after each
/// (re)connect. Runs until the step ends (its caller drops it).
pub async fn feed(ctl: Arc<Controller>, build: Arc<LiveBuild>, slot: Arc<Slot>, path: PathBuf, size: u64) {
    use smol::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = match smol::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            slot.tell(super::steps::StepEvent::Lost(format!("cannot read stash {}: {e}", path.display())));
            return std::future::pending().await;
        }
    };
    let mut buf = vec![0u8; MAX_PUT_CHUNK];
    let (mut sent, mut link, mut at) = (0u64, 0u64, u64::MAX);
    loop {
        let listener = build.output.listen();
        let (taken, on) = slot.taken_at();
        let session = ctl.session_of(&slot.node).filter(|s| s.id == on);
        if on != link {
            // A new link: go on from what the agent has taken.
            link = on;
            sent = taken;
        }
        let ready = session.filter(|_| on != 0 && sent <= size && sent.saturating_sub(taken) < PUT_WINDOW);
        let Some(s) = ready else {
            smol::future::or(listener, async {
                smol::Timer::after(Duration::from_secs(1)).await;
            })
            .await;
            continue;
        };
        let n = (size - sent).min(MAX_PUT_CHUNK as u64) as usize;
        if n > 0 {
            if at != sent {
                if let Err(e) = file.seek(std::io::SeekFrom::Start(sent)).await {
                    slot.tell(super::steps::StepEvent::Lost(format!(
                        "cannot read stash {}: {e}",
                        path.display()
                    )));
                    return std::future::pending().await;
                }
            }
            if let Err(e) = file.read_exact(&mut buf[..n]).await {
                slot.tell(super::steps::StepEvent::Lost(format!(
                    "cannot read stash {}: {e}",
                    path.display()
                )));
                return std::future::pending().await;
            }
            at = sent + n as u64;
        }
        let data = bytes::Bytes::copy_from_slice(&buf[..n]);
        if s.tx.send(Out::Put { build: build.id, step: slot.step, offset: sent, data }).await.is_ok() {
            // The empty Put at the end moves `sent` past `size`: nothing more to send.
            sent += if n == 0 { 1 } else { n as u64 };
        }
    }
}
