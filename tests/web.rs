//! The web page in a real Chromium (Debian's `chromium` and `chromedriver`, see
//! common/browser.rs) against a real controller and agents: log in, a node coming online
//! without a reload, a build's log growing line by line, cancel, hostile names and log lines
//! rendered as text, the submit form's errors. Each test saves a screenshot under
//! `target/web-screenshots/`. The access rules (cookie, CSRF, headers) are checked over plain
//! HTTP as well, where a browser would hide them.

mod common;

use common::browser::Browser;
use common::{expected_version, try_http, Controller, TempDir};
use std::time::{Duration, Instant};

/// Log `b` in to `c` through the login form; lands on the overview.
fn log_in(b: &Browser, c: &Controller) {
    b.goto(&c.url());
    b.find("#token");
    assert!(b.url().contains("/login"), "a visitor is sent to the login page: {}", b.url());
    b.type_into("#token", &c.token());
    b.click("#login");
    b.find("#online");
}

#[test]
fn log_in_and_see_a_node_come_online_without_a_reload() {
    let c = Controller::start_with(&["--ping-interval", "1"]);
    let b = Browser::start();
    // A wrong token is refused with a sentence, on the login page.
    b.goto(&c.url());
    b.type_into("#token", "not-the-token");
    b.click("#login");
    b.wait_text("#error", Duration::from_secs(10), |t| t.contains("not this controller's API token"));
    log_in(&b, &c);
    assert_eq!(b.text("#online"), "0\nonline");

    let secret = c.add_node("web1", "linux", &[]);
    b.goto(&format!("{}nodes", c.url()));
    b.find("tr[data-node=web1]");
    assert!(b.text("tr[data-node=web1]").contains("never connected"), "{}", b.text("tr[data-node=web1]"));
    let marker = b.js("window.wispMarker = 42; return 1;");
    assert_eq!(marker, 1);
    let work = TempDir::new("web-agent");
    let _agent = c.agent("web1", &secret, true, work.path());
    b.wait_text("tr[data-node=web1]", Duration::from_secs(20), |t| t.contains("online"));
    // Its link's round trip shows once a ping was answered, and the transport.
    let row = b.wait_text("tr[data-node=web1]", Duration::from_secs(20), |t| t.contains(" ms"));
    assert!(row.contains("WebSocket"), "{row}");
    // Still the same page: nothing reloaded it.
    assert_eq!(b.js("return window.wispMarker || 0;"), 42);
    b.screenshot("nodes");

    // The node page: the agent command with its secret only when asked for.
    b.click("tr[data-node=web1] a");
    b.find("#show");
    assert!(!b.js("return document.body.innerText;").as_str().unwrap().contains(&secret));
    b.click("#show");
    b.wait_text("#command", Duration::from_secs(10), |t| t.contains(&secret));
    let agent = b.text("#agent");
    let want =
        format!("wisp-agent {} ({}, {})", expected_version(), std::env::consts::ARCH, std::env::consts::OS);
    assert_eq!(agent, want, "what the agent said it is");
    b.screenshot("node");
    b.goto(&c.url());
    b.wait_text("#online", Duration::from_secs(10), |t| t.starts_with('1'));
}

