"""Load: many API callers at once, and many tracked processes and connections at once.

Both run the real service in namespace `a` (harness.Service) on the real kernel.

* test_api_under_200_concurrent_clients: 200 API clients for 30 s (bench/load_api_clients.py,
  run inside namespace a, where the API listens on 127.0.0.1): every answer is JSON with the
  expected code, nothing 5xx, no connection error, and the state left afterwards is exactly what
  the mix must leave.
* test_1000_processes_10000_connections: 1,000 registered processes with 10 connections each
  (bench/load_fanout.py in a, bench/load_server.py in b), all open at once, then all closed:
  no thread of the service dies, every connection is logged with the exact bytes of a tcpdump
  capture (per connection, both directions, right job and PID), the service's RSS stays under
  500 MB. The SYNs go out in waves of 1,000: see the LIMIT noted above the test.

Figures (requests/s, latencies, phase times, RSS) are printed: run with `-s` to see them.
    .venv/bin/python -m pytest -s -q tests/test_load.py
"""
import json
import os
import re
import subprocess
import threading
import time
from collections import Counter

import psutil
import pytest

from harness import PYTHON, ROOT, Capture, Service
from nstools import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

BENCH = os.path.join(ROOT, "bench")
API_CLIENTS = os.path.join(BENCH, "load_api_clients.py")
FANOUT = os.path.join(BENCH, "load_fanout.py")
LOAD_SERVER = os.path.join(BENCH, "load_server.py")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """The service's VmRSS every `interval` s in a thread, until stop(); `peak` in KiB."""

    def __init__(self, pid, interval=0.25):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                kib = rss_kib(self.pid)
            except OSError:
                return
            self.samples.append((time.monotonic(), kib))
            self.peak = max(self.peak, kib)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        return self.peak


def assert_threads_alive(status):
    threads = status["threads"]
    assert threads, status
    for name, info in threads.items():
        assert info["alive"] is True and info["restarts"] == 0, (name, info)


def no_tracebacks(svc):
    out = svc.output()
    return [line for line in out.splitlines() if "Traceback" in line or " ERROR " in line or "failed" in line]


# --- a. the API under 200 concurrent callers -----------------------------------------------------------


