//! In-place upgrade of a running agent (SIGHUP): the agent executes the binary now at the path it
//! was started from, in the same process, and its running step goes on with a byte-exact log. The
//! agent runs from a copy of the test binary in a temp dir, which each test replaces (a new inode,
//! as `install` and `mv` make) before the signal.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Lines the slow step prints, one every 0.1 s.
const LINES: u32 = 40;

fn slow_pipeline(label: &str) -> String {
    format!(
        "name: slow\nagent: {{label: {label}}}\nsteps:\n  - sh: 'for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.1; done'\n"
    )
}

fn expected_log() -> Vec<u8> {
    (1..=LINES).map(|i| format!("line {i}\n")).collect::<String>().into_bytes()
}

/// A copy of the agent binary in `dir`, to start the agent from and replace under it.
fn agent_copy(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("wisp-agent");
    std::fs::copy(AGENT, &exe).unwrap();
    exe
}

/// Put `content` at `path` as `install` does: a new file renamed over the old one (a new inode).
fn replace(path: &Path, content: &[u8], mode: u32) -> u64 {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    std::fs::metadata(path).unwrap().ino()
}

/// Start the agent from `exe` for node `name` (over WebSocket when `ws`, else TCP).
fn start_agent(ctl: &Controller, exe: &Path, name: &str, secret: &str, ws: bool, work: &Path) -> Proc {
    let mut cmd = Command::new(exe);
    cmd.args(["--url", &ctl.url(), "--name", name, "--secret", secret, "--work-dir"]).arg(work);
    if ws {
        cmd.arg("--websocket");
    } else {
        cmd.args(["--direct", &ctl.agent_addr]);
    }
    spawn_logged(cmd, work, name)
}

fn hup(agent: &Proc) {
    let st = Command::new("kill").arg("-HUP").arg(agent.pid().to_string()).status().unwrap();
    assert!(st.success());
}

fn wait_log(agent: &Proc, what: &str, n: usize) -> String {
    wait_for(&format!("{n} agent log line(s) with {what:?}"), Duration::from_secs(30), || {
        let log = agent.log_text();
        (log.matches(what).count() >= n).then_some(log)
    })
}

/// Wait until the stored log of the build's step holds `lines` lines.
fn wait_lines(ctl: &Controller, id: u64, lines: u32) {
    let want = format!("line {lines}\n");
    wait_for(&format!("line {lines} of build {id}"), Duration::from_secs(30), || {
        String::from_utf8_lossy(&ctl.step_log(id, 1)).contains(&want).then_some(())
    });
}

fn assert_whole_log(ctl: &Controller, id: u64, agent: &Proc) {
    let b = ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(b["state"], "success", "{b}\n--- agent:\n{}", agent.log_text());
    let log = ctl.step_log(id, 1);
    assert_eq!(
        String::from_utf8_lossy(&log),
        String::from_utf8_lossy(&expected_log()),
        "every line once, in order\n--- agent:\n{}",
        agent.log_text()
    );
}

