//! Node secrets and the mutual HMAC-SHA256 challenge-response handshake, as pure state machines.
//!
//! Neither side ever sends the secret: each proves it knows it by a MAC over both nonces and the
//! node name, with a different label per direction so one side's proof cannot be replayed as the
//! other's. The state machines do no I/O, so the fuzzer and the tests drive them directly.

use crate::proto::{Frame, RejectCode, NONCE_LEN, VERSION_MAX, VERSION_MIN};
use ring::hmac;

const AGENT_LABEL: &[u8] = b"wisp-v1 agent proof";
const CONTROLLER_LABEL: &[u8] = b"wisp-v1 controller proof";
const TO_AGENT_LABEL: &[u8] = b"wisp-v1 frames to agent";
const TO_CONTROLLER_LABEL: &[u8] = b"wisp-v1 frames to controller";

/// Keys that authenticate every frame after the handshake, one per direction, derived from the
/// node secret and both nonces: a party in the middle (even one that ends TLS) can neither forge
/// nor replay a frame, so it cannot drive the agent or fake its output.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Controller → agent frames.
    pub to_agent: [u8; 32],
    /// Agent → controller frames.
    pub to_controller: [u8; 32],
    /// The protocol version agreed on, which says how the keys protect frames
    /// ([`crate::link::LinkReader::authenticate`]).
    pub version: u16,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

fn session_keys(
    secret: &str,
    name: &str,
    a: &[u8; NONCE_LEN],
    c: &[u8; NONCE_LEN],
    version: u16,
) -> SessionKeys {
    let key = |label| {
        let mut k = [0u8; 32];
        k.copy_from_slice(proof(label, secret, name, a, c).as_ref());
        k
    };
    SessionKeys { to_agent: key(TO_AGENT_LABEL), to_controller: key(TO_CONTROLLER_LABEL), version }
}

/// The node's secret as Jenkins derives inbound-agent secrets: hex(HMAC-SHA256(key, name)).
pub fn node_secret(controller_key: &[u8], node_name: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, controller_key);
    hex(hmac::sign(&key, node_name.as_bytes()).as_ref())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// Fresh random bytes from the operating system.
pub fn random_nonce() -> [u8; NONCE_LEN] {
    use ring::rand::SecureRandom;
    let mut n = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new().fill(&mut n).expect("the OS random source failed");
    n
}

const DESCRIPTOR_LABEL: &[u8] = b"wisp-v1 descriptor key ";
const SEAL_NONCE: usize = 12;

fn descriptor_key(secret: &str, name: &str) -> ring::aead::LessSafeKey {
    let mac = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&mac);
    ctx.update(DESCRIPTOR_LABEL);
    ctx.update(name.as_bytes());
    let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, ctx.sign().as_ref())
        .expect("a 32-byte key");
    ring::aead::LessSafeKey::new(key)
}

/// Encrypt and authenticate a node's agent descriptor with a key only that node's secret gives, so
/// an agent that holds the secret can fetch its descriptor without an API token (Jenkins'
/// `jenkins-agent.jnlp?encrypt=true`). Output: 12-byte nonce, then ciphertext and tag.
pub fn seal_descriptor(secret: &str, name: &str, plain: &[u8]) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; SEAL_NONCE];
    ring::rand::SystemRandom::new().fill(&mut nonce).expect("the OS random source failed");
    let mut out = nonce.to_vec();
    let mut body = plain.to_vec();
    descriptor_key(secret, name)
        .seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::empty(),
            &mut body,
        )
        .expect("sealing cannot fail for small inputs");
    out.extend_from_slice(&body);
    out
}

/// Undo [`seal_descriptor`]; None when the data was sealed with another secret or name, or altered.
pub fn open_descriptor(secret: &str, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < SEAL_NONCE {
        return None;
    }
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(&sealed[..SEAL_NONCE]).ok()?;
    let mut body = sealed[SEAL_NONCE..].to_vec();
    let plain =
        descriptor_key(secret, name).open_in_place(nonce, ring::aead::Aad::empty(), &mut body).ok()?;
    let n = plain.len();
    body.truncate(n);
    Some(body)
}

