"""The fast path (FAST_PATH_LABEL): packets of labelled connections (every one whose SYN is not held,
not on lo) pass our rules by; every other packet walks them.

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
from profiler.ctmark import ConnLabels, labelled, mark_of, request

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MB = 1_000_000
LABEL = 121
MARK = 0x10000000       # the bit of the earlier fast path, which marked tracked connections instead


def jump_packets(ns, builtin, table="filter"):
    """Packets counted by our jump(s) from `builtin` in `table`."""
    out = ns.run("iptables-legacy", "-t", table, "-L", builtin, "-v", "-x", "-n").stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "NETPROF_" in line)


def fast_path_back_on(svc):
    """Take FAST_PATH_LABEL = off out of the config of `svc` (killed), for its restart."""
    with open(svc.config_path) as f:
        config = f.read()
    assert "FAST_PATH_LABEL = off\n" in config
    with open(svc.config_path, "w") as f:
        f.write(config.replace("FAST_PATH_LABEL = off\n", ""))


def assert_exact(svc, iface, truth, conn):
    for direction, got, want, entry in compare(svc.logged(iface), truth, conn):
        assert entry is not None, f"{direction} of {conn} not logged"
        assert got == want, f"{direction} {conn}: logged {got}, captured {want}"


def test_request_label_and_mark_parsing():
    msg = request(1 << 8 | 0, 5, 7, (socket.AF_INET, "10.231.0.1", 4000, "10.231.0.2", 80), clear=LABEL)
    length, kind, flags, seq = int.from_bytes(msg[:4], "little"), *[int.from_bytes(msg[i:i + n], "little")
                                                                      for i, n in ((4, 2), (6, 2), (8, 4))]
    assert (length, kind, flags, seq) == (len(msg), 256, 5, 7)
    assert socket.inet_aton("10.231.0.1") in msg and (4000).to_bytes(2, "big") in msg
    # CTA_LABELS all clear, under CTA_LABELS_MASK with our bit alone (bit 121: word 3, bit 25).
    mask = (0).to_bytes(12, "little") + (1 << 25).to_bytes(4, "little")
    assert msg.endswith((20).to_bytes(2, "little") + (22).to_bytes(2, "little") + bytes(16)
                        + (20).to_bytes(2, "little") + (23).to_bytes(2, "little") + mask)
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
    labels = (20).to_bytes(2, "little") + (22).to_bytes(2, "little") + mask
    assert labelled(bytes(4) + labels, LABEL) and not labelled(bytes(4) + labels, LABEL - 1)
    assert not labelled(payload, LABEL)            # no CTA_LABELS: no label set
    for bad in (-1, 128):
        with pytest.raises(ValueError):
            ConnLabels(bad)


def test_untracked_packets_pass_one_rule_and_tracked_ones_are_counted_exactly(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    try:
        save = p.a.run("iptables-legacy-save", "-t", "filter").stdout + p.a.run("iptables-legacy-save", "-t", "security").stdout
        jumps = [line for line in save.splitlines() if line.startswith(("-A INPUT", "-A OUTPUT")) and "NETPROF_" in line]
        # One jump per chain and table, passed by by the packets of labelled connections.
        assert len(jumps) == 4 and all(f'-p tcp -m connlabel ! --label "{LABEL}"' in line for line in jumps), jumps
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        tracked = start_client(p.a, p.ip_b, 9000, up=3 * MB, down=2 * MB)
        assert svc.start_profile("fast#1", tracked.pid)[0] == 200
        wait_for(lambda: "--uid-owner" in p.a.run("iptables-legacy-save", "-t", "mangle").stdout, timeout=10,
                 what="hold rules")
        conn = run_client(tracked, 1)[0]
        # Untracked: to a server of nobody's job, its SYN not held. (An outgoing connection of the
        # tracked job's owner would be held too: the hold's rules know the owner, not the process.)
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


def test_ipv6_connections_are_held_unlabelled_and_counted_by_their_rules(netpair):
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
        # From the rules: the SYN was counted, and the IPv6 hold left the connection unlabelled.
        assert rec["complete"] and rec["count_source"] == "rules", rec
    finally:
        svc.stop()


CLOBBER = ("-t", "mangle", "-I", "POSTROUTING", "-p", "tcp", "-m", "connlabel", "--label", str(LABEL), "--set")


def test_a_connection_another_program_labels_is_completed_from_conntrack(netpair):
    """Another program sets our label on a tracked connection: the packets after it pass the rules
    by. The harvest finds the label; the record must not claim the rules' short count."""
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    clobber = CLOBBER
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
        assert "let packets pass their rules by" in svc.output()
    finally:
        p.a.run("iptables-legacy", *["-D" if a == "-I" else a for a in clobber], check=False)
        svc.stop()