#[test]
fn a_submitted_build_streams_its_log_line_by_line_and_cancel_ends_it() {
    let c = Controller::start();
    let secret = c.add_node("w2", "linux", &[]);
    let work = TempDir::new("web-agent2");
    let _agent = c.agent("w2", &secret, true, work.path());
    c.wait_online("w2");
    let b = Browser::start();
    log_in(&b, &c);

    b.goto(&format!("{}submit", c.url()));
    let yaml = "name: slow\nagent: {label: linux}\nsteps:\n  - sh: 'i=0; while true; do i=$((i+1)); echo line $i; sleep 0.3; done'\n";
    b.type_into("#yaml", yaml);
    b.click("#run");
    b.find("#log");
    assert!(b.url().contains("/builds/"), "the form lands on the build page: {}", b.url());
    // The log grows while the page stays: line 2 first, later line 6, with no reload.
    b.js("window.wispMarker = 7; return 1;");
    let first = b.wait_text("#log", Duration::from_secs(30), |t| t.contains("line 2"));
    assert!(!first.contains("line 9"), "{first}");
    let t0 = Instant::now();
    b.wait_text("#log", Duration::from_secs(30), |t| t.contains("line 6"));
    assert!(t0.elapsed() > Duration::from_millis(500), "lines arrive as they are written");
    assert_eq!(b.js("return window.wispMarker || 0;"), 7);
    b.wait_text("#state", Duration::from_secs(5), |t| t == "running");
    b.screenshot("build");
    // The view follows the end; a reader who scrolls up stays where they are while lines come.
    let at_end = "const l = document.getElementById('log'); return l.scrollTop + l.clientHeight >= l.scrollHeight - 4;";
    b.js("const l = document.getElementById('log'); l.style.height = '5em'; return 1;");
    b.wait_text("#log", Duration::from_secs(10), |t| t.contains("line 9"));
    wait_js(&b, at_end, true);
    b.js("const l = document.getElementById('log'); l.scrollTop = 0; l.dispatchEvent(new Event('scroll')); return 1;");
    b.wait_text("#log", Duration::from_secs(10), |t| t.contains("line 12"));
    assert_eq!(b.js("return document.getElementById('log').scrollTop;"), 0, "left where the reader put it");

    // The overview lists it as running, on its node; another build waits in the queue, saying why.
    let build_page = b.url();
    let waiting = c.submit("name: waits\nagent: {label: windows}\nsteps: [{sh: 'true'}]\n");
    b.goto(&c.url());
    let running = b.wait_text("#running", Duration::from_secs(10), |t| t.contains("slow"));
    assert!(running.contains("w2"), "{running}");
    let queue = b.wait_text("#queue", Duration::from_secs(10), |t| t.contains(&format!("#{waiting}")));
    assert!(queue.contains("windows"), "why it waits: {queue}");
    b.screenshot("overview");
    b.goto(&build_page);
    b.click("#cancel");
    b.wait_text("#state", Duration::from_secs(20), |t| t == "aborted");
    b.wait_text("#logstatus", Duration::from_secs(20), |t| t == "log complete");
    assert!(b.text("#log").contains("ABORTED"), "{}", b.text("#log"));
}

#[test]
fn hostile_names_and_log_lines_render_as_text_and_colours_as_colours() {
    let c = Controller::start();
    let secret = c.add_node("w3", "linux", &[]);
    let work = TempDir::new("web-agent3");
    let _agent = c.agent("w3", &secret, true, work.path());
    c.wait_online("w3");
    // Pipeline and node names are restricted to safe characters; a step's command is not, and
    // it is the step's name on the page.
    let name = "echo '<img src=x onerror=document.body.dataset.pwned=1>' && false";
    let yaml = format!(
        "name: hostile\nagent: {{label: linux}}\nsteps:\n  - sh: |\n      echo '<script>document.body.dataset.pwned=2</script>'\n      printf 'plain \\033[31mred\\033[0m plain\\n'\n  - sh: \"{name}\"\n"
    );
    let id = c.submit(&yaml);
    c.wait_build_state(id, Duration::from_secs(30));
    let b = Browser::start();
    log_in(&b, &c);
    b.goto(&format!("{}builds/{id}", c.url()));
    b.wait_text("#logstatus", Duration::from_secs(20), |t| t == "log complete");
    let log = b.text("#log");
    assert!(log.contains("<script>document.body.dataset.pwned=2</script>"), "shown as text: {log}");
    let img = "<img src=x onerror=document.body.dataset.pwned=1>";
    assert!(b.text("#steps").contains(img), "the step's name as text: {}", b.text("#steps"));
    assert!(b.text("#message").contains("<img"), "the failure's message as text: {}", b.text("#message"));
    assert_eq!(b.js("return document.querySelectorAll('img, main script, #log script').length;"), 0);
    assert_eq!(b.js("return document.querySelector('#log span.f1').textContent;"), "red");
    // Two refreshes of the live part later (each swaps in a new #live), still nothing ran.
    for _ in 0..2 {
        b.js("document.getElementById('live').dataset.old = '1'; return 1;");
        wait_js(&b, "return !document.getElementById('live').dataset.old;", true);
    }
    assert_eq!(b.js("return document.body.dataset.pwned || 'no';"), "no");
    b.screenshot("hostile");
}

#[test]
fn the_submit_form_shows_the_pipelines_error_with_line_and_column() {
    let c = Controller::start();
    let b = Browser::start();
    log_in(&b, &c);
    b.goto(&format!("{}submit", c.url()));
    b.type_into("#yaml", "name: bad\nsteps:\n  - sh: [unclosed\n");
    b.click("#run");
    let e = b.wait_text("#error", Duration::from_secs(10), |t| !t.is_empty());
    assert!(e.contains("line "), "{e}");
    assert!(e.contains("column"), "{e}");
    // What was typed is kept for fixing.
    assert!(b.js("return document.getElementById('yaml').value;").as_str().unwrap().contains("unclosed"));
    b.screenshot("submit-error");
}

