#!/usr/bin/env python3
"""The web page's server side with a big store: 10,000 nodes and 100,000 finished builds put into
a controller's store, then the pages timed as a logged-in browser asks for them, and the bytes of
a first page load. Driven by scripts/bench-web.sh, which builds the release controller.

  bench-web.py WISP AGENT LOADGEN [NODES [BUILDS]]

Then dispatch latency with and without a /metrics scrape every 100 ms: 50 real agents over TCP,
`examples/loadgen.rs dispatch` submitting builds one at a time, runs alternating between the two.
"""
import http.client
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import threading

WISP, AGENT, LOADGEN = sys.argv[1], sys.argv[2], sys.argv[3]
NODES = int(sys.argv[4]) if len(sys.argv) > 4 else 10000
BUILDS = int(sys.argv[5]) if len(sys.argv) > 5 else 100000
RUNS = 30
work = tempfile.mkdtemp(prefix="wisp-bench-web.")
data = os.path.join(work, "data")


def start(data=data):
    p = subprocess.Popen([WISP, "serve", "--data", data, "--http-port", "0", "--agent-port", "0",
                          "--bind", "127.0.0.1", "--no-tls"],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "controller.log"), "a"))
    for _ in range(300):
        try:
            lines = open(os.path.join(data, "listening")).read().split("\n")
            addr = [l.split()[1] for l in lines if l.startswith("http ")][0]
            host, port = addr.rsplit(":", 1)
            c = http.client.HTTPConnection(host, int(port), timeout=30)
            c.request("GET", "/login")
            c.getresponse().read()
            return p, host, int(port)
        except (OSError, IndexError):
            time.sleep(0.05)
    sys.exit("the controller did not start: see " + os.path.join(work, "controller.log"))


# 1. A store with its schema, then filled directly.
p, _, _ = start()
p.send_signal(signal.SIGTERM)
p.wait()
os.remove(os.path.join(data, "listening"))
db = sqlite3.connect(os.path.join(data, "wisp.db"))
now = int(time.time())
db.executemany("INSERT INTO nodes (name, labels, executors, websocket, work_dir, created, origin) VALUES (?, ?, 2, 1, '', ?, 'static')",
               ((f"node-{i}", "linux x86_64", now) for i in range(NODES)))
db.executemany("INSERT INTO builds (id, name, yaml, state, node, message, created, started, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               ((i, f"pipeline-{i % 50}", "name: x\nsteps: [{sh: 'true'}]\n", "success" if i % 7 else "failure",
                 f"node-{i % NODES}", "" if i % 7 else "step 1 (make test) failed: exit code 2",
                 now - (BUILDS - i) * 30, now - (BUILDS - i) * 30 + 2, now - (BUILDS - i) * 30 + 40)
                for i in range(1, BUILDS + 1)))
db.executemany("INSERT INTO steps (build, idx, name, state, exit, code, bytes) VALUES (?, 1, 'make test', ?, ?, ?, 1234)",
               ((i, "success" if i % 7 else "failure", "exit code 0" if i % 7 else "exit code 2", 0 if i % 7 else 2)
                for i in range(1, BUILDS + 1)))
db.commit()
db.close()

# 2. The controller on that store; a session as the login form opens it.
p, host, port = start()
token = open(os.path.join(data, "token")).read().strip()
c = http.client.HTTPConnection(host, port, timeout=30)
c.request("POST", "/login", body=f"token={token}&next=/", headers={"Content-Type": "application/x-www-form-urlencoded"})
r = c.getresponse()
r.read()
cookie = r.getheader("Set-Cookie").split(";")[0]