def test_api_under_200_concurrent_clients(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])
    svc.start()
    try:
        sleepers = []

        def sleeper():
            proc = p.a.popen("sleep", "900")   # `ip netns exec` execs: the pid is sleep's
            sleepers.append(proc)
            return proc.pid, psutil.Process(proc.pid).create_time()

        stable = []
        for i in range(24):
            pid, birth = sleeper()
            stable.append({"job": f"load#stable#{i % 4}", "pid": pid, "birth": birth})
        cycle = []
        for i in range(40):
            pid, birth = sleeper()
            cycle.append({"job": f"load#cycle#{i % 4}", "pid": pid, "birth": birth})
        endonce = []
        for i in range(10):
            pid, birth = sleeper()
            endonce.append({"job": "load#endonce", "pid": pid, "birth": birth})
        eph = []
        for i in range(40):
            pid, birth = sleeper()
            eph.append({"pid": pid, "birth": birth})
        pid, birth = sleeper()
        foreign = {"pid": pid, "birth": birth}
        for s in stable + cycle + endonce:
            code, body = svc.start_profile(s["job"], s["pid"])
            assert code == 200, body

        plan_path = os.path.join(svc.dir, "plan.json")
        out_path = os.path.join(svc.dir, "api-load.json")
        with open(plan_path, "w") as f:
            json.dump({"stable": stable, "cycle": cycle, "endonce": endonce, "eph": eph, "foreign": foreign}, f)
        rss = RssSampler(svc.proc.pid)
        clients = p.a.popen(PYTHON, API_CLIENTS, "--port", str(svc.port), "--plan", plan_path, "--out", out_path,
                            "--clients", "200", "--procs", "4", "--duration", "30",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = clients.communicate(timeout=30 + 240)
        peak = rss.stop()
        assert clients.returncode == 0, err
        with open(out_path) as f:
            result = json.load(f)
        print(f"\nAPI load: {result['requests']} requests from {result['clients']} clients in {result['wall']} s: "
              f"{result['requests_per_s']} requests/s; latency p50 {result['latency_ms']['p50']} ms, "
              f"p90 {result['latency_ms']['p90']} ms, p99 {result['latency_ms']['p99']} ms, "
              f"max {result['latency_ms']['max']} ms; service RSS peak {peak / 1024:.1f} MB")
        print(f"  answers by code: {result['codes']}")
        print(f"  requests by kind: {result['by_kind']}")
        print(f"  ephemeral jobs started and ended: {result['eph_jobs']}")

        assert result["processes_reported"] == 4 and result["threads_stuck"] == 0, result
        assert result["unexpected"] == 0, json.dumps(result["problems"][:20], indent=1)
        assert not any(code.startswith("5") or code == "None" for code in result["codes"]), result["codes"]
        assert result["requests"] > 1000, result      # the mix really ran
        assert result["by_kind"].get("endonce") == len(endonce)
        assert result["by_kind"].get("cycle-end", 0) > 0 and result["eph_jobs"] > 0

        # The state the mix must have left: stable and cycle sleepers tracked in their jobs, the ended-once
        # job empty, no ephemeral job, no job made by a refused call, nothing else.
        code, status = svc.get("/status")
        assert code == 200
        want_jobs = {}
        for s in stable + cycle:
            want_jobs.setdefault(s["job"], []).append(s["pid"])
        want_jobs["load#endonce"] = []
        got_jobs = {job: info["processes"] for job, info in status["jobs"].items()}
        assert got_jobs == {job: sorted(pids) for job, pids in want_jobs.items()}
        assert status["tracked_processes"] == len(stable) + len(cycle)
        assert status["live_connections"] == 0 and status["installed_rules"] == 0
        assert_threads_alive(status)
        assert status["stats"]["errors"] == 0, status["stats"]
        for job, pids in want_jobs.items():
            code, answer = svc.get(f"/v1/jobs/{job.replace('#', '%23')}")
            assert code == 200 and answer["processes"] == sorted(pids)
        assert no_tracebacks(svc) == [], svc.output()[-3000:]
        assert svc.proc.poll() is None
    finally:
        svc.stop()


# --- b. 1,000 tracked processes, 10,000 connections at once ----------------------------------------------
#
# The scale is the one asked for (1,000 registered processes, 10 connections each, all 10,000 open at once,
# then all closed), but the SYNs are not all sent at once: the children are let go in waves of 100 (1,000
# SYNs: each child sends its 10 at once), the next wave when the last has connected, because NFQUEUE holds
# at most 4,096 SYNs (SynQueue max_len; the kernel drops the rest and the clients retry after 1, 3, 7 s).
# History (2-core test machine, 2026-11-23): at 9f7aaaf the full scale passed in ~130 s; at c56f871 the waves
# took 20-30 s each and the test ran past its 240 s, because attribution read every descriptor of every
# tracked process in turn and each StartProfile walked every tracked process (_scan_listeners). Since
# 237ae63 (descriptors guessed before they are listed, processes never looked at listed first, listeners
# scanned only for the new process, held SYNs committed every 256 or 20 ms) the full scale passes in ~120 s.
# Environment knobs, to reproduce the limits: NETPROF_LOAD_CHILDREN, NETPROF_LOAD_CONNS,
# NETPROF_LOAD_PATTERN (parallel: a child's SYNs at once; sequential: one after the other), NETPROF_LOAD_WAVE,
# NETPROF_LOAD_PYSPY=1 (py-spy dumps of the service every 20 s while the children connect, in its directory).

# The suite runs the full scale, 1,000 x 10 (about 110 s); NETPROF_LOAD_CHILDREN=300 a quicker one.
FAN_CHILDREN = int(os.environ.get("NETPROF_LOAD_CHILDREN", "1000"))
FAN_CONNS = int(os.environ.get("NETPROF_LOAD_CONNS", "10"))
FAN_PATTERN = os.environ.get("NETPROF_LOAD_PATTERN", "parallel")
FAN_WAVE = int(os.environ.get("NETPROF_LOAD_WAVE", "100"))
FAN_JOBS = 5
RSS_LIMIT_MB = 500


class LineReader:
    """JSON lines from a process's stdout, read by a thread, so that a read can time out."""

    def __init__(self, proc):
        import queue
        self.q = queue.Queue()
        self.proc = proc
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def get(self, timeout, what):
        import queue
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
        assert line is not None, f"process ended while waiting for {what}"
        return json.loads(line)


def pyspy_dump(pid, path):
    """A py-spy dump of every thread of `pid` (if py-spy is installed), appended to `path`."""
    exe = os.path.join(os.path.dirname(PYTHON), "py-spy")
    if not os.path.exists(exe):
        return
    r = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    with open(path, "a") as f:
        f.write(f"--- {time.strftime('%H:%M:%S')}\n{r.stdout}{r.stderr}\n")


def test_many_processes_and_connections_at_once(netpair):
    p = netpair
    n_children, per_child = FAN_CHILDREN, FAN_CONNS
    total = n_children * per_child
    # Room for every rule pair (2 rules a connection) and a log that does not rotate during the test.
    svc = Service(p.a, [p.iface_a], RULES_THRESHOLD=2 * total + 1000, MAX_BYTES=500_000_000)
    svc.start()
    fan = None
    timings = {}
    probe_stop = threading.Event()
    try:
        cap = Capture(p.a, p.iface_a, buffer_kib=262144)
        server = p.b.popen(PYTHON, LOAD_SERVER, "--bind", p.ip_b, "--port", "9500", stdout=subprocess.PIPE, text=True)
        assert json.loads(server.stdout.readline())["listening"] == 9500
        out_path = os.path.join(svc.dir, "fanout.jsonl")
        spy_path = os.path.join(svc.dir, "pyspy.txt")
        rss = RssSampler(svc.proc.pid)
        t0 = time.monotonic()
        fan = p.a.popen(PYTHON, FANOUT, "--connect", p.ip_b, "--port", "9500", "--children", str(n_children),
                        "--conns", str(per_child), "--api-port", str(svc.port), "--jobs", str(FAN_JOBS),
                        "--job-prefix", "fan#", "--out", out_path, "--pattern", FAN_PATTERN,
                        "--wave", str(FAN_WAVE),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lines = LineReader(fan)
        forked = lines.get(60, "children forked")
        pids = forked["pids"]
        assert len(pids) == n_children
        registered = lines.get(120, "registration")
        timings["register"] = registered["secs"]
        assert registered["ok"] == n_children, registered
        code, status = svc.get("/status")
        assert status["tracked_processes"] == n_children, status["tracked_processes"]

        # While the children connect, a caller asks /status once a second: how long the API waits behind the
        # attribution of held SYNs on the profiler thread (reported, not asserted: the test is about bytes).
        probes = []

        def probe():
            for _ in range(600):
                if probe_stop.wait(1.0):
                    return
                started = time.monotonic()
                code, _ = svc.get("/status")
                probes.append((code, time.monotonic() - started))
        prober = threading.Thread(target=probe, daemon=True)
        t1 = time.monotonic()
        fan.stdin.write("go\n")
        fan.stdin.flush()
        prober.start()
        spy_at = t1 + 20
        deadline = t1 + 240
        connected = None
        while connected is None:
            try:
                connected = lines.get(5, "connections")
            except AssertionError:
                assert time.monotonic() < deadline, "the children did not connect within 240 s"
                if time.monotonic() > spy_at and os.environ.get("NETPROF_LOAD_PYSPY"):
                    pyspy_dump(svc.proc.pid, spy_path)
                    print(f"py-spy dump of the service appended to {spy_path}")
                    spy_at = time.monotonic() + 20
        probe_stop.set()
        prober.join(60)
        timings["connect"] = connected["secs"]
        timings["connect_waves"] = connected.get("wave_secs")
        assert connected["errors"] == [] and connected["conns"] == total, connected

        def all_tracked():
            code, st = svc.get("/status")
            return st if code == 200 and st["live_connections"] == total else None
        status = wait_for(all_tracked, timeout=60, interval=0.5, what=f"{total} live connections")
        timings["all_tracked"] = round(time.monotonic() - t1, 2)
        assert status["installed_rules"] == 2 * total
        assert_threads_alive(status)
        rss_open = rss_kib(svc.proc.pid)
        cpu0, w0 = cpu_seconds(svc.proc.pid), time.monotonic()
        wait_for(lambda: time.monotonic() - w0 >= 5, timeout=10, interval=0.5, what="an idle 5 s")
        idle_cpu = 100 * (cpu_seconds(svc.proc.pid) - cpu0) / (time.monotonic() - w0)

        t2 = time.monotonic()
        fan.stdin.write("close\n")
        fan.stdin.flush()
        closed = lines.get(120, "connections closed")
        assert closed["children"] == n_children
        conns = []
        with open(out_path) as f:
            for line in f:
                r = json.loads(line)
                for lport, up, down, got in r["conns"]:
                    assert got == down
                    conns.append({"pid": r["pid"], "local": r["local"], "lport": lport,
                                  "job": f"fan#{pids.index(r['pid']) % FAN_JOBS}"})
        assert len(conns) == total
        keys = [(c["local"], c["lport"], p.ip_b, 9500) for c in conns]

        def all_logged():
            logged = svc.logged(p.iface_a)
            return logged if all(k in logged for k in keys) else None
        logged = wait_for(all_logged, timeout=180, interval=1.0, what=f"{total} connections logged")
        timings["all_logged_after_close"] = round(time.monotonic() - t2, 2)
        code, status = svc.get("/status")
        assert status["live_connections"] == 0 and status["installed_rules"] == 0, status
        assert_threads_alive(status)

        t3 = time.monotonic()
        fan.stdin.write("exit\n")
        fan.stdin.flush()
        assert lines.get(120, "children exited")["children"] == n_children
        fan.wait(60)
        wait_for(lambda: svc.get("/status")[1]["tracked_processes"] == 0, timeout=60, interval=0.5,
                 what="exited processes dropped by the sweep")
        timings["processes_dropped_after_exit"] = round(time.monotonic() - t3, 2)
        code, status = svc.get("/status")
        assert_threads_alive(status)
        assert status["stats"]["errors"] == 0 and status["stats"]["events_dropped"] == 0, status["stats"]
        assert status["stats"]["untracked_full"] == 0, status["stats"]

        cap_err = cap.stop()
        dropped = re.search(r"(\d+) packets dropped by kernel", cap_err)
        assert dropped and int(dropped.group(1)) == 0, cap_err   # else the capture is no ground truth
        t4 = time.monotonic()
        truth = cap.bytes()
        timings["pcap_read"] = round(time.monotonic() - t4, 2)
        logged = svc.logged(p.iface_a)
        bad = []
        job_truth = {}
        for c, key in zip(conns, keys):
            back = (key[2], key[3], key[0], key[1])
            out_entry, in_entry = logged.get(key), logged.get(back)
            want = (c["job"], c["pid"])
            jt = job_truth.setdefault(c["job"], [0, 0])
            jt[0] += truth.get(back, 0)
            jt[1] += truth.get(key, 0)
            if (out_entry is None or in_entry is None or out_entry[:3] != (*want, "OUT") or in_entry[:3] != (*want, "IN")
                    or out_entry[3] != truth.get(key) or in_entry[3] != truth.get(back)):
                bad.append((key, out_entry, truth.get(key), in_entry, truth.get(back)))
        assert bad == [], f"{len(bad)} of {total} connections wrong, e.g. {bad[:5]}"
        for j in range(FAN_JOBS):
            code, answer = svc.get(f"/endprofile/jobid=fan%23{j}")
            assert code == 200, answer
            t = answer["totals"]
            assert t["connections"] == total // FAN_JOBS and t["complete"] is True, t
            assert [t["in_bytes"], t["out_bytes"]] == job_truth[f"fan#{j}"]
        peak = rss.stop()
        timings["total"] = round(time.monotonic() - t0, 2)
        print(f"\n{n_children} processes x {per_child} connections = {total}: every connection logged, bytes exact "
              f"against the capture (per connection, both directions, job and pid)")
        print(f"  phases (s): {timings}")
        slow = sorted(t for _, t in probes)
        print(f"  GET /status while the children connected: {len(probes)} calls, answers "
              f"{dict(Counter(c for c, _ in probes))}, median {1000 * slow[len(slow) // 2] if slow else 0:.0f} ms, "
              f"max {1000 * slow[-1] if slow else 0:.0f} ms")
        print(f"  service CPU with {n_children} processes and {total} connections open, no traffic: "
              f"{idle_cpu:.0f}% of a core")
        print(f"  service RSS: peak {peak / 1024:.1f} MB, with all connections open {rss_open / 1024:.1f} MB")
        assert peak / 1024 < RSS_LIMIT_MB, f"service RSS peaked at {peak / 1024:.1f} MB"
        assert no_tracebacks(svc) == [], svc.output()[-3000:]
    finally:
        probe_stop.set()
        if fan is not None and fan.poll() is None:
            fan.terminate()        # it kills its children (by PID) first
            fan.wait(30)
        svc.stop(timeout=120)
