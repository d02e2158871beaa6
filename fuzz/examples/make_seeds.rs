//! Writes the seed corpora under fuzz/seeds/: one small valid encoding of every frame type for
//! `frame_decode`, and a few complete handshake scripts for `handshake` (see the layout at the top
//! of fuzz_targets/handshake.rs).
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example make_seeds

use std::fs;
use std::path::Path;
use wisp::auth::{ClientHandshake, ClientStep, ServerHandshake, ServerStep};
use wisp::proto::{encode, encode_env, ExitStatus, Frame, RejectCode, StepStart, MAX_FRAME};

fn enc(f: &Frame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = encode(f, &mut buf).expect("seed frame encodes");
    buf.truncate(n);
    buf
}

/// One `handshake` input: flags, secret, name, nonces, ping, then the frames.
fn script(
    flags: u8,
    secret: &str,
    name: &str,
    ctl: [u8; 32],
    agent: [u8; 32],
    frames: &[Frame<'_>],
) -> Vec<u8> {
    let mut v = vec![flags, secret.len() as u8];
    v.extend_from_slice(secret.as_bytes());
    v.push(name.len() as u8);
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&ctl);
    v.extend_from_slice(&agent);
    v.extend_from_slice(&1000u16.to_be_bytes());
    v.push(frames.len() as u8);
    for f in frames {
        let e = enc(f);
        v.extend_from_slice(&(e.len() as u16).to_be_bytes());
        v.extend_from_slice(&e);
    }
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");

    let dir = root.join("frame_decode");
    let mut envbuf = [0u8; 64];
    let env = encode_env([("A", "1")], &mut envbuf).unwrap();
    let frames: &[(&str, Frame<'_>)] = &[
        (
            "hello",
            Frame::Hello { min_version: 1, max_version: 1, name: "n1", capabilities: 0, nonce: [1; 32] },
        ),
        ("challenge", Frame::Challenge { version: 1, nonce: [2; 32] }),
        ("auth", Frame::Auth { proof: [3; 32] }),
        ("welcome", Frame::Welcome { proof: [4; 32], ping_interval_ms: 15000 }),
        ("reject", Frame::Reject { code: RejectCode::WrongSecret, message: "no" }),
        (
            "step_start",
            Frame::StepStart(StepStart {
                build: 1,
                step: 1,
                timeout_secs: 60,
                credit: 65536,
                workspace: "w",
                dir: "",
                shell: "/bin/sh",
                script: "echo hi",
                env,
                container: "",
            }),
        ),
        (
            "step_start_in",
            Frame::StepStart(StepStart {
                build: 1,
                step: 2,
                timeout_secs: 0,
                credit: 131072,
                workspace: "w",
                dir: "/home/jenkins/agent/workspace/w",
                shell: "/bin/sh",
                script: "make",
                env,
                container: "build",
            }),
        ),
        ("output", Frame::Output { build: 1, step: 1, offset: 0, data: b"hi\n" }),
        ("exit", Frame::Exit { build: 1, step: 1, status: ExitStatus::Code(0), offset: 3, message: "" }),
        (
            "exit_signal",
            Frame::Exit { build: 1, step: 2, status: ExitStatus::Signal(9), offset: 0, message: "x" },
        ),
        ("cancel", Frame::Cancel { build: 1, step: 1 }),
        ("credit", Frame::Credit { build: 1, step: 1, bytes: 4096, stored: 0 }),
        ("ack", Frame::Ack { build: 1, step: 1, offset: 3 }),
        ("ping", Frame::Ping { id: 7 }),
        ("pong", Frame::Pong { id: 7 }),
    ];
    for (name, f) in frames {
        write(&dir, name, &enc(f));
    }

    let dir = root.join("handshake");
    let (secret, name, ctl, agent) = ("s3cret", "n1", [0xc7; 32], [0xa9; 32]);
    // A real exchange, with the proofs the real state machines compute.
    let (mut client, hello) = ClientHandshake::new(name, secret, agent, 0);
    let mut server = ServerHandshake::new(ctl, 1000);
    assert!(matches!(server.on_frame(&hello), ServerStep::LookupNode(_)));
    let ServerStep::Send(challenge) = server.on_secret(Some(secret)) else { panic!() };
    let ClientStep::Send(auth) = client.on_frame(&challenge) else { panic!() };
    let ServerStep::Accept(welcome) = server.on_frame(&auth) else { panic!() };
    assert!(matches!(client.on_frame(&welcome), ClientStep::Done { .. }));

    // Known node, genuine proofs: the server accepts; the client (fed the controller's side) completes.
    write(&dir, "server_accept", &script(1, secret, name, ctl, agent, &[hello, auth]));
    write(&dir, "client_done", &script(1, secret, name, ctl, agent, &[challenge, welcome]));
    // Same, with proofs given as deltas against the correct ones (flags bits 1 and 2): all zeros
    // is the correct proof.
    let zero_auth = Frame::Auth { proof: [0; 32] };
    let zero_welcome = Frame::Welcome { proof: [0; 32], ping_interval_ms: 1000 };
    write(&dir, "server_delta_zero", &script(7, secret, name, ctl, agent, &[hello, zero_auth]));
    write(&dir, "client_delta_zero", &script(7, secret, name, ctl, agent, &[challenge, zero_welcome]));
    // Wrong proof, unknown node, a rejection, and frames out of order.
    write(&dir, "wrong_proof", &script(1, secret, name, ctl, agent, &[hello, zero_auth]));
    write(&dir, "unknown_node", &script(0, secret, name, ctl, agent, &[hello]));
    let reject = Frame::Reject { code: RejectCode::TryLater, message: "later" };
    write(&dir, "rejected", &script(1, secret, name, ctl, agent, &[reject]));
    write(&dir, "out_of_order", &script(1, secret, name, ctl, agent, &[auth, hello, Frame::Ping { id: 1 }]));
    println!("seeds written under {}", root.display());
}
