//! `/metrics` against a real controller and agents: what a Prometheus scrape sees after builds,
//! a refused handshake and a reconnect; that it needs the token unless `--metrics-public`.

mod common;

use common::{try_http, wait_for, Controller, TempDir};
use std::time::Duration;

/// The value of the series `line_start` (name and labels) in a scrape.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

fn scrape(c: &Controller, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let (status, body) = try_http(&c.http, "GET", "/metrics", &headers, b"").unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[test]
fn a_scrape_counts_agents_builds_output_refusals_and_reconnects() {
    let c = Controller::start();
    let (status, body) = scrape(&c, None);
    assert_eq!(status, 401, "the token is needed: {body}");
    assert!(body.contains("--metrics-public"), "{body}");

    let secret = c.add_node("m1", "linux", &[]);
    let work = TempDir::new("metrics-agent");
    let mut agent = c.agent("m1", &secret, true, work.path());
    c.wait_online("m1");
    let (code, _) = c.run("name: ok\nagent: {label: linux}\nsteps: [{sh: 'head -c 5000 /dev/zero'}]\n");
    assert_eq!(code, 0);
    let (code, _) = c.run("name: bad\nagent: {label: linux}\nsteps: [{sh: 'exit 3'}]\n");
    assert_ne!(code, 0);
    // A handshake with a wrong secret is refused and counted.
    let c2 = c.add_node("m2", "other", &[]);
    let work2 = TempDir::new("metrics-agent2");
    let _bad = c.agent("m2", &"0".repeat(c2.len()), true, work2.path());
    let token = c.token();
    let text = wait_for("the refusal to be counted", Duration::from_secs(20), || {
        let (_, t) = scrape(&c, Some(&token));
        value(&t, "wisp_handshake_failures_total{reason=\"wrong_secret\"}").filter(|v| *v >= 1.0).map(|_| t)
    });
    assert_eq!(value(&text, "wisp_agents_online{transport=\"websocket\"}"), Some(1.0), "{text}");
    assert_eq!(value(&text, "wisp_agents_online{transport=\"tcp\"}"), Some(0.0));
    assert_eq!(value(&text, "wisp_nodes{state=\"offline\"}"), Some(1.0));
    assert_eq!(value(&text, "wisp_executors"), Some(1.0));
    assert_eq!(value(&text, "wisp_builds_total{result=\"success\"}"), Some(1.0));
    assert_eq!(value(&text, "wisp_builds_total{result=\"failure\"}"), Some(1.0));
    assert_eq!(value(&text, "wisp_build_duration_seconds_count"), Some(2.0));
    assert_eq!(value(&text, "wisp_queue_wait_seconds_count"), Some(2.0));
    assert!(value(&text, "wisp_dispatch_latency_seconds_count").unwrap() >= 2.0);
    assert!(value(&text, "wisp_step_output_bytes_total").unwrap() >= 5000.0, "{text}");
    assert_eq!(value(&text, "wisp_reconnects_total"), Some(0.0));
    assert!(text.ends_with("# EOF\n"));

    // The agent goes away and comes back: a reconnect.
    agent.child.kill().unwrap();
    let _ = agent.child.wait();
    wait_for("the node to go offline", Duration::from_secs(60), || {
        c.node_line("m1").filter(|l| l.contains("\toffline\t"))
    });
    let _agent = c.agent("m1", &secret, true, work.path());
    c.wait_online("m1");
    let (_, text) = scrape(&c, Some(&token));
    assert_eq!(value(&text, "wisp_reconnects_total"), Some(1.0), "{text}");
}

#[test]
fn metrics_public_needs_no_token() {
    let c = Controller::start_with(&["--metrics-public"]);
    let (status, body) = scrape(&c, None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE wisp_queue_length gauge"), "{body}");
}
