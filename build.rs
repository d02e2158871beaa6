//! Sets `WISP_VERSION` for `--version` and the agent's `AgentInfo`: the package version and, when
//! the source is a git checkout, the commit it was built from (`0.1.0 (1a2b3c4d5e6f)`). A release
//! build from an exported tree can give the commit itself in `WISP_COMMIT`.
use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=WISP_COMMIT");
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
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let full = match commit {
        Some(c) => format!("{version} ({c})"),
        None => version,
    };
    println!("cargo:rustc-env=WISP_VERSION={full}");
}
