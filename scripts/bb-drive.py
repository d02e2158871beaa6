#!/usr/bin/env python3
"""Drive a Buildbot 3.7 master for scripts/bench.sh through its www service (stdlib only).

    bb-drive.py URL wait-worker NAME [TIMEOUT_S]
        exit 0 once worker NAME is connected to the master.
    bb-drive.py URL force SCHEDULER BUILDER COUNT [TIMEOUT_S]
        COUNT times, one after the other: POST the JSON-RPC `force` call of ForceScheduler
        SCHEDULER for builder BUILDER and wait for that build's `finished` event on /sse; prints
        each build's latency in ms (from just before the POST to the event), one a line.
    bb-drive.py URL stream SCHEDULER BUILDER BYTES [TIMEOUT_S]
        one forced build whose step prints BYTES bytes; prints the elapsed seconds (POST to the
        finished event) after checking the build succeeded and its stdio log holds BYTES bytes of
        output lines.

URL is the master's www root (http://127.0.0.1:PORT/). Events come from one /sse stream: GET /sse
answers with a `handshake` event whose data is the stream's uuid, then GET /sse/add/UUID/PATH
subscribes it to the message-queue routing keys PATH (`*` a wildcard), each delivered as
`event: event` with data {"key": [...], "message": {...}} (buildbot/www/sse.py). The keys are those
of the data API's produceEvent (buildbot/data/base.py): builds/BUILDID/finished
(buildbot/data/builds.py), workers/WORKERID/connected (buildbot/data/workers.py). The force call is
POST /api/v2/forceschedulers/SCHEDULER {"jsonrpc": "2.0", "method": "force", "id": N,
"params": {"builderid": ID, ...}} (buildbot/www/rest.py renderJsonRpc, buildbot/data/
forceschedulers.py control, buildbot/schedulers/forcesched.py force), answered with
{"result": [BSID, {"BUILDERID": BRID}]}; the build's event carries that buildrequestid.
Failures go to stderr, one line, and the exit code is 1.
"""
import http.client
import json
import sys
import threading
import time
import urllib.parse


class Fail(Exception):
    pass


class Master:
    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.api = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method, path, body=None):
        headers = {}
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in range(2):  # one retry if the kept-alive connection was closed
            try:
                self.api.request(method, path, body=body, headers=headers)
                r = self.api.getresponse()
                data = r.read()
                break
            except (http.client.HTTPException, OSError):
                self.api.close()
                if attempt:
                    raise
        if r.status != 200:
            raise Fail(f"{method} {path}: HTTP {r.status}: {data[:300].decode(errors='replace')}")
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def get(self, path):
        return self.request("GET", "/api/v2/" + path)

    def builderid(self, name):
        for b in self.get("builders")["builders"]:
            if b["name"] == name:
                return b["builderid"]
        raise Fail(f"no builder {name!r} in /api/v2/builders")

    def force(self, scheduler, builderid, n):
        body = {"jsonrpc": "2.0", "method": "force", "id": n,
                "params": {"builderid": builderid, "reason": "bench"}}
        rep = self.request("POST", "/api/v2/forceschedulers/" + scheduler, body)
        if "error" in rep or "result" not in rep:
            raise Fail(f"force {scheduler}: {rep.get('error', rep)}")
        _bsid, brids = rep["result"]
        return brids[str(builderid)]


