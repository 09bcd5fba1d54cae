#!/usr/bin/env python3
"""Soak: a bounded mixed load on the real service, a kill -9 and restart in the middle, then an audit of
every byte against a packet capture.

  python bench/soak.py            about 3 minutes of load (--duration to change it)
  python bench/soak.py --quick    about 25 s of load; the whole run ends within 60 s
  options: --seed N (the mix is reproducible), --duration S, --keep (leave the temp dirs for a look)

What runs (namespaces a and b of tests/nstools.NetPair; the service in a, as the tests start it):
  * jobs, several at once, each a few tests/traffic.py client processes in a, registered with
    StartProfile and then left to make their connections and exit without any API call (process
    churn): small and large transfers both ways, IPv4 and IPv6, resets from either side, connections
    made by a forked child; about half of the jobs get EndProfile as soon as their processes are
    gone, the rest at the end;
  * inbound connections from b to a tracked pre-forked server in a (accepted by its workers);
  * connections of an untracked process, which must not be logged;
  * API callers: /status and the live totals of running jobs (GET /v1/jobs/<job>);
  * in the middle, long paced transfers and a process making ten short connections a second are
    started, a process is registered and the service is killed with SIGKILL right after answering it,
    the load goes on for a moment without a service, and it is started again with the same config file
    (and so the same state file and logs), as tests/test_reliability.py does; the process registered
    at the kill then connects (bench/soak_durable.py widens that race on purpose).

The audit: every connection a client reported is looked up in the service's tab log (both directions,
job, PID) and compared with tcpdump's IP-layer bytes on the same interface. It fails (exit status 1) if
a connection is not logged, is logged twice, is logged under another job or PID, or differs by one
byte; also if an untracked connection is logged or an API answer is 5xx. A connection whose every
packet passed while no service ran (between the kill and the restarted service answering /status)
cannot be seen by any service: it is counted and shown apart, and does not fail the run (--strict
makes it fail). The last line is one JSON object with the figures.
"""
import argparse
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

import dpkt  # noqa: E402

from harness import Capture, Service, start_client, start_server  # noqa: E402
from nstools import NetPair, wait_for  # noqa: E402

KB, MB = 1000, 1_000_000
# Servers in b: tracked clients use several, untracked ones their own, and ephemeral ports span 10000-65535
# in both namespaces, so that few 4-tuples serve two connections in a run (the audit tells those apart).
PORTS_V4, PORTS_V6, PORT_UNTRACKED, PORT_IN = (9000, 9001, 9002, 9003), (9010, 9011), 9020, 9100
PORT_V4 = PORTS_V4[0]
SRV_JOB = "soak#srv.0#1"


