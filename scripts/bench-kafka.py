#!/usr/bin/env python3
"""The Kafka transport (issue 18) against TCP in the same run. Driven by scripts/bench-kafka.sh,
which builds what it needs; prints a Markdown section.

  bench-kafka.py WISP WISP_AGENT TANSU MIB RUNS

One release controller (TLS on its agent port, its default) serving two nodes with the same
Kafka-enabled static agent: `t` over TCP with TLS, `k` through a tansu broker (sqlite storage) on
loopback. Measured for each, median of RUNS:
1. Throughput: a step writes MIB MiB to stdout (`head -c` of a file of random bytes made once),
   `wisp run --wait` from submit to result, every byte stored (the stored length is checked).
2. Dispatch latency: a one-step `true` build, submit to result (20 builds per run).
3. The Kafka agent's RSS idle, and its peak while it streams (sampled every 20 ms).
"""
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

WISP, AGENT, TANSU = sys.argv[1], sys.argv[2], sys.argv[3]
MIB, RUNS = int(sys.argv[4]), int(sys.argv[5])
work = tempfile.mkdtemp(prefix="wisp-bench-kafka.", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
data = os.path.join(work, "data")
procs = []


def wisp(*args):
    r = subprocess.run([WISP, *args, "--data", data], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"wisp {' '.join(args)} failed ({r.returncode}): {r.stderr}\n{r.stdout}")
    return r.stdout


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def timed(yaml, name):
    path = os.path.join(work, f"{name}.yaml")
    open(path, "w").write(yaml)
    t0 = time.monotonic()
    out = wisp("run", path, "--wait")
    return time.monotonic() - t0, out


port = free_port()
bdir = os.path.join(work, "broker")
os.makedirs(bdir)
url = f"tcp://127.0.0.1:{port}"
broker = subprocess.Popen([TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url,
                           "--storage-engine", "sqlite://tansu.db"], cwd=bdir,
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(bdir, "broker.log"), "w"))
procs.append(broker)
try:
    import socket
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    ctl = subprocess.Popen([WISP, "serve", "--data", data, "--http-port", "0", "--agent-port", "0", "--bind",
                            "127.0.0.1", "--kafka", f"127.0.0.1:{port}"],
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "controller.log"), "w"))
    procs.append(ctl)
    for _ in range(200):
        if os.path.exists(os.path.join(data, "listening")):
            break
        time.sleep(0.05)
    fp = open(os.path.join(data, "fingerprint")).read().strip()
    listening = open(os.path.join(data, "listening")).read().split()
    curl = listening[listening.index("url") + 1]
    agent_addr = listening[listening.index("agent") + 1]
    pids = {}
    for name in ("t", "k"):
        out = wisp("node", "add", name, "--labels", name, *(["--tcp"] if name == "t" else []))
        secret = [l.split()[1] for l in out.splitlines() if l.startswith("secret:")][0]
        d = os.path.join(work, f"agent-{name}")
        os.makedirs(d)
        if name == "t":
            args = [AGENT, "--url", curl, "--direct", agent_addr, "--instance-identity", fp]
        else:
            args = [AGENT, "--kafka", f"127.0.0.1:{port}"]
        p = subprocess.Popen(args + ["--name", name, "--secret", secret, "--work-dir", d],
                             stderr=open(os.path.join(work, f"agent-{name}.log"), "w"))
        procs.append(p)
        pids[name] = p.pid
    for _ in range(300):
        if wisp("nodes").count("\tonline\t") >= 2:
            break
        time.sleep(0.1)
    else:
        sys.exit("the agents did not come online: see " + work)

    blob = os.path.join(work, "blob")
    with open(blob, "wb") as f:
        f.write(os.urandom(64 << 20))
    size = MIB << 20
    # `head -c` of the 64 MiB file repeated: the generator costs next to nothing.
    gen = f"i=0; while [ $i -lt {(size + (64 << 20) - 1) // (64 << 20)} ]; do cat {blob}; i=$((i+1)); done | head -c {size}"
    idle_rss = rss_kib(pids["k"])
    rates, lats = {"t": [], "k": []}, {"t": [], "k": []}
    peak = [0]
    for _ in range(RUNS):
        for name in ("t", "k"):
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_kib(pids["k"]))
                    time.sleep(0.02)

            th = threading.Thread(target=sample)
            th.start()
            secs, out = timed(f"name: stream-{name}\nagent: {{label: {name}}}\nsteps:\n  - sh: '{gen}'\n", "s")
            stop.set()
            th.join()
            assert f"({size} output bytes stored)" in out, out
            rates[name].append(MIB / secs)
            for _ in range(20):
                secs, _ = timed(f"name: true-{name}\nagent: {{label: {name}}}\nsteps:\n  - sh: 'true'\n", "t")
                lats[name].append(secs * 1000)

    med = statistics.median
    t_rate, k_rate = med(rates["t"]), med(rates["k"])
    t_lat, k_lat = med(lats["t"]), med(lats["k"])
    print(f"One release controller; the same Kafka-enabled static agent on two nodes, `t` over TCP with TLS and"
          f" `k` through a tansu 0.6 broker (sqlite storage) on loopback. Median of {RUNS} runs.\n")
    print("| measure | Kafka | TCP with TLS, same run | Kafka / TCP |")
    print("|---|---|---|---|")
    print(f"| streaming {MIB} MiB of step output to the stored log | **{k_rate:.1f} MiB/s** | {t_rate:.0f} MiB/s |"
          f" {k_rate / t_rate:.1%} |")
    print(f"| dispatch latency (one-step `true` build, submit to result) | **{k_lat:.0f} ms** | {t_lat:.0f} ms |"
          f" {k_lat / t_lat:.1f}x |")
    print(f"\nThe Kafka agent's RSS: {idle_rss / 1024:.1f} MiB idle, at most {peak[0] / 1024:.1f} MiB while it streamed"
          f" (sampled every 20 ms).")
finally:
    for p in procs:
        p.kill()
    subprocess.run(["rm", "-rf", work])
