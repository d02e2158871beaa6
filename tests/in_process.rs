//! Controllers run as a library in one test process: nothing process-wide is shared between
//! them, and one stops cleanly when told (ports closed, data dir released) while the other
//! goes on.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use wisp::controller::{launch, ServeConfig};

fn config(data: &TempDir) -> ServeConfig {
    ServeConfig {
        data: data.path().to_path_buf(),
        bind: [127, 0, 0, 1].into(),
        http_port: 0,
        agent_port: 0,
        no_tls: true,
        ..ServeConfig::default()
    }
}

fn answers(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.write_all(b"GET /tcpSlaveAgentListener/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.starts_with("HTTP/1.1 200")
}

#[test]
fn two_controllers_in_one_process_and_one_stops_cleanly() {
    let (d1, d2) = (TempDir::new("inproc1"), TempDir::new("inproc2"));
    let a = launch(config(&d1)).unwrap();
    let b = launch(config(&d2)).unwrap();
    let (a_http, _) = *a.ctl.addrs.get().unwrap();
    let (b_http, b_agent) = *b.ctl.addrs.get().unwrap();
    assert!(answers(a_http) && answers(b_http));
    b.stop();
    assert!(TcpStream::connect(b_http).is_err(), "the stopped controller's HTTP port is closed");
    assert!(TcpStream::connect(b_agent).is_err(), "its agent port is closed");
    assert!(answers(a_http), "the other one goes on");
    // Its data dir is released: a new controller opens it at once.
    let again = launch(config(&d2)).expect("the data dir is free again");
    again.stop();
    a.stop();
}