class Events:
    """One /sse stream, read by a thread; keeps every event with the time it arrived."""

    def __init__(self, master, paths):
        self.cond = threading.Condition()
        self.events = []  # (perf_counter at arrival, key list, message)
        self.error = None
        conn = http.client.HTTPConnection(master.host, master.port, timeout=None)
        conn.request("GET", "/sse")
        self.resp = conn.getresponse()
        if self.resp.status != 200:
            raise Fail(f"GET /sse: HTTP {self.resp.status}")
        uuid = self._handshake()
        for p in paths:
            c = http.client.HTTPConnection(master.host, master.port, timeout=30)
            c.request("GET", f"/sse/add/{uuid}/{p}")
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status != 200:
                raise Fail(f"GET /sse/add/UUID/{p}: HTTP {r.status}: {body[:200]!r}")
        threading.Thread(target=self._read, daemon=True).start()

    def _frames(self):
        event, data = None, []
        while True:
            line = self.resp.readline()
            if not line:
                raise Fail("the /sse stream ended")
            line = line.rstrip(b"\r\n").decode()
            if line:
                k, _, v = line.partition(":")
                v = v[1:] if v.startswith(" ") else v
                if k == "event":
                    event = v
                elif k == "data":
                    data.append(v)
            elif event is not None or data:
                yield event, "\n".join(data)
                event, data = None, []

    def _handshake(self):
        for event, data in self._frames():
            if event == "handshake":
                return data.strip()
        raise Fail("no handshake on /sse")

    def _read(self):
        try:
            for event, data in self._frames():
                if event != "event":
                    continue
                msg = json.loads(data)
                with self.cond:
                    self.events.append((time.perf_counter(), msg["key"], msg["message"]))
                    self.cond.notify_all()
        except Exception as e:  # noqa: BLE001 - reported to the waiter
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def wait(self, match, timeout, what):
        """The first event (time, key, message) for which match(key, message) holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for ev in self.events[seen:]:
                    if match(ev[1], ev[2]):
                        return ev
                seen = len(self.events)
                if self.error is not None:
                    raise Fail(f"waiting for {what}: /sse failed: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Fail(f"no event for {what} in {timeout:g} s")
                self.cond.wait(left)


def wait_master(url, timeout=60):
    m = Master(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            m.get("masters")
            return m
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() > deadline:
                raise Fail(f"the master's www at {url} did not answer in {timeout} s: {e}")
            m.api.close()
            time.sleep(0.1)


def wait_worker(url, name, timeout=60.0):
    m = wait_master(url)
    ev = Events(m, ["workers/*/connected"])  # subscribed first: then the REST check cannot race

    def connected():
        return any(w["name"] == name and w["connected_to"] for w in m.get("workers")["workers"])

    if not connected():
        ev.wait(lambda k, msg: k[-1] == "connected" and msg.get("name") == name, timeout,
                f"worker {name} to connect")


def forced(m, ev, scheduler, builderid, n, timeout):
    """Force one build; returns (seconds from the POST to its finished event, the build)."""
    t0 = time.perf_counter()
    brid = m.force(scheduler, builderid, n)
    t1, _, build = ev.wait(
        lambda k, msg: k[0] == "builds" and k[-1] == "finished" and msg.get("buildrequestid") == brid,
        timeout, f"the build of buildrequest {brid}")
    if build.get("results") != 0:
        raise Fail(f"build {build.get('buildid')} ({scheduler}) ended with results={build.get('results')}"
                   f" ({build.get('state_string')})")
    return t1 - t0, build


def main(argv):
    if len(argv) < 3:
        raise Fail(__doc__)
    url, cmd, args = argv[1], argv[2], argv[3:]
    if cmd == "wait-worker":
        wait_worker(url, args[0], float(args[1]) if len(args) > 1 else 60.0)
        return
    if cmd not in ("force", "stream") or len(args) < 3:
        raise Fail(__doc__)
    scheduler, builder, n = args[0], args[1], int(args[2])
    timeout = float(args[3]) if len(args) > 3 else (60.0 if cmd == "force" else 1200.0)
    m = wait_master(url)
    ev = Events(m, ["builds/*/finished"])
    bid = m.builderid(builder)
    if cmd == "force":
        for i in range(1, n + 1):
            dt, _ = forced(m, ev, scheduler, bid, i, timeout)
            print(f"{dt * 1e3:.1f}", flush=True)
        return
    dt, build = forced(m, ev, scheduler, bid, 1, timeout)
    # Check the output arrived: the step's stdio log holds the n bytes of `yes` lines (64 bytes
    # each with the newline) besides its header lines.
    lines = 0
    for step in m.get(f"builds/{build['buildid']}/steps")["steps"]:
        for log in m.get(f"steps/{step['stepid']}/logs")["logs"]:
            if log["name"] == "stdio":
                lines += log["num_lines"]
    if lines < n // 64:
        raise Fail(f"the stream build's stdio log has {lines} lines, expected at least {n // 64}")
    print(f"{dt:.3f}", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv)
    except Fail as e:
        print(f"bb-drive: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001
        print(f"bb-drive: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
