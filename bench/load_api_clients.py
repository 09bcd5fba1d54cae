#!/usr/bin/env python3
"""A bounded pool of concurrent API callers, for tests/test_load.py (run INSIDE the service's namespace).

  load_api_clients.py --port P --plan PLAN.json --out RESULT.json [--clients 200] [--procs 4] [--duration 30]

PLAN.json (written by the test) names the processes and jobs the mix may use:
  {"stable":  [{"job", "pid", "birth"}, ...],   tracked before the run; only re-registered (200, already_tracked)
   "cycle":   [...],   tracked before the run; each owned by one client, which ends and restarts it (200, 200)
   "eph":     [{"pid", "birth"}, ...],           not tracked; its owner runs whole job lifecycles on it:
                                                 start (200), GET job (200), DELETE job (200), GET job (404)
   "endonce": [...],   tracked before the run; its owner ends it once (200), first thing
   "foreign": {"pid", "birth"}}                  an untracked living process, for 409 cases

Each client is a thread making one HTTP/1.1 request per TCP connection (as the curl of a job hook does).
Clients are split over --procs processes (the GIL of one would be the bottleneck), all start together,
and stop at --duration, never inside a multi-step operation, so the service's final state is fixed by
the plan. Every answer is checked: status code as expected for its kind, body JSON, "status" ok/error.
RESULT.json: counts per kind and code, every unexpected answer (the first 50), latencies (p50/p90/p99/
max), requests per second. Exit code 0 (the test judges RESULT.json).
"""
import argparse
import http.client
import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from urllib.parse import quote

REQUEST_TIMEOUT = 30.0


def enc(job):
    return quote(job, safe="")


def legacy(kind, job, pid, birth, owner="root"):
    return f"/{kind}/jobid={enc(job)},pid={pid},owner={owner},birthdate={birth}"


class Caller:
    def __init__(self, port, record):
        self.port = port
        self.record = record     # (kind, method, path, want, code, body_ok, latency, detail) -> None

    def call(self, kind, method, path, want, body=None, check=None):
        """One request on a fresh connection; `want` is the expected status code."""
        t0 = time.perf_counter()
        code, data, detail = None, None, ""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
            try:
                headers = {"Connection": "close"}
                payload = None
                if body is not None:
                    payload = body.encode() if isinstance(body, str) else body
                    headers["Content-Type"] = "application/json"
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                code = resp.status
            finally:
                conn.close()
            try:
                data = json.loads(raw)
            except ValueError:
                detail = f"not JSON: {raw[:120]!r}"
        except (OSError, http.client.HTTPException) as exc:
            detail = f"connection error: {type(exc).__name__}: {exc}"
        latency = time.perf_counter() - t0
        ok = code == want and isinstance(data, dict)
        if ok:
            expected_status = "ok" if code == 200 else "error"
            # Every answer says "status": ok or error, except /status's own document.
            if data.get("status", "ok" if kind == "status" else None) != expected_status:
                ok, detail = False, f"body status {data.get('status')!r}, want {expected_status!r}"
        if ok and check is not None:
            problem = check(data)
            if problem:
                ok, detail = False, problem
        self.record(kind, method, path, want, code, ok, latency, detail)
        return code, data


def malformed_cases(plan):
    """(kind, method, path, body, expected code): bad input never changes the service's state."""
    st = plan["stable"][0]
    fo = plan["foreign"]
    return [
        ("bad-pid", "GET", "/startprofile/jobid=x,pid=abc,owner=root,birthdate=1", None, 400),
        ("bad-pid-neg", "GET", "/startprofile/jobid=x,pid=-5,owner=root,birthdate=1", None, 400),
        ("bad-pid-huge", "GET", "/startprofile/jobid=x,pid=" + "9" * 40 + ",owner=root,birthdate=1", None, 400),
        ("missing-pid", "GET", "/startprofile/jobid=x,owner=root,birthdate=1", None, 400),
        ("bad-birth", "GET", "/startprofile/jobid=x,pid=1,owner=root,birthdate=nan", None, 400),
        ("bad-utf8", "GET", "/startprofile/jobid=x%ff,pid=1,owner=root,birthdate=1", None, 400),
        ("unknown-field", "GET", "/startprofile/jobid=x,pid=1,owner=root,birthdate=1,colour=red", None, 400),
        ("no-such-pid", "GET", "/startprofile/jobid=load%23ghost,pid=4000000,owner=root,birthdate=1", None, 404),
        ("wrong-owner", "GET", legacy("startprofile", "load#ghost", fo["pid"], fo["birth"], "nobody"), None, 409),
        ("pid-reused", "GET", legacy("startprofile", "load#ghost", fo["pid"], fo["birth"] - 500), None, 409),
        ("other-job", "GET", legacy("startprofile", "load#conflict", st["pid"], st["birth"]), None, 409),
        ("end-unknown-job", "GET", "/endprofile/jobid=load%23never", None, 404),
        ("endproc-unknown-job", "GET", "/endprocessprofile/jobid=load%23never,pid=1,owner=root,birthdate=1",
         None, 404),
        ("no-endpoint", "GET", "/no/such/thing", None, 404),
        ("rest-not-json", "POST", "/v1/jobs/load%23ghost/processes", "{not json", 400),
        ("rest-not-object", "POST", "/v1/jobs/load%23ghost/processes", "[1, 2]", 400),
        ("rest-missing", "POST", "/v1/jobs/load%23ghost/processes", json.dumps({"pid": fo["pid"]}), 400),
        ("rest-delete-unknown", "DELETE", "/v1/jobs/load%23never", None, 404),
        ("rest-delproc-unknown", "DELETE", "/v1/jobs/load%23never/processes/1?owner=root&birthdate=1", None, 404),
        ("method", "PUT", "/status", "", 405),
        ("method-get-processes", "GET", "/v1/jobs/load%23ghost/processes", None, 405),
    ]


