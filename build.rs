//! Sets `WISP_VERSION` for `--version` and the agent's `AgentInfo`: the package version and, when
//! the source is a git checkout, the commit it was built from (`0.1.0 (1a2b3c4d5e6f)`). A release
//! build from an exported tree can give the commit itself in `WISP_COMMIT`, and
//! `scripts/release.sh` gives the release's version in `WISP_RELEASE_VERSION` (the package version
//! with a suffix such as `-rc.1`; checked there). With the commit it fits the handshake's 64 bytes.
use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=WISP_COMMIT");
    println!("cargo:rerun-if-env-changed=WISP_RELEASE_VERSION");
    let commit = match std::env::var("WISP_COMMIT") {
        Ok(c) if !c.is_empty() => Some(c),
        _ => git(&["rev-parse", "--absolute-git-dir"]).and_then(|dir| {
            // Built again when HEAD moves: a checkout changes HEAD, a commit the ref it names
            // (a loose file, or packed-refs after `git gc`). Paths that do not exist are left
            // out, as cargo would run this script on every build for them.
            let mut watch = vec![format!("{dir}/HEAD"), format!("{dir}/packed-refs")];
            if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch.push(format!("{dir}/{r}"));
            }
            for w in watch.iter().filter(|w| Path::new(w).exists()) {
                println!("cargo:rerun-if-changed={w}");
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        }),
    };
    if commit.is_none() {
        // Without git there is nothing to watch but this script (cargo's default is every file).
        println!("cargo:rerun-if-changed=build.rs");
    }
    let version = match std::env::var("WISP_RELEASE_VERSION") {
        Ok(v) if !v.is_empty() => {
            let ok = v.len() <= 40 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b".+-".contains(&b));
            assert!(ok, "WISP_RELEASE_VERSION={v:?}: at most 40 of A-Z a-z 0-9 . + -");
            v
        }
        _ => std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION"),
    };
    let full = match commit {
        Some(c) => format!("{version} ({c})"),
        None => version,
    };
    println!("cargo:rustc-env=WISP_VERSION={full}");
}
