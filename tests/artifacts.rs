//! Artifacts and stash end to end with real agents: a stash made on one agent (over TCP) and
//! unstashed on another (over WebSocket) keeps files, modes, symlinks and empty directories;
//! archived files are listed and downloaded with their SHA-256 checked; mistakes and a workspace
//! symlink that would lead an unstash out of the workspace are refused with clear messages.

mod common;
use common::*;

fn node(ctl: &Controller, name: &str, labels: &str, ws: bool, work: &TempDir) -> Proc {
    ctl.online_agent(name, labels, ws, 1, work.path())
}

fn run_file(ctl: &Controller, yaml: &str) -> (i32, String) {
    let f = ctl.data.path().join(format!("a-{}.yaml", std::process::id()));
    std::fs::write(&f, yaml).unwrap();
    let out = ctl.wisp(&["run", f.to_str().unwrap(), "--follow"]);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

const PIPELINE: &str = r#"
name: pass
stages:
  - name: make
    agent: {label: maker}
    steps:
      - sh: |
          set -e
          rm -rf out; mkdir -p out/empty out/deep/er
          echo hi > out/a.txt
          printf '#!/bin/sh\necho ran\n' > out/run.sh; chmod 755 out/run.sh
          chmod 600 out/a.txt
          ln -s a.txt out/link
          head -c 3000000 /dev/urandom > out/big
          echo deep > out/deep/er/f
          echo skip > out/skip.tmp
          sha256sum out/big
      - stash: {name: out, paths: ["out/**"], exclude: ["**/*.tmp"]}
    archive: {paths: ["out/*.txt", "out/big", "out/deep/**"]}
  - name: use
    agent: {label: user}
    steps:
      - unstash: out
      - sh: |
          set -e
          [ -d out/empty ] && echo empty dir kept
          [ -L out/link ] && echo "link to $(readlink out/link)"
          out/run.sh
          stat -c %a out/a.txt out/run.sh
          [ ! -e out/skip.tmp ] && echo excluded
          cat out/deep/er/f
          sha256sum out/big
"#;

#[test]
fn a_stash_crosses_agents_and_archived_files_download_checked() {
    let ctl = Controller::start();
    let work = TempDir::new("art");
    let _a = node(&ctl, "maker1", "maker", false, &work);
    let _b = node(&ctl, "user1", "user", true, &work);
    let (code, out) = run_file(&ctl, PIPELINE);
    assert_eq!(code, 0, "{out}\n{}", ctl.log_text());
    let made = out.lines().find(|l| l.ends_with("  out/big")).expect("the maker's sum").to_string();
    for want in ["empty dir kept", "link to a.txt", "ran", "600", "755", "excluded", "deep"] {
        assert!(out.lines().any(|l| l == want), "{want:?} in {out}");
    }
    assert_eq!(out.lines().filter(|l| *l == made).count(), 2, "the same bytes on both agents: {out}");
    assert!(out.contains("stashed out: "), "{out}");
    assert!(out.contains("files, 4 directories") || out.contains("checksums verified"), "{out}");

    let list = String::from_utf8(ctl.wisp(&["artifacts", "1"]).stdout).unwrap();
    let paths: Vec<&str> = list.lines().map(|l| l.split('\t').nth(2).unwrap()).collect();
    assert_eq!(paths, ["out/a.txt", "out/big", "out/deep/er/f"], "{list}");
    let sum = made.split_whitespace().next().unwrap();
    assert!(list.contains(&format!("3000000\t{sum}\tout/big")), "{list}");
    let file = work.path().join("big.dl");
    let got = ctl.wisp(&["artifact", "get", "1", "out/big", "-o", file.to_str().unwrap()]);
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert_eq!(sha256(&std::fs::read(&file).unwrap()), sum);
    let small = ctl.wisp(&["artifact", "get", "1", "out/a.txt"]);
    assert_eq!(small.stdout, b"hi\n");
    let missing = ctl.wisp(&["artifact", "get", "1", "out/nope"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("build #1 has no artifact \"out/nope\""));
    // Only what the index lists is served: no path outside it, however spelled.
    for path in [
        "/api/builds/1/artifacts/..%2F..%2Ftoken",
        "/api/builds/1/artifacts/out/../../token",
        "/api/builds/1/artifacts/out",
    ] {
        let (status, _) = ctl.get(path);
        assert_eq!(status, 404, "{path}");
    }
    // The stash went with its build.
    assert!(!ctl.data.path().join("builds/1/stash").exists());
}

#[test]
fn mistakes_are_refused_with_what_to_do() {
    let ctl = Controller::start();
    let work = TempDir::new("art-bad");
    let _a = node(&ctl, "m1", "maker", false, &work);
    let (code, out) = run_file(&ctl, "name: a\nagent: {label: maker}\nsteps:\n  - unstash: nothing\n");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no stash \"nothing\" in this build"), "{out}");
    let (code, out) =
        run_file(&ctl, "name: b\nagent: {label: maker}\nsteps:\n  - archive: [\"dist/*.tar.gz\"]\n");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no file matches dist/*.tar.gz"), "{out}");
    let (code, out) = run_file(&ctl, "name: c\nagent: {label: maker}\nsteps:\n  - archive: [\"a[b\"]\n");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad pattern"), "{out}");
}

/// A workspace symlink (left by an earlier step) that points outside: an unstash that would
/// write through it is refused and nothing lands outside.
#[test]
fn an_unstash_does_not_follow_a_symlink_out_of_the_workspace() {
    let ctl = Controller::start();
    let work = TempDir::new("art-link");
    let _a = node(&ctl, "m2", "maker", true, &work);
    let outside = TempDir::new("outside");
    let yaml = format!(
        "name: d\nagent: {{label: maker}}\nsteps:\n  - sh: \"rm -rf out; mkdir out; echo x > out/f\"\n  - stash: {{name: s, paths: [\"out/**\"]}}\n  - sh: \"rm -rf out; ln -s {} out\"\n  - unstash: s\n",
        outside.path().display()
    );
    let (code, out) = run_file(&ctl, &yaml);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("symlink") || out.contains("symbolic link"), "{out}");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing written outside");
}

/// Two archive steps of one build: the second's file replaces the first's of the same path, the
/// first's other files stay, and a directory the second makes where the first left a symlink is
/// a directory (nothing written through the link). Artifacts are unpacked while they arrive, so
/// this also checks that what lands matches the index.
#[test]
fn a_later_archive_replaces_what_an_earlier_one_kept_of_the_same_path() {
    let ctl = Controller::start();
    let work = TempDir::new("art-two");
    let _a = node(&ctl, "m3", "maker", false, &work);
    let yaml = r#"
name: two
agent: {label: maker}
stages:
  - name: first
    steps:
      - sh: "rm -rf o; mkdir o; echo one > o/a; echo bee > o/b; head -c 2000000 /dev/urandom > o/c; ln -s /tmp o/l"
    archive: {paths: ["o/**"]}
  - name: second
    steps:
      - sh: "echo two > o/a; rm o/l; mkdir o/l; echo in > o/l/f"
    archive: {paths: ["o/a", "o/l/**"]}
"#;
    let (code, out) = run_file(&ctl, yaml);
    assert_eq!(code, 0, "{out}\n{}", ctl.log_text());
    let list = String::from_utf8(ctl.wisp(&["artifacts", "1"]).stdout).unwrap();
    let paths: Vec<&str> = list.lines().map(|l| l.split('\t').nth(2).unwrap()).collect();
    assert_eq!(paths, ["o/a", "o/b", "o/c", "o/l/f"], "{list}");
    let get = |p: &str| ctl.wisp(&["artifact", "get", "1", p]).stdout;
    assert_eq!(get("o/a"), b"two\n");
    assert_eq!(get("o/b"), b"bee\n");
    assert_eq!(get("o/l/f"), b"in\n");
    let c = std::fs::read(work.path().join("m3/o/c")).or_else(|_| {
        // The workspace's place under the work dir is the agent's business: find the file.
        let found =
            std::process::Command::new("find").arg(work.path()).args(["-path", "*/o/c"]).output().unwrap();
        std::fs::read(String::from_utf8(found.stdout).unwrap().lines().next().unwrap())
    });
    assert_eq!(get("o/c"), c.unwrap());
    let files = ctl.data.path().join("builds/1/artifacts");
    assert!(std::fs::symlink_metadata(files.join("files/o/l")).unwrap().is_dir());
    let staged: Vec<_> = std::fs::read_dir(&files)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".incoming"))
        .collect();
    assert!(staged.is_empty(), "no staging left: {staged:?}");
}
