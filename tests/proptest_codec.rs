//! Property tests of the frame codec (`proto`) and the handshake state machines (`auth`).
//!
//! Runs 256 cases per property by default; set PROPTEST_CASES to change that. Needs no controller
//! code: `cargo test --no-default-features --test proptest_codec` works too.

use proptest::prelude::*;
use proptest::sample::Index;
use sha2::{Digest, Sha256};
use wisp::auth::{hex, node_secret, ClientHandshake, ClientStep, ServerHandshake, ServerStep};
use wisp::proto::{
    decode, encode, encode_env, encode_steps, CodecError, ExitStatus, Frame, RejectCode, StepStart,
    MAX_CONTAINER, MAX_FRAME, MAX_MESSAGE, MAX_NAME, MAX_OUTPUT_CHUNK, NONCE_LEN, VERSION_MAX, VERSION_MIN,
};

// Limits the codec enforces on StepStart fields (literals in src/proto.rs, not exported).
const MAX_WORKSPACE: usize = 255;
const MAX_PATH: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Strategies

/// Any string of at most `max` bytes (any chars, cut at a char boundary), sometimes exactly `max`.
fn str_upto(max: usize) -> impl Strategy<Value = String> {
    let any_chars = prop::collection::vec(any::<char>(), 0..=max.min(128)).prop_map(move |cs| {
        let mut s = String::new();
        for c in cs {
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        s
    });
    prop_oneof![
        6 => any_chars,
        1 => Just("x".repeat(max)),
        1 => Just(String::new()),
    ]
}

/// "" (the agent's own container) or a DNS-1123 label of 1 to 63 bytes.
fn container_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        3 => "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
        1 => Just("a".repeat(MAX_CONTAINER)),
    ]
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop::sample::select(vec![
        RejectCode::UnknownNode,
        RejectCode::WrongSecret,
        RejectCode::UnsupportedVersion,
        RejectCode::AlreadyConnected,
        RejectCode::ProtocolError,
        RejectCode::TryLater,
        RejectCode::Overloaded,
    ])
}

fn exit_status() -> impl Strategy<Value = ExitStatus> {
    prop_oneof![
        any::<i32>().prop_map(ExitStatus::Code),
        any::<i32>().prop_map(ExitStatus::Signal),
        Just(ExitStatus::StartFailed),
        Just(ExitStatus::TimedOut),
        Just(ExitStatus::Cancelled),
    ]
}

/// An owned frame, since `Frame` borrows its strings.
#[derive(Debug, Clone)]
enum Owned {
    Hello {
        min_version: u16,
        max_version: u16,
        name: String,
        capabilities: u32,
        nonce: [u8; 32],
    },
    Challenge {
        version: u16,
        nonce: [u8; 32],
    },
    Auth {
        proof: [u8; 32],
    },
    Welcome {
        proof: [u8; 32],
        ping_interval_ms: u32,
    },
    Reject {
        code: RejectCode,
        message: String,
    },
    StepStart {
        build: u64,
        step: u32,
        timeout_secs: u32,
        credit: u32,
        workspace: String,
        dir: String,
        shell: String,
        script: String,
        env: Vec<(String, String)>,
        container: String,
    },
    Output {
        build: u64,
        step: u32,
        offset: u64,
        data: Vec<u8>,
    },
    Exit {
        build: u64,
        step: u32,
        status: ExitStatus,
        offset: u64,
        message: String,
    },
    Cancel {
        build: u64,
        step: u32,
    },
    Credit {
        build: u64,
        step: u32,
        bytes: u32,
        stored: u64,
    },
    Running {
        steps: Vec<(u64, u32, u64)>,
    },
    Resume {
        build: u64,
        step: u32,
        offset: u64,
        credit: u32,
    },
    Abandon {
        build: u64,
        step: u32,
    },
    Ack {
        build: u64,
        step: u32,
        offset: u64,
    },
    Ping {
        id: u64,
    },
    Pong {
        id: u64,
    },
}

