#!/usr/bin/env python3
"""Performance of NetProfiler against the 2011 design and against the rule-free data path.

  .venv/bin/python bench/run.py           full run: 100 and 5,000 live tracked connections, 20,000
                                          foreign sockets, 30 s of sustained connections, RSS at 10,000
  .venv/bin/python bench/run.py --quick   the same at small scale, within 60 s

Builds its own two network namespaces (veth, 10.231.0.0/16), runs the real service (main.py)
in one, and removes everything it made on exit, error, SIGTERM or Ctrl-C. Prints a table,
and as its last line one JSON object with every figure. Progress goes to stderr. Root only.
"""
import argparse
import glob
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import phases  # noqa: E402
import pyspy  # noqa: E402
from env import Env, ensure_tools  # noqa: E402
from measure import NeighbourLoad, machine_busy_percent  # noqa: E402
from report import table  # noqa: E402

SCALES = {
    "quick": dict(live=[50, 300], foreign=2000, probes=40, harvest_k=200, churn_secs=4, churn_rate=2200, churn16_secs=2, ref_churn_secs=2,
                  iperf_secs=1, iperf_reps=1, calibrate=False, rss_at=1000, idle_secs=1.5, idle_cycle_secs=1.5, base_probes=6, base_churn_secs=2, parallel=16,
                  drain_secs=20),
    "full": dict(live=[100, 5000], foreign=20000, probes=200, harvest_k=1000, churn_secs=30, churn_rate=2200, churn16_secs=10, ref_churn_secs=5,
                 iperf_secs=5, iperf_reps=3, calibrate=True, rss_at=10000, idle_secs=5, idle_cycle_secs=65, base_probes=30, base_churn_secs=10, parallel=16,
                 drain_secs=120),
}


PHASES = ("latency", "harvest", "churn", "dataplane", "memory", "shutdown")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def code_version():
    """The commit, and whether the service's files differ from it (another engineer may be editing them)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()  # noqa
    digest = hashlib.sha1()
    for name in sorted(glob.glob(os.path.join(root, "profiler", "*.py"))) + [os.path.join(root, "main.py")]:
        with open(name, "rb") as f:
            digest.update(f.read())
    return {"head": git("rev-parse", "--short", "HEAD"), "service_sha1": digest.hexdigest()[:12],
            "uncommitted": git("status", "--porcelain", "--", "profiler", "main.py").splitlines()}


def summary(r, s):
    keys = ("syn_to_rule_p50_ms", "syn_to_rule_p99_ms", "harvest_per_s", "conn_per_s", "missed", "dataplane_ratio",
            "dataplane_ratio_1500", "dataplane_ratio_tracked", "dataplane_ratio_tracked_1500", "dataplane_ratio_down",
            "dataplane_ratio_1500_down", "dataplane_ratio_tracked_down", "dataplane_ratio_tracked_1500_down", "rss_mb",
            "rss_at_connections", "idle_cpu_pct", "live_connections", "base_syn_to_rule_p50_ms",
            "base_syn_to_rule_p99_ms", "base_harvest_per_s", "base_conn_per_s", "base_missed")
    out = {k: r.get(k) for k in keys}

    def ratio(a, b):
        return round(a / b, 2) if a is not None and b else None
    out["ratio_syn_to_rule_p50_vs_baseline"] = ratio(r.get("base_syn_to_rule_p50_ms"), r.get("syn_to_rule_p50_ms"))
    out["ratio_syn_to_rule_p99_vs_baseline"] = ratio(r.get("base_syn_to_rule_p99_ms"), r.get("syn_to_rule_p99_ms"))
    out["ratio_harvest_vs_baseline"] = ratio(r.get("harvest_per_s"), r.get("base_harvest_per_s"))
    out["ratio_conn_per_s_vs_baseline"] = ratio(r.get("conn_per_s"), r.get("base_conn_per_s"))
    out["ratio_conn_per_s_vs_baseline_capacity"] = ratio(r.get("conn_per_s"), r.get("base_capacity_per_s"))
    out["ratio_conn_per_s_vs_rule_free"] = ratio(r.get("conn_per_s"), r.get("ref_conn_per_s"))
    out["ratio_connect_p50_vs_rule_free"] = ratio(r.get("syn_to_rule_p50_ms"), r.get("ref_connect_p50_ms"))
    return {**out, **{k: v for k, v in r.items() if k not in out}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small scale, within 60 seconds")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the 2011 baseline")
    parser.add_argument("--profile", metavar="DIR", help="sample the service with py-spy in each phase, into DIR")
    parser.add_argument("--phases", metavar="LIST", default=",".join(PHASES),
                        help="the service's phases to run, comma-separated, from: " + ", ".join(PHASES)
                        + " (latency opens the live connections the others need)")
    args = parser.parse_args()
    wanted = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown phase {', '.join(unknown)} (known: {', '.join(PHASES)})")
    if os.geteuid() != 0:
        sys.exit("bench/run.py must run as root (namespaces, netfilter)")
    s = dict(SCALES["quick" if args.quick else "full"])
    r = {"mode": "quick" if args.quick else "full", "notes": ensure_tools(), "code": code_version()}
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    r["background_busy_pct_start"] = machine_busy_percent()
    env = svc = client = None
    failed = None
    load = NeighbourLoad().__enter__()
    try:
        phases.say(f"namespaces, servers, {s['foreign']} foreign sockets")
        env = Env(s["foreign"])
        r["foreign_sockets"] = env.foreign_count
        client = env.client()
        load.phase = "reference"
        phases.reference(env, client, s, r)
        svc = phases.start_service(env)
        for phase in [getattr(phases, f"service_{name}") for name in PHASES if name in wanted]:
            load.phase = phase.__name__
            with pyspy.recording(svc.proc.pid, args.profile, phase.__name__) as path:
                phase(env, svc, client, s, r)
            if path:
                r.setdefault("profile", {})[phase.__name__] = pyspy.top(path, n=8)
        if not args.skip_baseline:
            load.phase = "baseline"
            phases.baseline(env, client, s, r)
    except (Exception, KeyboardInterrupt) as exc:
        failed = f"{type(exc).__name__}: {exc}"
        phases.say(f"FAILED: {failed}")
    finally:
        if svc is not None:
            phases.stop_service(svc, timeout=120)
            if failed and os.path.exists(svc.out_path):
                print(svc.output()[-3000:], file=sys.stderr)
            shutil.rmtree(svc.dir, ignore_errors=True)
        if env is not None:
            env.close()
    load.__exit__()
    r["neighbour_cpu_pct"] = load.by_phase()
    r["elapsed_s"] = round(time.monotonic() - started, 1)
    r["background_busy_pct_end"] = machine_busy_percent(0.5)
    r["machine"] = f"{os.cpu_count()} cores, {platform.release()}"
    if failed:
        r["error"] = failed
    print(table(r, s))
    print("other processes' CPU (% of one core, mean/max) by phase: " + ", ".join(
        f"{k} {v['mean']}/{v['max']}" for k, v in r["neighbour_cpu_pct"].items()))
    print(json.dumps(summary(r, s)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
