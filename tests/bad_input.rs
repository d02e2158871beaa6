//! Bad input on the agent port and on `/wsagents/`: each bad connection gets a clear error and is
//! closed within a bounded time, while a build on a good agent carries on untouched. Also the
//! "already connected" rule: a live link is kept and the newcomer refused; a link that no longer
//! answers pings is replaced.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};
use wisp::proto::{self, Frame};

/// What came back on a bad connection before the controller closed it.
struct Reply {
    /// The message of a Reject frame, if the controller sent one.
    reject: Option<String>,
    /// Its reason code.
    code: Option<proto::RejectCode>,
    /// How long until the connection was closed.
    closed_after: Duration,
}

/// Read until the controller closes the connection (a 20 s read timeout fails the test).
fn read_until_closed(s: &mut TcpStream, started: Instant) -> (Vec<u8>, Duration) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the controller did not close the connection: {e} (read {} bytes)", got.len()),
        }
    }
    (got, started.elapsed())
}

/// Send `bytes` to the agent port (then stop writing if `finish`), and see what comes back.
fn agent_port(ctl: &Controller, bytes: &[u8], finish: bool) -> Reply {
    let mut s = TcpStream::connect(&ctl.agent_addr).unwrap();
    let started = Instant::now();
    s.write_all(bytes).unwrap();
    if finish {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let (got, closed_after) = read_until_closed(&mut s, started);
    // Frames until the end; a handshake may have got as far as a Challenge before the Reject.
    let (mut reject, mut code) = (None, None);
    let mut rest = &got[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        match proto::decode(&rest[4..4 + n]).expect("the controller's reply decodes") {
            Frame::Reject { code: c, message } => (reject, code) = (Some(message.to_string()), Some(c)),
            Frame::Challenge { .. } => {}
            other => panic!("expected a Reject frame, got {other:?}"),
        }
        rest = &rest[4 + n..];
    }
    Reply { reject, code, closed_after }
}

fn frame(f: &Frame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; proto::MAX_FRAME];
    let n = proto::encode(f, &mut buf).unwrap();
    let mut out = (n as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&buf[..n]);
    out
}

fn hello(name: &str) -> Vec<u8> {
    frame(&Frame::Hello { min_version: 1, max_version: 1, name, capabilities: 0, nonce: [7; 32] })
}