fn proof(
    label: &[u8],
    secret: &str,
    name: &str,
    agent: &[u8; NONCE_LEN],
    ctl: &[u8; NONCE_LEN],
) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(label);
    ctx.update(&(name.len() as u32).to_be_bytes());
    ctx.update(name.as_bytes());
    ctx.update(agent);
    ctx.update(ctl);
    ctx.sign()
}

fn verify(
    label: &[u8],
    secret: &str,
    name: &str,
    a: &[u8; NONCE_LEN],
    c: &[u8; NONCE_LEN],
    tag: &[u8],
) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut msg = Vec::with_capacity(label.len() + 4 + name.len() + 2 * NONCE_LEN);
    msg.extend_from_slice(label);
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(a);
    msg.extend_from_slice(c);
    // ring compares in constant time.
    hmac::verify(&key, &msg, tag).is_ok()
}

/// Compare two byte strings in constant time (for tokens, secrets and tags); only their lengths
/// may show.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// What the controller's handshake wants done next.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerStep<'a> {
    /// Look up this node's secret and call [`ServerHandshake::on_secret`] (None if unknown).
    LookupNode(&'a str),
    /// Send this frame and wait for the agent's next one.
    Send(Frame<'static>),
    /// Send this `Welcome` frame: the agent is authenticated.
    Accept(Frame<'static>),
    /// Send this `Reject` frame and close the connection.
    Reject(RejectCode, String),
}

#[derive(Debug)]
enum ServerState {
    AwaitHello,
    AwaitSecret { agent_nonce: [u8; NONCE_LEN] },
    AwaitAuth { agent_nonce: [u8; NONCE_LEN], secret: String },
    Done,
}

/// The controller's side of the handshake: Hello → Challenge → Auth → Welcome (or Reject).
#[derive(Debug)]
pub struct ServerHandshake {
    nonce: [u8; NONCE_LEN],
    name: String,
    version: u16,
    ping_interval_ms: u32,
    state: ServerState,
    keys: Option<SessionKeys>,
}

impl ServerHandshake {
    /// A handshake that will use `nonce` as the controller's challenge.
    pub fn new(nonce: [u8; NONCE_LEN], ping_interval_ms: u32) -> Self {
        Self {
            nonce,
            name: String::new(),
            version: 0,
            ping_interval_ms,
            state: ServerState::AwaitHello,
            keys: None,
        }
    }

    /// The frame keys, once the agent is accepted.
    pub fn session_keys(&self) -> Option<&SessionKeys> {
        self.keys.as_ref()
    }

    /// The node name the agent claimed (empty before Hello).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The negotiated protocol version (0 before Hello).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Feed the next frame from the agent.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> ServerStep<'_> {
        match (&self.state, frame) {
            (ServerState::AwaitHello, Frame::Hello { min_version, max_version, name, nonce, .. }) => {
                let (lo, hi) = (*min_version.max(&VERSION_MIN), *max_version.min(&VERSION_MAX));
                if lo > hi {
                    self.state = ServerState::Done;
                    return ServerStep::Reject(
                        RejectCode::UnsupportedVersion,
                        format!(
                            "the agent speaks protocol versions {min_version} to {max_version} but this controller \
                             speaks {VERSION_MIN} to {VERSION_MAX}: upgrade the older of the two"
                        ),
                    );
                }
                if name.is_empty() {
                    self.state = ServerState::Done;
                    return ServerStep::Reject(RejectCode::ProtocolError, "empty node name".into());
                }
                self.version = hi;
                self.name = name.to_string();
                self.state = ServerState::AwaitSecret { agent_nonce: *nonce };
                ServerStep::LookupNode(&self.name)
            }
            (ServerState::AwaitAuth { agent_nonce, secret }, Frame::Auth { proof: tag }) => {
                if !verify(AGENT_LABEL, secret, &self.name, agent_nonce, &self.nonce, tag) {
                    self.state = ServerState::Done;
                    return ServerStep::Reject(
                        RejectCode::WrongSecret,
                        format!(
                            "wrong secret for node '{}': copy the secret from `wisp node add` or \
                             `wisp node secret {}`",
                            self.name, self.name
                        ),
                    );
                }
                let mine = proof(CONTROLLER_LABEL, secret, &self.name, agent_nonce, &self.nonce);
                let mut p = [0u8; NONCE_LEN];
                p.copy_from_slice(mine.as_ref());
                self.keys = Some(session_keys(secret, &self.name, agent_nonce, &self.nonce, self.version));
                self.state = ServerState::Done;
                ServerStep::Accept(Frame::Welcome { proof: p, ping_interval_ms: self.ping_interval_ms })
            }
            (_, other) => {
                self.state = ServerState::Done;
                ServerStep::Reject(
                    RejectCode::ProtocolError,
                    format!("unexpected {} frame during the handshake", frame_kind(other)),
                )
            }
        }
    }

    /// Give the secret of the node named in Hello, or None when no such node exists.
    pub fn on_secret(&mut self, secret: Option<&str>) -> ServerStep<'_> {
        let agent_nonce = match self.state {
            ServerState::AwaitSecret { agent_nonce } => agent_nonce,
            _ => {
                self.state = ServerState::Done;
                return ServerStep::Reject(RejectCode::ProtocolError, "handshake out of order".into());
            }
        };
        match secret {
            None => {
                self.state = ServerState::Done;
                ServerStep::Reject(
                    RejectCode::UnknownNode,
                    format!(
                        "no node named '{}' on this controller: create it with `wisp node add {}`",
                        self.name, self.name
                    ),
                )
            }
            Some(s) => {
                self.state = ServerState::AwaitAuth { agent_nonce, secret: s.to_string() };
                ServerStep::Send(Frame::Challenge { version: self.version, nonce: self.nonce })
            }
        }
    }
}