#[test]
fn sighup_upgrades_a_running_agent_in_place_and_the_build_goes_on() {
    let ctl = Controller::start();
    let work = TempDir::new("upgrade");
    let exe = agent_copy(work.path());
    let secret = ctl.add_node("up", "up", &["--tcp"]);
    // The secret on the command line: the new program gets it through the hand-over only.
    let agent = start_agent(&ctl, &exe, "up", &secret, false, &work.path().join("w"));
    ctl.wait_online("up");
    let pid = agent.pid();
    let id = ctl.submit(&slow_pipeline("up"));
    wait_lines(&ctl, id, 5);
    let old = std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino();
    let new = replace(&exe, &std::fs::read(AGENT).unwrap(), 0o755);
    assert_ne!(old, new);
    hup(&agent);
    let log = wait_log(&agent, "resumed 1 running step(s) from the previous agent (version ", 1);
    assert!(log.contains(&format!("SIGHUP: upgrading in place: exec {}", exe.display())), "{log}");
    assert!(alive(pid), "the same process goes on");
    assert_eq!(std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino(), new, "it runs the new binary");
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(link, exe, "not a deleted file");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&secret), "no secret on the new command line");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(&secret), "no secret in the new environment");
    assert_whole_log(&ctl, id, &agent);
    ctl.wait_online("up");
    let log = agent.log_text();
    assert!(log.contains("step(s) to resume"), "the new program reported the step:\n{log}");
    assert!(!log.contains("came back without"), "{log}");
    let clog = ctl.log_text();
    assert!(clog.contains("build 1 step 1: resumed on node up"), "{clog}");
    // The spool is gone once the controller has everything.
    wait_for("the spool to go", Duration::from_secs(10), || {
        std::fs::read_dir(work.path().join("w/.wisp/spool"))
            .map_or(true, |mut d| d.next().is_none())
            .then_some(())
    });
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_run_keeps_the_old_agent_and_its_build() {
    let ctl = Controller::start();
    let work = TempDir::new("upgrade-bad");
    let exe = agent_copy(work.path());
    let secret = ctl.add_node("bad", "bad", &[]);
    let secret_file = work.path().join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let agent =
        start_agent(&ctl, &exe, "bad", &format!("@{}", secret_file.display()), true, &work.path().join("w"));
    ctl.wait_online("bad");
    let pid = agent.pid();
    let old = std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino();
    let id = ctl.submit(&slow_pipeline("bad"));
    wait_lines(&ctl, id, 5);
    // Not a program (ENOEXEC), then not executable (EACCES).
    replace(&exe, b"\x7fELF garbage, not a program\n", 0o755);
    hup(&agent);
    let log = wait_log(&agent, "SIGHUP: could not upgrade in place", 1);
    assert!(log.contains("Exec format error") || log.contains("ENOEXEC"), "{log}");
    wait_log(&agent, "step(s) to resume", 1);
    wait_lines(&ctl, id, 15);
    replace(&exe, &std::fs::read(AGENT).unwrap(), 0o644);
    hup(&agent);
    let log = wait_log(&agent, "SIGHUP: could not upgrade in place", 2);
    assert!(log.contains("not executable"), "{log}");
    assert_whole_log(&ctl, id, &agent);
    assert!(alive(pid));
    assert_eq!(std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino(), old, "still the old binary");
    assert!(!agent.log_text().contains("resumed 1 running step(s) from the previous agent"));
    ctl.wait_online("bad");
}

#[test]
fn a_garbage_hand_over_state_is_refused_and_the_agent_starts_fresh() {
    let ctl = Controller::start();
    let work = TempDir::new("upgrade-garbage");
    let secret = ctl.add_node("gb", "gb", &["--tcp"]);
    let garbage = work.path().join("garbage");
    std::fs::write(&garbage, b"wisp-agent-handover 1\nthis is not what the format says\n").unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("exec 3<\"$0\"; exec \"$@\"")
        .arg(&garbage)
        .args([AGENT, "--url", &ctl.url(), "--name", "gb", "--secret", &secret, "--direct", &ctl.agent_addr])
        .arg("--work-dir")
        .arg(work.path().join("w"))
        .env("WISP_AGENT_HANDOVER", "3");
    let agent = spawn_logged(cmd, work.path(), "gb");
    ctl.wait_online("gb");
    let log = agent.log_text();
    assert!(
        log.contains("the previous agent's hand-over state is unusable: WISP_AGENT_HANDOVER=3:")
            && log.contains("starting as a fresh agent"),
        "{log}"
    );
    assert!(!log.contains("resumed"), "{log}");
    // Steps do not see the variable.
    let (code, out) =
        ctl.run("name: env\nagent: {label: gb}\nsteps:\n  - sh: 'echo \"[${WISP_AGENT_HANDOVER-unset}]\"'\n");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[unset]"), "{out}");
}

#[test]
fn two_sighups_in_a_row_on_an_idle_agent_are_re_execs_and_it_still_serves() {
    let ctl = Controller::start();
    let work = TempDir::new("upgrade-idle");
    let exe = agent_copy(work.path());
    let secret = ctl.add_node("idle", "idle", &[]);
    let agent = start_agent(&ctl, &exe, "idle", &secret, true, &work.path().join("w"));
    ctl.wait_online("idle");
    hup(&agent);
    hup(&agent);
    wait_log(&agent, "resumed 0 running step(s) from the previous agent", 1);
    // A third while the build runs.
    let id = ctl.submit(&slow_pipeline("idle"));
    wait_lines(&ctl, id, 3);
    hup(&agent);
    wait_log(&agent, "resumed 1 running step(s) from the previous agent", 1);
    assert_whole_log(&ctl, id, &agent);
    assert!(alive(agent.pid()));
    ctl.wait_online("idle");
}

