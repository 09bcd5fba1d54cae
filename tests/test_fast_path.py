"""The fast path (FAST_PATH_MARK): only packets of marked connections walk our rules.

Every test runs the service in its namespace and checks the counts against a packet capture.
"""
import json
import os
import signal
import socket
import time

import pytest

from harness import (Capture, Service, compare, finish_upload, key, run_client, start_client, start_server,
                     start_upload)
from nstools import wait_for
from profiler.ctmark import ConnMarks, mark_of, request

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MB = 1_000_000
MARK = 0x10000000


def jump_packets(ns, builtin, table="filter"):
    """Packets counted by our jump(s) from `builtin` in `table`."""
    out = ns.run("iptables-legacy", "-t", table, "-L", builtin, "-v", "-x", "-n").stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "NETPROF_" in line)


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
    # The IPv4 GET packed in one go is byte for byte what the general builder makes.
    import struct
    from profiler import ctmark
    for conn in ((socket.AF_INET, "10.231.0.1", 40001, "10.231.0.2", 443), (socket.AF_INET, "1.2.3.4", 1, "5.6.7.8", 65535)):
        body = struct.pack("=BBH", socket.AF_INET, 0, 0) + ctmark._tuple(*conn)
        assert request(1 << 8 | 1, 1, 9, conn) == struct.pack("=IHHII", 16 + len(body), 1 << 8 | 1, 1, 9, 0) + body
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
        # Per chain and table: the marked packets' jump, and the jump of packets without an entry.
        assert len(jumps) == 8 and all(f"--mark {MARK:#x}/{MARK:#x}" in line for line in jumps[::2]), jumps
        assert all("--ctstate INVALID,UNTRACKED" in line for line in jumps[1::2]), jumps
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


def test_ipv6_connections_are_marked_and_counted_by_their_rules(netpair):
    p = netpair
    p.a.run("ping", "-6", "-c1", "-W2", p.ip6_b, check=False)   # neighbour discovery first
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    try:
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip6_b, 9000)
        c = start_client(p.a, p.ip6_b, 9000, up=2 * MB, down=1 * MB)
        assert svc.start_profile("v6fast", c.pid)[0] == 200
        conn = run_client(c, 1)[0]
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        assert_exact(svc, p.iface_a, cap.bytes(), conn)
        rec = svc.json_records(p.iface_a)[key(conn)]
        # From the rules: the SYN was counted, so the IPv6 hold marked the connection.
        assert rec["complete"] and rec["count_source"] == "rules", rec
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
        client = start_upload(svc, p, "clobbered", 30 * MB, 30 * MB, 5 * MB)
        p.a.run("iptables-legacy", *clobber)
        time.sleep(0.2)
        p.a.run("iptables-legacy", *["-D" if a == "-I" else a for a in clobber])
        conn = finish_upload(client)
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
        client = start_upload(svc, p, "upgrade", 30 * MB, 30 * MB, 5 * MB)
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(10)
        with open(svc.config_path) as f:
            config = f.read().replace("FAST_PATH_MARK = 0\n", "")
        with open(svc.config_path, "w") as f:
            f.write(config)
        restarted = svc.restarted()
        try:
            assert "connmark" in p.a.run("iptables-legacy-save").stdout
            conn = finish_upload(client)
            wait_for(lambda: key(conn) in restarted.logged(p.iface_a), timeout=20, what="logged after restart")
            cap.stop()
            assert_exact(restarted, p.iface_a, cap.bytes(), conn)
            rec = restarted.json_records(p.iface_a)[key(conn)]
            assert rec["complete"] and rec["count_source"] == "rules", (rec, restarted.output())
        finally:
            restarted.stop()
    finally:
        svc.stop()


CTMARK_SCRIPT = r'''
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from profiler.ctmark import ConnMarks
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(600)
cs = [socket.create_connection(srv.getsockname()) for _ in range(300)]
conns = [(socket.AF_INET, *c.getsockname(), *c.getpeername()) for c in cs]
other = ConnMarks(0x1)
other.set(conns[:10])                       # another program's bit, set first
m = ConnMarks(0x10000000)
m._seq = (1 << 32) - 5                      # the sequence number wraps within this batch
ghost = (socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2)
failed = m.set(conns[:200] + conns[:3] + [ghost])
got = m.read(conns + [ghost])
back = m.read([(c[0], c[3], c[4], c[1], c[2]) for c in conns[:5]])   # the reply direction finds it too
print(json.dumps({"failed": [list(k) + [v] for k, v in failed.items()],
                  "marked": sum(1 for c in conns if got[c].marked), "unmarked": sum(1 for c in conns if not got[c].marked),
                  "ghost": got[ghost], "back": all(e.marked for e in back.values()),
                  "other_kept": all(e.marked for e in other.read(conns[:10]).values()),
                  "picked_up": any(got[c].picked_up for c in conns)}))
'''


def test_ctmark_marks_in_batches_finds_either_direction_and_keeps_other_bits(netpair):
    from harness import PYTHON, ROOT
    ns = netpair.a
    ns.run("iptables-legacy", "-N", "CTON")
    ns.run("iptables-legacy", "-A", "CTON", "-m", "conntrack", "--ctstate", "INVALID", "-j", "RETURN")  # conntrack on
    out = json.loads(ns.run(PYTHON, "-c", CTMARK_SCRIPT, ROOT).stdout.splitlines()[-1])
    assert out["failed"] == [[2, "127.0.0.1", 1, "127.0.0.1", 2, 2]]        # ENOENT: no such entry, none made
    assert (out["marked"], out["unmarked"]) == (200, 100)
    assert out["ghost"] is None and out["back"] and out["other_kept"]
    assert out["picked_up"] is False                                          # every entry began with its SYN