/// What the agent's handshake wants done next.
#[allow(missing_docs)]
#[derive(Debug, PartialEq, Eq)]
pub enum ClientStep {
    /// Send this frame and wait for the controller's next one.
    Send(Frame<'static>),
    /// Authenticated both ways; ping at this interval.
    Done { version: u16, ping_interval_ms: u32 },
    /// The controller refused us; print the message and stop (or retry if `code` allows).
    Rejected(RejectCode, String),
    /// The peer is not a controller that knows our secret, or broke the protocol.
    Failed(String),
}

/// The agent's side of the handshake.
#[derive(Debug)]
pub struct ClientHandshake<'s> {
    name: &'s str,
    secret: &'s str,
    nonce: [u8; NONCE_LEN],
    ctl_nonce: Option<[u8; NONCE_LEN]>,
    version: u16,
}

impl<'s> ClientHandshake<'s> {
    /// Start a handshake; the returned frame (Hello) is to be sent first.
    pub fn new(
        name: &'s str,
        secret: &'s str,
        nonce: [u8; NONCE_LEN],
        capabilities: u32,
    ) -> (Self, Frame<'s>) {
        let hello =
            Frame::Hello { min_version: VERSION_MIN, max_version: VERSION_MAX, name, capabilities, nonce };
        (Self { name, secret, nonce, ctl_nonce: None, version: 0 }, hello)
    }

    /// The frame keys, once the controller's nonce is known (use them after `Done`).
    pub fn session_keys(&self) -> Option<SessionKeys> {
        self.ctl_nonce.map(|c| session_keys(self.secret, self.name, &self.nonce, &c, self.version))
    }

    /// Feed the next frame from the controller.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> ClientStep {
        match (self.ctl_nonce, frame) {
            (None, Frame::Challenge { version, nonce }) => {
                if !(VERSION_MIN..=VERSION_MAX).contains(version) {
                    return ClientStep::Failed(format!("controller chose protocol version {version}"));
                }
                self.version = *version;
                self.ctl_nonce = Some(*nonce);
                let tag = proof(AGENT_LABEL, self.secret, self.name, &self.nonce, nonce);
                let mut p = [0u8; NONCE_LEN];
                p.copy_from_slice(tag.as_ref());
                ClientStep::Send(Frame::Auth { proof: p })
            }
            (Some(ctl), Frame::Welcome { proof: tag, ping_interval_ms }) => {
                if verify(CONTROLLER_LABEL, self.secret, self.name, &self.nonce, &ctl, tag) {
                    ClientStep::Done { version: self.version, ping_interval_ms: *ping_interval_ms }
                } else {
                    ClientStep::Failed(
                        "the controller could not prove it knows this node's secret: it is not the \
                         controller you meant, or the node was re-created there"
                            .into(),
                    )
                }
            }
            (_, Frame::Reject { code, message }) => ClientStep::Rejected(*code, message.to_string()),
            (_, other) => {
                ClientStep::Failed(format!("unexpected {} frame during the handshake", frame_kind(other)))
            }
        }
    }
}