/// Open a WebSocket to `/wsagents/` by hand and return the stream after the 101 response.
fn ws_open(ctl: &Controller) -> TcpStream {
    let mut s = TcpStream::connect(&ctl.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = format!(
        "GET /wsagents/ HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nNode-Name: x\r\n\r\n",
        ctl.http
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "connection closed during the upgrade");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A masked client WebSocket frame (mask key 0, so the payload goes as is).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Send bytes on an open WebSocket and wait for the controller to close it.
fn ws_bad(ctl: &Controller, bytes: &[u8]) -> Duration {
    let mut s = ws_open(ctl);
    let started = Instant::now();
    s.write_all(bytes).unwrap();
    read_until_closed(&mut s, started).1
}

#[test]
fn bad_connections_are_closed_with_a_clear_error_and_a_running_build_carries_on() {
    let ctl = Controller::start_with(&["--handshake-timeout", "2"]);
    let work = TempDir::new("work");
    let secret = ctl.add_node("good", "linux", &["--tcp"]);
    let _agent = ctl.agent("good", &secret, false, work.path());
    ctl.wait_online("good");
    let id = ctl
        .submit("name: steady\nsteps:\n  - sh: 'for i in $(seq 1 40); do echo tick $i; sleep 0.1; done'\n");
    wait_for("the build to start", Duration::from_secs(20), || {
        (ctl.build_json(id)["state"] == "running").then_some(())
    });
    let bound = Duration::from_secs(10);

    // An HTTP request sent to the agent port: its first four bytes read as a huge length.
    let r = agent_port(&ctl, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", false);
    let m = r.reject.expect("a reject for HTTP on the agent port");
    assert!(m.contains("frame limit") && m.contains("is this a wisp agent port?"), "{m}");
    assert!(r.closed_after < bound, "{:?}", r.closed_after);

    // An oversized frame.
    let r = agent_port(&ctl, &(1u32 << 20).to_be_bytes(), false);
    assert!(r.reject.expect("a reject for an oversized frame").contains("over the 65536-byte frame limit"));

    // An unknown frame type.
    let r = agent_port(&ctl, &[0, 0, 0, 1, 0xee], false);
    let m = r.reject.expect("a reject for an unknown frame type");
    assert!(m.contains("unknown frame type"), "{m}");

    // A malformed Hello: its name claims 4 GiB.
    let mut h = hello("good");
    h[4 + 5..4 + 9].copy_from_slice(&u32::MAX.to_be_bytes());
    let r = agent_port(&ctl, &h, false);
    let m = r.reject.expect("a reject for a malformed hello");
    assert!(m.starts_with("bad frame"), "{m}");

    // A frame that has no place in a handshake.
    let r = agent_port(&ctl, &frame(&Frame::Ping { id: 1 }), false);
    let m = r.reject.expect("a reject for a ping before the handshake");
    assert!(m.contains("handshake"), "{m}");

    // A truncated frame, then the sender stops writing: closed without waiting for the timeout.
    let mut t = (100u32).to_be_bytes().to_vec();
    t.extend_from_slice(b"0123456789");
    let r = agent_port(&ctl, &t, true);
    assert!(r.closed_after < Duration::from_secs(2), "truncated frame: {:?}", r.closed_after);

    // A valid Hello, then silence: the handshake times out (2 s here).
    let r = agent_port(&ctl, &hello("good"), false);
    let m = r.reject.expect("a reject for a stalled handshake");
    assert!(m.contains("timed out"), "{m}");
    assert!(r.closed_after >= Duration::from_secs(2) && r.closed_after < bound, "{:?}", r.closed_after);

    // A connection that sends nothing at all is closed by the same timeout.
    let r = agent_port(&ctl, b"", false);
    assert!(r.closed_after < bound, "{:?}", r.closed_after);

    // A plain HTTP request to /wsagents/ gets 400 and a sentence saying what the endpoint is.
    let (status, body) = http_request(&ctl.http, "GET", "/wsagents/", None, b"");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("--websocket"), "{body}");

    // On an upgraded WebSocket: garbage, a text message, a message over the size limit.
    assert!(ws_bad(&ctl, b"this is not a websocket frame at all\r\n") < bound);
    assert!(ws_bad(&ctl, &ws_frame(0x1, b"hello")) < bound);
    let mut huge = ws_frame(0x2, &[]);
    huge[1] = 0x80 | 127;
    huge.splice(2..2, (1u64 << 30).to_be_bytes());
    assert!(ws_bad(&ctl, &huge) < bound);
    // Binary garbage inside a well-formed WebSocket message.
    assert!(ws_bad(&ctl, &ws_frame(0x2, &[0xee, 1, 2, 3])) < bound);

    // Meanwhile the build went on: every line arrived, once, in order.
    let b = ctl.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(b["state"], "success", "{b}\n{}", ctl.log_text());
    let log = String::from_utf8(ctl.step_log(id, 1)).unwrap();
    let want: String = (1..=40).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(log, want);
    assert!(ctl.node_line("good").unwrap().contains("\tonline\t"));
    let (code, out) = ctl.run("name: after\nsteps:\n  - sh: echo still here\n");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("still here"));
    // The controller said what happened to each bad connection.
    let log = ctl.log_text();
    assert!(log.contains("is this a wisp agent port?"), "{log}");
    assert!(log.contains("handshake not finished within"), "{log}");
}

/// The working directory a one-step build ran in, which tells which agent ran it.
fn ran_in(ctl: &Controller) -> String {
    let (code, out) = ctl.run("name: where\nsteps:\n  - sh: pwd -P\n");
    assert_eq!(code, 0, "{out}");
    out.lines().find(|l| l.starts_with('/')).unwrap_or_default().to_string()
}

#[test]
fn a_live_link_is_kept_and_a_link_that_stopped_answering_is_replaced() {
    let ctl = Controller::start();
    let secret = ctl.add_node("twin", "linux", &["--tcp"]);
    let (wa, wb, wc) = (TempDir::new("a"), TempDir::new("b"), TempDir::new("c"));
    let mut a = ctl.agent("twin", &secret, false, wa.path());
    ctl.wait_online("twin");

    // A second agent for the same node while the first answers pings: refused, and it retries.
    let b = ctl.agent("twin", &secret, true, wb.path());
    wait_for("the second agent to be refused", Duration::from_secs(20), || {
        b.log_text().contains("already connected").then_some(())
    });
    let where_a = ran_in(&ctl);
    assert!(
        where_a.starts_with(&std::fs::canonicalize(wa.path()).unwrap().display().to_string()),
        "{where_a}"
    );
    drop(b);

    // The first agent freezes (as if a proxy dropped its link silently): a newcomer replaces it
    // once the old link has failed to answer a ping.
    a.kill("STOP");
    let c = ctl.agent("twin", &secret, true, wc.path());
    wait_for("the frozen link to be replaced", Duration::from_secs(30), || {
        ctl.log_text().contains("did not answer a ping").then_some(())
    });
    ctl.wait_online("twin");
    let where_c = ran_in(&ctl);
    assert!(
        where_c.starts_with(&std::fs::canonicalize(wc.path()).unwrap().display().to_string()),
        "{where_c}"
    );

    // The old agent wakes up, finds its link gone, and is refused while the new one is alive.
    a.kill("CONT");
    wait_for("the woken agent to be refused", Duration::from_secs(60), || {
        a.log_text().contains("already connected").then_some(())
    });
    assert_eq!(ran_in(&ctl), where_c);
    drop(c);
}

#[test]
fn the_agent_waits_for_a_late_controller_and_reconnects_after_a_restart() {
    let mut ctl = Controller::start_on_fixed_ports(&[]);
    let secret = ctl.add_node("patient", "linux", &[]);
    ctl.kill();
    let work = TempDir::new("work");
    let agent = ctl.agent("patient", &secret, true, work.path());
    wait_for("the agent to retry", Duration::from_secs(20), || {
        (agent.log_text().matches("reconnecting in").count() >= 2).then_some(())
    });
    ctl.launch();
    ctl.wait_online("patient");
    // The link drops while idle (controller killed and started again): the agent comes back.
    ctl.restart();
    ctl.wait_online("patient");
    let (code, out) = ctl.run("name: back\nsteps:\n  - sh: echo back again\n");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("back again"));
    // Backoff delays grow: the agent's log lists them.
    let delays: Vec<f64> = agent
        .log_text()
        .lines()
        .filter_map(|l| l.split("reconnecting in ").nth(1)?.trim_end_matches('s').parse().ok())
        .collect();
    assert!(delays.len() >= 2 && delays[1] > delays[0], "{delays:?}");
}