/// The rules a browser enforces but hides: the cookie's attributes, CSRF on every form, the
/// security headers on every page, and no page without a session.
#[test]
fn sessions_are_http_only_same_site_strict_and_forms_need_their_csrf_token() {
    let c = Controller::start();
    let addr = c.http.clone();
    let (status, _) = try_http(&addr, "GET", "/nodes", &[], b"").unwrap();
    assert_eq!(status, 303, "no session: sent to log in");
    let raw = raw_http(&addr, "POST", "/login", "", &format!("token={}&next=%2Fnodes", c.token()));
    let cookie_line =
        raw.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).expect("a cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie_line.contains(attr), "{cookie_line}");
    }
    assert!(raw.contains("location: /nodes"), "back where the visitor was going: {raw}");
    let session = cookie_line.split_once("wisp_session=").unwrap().1.split(';').next().unwrap().to_string();
    let cookie = format!("wisp_session={session}");
    let page = raw_http(&addr, "GET", "/", &cookie, "");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for h in ["content-security-policy: default-src 'none'; script-src 'self'", "x-frame-options: DENY"] {
        assert!(page.to_ascii_lowercase().contains(&h.to_ascii_lowercase()), "{h}");
    }
    // A form without the token, or with another session's, changes nothing.
    let id = c.submit("name: x\nagent: {label: nowhere}\nsteps: [{sh: 'true'}]\n");
    let refused = raw_http(&addr, "POST", &format!("/builds/{id}/cancel"), &cookie, "csrf=0000");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("CSRF token does not match"), "{refused}");
    let auth = format!("Bearer {}", c.token());
    let (_, body) =
        try_http(&addr, "GET", &format!("/api/builds/{id}"), &[("Authorization", &auth)], b"").unwrap();
    assert!(
        String::from_utf8_lossy(&body).contains("\"queued\""),
        "still queued: {}",
        String::from_utf8_lossy(&body)
    );
    // An open redirect through `next` is not possible.
    let evil =
        raw_http(&addr, "POST", "/login", "", &format!("token={}&next=%2F%2Fevil.example%2F", c.token()));
    assert!(evil.contains("location: /\r\n"), "{evil}");
    // Log out ends the session.
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let out = raw_http(&addr, "POST", "/logout", &cookie, &format!("csrf={csrf}"));
    assert!(out.starts_with("HTTP/1.1 303"), "{out}");
    let after = raw_http(&addr, "GET", "/", &cookie, "");
    assert!(after.starts_with("HTTP/1.1 303"), "the session is over: {after}");
}

