//! Addresses parse; dial failures are told apart (an untrusted certificate is permanent, a
//! handshake the peer cut off is not and says nothing of certificates); HTTP answers are read with
//! httparse, port discovery included.

use super::*;
use std::io::{Read, Write};
use std::net::TcpListener;

#[test]
fn urls_parse_with_defaults_and_prefixes() {
    let t = parse_url("http://127.0.0.1:8080").unwrap();
    assert_eq!(t, Target { tls: false, host: "127.0.0.1".into(), port: 8080, prefix: "/".into() });
    let t = parse_url("https://ci.example.com/jenkins").unwrap();
    assert_eq!((t.tls, t.port, t.prefix.as_str()), (true, 443, "/jenkins/"));
    let t = parse_url("wss://[::1]:9/").unwrap();
    assert_eq!((t.host.as_str(), t.url_host().as_str()), ("::1", "[::1]"));
    let e = parse_url("ftp://x").unwrap_err();
    assert!(e.is_permanent() && e.to_string().contains("use http://HOST:PORT/"), "{e}");
    assert_eq!(split_host_port("[::1]:50000").unwrap(), ("::1".to_string(), 50000));
    assert!(split_host_port("host").unwrap_err().is_permanent());
    assert!(split_host_port("host:port").unwrap_err().is_permanent());
    // Existing callers that want text still get the sentence.
    let s: String = parse_url("nope").unwrap_err().into();
    assert!(s.contains("bad controller URL"), "{s}");
}

/// A TLS listener on loopback with a fresh self-signed certificate; accepts connections until the
/// test ends. Returns its port.
#[cfg(feature = "controller")]
fn self_signed_tls_server() -> (u16, [u8; 32]) {
    use futures_rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let fp = crate::tls::fingerprint_bytes(&cert).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
    let acceptor = futures_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let acceptor = acceptor.clone();
            std::thread::spawn(move || {
                smol::block_on(async {
                    let _ = acceptor.accept(smol::Async::new(s).unwrap()).await;
                })
            });
        }
    });
    (port, fp)
}

#[cfg(feature = "controller")]
#[test]
fn an_untrusted_certificate_is_a_permanent_certificate_error_with_advice() {
    let (port, fp) = self_signed_tls_server();
    // The webpki roots do not hold a self-signed certificate.
    let tls = Tls::new(&crate::tls::Trust::default()).unwrap();
    let e = smol::block_on(open_stream("localhost", port, Some(&tls))).err().expect("refused");
    assert!(matches!(e, DialError::CertificateUntrusted { .. }), "{e:?}");
    assert!(e.is_permanent());
    let m = e.to_string();
    for advice in ["TLS handshake", "--instance-identity", "--cert", "--no-certificate-check"] {
        assert!(m.contains(advice), "{advice} missing: {m}");
    }
    // A pin of another key is a certificate error too, and says whose key it saw.
    let trust = crate::tls::Trust { pin: Some([0xab; 32]), ..Default::default() };
    let e = smol::block_on(open_stream("127.0.0.1", port, Some(&Tls::new(&trust).unwrap()))).err().unwrap();
    assert!(matches!(e, DialError::CertificateUntrusted { .. }) && e.is_permanent(), "{e:?}");
    assert!(
        e.to_string().contains("not the pinned") && e.to_string().contains(&crate::tls::show(&fp)),
        "{e}"
    );
    // The right pin connects.
    let trust = crate::tls::Trust { pin: Some(fp), ..Default::default() };
    assert!(smol::block_on(open_stream("127.0.0.1", port, Some(&Tls::new(&trust).unwrap()))).is_ok());
}

#[test]
fn a_tls_handshake_the_peer_cuts_off_is_retryable_and_not_blamed_on_certificates() {
    // A controller shedding load: it accepts and closes at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let tls = Tls::new(&crate::tls::Trust::default()).unwrap();
    for _ in 0..3 {
        let e = smol::block_on(open_stream("127.0.0.1", port, Some(&tls))).err().expect("cut off");
        assert!(matches!(e, DialError::HandshakeCut { .. }), "{e:?}");
        assert!(!e.is_permanent());
        let m = e.to_string();
        assert!(!m.to_lowercase().contains("certificate") && !m.contains("--cert"), "{m}");
        assert!(m.contains("overloaded"), "{m}");
    }
}

#[test]
fn a_refused_connection_is_retryable() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = smol::block_on(open_stream("127.0.0.1", port, None)).err().expect("refused");
    assert!(matches!(e, DialError::Unreachable { .. }) && !e.is_permanent(), "{e:?}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

/// A plain HTTP server that answers every request with `answer` and closes. Returns its target.
fn http_server(answer: &'static [u8]) -> Target {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = s.write_all(answer);
        }
    });
    Target { tls: false, host: "127.0.0.1".into(), port, prefix: "/".into() }
}

#[test]
fn http_answers_are_parsed_and_the_agent_port_is_discovered() {
    let t = http_server(b"HTTP/1.1 200 OK\r\nx-jenkins-jnlp-port:  50123 \r\nContent-Length: 2\r\n\r\nok");
    let a = smol::block_on(http_get(&t, None, "/x", 1024, false)).unwrap();
    assert_eq!((a.status, a.header("X-Jenkins-JNLP-Port"), &a.body[..]), (200, Some("50123"), &b"ok"[..]));
    assert!(a.head.starts_with("HTTP/1.1 200 OK"), "{}", a.head);
    assert_eq!(smol::block_on(discover_port(&t, None)).unwrap(), 50123);

    // No port announced, or not found: use another mode (permanent).
    for answer in [&b"HTTP/1.1 200 OK\r\n\r\n"[..], b"HTTP/1.1 404 Not Found\r\n\r\n"] {
        let t = http_server(answer);
        let e = smol::block_on(discover_port(&t, None)).unwrap_err();
        assert!(matches!(e, DialError::NoAgentPort { .. }) && e.is_permanent(), "{e:?}");
        assert!(e.to_string().contains("--websocket"), "{e}");
    }
    // A proxy whose controller is away: retry.
    let t = http_server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
    let e = smol::block_on(discover_port(&t, None)).unwrap_err();
    assert!(matches!(e, DialError::Http { status: Some(503), .. }) && !e.is_permanent(), "{e:?}");
    // Not HTTP at all.
    let t = http_server(b"\0\0\0\x05hello");
    let e = smol::block_on(http_get(&t, None, "/x", 1024, true)).err().unwrap();
    assert!(matches!(e, DialError::Http { status: None, .. }), "{e:?}");
    assert!(e.to_string().contains("not readable HTTP"), "{e}");
    // A header block larger than the caller allows.
    let t = http_server(
        b"HTTP/1.1 200 OK\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
    );
    let e = smol::block_on(http_get(&t, None, "/x", 32, true)).err().unwrap();
    assert!(e.to_string().contains("too long"), "{e}");
}

#[test]
fn only_configuration_problems_are_permanent() {
    let http = |status| DialError::Http { message: String::new(), status };
    assert!(http(Some(404)).is_permanent() && http(Some(400)).is_permanent());
    for transient in [Some(408), Some(429), Some(500), Some(502), Some(503), None] {
        assert!(!http(transient).is_permanent(), "{transient:?}");
    }
    assert!(!DialError::TimedOut { what: "x".into() }.is_permanent());
    assert!(!DialError::Tls { addr: "x".into(), reason: "y".into() }.is_permanent());
}
