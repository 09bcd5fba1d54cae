"""The chain trees under many live connections: every one counted exactly, whichever table and leaf
it is in."""
import json
import os

import pytest

from harness import Capture, Service, start_client, start_server
from nstools import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def key(c):
    return c["local"], c["lport"], c["remote"], c["rport"]


@pytest.mark.parametrize("rule_tables", ["filter security", "filter"])
def test_hundreds_of_live_connections_in_both_blocks_are_exact(netpair, rule_tables):
    p = netpair
    svc = Service(p.a, [p.iface_a], RULES_THRESHOLD=5000, RULE_TABLES=rule_tables)
    # Ephemeral ports across a 4,096-port block boundary on both sides (36864 and 40960), so that
    # both tables get leaves whatever ports the kernel picks: 300 outgoing, 100 inbound.
    p.a.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=36500 37200")
    p.b.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=40800 41100")
    try:
        svc.start()
        # The kernel makes each legacy table a program opens, for good, and every packet then
        # passes its hooks: the service opens filter and mangle, security only for the split,
        # and never raw or nat (python-iptables would, looking up the chain a target names).
        made = p.a.run("cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names").stdout.split()
        assert sorted(set(made)) == sorted({"filter", "mangle"} | ({"security"} if rule_tables != "filter" else set()))
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        tracked_server, _ = start_server(p.a, p.ip_a, 9100)
        assert svc.start_profile("tree", tracked_server.pid)[0] == 200
        out = start_client(p.a, p.ip_b, 9000, up=3000, down=7000, count=300, extra=("--hold-all",))
        assert svc.start_profile("tree", out.pid)[0] == 200
        inbound = start_client(p.b, p.ip_a, 9100, up=5000, down=2000, count=100, extra=("--hold-all",))
        for c in (out, inbound):
            c.stdin.write("go\n")
            c.stdin.flush()
        outs = [json.loads(out.stdout.readline()) for _ in range(300)]
        ins = [json.loads(inbound.stdout.readline()) for _ in range(100)]
        accepted = [{"local": p.ip_a, "lport": 9100, "remote": c["local"], "rport": c["lport"]} for c in ins]
        # All 400 open at once: 800 rules spread over many leaves of the tree.
        status = wait_for(lambda: (lambda s: s if s["live_connections"] >= 400 else None)(svc.get("/status")[1]),
                          timeout=20, what="400 live connections")
        assert status["installed_rules"] >= 800
        # Half the port blocks in filter, half in security (shards.py): each table holds only its own.
        # With RULE_TABLES = filter, filter holds every block and security nothing of ours.
        split = rule_tables == "filter security"
        for number, table in enumerate(("filter", "security")):
            save = p.a.run("iptables-legacy-save", "-t", table).stdout
            rules = [line.split() for line in save.splitlines()
                     if line.startswith("-A NETPROF_") and "/32 -d " in line and "-j RETURN" in line]
            if table == "security" and not split:
                assert "NETPROF" not in save
                continue
            leaves = {rule[1] for rule in rules}
            assert len(leaves) >= 4, table
            filed = [max(int(rule[rule.index("--sport") + 1]), int(rule[rule.index("--dport") + 1])) for rule in rules]
            assert {(port >> 12) & 1 for port in filed} == ({number} if split else {0, 1}), table
            # A leaf is entered by a goto: after it the packet is back in the top chain, not walking
            # the rest of the mid chain.
            into_leaves = [line for line in save.splitlines() if line.startswith("-A NETPROF_")
                           and line.split()[-1] in leaves]
            assert len(into_leaves) >= len(leaves) and all(" -g NETPROF_" in line for line in into_leaves)
        for c in (out, inbound):
            c.stdin.write("\n")
            c.stdin.close()
            c.wait(30)
        wait_for(lambda: all(key(c) in svc.logged(p.iface_a) for c in outs + accepted), timeout=30,
                 what="all logged")
        cap.stop()
        truth, logged = cap.bytes(), svc.logged(p.iface_a)
        wrong = []
        for c in outs + accepted:
            l, lp, r, rp = key(c)
            for k in ((l, lp, r, rp), (r, rp, l, lp)):
                if logged[k][3] != truth[k]:
                    wrong.append((k, logged[k][3], truth[k]))
        assert wrong == []
    finally:
        svc.stop()
