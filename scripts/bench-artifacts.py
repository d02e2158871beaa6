#!/usr/bin/env python3
"""Artifacts, stash and matrices (issue 17), each against a comparator in the same run. Driven by
scripts/bench-artifacts.sh, which builds what it needs; prints a Markdown section.

  bench-artifacts.py WISP WISP_AGENT GIB FILES RUNS

1. Artifact upload of GIB GiB (one file of random bytes: LZ4 cannot shrink it) by an `archive:`
   step, and its download with `wisp artifact get -o` (SHA-256 checked): MiB/s, against
   `tar c | socat` into `socat | tar x` of the same file over loopback TCP. The agent's RSS is
   sampled every 20 ms during the upload.
2. Stash of FILES small files (about 5 KiB each, in directories of 100, like a node_modules) on
   one agent and unstash on another: seconds each way, from timestamps the pipeline's own `sh`
   steps print around them, against `tar c | tar x` through a pipe of the same tree.
3. A matrix of 3 x 10 cells (`sh: true`) on 3 agents, 10 builds RUNS times: the controller's CPU
   per cell (utime + stime from /proc, which counts 10 ms ticks), against the same 30 steps as one
   plain pipeline on one agent (each build's own `wisp run --wait` call is counted in both).
Each figure is the median of RUNS runs.
"""
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

WISP, AGENT = sys.argv[1], sys.argv[2]
GIB, FILES, RUNS = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
TICK = os.sysconf("SC_CLK_TCK")
work = tempfile.mkdtemp(prefix="wisp-bench-art.", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
data = os.path.join(work, "data")
procs = []


def wisp(*args):
    r = subprocess.run([WISP, *args, "--data", data], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"wisp {' '.join(args)} failed ({r.returncode}): {r.stderr}\n{r.stdout}")
    return r.stdout


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_pipeline(name, yaml, *extra):
    path = os.path.join(work, f"{name}.yaml")
    open(path, "w").write(yaml)
    t0 = time.monotonic()
    wisp("run", path, "--wait", *extra)
    return time.monotonic() - t0


def median(xs):
    return statistics.median(xs)


ctl = subprocess.Popen([WISP, "serve", "--data", data, "--http-port", "0", "--agent-port", "0", "--bind", "127.0.0.1"],
                       stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "controller.log"), "w"))
