"""Never lose data: a crash and restart, other programs changing our rules."""
import os
import signal
import time

import pytest

from harness import (Capture, Service, compare, finish_upload, key, run_client, start_client, start_server,
                     start_upload)
from nstools import wait_for
from profiler.chains import chain_info, outdated

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MB = 1_000_000
UNLABELLED = '-p tcp -m connlabel ! --label "121"'     # the fast path's jump


def test_kill_9_in_the_middle_of_100MB_then_restart_loses_nothing(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])
    svc.start()
    try:
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "crash#1", 100 * MB, 40 * MB, 20 * MB)
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(10)
        time.sleep(0.3)     # the transfer goes on while no service runs
        restarted = svc.restarted()
        assert "carried on with 1 jobs" in restarted.output()
        conn = finish_upload(client)
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


def two_level_layout(saved):
    """iptables-legacy-save -c output of one table, with our connection rules moved into the leaves
    of the earlier two-level layout (256-port leaves NETPROF_<d><b><port >> 8, 2 hex>_<iface> under
    the same 4,096-port chains), their counters kept: what that version left."""
    head, chains, rules, hops = [], [], [], {}
    for line in saved.splitlines():
        if line.startswith(("*", "#")):
            head += [line] if line.startswith("*") else []
            continue
        name = line.split()[0][1:] if line.startswith(":") else line.split()[2] if " -A " in line else None
        info = chain_info(name) if name else None
        if info is None or info[0] == "top" or (info[0] == "mid" and name[10] == "x" and line.startswith(":")):
            (chains if line.startswith(":") else rules).append(line)
            continue
        if line.startswith(":") or info[0] == "mid":
            continue            # this layout's 512-port chains, leaves, and the hops to them
        d, b = name[8], name[9]
        sport, dport = int(line.split("--sport ")[1].split()[0]), int(line.split("--dport ")[1].split()[0])
        port, field = max(sport, dport), "dport" if (d == "I") == (b == "L") else "sport"
        leaf, lo = f"NETPROF_{d}{b}{port >> 8:02x}_{info[2]}", port >> 8 << 8
        hops[leaf] = f"-A NETPROF_{d}{b}x{port >> 12:x}_{info[2]} -p tcp -m tcp --{field} {lo}:{lo + 255} -g {leaf}"
        rules.append(line.replace(f" -A {name} ", f" -A {leaf} "))
    commit = rules.index("COMMIT")
    return "\n".join(head + chains + [f":{leaf} - [0:0]" for leaf in hops] + rules[:commit] + list(hops.values())
                     + rules[commit:]) + "\n"


def test_an_upgrade_from_the_two_level_layout_moves_live_rules_and_loses_nothing(netpair):
    """An earlier version, killed while a transfer goes on, left its rules in the two-level layout;
    this one moves them with their counts and the transfer's bytes are all there."""
    p = netpair
    svc = Service(p.a, [p.iface_a])
    svc.start()
    client = None
    try:
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "upgrade#1", 60 * MB, 30 * MB, 10 * MB)
        # Paused, so that no packet passes while the tables are rewritten (a restore is not exact).
        os.kill(client.pid, signal.SIGSTOP)
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(10)
        snapshot = lambda: [p.a.run("iptables-legacy-save", "-c", "-t", t).stdout  # noqa: E731
                            for t in ("filter", "security")]
        last = [None]

        def settled():
            now, last[0] = snapshot(), snapshot()
            return now == last[0]
        wait_for(settled, timeout=10, interval=0.3, what="no packet counted any more")
        for saved in last[0]:
            p.a.run("iptables-legacy-restore", "-c", input=two_level_layout(saved))
        old_leaves = [line.split()[0][1:] for line in "".join(snapshot()).splitlines()
                      if line.startswith(":") and outdated(line.split()[0][1:])]
        assert len(old_leaves) == 2, old_leaves       # the connection's, one a direction
        os.kill(client.pid, signal.SIGCONT)
        restarted = svc.restarted()
        assert "moved 2 rules" in restarted.output() and "carried on with 1 jobs" in restarted.output()
        conn = finish_upload(client)
        wait_for(lambda: key(conn) in restarted.logged(p.iface_a), timeout=20, what="logged after restart")
        code, answer = restarted.get("/endprofile/jobid=upgrade%231")
        assert code == 200 and answer["totals"]["connections"] == 1
        assert answer["connections"][0]["complete"] is True
        cap.stop()
        truth = cap.bytes()
        back = (conn["remote"], conn["rport"], conn["local"], conn["lport"])
        logged = restarted.logged(p.iface_a)
        assert logged[key(conn)][3] == truth[key(conn)] and logged[key(conn)][3] > 60 * MB
        assert logged[back][3] == truth[back]
        after = "".join(snapshot())
        assert not any(outdated(line.split()[0][1:]) for line in after.splitlines() if line.startswith(":"))
        restarted.stop()
    finally:
        if client is not None and client.poll() is None:
            os.kill(client.pid, signal.SIGCONT)
        svc.stop()