def test_a_restart_with_the_fast_path_carries_on_counting_a_connection_of_a_run_without(netpair):
    """A run without the fast path is killed mid-transfer; the restart with the fast path carries on
    with its connection, whose rules go on counting every packet."""
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both", FAST_PATH_LABEL="off")
    svc.start()
    try:
        assert "connlabel" not in p.a.run("iptables-legacy-save").stdout
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "upgrade", 30 * MB, 30 * MB, 5 * MB)
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(10)
        fast_path_back_on(svc)
        restarted = svc.restarted()
        try:
            assert "connlabel" in p.a.run("iptables-legacy-save").stdout
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


CTLABEL_SCRIPT = r'''
import json, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
from profiler.ctmark import ConnLabels
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(600)
early = socket.create_connection(srv.getsockname())     # before any label rule: its entry has no labels
for label in ("121", "5"):                               # ours on every SYN, and another program's
    subprocess.run(["iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--syn", "-m", "connlabel",
                    "--label", label, "--set"], check=True, capture_output=True)
cs = [socket.create_connection(srv.getsockname()) for _ in range(300)]
conns = [(socket.AF_INET, *c.getsockname(), *c.getpeername()) for c in cs]
first = (socket.AF_INET, *early.getsockname(), *early.getpeername())
m = ConnLabels(121)
before = m.read(conns)
m._seq = (1 << 32) - 5                      # the sequence number wraps within this batch
ghost = (socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2)
failed = m.clear(conns[:200] + conns[:3] + [ghost, first])
got = m.read(conns + [ghost, first])
back = m.read([(c[0], c[3], c[4], c[1], c[2]) for c in conns[:5]])   # the reply direction finds it too
print(json.dumps({"failed": [list(k) + [v] for k, v in failed.items()],
                  "labelled_before": sum(1 for c in conns if not before[c].counted),
                  "counted": sum(1 for c in conns if got[c].counted), "labelled": sum(1 for c in conns if not got[c].counted),
                  "ghost": got[ghost], "first": got[first].counted, "back": all(e.counted for e in back.values()),
                  "other_kept": not any(e.counted for e in m.read(conns[:10], label=5).values()),
                  "picked_up": any(got[c].picked_up for c in conns)}))
'''


def test_ctlabel_clears_in_batches_finds_either_direction_and_keeps_other_labels(netpair):
    from harness import PYTHON, ROOT
    ns = netpair.a
    ns.run("iptables-legacy", "-N", "CTON")
    ns.run("iptables-legacy", "-A", "CTON", "-m", "conntrack", "--ctstate", "INVALID", "-j", "RETURN")  # conntrack on
    out = json.loads(ns.run(PYTHON, "-c", CTLABEL_SCRIPT, ROOT).stdout.splitlines()[-1])
    assert out["failed"] == [[2, "127.0.0.1", 1, "127.0.0.1", 2, 2]]        # ENOENT: no such entry, none made
    assert out["labelled_before"] == 300
    assert (out["counted"], out["labelled"]) == (200, 100)
    # The entry made before labels existed has none to clear (ENOSPC, not a failure): it is counted.
    assert out["ghost"] is None and out["first"] and out["back"] and out["other_kept"]
    assert out["picked_up"] is False                                          # every entry began with its SYN


FLUSH_SCRIPT = r'''
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
body = struct.pack("=BBH", socket.AF_INET, 0, 0)         # IPCTNL_MSG_CT_DELETE without a tuple: flush
s.send(struct.pack("=IHHII", 16 + len(body), 1 << 8 | 2, 1 | 4, 1, 0) + body)
code = struct.unpack_from("=i", s.recv(4096), 16)[0]
assert code == 0, code
'''


@pytest.mark.parametrize("tcp_loose", [1, 0])
def test_a_conntrack_flush_mid_connection_loses_nothing_from_the_rules(netpair, tcp_loose):
    """After a flush conntrack picks the connection up again (nf_conntrack_tcp_loose = 1, the
    default): a new entry, made from a packet that is not a SYN, so without the label. With 0 it
    makes none: each later packet is INVALID, has no label to read, and the inverted label match
    takes it all the same. Either way every packet takes the jumps: the rules count it all."""
    from harness import PYTHON
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    try:
        p.a.run("sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_loose={tcp_loose}")
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "flushed", 20 * MB, 20 * MB, 5 * MB)
        p.a.run(PYTHON, "-c", FLUSH_SCRIPT)
        conn = finish_upload(client)
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        assert_exact(svc, p.iface_a, cap.bytes(), conn)
        rec = svc.json_records(p.iface_a)[key(conn)]
        assert rec["complete"] and rec["count_source"] == "rules", rec
        if not tcp_loose:
            stats = p.a.run("conntrack", "-S", check=False).stdout
            invalid = sum(int(f.split("=")[1]) for f in stats.split() if f.startswith("invalid="))
            assert invalid > 100, stats         # the ACKs of 15 MB had no entry
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
    """Another program holds QUEUE_NUM: no SYN is held, so no connection is known from its first
    packet, and the jumps must take every packet again (as without the fast path)."""
    from harness import PYTHON
    p = netpair
    holder = p.a.popen(PYTHON, "-c", HOLDER_SCRIPT, stdout=__import__("subprocess").PIPE, text=True)
    assert holder.stdout.readline().strip() == "bound"
    svc = Service(p.a, [p.iface_a])
    svc.start()
    try:
        assert "fast path off" in svc.output()
        save = p.a.run("iptables-legacy-save", "-t", "filter").stdout
        assert "connlabel" not in save and f"-A INPUT -i {p.iface_a} -j NETPROF_I_{p.iface_a}" in save
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