def say(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def key_of(local, lport, remote, rport):
    return (local, int(lport), remote, int(rport))


class Live:
    """The service that runs now (it changes at the restart), and the API calls made to it."""

    def __init__(self, svc):
        self.svc = svc
        self.lock = threading.Lock()
        self.down = threading.Event()        # set while the service is killed and not yet back
        self.calls = Counter()
        self.failures = []                   # unexpected answers: (what, path, code, body)

    def request(self, what, method, path, body=None, ok=(200,), ok_after_retry=(), retry_down=60.0):
        """A call. One that meets the service down (killed: no connection, or 503 while it starts again) is
        retried once it is back; `ok_after_retry` are answers that are right for such a retry (the first
        try may have been carried out just before the kill). Anything else unexpected is a failure."""
        deadline = time.monotonic() + retry_down
        retried = False
        while True:
            svc, was_down = self.svc, self.down.is_set()
            code, answer = svc.request(method, path, body)
            with self.lock:
                self.calls[f"{what} {code}"] += 1
            if code in ok or (retried and code in ok_after_retry):
                return code, answer
            hit_downtime = was_down or self.down.is_set() or svc is not self.svc
            if code in (0, 503) and hit_downtime and time.monotonic() < deadline:
                wait_for(lambda: not self.down.is_set(), timeout=max(0.1, deadline - time.monotonic()),
                         interval=0.05, what="service back")
                retried = True
                continue
            self.fail(what, path, code, answer)
            return code, answer

    def fail(self, what, path, code, answer):
        with self.lock:
            self.failures.append((what, path, code, str(answer)[:300]))


class Soak:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.rnd = random.Random(args.seed)
        self.rnd_lock = threading.Lock()
        self.conns = []          # {"key", "job" (None: untracked), "pids" (allowed), "kind", "t" (reported at)}
        self.jobs_open = set()
        self.jobs_all = []
        self.conn_lock = threading.Lock()
        self.client_errors = []
        self.kill_wall = self.ready_wall = None
        self.restart_note = ""
        self.rss_peak = 0
        self.stop_load = threading.Event()

    def rand(self):
        with self.rnd_lock:
            return random.Random(self.rnd.random())

    # --- setup ----------------------------------------------------------------------------------------

    def setup(self):
        p = self.pair = NetPair()
        p.a.run("ping", "-6", "-c1", "-W2", p.ip6_b, check=False)     # neighbour discovery first
        self.svc = Service(p.a, [p.iface_a], RULES_THRESHOLD=20000, MAX_BYTES=2_000_000_000)
        self.svc.start()
        self.live = Live(self.svc)
        self.cap = Capture(p.a, p.iface_a, buffer_kib=262144)
        for ns in (p.a, p.b):
            ns.run("sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65535")
        for port in PORTS_V4 + (PORT_UNTRACKED,):
            start_server(p.b, p.ip_b, port)
        for port in PORTS_V6:
            start_server(p.b, p.ip6_b, port)
        self.inbound_server, info = start_server(p.a, p.ip_a, PORT_IN, prefork=3)
        self.workers = set(info["workers"]) | {self.inbound_server.pid}
        self.register(SRV_JOB, self.inbound_server.pid)
        self.jobs_open.add(SRV_JOB)

    def birth(self, pid):
        import psutil
        return psutil.Process(pid).create_time()

    def register(self, job, pid):
        birth = self.birth(pid)
        path = f"/startprofile/jobid={quote(job, safe='')},pid={pid},owner=root,birthdate={birth}"
        code, _ = self.live.request("startprofile", "GET", path)
        return code == 200

    # --- the load -------------------------------------------------------------------------------------

    def sizes(self, rnd):
        small = [0, 1 * KB, 20 * KB, 100 * KB]
        large = [1 * MB, 3 * MB] if self.quick else [1 * MB, 10 * MB, 30 * MB]
        pick = lambda: rnd.choice(small) if rnd.random() < 0.8 else rnd.choice(large)  # noqa: E731
        return pick(), pick()

    def client_spec(self, rnd):
        """(remote, port, up, down, count, extra, kind) of one client process."""
        p = self.pair
        up, down = self.sizes(rnd)
        v6 = rnd.random() < 0.25
        remote, port = (p.ip6_b, rnd.choice(PORTS_V6)) if v6 else (p.ip_b, rnd.choice(PORTS_V4))
        r = rnd.random()
        if r < 0.12:
            return remote, port, up, max(down, 200 * KB), 1, ("--reset", rnd.choice(["client", "server"])), "reset"
        if r < 0.24:
            return remote, port, up, down, rnd.randint(1, 3), (rnd.choice(["--child", "--grandchild"]),), "child"
        if r < 0.36:
            n = rnd.randint(4, 12)
            return remote, port, up, down, n, ("--parallel", "4"), "parallel"
        count = rnd.randint(1, 4) if max(up, down) >= MB else rnd.randint(2, 15)
        return remote, port, up, down, count, (), "v6" if v6 else "plain"

    @staticmethod
    def go_and_read(proc, timeout=300.0):
        """Let a waiting client go; its JSON lines, each stamped with the time it arrived (just after that
        connection ended), so that two connections that used the same 4-tuple one after the other can be
        told apart. A watchdog kills a client that runs longer than `timeout`."""
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        lines = []
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            for line in proc.stdout:
                if line.startswith("{"):
                    lines.append((time.time(), json.loads(line)))
            proc.stdin.close()
            proc.wait(30)
        finally:
            watchdog.cancel()
        return lines

    def run_client(self, job, spec, track=True):
        """Start one client, register it (unless untracked), let it go, record its connections."""
        remote, port, up, down, count, extra, kind = spec
        proc = start_client(self.pair.a, remote, port, up=up, down=down, count=count, extra=extra)
        if track and not self.register(job, proc.pid):
            proc.kill()
            proc.wait(10)
            self.client_errors.append(f"{job}: registration of {proc.pid} failed")
            return
        lines = self.go_and_read(proc)
        if len(lines) != count or proc.returncode != 0:
            self.client_errors.append(f"{job}: client {proc.pid} ({kind}) made {len(lines)} of {count} "
                                      f"connections, exit {proc.returncode}")
        with self.conn_lock:
            for t, c in lines:
                k = key_of(c["local"], c["lport"], c["remote"], c["rport"])
                self.conns.append({"key": k, "job": job if track else None, "pids": {c["pid"]}, "kind": kind,
                                   "t": t})

    def run_job(self, n):
        rnd = self.rand()
        job = f"soak#{n}.0#{int(time.time())}"
        with self.conn_lock:
            self.jobs_all.append(job)
            self.jobs_open.add(job)
        specs = [self.client_spec(rnd) for _ in range(rnd.randint(1, 3))]
        with ThreadPoolExecutor(len(specs)) as pool:
            list(pool.map(lambda s: self.run_client(job, s), specs))
        if rnd.random() < 0.5:
            # The job's processes are gone (exited without any API call): end it now, as a batch system does.
            code, answer = self.live.request("endprofile", "GET", f"/endprofile/jobid={quote(job, safe='')}",
                                             ok_after_retry=(404,))
            if code in (200, 404):
                with self.conn_lock:
                    self.jobs_open.discard(job)

    def run_inbound(self, n):
        """A client in b, connecting to the tracked pre-forked server in a."""
        rnd = self.rand()
        p = self.pair
        up, down = self.sizes(rnd)
        count = rnd.randint(1, 8)
        proc = start_client(p.b, p.ip_a, PORT_IN, up=up, down=down, count=count)
        lines = self.go_and_read(proc)
        if len(lines) != count:
            self.client_errors.append(f"inbound client {proc.pid}: {len(lines)} of {count} connections")
        with self.conn_lock:
            for t, c in lines:
                # As the tracked server sees it: local is its side.
                k = key_of(p.ip_a, PORT_IN, c["local"], c["lport"])
                self.conns.append({"key": k, "job": SRV_JOB, "pids": set(self.workers), "kind": "inbound", "t": t})

    def run_untracked(self, n):
        rnd = self.rand()
        self.run_client(None, (self.pair.ip_b, PORT_UNTRACKED, rnd.choice([0, 5 * KB]), rnd.choice([0, 50 * KB]),
                               rnd.randint(1, 5), (), "untracked"), track=False)

    def api_noise(self):
        rnd = self.rand()
        limit = 2000   # bounded in count, and in time by stop_load
        for _ in range(limit):
            if self.stop_load.wait(rnd.uniform(0.05, 0.25)):
                return
            r = rnd.random()
            if r < 0.4:
                self.live.request("status", "GET", "/status")
            else:
                with self.conn_lock:
                    jobs = sorted(self.jobs_open)
                job = rnd.choice(jobs)
                # A job may be ended by its runner meanwhile: 404 is an answer, not an error.
                self.live.request("job-live", "GET", f"/v1/jobs/{quote(job, safe='')}", ok=(200, 404))

    def sample_rss(self):
        while not self.stop_load.wait(0.5):
            try:
                with open(f"/proc/{self.live.svc.proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.rss_peak = max(self.rss_peak, int(line.split()[1]))
            except OSError:
                pass

    def paced(self, n):
        """Long transfers that run through the kill and the restart (n 0, 1), and a process that makes short
        connections one after the other, ten a second, all through the downtime (n 2)."""
        p = self.pair
        if n == 2:
            job = f"soak#steady.0#{int(time.time())}"
            with self.conn_lock:
                self.jobs_all.append(job)
                self.jobs_open.add(job)
            count = 100 if self.quick else 150
            self.run_client(job, (p.ip_b, PORTS_V4[1], 2000, 10 * KB, count, ("--pace", "20000"), "steady"))
            return
        total = 8 * MB if self.quick else 40 * MB
        rate = total / (5.0 if self.quick else 8.0)
        job = f"soak#paced{n}.0#{int(time.time())}"
        with self.conn_lock:
            self.jobs_all.append(job)
            self.jobs_open.add(job)
        down = 0 if n % 2 == 0 else 200 * KB
        self.run_client(job, (p.ip_b, PORT_V4, total, down, 1, ("--pace", str(int(rate))), "paced"))

    def dump_rules(self, name):
        """With --debug-rules: iptables-legacy-save -c of namespace a into the service's directory."""
        if not self.args.debug_rules:
            return
        out = self.pair.a.run("iptables-legacy-save", "-c", check=False).stdout
        with open(os.path.join(self.svc.dir, f"rules-{name}.txt"), "w") as f:
            f.write(f"# {time.time():.3f}\n{out}")

    def kill_and_restart(self):
        """SIGKILL the service just after it answered a StartProfile (a job starting as the service dies),
        let the load go on without it a moment, start it again from the same config and state file."""
        rnd = self.rand()
        old = self.live.svc
        job = f"soak#at-kill.0#{int(time.time())}"
        with self.conn_lock:
            self.jobs_all.append(job)
            self.jobs_open.add(job)
        at_kill = start_client(self.pair.a, self.pair.ip_b, PORTS_V4[2], up=5 * KB, down=50 * KB, count=3)
        if not self.register(job, at_kill.pid):
            self.client_errors.append(f"{job}: registration of {at_kill.pid} failed")
        self.dump_rules("before-kill")
        self.live.down.set()
        self.kill_wall = time.time()
        old.proc.send_signal(signal.SIGKILL)
        old.proc.wait(10)
        downtime = rnd.uniform(0.5, 2.0)
        say(f"service killed (SIGKILL); restarting it in {downtime:.1f} s with the same config file")
        self.stop_load.wait(downtime)      # the load goes on without a service meanwhile
        new = Service(self.pair.a, [self.pair.iface_a])
        shutil.rmtree(new.dir, ignore_errors=True)    # its own fresh config is not wanted: the old one is
        new.dir, new.config_path, new.log_dir = old.dir, old.config_path, old.log_dir
        new.out_path = old.out_path + ".2"
        new.start()
        self.ready_wall = time.time()
        self.live.svc = new
        self.live.down.clear()
        note = [line for line in new.output().splitlines() if "carried on" in line or "harvested" in line]
        self.restart_note = "; ".join(n.split("restart: ")[-1] for n in note)
        say(f"service back after {self.ready_wall - self.kill_wall:.2f} s: {self.restart_note}")
        self.dump_rules("after-restart")
        # The process registered just before the kill connects now: the restarted service must know it.
        lines = self.go_and_read(at_kill)
        if len(lines) != 3:
            self.client_errors.append(f"{job}: client {at_kill.pid} made {len(lines)} of 3 connections")
        with self.conn_lock:
            for t, c in lines:
                self.conns.append({"key": key_of(c["local"], c["lport"], c["remote"], c["rport"]), "job": job,
                                   "pids": {c["pid"]}, "kind": "registered-at-kill", "t": t})

    def run(self):
        args = self.args
        duration = args.duration or (25.0 if self.quick else 180.0)
        slots = 4 if self.quick else 6
        say(f"soak: {duration:.0f} s of load, {slots} jobs at once, kill -9 and restart at {duration / 2:.0f} s")
        t0 = time.monotonic()
        kill_at = t0 + duration / 2
        end_at = t0 + duration
        helpers = [threading.Thread(target=self.api_noise, daemon=True),
                   threading.Thread(target=self.sample_rss, daemon=True)]
        for t in helpers:
            t.start()
        n = 0
        killed = False
        with ThreadPoolExecutor(slots + 3) as pool:
            running = set()
            while time.monotonic() < end_at:
                running = {f for f in running if not f.done()}
                if not killed and time.monotonic() >= kill_at - (3.0 if self.quick else 4.0):
                    running |= {pool.submit(self.paced, i) for i in range(3)}
                    wait_for(lambda: time.monotonic() >= kill_at, timeout=10, interval=0.05, what="kill time")
                    self.kill_and_restart()
                    killed = True
                    continue
                if len(running) < slots:
                    n += 1
                    r = self.rnd.random()
                    fn = self.run_inbound if r < 0.15 else self.run_untracked if r < 0.22 else self.run_job
                    running.add(pool.submit(fn, n))
                    continue
                wait_for(lambda: any(f.done() for f in running) or time.monotonic() >= end_at, timeout=600,
                         interval=0.05, what="a free slot")
            say(f"load ends; waiting for {len(running)} runners")
            for f in running:
                f.result(timeout=360)
        self.stop_load.set()
        for t in helpers:
            t.join(30)
        self.dump_rules("end-of-load")
        say("ending the jobs still open")
        for job in sorted(self.jobs_open):
            self.live.request("endprofile", "GET", f"/endprofile/jobid={quote(job, safe='')}")
        code, status = self.live.request("status", "GET", "/status")
        self.final_status = status if code == 200 else {}
        self.svc_output = self.live.svc.output()
        self.live.svc.stop(timeout=60)

    # --- the audit ------------------------------------------------------------------------------------

    def read_log(self):
        entries = defaultdict(list)
        path = os.path.join(self.live.svc.log_dir, f"{self.pair.iface_a}.log")
        with open(path) as f:
            for line in f:
                cols = line.rstrip("\n").split("\t")
                if len(cols) != 9:
                    continue
                _, job, pid, src, sport, dst, dport, direction, nbytes = cols
                entries[key_of(src, sport, dst, dport)].append((job, int(pid), direction, int(nbytes)))
        return entries

    def read_capture(self):
        """{pair: [instance]}: a pair is a 4-tuple in one orientation (its smaller); an instance is one TCP
        connection on it, from a SYN with a new initial sequence number on (a 4-tuple may serve several
        connections one after the other): {"first", "last", "bytes": {directed 4-tuple: IP-layer bytes}},
        the bytes counted as harness.Capture.bytes counts them."""
        import ipaddress
        pairs = defaultdict(list)
        current = {}       # pair -> (SYN sequence number, instance)
        ntop = {}

        def addr(raw):
            text = ntop.get(raw)
            if text is None:
                text = ntop[raw] = str(ipaddress.ip_address(raw))
            return text
        with open(self.cap.path, "rb") as f:
            for ts, data in dpkt.pcap.Reader(f):
                ip = dpkt.ethernet.Ethernet(data).data
                if isinstance(ip, dpkt.ip.IP):
                    length = ip.len
                elif isinstance(ip, dpkt.ip6.IP6):
                    length = ip.plen + 40
                else:
                    continue
                tcp = ip.data
                if not isinstance(tcp, dpkt.tcp.TCP):
                    continue
                k = (addr(ip.src), tcp.sport, addr(ip.dst), tcp.dport)
                pair = min(k, (k[2], k[3], k[0], k[1]))
                cur = current.get(pair)
                if tcp.flags & dpkt.tcp.TH_SYN and not tcp.flags & dpkt.tcp.TH_ACK and (cur is None or cur[0] != tcp.seq):
                    cur = current[pair] = (tcp.seq, {"first": ts, "last": ts, "bytes": defaultdict(int)})
                    pairs[pair].append(cur[1])
                elif cur is None:      # no SYN seen: still one instance
                    cur = current[pair] = (None, {"first": ts, "last": ts, "bytes": defaultdict(int)})
                    pairs[pair].append(cur[1])
                inst = cur[1]
                inst["last"] = ts
                inst["bytes"][k] += length
        return pairs

    def audit(self):
        """Every tracked connection against its instance in the capture and its records in the tab log."""
        import re
        cap_err = self.cap.stop()
        logged = self.read_log()
        pairs = self.read_capture()
        m = re.search(r"(\d+) packets dropped by kernel", cap_err)
        cap_dropped = int(m.group(1)) if m else -1
        res = Counter()
        problems, excused, leaked = [], [], []
        bytes_total = 0
        uses = defaultdict(list)      # pair -> connections (tracked and untracked) that used it
        for c in self.conns:
            k = c["key"]
            uses[min(k, (k[2], k[3], k[0], k[1]))].append(c)
            res[c["kind"]] += 1
        for pair, group in uses.items():
            group.sort(key=lambda c: c["t"])
            instances = sorted(pairs.get(pair, []), key=lambda i: i["first"])
            l, lp, r, rp = group[0]["key"]
            out_k, in_k = (l, lp, r, rp), (r, rp, l, lp)
            records = {"OUT": list(logged.get(out_k, [])), "IN": list(logged.get(in_k, []))}
            if len(group) > 1:
                res["reused_tuples"] += 1
            if len(instances) != len(group):
                for c in group:
                    if c["job"]:
                        problems.append({"conn": f"{l}:{lp}>{r}:{rp}", "job": c["job"], "kind": c["kind"],
                                         "problems": [f"{len(group)} connections reported on this 4-tuple, "
                                                      f"{len(instances)} in the capture"]})
                continue
            for c, inst in zip(group, instances):
                truth = {"OUT": inst["bytes"].get(out_k, 0), "IN": inst["bytes"].get(in_k, 0)}
                bytes_total += truth["OUT"] + truth["IN"]
                if c["job"] is None:
                    continue
                verdicts = []
                for direction in ("OUT", "IN"):
                    mine = [g for g in records[direction] if g[0] == c["job"] and g[1] in c["pids"] and g[2] == direction]
                    exact = [g for g in mine if g[3] == truth[direction]]
                    if exact:
                        records[direction].remove(exact[0])
                    elif mine:
                        records[direction].remove(mine[0])
                        verdicts.append(f"{direction} logged {mine[0][3]}, captured {truth[direction]}")
                    else:
                        verdicts.append(f"{direction} not logged under {c['job']}/{sorted(c['pids'])}")
                if not verdicts:
                    res["exact"] += 1
                    continue
                entry = {"conn": f"{l}:{lp}>{r}:{rp}", "job": c["job"], "kind": c["kind"], "problems": verdicts,
                         "captured": truth,
                         "first_rel_kill": None if self.kill_wall is None else round(inst["first"] - self.kill_wall, 3),
                         "last_rel_ready": None if self.ready_wall is None else round(inst["last"] - self.ready_wall, 3)}
                in_downtime = (self.kill_wall is not None and inst["first"] >= self.kill_wall
                               and inst["last"] <= self.ready_wall)
                if in_downtime and all("not logged" in v for v in verdicts):
                    excused.append(entry)
                else:
                    problems.append(entry)
            # Records nobody claimed: logged twice, under another job or PID, or an untracked connection logged.
            for direction, rest in records.items():
                for g in rest:
                    entry = {"conn": f"{l}:{lp}>{r}:{rp}", "record": list(g), "problems": [
                        f"{direction} record that matches no tracked connection on this 4-tuple: "
                        f"{[(c['job'], sorted(c['pids'])) for c in group]}"]}
                    (leaked if all(c["job"] is None for c in group) else problems).append(entry)
        known = set()
        for pair in uses:
            known |= {pair, (pair[2], pair[3], pair[0], pair[1])}
        unknown_logged = [k for k in logged if k not in known]
        unknown_flows = [pair for pair in pairs if pair not in uses]
        tracked = [c for c in self.conns if c["job"]]
        return {"connections": len(tracked), "exact": res["exact"], "reused_tuples": res["reused_tuples"],
                "by_kind": {k: v for k, v in res.items() if k not in ("exact", "reused_tuples", "untracked")},
                "captured_bytes": bytes_total, "problems": problems, "downtime_only": excused,
                "untracked_logged": leaked, "untracked": res["untracked"], "unknown_logged": unknown_logged[:20],
                "unknown_flows": len(unknown_flows), "capture_dropped": cap_dropped}

    def close(self):
        for svc in {getattr(self, "svc", None), getattr(getattr(self, "live", None), "svc", None)} - {None}:
            try:
                svc.stop(timeout=60)
            except Exception as exc:   # noqa: BLE001 - cleanup goes on
                say(f"stopping the service: {exc}")
        if getattr(self, "cap", None) is not None and self.cap.proc.poll() is None:
            self.cap.stop()
        if getattr(self, "pair", None) is not None:
            self.pair.close()
        if not self.args.keep and getattr(self, "svc", None) is not None:
            shutil.rmtree(self.svc.dir, ignore_errors=True)
            if getattr(self, "cap", None) is not None and os.path.exists(self.cap.path):
                os.remove(self.cap.path)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 25 s of load; the whole run within 60 s")
    ap.add_argument("--duration", type=float, help="seconds of load (default 180, --quick 25)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--strict", action="store_true", help="connections made wholly while no service ran fail too")
    ap.add_argument("--keep", action="store_true", help="keep the service's directory and the capture")
    ap.add_argument("--debug-rules", action="store_true", help="save iptables-legacy-save -c before the kill, "
                    "after the restart and at the end, in the service's directory (with --keep)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak.py must run as root (namespaces, netfilter)")
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    soak = Soak(args)
    ok = False
    try:
        say(f"seed {args.seed}")
        soak.setup()
        soak.run()
        report = soak.audit()
        ok = print_report(soak, report, args, time.monotonic() - started)
    finally:
        if args.keep and getattr(soak, "svc", None) is not None:
            say(f"kept {soak.svc.dir} and {soak.cap.path}")
        soak.close()
    sys.exit(0 if ok else 1)


def print_report(soak, report, args, elapsed):
    live = soak.live
    status = soak.final_status or {}
    threads = status.get("threads", {})
    threads_ok = bool(threads) and all(t.get("alive") and t.get("restarts", 0) == 0 for t in threads.values())
    five_xx = {k: v for k, v in live.calls.items() if k.split()[-1].startswith("5") and not k.endswith(" 503")}
    print(f"soak: seed {args.seed}, {'quick' if args.quick else 'full'}, {elapsed:.0f} s")
    print(f"  tracked connections: {report['connections']} ({report['by_kind']}), "
          f"{report['captured_bytes'] / MB:.1f} MB captured")
    print(f"  exact (every byte logged under the right job and PID, both directions): {report['exact']}")
    print(f"  wrong, missing, duplicated or misattributed: {len(report['problems'])}")
    print(f"  4-tuples that served more than one connection (told apart by SYN in the capture, by time "
          f"in the clients): {report['reused_tuples']}")
    for p in list({json.dumps(p): p for p in report["problems"]}.values())[:15]:
        print(f"    {json.dumps(p)}")
    print(f"  made wholly while no service ran (kill to ready {soak.ready_wall - soak.kill_wall:.2f} s), "
          f"not logged: {len(report['downtime_only'])}" + ("  [--strict: counted as failures]" if args.strict else
                                                          "  [cannot be seen by any service; not a failure]"))
    for p in report["downtime_only"][:5]:
        print(f"    {json.dumps(p)}")
    print(f"  untracked connections: {report['untracked']}, logged by mistake: {len(report['untracked_logged'])}")
    print(f"  log entries of unknown connections: {len(report['unknown_logged'])}; captured flows of no known "
          f"connection: {report['unknown_flows']}; capture drops: {report['capture_dropped']}")
    print(f"  restart: {soak.restart_note}")
    print(f"  API calls: {dict(sorted(live.calls.items()))}")
    print(f"  unexpected API answers: {len(live.failures)}" + "".join(f"\n    {f}" for f in live.failures[:10]))
    print(f"  client problems: {len(soak.client_errors)}" + "".join(f"\n    {e}" for e in soak.client_errors[:10]))
    print(f"  service threads at the end: {threads}; RSS peak {soak.rss_peak / 1024:.1f} MB")
    failed = (report["problems"] or report["untracked_logged"] or five_xx or live.failures or soak.client_errors
              or report["capture_dropped"] != 0 or not threads_ok or report["connections"] == 0
              or (args.strict and report["downtime_only"]))
    verdict = "FAIL" if failed else "PASS"
    print(f"soak {verdict}: {report['exact']} of {report['connections']} tracked connections exact"
          f"{', ' + str(len(report['downtime_only'])) + ' made wholly during the downtime' if report['downtime_only'] else ''}")
    print(json.dumps({"verdict": verdict, "seed": args.seed, "seconds": round(elapsed, 1),
                      "connections": report["connections"], "exact": report["exact"],
                      "problems": len(report["problems"]), "downtime_only": len(report["downtime_only"]),
                      "untracked_logged": len(report["untracked_logged"]), "api_failures": len(live.failures),
                      "client_errors": len(soak.client_errors), "captured_mb": round(report["captured_bytes"] / MB, 1),
                      "rss_peak_mb": round(soak.rss_peak / 1024, 1), "downtime_s": round(soak.ready_wall - soak.kill_wall, 2)}))
    return not failed


if __name__ == "__main__":
    main()
