//! TLS on both ports: the controller's identity (self-signed or given), the agent's three ways to
//! trust it, the CLI over https, and a man in the middle that terminates TLS.

mod common;
use common::*;
use futures_rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use futures_rustls::rustls;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HELLO: &str = "name: hello\nagent: {label: tls}\nsteps:\n  - sh: echo hello over tls\n";

fn agent_cmd(ctl: &Controller, name: &str, secret: &str, work: &std::path::Path) -> Command {
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &ctl.url(), "--name", name, "--secret", secret, "--work-dir"]).arg(work);
    cmd
}

#[test]
fn self_signed_identity_is_generated_kept_and_announced() {
    let mut ctl = Controller::start_tls(&[]);
    let fp = ctl.fingerprint();
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
    let key = ctl.data.path().join("tls/key.pem");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(ctl.data.path().join("token")).unwrap().permissions().mode() & 0o777, 0o600);
    wait_for("the identity log line", Duration::from_secs(10), || {
        ctl.log_text().contains(&format!("self-signed identity {fp}")).then_some(())
    });
    assert!(ctl.url().starts_with("https://"));
    ctl.restart();
    assert_eq!(ctl.fingerprint(), fp, "the identity must survive a restart");
    // A plain-HTTP request to the HTTPS port gets nothing useful.
    let mut s = std::net::TcpStream::connect(&ctl.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /api/nodes HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("nodes"), "plain HTTP answered on the TLS port");
}