def timed(path):
    """Median and max ms of RUNS requests on one kept-alive connection, and the answer's bytes
    (head and body)."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    ts, size = [], 0
    for _ in range(RUNS):
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"Cookie": cookie})
        r = conn.getresponse()
        body = r.read()
        ts.append((time.perf_counter() - t0) * 1000)
        assert r.status == 200, (path, r.status, body[:200])
        head = sum(len(k) + len(v) + 4 for k, v in r.getheaders()) + 17
        size = head + len(body)
    return statistics.median(ts), max(ts), size


rows = []
for label, path in [("overview (queue, running, the 50 newest builds)", "/"),
                    ("overview, a page of older builds (`?before=50000`)", "/?before=50000"),
                    ("a node's page (its 50 newest builds)", f"/nodes/node-{NODES // 2 + 1}"),
                    ("a build's page", f"/builds/{BUILDS // 2}"),
                    ("the nodes page (the first 200 nodes by name)", "/nodes"),
                    ("the nodes page, further on", f"/nodes?after=node-{NODES // 2}")]:
    med, worst, size = timed(path)
    rows.append((label, med, worst, size))

first = [timed(x)[2] for x in ["/", "/static/app.css", "/static/app.js"]]
p.send_signal(signal.SIGTERM)
p.wait()

# 3. Dispatch latency with and without a scrape of /metrics every 100 ms.
data2 = os.path.join(work, "data2")
p, host, port = start(data2)
url = f"http://{host}:{port}/"
agent_addr = [l.split()[1] for l in open(os.path.join(data2, "listening")) if l.startswith("agent ")][0]
AGENTS, LAT_BUILDS, LAT_RUNS = 50, 2000, 5
agents = []
for i in range(AGENTS):
    out = subprocess.run([WISP, "node", "add", f"a{i}", "--labels", "pool", "--tcp", "--data", data2],
                         capture_output=True, text=True, check=True).stdout
    secret = [l.split()[1] for l in out.splitlines() if l.startswith("secret:")][0]
    d = os.path.join(work, f"a{i}")
    os.makedirs(d)
    agents.append(subprocess.Popen([AGENT, "--url", url, "--name", f"a{i}", "--secret", secret, "--direct", agent_addr,
                                    "--work-dir", d], stderr=subprocess.DEVNULL))
for _ in range(300):
    nodes = subprocess.run([WISP, "nodes", "--data", data2], capture_output=True, text=True).stdout
    if nodes.count("\tonline\t") >= AGENTS:
        break
    time.sleep(0.1)
token2 = open(os.path.join(data2, "token")).read().strip()
scrapes = [0]


def scraper(stop):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    while not stop.is_set():
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token2}"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        scrapes[0] += 1
        stop.wait(0.1)


def dispatch():
    o = subprocess.run([LOADGEN, "dispatch", "--url", url, "--data", data2, "--label", "pool", "--builds", str(LAT_BUILDS),
                        "--concurrency", "1"], capture_output=True, text=True, check=True).stdout
    lat = [l.split() for l in o.splitlines() if l.startswith("latency_ms")][0]
    return float(lat[1]), float(lat[2])


dispatch()  # warm up
plain, scraped = [], []
for _ in range(LAT_RUNS):
    plain.append(dispatch())
    stop = threading.Event()
    t = threading.Thread(target=scraper, args=(stop,))
    t.start()
    scraped.append(dispatch())
    stop.set()
    t.join()
for a in agents:
    a.kill()
p.send_signal(signal.SIGTERM)
p.wait()
mid = lambda xs, i: statistics.median(x[i] for x in xs)

print(f"A release controller on loopback with {NODES:,} nodes and {BUILDS:,} finished builds in its store; "
      f"each page asked for {RUNS} times on one kept-alive connection with a session cookie.")
print()
print("| page | median ms | max ms | bytes |")
print("|---|---|---|---|")
for label, med, worst, size in rows:
    print(f"| {label} | {med:.2f} | {worst:.2f} | {size:,} |")
print()
print(f"First page load (the overview, its style sheet and its script; nothing else is fetched): "
      f"**{sum(first):,} bytes** ({first[0]:,} + {first[1]:,} + {first[2]:,}, headers included, uncompressed; "
      f"goal under 100 KB).")
print()
print(f"Dispatch latency (submit to the build's result, one build at a time, {AGENTS} agents over TCP; median of "
      f"{LAT_RUNS} runs of {LAT_BUILDS} builds each, the two kinds of run alternating): without scrapes "
      f"**p50 {mid(plain, 0):.3f} ms**, p99 {mid(plain, 1):.3f} ms; with a scrape of `/metrics` every 100 ms "
      f"({scrapes[0]} scrapes in all) **p50 {mid(scraped, 0):.3f} ms**, p99 {mid(scraped, 1):.3f} ms.")
