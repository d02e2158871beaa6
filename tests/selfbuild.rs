//! wisp builds itself with wisp: `.wisp/pipeline.yaml` on a local controller with two agents, one
//! over TCP and one over WebSocket, its smoke scope (the static agents, the tests of
//! `src/archive`, the ARM agents under qemu). The archived agent binaries must be byte for byte
//! the ones the agents built (their SHA-256 against `target/static`).
//!
//! Ignored in `cargo test`: it needs the static toolchains and the agents already built (a cold
//! build of all three takes most of CI's time). `scripts/test-static.sh` runs it after it has
//! built them: `cargo test --test selfbuild -- --ignored`.

mod common;
use common::*;
use std::path::Path;

const TARGETS: [&str; 3] =
    ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl", "armv7-unknown-linux-musleabihf"];

#[test]
#[ignore = "run by scripts/test-static.sh once the static agents are built"]
fn wisp_builds_itself_on_two_agents() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ctl = Controller::start();
    let work = TempDir::new("selfbuild");
    let mut agents = Vec::new();
    for (name, ws) in [("self-tcp", false), ("self-ws", true)] {
        let secret = ctl.add_node(
            name,
            "linux",
            if ws { &["--executors", "3"] } else { &["--tcp", "--executors", "3"] },
        );
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        agents.push(ctl.agent(name, &secret, ws, &dir));
        ctl.wait_online(name);
    }
    let pipeline = repo.join(".wisp/pipeline.yaml");
    let source = format!("SOURCE={}", repo.display());
    let out = ctl.wisp(&["run", pipeline.to_str().unwrap(), "-p", &source, "--follow"]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{log}\n{}", String::from_utf8_lossy(&out.stderr));
    let b = ctl.build_json(1);
    let nodes: std::collections::BTreeSet<&str> =
        b["steps"].as_array().unwrap().iter().filter_map(|s| s["node"].as_str()).collect();
    assert_eq!(nodes.len(), 2, "both agents took part: {nodes:?}");
    let list = String::from_utf8(ctl.wisp(&["artifacts", "1"]).stdout).unwrap();
    for t in TARGETS {
        let built = std::fs::read(repo.join("target/static").join(t).join("wisp-agent")).unwrap();
        let sum = sha256(&built);
        let line = format!("{}\t{sum}\tout/{t}/wisp-agent", built.len());
        assert!(list.lines().any(|l| l == line), "{line:?} in {list}");
        assert!(log.contains(&format!("{sum}  out/{t}/wisp-agent")), "the agent's own sum of {t} in the log");
    }
}