def test_a_label_set_while_no_service_ran_is_found_at_the_restart_and_kept_through_another_crash(netpair):
    """Killed mid-transfer; another program labels the connection while no service runs; the restart
    must find it before clearing the label, and the finding must survive a second kill -9."""
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    clobber = CLOBBER
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
                assert "restart: 1 connections' conntrack entries let packets pass their rules by" in again.output()
                again.proc.send_signal(signal.SIGKILL)
                again.proc.wait(10)
        conn = finish_upload(client)
        wait_for(lambda: key(conn) in services[-1].logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        rec = services[-1].json_records(p.iface_a)[key(conn)]
        # Not from the rules, which missed what passed by; conntrack's entry began with the SYN.
        assert rec["count_source"] == "conntrack" and rec["complete"], rec
        assert_exact(services[-1], p.iface_a, cap.bytes(), conn)
    finally:
        p.a.run("iptables-legacy", *["-D" if a == "-I" else a for a in clobber], check=False)
        for s in services:
            s.stop()


def test_a_restart_after_a_version_whose_jumps_took_marked_connections_reads_the_mark(netpair):
    """The fast path before this one marked tracked connections (FAST_PATH_MARK) and its jumps took
    only marked ones. Such a run is made here from a run without the fast path whose jumps are
    changed to match the mark, on a connection that does not carry it: its packets passed the rules
    by. The restart reads the mark the old jumps matched, and the record comes from conntrack."""
    p = netpair
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both", FAST_PATH_LABEL="off")
    svc.start()
    services = [svc]
    try:
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "old", 30 * MB, 20 * MB, 5 * MB)
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(10)
        for table in ("filter", "security"):
            for builtin, flag, chain in (("INPUT", "-i", "I"), ("OUTPUT", "-o", "O")):
                p.a.run("iptables-legacy", "-t", table, "-R", builtin, "1", flag, p.iface_a, "-m", "connmark",
                        "--mark", f"{MARK:#x}/{MARK:#x}", "-j", f"NETPROF_{chain}_{p.iface_a}")
        time.sleep(0.3)        # packets pass the rules by
        fast_path_back_on(svc)
        again = svc.restarted()
        services.append(again)
        assert "restart: 1 connections' conntrack entries let packets pass their rules by" in again.output()
        conn = finish_upload(client)
        wait_for(lambda: key(conn) in again.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        rec = again.json_records(p.iface_a)[key(conn)]
        assert rec["count_source"] == "conntrack" and rec["complete"], rec
        assert_exact(again, p.iface_a, cap.bytes(), conn)
    finally:
        for s in services:
            s.stop()


def test_a_tracked_loopback_connection_is_not_labelled_by_the_other_hold_chain(netpair):
    """On lo a SYN passes both hold chains, OUTPUT's and then INPUT's. A tracked client's SYN to an
    untracked local server is held in the first; the second, holding no such port, must not label
    it on its way in: every packet is counted by the rules. (On lo a capture may see a GSO packet cut
    in two that netfilter saw whole, so the rules' header bytes are not the capture's: the payload
    bounds them instead.)"""
    p = netpair
    svc = Service(p.a, ["lo"], LOG_FORMAT="both")
    svc.start()
    try:
        start_server(p.a, "127.0.0.1", 9300)
        client = start_client(p.a, "127.0.0.1", 9300, up=2 * MB, down=1 * MB)
        assert svc.start_profile("lo#1", client.pid)[0] == 200
        wait_for(lambda: "--uid-owner" in p.a.run("iptables-legacy-save", "-t", "mangle").stdout, timeout=10,
                 what="hold rules")
        conn = run_client(client, 1)[0]
        wait_for(lambda: key(conn) in svc.logged("lo"), timeout=20, what="logged")
        rec = svc.json_records("lo")[key(conn)]
        assert rec["complete"] and rec["count_source"] == "rules", rec
        assert rec["out_bytes"] > 2 * MB and rec["in_bytes"] > 1 * MB, rec    # the rules saw it all
    finally:
        svc.stop()
