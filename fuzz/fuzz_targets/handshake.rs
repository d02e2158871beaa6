//! Drive both handshake state machines with frames decoded from arbitrary bytes.
//!
//! Input layout (every read past the end yields zeros, so any input is valid):
//!
//! ```text
//! flags u8       bit 0: the controller knows the node (LookupNode is answered with the secret,
//!                       else with None)
//!                bit 1: the proof of an Auth frame is a delta: it is XORed with the correct
//!                       proof before the server sees it, so all zeros reaches the server's Accept
//!                       path and a few set bits make a near miss
//!                bit 2: the same for the proof of a Welcome frame and the client's Done path
//! secret         u8 length + bytes (lossy UTF-8)
//! agent name     u8 length + bytes (lossy UTF-8): the client's node name
//! nonces         32 bytes controller nonce, 32 bytes agent nonce
//! ping           u16: the server's ping interval in ms
//! frames         u8 count, then count × (u16 big-endian length + bytes), each run through
//!                `proto::decode`; those that fail to decode are skipped (a link drops them)
//! ```
//!
//! The same frames are fed to a `ServerHandshake` (as if from an agent) and to a `ClientHandshake`
//! (as if from a controller). Besides never panicking, each side is checked against a model of
//! the protocol whose HMACs are computed independently with `ring` (from docs/PROTOCOL.md, not
//! with wisp's code): in particular the server reaches `Accept` exactly when the Auth proof is
//! HMAC(secret, "wisp-v1 agent proof" ‖ len(name) ‖ name ‖ Na ‖ Nc), and the client reaches `Done`
//! exactly when the Welcome proof is the matching controller proof.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ring::hmac;
use wisp::auth::{ClientHandshake, ClientStep, ServerHandshake, ServerStep};
use wisp::proto::{decode, Frame, RejectCode, NONCE_LEN, VERSION_MAX, VERSION_MIN};

const MAX_FRAMES: usize = 32;

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }
    fn nonce(&mut self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        let src = self.take(NONCE_LEN);
        n[..src.len()].copy_from_slice(src);
        n
    }
    fn string(&mut self) -> String {
        let n = self.u8() as usize;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
}

/// HMAC-SHA256(secret, label ‖ u32be(len(name)) ‖ name ‖ agent nonce ‖ controller nonce).
fn mac(label: &str, secret: &str, name: &str, agent: &[u8; NONCE_LEN], ctl: &[u8; NONCE_LEN]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(label.as_bytes());
    ctx.update(&(name.len() as u32).to_be_bytes());
    ctx.update(name.as_bytes());
    ctx.update(agent);
    ctx.update(ctl);
    ctx.sign().as_ref().try_into().unwrap()
}

fn agent_proof(secret: &str, name: &str, agent: &[u8; NONCE_LEN], ctl: &[u8; NONCE_LEN]) -> [u8; 32] {
    mac("wisp-v1 agent proof", secret, name, agent, ctl)
}

fn controller_proof(secret: &str, name: &str, agent: &[u8; NONCE_LEN], ctl: &[u8; NONCE_LEN]) -> [u8; 32] {
    mac("wisp-v1 controller proof", secret, name, agent, ctl)
}

fn xor(proof: &mut [u8; 32], with: &[u8; 32]) {
    for (p, w) in proof.iter_mut().zip(with) {
        *p ^= w;
    }
}

