//! A slowloris bigger than the HTTP port's handshake budget, in a test binary of its own: its
//! 4,200 connections must all be held within the TLS handshake timeout, which tests running
//! beside it in one process can make too slow to reach.

mod common;
use common::*;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

#[test]
fn a_slowloris_larger_than_the_http_budget_leaves_the_agent_port_free_and_the_log_short() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    let ctl = Controller::start_tls(&[]);
    let fp = ctl.fingerprint();
    // Added first: the CLI itself needs the HTTP port that the slowloris is about to fill.
    let secret = ctl.add_node("t1", "tcp", &["--tcp"]);
    let mut idle = Vec::new();
    for _ in 0..4200 {
        let s = TcpStream::connect(&ctl.http).unwrap();
        idle.push(s);
    }
    // Give the controller time to accept them all (the budget fills, the rest are closed).
    wait_for("the HTTP port's budget to fill", Duration::from_secs(60), || {
        ctl.log_text().contains("connections already in the TLS handshake on this port").then_some(())
    });
    let work = TempDir::new("slow-budget");
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &ctl.url(), "--name", "t1", "--secret", &secret, "--direct", &ctl.agent_addr])
        .args(["--instance-identity", &fp, "--work-dir"])
        .arg(work.path().join("t1"));
    let _a = spawn_logged(cmd, work.path(), "t1");
    wait_for("the agent to get in on the agent port", Duration::from_secs(30), || {
        ctl.log_text().contains("node t1: online").then_some(())
    });
    let refusals = ctl.log_text().lines().filter(|l| l.contains("already in the TLS handshake")).count();
    assert!(refusals <= 3, "{refusals} lines for about 100 refusals: not throttled");
    drop(idle);
}