def test_capture_rules_removed_by_another_program_are_put_back(netpair):
    """Without the NFLOG rules in mangle no SYN, FIN or RST reaches the capture: the check of our
    rules puts them back, and connections after that are seen and counted exactly."""
    p = netpair
    svc = Service(p.a, [p.iface_a], VERIFY_INTERVAL=0.2)
    try:
        svc.start()
        jump = ["-p", "tcp", "-m", "tcp", "!", "--tcp-flags", "FIN,SYN,RST", "NONE", "-j"]
        p.a.run("iptables-legacy", "-w", "-t", "mangle", "-D", "PREROUTING", *jump, "NETPROF_LOG_I")
        p.a.run("iptables-legacy", "-w", "-t", "mangle", "-F", "NETPROF_LOG_O")
        wait_for(lambda: "put back the IPv4 capture rules" in svc.output(), timeout=10, what="capture rules put back")
        save = p.a.run("iptables-legacy-save", "-t", "mangle").stdout
        assert f"-A NETPROF_LOG_O -o {p.iface_a} -j NFLOG" in save and "-j NETPROF_LOG_I" in save
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        c = start_client(p.a, p.ip_b, 9000, up=200_000, down=100_000)
        assert svc.start_profile("meddle#2", c.pid)[0] == 200
        conn = run_client(c, 1)[0]
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        truth = cap.bytes()
        assert svc.logged(p.iface_a)[key(conn)][3] == truth[key(conn)]
        back = (conn["remote"], conn["rport"], conn["local"], conn["lport"])
        assert svc.logged(p.iface_a)[back][3] == truth[back]
        code, answer = svc.get("/endprofile/jobid=meddle%232")
        # Ended by its FINs, which only the capture sees (without it: by the sweep or the exit).
        assert code == 200 and answer["connections"][0]["complete"] is True
        assert answer["connections"][0]["reason"] == "closed"
    finally:
        svc.stop()


@pytest.mark.parametrize("interference", ["flush", "delete-jump", "reorder"])
def test_rules_changed_by_another_program_are_repaired_and_counted(netpair, interference):
    p = netpair
    svc = Service(p.a, [p.iface_a], VERIFY_INTERVAL=0.2)
    try:
        svc.start()
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "meddle", 30 * MB, 20 * MB, 5 * MB)
        chain_out = f"NETPROF_O_{p.iface_a}"
        jump = f"-o {p.iface_a} {UNLABELLED} -j {chain_out}"   # the fast path's
        # In both tables that hold connection rules (shards.py): the connection's rules are in one.
        for table in ("filter", "security"):
            if interference == "flush":
                p.a.run("iptables-legacy", "-w", "-t", table, "-F", chain_out)
            elif interference == "delete-jump":
                p.a.run("iptables-legacy", "-w", "-t", table, "-D", "OUTPUT", *jump.replace('"', "").split())
            else:
                p.a.run("iptables-legacy", "-w", "-t", table, "-I", "OUTPUT", "1", "-p", "udp", "-j", "ACCEPT")
        wait_for(lambda: "repaired" in svc.output(), timeout=10, what="repair")
        for table in ("filter", "security"):
            save = p.a.run("iptables-legacy-save", "-t", table).stdout
            outputs = [line for line in save.splitlines() if line.startswith("-A OUTPUT")]
            assert outputs.count(f"-A OUTPUT {jump}") == 1, table
            if interference == "reorder":
                # Ours first again; theirs left alone.
                assert outputs[:2] == [f"-A OUTPUT {jump}", "-A OUTPUT -p udp -j ACCEPT"], table
        conn = finish_upload(client)
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


def test_the_rule_left_of_a_pair_another_program_halved_keeps_counting(netpair):
    """Another program deletes the inbound rule of a live upload's pair. The repair puts that rule back
    and leaves the outbound one, which counted on (its counters carried through the commit), so the
    upload's bytes are exact, while the inbound bytes until the repair are missing and the record says
    so. Conntrack is off: nothing else could fill the record in."""
    p = netpair
    svc = Service(p.a, [p.iface_a], VERIFY_INTERVAL=0.2, CONNTRACK="no", LOG_FORMAT="both")
    try:
        svc.start()
        cap = Capture(p.a, p.iface_a)
        client = start_upload(svc, p, "halved", 30 * MB, 15 * MB, 5 * MB)
        rules = [(table, line) for table in ("filter", "security")
                 for line in p.a.run("iptables-legacy-save", "-t", table).stdout.splitlines()
                 if line.startswith("-A NETPROF_I") and f"-s {p.ip_b}/32" in line and "--sport 9000" in line]
        assert len(rules) == 1, rules
        table, line = rules[0]
        p.a.run("iptables-legacy", "-w", "-t", table, "-D", *line.split()[1:])
        wait_for(lambda: "repaired" in svc.output(), timeout=10, what="repair")
        conn = finish_upload(client)
        wait_for(lambda: key(conn) in svc.logged(p.iface_a), timeout=20, what="logged")
        cap.stop()
        [(_, out_got, out_truth, _), (_, in_got, in_truth, _)] = compare(svc.logged(p.iface_a), cap.bytes(), conn)
        assert out_truth > 25 * MB
        assert out_got == out_truth, (out_got, out_truth)          # before, during and after the repair
        assert 0 < in_got < in_truth, (in_got, in_truth)            # inbound, what passed before the repair is not
        rec = svc.json_records(p.iface_a)[key(conn)]
        assert rec["complete"] is False and "removed or bypassed by another program" in rec["note"], rec
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
