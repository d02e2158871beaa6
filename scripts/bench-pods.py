#!/usr/bin/env python3
"""Pod builds under podman: where the time from submit to first output goes, and the controller's
CPU per pod. Driven by scripts/bench-pods.sh, which builds what it needs; prints a Markdown section.

  bench-pods.py WISP WISP_AGENT AGENT_IMAGE BUSYBOX RUNS BURST

1. RUNS pod builds one after another (`echo first` in a fresh pod each): submit to the first output
   line as `wisp log --follow` prints it, split with the controller's own per-pod timings (its log
   line "pod X online ...") and the agent container's start time from `podman inspect`:
   - wisp, decision to create call: from the build's reservation to the backend's create call;
   - podman: from the create call to the agent container's start (`kube play`, `pod start`);
   - wisp, agent process start to online: the jnlp container's StartedAt to the agent's connect.
2. The same Pod manifest run by podman alone (`podman kube play` of it, then `pod rm`), RUNS times.
3. BURST builds at once with containerCap BURST: the controller's CPU (utime+stime of its process,
   and separately of the podman service it runs) over the burst, per pod; then the same bursts on
   BURST static agents, per build, for comparison.
"""
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

WISP, AGENT, AGENT_IMAGE, BUSYBOX = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
RUNS, BURST = int(sys.argv[5]), int(sys.argv[6])
TICK = os.sysconf("SC_CLK_TCK")
work = tempfile.mkdtemp(prefix="wisp-bench-pods.")
data = os.path.join(work, "data")
log_path = os.path.join(work, "controller.log")