#[test]
fn a_protocol_version_mismatch_is_refused_with_a_sentence_and_the_agent_exits_5() {
    // Controller side: an agent from the future.
    let ctl = Controller::start();
    let r = agent_port(
        &ctl,
        &frame(&Frame::Hello { min_version: 9, max_version: 9, name: "v", capabilities: 0, nonce: [1; 32] }),
        false,
    );
    assert_eq!(r.code, Some(proto::RejectCode::UnsupportedVersion));
    let m = r.reject.unwrap();
    assert!(m.contains("protocol versions 9 to 9"), "{m}");

    // Agent side: the first frame of a controller that speaks another version (played here by a
    // listener that answers the agent's Hello with that Reject; no other wisp version exists yet).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let work = TempDir::new("work");
    let mut cmd = std::process::Command::new(AGENT);
    cmd.args(["--url", "http://127.0.0.1:9/", "--name", "v", "--secret", "s", "--direct"])
        .arg(l.local_addr().unwrap().to_string())
        .arg("--work-dir")
        .arg(work.path());
    let mut agent = spawn_logged(cmd, work.path(), "v");
    let (mut s, _) = l.accept().unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut hello = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut hello).unwrap();
    assert!(matches!(proto::decode(&hello).unwrap(), Frame::Hello { name: "v", .. }));
    let sentence = "this controller speaks protocol versions 9 to 9; install a newer wisp-agent";
    s.write_all(&frame(&Frame::Reject { code: proto::RejectCode::UnsupportedVersion, message: sentence }))
        .unwrap();
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), 5, "{}", agent.log_text());
    assert!(agent.log_text().contains(sentence), "{}", agent.log_text());
}