/// Wait until `script` returns `want` (10 s).
fn wait_js(b: &Browser, script: &str, want: bool) {
    let t0 = Instant::now();
    while b.js(script) != want {
        assert!(t0.elapsed() < Duration::from_secs(10), "{script} did not become {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One HTTP/1.1 request with `cookie` and a form `body`; the whole raw answer.
fn raw_http(addr: &str, method: &str, path: &str, cookie: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let cookie = if cookie.is_empty() { String::new() } else { format!("Cookie: {cookie}\r\n") };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{cookie}Content-Type: \
         application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The page, an agent and the CLI through the real nginx of `examples/proxy/nginx.conf`, with
/// the controller under `/ci` on a shared host (`--prefix /ci`).
#[test]
fn the_page_works_through_nginx_under_a_path_prefix() {
    use common::{free_port, spawn_logged, wait_for};
    use std::path::Path;
    use std::process::Command;
    let c = Controller::start_with(&["--prefix", "/ci"]);
    let dir = TempDir::new("web-nginx");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let conf =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proxy/nginx.conf"))
            .unwrap()
            .replace("@PREFIX@", &s(dir.path()))
            .replace("@TLS_PORT@", &free_port().to_string())
            .replace("@PLAIN_PORT@", &free_port().to_string())
            .replace("@CERT@", &s(&cert))
            .replace("@KEY@", &s(&key))
            .replace("@PLAIN_UPSTREAM@", &c.http)
            .replace("@TLS_UPSTREAM@", &c.http)
            .replace("@UPSTREAM_CA@", &s(&cert))
            .replace("@PREFIX_PORT@", &port.to_string())
            .replace("@PREFIX_UPSTREAM@", &c.http);
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path).args(["-g", "daemon off; master_process off;"]);
    let _nginx = spawn_logged(cmd, dir.path(), "nginx");
    wait_for("nginx", Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    let base = format!("http://127.0.0.1:{port}/ci/");

    // Outside the prefix the controller says where it is.
    let (status, body) = try_http(&c.http, "GET", "/nodes", &[], b"").unwrap();
    assert_eq!(status, 404);
    assert!(
        String::from_utf8_lossy(&body).contains("serves under /ci/"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // An agent through the proxy and the prefix.
    let secret = c.add_node("px1", "linux", &[]);
    let work = TempDir::new("web-nginx-agent");
    let mut agent = Command::new(common::AGENT);
    agent
        .args(["--url", &base, "--name", "px1", "--secret", &secret, "--websocket", "--work-dir"])
        .arg(work.path());
    let _agent = spawn_logged(agent, work.path(), "px1");
    c.wait_online("px1");

    let b = Browser::start();
    b.goto(&base);
    b.find("#token");
    assert!(b.url().starts_with(&format!("{base}login")), "{}", b.url());
    b.type_into("#token", &c.token());
    b.click("#login");
    b.wait_text("#online", Duration::from_secs(10), |t| t.starts_with('1'));
    assert!(b.url().starts_with(&base), "{}", b.url());
    b.goto(&format!("{base}submit"));
    b.type_into("#yaml", "name: via-nginx\nagent: {label: linux}\nsteps:\n  - sh: 'for i in 1 2 3; do echo tick $i; sleep 0.5; done'\n");
    b.click("#run");
    b.wait_text("#log", Duration::from_secs(30), |t| t.contains("tick 3") && t.contains("SUCCESS"));
    assert!(b.url().starts_with(&format!("{base}builds/")), "{}", b.url());
    b.wait_text("#state", Duration::from_secs(10), |t| t == "success");
    b.screenshot("prefix-nginx");
}

/// A log larger than the page's tail shows its last part first, with the link to the whole raw
/// log; rebuild starts the same pipeline again; remove takes the node away.
#[test]
fn a_large_log_shows_its_end_first_rebuild_runs_it_again_and_remove_takes_the_node() {
    let c = Controller::start();
    let secret = c.add_node("w5", "linux", &[]);
    let work = TempDir::new("web-agent5");
    let _agent = c.agent("w5", &secret, true, work.path());
    c.wait_online("w5");
    // About 1 MiB of numbered lines: more than the 256 KiB the page starts with.
    let id = c.submit("name: big\nagent: {label: linux}\nsteps: [{sh: 'seq -w 1 150000'}]\n");
    c.wait_build_state(id, Duration::from_secs(60));
    let b = Browser::start();
    log_in(&b, &c);
    b.goto(&format!("{}builds/{id}", c.url()));
    b.wait_text("#logstatus", Duration::from_secs(30), |t| t == "log complete");
    let took = b.js("return document.querySelector('#steps tr:nth-child(2) td:nth-child(7)').textContent;");
    assert!(took.as_str().unwrap().ends_with(" s"), "the step's duration: {took}");
    let skipped = b.text("#logskipped");
    assert!(skipped.contains("bytes are not shown here"), "{skipped}");
    let log = b.js("return document.getElementById('log').textContent;").as_str().unwrap().to_string();
    assert!(log.contains("150000\n") && log.contains("SUCCESS"), "the end is shown");
    assert!(!log.contains("\n000001\n") && log.len() < 400_000, "the start is not: {} bytes", log.len());
    let raw = b.js("return document.querySelector('#logskipped a').getAttribute('href');");
    assert_eq!(raw.as_str().unwrap(), format!("/builds/{id}/log/raw"));
    let (status, body) = try_http(
        &c.http,
        "GET",
        &format!("/api/builds/{id}/log"),
        &[("Authorization", &format!("Bearer {}", c.token()))],
        b"",
    )
    .unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\n000001\n"), "the raw log has it all");

    b.click("#rebuild");
    b.wait_text("h1", Duration::from_secs(20), |t| t.contains(&format!("#{}", id + 1)));
    assert!(b.text("h1").contains("big"));
    b.wait_text("#state", Duration::from_secs(60), |t| t == "success");

    // The overview's recent builds: result, duration and node.
    b.goto(&c.url());
    let recent = b.wait_text("#recent", Duration::from_secs(10), |t| t.matches("big").count() == 2);
    assert!(recent.contains("success") && recent.contains("w5") && recent.contains(" s"), "{recent}");
    b.goto(&format!("{}nodes/w5", c.url()));
    b.click("#remove");
    b.wait_text("main", Duration::from_secs(20), |t| t.contains("No nodes yet"));
    assert!(c.node_line("w5").is_none(), "the node is gone");
}

/// The page through the real haproxy of `examples/proxy/haproxy.cfg`: plain HTTP to the proxy,
/// TLS from it to the controller; an agent through the proxy too; the pipeline uploaded from a
/// file into the submit form.
#[test]
fn the_page_works_through_haproxy_and_a_pipeline_can_be_uploaded() {
    use common::{free_port, spawn_logged, wait_for};
    use std::path::Path;
    use std::process::Command;
    let c = Controller::start_tls(&[]);
    let dir = TempDir::new("web-haproxy");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let both = dir.path().join("both.pem");
    std::fs::write(&both, format!("{}{}", ck.cert.pem(), ck.signing_key.serialize_pem())).unwrap();
    let port = free_port();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let conf =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proxy/haproxy.cfg"))
            .unwrap()
            .replace("@TLS_PORT@", &free_port().to_string())
            .replace("@CERT_AND_KEY@", &s(&both))
            .replace("@PLAIN_UPSTREAM@", &c.http)
            .replace("@PLAIN_PORT@", &port.to_string())
            .replace("@TLS_UPSTREAM@", &c.http)
            .replace("@UPSTREAM_CA@", &s(&c.data.path().join("tls/cert.pem")));
    let conf_path = dir.path().join("haproxy.cfg");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.arg("-f").arg(&conf_path).arg("-db");
    let _haproxy = spawn_logged(cmd, dir.path(), "haproxy");
    wait_for("haproxy", Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    let base = format!("http://127.0.0.1:{port}/");

    let secret = c.add_node("hx1", "linux", &[]);
    let work = TempDir::new("web-haproxy-agent");
    let mut agent = Command::new(common::AGENT);
    agent
        .args(["--url", &base, "--name", "hx1", "--secret", &secret, "--websocket", "--work-dir"])
        .arg(work.path());
    let _agent = spawn_logged(agent, work.path(), "hx1");
    c.wait_online("hx1");

    let b = Browser::start();
    b.goto(&base);
    b.type_into("#token", &c.token());
    b.click("#login");
    b.wait_text("#online", Duration::from_secs(10), |t| t.starts_with('1'));
    b.goto(&format!("{base}submit"));
    let file = dir.path().join("upload.yaml");
    std::fs::write(
        &file,
        "name: uploaded\nagent: {label: linux}\nsteps:\n  - sh: 'echo from the uploaded file'\n",
    )
    .unwrap();
    b.type_into("#file", file.to_str().unwrap());
    b.wait_js_value("return document.getElementById('yaml').value;", |v| v.contains("uploaded"));
    b.click("#run");
    b.wait_text("#log", Duration::from_secs(30), |t| {
        t.contains("from the uploaded file") && t.contains("SUCCESS")
    });
    assert!(b.text("h1").contains("uploaded"), "{}", b.text("h1"));
    b.screenshot("haproxy");
}

/// A build of stages on two agents shows each step's stage and node, and its artifacts with
/// their SHA-256, downloadable from the page (through the session, as an attachment).
#[test]
fn the_build_page_shows_stages_nodes_and_artifacts() {
    let c = Controller::start();
    let work = TempDir::new("web-art");
    let mut agents = Vec::new();
    for (name, label) in [("wa", "one"), ("wb", "two")] {
        let secret = c.add_node(name, label, &[]);
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        agents.push(c.agent(name, &secret, true, &dir));
        c.wait_online(name);
    }
    let id = c.submit(
        "name: art\nstages:\n  - name: make\n    agent: {label: one}\n    steps: [{sh: 'mkdir -p dist; echo payload > dist/out.txt'}]\n    archive: [\"dist/*.txt\"]\n  - name: check\n    agent: {label: two}\n    steps: [{sh: 'echo checked'}]\n",
    );
    let done = c.wait_build_state(id, Duration::from_secs(60));
    assert_eq!(done["state"], "success", "{done}");
    let b = Browser::start();
    log_in(&b, &c);
    b.goto(&format!("{}builds/{id}", c.url()));
    b.find("#artifacts");
    let rows = b.text("#steps");
    assert!(
        rows.contains("make") && rows.contains("wa") && rows.contains("check") && rows.contains("wb"),
        "{rows}"
    );
    let arts = b.text("#artifacts");
    let sum = common::sha256(b"payload\n");
    assert!(arts.contains("dist/out.txt") && arts.contains(&sum), "{arts}");
    let got = b.js(
        "const a = document.querySelector('#artifacts a'); return fetch(a.href).then(r => r.text().then(t => [r.headers.get('content-disposition'), t]));",
    );
    assert_eq!(got[0], "attachment; filename=\"out.txt\"", "{got}");
    assert_eq!(got[1], "payload\n", "{got}");
    b.screenshot("artifacts");
}