procs.append(ctl)
try:
    for _ in range(200):
        if os.path.exists(os.path.join(data, "listening")):
            break
        time.sleep(0.05)
    fp = open(os.path.join(data, "fingerprint")).read().strip()
    url = [l.split()[1] for l in open(os.path.join(data, "listening")) if l.startswith("url")][0]
    agents = {}
    for name, labels, ws in [("a", "a", False), ("b", "b", True), ("c", "c", True)]:
        out = wisp("node", "add", name, "--labels", labels, "--executors", "10", *([] if ws else ["--tcp"]))
        secret = [l.split()[1] for l in out.splitlines() if l.startswith("secret:")][0]
        d = os.path.join(work, f"agent-{name}")
        os.makedirs(d)
        args = [AGENT, "--url", url, "--name", name, "--secret", secret, "--instance-identity", fp, "--work-dir", d]
        if ws:
            args.append("--websocket")
        p = subprocess.Popen(args, stderr=open(os.path.join(work, f"agent-{name}.log"), "w"))
        procs.append(p)
        agents[name] = (p, d)
    for _ in range(100):
        if wisp("nodes").count("\tonline\t") >= 3:
            break
        time.sleep(0.1)

    # 2. (first, on a quiet disk: deleting the big files of 1 leaves it slow for a while) A
    # node_modules-like tree stashed on a and unstashed on b, against tar c | tar x.
    subprocess.run(["sync"])
    ws = os.path.join(agents["a"][1], "workspace", "stash")
    tree = os.path.join(ws, "tree")
    block = (b"module.exports = function () { return 42; };\n" * 120)[:5000]
    for i in range(FILES):
        d = os.path.join(tree, f"pkg{i // 100:04d}")
        if i % 100 == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i % 100:03d}.js"), "wb") as f:
            f.write(block[: 4000 + (i * 37) % 2000] + str(i).encode())
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tree) for f in fs)
    stamp = "date +%s.%N"
    yaml = f"""name: stash
stages:
  - name: make
    agent: {{label: a}}
    steps: [{{sh: '{stamp}'}}, {{stash: {{name: t, paths: ["tree/**"]}}}}, {{sh: '{stamp}'}}]
  - name: use
    agent: {{label: b}}
    steps: [{{sh: 'rm -rf tree; {stamp}'}}, {{unstash: t}}, {{sh: '{stamp}'}}]
"""
    stashes, unstashes = [], []
    for _ in range(RUNS):
        run_pipeline("stash", yaml)
        bid = wisp("builds").splitlines()[0].split("\t")[0].lstrip("#")
        log = wisp("log", bid)
        ts = [float(x) for x in re.findall(r"^(\d{10}\.\d+)$", log, re.M)]
        stashes.append(ts[1] - ts[0])
        unstashes.append(ts[3] - ts[2])
    got = os.path.join(agents["b"][1], "workspace", "stash", "tree")
    assert sum(len(fs) for _, _, fs in os.walk(got)) == FILES, "every file unstashed"
    pipes = []
    for _ in range(RUNS):
        dest = os.path.join(work, "tar-dest")
        os.makedirs(dest)
        t0 = time.monotonic()
        subprocess.run(["bash", "-c", f"tar c -C {ws} tree | tar x -C {dest}"], check=True)
        pipes.append(time.monotonic() - t0)
        shutil.rmtree(dest)

    # 1. One big artifact up and down, against tar | socat over loopback.
    ws_a = os.path.join(agents["a"][1], "workspace", "up")
    os.makedirs(ws_a)
    size = int(GIB * (1 << 30))
    with open(os.path.join(ws_a, "big"), "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n
    run_pipeline("noop", "name: up\nagent: {label: a}\nsteps: [{sh: 'true'}]\n")
    base = median([run_pipeline("noop", "name: up\nagent: {label: a}\nsteps: [{sh: 'true'}]\n") for _ in range(3)])
    ups, downs, peaks = [], [], []
    idle_rss = rss_kib(agents["a"][0].pid)
    for i in range(RUNS):
        peak = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_kib(agents["a"][0].pid))
                time.sleep(0.02)

        t = threading.Thread(target=sample)
        t.start()
        wall = run_pipeline("up", "name: up\nagent: {label: a}\nsteps: [{archive: [big]}]\n")
        stop.set()
        t.join()
        ups.append(wall - base)
        peaks.append(peak[0])
        bid = wisp("builds").splitlines()[0].split("\t")[0].lstrip("#")
        dl = os.path.join(work, "big.dl")
        t0 = time.monotonic()
        wisp("artifact", "get", bid, "big", "-o", dl)
        downs.append(time.monotonic() - t0)
        os.remove(dl)
        shutil.rmtree(os.path.join(data, "builds", bid, "artifacts"), ignore_errors=True)
    socats = []
    for _ in range(RUNS):
        dest = os.path.join(work, "socat-dest")
        os.makedirs(dest, exist_ok=True)
        port = 20000 + os.getpid() % 20000
        rx = subprocess.Popen(["bash", "-c", f"socat -u TCP-LISTEN:{port},reuseaddr - | tar x -C {dest}"])
        time.sleep(0.2)
        t0 = time.monotonic()
        subprocess.run(["bash", "-c", f"tar c -C {ws_a} big | socat -u - TCP:127.0.0.1:{port}"], check=True)
        rx.wait()
        socats.append(time.monotonic() - t0)
        shutil.rmtree(dest)
    mib = size / (1 << 20)
    up, down, floor = mib / median(ups), mib / median(downs), mib / median(socats)

    # 3. A 3 x 10 matrix on three agents: the controller's CPU per cell.
    matrix = """name: matrix
stages:
  - name: m
    agent: {label: "${x}"}
    matrix:
      axes: {x: [a, b, c], y: [y0, y1, y2, y3, y4, y5, y6, y7, y8, y9]}
    steps: [{sh: 'true'}]
"""
    plain = "name: plain\nagent: {label: a}\nsteps:\n" + "  - sh: 'true'\n" * 30
    run_pipeline("matrix", matrix)
    # /proc counts CPU in 10 ms ticks: each figure is over 10 builds (300 cells).
    per_cell, per_step = [], []
    for _ in range(RUNS):
        c0 = cpu(ctl.pid)
        for _ in range(10):
            run_pipeline("matrix", matrix)
        per_cell.append((cpu(ctl.pid) - c0) * 1000 / 300)
        c0 = cpu(ctl.pid)
        for _ in range(10):
            run_pipeline("plain", plain)
        per_step.append((cpu(ctl.pid) - c0) * 1000 / 300)

    where = "tmpfs" if work.startswith("/dev/shm") else "the local disk"
    print(f"A release controller (TLS, its default) and three static agents on loopback, "
          f"one over TCP and two over WebSocket; the controller's data and the agents' work dirs on {where} ({os.path.dirname(work)}).")
    print()
    print(f"| measure (median of {RUNS}) | wisp | comparator, same run | wisp / comparator |")
    print("|---|---|---|---|")
    print(f"| artifact upload, one {GIB:g} GiB file (`archive:` step) | **{up:.0f} MiB/s** | `tar c \\| socat` → `socat \\| tar x`: {floor:.0f} MiB/s | {up / floor:.0%} (goal ≥ 50%) |")
    print(f"| artifact download (`wisp artifact get -o`, SHA-256 checked) | **{down:.0f} MiB/s** | same: {floor:.0f} MiB/s | {down / floor:.0%} |")
    print(f"| stash of {FILES:,} files, {total / (1 << 20):.0f} MiB (agent a) | **{median(stashes):.2f} s** | `tar c \\| tar x`: {median(pipes):.2f} s | goal < 5 s |")
    print(f"| unstash of the same on another agent (b) | **{median(unstashes):.2f} s** | same: {median(pipes):.2f} s | goal < 5 s |")
    print(f"| controller CPU per cell, 3 × 10 matrix on 3 agents | **{median(per_cell):.2f} ms** | 30 plain steps on one agent: {median(per_step):.2f} ms per step | |")
    print()
    print(f"The uploading agent's RSS: {idle_rss / 1024:.1f} MiB idle, at most {max(peaks) / 1024:.1f} MiB while "
          f"it sent {GIB:g} GiB (sampled every 20 ms). Upload times are the build's wall time less that of a "
          f"one-step `true` build ({base * 1000:.0f} ms); the stash times come from `date` in the pipeline's own steps.")
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()
    shutil.rmtree(work, ignore_errors=True)
