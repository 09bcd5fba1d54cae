#!/usr/bin/env python3
"""Exactness of every logged count against a packet capture of the same interface.

Runs each case of issue 3 against the live service in a network namespace and
prints one line per connection and direction (logged, truth, difference) and a
summary line. Exit status 1 if any connection is unlogged or differs by a byte.

  python bench/accuracy.py            every case, 100 MB transfers included
  python bench/accuracy.py --quick    without the 100 MB transfers
  python bench/accuracy.py --case half-close --case ipv6
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

from harness import Capture, Service, run_client, start_client, start_server  # noqa: E402
from nstools import NetPair, wait_for  # noqa: E402

MB = 1_000_000
# name: (client options, number of connections)
CLIENT_CASES = {
    "1KB-up": (dict(up=1000), 1), "1KB-down": (dict(down=1000), 1),
    "100KB-up": (dict(up=100_000), 1), "100KB-down": (dict(down=100_000), 1),
    "10MB-up": (dict(up=10 * MB), 1), "10MB-down": (dict(down=10 * MB), 1),
    "100MB-up": (dict(up=100 * MB), 1), "100MB-down": (dict(down=100 * MB), 1),
    "200-short": (dict(up=100, down=100, count=200), 200),
    "half-close": (dict(up=1000, down=5 * MB), 1),
    "reset-by-server": (dict(down=10 * MB, extra=("--reset", "server")), 1),
    "reset-by-client": (dict(down=10 * MB, extra=("--reset", "client")), 1),
    "child": (dict(down=100_000, extra=("--child",)), 1),
    "grandchild": (dict(up=100_000, extra=("--grandchild",)), 1),
    "ipv6": (dict(up=100_000, down=1 * MB, count=3, v6=True), 3),
}
SPECIAL_CASES = ("accepted", "open-at-endprofile", "capture-drops")
ALL_CASES = tuple(CLIENT_CASES) + SPECIAL_CASES
SLOW = ("100MB-up", "100MB-down")


def _key(conn):
    return conn["local"], conn["lport"], conn["remote"], conn["rport"]


class Result:
    def __init__(self):
        self.rows = []   # (case, conn, direction, logged, truth)

    def add(self, case, conn, svc_logged, truth):
        l, lp, r, rp = _key(conn)
        for direction, key in (("OUT", (l, lp, r, rp)), ("IN", (r, rp, l, lp))):
            entry = svc_logged.get(key)
            logged = None if entry is None else entry[3]
            if entry is not None and (entry[1] != conn["pid"] or entry[2] != direction or entry[0] != conn["job"]):
                logged = None   # attributed wrongly counts as not logged
            self.rows.append((case, f"{l}:{lp}>{r}:{rp}", direction, logged, truth.get(key, 0)))

    @property
    def bad(self):
        return [row for row in self.rows if row[3] != row[4]]

    def print(self, out=sys.stdout):
        out.write(f"{'case':<20} {'connection':<44} {'dir':<3} {'logged':>11} {'truth':>11} {'diff':>8}\n")
        for case, conn, direction, logged, truth in self.rows:
            diff = "UNLOGGED" if logged is None else f"{logged - truth:+d}"
            out.write(f"{case:<20} {conn:<44} {direction:<3} {logged if logged is not None else '-':>11} "
                      f"{truth:>11} {diff:>8}\n")
        conns = len(self.rows) // 2
        out.write(f"accuracy: {conns} connections, {len(self.rows)} directions, "
                  f"{len(self.rows) - len(self.bad)} exact, {len(self.bad)} wrong\n")


def _wait_logged(svc, iface, conns, timeout=30):
    wait_for(lambda: all(_key(c) in svc.logged(iface) for c in conns), timeout=timeout, what="all logged")


def run_client_cases(pair, svc, cases, result):
    cap = Capture(pair.a, pair.iface_a)
    start_server(pair.b, pair.ip_b, 9000)
    start_server(pair.b, pair.ip6_b, 9006)
    done = []
    for case in cases:
        opts, n = dict(CLIENT_CASES[case][0]), CLIENT_CASES[case][1]
        v6 = opts.pop("v6", False)
        remote, port = (pair.ip6_b, 9006) if v6 else (pair.ip_b, 9000)
        client = start_client(pair.a, remote, port, **opts)
        job = f"acc#{case}"
        code, answer = svc.start_profile(job, client.pid)
        assert code == 200, answer
        conns = run_client(client, n, timeout=300)
        for c in conns:
            c["job"] = job
        done.append((case, conns))
    _wait_logged(svc, pair.iface_a, [c for _, conns in done for c in conns])
    cap.stop()
    truth, logged = cap.bytes(), svc.logged(pair.iface_a)
    for case, conns in done:
        for c in conns:
            result.add(case, c, logged, truth)


def run_accepted(pair, svc, result):
    """A tracked server accepts: one that serves in threads, one with workers forked after listen()."""
    cap = Capture(pair.a, pair.iface_a)
    threaded, _ = start_server(pair.a, pair.ip_a, 9100)
    prefork, info = start_server(pair.a, pair.ip_a, 9101, prefork=3)
    assert svc.start_profile("acc#accepted", threaded.pid)[0] == 200
    assert svc.start_profile("acc#accepted", prefork.pid)[0] == 200
    served = []
    for port, pids in ((9100, {threaded.pid}), (9101, set(info["workers"]))):
        for c in run_client(start_client(pair.b, pair.ip_a, port, up=300_000, down=3 * MB, count=3), 3):
            served.append((dict(local=pair.ip_a, lport=port, remote=c["local"], rport=c["lport"],
                                job="acc#accepted"), pids))
    _wait_logged(svc, pair.iface_a, [mine for mine, _ in served])
    cap.stop()
    truth, logged = cap.bytes(), svc.logged(pair.iface_a)
    records = svc.json_records(pair.iface_a)
    by_worker = 0
    for mine, pids in served:
        entry = logged.get((mine["remote"], mine["rport"], mine["local"], mine["lport"]))
        rec = records.get((mine["local"], mine["lport"], mine["remote"], mine["rport"]), {})
        # The pid must be the process that accepted: for pre-forked workers, a worker, not the parent.
        # Only a record that says its accepter was never seen (pid_source "listener") may name
        # another process holding the listening socket.
        allowed = pids | ({threaded.pid, prefork.pid} if rec.get("pid_source") == "listener" else set())
        mine["pid"] = entry[1] if entry and entry[1] in allowed else -1
        if mine["pid"] == -1:
            print(f"accepted: {mine['remote']}:{mine['rport']} logged as {entry} ({rec.get('pid_source')}), "
                  f"expected one of {sorted(pids)}", file=sys.stderr)
        by_worker += mine["lport"] == 9101 and rec.get("pid_source") == "socket" and mine["pid"] in pids
        result.add("accepted", mine, logged, truth)
    return by_worker


def run_open_at_endprofile(pair, svc, result):
    cap = Capture(pair.a, pair.iface_a)
    client = start_client(pair.a, pair.ip_b, 9000, up=200_000, down=2 * MB, extra=("--keep-open",))
    assert svc.start_profile("acc#open", client.pid)[0] == 200
    client.stdin.write("go\n")
    client.stdin.flush()
    conn = json.loads(client.stdout.readline())
    conn["job"] = "acc#open"
    time.sleep(0.2)   # let the last ACKs of the download settle: the count is of an idle connection
    code, answer = svc.get("/endprofile/jobid=acc%23open")
    assert code == 200, answer
    [rec] = answer["connections"]
    assert rec["open_at_end"] and rec["reason"] == "EndProfile", rec
    cut = rec["end"]
    client.stdin.write("\n")
    client.stdin.close()
    client.wait(30)
    cap.stop()
    result.add("open-at-endprofile", conn, svc.logged(pair.iface_a), cap.bytes(until=cut))


def run_capture_drops(pair, result, port=18081):
    """A service whose capture buffer is far too small for a burst of connections."""
    svc = Service(pair.a, [pair.iface_a], port=port, CAPTURE_BUFFER=4096)
    svc.start()
    try:
        cap = Capture(pair.a, pair.iface_a, buffer_kib=65536)
        start_server(pair.b, pair.ip_b, 9200)
        client = start_client(pair.a, pair.ip_b, 9200, up=2000, down=2000, count=400, extra=("--parallel", "16"))
        assert svc.start_profile("acc#drops", client.pid)[0] == 200
        conns = run_client(client, 400, timeout=300)
        for c in conns:
            c["job"] = "acc#drops"
        _wait_logged(svc, pair.iface_a, conns, timeout=60)
        dropped = svc.get("/status")[1]["interfaces"][pair.iface_a].get("dropped", 0)
        cap.stop()
        truth, logged = cap.bytes(), svc.logged(pair.iface_a)
        for c in conns:
            result.add("capture-drops", c, logged, truth)
        return dropped
    finally:
        svc.stop()


def run(cases, out=sys.stdout):
    result = Result()
    pair = NetPair()
    svc = None
    notes = {}
    try:
        pair.a.run("ping", "-6", "-c1", "-W2", pair.ip6_b, check=False)
        svc = Service(pair.a, [pair.iface_a], LOG_FORMAT="both").start()
        client_cases = [c for c in cases if c in CLIENT_CASES]
        if client_cases:
            run_client_cases(pair, svc, client_cases, result)
        if "accepted" in cases:
            notes["accepted_seen_in_worker"] = run_accepted(pair, svc, result)
        if "open-at-endprofile" in cases:
            run_open_at_endprofile(pair, svc, result)
        svc.stop()
        if "capture-drops" in cases:
            notes["capture_dropped_packets"] = run_capture_drops(pair, result)
    finally:
        if svc is not None:
            svc.stop()
        pair.close()
    result.print(out)
    for k, v in notes.items():
        out.write(f"note: {k} = {v}\n")
    return result, notes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="leave out the 100 MB transfers")
    parser.add_argument("--case", action="append", choices=ALL_CASES, help="run only these cases")
    args = parser.parse_args()
    cases = args.case or [c for c in ALL_CASES if not (args.quick and c in SLOW)]
    result, _ = run(cases)
    return 1 if result.bad else 0


if __name__ == "__main__":
    sys.exit(main())
