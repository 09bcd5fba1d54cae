"""The measurements, one function per phase; each adds its figures to the dict `r`.

Phases run in this order on one Env: rule-free references (no service), the service, then the
2011 baseline (service stopped, the same namespaces and sockets).
"""
import os
import signal
import subprocess
import sys
import time
from statistics import median

from env import HOLD_PORT, IPERF_PORT, SHORT_PORT
from measure import idle_cpu_percent, iperf, ms, read_log, rss_mb, wait_counted, wait_logged, written_at

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from harness import Service  # noqa: E402

JOB = "bench#1.0#1"
OPEN_DEADLINE = 900   # seconds an `open` of many connections may take before the rest count as failed
# Enough rules for the largest scale: the default (1,000) would leave connections untracked.
RULES_THRESHOLD = 100_000
# A logged short connection's OUT bytes are at least its payload plus one 40-byte header (IN: what it got + 40).
SHORT_OUT_MIN = 64 + 40


def say(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _dataplane(env, s, configs, reverse=False):
    """{"tso"|"1500": {name: [Gbit/s per repetition]}}, the configs interleaved repetition by repetition,
    so that a paired ratio compares runs made moments apart (the machine has 2 cores and neighbours).
    With `reverse` the keys are "tso_down"|"1500_down": downloads, whose data packets walk the rules
    of INPUT (an upload's data leaves as large GSO packets, cut up after netfilter; its ACKs come in)."""
    out = {}
    for tso in (True, False):
        env.offloads(tso)
        runs = {name: [] for name in configs}
        names = list(configs)
        for rep in range(s["iperf_reps"]):
            for name in names[rep % len(names):] + names[:rep % len(names)]:   # no config always goes first
                run, ip = configs[name]
                runs[name].append(iperf(run, ip, IPERF_PORT, s["iperf_secs"], reverse))
        out[("tso" if tso else "1500") + ("_down" if reverse else "")] = runs
    env.offloads(True)
    return out


def _paired(runs, name, ref="ref"):
    return round(median(a / b for a, b in zip(runs[name], runs[ref])), 3)


# An untracked flow is another user's (nobody's): the SYN hold knows the tracked jobs' owner (root
# here), not their processes, so root's own untracked flows would be held, left without the fast
# path's label, and walk the rules as a tracked one does (the "tracked" rows measure that walk).
OTHER_USER = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def _untracked_run(env, secs, ns=None):
    ns = ns or env.pair.a
    return lambda argv: ns.run(*OTHER_USER, *argv, check=False, timeout=secs + 30).stdout


# --- rule-free references ------------------------------------------------------------------


def reference(env, client, s, r):
    ip_b = env.pair.ip_b
    say("rule-free references (no service)")
    probe = client.call("probe", host=ip_b, port=SHORT_PORT, n=s["probes"])
    r["ref_connect_p50_ms"], r["ref_connect_p99_ms"] = ms(probe["lat"], 50), ms(probe["lat"], 99)
    churn = client.call("churn", host=ip_b, port=SHORT_PORT, secs=s["ref_churn_secs"], parallel=s["parallel"],
                        timeout=s["ref_churn_secs"] + 60)
    r["ref_conn_per_s"] = round(len(churn["conns"]) / churn["secs"], 1)
    if s["calibrate"]:
        say("rule-free references: iperf3 on both links, no service (are the two links alike?)")
        run = _untracked_run(env, s["iperf_secs"])
        dp = _dataplane(env, s, {"ref": (run, env.ref_ip_b), "main": (run, ip_b)})
        for key, runs in dp.items():
            r[f"noservice_gbps_{key}"] = round(median(runs["main"]), 2)
            r[f"link_ratio_{key}"] = _paired(runs, "main")


# --- the service -----------------------------------------------------------------------------


def start_service(env):
    svc = Service(env.pair.a, [env.pair.iface_a], RULES_THRESHOLD=RULES_THRESHOLD)
    svc.start(timeout=60)
    with open(f"/proc/{svc.proc.pid}/cmdline", "rb") as f:
        assert b"main.py" in f.read(), "the service's pid is not main.py"
    return svc


def stop_service(svc, timeout=300):
    """SIGTERM and wait; seconds the shutdown took (it harvests everything still open)."""
    if svc.proc is None or svc.proc.poll() is not None:
        return None
    t0 = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    try:
        svc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        svc.proc.kill()
        svc.proc.wait(10)
        return None
    return round(time.monotonic() - t0, 2)


def _open_to(client, env, total, r, key):
    have = client.call("tuples")["conns"]
    need = total - len(have)
    if need > 0:
        ans = client.call("open", host=env.pair.ip_b, port=HOLD_PORT, n=need, deadline=OPEN_DEADLINE,
                          timeout=OPEN_DEADLINE + 60)
        if ans["failed"]:
            r.setdefault("notes", []).append(f"{ans['failed']} of {need} connections failed to open ({key})")
        r[key] = round(ans["opened"] / ans["secs"], 1)
    return len(client.call("tuples")["conns"])


def service_latency(env, svc, client, s, r):
    say("service: idle CPU with no connections")
    r["idle_cpu_pct_0"] = round(idle_cpu_percent(svc.proc.pid, s["idle_secs"]), 1)
    code, ans = svc.start_profile(JOB, client.pid)
    assert code == 200, ans
    for n in s["live"]:
        say(f"service: opening up to {n} live tracked connections")
        live = _open_to(client, env, n, r, f"open_per_s_{n}")
        say(f"service: {s['probes']} probes with {live} live")
        probe = client.call("probe", host=env.pair.ip_b, port=SHORT_PORT, n=s["probes"], timeout=600)
        r[f"syn_to_rule_p50_ms_{n}"], r[f"syn_to_rule_p99_ms_{n}"] = ms(probe["lat"], 50), ms(probe["lat"], 99)
        r[f"syn_to_rule_max_ms_{n}"] = ms(probe["lat"], 100)
        r[f"probe_errors_{n}"] = probe["errors"]
    n = s["live"][-1]
    r["live_connections"] = n
    r["syn_to_rule_p50_ms"], r["syn_to_rule_p99_ms"] = r[f"syn_to_rule_p50_ms_{n}"], r[f"syn_to_rule_p99_ms_{n}"]
    status = svc.get("/status")[1]
    r["status_live"], r["status_rules"] = status["live_connections"], status["installed_rules"]
    r["untracked_full"] = status["stats"]["untracked_full"]


def _harvest_metrics(svc):
    """(seconds, batches, connections) the service has spent harvesting so far, from /metrics."""
    code, text = svc.get("/metrics")
    values = {}
    for line in str(text).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("netprof_harvest_seconds_sum", "netprof_harvest_seconds_count",
                                            "netprof_harvested_connections_total"):
            values[parts[0]] = float(parts[1])
    return (values.get("netprof_harvest_seconds_sum", 0.0), values.get("netprof_harvest_seconds_count", 0.0),
            values.get("netprof_harvested_connections_total", 0.0))


def service_harvest(env, svc, client, s, r):
    k = s["harvest_k"]
    say(f"service: harvest of {k} connections closed at once")
    client.call("open", host=env.pair.ip_b, port=HOLD_PORT, n=k, group="harvest", deadline=OPEN_DEADLINE,
                timeout=OPEN_DEADLINE + 60)
    time.sleep(2.0)   # the probes' connections are harvested before we start counting
    before = _harvest_metrics(svc)
    closed = client.call("close", group="harvest")
    ip_b = env.pair.ip_b
    keys = [(local, lport, ip_b, HOLD_PORT) for local, lport in closed["conns"]]
    log, missing = wait_logged(svc.log_dir, env.pair.iface_a, keys, timeout=s["drain_secs"])
    times = written_at(log, keys)
    linger = 1.0   # CLOSE_LINGER, the default
    total = max(times) - closed["t_close"] if times else None
    r["harvest_k"] = k
    r["harvest_unlogged"] = len(missing)
    r["harvest_total_s"] = round(total, 3) if total else None
    r["harvest_first_s"] = round(min(times) - closed["t_close"], 3) if times else None
    r["harvest_per_s"] = round(len(times) / max(total - linger, 1e-3), 1) if times else 0.0
    after = _harvest_metrics(svc)
    busy, batches, conns = (a - b for a, b in zip(after, before))
    r["harvest_busy_s"], r["harvest_batches"] = round(busy, 4), int(batches)
    r["harvest_busy_per_s"] = round(conns / busy, 1) if busy else None


def _short_missed(ans, log, ip_b):
    """Logged short connections whose bytes fall short of what they certainly sent and got."""
    short = 0
    for local, lport, got in ans["conns"]:
        out = log.get((local, lport, ip_b, SHORT_PORT))
        if out is not None and (out[0] < SHORT_OUT_MIN
                                or log.get((ip_b, SHORT_PORT, local, lport), (0,))[0] < got + 40):
            short += 1
    return short


def service_churn(env, svc, client, s, r):
    """New tracked connections at the target rate (open loop), then 16 clients each waiting for the last."""
    secs, rate, ip_b = s["churn_secs"], s["churn_rate"], env.pair.ip_b
    net = env.pair.ip_a.rsplit(".", 1)[0]
    # 60,000 connections to one server port would reuse 4-tuples (28,232 ephemeral ports, and the
    # kernel's choice wraps sooner with many connections in flight): 64 source addresses, each with
    # its own ports. Should a 4-tuple repeat anyway, each use must still have its own record.
    sources = [f"{net}.{100 + i}" for i in range(64)]
    for ip in sources:
        env.pair.a.run("ip", "addr", "add", f"{ip}/24", "dev", env.pair.iface_a)
    try:
        say(f"service: {rate} new tracked connections a second for {secs}s (open loop)")
        ans = client.call("churn_rate", host=ip_b, port=SHORT_PORT, rate=rate, secs=secs, sources=sources,
                          timeout=secs + 300)
    finally:
        for ip in sources:
            env.pair.a.run("ip", "addr", "del", f"{ip}/24", "dev", env.pair.iface_a, check=False)
    t_end = time.monotonic()
    out_keys = [(local, lport, ip_b, SHORT_PORT) for local, lport, _ in ans["conns"]]
    r["churn_repeated_tuples"] = len(out_keys) - len(set(out_keys))
    if r["churn_repeated_tuples"]:
        r["notes"].append(f"churn: {r['churn_repeated_tuples']} 4-tuples repeated; their records cannot be told apart")
    log, missing = wait_logged(svc.log_dir, env.pair.iface_a, out_keys, timeout=s["drain_secs"])
    expected = {}
    for k in out_keys:
        expected[k] = expected.get(k, 0) + 1
    unlogged = wait_counted(svc.log_dir, env.pair.iface_a, expected, timeout=s["drain_secs"])
    r["churn_drain_s"] = round(time.monotonic() - t_end, 2)
    short = _short_missed(ans, log, ip_b)
    r["conn_offered_per_s"] = rate
    r["conn_made"] = len(ans["conns"])
    r["conn_errors"] = ans["errors"]
    r["conn_per_s"] = round(len(ans["conns"]) / ans["secs"], 1) if ans["conns"] else 0.0
    r["churn_connect_p50_ms"], r["churn_connect_p99_ms"] = ans["connect_p50_ms"], ans["connect_p99_ms"]
    r["churn_max_inflight"], r["churn_offer_late_s"] = ans["max_inflight"], ans["offer_late_s"]
    r["churn_not_started"] = ans["not_started"]
    r["missed"] = unlogged + short + ans["errors"]
    r["missed_unlogged"], r["missed_short_bytes"] = unlogged, short

    secs16 = s["churn16_secs"]
    say(f"service: new tracked connections for {secs16}s, {s['parallel']} clients each waiting for its last")
    ans = client.call("churn", host=ip_b, port=SHORT_PORT, secs=secs16, parallel=s["parallel"], timeout=secs16 + 300)
    keys = [(local, lport, ip_b, SHORT_PORT) for local, lport, _ in ans["conns"]]
    log, missing = wait_logged(svc.log_dir, env.pair.iface_a, keys, timeout=s["drain_secs"])
    r["conn_per_s_closed16"] = round(len(ans["conns"]) / ans["secs"], 1)
    r["conn_made_closed16"] = len(ans["conns"])
    r["missed_closed16"] = len(missing) + _short_missed(ans, log, ip_b) + ans["errors"]


def service_dataplane(env, svc, client, s, r):
    n = r["live_connections"]
    say(f"service: iperf3 with {n} live connections' rules, interleaved with the unwatched link (no rules)")
    untracked = _untracked_run(env, s["iperf_secs"])
    tracked = lambda argv: client.call("exec", argv=argv, limit=s["iperf_secs"] + 30,  # noqa: E731
                                       timeout=s["iperf_secs"] + 60)["stdout"]
    # untracked: a flow of nobody's job, it passes every rule; tracked: a child of the tracked client,
    # its rules are the newest and so the first in the chains.
    configs = {"ref": (untracked, env.ref_ip_b), "untracked": (untracked, env.pair.ip_b),
               "tracked": (tracked, env.pair.ip_b), "bare": (_untracked_run(env, s["iperf_secs"], env.bare.a),
                                                             env.bare.ip_b)}
    dp = _dataplane(env, s, configs)
    dp.update(_dataplane(env, s, configs, reverse=True))
    for key, runs in dp.items():
        r[f"ref_gbps_{key}"] = round(median(runs["ref"]), 2)
        r[f"gbps_{key}"] = round(median(runs["untracked"]), 2)
        r[f"gbps_tracked_{key}"] = round(median(runs["tracked"]), 2)
        r[f"bare_gbps_{key}"] = round(median(runs["bare"]), 2)
    for key, suffix in (("tso", ""), ("1500", "_1500"), ("tso_down", "_down"), ("1500_down", "_1500_down")):
        r[f"dataplane_ratio{suffix}"] = _paired(dp[key], "untracked")
        r[f"dataplane_ratio_tracked{suffix}"] = _paired(dp[key], "tracked")
        # Against no service at all: what conntrack, the service's tables and its rules cost together.
        r[f"dataplane_ratio_vs_bare{suffix}"] = _paired(dp[key], "untracked", "bare")
        r[f"ref_ratio_vs_bare{suffix}"] = _paired(dp[key], "ref", "bare")


def service_memory(env, svc, client, s, r):
    n = r["live_connections"]
    time.sleep(1.5)   # let the churn's lingering connections go
    r[f"idle_cpu_pct_{n}"] = round(idle_cpu_percent(svc.proc.pid, s["idle_secs"]), 1)
    r[f"rss_mb_{n}"] = round(rss_mb(svc.proc.pid), 1)
    target = s["rss_at"]
    say(f"service: opening up to {target} tracked connections for RSS and idle CPU")
    live = _open_to(client, env, target, r, f"open_per_s_{target}")
    time.sleep(1.0)
    r["rss_at_connections"] = live
    r["rss_mb"] = round(rss_mb(svc.proc.pid), 1)
    r["idle_cpu_pct_first"] = round(idle_cpu_percent(svc.proc.pid, s["idle_secs"]), 1)
    status = svc.get("/status")[1]
    r["status_live_at_rss"], r["status_rules_at_rss"] = status["live_connections"], status["installed_rules"]
    r["capture_at_rss"] = status.get("interfaces")   # received and dropped packets per interface
    # The figure: a window holding every periodic check once (the full check of every rule runs
    # once a minute: VERIFY_INTERVAL 10 s, FULL_VERIFY_EVERY 6), right after the first.
    r["idle_cpu_pct"] = round(idle_cpu_percent(svc.proc.pid, s["idle_cycle_secs"]), 1)


def service_shutdown(env, svc, client, s, r):
    say("service: shutdown (harvests every live connection)")
    n = len(client.call("tuples")["conns"])
    r["shutdown_s"] = stop_service(svc)
    tuples = client.call("tuples")["conns"]
    log = read_log(svc.log_dir, env.pair.iface_a)
    r["shutdown_unlogged"] = sum(1 for local, lport, remote, rport in tuples
                                 if (local, lport, remote, rport) not in log)
    r["shutdown_connections"] = n


# --- the 2011 baseline ------------------------------------------------------------------------


def baseline(env, client, s, r):
    iface, ip_b = env.pair.iface_a, env.pair.ip_b
    for i, n in enumerate(sorted(s["live"], reverse=True)):
        client.call("trim", group="live", keep=n)
        client.call("baseline_clear")
        client.call("baseline_populate", iface=iface, timeout=300)
        m = s["base_probes"]
        say(f"baseline: {m} probes (netstat + 2 iptables-legacy -I) with {n} live")
        ans = client.call("baseline_probe", iface=iface, host=ip_b, port=HOLD_PORT, n=m, timeout=900)
        r[f"base_syn_to_rule_p50_ms_{n}"], r[f"base_syn_to_rule_p99_ms_{n}"] = ms(ans["lat"], 50), ms(ans["lat"], 99)
        r[f"base_netstat_p50_ms_{n}"] = ms(ans["parts"]["netstat"], 50)
        r[f"base_insert2_p50_ms_{n}"] = ms(ans["parts"]["insert"], 50)
        r[f"base_wrong_pid_{n}"] = ans["wrong_pid"]
        h = client.call("baseline_harvest", iface=iface, timeout=900)
        r[f"base_harvest_per_s_{n}"] = round(h["harvested"] / h["secs"], 2)
        r[f"base_harvest_counted_{n}"] = h["counted"]
        if i == 0:
            secs = s["base_churn_secs"]
            say(f"baseline: short connections for {secs}s with {n} live")
            c = client.call("baseline_churn", iface=iface, host=ip_b, port=SHORT_PORT, secs=secs,
                            parallel=s["parallel"], timeout=secs + 600)
            r["base_conn_made"], r["base_accounted"] = c["made"], c["accounted"]
            r["base_conn_per_s"] = round(c["accounted"] / c["secs"], 2)
            r["base_missed"] = c["missed"]
            r["base_netstat_runs"] = c["netstats"]
    n = s["live"][-1]
    r["base_syn_to_rule_p50_ms"] = r[f"base_syn_to_rule_p50_ms_{n}"]
    r["base_syn_to_rule_p99_ms"] = r[f"base_syn_to_rule_p99_ms_{n}"]
    r["base_harvest_per_s"] = r[f"base_harvest_per_s_{n}"]
    # What it could sustain if every connection lived long enough for netstat to see it.
    r["base_capacity_per_s"] = round(1 / (r["base_syn_to_rule_p50_ms"] / 1000 + 1 / r["base_harvest_per_s"]), 2)
    client.call("baseline_clear")
