"""The fast path (FAST_PATH_MARK): only packets of marked connections walk our rules.

Every test runs the service in its namespace and checks the counts against a packet capture.
"""
import json
import os
import signal
import socket
import time

import pytest

from harness import Capture, Service, compare, run_client, start_client, start_server
from nstools import wait_for
from profiler.ctmark import ConnMarks, mark_of, request

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MB = 1_000_000
MARK = 0x10000000


def key(conn):
    return conn["local"], conn["lport"], conn["remote"], conn["rport"]


def jump_packets(ns, builtin, table="filter"):
    """Packets counted by our jump(s) from `builtin` in `table`."""
    out = ns.run("iptables-legacy", "-t", table, "-L", builtin, "-v", "-x", "-n").stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "NETPROF_" in line)


def live_out_bytes(svc, job):
    code, answer = svc.get(f"/v1/jobs/{job}")
    return answer["totals"]["out_bytes"] if code == 200 else 0


def assert_exact(svc, iface, truth, conn):
    for direction, got, want, entry in compare(svc.logged(iface), truth, conn):
        assert entry is not None, f"{direction} of {conn} not logged"
        assert got == want, f"{direction} {conn}: logged {got}, captured {want}"


def test_request_and_mark_parsing():
    msg = request(1 << 8 | 0, 5, 7, (socket.AF_INET, "10.231.0.1", 4000, "10.231.0.2", 80), bit=MARK)
    length, kind, flags, seq = int.from_bytes(msg[:4], "little"), *[int.from_bytes(msg[i:i + n], "little")
                                                                      for i, n in ((4, 2), (6, 2), (8, 4))]
    assert (length, kind, flags, seq) == (len(msg), 256, 5, 7)
    assert socket.inet_aton("10.231.0.1") in msg and (4000).to_bytes(2, "big") in msg
    assert msg.endswith((21).to_bytes(2, "little") + MARK.to_bytes(4, "big"))
    # An entry's payload: nfgenmsg, then attributes; the mark is found among them, 0 when absent.
    payload = bytes(4) + (8).to_bytes(2, "little") + (3).to_bytes(2, "little") + bytes(4)
    payload += (8).to_bytes(2, "little") + (8).to_bytes(2, "little") + (MARK | 1).to_bytes(4, "big")
    assert mark_of(payload) == MARK | 1
    assert mark_of(bytes(4)) == 0
    with pytest.raises(ValueError):
        ConnMarks(3)


def test_untracked_packets_pass_one_rule_and_tracked_ones_are_counted_exactly(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    try:
        save = p.a.run("iptables-legacy-save", "-t", "filter").stdout + p.a.run("iptables-legacy-save", "-t", "security").stdout
        jumps = [line for line in save.splitlines() if line.startswith(("-A INPUT", "-A OUTPUT")) and "NETPROF_" in line]
        assert jumps and all(f"--mark {MARK:#x}/{MARK:#x}" in line for line in jumps), jumps
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        tracked = start_client(p.a, p.ip_b, 9000, up=3 * MB, down=2 * MB)
        assert svc.start_profile("fast#1", tracked.pid)[0] == 200
        # The hold chain marks a tracked owner's SYNs before holding them.
        wait_for(lambda: "CONNMARK" in p.a.run("iptables-legacy-save", "-t", "mangle").stdout, timeout=10,
                 what="hold rules")
        conn = run_client(tracked, 1)[0]
        # Untracked: to a server of nobody's job. (An outgoing connection of the tracked job's
        # owner would be marked too: the hold's rules know the owner, not the process.)
        start_server(p.a, p.ip_a, 9200)
        untracked = run_client(start_client(p.b, p.ip_a, 9200, up=4 * MB, down=4 * MB), 1)[0]
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="tracked connection logged")
        cap.stop()
        truth = cap.bytes()
        assert_exact(svc, p.iface_a, truth, conn)
        rec = svc.json_records(p.iface_a)[key(conn)]
        assert rec["complete"] and rec["count_source"] == "rules", rec
        # Only the tracked connection's packets took the jumps: the untracked one sent and got
        # more, and none of its packets is in the jumps' counts.
        into = jump_packets(p.a, "INPUT") + jump_packets(p.a, "INPUT", "security")
        out = jump_packets(p.a, "OUTPUT") + jump_packets(p.a, "OUTPUT", "security")
        assert (into, out) == (2 * rec["in_pkts"], 2 * rec["out_pkts"]), (into, out, rec)
        mine = (untracked["remote"], untracked["rport"], untracked["local"], untracked["lport"])
        assert truth[mine] > 4 * MB and mine not in svc.logged(p.iface_a)
    finally:
        svc.stop()