/// A short name of a frame's type, for messages.
pub fn frame_kind(f: &Frame<'_>) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Challenge { .. } => "Challenge",
        Frame::Auth { .. } => "Auth",
        Frame::Welcome { .. } => "Welcome",
        Frame::Reject { .. } => "Reject",
        Frame::StepStart(_) => "StepStart",
        Frame::Output { .. } => "Output",
        Frame::Exit { .. } => "Exit",
        Frame::Cancel { .. } => "Cancel",
        Frame::Credit { .. } => "Credit",
        Frame::Ack { .. } => "Ack",
        Frame::Running { .. } => "Running",
        Frame::Resume { .. } => "Resume",
        Frame::Abandon { .. } => "Abandon",
        Frame::Ping { .. } => "Ping",
        Frame::Pong { .. } => "Pong",
        Frame::InfoRequest => "InfoRequest",
        Frame::AgentInfo { .. } => "AgentInfo",
        Frame::Put { .. } => "Put",
        Frame::Taken { .. } => "Taken",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run a full handshake; `known` is the controller's view of the secret.
    fn run(agent_secret: &str, known: Option<&str>) -> (ClientStep, Option<RejectCode>) {
        let (mut c, hello) = ClientHandshake::new("n1", agent_secret, [1; 32], 0);
        let mut s = ServerHandshake::new([2; 32], 15000);
        assert_eq!(s.on_frame(&hello), ServerStep::LookupNode("n1"));
        let challenge = match s.on_secret(known) {
            ServerStep::Send(f) => f,
            ServerStep::Reject(code, msg) => {
                let r = Frame::Reject { code, message: &msg };
                return (c.on_frame(&r), Some(code));
            }
            other => panic!("{other:?}"),
        };
        let auth = match c.on_frame(&challenge) {
            ClientStep::Send(f) => f,
            other => panic!("{other:?}"),
        };
        match s.on_frame(&auth) {
            ServerStep::Accept(welcome) => (c.on_frame(&welcome), None),
            ServerStep::Reject(code, msg) => {
                let r = Frame::Reject { code, message: &msg };
                (c.on_frame(&r), Some(code))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn secret_is_64_hex_chars_of_hmac_of_name() {
        let s = node_secret(b"key", "n1");
        assert_eq!(s.len(), 64);
        assert_ne!(s, node_secret(b"key", "n2"));
        assert_ne!(s, node_secret(b"other", "n1"));
    }

    #[test]
    fn matching_secrets_authenticate_both_ways() {
        let secret = node_secret(b"k", "n1");
        assert!(matches!(run(&secret, Some(&secret)).0, ClientStep::Done { version: VERSION_MAX, .. }));
    }

    #[test]
    fn wrong_secret_is_rejected_with_its_own_code() {
        let (step, code) = run("bad", Some(&node_secret(b"k", "n1")));
        assert_eq!(code, Some(RejectCode::WrongSecret));
        assert!(
            matches!(step, ClientStep::Rejected(RejectCode::WrongSecret, m) if m.contains("wrong secret"))
        );
    }

    #[test]
    fn unknown_node_is_rejected_with_its_own_code() {
        let (step, code) = run("x", None);
        assert_eq!(code, Some(RejectCode::UnknownNode));
        assert!(
            matches!(step, ClientStep::Rejected(RejectCode::UnknownNode, m) if m.contains("no node named"))
        );
    }

    #[test]
    fn impostor_controller_fails_the_agents_check() {
        let secret = node_secret(b"k", "n1");
        let (mut c, _) = ClientHandshake::new("n1", &secret, [1; 32], 0);
        assert!(matches!(c.on_frame(&Frame::Challenge { version: 1, nonce: [3; 32] }), ClientStep::Send(_)));
        let fake = Frame::Welcome { proof: [0; 32], ping_interval_ms: 1 };
        assert!(matches!(c.on_frame(&fake), ClientStep::Failed(m) if m.contains("could not prove")));
    }

    #[test]
    fn agent_proof_cannot_be_reflected_as_controller_proof() {
        let secret = node_secret(b"k", "n1");
        let (mut c, _) = ClientHandshake::new("n1", &secret, [1; 32], 0);
        let auth = match c.on_frame(&Frame::Challenge { version: 1, nonce: [3; 32] }) {
            ClientStep::Send(Frame::Auth { proof }) => proof,
            other => panic!("{other:?}"),
        };
        let reflected = Frame::Welcome { proof: auth, ping_interval_ms: 1 };
        assert!(matches!(c.on_frame(&reflected), ClientStep::Failed(_)));
    }

    #[test]
    fn an_agent_of_version_1_gets_version_1_and_a_new_one_the_newest() {
        for (max, want) in [(1, 1), (VERSION_MAX, VERSION_MAX), (VERSION_MAX + 5, VERSION_MAX)] {
            let mut s = ServerHandshake::new([2; 32], 1);
            let hello =
                Frame::Hello { min_version: 1, max_version: max, name: "n", capabilities: 0, nonce: [1; 32] };
            assert!(matches!(s.on_frame(&hello), ServerStep::LookupNode("n")));
            let ServerStep::Send(Frame::Challenge { version, .. }) = s.on_secret(Some("sec")) else {
                panic!("a challenge")
            };
            assert_eq!(version, want, "agent max {max}");
        }
        const { assert!(VERSION_MAX >= crate::link::SEALED_VERSION, "this build seals frames") };
    }

    #[test]
    fn unsupported_version_is_rejected() {
        let mut s = ServerHandshake::new([2; 32], 1);
        let hello =
            Frame::Hello { min_version: 7, max_version: 9, name: "n", capabilities: 0, nonce: [0; 32] };
        assert!(matches!(s.on_frame(&hello), ServerStep::Reject(RejectCode::UnsupportedVersion, _)));
    }

    #[test]
    fn frames_out_of_order_are_protocol_errors() {
        let mut s = ServerHandshake::new([2; 32], 1);
        assert!(matches!(
            s.on_frame(&Frame::Auth { proof: [0; 32] }),
            ServerStep::Reject(RejectCode::ProtocolError, _)
        ));
        let mut s = ServerHandshake::new([2; 32], 1);
        assert!(matches!(s.on_secret(Some("x")), ServerStep::Reject(RejectCode::ProtocolError, _)));
    }

    #[test]
    fn constant_time_eq_compares_contents() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn a_sealed_descriptor_opens_only_with_its_secret_and_name() {
        let sealed = seal_descriptor("s3cret", "n1", b"<jnlp/>");
        assert_eq!(open_descriptor("s3cret", "n1", &sealed).as_deref(), Some(&b"<jnlp/>"[..]));
        assert_eq!(open_descriptor("other", "n1", &sealed), None);
        assert_eq!(open_descriptor("s3cret", "n2", &sealed), None);
        let mut bent = sealed.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert_eq!(open_descriptor("s3cret", "n1", &bent), None);
        assert_eq!(open_descriptor("s3cret", "n1", &sealed[..5]), None);
        assert_ne!(seal_descriptor("s3cret", "n1", b"<jnlp/>"), sealed, "a fresh nonce each time");
    }

    #[test]
    fn both_sides_derive_the_same_frame_keys_and_they_differ_per_direction() {
        let (mut c, hello) = ClientHandshake::new("n1", "sec", [1; 32], 0);
        let mut s = ServerHandshake::new([2; 32], 15000);
        assert!(matches!(s.on_frame(&hello), ServerStep::LookupNode("n1")));
        let ServerStep::Send(challenge) = s.on_secret(Some("sec")) else { panic!("challenge") };
        let ClientStep::Send(auth) = c.on_frame(&challenge) else { panic!("auth") };
        let ServerStep::Accept(welcome) = s.on_frame(&auth) else { panic!("accept") };
        assert!(matches!(c.on_frame(&welcome), ClientStep::Done { .. }));
        let (ck, sk) = (c.session_keys().unwrap(), s.session_keys().unwrap().clone());
        assert_eq!(ck, sk);
        assert_ne!(ck.to_agent, ck.to_controller);
        let (mut other, _) = ClientHandshake::new("n1", "other", [1; 32], 0);
        other.on_frame(&challenge);
        assert_ne!(other.session_keys().unwrap(), sk, "another secret gives other keys");
    }
}