FLUSH_SCRIPT = r'''
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
body = struct.pack("=BBH", socket.AF_INET, 0, 0)         # IPCTNL_MSG_CT_DELETE without a tuple: flush
s.send(struct.pack("=IHHII", 16 + len(body), 1 << 8 | 2, 1 | 4, 1, 0) + body)
code = struct.unpack_from("=i", s.recv(4096), 16)[0]
assert code == 0, code
'''


def test_a_conntrack_flush_mid_connection_is_not_completed_from_the_new_entry(netpair):
    """After a flush conntrack picks the connection up again: a new entry, unmarked, counting from
    then on. The rules missed what followed, conntrack what came before: the record says incomplete."""
    from harness import PYTHON
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    try:
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "flushed", 20 * MB, 20 * MB, 5 * MB)
        p.a.run(PYTHON, "-c", FLUSH_SCRIPT)
        conn = finish_upload(client)
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        truth = cap.bytes()
        rec = svc.json_records(p.iface_a)[key(conn)]
        assert not rec["complete"] and rec["count_source"] == "rules", rec
        assert "lost the fast-path mark" in rec["note"] and "picked the connection up again" in rec["note"], rec
        assert 5 * MB < rec["out_bytes"] < truth[key(conn)]
    finally:
        svc.stop()


HOLDER_SCRIPT = r'''
import sys, time
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(7913, lambda pkt: pkt.accept())
print("bound", flush=True)
time.sleep(120)
'''


def test_with_the_queue_taken_the_service_runs_without_the_fast_path(netpair):
    """Another program holds QUEUE_NUM: no SYN is held, so none is marked from its first packet, and
    the jumps must take every packet again (as before the fast path)."""
    from harness import PYTHON
    p = netpair
    holder = p.a.popen(PYTHON, "-c", HOLDER_SCRIPT, stdout=__import__("subprocess").PIPE, text=True)
    assert holder.stdout.readline().strip() == "bound"
    svc = Service(p.a, [p.iface_a])
    svc.start()
    try:
        assert "fast path off" in svc.output()
        save = p.a.run("iptables-legacy-save", "-t", "filter").stdout
        assert "connmark" not in save and f"-A INPUT -i {p.iface_a} -j NETPROF_I_{p.iface_a}" in save
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        # Paced: with no SYN held, a connection over before its SYN is read is never attributed.
        c = start_client(p.a, p.ip_b, 9000, up=4 * MB, extra=("--pace", str(8 * MB)))
        assert svc.start_profile("noqueue", c.pid)[0] == 200
        conn = run_client(c, 1)[0]
        try:
            wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        except AssertionError:
            raise AssertionError(svc.output()) from None
        cap.stop()
        assert_exact(svc, p.iface_a, cap.bytes(), conn)     # completed from conntrack: rules came late
    finally:
        svc.stop()
        holder.kill()
        holder.wait(10)


def test_packets_conntrack_leaves_without_an_entry_are_counted_through_the_second_jump(netpair):
    """With nf_conntrack_tcp_loose = 0 a flushed connection gets no new entry: each of its later
    packets is INVALID, carries no mark, and only the INVALID,UNTRACKED jump brings it to its rules."""
    from harness import PYTHON
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    try:
        p.a.run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "invalid", 20 * MB, 20 * MB, 5 * MB)
        p.a.run(PYTHON, "-c", FLUSH_SCRIPT)
        conn = finish_upload(client)
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        assert_exact(svc, p.iface_a, cap.bytes(), conn)
        rec = svc.json_records(p.iface_a)[key(conn)]
        assert rec["complete"] and rec["count_source"] == "rules", rec
        into = p.a.run("iptables-legacy", "-L", "INPUT", "-v", "-x", "-n").stdout
        invalid = [line for line in into.splitlines() if "ctstate INVALID,UNTRACKED" in line]
        assert invalid and int(invalid[0].split()[0]) > 100, into     # the ACKs of 15 MB came that way
    finally:
        svc.stop()


def test_a_mark_lost_while_no_service_ran_is_found_at_the_restart_and_kept_through_another_crash(netpair):
    """Killed mid-transfer; another program rewrites the connection's mark while no service runs; the
    restart must find it before marking it again, and the finding must survive a second kill -9."""
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    clobber = ("-t", "mangle", "-I", "POSTROUTING", "-p", "tcp", "-j", "CONNMARK", "--set-mark", "0x1")
    services = [svc]
    try:
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "down", 30 * MB, 20 * MB, 5 * MB)
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(10)
        p.a.run("iptables-legacy", *clobber)
        time.sleep(0.2)
        p.a.run("iptables-legacy", *["-D" if a == "-I" else a for a in clobber])
        for n in (2, 3):        # the restart that finds it, then one after another kill -9
            again = svc.restarted(f".{n}")
            services.append(again)
            if n == 2:
                assert "restart: 1 connections' conntrack entries had lost the fast-path mark" in again.output()
                again.proc.send_signal(signal.SIGKILL)
                again.proc.wait(10)
        conn = finish_upload(client)
        wait_for(lambda: key(conn) in services[-1].logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        rec = services[-1].json_records(p.iface_a)[key(conn)]
        # Not from the rules, which missed what passed unmarked; conntrack's entry began with the SYN.
        assert rec["count_source"] == "conntrack" and rec["complete"], rec
        assert_exact(services[-1], p.iface_a, cap.bytes(), conn)
    finally:
        p.a.run("iptables-legacy", *["-D" if a == "-I" else a for a in clobber], check=False)
        for s in services:
            s.stop()