/// `git` in this checkout; its trimmed output when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The agent of the commit before this checkout's HEAD (or of `WISP_UPGRADE_FROM`, any revision),
/// built from that commit's files (`git archive`) in a target dir of its own under this one's
/// `upgrade-from/`, and its commit. `None`, with the reason on stderr, where there is no such
/// commit to build (not a git checkout, a shallow clone) or it has no in-place upgrade to hand over
/// from (it predates `src/agent/handover.rs`). A failed build of a commit that has it is a failure.
fn previous_agent() -> Option<(PathBuf, String)> {
    let rev = std::env::var("WISP_UPGRADE_FROM").unwrap_or_else(|_| "HEAD~1".into());
    let Some(commit) = git(&["rev-parse", "--short=12", "--verify", &format!("{rev}^{{commit}}")]) else {
        eprintln!("SKIP: no commit {rev} in this checkout (not a git checkout, or a shallow clone)");
        return None;
    };
    if git(&["cat-file", "-e", &format!("{commit}:src/agent/handover.rs")]).is_none() {
        eprintln!("SKIP: {rev} ({commit}) predates the in-place upgrade (no src/agent/handover.rs)");
        return None;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let root = target.join("upgrade-from");
    let src = root.join(&commit);
    let exe = root.join("target/debug/wisp-agent");
    if !src.join("Cargo.toml").exists() {
        let tmp = root.join(format!("{commit}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let st = Command::new("sh")
            .arg("-c")
            .arg("git archive --format=tar \"$1\" | tar -x -C \"$2\"")
            .args(["sh", &commit])
            .arg(&tmp)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(st.success(), "git archive {commit} failed");
        std::fs::rename(&tmp, &src).unwrap();
    }
    // Its own target dir (the one running these tests is locked by cargo); dependencies at
    // opt-level 0, which builds in about half the time.
    eprintln!("building the agent of {rev} ({commit}) in {}", src.display());
    let out = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--no-default-features", "--bin", "wisp-agent"])
        .args(["--config", "profile.dev.package.\"*\".opt-level=0"])
        .env("CARGO_TARGET_DIR", root.join("target"))
        .env("WISP_COMMIT", &commit)
        .env_remove("WISP_RELEASE_VERSION")
        .current_dir(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the agent of {commit} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some((exe, commit))
}

/// The acceptance test of an upgrade as users make it: an agent of the previous commit runs a
/// build, this commit's agent is put at its path and the old one gets SIGHUP. The process stays,
/// runs the new binary, the controller sees the new version, and the build ends with every line
/// once. Skips (saying why) where the previous commit cannot be built; see [`previous_agent`].
#[test]
fn an_agent_of_the_previous_commit_is_replaced_by_this_ones_mid_build() {
    let Some((old_agent, old_commit)) = previous_agent() else { return };
    let ctl = Controller::start();
    let work = TempDir::new("upgrade-prev");
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("wisp-agent");
    std::fs::copy(&old_agent, &exe).unwrap();
    let secret = ctl.add_node("prev", "prev", &[]);
    let agent = start_agent(&ctl, &exe, "prev", &secret, true, &work.path().join("w"));
    let old_version = format!("{} ({old_commit})", env!("CARGO_PKG_VERSION"));
    let node_has = |version: &str| {
        let want = format!("\t{version} ");
        wait_for(&format!("node prev online with {version}"), Duration::from_secs(30), || {
            ctl.node_line("prev").filter(|l| l.starts_with("prev\tonline\t") && l.contains(&want))
        })
    };
    node_has(&old_version);
    let pid = agent.pid();
    let id = ctl.submit(&slow_pipeline("prev"));
    wait_lines(&ctl, id, 5);
    let new = replace(&exe, &std::fs::read(AGENT).unwrap(), 0o755);
    hup(&agent);
    let log = wait_log(&agent, &format!("from the previous agent (version {old_version})"), 1);
    assert!(alive(pid), "the same process goes on:\n{log}");
    assert_eq!(std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino(), new, "it runs the new binary");
    if expected_version() != old_version {
        node_has(&expected_version());
    }
    assert_whole_log(&ctl, id, &agent);
    assert!(
        ctl.log_text().contains(&format!("build {id} step 1: resumed on node prev")),
        "{}",
        ctl.log_text()
    );
}
