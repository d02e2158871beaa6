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
use crate::archive::{self, Limits};
use crate::proto::{MAX_PUT_CHUNK, PACK_SHELL, UNPACK_SHELL};
use std::path::{Path, PathBuf};
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
/// or the build's artifacts. Returns the line its log keeps.
pub async fn after_pack(
    ctl: &Arc<Controller>,
    build: u64,
    step: u32,
    kind: &Kind,
    summary: &str,
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
            smol::unblock(move || {
                let files = dir.join("files");
                std::fs::create_dir_all(&files)
                    .map_err(|e| format!("cannot create {}: {e}", files.display()))?;
                let input =
                    std::fs::File::open(&pack).map_err(|e| format!("cannot read {}: {e}", pack.display()))?;
                let got = archive::unpack(
                    std::io::BufReader::with_capacity(64 << 10, input),
                    &files,
                    &Limits::default(),
                )
                .map_err(|e| format!("the agent's archive was refused: {e}"));
                let _ = std::fs::remove_file(&pack);
                let got = got?;
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