def test_a_connection_whose_mark_another_program_rewrites_is_completed_from_conntrack(netpair):
    """CONNMARK --set-mark by another program clears our bit: the packets after it pass the rules.
    The harvest finds the entry without the mark; the record must not claim the rules' short count."""
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    clobber = ("-t", "mangle", "-I", "POSTROUTING", "-p", "tcp", "-j", "CONNMARK", "--set-mark", "0x1")
    try:
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        client = start_client(p.a, p.ip_b, 9000, up=30 * MB, extra=("--pace", str(30 * MB)))
        assert svc.start_profile("clobbered", client.pid)[0] == 200
        client.stdin.write("go\n")
        client.stdin.flush()
        wait_for(lambda: live_out_bytes(svc, "clobbered") > 5 * MB, timeout=30, what="5 MB sent")
        p.a.run("iptables-legacy", *clobber)
        time.sleep(0.2)
        p.a.run("iptables-legacy", *["-D" if a == "-I" else a for a in clobber])
        conn = json.loads(client.stdout.readline())
        client.stdin.close()
        client.wait(60)
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        truth = cap.bytes()
        assert_exact(svc, p.iface_a, truth, conn)
        rec = svc.json_records(p.iface_a)[key(conn)]
        assert rec["complete"] and rec["count_source"] == "conntrack", rec
        assert "lost the fast-path mark" in svc.output()
    finally:
        p.a.run("iptables-legacy", *["-D" if a == "-I" else a for a in clobber], check=False)
        svc.stop()


def test_a_restart_marks_connections_an_earlier_run_left_unmarked(netpair):
    """A run without the fast path (an earlier version) is killed mid-transfer; the restart with the
    fast path marks the connection it carries on with, so its rules go on counting every packet."""
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both", FAST_PATH_MARK="0")
    svc.start()
    try:
        assert "connmark" not in p.a.run("iptables-legacy-save").stdout
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        client = start_client(p.a, p.ip_b, 9000, up=30 * MB, extra=("--pace", str(30 * MB)))
        assert svc.start_profile("upgrade", client.pid)[0] == 200
        client.stdin.write("go\n")
        client.stdin.flush()
        wait_for(lambda: live_out_bytes(svc, "upgrade") > 5 * MB, timeout=30, what="5 MB sent")
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(10)
        with open(svc.config_path) as f:
            config = f.read().replace("FAST_PATH_MARK = 0\n", "")
        with open(svc.config_path, "w") as f:
            f.write(config)
        restarted = Service(p.a, [p.iface_a])
        restarted.dir, restarted.config_path, restarted.log_dir = svc.dir, svc.config_path, svc.log_dir
        restarted.out_path = svc.out_path + ".2"
        restarted.start()
        try:
            assert "connmark" in p.a.run("iptables-legacy-save").stdout
            conn = json.loads(client.stdout.readline())
            client.stdin.close()
            client.wait(60)
            wait_for(lambda: key(conn) in restarted.logged(p.iface_a), timeout=20, what="logged after restart")
            cap.stop()
            assert_exact(restarted, p.iface_a, cap.bytes(), conn)
            rec = restarted.json_records(p.iface_a)[key(conn)]
            assert rec["complete"] and rec["count_source"] == "rules", rec
        finally:
            restarted.stop()
    finally:
        svc.stop()