def expect_processes(pids):
    want = sorted(pids)

    def check(data):
        got = data.get("processes")
        return None if got == want else f"processes {got}, want {want}"
    return check


def client_thread(index, plan, args, caller, deadline, start_evt, counters):
    rnd = random.Random(args.seed * 1000 + index)
    stable = plan["stable"]
    stable_jobs = sorted({s["job"] for s in stable})
    stable_by_job = {j: [s["pid"] for s in stable if s["job"] == j] for j in stable_jobs}
    cycle, eph, endonce = plan["cycle"], plan["eph"], plan["endonce"]
    n_cycle, n_eph = len(cycle), len(eph)
    owned = None
    if index < n_cycle:
        owned = ("cycle", cycle[index])
    elif index < n_cycle + n_eph:
        owned = ("eph", eph[index - n_cycle])
    elif index < n_cycle + n_eph + len(endonce):
        owned = ("endonce", endonce[index - n_cycle - n_eph])
    bad = malformed_cases(plan)
    eph_round = 0
    start_evt.wait()
    first = True
    while time.monotonic() < deadline:
        if owned and owned[0] == "endonce" and first:
            p = owned[1]
            caller.call("endonce", "GET", legacy("endprocessprofile", p["job"], p["pid"], p["birth"]), 200)
            owned = None
            first = False
            continue
        first = False
        r = rnd.random()
        if r < 0.18:
            path = rnd.choice(["/status", "/v1/status", "/status/"])
            caller.call("status", "GET", path, 200,
                        check=lambda d: None if d.get("ready") is True else "status not ready")
        elif r < 0.32:
            job = rnd.choice(stable_jobs)
            caller.call("job-get", "GET", f"/v1/jobs/{enc(job)}", 200, check=expect_processes(stable_by_job[job]))
        elif r < 0.40:
            caller.call("job-get-unknown", "GET", f"/v1/jobs/{enc(f'load#unknown#{rnd.randrange(10**6)}')}", 404)
        elif r < 0.58:
            s = rnd.choice(stable)
            check = (lambda d: None if d.get("already_tracked") is True else "not already_tracked")
            if rnd.random() < 0.5:
                caller.call("restart", "GET", legacy("startprofile", s["job"], s["pid"], s["birth"],
                                                     rnd.choice(["root", "0"])), 200, check=check)
            else:
                caller.call("restart-rest", "POST", f"/v1/jobs/{enc(s['job'])}/processes", 200,
                            body=json.dumps({"pid": s["pid"], "owner": "root", "birthdate": s["birth"]}),
                            check=check)
        elif r < 0.78 and owned:
            kind, p = owned
            if kind == "cycle":
                if rnd.random() < 0.5:
                    caller.call("cycle-end", "GET", legacy("endprocessprofile", p["job"], p["pid"], p["birth"]), 200)
                    caller.call("cycle-start", "GET", legacy("startprofile", p["job"], p["pid"], p["birth"]), 200,
                                check=lambda d: None if d.get("already_tracked") is False else "already tracked")
                else:
                    caller.call("cycle-end", "DELETE",
                                f"/v1/jobs/{enc(p['job'])}/processes/{p['pid']}?owner=root&birthdate={p['birth']}",
                                200)
                    caller.call("cycle-start", "POST", f"/v1/jobs/{enc(p['job'])}/processes", 200,
                                body=json.dumps({"pid": p["pid"], "owner": "0", "birthdate": p["birth"]}),
                                check=lambda d: None if d.get("already_tracked") is False else "already tracked")
            else:   # a whole job's life on an ephemeral sleeper
                eph_round += 1
                job = f"load#eph#{index}#{eph_round}"
                caller.call("eph-start", "GET", legacy("startprofile", job, p["pid"], p["birth"]), 200)
                caller.call("eph-get", "GET", f"/v1/jobs/{enc(job)}", 200, check=expect_processes([p["pid"]]))
                method, path = rnd.choice([("DELETE", f"/v1/jobs/{enc(job)}"), ("GET", f"/endprofile/jobid={enc(job)}"),
                                           ("GET", f"/endjobprofile/jobid={enc(job)}")])
                caller.call("eph-end", method, path, 200,
                            check=lambda d: None if d.get("totals", {}).get("connections") == 0 else "totals")
                caller.call("eph-gone", "GET", f"/v1/jobs/{enc(job)}", 404)
                counters["eph_jobs"] += 1
        else:
            kind, method, path, body, want = rnd.choice(bad)
            caller.call("bad:" + kind, method, path, want, body=body)


