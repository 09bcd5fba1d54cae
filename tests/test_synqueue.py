"""SynQueue against the real kernel, in veth-joined namespaces.

The queue must be bound inside namespace a, so this file doubles as the
programs run there through `ip netns exec`: `--agent QUEUE MODE` runs a
SynQueue and answers "stats"/"stop" on stdin; `--client`/`--burst` make
connections and print what they measured.
"""
import json
import os
import queue
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from nstools import wait_for
from test_conntrack import PORT, SERVER, pcap_bytes, start_capture, stop_capture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QNUM = 7


# ------------------------------------------------- programs run inside a netns
def commit_rules(syns):
    """One restore per family for the whole batch: per-connection counters
    for both directions, in chain ACCT (jumped to from INPUT and OUTPUT)."""
    for family, tool in ((socket.AF_INET, "iptables-legacy-restore"),
                         (socket.AF_INET6, "ip6tables-legacy-restore")):
        rules = [f"-A ACCT -p tcp -s {s} -d {d} --sport {sp} --dport {dp} -j RETURN"
                 for syn in syns if syn.family == family
                 for s, sp, d, dp in ((syn.src, syn.sport, syn.dst, syn.dport),
                                      (syn.dst, syn.dport, syn.src, syn.sport))]
        if rules:
            subprocess.run([tool, "--noflush"], input="*filter\n" + "\n".join(rules) + "\nCOMMIT\n",
                           text=True, check=True)


def agent(qnum, mode):
    sys.path.insert(0, ROOT)
    from profiler.synqueue import SynQueue

    sizes, hooks, handoff = [], set(), queue.Queue()

    def committer():  # the service's own thread: commit, then release
        while True:
            batch = handoff.get()
            while not handoff.empty():
                batch += handoff.get()
            if mode == "commit":
                commit_rules([s for s, _ in batch])
            for _, release in batch:
                release()

    def on_syns(batch):
        sizes.append(len(batch))
        hooks.update(s.hook for s, _ in batch)
        if mode == "commit-sync":
            commit_rules([s for s, _ in batch])
        if mode in ("immediate", "commit-sync"):
            for _, release in batch:
                release()
        elif mode in ("commit", "thread"):
            handoff.put(list(batch))

    q = SynQueue(qnum, on_syns)
    q.start()
    threading.Thread(target=committer, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: (q.stop(), os._exit(0)))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            q.stop()
        print(json.dumps({"stats": q.stats(), "batches": sizes, "hooks": sorted(hooks)}),
              flush=True)


def client(dst, n, nbytes):
    """n sequential connections: connect, send nbytes, read the echo, close."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
        s.settimeout(10)
        t0 = time.perf_counter()
        s.connect((dst, PORT))
        took = time.perf_counter() - t0
        if nbytes:
            s.sendall(b"q" * nbytes)
        s.shutdown(socket.SHUT_WR)
        while s.recv(1 << 16):
            pass
        out.append([s.getsockname()[1], took])
        s.close()
    print(json.dumps(out), flush=True)


def burst(dst, n):
    """n connects issued back to back, then wait until all are established."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.setblocking(False)
    t0 = time.perf_counter()
    for s in socks:
        s.connect_ex((dst, PORT))
    pending = set(socks)
    while pending:
        _, w, _ = select.select([], list(pending), [], 10)
        assert w, "connections did not complete"
        pending -= set(w)
    errors = sum(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0 for s in socks)
    print(json.dumps({"seconds": time.perf_counter() - t0, "errors": errors}), flush=True)


