//! A slowloris bigger than the HTTP port's handshake budget, in a test binary of its own: its
//! connections must all be held within the TLS handshake timeout, which tests running beside it
//! in one process can make too slow to reach. The budget is set to 500 (`--handshake-budget`),
//! so that 600 connections overflow it on any host; with the default of 4096 the same happens
//! with 4,200 (the defect as it was found).

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
    let ctl = Controller::start_tls(&["--handshake-budget", "500"]);
    let fp = ctl.fingerprint();
    // Added first: the CLI itself needs the HTTP port that the slowloris is about to fill.
    let secret = ctl.add_node("t1", "tcp", &["--tcp"]);
    // 600 silent connections, opened from 4 threads: they must all be open within the 10 s TLS
    // handshake timeout.
    let http = ctl.http.clone();
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let http = http.clone();
            std::thread::spawn(move || {
                (0..150).map(|_| TcpStream::connect(&http).unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    let idle: Vec<TcpStream> = openers.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(idle.len(), 600);
    // The budget fills and the connections past it are closed.
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