/// A `ServerStep` with its borrow of the handshake released.
#[derive(Debug, PartialEq)]
enum Server {
    Lookup(String),
    Send(Frame<'static>),
    Accept(Frame<'static>),
    Reject(RejectCode),
}

impl From<ServerStep<'_>> for Server {
    fn from(s: ServerStep<'_>) -> Self {
        match s {
            ServerStep::LookupNode(n) => Server::Lookup(n.to_string()),
            ServerStep::Send(f) => Server::Send(f),
            ServerStep::Accept(f) => Server::Accept(f),
            ServerStep::Reject(code, msg) => {
                assert!(!msg.is_empty(), "a rejection must say why");
                Server::Reject(code)
            }
        }
    }
}

enum Model {
    AwaitHello,
    AwaitAuth { name: String, agent: [u8; NONCE_LEN] },
    Done,
}

struct Case {
    known: bool,
    auth_delta: bool,
    welcome_delta: bool,
    secret: String,
    name: String,
    ctl_nonce: [u8; NONCE_LEN],
    agent_nonce: [u8; NONCE_LEN],
    ping: u32,
}

fn run_server(case: &Case, frames: &[Frame<'_>]) {
    let mut s = ServerHandshake::new(case.ctl_nonce, case.ping);
    let mut model = Model::AwaitHello;
    for f in frames {
        let mut f = *f;
        if let (Model::AwaitAuth { name, agent }, Frame::Auth { proof }) = (&model, &mut f) {
            if case.auth_delta {
                xor(proof, &agent_proof(&case.secret, name, agent, &case.ctl_nonce));
            }
        }
        let step = Server::from(s.on_frame(&f));
        match (&model, &f) {
            (Model::AwaitHello, Frame::Hello { min_version, max_version, name, nonce, .. }) => {
                let (lo, hi) = ((*min_version).max(VERSION_MIN), (*max_version).min(VERSION_MAX));
                if lo > hi {
                    assert_eq!(step, Server::Reject(RejectCode::UnsupportedVersion));
                    model = Model::Done;
                    continue;
                }
                if name.is_empty() {
                    assert_eq!(step, Server::Reject(RejectCode::ProtocolError));
                    model = Model::Done;
                    continue;
                }
                assert_eq!(step, Server::Lookup(name.to_string()));
                assert_eq!(s.name(), *name);
                assert_eq!(s.version(), hi);
                let step = Server::from(s.on_secret(case.known.then_some(case.secret.as_str())));
                if case.known {
                    assert_eq!(step, Server::Send(Frame::Challenge { version: hi, nonce: case.ctl_nonce }));
                    model = Model::AwaitAuth { name: name.to_string(), agent: *nonce };
                } else {
                    assert_eq!(step, Server::Reject(RejectCode::UnknownNode));
                    model = Model::Done;
                }
            }
            (Model::AwaitAuth { name, agent }, Frame::Auth { proof }) => {
                if *proof == agent_proof(&case.secret, name, agent, &case.ctl_nonce) {
                    let welcome = Frame::Welcome {
                        proof: controller_proof(&case.secret, name, agent, &case.ctl_nonce),
                        ping_interval_ms: case.ping,
                    };
                    assert_eq!(step, Server::Accept(welcome));
                } else {
                    assert_eq!(
                        step,
                        Server::Reject(RejectCode::WrongSecret),
                        "a wrong proof was not refused with WrongSecret"
                    );
                }
                model = Model::Done;
            }
            _ => {
                // Out of order, or anything at all once the handshake has ended: never an Accept.
                assert_eq!(step, Server::Reject(RejectCode::ProtocolError));
                model = Model::Done;
            }
        }
    }
    // Out-of-order secret: only valid right after a Hello, which the loop above always answered.
    assert_eq!(Server::from(s.on_secret(Some(&case.secret))), Server::Reject(RejectCode::ProtocolError));
}

fn run_client(case: &Case, frames: &[Frame<'_>]) {
    let (mut c, hello) = ClientHandshake::new(&case.name, &case.secret, case.agent_nonce, 0);
    assert_eq!(
        hello,
        Frame::Hello {
            min_version: VERSION_MIN,
            max_version: VERSION_MAX,
            name: &case.name,
            capabilities: 0,
            nonce: case.agent_nonce,
        }
    );
    // The controller's nonce and chosen version, once a Challenge was answered.
    let mut challenged: Option<([u8; NONCE_LEN], u16)> = None;
    for f in frames {
        let mut f = *f;
        if let (Some((ctl, _)), Frame::Welcome { proof, .. }) = (&challenged, &mut f) {
            if case.welcome_delta {
                xor(proof, &controller_proof(&case.secret, &case.name, &case.agent_nonce, ctl));
            }
        }
        let step = c.on_frame(&f);
        match (challenged, &f) {
            (None, Frame::Challenge { version, nonce }) => {
                if (VERSION_MIN..=VERSION_MAX).contains(version) {
                    let proof = agent_proof(&case.secret, &case.name, &case.agent_nonce, nonce);
                    assert_eq!(step, ClientStep::Send(Frame::Auth { proof }));
                    challenged = Some((*nonce, *version));
                    continue;
                }
                assert!(matches!(step, ClientStep::Failed(_)), "{step:?}");
            }
            (Some((ctl, version)), Frame::Welcome { proof, ping_interval_ms }) => {
                if *proof == controller_proof(&case.secret, &case.name, &case.agent_nonce, &ctl) {
                    assert_eq!(step, ClientStep::Done { version, ping_interval_ms: *ping_interval_ms });
                } else {
                    assert!(
                        matches!(step, ClientStep::Failed(_)),
                        "accepted a wrong controller proof: {step:?}"
                    );
                }
            }
            (_, Frame::Reject { code, message }) => {
                assert_eq!(step, ClientStep::Rejected(*code, message.to_string()));
            }
            _ => assert!(matches!(step, ClientStep::Failed(_)), "{step:?}"),
        }
        // Done, Rejected and Failed all end the handshake: the agent stops feeding it.
        break;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let secret = input.string();
    let name = input.string();
    let ctl_nonce = input.nonce();
    let agent_nonce = input.nonce();
    let ping = u32::from(input.u16());
    let case = Case {
        known: flags & 1 != 0,
        auth_delta: flags & 2 != 0,
        welcome_delta: flags & 4 != 0,
        secret,
        name,
        ctl_nonce,
        agent_nonce,
        ping,
    };
    let count = (input.u8() as usize).min(MAX_FRAMES);
    let mut frames = Vec::with_capacity(count);
    for _ in 0..count {
        let len = input.u16() as usize;
        if let Ok(f) = decode(input.take(len)) {
            frames.push(f);
        }
    }
    run_server(&case, &frames);
    run_client(&case, &frames);
});