# ------------------------------------------------------------ test helpers
class Agent:
    def __init__(self, ns, mode):
        self.proc = ns.popen(sys.executable, os.path.abspath(__file__), "--agent", str(QNUM),
                             mode, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read(30)["ready"]

    def _read(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "agent did not answer"
        return json.loads(self.proc.stdout.readline())

    def ask(self, cmd="stats"):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read(30)


def run_py(ns, *args, timeout=120):
    out = ns.run(sys.executable, os.path.abspath(__file__), *args, timeout=timeout)
    return json.loads(out.stdout)


def queue_outgoing(ns, tool="iptables-legacy"):
    ns.run(tool, "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--syn", "-m", "owner",
           "--uid-owner", "0", "-j", "NFQUEUE", "--queue-num", str(QNUM), "--queue-bypass")


def queue_incoming(ns, tool="iptables-legacy"):
    ns.run(tool, "-t", "mangle", "-A", "INPUT", "-p", "tcp", "--syn", "--dport", str(PORT),
           "-j", "NFQUEUE", "--queue-num", str(QNUM), "--queue-bypass")


def start_server(ns):
    ns.popen(sys.executable, "-c", SERVER)
    wait_for(lambda: f":{PORT} " in ns.run("ss", "-ltnH").stdout, what="server listening")


def warm_up(pair):
    # The first IPv6 packet of a fresh veth pair waits ~1 s for neighbour
    # discovery; resolve both families before anything is timed.
    for ip in (pair.ip_b, pair.ip6_b):
        wait_for(lambda: pair.a.run("ping", "-c1", "-W1", ip, check=False).returncode == 0)


def acct_counters(ns):
    """{(src, sport, dst, dport): (packets, bytes)} of the ACCT rules, both families."""
    out = {}
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        for m in re.finditer(r"^\[(\d+):(\d+)\] -A ACCT -s ([^/]+)/\d+ -d ([^/]+)/\d+ .*"
                             r"--sport (\d+) --dport (\d+)", ns.run(tool, "-c").stdout, re.M):
            pk, by, s, d, sp, dp = m.groups()
            out[(s, int(sp), d, int(dp))] = (int(pk), int(by))
    return out


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("direction,family", [
    ("outgoing", socket.AF_INET), ("outgoing", socket.AF_INET6), ("incoming", socket.AF_INET)])
def test_rules_committed_while_held_count_every_byte(netpair, tmp_path, direction, family):
    """(a) mangle OUTPUT -> filter OUTPUT and (b) mangle INPUT -> filter INPUT:
    a rule inserted while the SYN is held counts the SYN and everything after."""
    pair = netpair
    tool = "iptables-legacy" if family == socket.AF_INET else "ip6tables-legacy"
    server_ns, client_ns = (pair.b, pair.a) if direction == "outgoing" else (pair.a, pair.b)
    dst = {("outgoing", socket.AF_INET): pair.ip_b, ("outgoing", socket.AF_INET6): pair.ip6_b,
           ("incoming", socket.AF_INET): pair.ip_a}[(direction, family)]
    warm_up(pair)
    pair.a.run(tool, "-N", "ACCT")
    pair.a.run(tool, "-A", "INPUT", "-j", "ACCT")
    pair.a.run(tool, "-A", "OUTPUT", "-j", "ACCT")
    (queue_outgoing if direction == "outgoing" else queue_incoming)(pair.a, tool)
    start_server(server_ns)
    agent = Agent(pair.a, "commit")
    pcap = str(tmp_path / "q.pcap")
    cap = start_capture(pair, pcap)
    assert len(run_py(client_ns, "--client", dst, "50", "1000")) == 50
    # The last packet of each connection is the final ACK reaching the server;
    # a server socket leaves LAST-ACK only once it has passed everything.
    wait_for(lambda: not server_ns.run("ss", "-tanH", "state", "last-ack").stdout.strip(),
             what="connections fully closed")
    stop_capture(cap)
    stats = agent.ask()
    assert stats["stats"]["held"] == 0 and stats["stats"]["released"] == 50
    assert stats["hooks"] == [3 if direction == "outgoing" else 1]  # LOCAL_OUT / LOCAL_IN
    captured, counted = pcap_bytes(pcap), acct_counters(pair.a)
    assert len(counted) == 100
    for key, (packets, nbytes) in counted.items():
        assert captured[key] == (packets, nbytes), key
    assert sum(p for p, _ in counted.values()) == sum(p for p, _ in captured.values())
    print(f"\n{direction} family={int(family)}: 100 rules == capture, "
          f"{sum(b for _, b in counted.values())} bytes; batches {stats['batches']}")


@pytest.mark.parametrize("mode", ["commit-sync", "commit"])
def test_concurrent_syns_arrive_in_few_batches(netpair, mode):
    warm_up(netpair)
    for cmd in (["-N", "ACCT"], ["-A", "INPUT", "-j", "ACCT"], ["-A", "OUTPUT", "-j", "ACCT"]):
        netpair.a.run("iptables-legacy", *cmd)
    queue_outgoing(netpair.a)
    start_server(netpair.b)
    agent = Agent(netpair.a, mode)
    res = run_py(netpair.a, "--burst", netpair.ip_b, "200")
    assert res["errors"] == 0
    stats = agent.ask()
    print(f"\n{mode}: 200 concurrent SYNs in {len(stats['batches'])} batches "
          f"{stats['batches']}, all established after {res['seconds'] * 1000:.1f} ms")
    assert sum(stats["batches"]) == 200 and stats["stats"]["released"] == 200
    if mode == "commit-sync":  # the queue thread is busy committing: SYNs pile up
        assert len(stats["batches"]) <= 10
    assert len(acct_counters(netpair.a)) == 400


def test_connect_latency_with_and_without_queue(netpair):
    warm_up(netpair)
    start_server(netpair.b)
    n, results = 300, {}
    results["no queue"] = run_py(netpair.a, "--client", netpair.ip_b, str(n), "0")
    queue_outgoing(netpair.a)
    for mode in ("immediate", "thread"):
        agent = Agent(netpair.a, mode)
        results[f"queue, release {mode}"] = run_py(netpair.a, "--client", netpair.ip_b, str(n), "0")
        assert agent.ask("stop")["stats"]["released"] == n
        agent.proc.stdin.close()
        agent.proc.wait(10)
    lines = []
    for name, conns in results.items():
        lat = [t * 1e3 for _, t in conns]
        lines.append(f"{name:28s} p50 {statistics.median(lat):.3f} ms  p99 {percentile(lat, .99):.3f} ms")
    print("\nconnect() latency, %d sequential connections:\n" % n + "\n".join(lines))
    assert all(statistics.median(t for _, t in c) < 0.05 for c in results.values())


def test_bypass_without_program_and_drop_when_program_dies(netpair):
    """(c) --queue-bypass: unbound -> traffic flows; bound program dies while
    holding -> the held SYN is dropped, the client's retransmit bypasses."""
    warm_up(netpair)
    start_server(netpair.b)
    queue_outgoing(netpair.a)
    conns = run_py(netpair.a, "--client", netpair.ip_b, "3", "10")
    assert max(t for _, t in conns) < 0.5  # nobody bound: no hold, no drop

    for ending in ("stop", "kill"):
        agent = Agent(netpair.a, "hold")
        cli = netpair.a.popen(sys.executable, os.path.abspath(__file__), "--client",
                              netpair.ip_b, "1", "10", stdout=subprocess.PIPE, text=True)
        wait_for(lambda: agent.ask()["stats"]["held"] == 1, what="SYN held")
        assert cli.poll() is None
        ended = time.perf_counter()
        if ending == "stop":
            assert agent.ask("stop")["stats"]["held"] == 0  # fail open
        else:
            agent.proc.kill()
        out, _ = cli.communicate(timeout=10)
        after = time.perf_counter() - ended
        print(f"\nprogram {ending}: connection completed {after * 1000:.0f} ms later")
        assert cli.returncode == 0
        if ending == "stop":
            assert after < 0.5
        else:
            assert 0.5 < after < 3.5  # the initial SYN retransmission timeout is 1 s
        agent.proc.stdin.close()
        agent.proc.wait(10)


def test_busy_queue_number_fails_clearly_and_stop_is_idempotent(netpair):
    script = f"""
import sys; sys.path.insert(0, {ROOT!r})
from profiler.synqueue import SynQueue, SynQueueError
first, second = SynQueue({QNUM}, print), SynQueue({QNUM}, print)
second.stop()  # never started: nothing to do
first.start()
try:
    second.start()
    print("second bind succeeded")
except SynQueueError as e:
    print("busy:", e)
first.stop(); first.stop()
print(first.stats())
"""
    out = netpair.a.run(sys.executable, "-c", script, timeout=30).stdout
    assert "busy: cannot bind NFQUEUE 7" in out, out
    assert "'held': 0" in out


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "--agent":
        agent(int(args[0]), args[1])
    elif cmd == "--client":
        client(args[0], int(args[1]), int(args[2]))
    elif cmd == "--burst":
        burst(args[0], int(args[1]))