#[test]
fn pinned_agents_run_builds_over_wss_and_tls_tcp_and_the_cli_follows_over_https() {
    let ctl = Controller::start_tls(&[]);
    let fp = ctl.fingerprint();
    let work = TempDir::new("tls-agents");
    // `node add` prints an agent command that pins the identity.
    let out = ctl.wisp(&["node", "add", "ws1", "--labels", "tls"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(&format!("--instance-identity {fp}")), "{text}");
    assert!(text.contains("--url https://"), "{text}");
    let secret = text.lines().find_map(|l| l.strip_prefix("secret: ")).unwrap().to_string();
    let mut cmd = agent_cmd(&ctl, "ws1", &secret, &work.path().join("ws1"));
    cmd.args(["--websocket", "--instance-identity", &fp]);
    let _ws = spawn_logged(cmd, work.path(), "ws1");
    ctl.wait_online("ws1");
    let (code, out) = ctl.run(HELLO);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("hello over tls"), "{out}");

    let s2 = ctl.add_node("tcp1", "tls2", &["--tcp"]);
    let mut cmd = agent_cmd(&ctl, "tcp1", &s2, &work.path().join("tcp1"));
    cmd.args(["--direct", &ctl.agent_addr, "--instance-identity", &fp]);
    let _tcp = spawn_logged(cmd, work.path(), "tcp1");
    ctl.wait_online("tcp1");
    let (code, out) = ctl.run(&HELLO.replace("label: tls}", "label: tls2}"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("hello over tls"), "{out}");

    // The descriptor carries the identity too.
    let desc = https_get(&ctl, "/computer/tcp1/jenkins-agent.jnlp", &fp);
    assert!(desc.contains("<argument>-instanceIdentity</argument>"), "{desc}");
    assert!(desc.contains(&format!("<argument>{fp}</argument>")), "{desc}");
    assert!(desc.contains("<argument>https://"), "{desc}");
}

/// GET with the API token over TLS pinned to `fp`; returns the whole answer.
fn https_get(ctl: &Controller, path: &str, fp: &str) -> String {
    let trust =
        wisp::tls::Trust { pin: Some(wisp::tls::parse_fingerprint(fp).unwrap()), ..Default::default() };
    let cfg = Arc::new(trust.client_config().unwrap());
    let token = ctl.token();
    let addr = ctl.http.clone();
    let path = path.to_string();
    smol::block_on(async move {
        let tcp = smol::net::TcpStream::connect(&addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut s = futures_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = smol::future::or(async { s.read_to_end(&mut buf).await.map(|_| ()) }, async {
            smol::Timer::after(Duration::from_secs(20)).await;
            Ok(())
        })
        .await;
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[test]
fn an_unchecked_or_wrongly_pinned_controller_is_refused_with_advice() {
    let ctl = Controller::start_tls(&[]);
    let work = TempDir::new("tls-refused");
    let secret = ctl.add_node("n1", "x", &[]);
    // No trust given: the self-signed identity is not in the webpki roots.
    let mut cmd = agent_cmd(&ctl, "n1", &secret, &work.path().join("a"));
    cmd.arg("--websocket");
    let a = spawn_logged(cmd, work.path(), "a");
    let log = wait_for("the TLS failure", Duration::from_secs(20), || {
        let t = a.log_text();
        t.contains("TLS handshake").then_some(t)
    });
    for advice in ["--instance-identity", "--cert", "--no-certificate-check"] {
        assert!(log.contains(advice), "advice {advice} missing: {log}");
    }
    // A wrong pin is refused and says so.
    let mut cmd = agent_cmd(&ctl, "n1", &secret, &work.path().join("b"));
    cmd.args(["--websocket", "--instance-identity", &format!("sha256:{}", "ab".repeat(32))]);
    let b = spawn_logged(cmd, work.path(), "b");
    wait_for("the pin mismatch", Duration::from_secs(20), || {
        b.log_text().contains("not the pinned").then_some(())
    });
    assert!(ctl.node_line("n1").unwrap().contains("\toffline\t"));
    // A malformed pin is a usage error.
    let out = agent_cmd(&ctl, "n1", &secret, work.path())
        .args(["--instance-identity", "sha256:zz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_private_ca_is_trusted_with_cert_and_no_certificate_check_warns_at_every_connect() {
    let dir = TempDir::new("tls-ca");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let (ca_pem, cert_pem, key_pem) =
        (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cert_pem, leaf.pem()).unwrap();
    std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();
    let ctl = Controller::start_tls(&[
        "--tls-cert",
        cert_pem.to_str().unwrap(),
        "--tls-key",
        key_pem.to_str().unwrap(),
    ]);
    assert!(!ctl.data.path().join("tls/key.pem").exists(), "no self-signed identity when one is given");
    let secret = ctl.add_node("ca1", "tls", &[]);
    let mut cmd = agent_cmd(&ctl, "ca1", &secret, &dir.path().join("w1"));
    cmd.arg("--websocket").arg("--cert").arg(&ca_pem);
    let mut a = spawn_logged(cmd, dir.path(), "ca1");
    ctl.wait_online("ca1");
    let (code, out) = ctl.run(HELLO);
    assert_eq!(code, 0, "{out}");
    assert!(!a.log_text().contains("--no-certificate-check"));
    a.kill("TERM");
    a.wait_exit(Duration::from_secs(10));
    ctl.wait_offline("ca1", Duration::from_secs(20));

    let mut cmd = agent_cmd(&ctl, "ca1", &secret, &dir.path().join("w2"));
    cmd.args(["--websocket", "--no-certificate-check"]);
    let b = spawn_logged(cmd, dir.path(), "ca1-unchecked");
    ctl.wait_online("ca1");
    assert!(b.log_text().contains("--no-certificate-check: not checking who"), "{}", b.log_text());
}

/// A TLS-terminating man in the middle: accepts agents with its own certificate, opens its own
/// TLS connection to `upstream` and relays, recording every byte it sees in clear.
struct Mitm {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
}

fn mitm(upstream: String) -> Mitm {
    mitm_with(upstream, false)
}

/// As `mitm`; with `tamper`, every chunk from the controller after the second (the handshake's
/// Challenge and Welcome) reaches the agent with its last byte flipped.
fn mitm_with(upstream: String, tamper: bool) -> Mitm {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = CertificateDer::from_pem_slice(ck.cert.pem().as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(ck.signing_key.serialize_pem().as_bytes()).unwrap();
    let server =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
    let acceptor = futures_rustls::TlsAcceptor::from(Arc::new(server));
    let client = Arc::new(wisp::tls::Trust { insecure: true, ..Default::default() }.client_config().unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let listener = smol::net::TcpListener::try_from(listener).unwrap();
        smol::block_on(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, client, seen, upstream) =
                    (acceptor.clone(), client.clone(), seen2.clone(), upstream.clone());
                smol::spawn(async move {
                    let Ok(down) = acceptor.accept(tcp).await else { return };
                    let Ok(up) = smol::net::TcpStream::connect(&upstream).await else { return };
                    let name = ServerName::try_from("127.0.0.1").unwrap();
                    let Ok(up) = futures_rustls::TlsConnector::from(client).connect(name, up).await else {
                        return;
                    };
                    let (mut dr, mut dw) = smol::io::split(down);
                    let (mut ur, mut uw) = smol::io::split(up);
                    let s1 = seen.clone();
                    let a = async move {
                        let mut buf = vec![0u8; 16384];
                        while let Ok(n) = dr.read(&mut buf).await {
                            if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            s1.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                    };
                    let b = async move {
                        let mut buf = vec![0u8; 16384];
                        let mut chunks = 0;
                        while let Ok(n) = ur.read(&mut buf).await {
                            chunks += 1;
                            if tamper && chunks > 2 && n > 0 {
                                buf[n - 1] ^= 0x01;
                            }
                            if n == 0 || dw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            seen.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                    };
                    smol::future::or(a, b).await;
                })
                .detach();
            }
        })
    });
    Mitm { addr, seen }
}

#[test]
fn a_tls_terminating_man_in_the_middle_learns_no_secret_and_cannot_drive_the_agent() {
    let ctl = Controller::start_tls(&[]);
    let work = TempDir::new("tls-mitm");
    let secret = ctl.add_node("m1", "tls", &["--tcp"]);
    // Passive: the agent is told to skip the check; the relay ends TLS and sees every byte.
    let m = mitm(ctl.agent_addr.clone());
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &format!("https://{}/", m.addr), "--direct", &m.addr, "--name", "m1"])
        .args(["--secret", &secret, "--no-certificate-check", "--work-dir"])
        .arg(work.path().join("m1"));
    let mut a = spawn_logged(cmd, work.path(), "m1");
    ctl.wait_online("m1");
    let (code, out) = ctl.run(HELLO);
    assert_eq!(code, 0, "{out}");
    let seen = m.seen.lock().unwrap().clone();
    // Frames are sealed (protocol version 2): the relay carried the build but cannot read it.
    assert!(seen.len() > 200, "the relay carried the link ({} bytes)", seen.len());
    assert!(!seen.windows(11).any(|w| w == b"hello over "), "the relay read the step's output in clear");
    assert!(!seen.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret crossed the wire");
    let raw: Vec<u8> =
        (0..secret.len() / 2).map(|i| u8::from_str_radix(&secret[2 * i..2 * i + 2], 16).unwrap()).collect();
    assert!(!seen.windows(raw.len()).any(|w| w == &raw[..]), "the secret's bytes crossed the wire");
    a.kill("TERM");
    a.wait_exit(Duration::from_secs(10));

    // Active: the middle sends the agent to its own controller, which has a node of the same name
    // but not its secret. The mutual handshake fails (the rogue cannot check the agent's proof,
    // nor prove the secret itself), the agent exits without having run anything.
    let rogue = Controller::start_tls(&[]);
    let _ = rogue.add_node("m1", "tls", &["--tcp"]);
    let m2 = mitm(rogue.agent_addr.clone());
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &format!("https://{}/", m2.addr), "--direct", &m2.addr, "--name", "m1"])
        .args(["--secret", &secret, "--no-certificate-check", "--work-dir"])
        .arg(work.path().join("m2"));
    let mut b = spawn_logged(cmd, work.path(), "m1-rogue");
    let code = b.wait_exit(Duration::from_secs(30));
    assert!(code == 4 || code == 7, "exit {code}: {}", b.log_text());
    assert!(
        b.log_text().contains("wrong secret") || b.log_text().contains("could not prove"),
        "{}",
        b.log_text()
    );
    let rogue_seen = m2.seen.lock().unwrap().clone();
    assert!(!rogue_seen.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret crossed the wire");
    assert!(rogue.node_line("m1").unwrap().contains("\toffline\t"));
}

#[test]
fn a_man_in_the_middle_that_alters_frames_is_detected_and_drives_nothing() {
    let ctl = Controller::start_tls(&["--ping-interval", "1"]);
    let work = TempDir::new("tls-tamper");
    let secret = ctl.add_node("t1", "tamper", &["--tcp"]);
    let m = mitm_with(ctl.agent_addr.clone(), true);
    let mut cmd = Command::new(AGENT);
    cmd.args(["--url", &format!("https://{}/", m.addr), "--direct", &m.addr, "--name", "t1"])
        .args(["--secret", &secret, "--no-certificate-check", "--work-dir"])
        .arg(work.path().join("t1"));
    let a = spawn_logged(cmd, work.path(), "t1");
    let marker = work.path().join("t1-ran");
    let id = ctl.submit(&format!(
        "name: tampered\nagent: {{label: tamper}}\nsteps:\n  - sh: touch {}\n",
        marker.display()
    ));
    wait_for("the agent to detect the altered frames", Duration::from_secs(30), || {
        a.log_text().contains("frame authentication failed").then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(!marker.exists(), "an altered link ran a step");
    let b = ctl.build_state_now(id);
    assert_ne!(b, "success", "build {id} succeeded through a tampering middle");
}