impl Owned {
    /// The borrowed frame; `envbuf` holds the encoded environment of a StepStart.
    fn frame<'a>(&'a self, envbuf: &'a mut [u8]) -> Frame<'a> {
        match self {
            Owned::Hello { min_version, max_version, name, capabilities, nonce } => Frame::Hello {
                min_version: *min_version,
                max_version: *max_version,
                name,
                capabilities: *capabilities,
                nonce: *nonce,
            },
            Owned::Challenge { version, nonce } => Frame::Challenge { version: *version, nonce: *nonce },
            Owned::Auth { proof } => Frame::Auth { proof: *proof },
            Owned::Welcome { proof, ping_interval_ms } => {
                Frame::Welcome { proof: *proof, ping_interval_ms: *ping_interval_ms }
            }
            Owned::Reject { code, message } => Frame::Reject { code: *code, message },
            Owned::StepStart {
                build,
                step,
                timeout_secs,
                credit,
                workspace,
                dir,
                shell,
                script,
                env,
                container,
            } => {
                let env = encode_env(env.iter().map(|(k, v)| (k.as_str(), v.as_str())), envbuf)
                    .expect("environment fits its buffer");
                Frame::StepStart(StepStart {
                    build: *build,
                    step: *step,
                    timeout_secs: *timeout_secs,
                    credit: *credit,
                    workspace,
                    dir,
                    shell,
                    script,
                    env,
                    container,
                })
            }
            Owned::Output { build, step, offset, data } => {
                Frame::Output { build: *build, step: *step, offset: *offset, data }
            }
            Owned::Exit { build, step, status, offset, message } => {
                Frame::Exit { build: *build, step: *step, status: *status, offset: *offset, message }
            }
            Owned::Cancel { build, step } => Frame::Cancel { build: *build, step: *step },
            Owned::Credit { build, step, bytes, stored } => {
                Frame::Credit { build: *build, step: *step, bytes: *bytes, stored: *stored }
            }
            Owned::Running { steps } => {
                Frame::Running { steps: encode_steps(steps.iter().copied(), envbuf).expect("fits") }
            }
            Owned::Resume { build, step, offset, credit } => {
                Frame::Resume { build: *build, step: *step, offset: *offset, credit: *credit }
            }
            Owned::Abandon { build, step } => Frame::Abandon { build: *build, step: *step },
            Owned::Ack { build, step, offset } => Frame::Ack { build: *build, step: *step, offset: *offset },
            Owned::Ping { id } => Frame::Ping { id: *id },
            Owned::Pong { id } => Frame::Pong { id: *id },
        }
    }

    /// The environment a StepStart was generated with.
    fn env(&self) -> Option<&[(String, String)]> {
        match self {
            Owned::StepStart { env, .. } => Some(env),
            _ => None,
        }
    }
}

/// Every variant, with arbitrary field values within the codec's limits.
fn owned_frame() -> impl Strategy<Value = Owned> {
    let nonce = any::<[u8; NONCE_LEN]>;
    let step_start = (
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()),
        (str_upto(MAX_WORKSPACE), str_upto(MAX_PATH), str_upto(MAX_PATH), str_upto(2048)),
        prop::collection::vec((str_upto(32), str_upto(96)), 0..8),
        container_name(),
    )
        .prop_map(
            |((build, step, timeout_secs, credit), (workspace, dir, shell, script), env, container)| {
                Owned::StepStart {
                    build,
                    step,
                    timeout_secs,
                    credit,
                    workspace,
                    dir,
                    shell,
                    script,
                    env,
                    container,
                }
            },
        );
    let data = prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..256),
        1 => prop::collection::vec(any::<u8>(), MAX_OUTPUT_CHUNK..=MAX_OUTPUT_CHUNK),
    ];
    prop_oneof![
        (any::<u16>(), any::<u16>(), str_upto(MAX_NAME), any::<u32>(), nonce()).prop_map(
            |(min_version, max_version, name, capabilities, nonce)| Owned::Hello {
                min_version,
                max_version,
                name,
                capabilities,
                nonce
            }
        ),
        (any::<u16>(), nonce()).prop_map(|(version, nonce)| Owned::Challenge { version, nonce }),
        nonce().prop_map(|proof| Owned::Auth { proof }),
        (nonce(), any::<u32>())
            .prop_map(|(proof, ping_interval_ms)| Owned::Welcome { proof, ping_interval_ms }),
        (reject_code(), str_upto(MAX_MESSAGE)).prop_map(|(code, message)| Owned::Reject { code, message }),
        step_start,
        (any::<u64>(), any::<u32>(), any::<u64>(), data)
            .prop_map(|(build, step, offset, data)| Owned::Output { build, step, offset, data }),
        (any::<u64>(), any::<u32>(), exit_status(), any::<u64>(), str_upto(MAX_MESSAGE)).prop_map(
            |(build, step, status, offset, message)| Owned::Exit { build, step, status, offset, message }
        ),
        (any::<u64>(), any::<u32>()).prop_map(|(build, step)| Owned::Cancel { build, step }),
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u64>())
            .prop_map(|(build, step, bytes, stored)| Owned::Credit { build, step, bytes, stored }),
        proptest::collection::vec((any::<u64>(), any::<u32>(), any::<u64>()), 0..40)
            .prop_map(|steps| Owned::Running { steps }),
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<u32>())
            .prop_map(|(build, step, offset, credit)| Owned::Resume { build, step, offset, credit }),
        (any::<u64>(), any::<u32>()).prop_map(|(build, step)| Owned::Abandon { build, step }),
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(build, step, offset)| Owned::Ack {
            build,
            step,
            offset
        }),
        any::<u64>().prop_map(|id| Owned::Ping { id }),
        any::<u64>().prop_map(|id| Owned::Pong { id }),
    ]
}

