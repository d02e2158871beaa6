//! The example proxy configs in examples/proxy/, run with the real nginx and haproxy (Debian
//! packages, installed by scripts/test.sh) on loopback: agents over wss:// with TLS ended at the
//! proxy, over ws:// to the proxy with TLS from the proxy to the controller, and the CLI's
//! `run --follow` through both.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PIPELINE: &str =
    "name: proxied\nagent: {label: px}\nsteps:\n  - sh: for i in 1 2 3; do echo line $i via proxy; done\n";

fn need(tool: &str) {
    let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
    assert!(
        found.status.success(),
        "{tool} is not installed: scripts/test.sh installs it (apt-get install -y {tool})"
    );
}

/// The proxy's own certificate (self-signed, for 127.0.0.1): (cert, key, cert+key, fingerprint).
fn proxy_identity(dir: &Path) -> (String, String, String, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let (cert, key, both) =
        (dir.join("proxy-cert.pem"), dir.join("proxy-key.pem"), dir.join("proxy-both.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(&both, format!("{}{}", ck.cert.pem(), ck.signing_key.serialize_pem())).unwrap();
    let fp = wisp::tls::fingerprint_of_pem_file(&cert).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    (s(&cert), s(&key), s(&both), fp)
}

fn wait_port(port: u16, proxy: &Proc) {
    wait_for(&format!("the proxy on port {port}"), Duration::from_secs(20), || {
        if proxy_exited(proxy) {
            panic!("the proxy exited: {}", proxy.log_text());
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

fn proxy_exited(p: &Proc) -> bool {
    !alive(p.pid())
}

fn cli(ctl: &Controller, url: &str, pin: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(WISP);
    cmd.args(args).args(["--url", url, "--data"]).arg(ctl.data.path());
    if let Some(fp) = pin {
        cmd.env("WISP_INSTANCE_IDENTITY", fp);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_through(kind: &str) {
    need(kind);
    let dir = TempDir::new(&format!("proxy-{kind}"));
    let behind_tls_proxy = Controller::start(); // --no-tls: the proxy ends TLS
    let behind_plain_proxy = Controller::start_tls(&[]);
    let (cert, key, both, proxy_fp) = proxy_identity(dir.path());
    let (tls_port, plain_port) = (free_port(), free_port());
    let file = if kind == "nginx" { "nginx.conf" } else { "haproxy.cfg" };
    let template =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proxy").join(file))
            .unwrap();
    let conf = template
        .replace("@PREFIX@", dir.path().to_str().unwrap())
        .replace("@TLS_PORT@", &tls_port.to_string())
        .replace("@PLAIN_PORT@", &plain_port.to_string())
        .replace("@CERT@", &cert)
        .replace("@KEY@", &key)
        .replace("@CERT_AND_KEY@", &both)
        .replace("@PLAIN_UPSTREAM@", &behind_tls_proxy.http)
        .replace("@TLS_UPSTREAM@", &behind_plain_proxy.http)
        .replace("@UPSTREAM_CA@", behind_plain_proxy.data.path().join("tls/cert.pem").to_str().unwrap())
        // The prefixed server block (tests/web.rs runs the page through it) is not used here.
        .replace("@PREFIX_PORT@", &free_port().to_string())
        .replace("@PREFIX_UPSTREAM@", &behind_tls_proxy.http);
    let left = conf.lines().filter(|l| !l.trim_start().starts_with('#')).any(|l| l.contains('@'));
    assert!(!left, "a placeholder is left in {file}");
    let conf_path = dir.path().join(file);
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = Command::new(kind);
    if kind == "nginx" {
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off; master_process off;"]);
    } else {
        cmd.arg("-f").arg(&conf_path).arg("-db");
    }
    let proxy = spawn_logged(cmd, dir.path(), kind);
    wait_port(tls_port, &proxy);
    wait_port(plain_port, &proxy);

    // 1. wss:// to the proxy, which ends TLS; the agent pins the proxy's certificate.
    let tls_url = format!("https://127.0.0.1:{tls_port}/");
    let (code, out, err) =
        cli(&behind_tls_proxy, &tls_url, Some(&proxy_fp), &["node", "add", "a1", "--labels", "px"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("--url {tls_url}")), "node add through the proxy: {out}");
    assert!(!out.contains("--instance-identity"), "the controller's pin is wrong behind a proxy: {out}");
    let secret = out.lines().find_map(|l| l.strip_prefix("secret: ")).unwrap().to_string();
    let mut agent = Command::new(AGENT);
    agent
        .args(["--url", &tls_url, "--name", "a1", "--secret", &secret, "--websocket"])
        .args(["--instance-identity", &proxy_fp, "--work-dir"])
        .arg(dir.path().join("a1"));
    let _a1 = spawn_logged(agent, dir.path(), "a1");
    behind_tls_proxy.wait_online("a1");
    let f = dir.path().join("p.yaml");
    std::fs::write(&f, PIPELINE).unwrap();
    let (code, out, err) =
        cli(&behind_tls_proxy, &tls_url, Some(&proxy_fp), &["run", f.to_str().unwrap(), "--follow"]);
    assert_eq!(code, 0, "run --follow through {kind} (TLS at the proxy): {out}{err}");
    for i in 1..=3 {
        assert!(out.contains(&format!("line {i} via proxy")), "{out}");
    }

    // 2. ws:// to the proxy, TLS from the proxy to the controller.
    let plain_url = format!("http://127.0.0.1:{plain_port}/");
    let secret = behind_plain_proxy.add_node("a2", "px", &[]);
    let mut agent = Command::new(AGENT);
    agent
        .args(["--url", &plain_url, "--name", "a2", "--secret", &secret, "--websocket", "--work-dir"])
        .arg(dir.path().join("a2"));
    let _a2 = spawn_logged(agent, dir.path(), "a2");
    behind_plain_proxy.wait_online("a2");
    let (code, out, err) =
        cli(&behind_plain_proxy, &plain_url, None, &["run", f.to_str().unwrap(), "--follow"]);
    assert_eq!(code, 0, "run --follow through {kind} (TLS behind the proxy): {out}{err}");
    assert!(out.contains("line 3 via proxy"), "{out}");
}

#[test]
fn nginx_proxies_agents_and_the_cli_with_tls_at_either_end() {
    run_through("nginx");
}

#[test]
fn haproxy_proxies_agents_and_the_cli_with_tls_at_either_end() {
    run_through("haproxy");
}
