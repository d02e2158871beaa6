//! A real Chromium driven over WebDriver: Debian's `chromium` and `chromedriver`, started here
//! (headless, a fresh profile, the networking flags that keep it off hosts this machine cannot
//! reach), spoken to with plain HTTP and JSON. Screenshots go to `target/web-screenshots/`.

#![allow(dead_code)]

use super::{free_port, wait_for, TempDir};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Skip (with a note) unless Chromium and its driver are installed: scripts/test.sh installs them.
pub fn require_chromium() {
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: install Debian's chromium and chromium-driver (scripts/test.sh does)"
        );
    }
}

/// One browser: its driver process and session.
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
    _profile: TempDir,
}

impl Browser {
    pub fn start() -> Self {
        require_chromium();
        let port = free_port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr = format!("127.0.0.1:{port}");
        wait_for("chromedriver to listen", Duration::from_secs(20), || {
            http11(&addr, "GET", "/status", b"").ok().filter(|(s, _)| *s == 200)
        });
        let profile = TempDir::new("chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let mut b = Self { driver, addr, session: String::new(), _profile: profile };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().expect("a session id").to_string();
        b
    }

    /// One WebDriver command; its `value`. Panics on a WebDriver error, naming it.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, out) = http11(&self.addr, method, path, body.as_bytes())
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        if status != 200 {
            panic!("webdriver {method} {path} answered {status}: {v}");
        }
        v["value"].clone()
    }

    /// Like [`call`], but a WebDriver error is an `Err` (an element not there yet).
    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, out) = http11(&self.addr, method, path, body.as_bytes()).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out).map_err(|e| e.to_string())?;
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(v["value"]["message"].as_str().unwrap_or("error").to_string())
        }
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.call("GET", &self.s("/url"), None).as_str().unwrap_or_default().to_string()
    }

    /// The element `css` selects, waiting up to 20 s for it.
    pub fn find(&self, css: &str) -> String {
        wait_for(&format!("element {css}"), Duration::from_secs(20), || self.try_find(css))
    }

    pub fn try_find(&self, css: &str) -> Option<String> {
        let v = self
            .try_call("POST", &self.s("/element"), Some(json!({"using": "css selector", "value": css})))
            .ok()?;
        v[ELEMENT].as_str().map(str::to_string)
    }

    /// Click the element `css` selects (found again if the page's refresh replaced it).
    pub fn click(&self, css: &str) {
        let mut last = String::new();
        for _ in 0..10 {
            let e = self.find(css);
            match self.try_call("POST", &self.s(&format!("/element/{e}/click")), Some(json!({}))) {
                Ok(_) => return,
                Err(m) if m.contains("stale") => last = m,
                Err(m) => panic!("click on {css}: {m}"),
            }
        }
        panic!("click on {css}: the element kept going stale: {last}");
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call("POST", &self.s(&format!("/element/{e}/clear")), Some(json!({})));
        self.call("POST", &self.s(&format!("/element/{e}/value")), Some(json!({ "text": text })));
    }

    /// The visible text of the element `css` selects ("" when there is none).
    pub fn text(&self, css: &str) -> String {
        match self.try_find(css) {
            Some(e) => self
                .try_call("GET", &self.s(&format!("/element/{e}/text")), None)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            None => String::new(),
        }
    }

    /// Run `script` (a function body) in the page; what it returns.
    pub fn js(&self, script: &str) -> Value {
        self.call("POST", &self.s("/execute/sync"), Some(json!({ "script": script, "args": [] })))
    }

    /// Wait until the text of `css` satisfies `f`; that text.
    pub fn wait_text(&self, css: &str, limit: Duration, f: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let t = self.text(css);
            if f(&t) {
                return t;
            }
            if started.elapsed() > limit {
                panic!("the text of {css} did not become what was awaited within {limit:?}; it is: {t:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until `script`'s string result satisfies `f` (20 s).
    pub fn wait_js_value(&self, script: &str, f: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let v = self.js(script);
            let v = v.as_str().unwrap_or_default().to_string();
            if f(&v) {
                return v;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{script} gave {v:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Save a screenshot as `target/web-screenshots/NAME.png`; its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.call("GET", &self.s("/screenshot"), None);
        let png = base64_decode(v.as_str().expect("a base64 screenshot"));
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/web-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.try_call("DELETE", &self.s(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One HTTP/1.1 request with a JSON body (chromedriver refuses HTTP/1.0); status and body.
fn http11(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    // Read the head, then the body by its length (chromedriver keeps the connection open).
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let mut resp = Vec::new();
    let mut buf = [0u8; 16384];
    let split = loop {
        if let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(bad());
        }
        resp.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&resp[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let mut body = resp[split + 4..].to_vec();
    match len {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            s.read_to_end(&mut body)?;
            if head.contains("transfer-encoding: chunked") {
                body = dechunk(&body);
            }
        }
    }
    Ok((status, body))
}

/// A chunked body, joined.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[(i + 4 + n).min(b.len())..];
    }
    out
}

/// Standard base64 (what WebDriver's screenshots are in) to bytes.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