fn encoded(f: &Frame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = encode(f, &mut buf).expect("a frame within the limits encodes");
    buf.truncate(n);
    buf
}

/// Decode must not panic; whatever it accepts must re-encode and decode to the same frame.
fn decode_is_total(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(f) = decode(bytes) {
        let again = encoded(&f);
        prop_assert!(again.len() <= bytes.len());
        prop_assert_eq!(decode(&again), Ok(f));
        if let Frame::StepStart(s) = f {
            prop_assert_eq!(s.env.iter().count(), s.env.len());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HMAC-SHA256 written out from RFC 2104 over sha2, so the handshake is checked against an
// implementation that shares no code with wisp's (which uses ring).

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new().chain_update(k.map(|b| b ^ 0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(k.map(|b| b ^ 0x5c)).chain_update(inner).finalize().into()
}

/// True when two secrets are the same HMAC key (keys are zero-padded to the block size, so "a" and
/// "a\0" are one key): such pairs are not "different secrets".
fn same_hmac_key(a: &str, b: &str) -> bool {
    let block = |s: &str| {
        let mut k = [0u8; 64];
        if s.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(s.as_bytes()));
        } else {
            k[..s.len()].copy_from_slice(s.as_bytes());
        }
        k
    };
    block(a) == block(b)
}

/// Two secrets that are different HMAC keys.
fn two_secrets() -> impl Strategy<Value = (String, String)> {
    (secret(), secret()).prop_filter("secrets differ", |(a, b)| !same_hmac_key(a, b))
}

/// The proof of docs/PROTOCOL.md: HMAC(S, label ‖ u32be(len(name)) ‖ name ‖ Na ‖ Nc).
fn proof(label: &str, secret: &str, name: &str, agent: &[u8; 32], ctl: &[u8; 32]) -> [u8; 32] {
    let mut msg = label.as_bytes().to_vec();
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(agent);
    msg.extend_from_slice(ctl);
    hmac_sha256(secret.as_bytes(), &msg)
}

/// How a full handshake between an agent holding `agent_secret` and a controller holding
/// `ctl_secret` (None: node unknown) ended, on each side.
#[derive(Debug)]
struct Outcome {
    /// The controller's last step: Accept or Reject(code).
    server: Result<Frame<'static>, RejectCode>,
    /// The agent's last step, after being sent the controller's answer.
    client: ClientStep,
    /// The proof the agent sent, if it got as far as Auth.
    auth: Option<[u8; 32]>,
}

fn handshake(
    name: &str,
    agent_secret: &str,
    ctl_secret: Option<&str>,
    agent_nonce: [u8; 32],
    ctl_nonce: [u8; 32],
    ping: u32,
) -> Outcome {
    let (mut c, hello) = ClientHandshake::new(name, agent_secret, agent_nonce, 0);
    // Through the codec, as on a real link.
    let hello_bytes = encoded(&hello);
    let mut s = ServerHandshake::new(ctl_nonce, ping);
    match s.on_frame(&decode(&hello_bytes).unwrap()) {
        ServerStep::LookupNode(n) => assert_eq!(n, name),
        other => panic!("Hello answered with {other:?}"),
    }
    let reject = |code: RejectCode, message: String, c: &mut ClientHandshake<'_>| {
        let r = encoded(&Frame::Reject { code, message: &message });
        c.on_frame(&decode(&r).unwrap())
    };
    let challenge = match s.on_secret(ctl_secret) {
        ServerStep::Send(f) => encoded(&f),
        ServerStep::Reject(code, message) => {
            let client = reject(code, message, &mut c);
            return Outcome { server: Err(code), client, auth: None };
        }
        other => panic!("secret answered with {other:?}"),
    };
    let (auth, proof) = match c.on_frame(&decode(&challenge).unwrap()) {
        ClientStep::Send(f @ Frame::Auth { proof }) => (encoded(&f), proof),
        other => panic!("Challenge answered with {other:?}"),
    };
    match s.on_frame(&decode(&auth).unwrap()) {
        ServerStep::Accept(welcome) => {
            let client = c.on_frame(&decode(&encoded(&welcome)).unwrap());
            Outcome { server: Ok(welcome), client, auth: Some(proof) }
        }
        ServerStep::Reject(code, message) => {
            let client = reject(code, message, &mut c);
            Outcome { server: Err(code), client, auth: Some(proof) }
        }
        other => panic!("Auth answered with {other:?}"),
    }
}

fn node_name() -> impl Strategy<Value = String> {
    str_upto(MAX_NAME).prop_filter("node names are not empty", |n| !n.is_empty())
}

fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        // As the controller derives them.
        (prop::collection::vec(any::<u8>(), 0..48), node_name()).prop_map(|(k, n)| node_secret(&k, &n)),
        // Anything an operator might paste, including keys longer than the HMAC block.
        str_upto(100),
    ]
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #[test]
    fn every_frame_round_trips(owned in owned_frame()) {
        let mut envbuf = vec![0u8; MAX_FRAME];
        let frame = owned.frame(&mut envbuf);
        let bytes = encoded(&frame);
        prop_assert!(bytes.len() <= MAX_FRAME);
        let back = decode(&bytes);
        prop_assert_eq!(back, Ok(frame));
        // Canonical: the decoded frame encodes to the very same bytes.
        prop_assert_eq!(&encoded(&back.unwrap()), &bytes);
        if let (Some(env), Ok(Frame::StepStart(s))) = (owned.env(), back) {
            let got: Vec<(String, String)> = s.env.iter().map(|(k, v)| (k.into(), v.into())).collect();
            prop_assert_eq!(got.as_slice(), env);
        }
    }

    #[test]
    fn too_small_a_buffer_is_an_error(owned in owned_frame(), short in any::<Index>()) {
        let mut envbuf = vec![0u8; MAX_FRAME];
        let frame = owned.frame(&mut envbuf);
        let n = encoded(&frame).len();
        let mut buf = vec![0u8; short.index(n)];
        prop_assert_eq!(encode(&frame, &mut buf), Err(CodecError::TooLarge));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        decode_is_total(&bytes)?;
    }

    #[test]
    fn known_type_byte_then_arbitrary_bytes_never_panic(
        t in prop::sample::select(vec![1u8, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]),
        tail in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = vec![t];
        bytes.extend_from_slice(&tail);
        decode_is_total(&bytes)?;
    }

    #[test]
    fn corrupted_valid_frames_never_panic(
        owned in owned_frame(),
        edits in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
    ) {
        let mut envbuf = vec![0u8; MAX_FRAME];
        let mut bytes = encoded(&owned.frame(&mut envbuf));
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        decode_is_total(&bytes)?;
    }

    #[test]
    fn every_truncation_is_an_error(owned in owned_frame(), cut in any::<Index>()) {
        let mut envbuf = vec![0u8; MAX_FRAME];
        let bytes = encoded(&owned.frame(&mut envbuf));
        // One random cut point per case; every cut point when the frame is small.
        let cut = cut.index(bytes.len());
        prop_assert_eq!(decode(&bytes[..cut]), Err(CodecError::Truncated), "cut at {}", cut);
        if bytes.len() <= 512 {
            for cut in 0..bytes.len() {
                prop_assert_eq!(decode(&bytes[..cut]), Err(CodecError::Truncated), "cut at {}", cut);
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error(owned in owned_frame(), extra in prop::collection::vec(any::<u8>(), 1..16)) {
        let mut envbuf = vec![0u8; MAX_FRAME];
        let mut bytes = encoded(&owned.frame(&mut envbuf));
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode(&bytes), Err(CodecError::TrailingBytes));
    }

    #[test]
    fn over_long_fields_are_refused_by_encode_and_decode(name in str_upto(200), message in str_upto(MAX_MESSAGE + 64)) {
        let mut buf = vec![0u8; MAX_FRAME];
        let hello = Frame::Hello { min_version: 1, max_version: 1, name: &name, capabilities: 0, nonce: [0; 32] };
        if name.len() > MAX_NAME {
            prop_assert_eq!(encode(&hello, &mut buf), Err(CodecError::BadField("name")));
            // Hand-made frame with the over-long name: the decoder refuses it too.
            let mut raw = vec![1u8, 0, 1, 0, 1];
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(&[0; 4 + 32]);
            prop_assert_eq!(decode(&raw), Err(CodecError::BadField("name")));
        } else {
            prop_assert!(encode(&hello, &mut buf).is_ok());
        }
        let reject = Frame::Reject { code: RejectCode::TryLater, message: &message };
        prop_assert_eq!(encode(&reject, &mut buf).is_ok(), message.len() <= MAX_MESSAGE);
    }

    #[test]
    fn hmac_oracle_matches_node_secret(key in prop::collection::vec(any::<u8>(), 0..100), name in node_name()) {
        // Checks the test's own HMAC against wisp's, on the one value wisp exposes directly.
        prop_assert_eq!(node_secret(&key, &name), hex(&hmac_sha256(&key, name.as_bytes())));
    }

    #[test]
    fn matching_secrets_authenticate_both_ways(
        name in node_name(),
        secret in secret(),
        agent_nonce in any::<[u8; 32]>(),
        ctl_nonce in any::<[u8; 32]>(),
        ping in any::<u32>(),
    ) {
        let out = handshake(&name, &secret, Some(&secret), agent_nonce, ctl_nonce, ping);
        prop_assert_eq!(out.auth, Some(proof("wisp-v1 agent proof", &secret, &name, &agent_nonce, &ctl_nonce)));
        let welcome = Frame::Welcome {
            proof: proof("wisp-v1 controller proof", &secret, &name, &agent_nonce, &ctl_nonce),
            ping_interval_ms: ping,
        };
        prop_assert_eq!(out.server, Ok(welcome));
        prop_assert_eq!(out.client, ClientStep::Done { version: VERSION_MAX, ping_interval_ms: ping });
    }

    #[test]
    fn a_wrong_secret_is_always_rejected(
        name in node_name(),
        (agent_secret, ctl_secret) in two_secrets(),
        agent_nonce in any::<[u8; 32]>(),
        ctl_nonce in any::<[u8; 32]>(),
    ) {
        let out = handshake(&name, &agent_secret, Some(&ctl_secret), agent_nonce, ctl_nonce, 1000);
        prop_assert_eq!(out.server, Err(RejectCode::WrongSecret));
        prop_assert!(
            matches!(&out.client, ClientStep::Rejected(RejectCode::WrongSecret, m) if m.contains("wrong secret")),
            "agent saw {:?}", out.client
        );
    }

    #[test]
    fn an_unknown_node_is_rejected(name in node_name(), secret in secret(), n in any::<[u8; 32]>()) {
        let out = handshake(&name, &secret, None, n, n, 1000);
        prop_assert_eq!(out.server, Err(RejectCode::UnknownNode));
        prop_assert!(matches!(out.client, ClientStep::Rejected(RejectCode::UnknownNode, _)), "{:?}", out.client);
    }

    #[test]
    fn the_agent_rejects_a_controller_with_another_secret(
        name in node_name(),
        (agent_secret, ctl_secret) in two_secrets(),
        agent_nonce in any::<[u8; 32]>(),
        ctl_nonce in any::<[u8; 32]>(),
    ) {
        // An impostor controller that knows some other secret completes its own handshake (with an
        // agent holding that secret and the same nonces) and replays its Welcome to our agent.
        let impostor = handshake(&name, &ctl_secret, Some(&ctl_secret), agent_nonce, ctl_nonce, 1000);
        let welcome = impostor.server.expect("the impostor's own handshake succeeds");
        let (mut c, _) = ClientHandshake::new(&name, &agent_secret, agent_nonce, 0);
        let challenge = Frame::Challenge { version: VERSION_MIN, nonce: ctl_nonce };
        let step = c.on_frame(&challenge);
        prop_assert!(matches!(step, ClientStep::Send(Frame::Auth { .. })), "Challenge answered with {:?}", step);
        let step = c.on_frame(&welcome);
        prop_assert!(matches!(step, ClientStep::Failed(_)), "impostor's Welcome answered with {:?}", step);
    }

    #[test]
    fn a_proof_is_bound_to_its_nonces(
        name in node_name(),
        secret in secret(),
        agent_nonce in any::<[u8; 32]>(),
        ctl_nonce in any::<[u8; 32]>(),
        other_nonce in any::<[u8; 32]>(),
    ) {
        prop_assume!(other_nonce != ctl_nonce);
        // An Auth recorded from a handshake with one controller nonce is replayed to another.
        let recorded = proof("wisp-v1 agent proof", &secret, &name, &agent_nonce, &ctl_nonce);
        let (_, hello) = ClientHandshake::new(&name, &secret, agent_nonce, 0);
        let mut s = ServerHandshake::new(other_nonce, 1000);
        prop_assert!(matches!(s.on_frame(&hello), ServerStep::LookupNode(_)));
        prop_assert!(matches!(s.on_secret(Some(&secret)), ServerStep::Send(_)));
        let step = s.on_frame(&Frame::Auth { proof: recorded });
        prop_assert!(matches!(step, ServerStep::Reject(RejectCode::WrongSecret, _)), "replayed Auth answered with {:?}", step);
    }
}