def wisp(*args, check=True):
    r = subprocess.run([WISP, *args, "--data", data], capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"wisp {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def stat(pid):
    """Fields of /proc/PID/stat after the name (state is [0]; utime [11], stime [12], cutime [13],
    cstime [14]), or None when it is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid):
    """Live children of the process (any of its threads')."""
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except OSError:
            pass
    return out


def cpu(pid):
    """The process's own CPU (utime + stime, all its threads, ended ones too) and its children's
    (the waited-for ones and the live ones, such as the podman service it runs, with theirs), in
    seconds; /proc counts in 10 ms ticks, so the burst is run ROUNDS times."""
    f = stat(pid)
    own = (int(f[11]) + int(f[12])) / TICK
    kids = (int(f[13]) + int(f[14])) / TICK
    todo = children(pid)
    while todo:
        c = todo.pop()
        g = stat(c)
        if g is None:
            continue
        kids += (int(g[11]) + int(g[12]) + int(g[13]) + int(g[14])) / TICK
        todo += children(c)
    return own, kids


ROUNDS = 5


def median(xs):
    return statistics.median(xs) if xs else float("nan")


TEMPLATE = f"""clouds:
  - podman:
      name: bench
      containerCap: {BURST}
      agentImage: {AGENT_IMAGE}
      templates:
        - name: bench
          label: bench
          containers:
            - name: build
              image: {BUSYBOX}
          yaml: |
            spec:
              containers:
                - name: jnlp
                  volumeMounts: [{{name: sh, mountPath: /bin/sh}}]
              volumes:
                - name: sh
                  hostPath: {{path: /bin/busybox, type: File}}
"""
# The step prints `first`, then when the agent (PID 1 of the jnlp container) started, in clock ticks
# since boot (/proc/PID/stat field 22), with shell builtins only.
PIPELINE = ("name: bench\nagent: {label: bench}\nsteps:\n  - container: jnlp\n    sh: |\n      echo first\n"
            "      read -r s < /proc/1/stat; set -- $s; echo agentstart=${22}\n")
# Boot time in unix seconds to 10 ms (/proc/stat's btime is whole seconds).
BOOT = time.time() - float(open("/proc/uptime").read().split()[0])

ctl = subprocess.Popen(
    [WISP, "serve", "--data", data, "--http-port", "0", "--agent-port", "0", "--bind", "127.0.0.1"],
    stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
try:
    for _ in range(200):
        if os.path.exists(os.path.join(data, "listening")):
            break
        time.sleep(0.05)
    cloud = os.path.join(work, "cloud.yaml")
    open(cloud, "w").write(TEMPLATE)
    wisp("cloud", "apply", cloud)
    pipe = os.path.join(work, "p.yaml")
    open(pipe, "w").write(PIPELINE)
    # A first build to warm podman's caches (image layers, the pause image), not counted.
    wisp("run", pipe, "--wait")

    online = re.compile(r"pod (\S+) online ([\d.]+) ms after it was reserved: ([\d.]+) ms to the create call, "
                        r"([\d.]+) ms from the create call to the agent's connect.*\(create call at unix ms "
                        r"([\d.]+), online at unix ms ([\d.]+)\)")
    totals, decide, create, agent_up = [], [], [], []
    for _ in range(RUNS):
        t0 = time.time()
        bid = wisp("run", pipe).strip()
        f = subprocess.Popen([WISP, "log", bid, "--follow", "--data", data], stdout=subprocess.PIPE, text=True)
        for line in f.stdout:
            if line.strip() == "first":
                totals.append((time.time() - t0) * 1000)
                break
        text = open(log_path).read()
        m = [x for x in online.finditer(text)][-1]
        decide.append(float(m.group(3)))
        call_ms, online_ms = float(m.group(5)), float(m.group(6))
        rest = f.stdout.read()
        f.wait()
        ticks = re.search(r"agentstart=(\d+)", rest)
        if ticks:
            started_ms = (BOOT + int(ticks.group(1)) / TICK) * 1000
            agent_up.append(online_ms - started_ms)
            create.append(started_ms - call_ms)

    # podman alone: the same kind of pod (agent image, busybox container, the shared volumes).
    manifest = os.path.join(work, "alone.yaml")
    open(manifest, "w").write(f"""apiVersion: v1
kind: Pod
metadata: {{name: bench-alone}}
spec:
  restartPolicy: Never
  containers:
    - {{name: jnlp, image: {AGENT_IMAGE}, args: [--version]}}
    - {{name: build, image: {BUSYBOX}, command: [sleep, "30"]}}
""")
    alone = []
    for _ in range(RUNS):
        t0 = time.time()
        subprocess.run(["podman", "kube", "play", "--network", "host", manifest], capture_output=True, check=True)
        alone.append((time.time() - t0) * 1000)
        subprocess.run(["podman", "pod", "rm", "-f", "-t", "0", "bench-alone"], capture_output=True)

    # The burst: BURST builds at once, ROUNDS times (the CPU counters tick in 10 ms).
    time.sleep(2)
    own0, kids0 = cpu(ctl.pid)
    walls = []
    for _ in range(ROUNDS):
        t0 = time.time()
        threads = [threading.Thread(target=wisp, args=("run", pipe, "--wait")) for _ in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        walls.append(time.time() - t0)
        # Their pods are deleted after the builds: wait for that, so its cost is counted too.
        for _ in range(300):
            left = subprocess.run(["podman", "pod", "ps", "-q", "--filter", "label=wisp.dev/cloud=bench"],
                                  capture_output=True, text=True).stdout.split()
            if not left:
                break
            time.sleep(0.1)
    own1, kids1 = cpu(ctl.pid)
    pods = BURST * ROUNDS
    per_pod_own = (own1 - own0) * 1000 / pods
    per_pod_kids = (kids1 - kids0) * 1000 / pods
    burst_s = median(walls)

    # The same bursts on BURST static agents that stay connected: what a build costs the
    # controller without a pod (the API call, dispatch, the step, the store), for comparison.
    fp = open(os.path.join(data, "fingerprint")).read().strip()
    url = [l.split()[1] for l in open(os.path.join(data, "listening")) if l.startswith("url")][0]
    static = []
    conn0, _ = cpu(ctl.pid)
    for i in range(BURST):
        out = wisp("node", "add", f"static{i}", "--labels", "static")
        secret = [l.split()[1] for l in out.splitlines() if l.startswith("secret:")][0]
        d = os.path.join(work, f"static{i}")
        os.makedirs(d)
        static.append(subprocess.Popen([AGENT, "--url", url, "--name", f"static{i}", "--secret", secret,
                                        "--websocket", "--instance-identity", fp, "--work-dir", d],
                                       stderr=subprocess.DEVNULL))
    spipe = os.path.join(work, "static.yaml")
    open(spipe, "w").write("name: static\nagent: {label: static}\nsteps: [{sh: 'echo first'}]\n")
    for _ in range(100):
        if wisp("nodes").count("\tonline\t") >= BURST:
            break
        time.sleep(0.1)
    conn1, _ = cpu(ctl.pid)
    # `node add` and `nodes` above are CLI calls of their own (counted in); the connects are most.
    per_connect = (conn1 - conn0) * 1000 / BURST
    wisp("run", spipe, "--wait")
    base0, _ = cpu(ctl.pid)
    for _ in range(ROUNDS):
        threads = [threading.Thread(target=wisp, args=("run", spipe, "--wait")) for _ in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    base1, _ = cpu(ctl.pid)
    per_build_static = (base1 - base0) * 1000 / (BURST * ROUNDS)
    for a in static:
        a.kill()

    wisp_share = [d + a for d, a in zip(decide, agent_up)]
    version = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"Pod builds under {version}, the controller a release build with TLS (its default).")
    print()
    print(f"| measure ({RUNS} pod builds one after another; median, min–max) | ms |")
    print("|---|---|")
    fmt = lambda xs: f"{median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})" if xs else "n/a"
    print(f"| submit to first output line (`wisp run`, `wisp log --follow`) | {fmt(totals)} |")
    print(f"| wisp: decision (reservation) to the create call | {fmt(decide)} |")
    print(f"| podman: the create call to the agent container's start (`kube play`, `pod start`) | {fmt(create)} |")
    print(f"| wisp: agent container started to agent online | {fmt(agent_up)} |")
    print(f"| **wisp's share** (the two wisp rows; goal ≤ 50 ms) | **{fmt(wisp_share)}** |")
    print(f"| podman alone: `podman kube play` of a like pod | {fmt(alone)} |")
    print()
    print(f"{BURST} pod builds at once (containerCap {BURST}), {ROUNDS} times: {burst_s:.1f} s wall (median); controller CPU "
          f"**{per_pod_own:.2f} ms per pod** (its own process; goal ≤ 2 ms), plus {per_pod_kids:.1f} ms per pod "
          f"in the podman service it runs (with what that service starts; podman's own CPU, counted apart). "
          f"The same bursts on {BURST} static agents, connected throughout: "
          f"{per_build_static:.2f} ms per build; each of these agents cost {per_connect:.1f} ms to connect "
          f"(with its `node add`: TLS, WebSocket, handshake, the node stored), as a pod's agent does.")
finally:
    ctl.terminate()
    ctl.wait()
    subprocess.run(["bash", "-c", "podman pod ps -q --filter label=wisp.dev/cloud=bench | xargs -r podman pod rm -f -t 0"],
                   capture_output=True)
