"""Never lose data: a crash and restart, other programs changing our rules."""
import json
import os
import signal
import time

import pytest

from harness import Capture, Service, run_client, start_client, start_server
from nstools import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MB = 1_000_000


def key(conn):
    return conn["local"], conn["lport"], conn["remote"], conn["rport"]


def live_out_bytes(svc, job):
    code, answer = svc.get(f"/v1/jobs/{job}")
    return answer["totals"]["out_bytes"] if code == 200 else 0


def test_kill_9_in_the_middle_of_100MB_then_restart_loses_nothing(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])
    svc.start()
    try:
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        client = start_client(p.a, p.ip_b, 9000, up=100 * MB, extra=("--pace", str(40 * MB)))
        assert svc.start_profile("crash#1", client.pid)[0] == 200
        client.stdin.write("go\n")
        client.stdin.flush()
        wait_for(lambda: live_out_bytes(svc, "crash%231") > 20 * MB, timeout=30, what="20 MB sent")
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(10)
        time.sleep(0.3)     # the transfer goes on while no service runs
        restarted = Service(p.a, [p.iface_a])
        restarted.dir, restarted.config_path, restarted.log_dir = svc.dir, svc.config_path, svc.log_dir
        restarted.out_path = svc.out_path + ".2"
        restarted.start()
        assert "carried on with 1 jobs" in restarted.output()
        conn = json.loads(client.stdout.readline())
        client.stdin.close()
        client.wait(60)
        wait_for(lambda: key(conn) in restarted.logged(p.iface_a), timeout=20, what="logged after restart")
        code, answer = restarted.get("/endprofile/jobid=crash%231")
        assert code == 200 and answer["totals"]["connections"] == 1
        cap.stop()
        truth = cap.bytes()
        job, pid, direction, nbytes = restarted.logged(p.iface_a)[key(conn)]
        assert (job, pid, direction) == ("crash#1", client.pid, "OUT")
        assert nbytes == truth[key(conn)] and nbytes > 100 * MB
        back = (conn["remote"], conn["rport"], conn["local"], conn["lport"])
        assert restarted.logged(p.iface_a)[back][3] == truth[back]
        assert answer["connections"][0]["complete"] is True
        restarted.stop()
    finally:
        svc.stop()


@pytest.mark.parametrize("interference", ["flush", "delete-jump", "reorder"])
def test_rules_changed_by_another_program_are_repaired_and_counted(netpair, interference):
    p = netpair
    svc = Service(p.a, [p.iface_a], VERIFY_INTERVAL=0.2)
    try:
        svc.start()
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        client = start_client(p.a, p.ip_b, 9000, up=30 * MB, extra=("--pace", str(20 * MB)))
        assert svc.start_profile("meddle", client.pid)[0] == 200
        client.stdin.write("go\n")
        client.stdin.flush()
        wait_for(lambda: live_out_bytes(svc, "meddle") > 5 * MB, timeout=30, what="5 MB sent")
        chain_out = f"NETPROF_O_{p.iface_a}"
        # In both tables that hold connection rules (shards.py): the connection's rules are in one.
        for table in ("filter", "security"):
            if interference == "flush":
                p.a.run("iptables-legacy", "-w", "-t", table, "-F", chain_out)
            elif interference == "delete-jump":
                p.a.run("iptables-legacy", "-w", "-t", table, "-D", "OUTPUT", "-o", p.iface_a, "-j", chain_out)
            else:
                p.a.run("iptables-legacy", "-w", "-t", table, "-I", "OUTPUT", "1", "-p", "udp", "-j", "ACCEPT")
        wait_for(lambda: "repaired" in svc.output(), timeout=10, what="repair")
        for table in ("filter", "security"):
            save = p.a.run("iptables-legacy-save", "-t", table).stdout
            outputs = [line for line in save.splitlines() if line.startswith("-A OUTPUT")]
            assert outputs.count(f"-A OUTPUT -o {p.iface_a} -j {chain_out}") == 1, table
            if interference == "reorder":
                assert outputs[:2] == ["-A OUTPUT -o {} -j {}".format(p.iface_a, chain_out),
                                       "-A OUTPUT -p udp -j ACCEPT"], table   # ours first again; theirs left alone
        conn = json.loads(client.stdout.readline())
        client.stdin.close()
        client.wait(60)
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        truth = cap.bytes()
        code, answer = svc.get("/endprofile/jobid=meddle")
        [rec] = answer["connections"]
        if rec["complete"]:
            # conntrack counted the connection from its first packet, whatever happened to the rules.
            assert svc.logged(p.iface_a)[key(conn)][3] == truth[key(conn)]
            assert rec["source"] == "conntrack"
        else:
            assert "removed by another program" in rec["note"]
    finally:
        svc.stop()


def test_concurrent_iptables_writer_never_makes_our_rules_vanish(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])
    writer = None
    try:
        svc.start()
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        # Another tool changing the legacy tables in a loop, the way iptables does it (-w: the lock).
        writer = p.a.popen("sh", "-c", "i=0; while [ $i -lt 400 ]; do iptables-legacy -w -A FORWARD -j ACCEPT; "
                                       "iptables-legacy -w -D FORWARD -j ACCEPT; i=$((i+1)); done")
        client = start_client(p.a, p.ip_b, 9000, up=20_000, down=20_000, count=60)
        assert svc.start_profile("busy", client.pid)[0] == 200
        conns = run_client(client, 60)
        wait_for(lambda: all(key(c) in svc.logged(p.iface_a) for c in conns), timeout=30, what="all logged")
        writer.wait(120)
        cap.stop()
        truth, logged = cap.bytes(), svc.logged(p.iface_a)
        for c in conns:
            assert logged[key(c)][3] == truth[key(c)]
        assert "repaired" not in svc.output()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        svc.stop()


def test_capture_reopens_when_the_interface_comes_back(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])
    try:
        svc.start()
        p.a.run("ip", "link", "del", p.iface_a)
        code, status = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(svc.get("/status")), timeout=15,
                                what="status says the interface is not captured")
        assert status["interfaces"][p.iface_a]["capturing"] is False
        p.make_link()
        wait_for(lambda: svc.get("/status")[0] == 200, timeout=15, what="capture reopened")
        assert svc.get("/status")[1]["threads"][f"capture-{p.iface_a}"]["restarts"] >= 1
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        c = start_client(p.a, p.ip_b, 9000, up=100_000, down=100_000)
        assert svc.start_profile("flap", c.pid)[0] == 200
        conn = run_client(c, 1)[0]
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        assert svc.logged(p.iface_a)[key(conn)][3] == cap.bytes()[key(conn)]
    finally:
        svc.stop()
