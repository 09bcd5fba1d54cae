"""The 2011 design, as the baseline: netstat to find who owns a new connection, and one
iptables-legacy command per rule (insert; read counters with `iptables-legacy -L -v -x -n`; delete).

Runs inside the benchmark's namespace (in agent.py's client process) and refuses to run in the
host's network namespace. Its new-connection events come for free (the process that connects
hands its 4-tuple straight over): a real 2011 daemon also had to sniff the SYN, so every figure
here is a lower bound on its cost.
"""
import os
import queue
import socket
import subprocess
import threading
import time

IPT = "iptables-legacy"


def _check_namespace():
    """bench/env.py puts the host's network namespace in BENCH_HOST_NETNS; we must be in another."""
    host = os.environ.get("BENCH_HOST_NETNS")
    if not host or os.stat("/proc/self/ns/net").st_ino == int(host):
        raise RuntimeError("baseline: refusing to touch the host's network namespace")


def _ipt(*args):
    subprocess.run([IPT, "-w", *args], check=True, capture_output=True)


def _rule_args(iface, local, lport, remote, rport, inbound):
    if inbound:
        return ["INPUT", "-i", iface, "-p", "tcp", "-s", remote, "-d", local,
                "--sport", str(rport), "--dport", str(lport), "-j", "RETURN"]
    return ["OUTPUT", "-o", iface, "-p", "tcp", "-s", local, "-d", remote,
            "--sport", str(lport), "--dport", str(rport), "-j", "RETURN"]


def netstat_pids():
    """{(local 'ip:port', remote 'ip:port'): pid} from one `netstat -tanp`."""
    out = subprocess.run(["netstat", "-tanp"], check=True, capture_output=True, text=True).stdout
    pids = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0] in ("tcp", "tcp6") and f[6] != "-":
            pids[(f[3], f[4])] = int(f[6].split("/")[0])
    return pids


def insert(iface, local, lport, remote, rport):
    _ipt("-I", *_rule_args(iface, local, lport, remote, rport, inbound=True))
    _ipt("-I", *_rule_args(iface, local, lport, remote, rport, inbound=False))


def read_counters():
    """{(src, sport, dst, dport): bytes} of every rule, from one `iptables-legacy -L -v -x -n`."""
    out = subprocess.run([IPT, "-w", "-L", "-v", "-x", "-n"], check=True, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 11 and f[3] in ("tcp", "6") and f[-2].startswith("spt:") and f[-1].startswith("dpt:"):
            found[(f[7], int(f[-2][4:]), f[8], int(f[-1][4:]))] = int(f[1])
    return found


def delete(iface, local, lport, remote, rport):
    _ipt("-D", *_rule_args(iface, local, lport, remote, rport, inbound=True))
    _ipt("-D", *_rule_args(iface, local, lport, remote, rport, inbound=False))


def harvest_one(iface, local, lport, remote, rport):
    counters = read_counters()
    delete(iface, local, lport, remote, rport)
    return counters.get((remote, rport, local, lport)), counters.get((local, lport, remote, rport))


def populate(iface, conns):
    """Rules for connections already open (setup, not measured): one iptables-legacy-restore."""
    _check_namespace()
    lines = ["*filter"]
    for local, lport, remote, rport in conns:
        for inbound in (True, False):
            lines.append("-A " + " ".join(_rule_args(iface, local, lport, remote, rport, inbound)))
    lines.append("COMMIT\n")
    subprocess.run([IPT + "-restore", "--noflush"], input="\n".join(lines), check=True, text=True,
                   capture_output=True)
    return {"rules": 2 * len(conns)}


def clear():
    _check_namespace()
    _ipt("-F", "INPUT")
    _ipt("-F", "OUTPUT")
    return {"ok": True}


def probe(iface, host, port, n, gap, keep):
    """n new connections, each: connect, netstat finds its pid, two inserts. Latency to rules live."""
    _check_namespace()
    lat, parts, wrong = [], {"connect": [], "netstat": [], "insert": []}, 0
    for _ in range(n):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        t0 = time.perf_counter()
        s.connect((host, port))
        t1 = time.perf_counter()
        local, lport = s.getsockname()[:2]
        pid = netstat_pids().get((f"{local}:{lport}", f"{host}:{port}"))
        t2 = time.perf_counter()
        insert(iface, local, lport, host, port)
        t3 = time.perf_counter()
        wrong += pid != os.getpid()
        s.sendall(b"H" * 32)   # some traffic for the counters to count
        s.recv(64)
        keep.append(s)
        lat.append(t3 - t0)
        for name, secs in (("connect", t1 - t0), ("netstat", t2 - t1), ("insert", t3 - t2)):
            parts[name].append(secs)
        time.sleep(gap)
    return {"lat": lat, "parts": parts, "wrong_pid": wrong}


def harvest(iface, socks):
    """Close the probe connections, then harvest each: one listing, two deletes."""
    _check_namespace()
    tuples = [(*s.getsockname()[:2], *s.getpeername()[:2]) for s in socks]
    for s in socks:
        s.close()
    time.sleep(0.2)   # the FIN exchange
    per, counted = [], 0
    t_all = time.perf_counter()
    for local, lport, remote, rport in tuples:
        t0 = time.perf_counter()
        in_bytes, out_bytes = harvest_one(iface, local, lport, remote, rport)
        per.append(time.perf_counter() - t0)
        counted += bool(in_bytes and out_bytes)
    total = time.perf_counter() - t_all
    return {"harvested": len(tuples), "secs": total, "per": per, "counted": counted}


def churn(iface, host, port, secs, parallel):
    """Short connections from `parallel` threads for `secs`; one worker does the 2011 design's work.

    Generous to the baseline: one netstat serves every connection queued at that moment. A connection
    is accounted when netstat still showed it (so rules could be put in, late) and its rules were
    read and removed; missed when netstat no longer showed it or the worker never got to it.
    """
    from agent import short_connection
    _check_namespace()
    events = queue.Queue()
    deadline = time.monotonic() + secs
    made = [0]
    lock = threading.Lock()

    def producer():
        while time.monotonic() < deadline:
            try:
                _, local, lport, _ = short_connection(host, port)
            except OSError:
                continue
            with lock:
                made[0] += 1
            events.put((local, lport))

    threads = [threading.Thread(target=producer) for _ in range(parallel)]
    for t in threads:
        t.start()
    accounted = not_found = netstats = 0
    while time.monotonic() < deadline:
        try:
            batch = [events.get(timeout=0.1)]
        except queue.Empty:
            continue
        while True:
            try:
                batch.append(events.get_nowait())
            except queue.Empty:
                break
        pids = netstat_pids()
        netstats += 1
        for local, lport in batch:
            if time.monotonic() >= deadline:
                break
            if pids.get((f"{local}:{lport}", f"{host}:{port}")) is None:
                not_found += 1
                continue
            insert(iface, local, lport, host, port)
            harvest_one(iface, local, lport, host, port)
            accounted += 1
    for t in threads:
        t.join()
    return {"made": made[0], "accounted": accounted, "missed": made[0] - accounted, "not_found": not_found,
            "netstats": netstats,
            "secs": secs}