def run_process(proc_index, thread_indices, plan, args, start_at, out_q):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    latencies = []
    by_kind = Counter()
    codes = Counter()
    problems = []
    lock = threading.Lock()
    counters = Counter()

    def record(kind, method, path, want, code, ok, latency, detail):
        with lock:
            latencies.append(latency)
            by_kind[kind] += 1
            codes[str(code)] += 1
            if not ok:
                counters["unexpected"] += 1
                if len(problems) < 50:
                    problems.append({"kind": kind, "method": method, "path": path, "want": want, "code": code,
                                     "detail": detail})

    caller = Caller(args.port, record)
    start_evt = threading.Event()
    deadline = start_at + args.duration
    threads = [threading.Thread(target=client_thread, args=(i, plan, args, caller, deadline, start_evt, counters),
                                daemon=True) for i in thread_indices]
    for t in threads:
        t.start()
    time.sleep(max(0.0, start_at - time.monotonic()))
    start_evt.set()
    # Bounded: every request has a timeout, so each thread ends within duration + a few timeouts.
    for t in threads:
        t.join(args.duration + 4 * REQUEST_TIMEOUT)
    alive = sum(t.is_alive() for t in threads)
    out_q.put({"proc": proc_index, "latencies": latencies, "by_kind": dict(by_kind), "codes": dict(codes),
               "problems": problems, "unexpected": counters["unexpected"], "eph_jobs": counters["eph_jobs"],
               "threads_stuck": alive})


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)
    owned = len(plan["cycle"]) + len(plan["eph"]) + len(plan["endonce"])
    if owned > args.clients:
        sys.exit(f"the plan has {owned} owned processes for {args.clients} clients")
    ctx = multiprocessing.get_context("fork")
    out_q = ctx.Queue()
    start_at = time.monotonic() + 1.0 + 0.05 * args.procs      # every thread is up before any starts
    procs = []

    def on_term(signum, frame):
        # Ended from outside (a failing test's cleanup): end our workers, by PID, then ourselves.
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        os._exit(1)
    signal.signal(signal.SIGTERM, on_term)
    for p in range(args.procs):
        indices = list(range(p, args.clients, args.procs))
        proc = ctx.Process(target=run_process, args=(p, indices, plan, args, start_at, out_q), daemon=True)
        proc.start()
        procs.append(proc)
    results = []
    limit = time.monotonic() + args.duration + 6 * REQUEST_TIMEOUT
    while len(results) < len(procs) and time.monotonic() < limit:
        try:
            results.append(out_q.get(timeout=1.0))
        except Exception:
            if all(not p.is_alive() for p in procs) and out_q.empty():
                break
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    wall = time.monotonic() - start_at
    latencies = [x for r in results for x in r["latencies"]]
    by_kind, codes = Counter(), Counter()
    for r in results:
        by_kind.update(r["by_kind"])
        codes.update(r["codes"])
    summary = {
        "clients": args.clients, "procs": args.procs, "duration": args.duration, "wall": round(wall, 2),
        "processes_reported": len(results),
        "requests": len(latencies), "requests_per_s": round(len(latencies) / max(wall, 1e-9), 1),
        "latency_ms": {name: (None if percentile(latencies, p) is None else round(1000 * percentile(latencies, p), 2))
                       for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "by_kind": dict(sorted(by_kind.items())), "codes": dict(sorted(codes.items())),
        "unexpected": sum(r["unexpected"] for r in results),
        "problems": [p for r in results for p in r["problems"]][:50],
        "eph_jobs": sum(r["eph_jobs"] for r in results),
        "threads_stuck": sum(r["threads_stuck"] for r in results),
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("requests", "requests_per_s", "latency_ms", "unexpected")}), flush=True)


if __name__ == "__main__":
    main()
