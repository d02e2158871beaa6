#!/usr/bin/env python3
"""The web page's live log against a step writing 50 MiB/s: a real Chromium (Debian's, over
WebDriver) shows the build page while the step writes; its memory is sampled every second (the
renderer processes' RSS from /proc, the page's JS heap, the log's DOM nodes), and how long after
the step's end the page shows the build's last line. Driven by scripts/bench-web.sh.

  bench-web-log.py WISP AGENT [MIB_PER_S [SECONDS]]
"""
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

WISP, AGENT = sys.argv[1], sys.argv[2]
RATE = int(sys.argv[3]) if len(sys.argv) > 3 else 50
SECS = int(sys.argv[4]) if len(sys.argv) > 4 else 20
work = tempfile.mkdtemp(prefix="wisp-bench-web-log.")
data = os.path.join(work, "data")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Driver:
    """The few WebDriver commands this needs."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(["/usr/bin/chromedriver", f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                self.call("GET", "/status")
                break
            except OSError:
                time.sleep(0.05)
        profile = os.path.join(work, "chromium")
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--enable-precise-memory-info", "--window-size=1280,900",
                     f"--user-data-dir={profile}"]}}}}
        self.sid = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        v = json.loads(r.read() or b"{}")
        if r.status != 200:
            raise RuntimeError(f"webdriver {method} {path}: {v}")
        return v.get("value")

    def s(self, rest):
        return f"/session/{self.sid}{rest}"

    def goto(self, url):
        self.call("POST", self.s("/url"), {"url": url})

    def el(self, css):
        for _ in range(200):
            try:
                v = self.call("POST", self.s("/element"), {"using": "css selector", "value": css})
                return list(v.values())[0]
            except RuntimeError:
                time.sleep(0.05)
        sys.exit(f"no element {css}")

    def js(self, script):
        return self.call("POST", self.s("/execute/sync"), {"script": script, "args": []})

    def quit(self):
        try:
            self.call("DELETE", self.s(""))
        except Exception:
            pass
        self.proc.kill()


def renderer_rss_kib():
    """RSS of Chromium's renderer processes, summed."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"chromium" not in cmd or b"--type=renderer" not in cmd:
                continue
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


ctl = subprocess.Popen([WISP, "serve", "--data", data, "--http-port", "0", "--agent-port", "0", "--bind", "127.0.0.1",
                        "--no-tls"], stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "controller.log"), "w"))
for _ in range(300):
    if os.path.exists(os.path.join(data, "listening")):
        break
    time.sleep(0.05)
url = [l.split()[1] for l in open(os.path.join(data, "listening")) if l.startswith("url ")][0]
out = subprocess.run([WISP, "node", "add", "log1", "--labels", "log", "--data", data], capture_output=True, text=True,
                     check=True).stdout
secret = [l.split()[1] for l in out.splitlines() if l.startswith("secret:")][0]
os.makedirs(os.path.join(work, "agent"))
agent = subprocess.Popen([AGENT, "--url", url, "--name", "log1", "--secret", secret, "--websocket", "--work-dir",
                          os.path.join(work, "agent")], stderr=subprocess.DEVNULL)
for _ in range(200):
    if "\tonline\t" in subprocess.run([WISP, "nodes", "--data", data], capture_output=True, text=True).stdout:
        break
    time.sleep(0.05)

# The step: lines of 100 bytes at RATE MiB/s for SECS seconds (python pacing itself).
writer = os.path.join(work, "w.py")
open(writer, "w").write(f"""import sys, time
chunk = (b"x" * 99 + b"\\n") * 10486
t0 = time.time()
n = 0
while time.time() - t0 < {SECS}:
    sys.stdout.buffer.write(chunk)
    n += 1
    ahead = n * len(chunk) / ({RATE} * 1048576) - (time.time() - t0)
    if ahead > 0:
        time.sleep(ahead)
sys.stdout.flush()
""")
pipeline = os.path.join(work, "p.yaml")
open(pipeline, "w").write(f"name: loud\nagent: {{label: log}}\nsteps:\n  - sh: python3 {writer}\n")

d = Driver()
token = open(os.path.join(data, "token")).read().strip()
d.goto(url)
d.call("POST", d.s(f"/element/{d.el('#token')}/value"), {"text": token})
d.call("POST", d.s(f"/element/{d.el('#login')}/click"), {})
d.el("#online")
base_rss = renderer_rss_kib() / 1024
out = subprocess.run([WISP, "run", pipeline, "--data", data], capture_output=True, text=True, check=True).stdout
bid = out.strip().splitlines()[0].strip()
d.goto(f"{url}builds/{bid}")
d.el("#log")
samples = []
ended_at = None
t0 = time.time()
while time.time() - t0 < SECS + 120:
    mem = d.js("return [performance.memory ? performance.memory.usedJSHeapSize : 0, "
               "document.getElementById('log').childNodes.length, "
               "(document.getElementById('logstatus') || {}).textContent || '', "
               "document.getElementById('log').textContent.length];")
    samples.append((time.time() - t0, renderer_rss_kib(), mem[0], mem[1], mem[3]))
    if ended_at is None:
        info = subprocess.run([WISP, "builds", "--data", data], capture_output=True, text=True).stdout
        if any(l.split("\t")[0].lstrip("#") == bid and "success" in l for l in info.splitlines()):
            ended_at = time.time()
    if mem[2] == "log complete":
        shown_at = time.time()
        break
    time.sleep(1)
else:
    shown_at = None
stored = sum(os.path.getsize(os.path.join(data, "builds", bid, f)) for f in os.listdir(os.path.join(data, "builds", bid)))
d.quit()
agent.kill()
ctl.send_signal(signal.SIGTERM)
ctl.wait()
shutil.rmtree(work, ignore_errors=True)

peak_rss = max(s[1] for s in samples) / 1024
peak_heap = max(s[2] for s in samples) / 1048576
peak_nodes = max(s[3] for s in samples)
peak_text = max(s[4] for s in samples) / 1048576
lag = f"{shown_at - ended_at:.1f} s" if shown_at and ended_at else "did not finish within the run"
# The renderer's RSS over the run, to see whether it levels off: the peak in each quarter.
q = max(1, len(samples) // 4)
quarters = [max(x[1] for x in samples[i:i + q]) / 1024 for i in range(0, len(samples), q)][:4]
print(f"A step writing {RATE} MiB/s of 100-byte lines for {SECS} s ({stored / 1048576:.0f} MiB stored), its build page "
      f"open in Chromium from the start: the page's renderer peaked at **{peak_rss:.0f} MiB RSS** ({base_rss:.0f} MiB "
      f"on the overview before; JS heap "
      f"{peak_heap:.0f} MiB; the log view, which keeps the last 20,000 lines, held at most {peak_nodes:,} blocks "
      f"and {peak_text:.1f} MiB of text), sampled every second (peak per quarter of the run: "
      f"{', '.join(f'{x:.0f}' for x in quarters)} MiB); the page showed the log complete {lag} after the build ended.")
