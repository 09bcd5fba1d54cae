"""xtblob against the real legacy tables, in a namespace of our own: what it commits is what the
iptables commands would have made, other programs' rules and every counter included."""
import json
import os

import pytest

from harness import PYTHON, ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# Someone else's rules beside ours: a comment match, a rule without a target, a goto, an empty
# chain, a RETURN inside a chain, policies and counters everywhere.
RULES = """*filter
:INPUT ACCEPT [10:1000]
:FORWARD DROP [2:200]
:OUTPUT ACCEPT [20:2000]
:NETPROF_I_eth9 - [0:0]
:NETPROF_ILx8_eth9 - [0:0]
:NETPROF_IL80_eth9 - [0:0]
:ZZ_OTHER - [0:0]
:AA_EMPTY - [0:0]
[5:500] -A INPUT -i eth9 -j NETPROF_I_eth9
[6:600] -A INPUT -p udp -m comment --comment "someone else" -j ACCEPT
[7:700] -A INPUT -p tcp --dport 22
[8:800] -A INPUT -j ZZ_OTHER
[1:100] -A FORWARD -g AA_EMPTY
[3:300] -A NETPROF_I_eth9 -p tcp --dport 32768:36863 -j NETPROF_ILx8_eth9
[4:400] -A NETPROF_ILx8_eth9 -p tcp --dport 32768:33023 -g NETPROF_IL80_eth9
[11:1100] -A NETPROF_IL80_eth9 -s {r}{bits} -d {l}{bits} -p tcp --sport 80 --dport 32800 -j RETURN
[12:1200] -A NETPROF_IL80_eth9 -s {r}{bits} -d {l}{bits} -p tcp --sport 80 --dport 32801 -j RETURN
[13:1300] -A ZZ_OTHER -p {icmp} -j RETURN
[14:1400] -A ZZ_OTHER -p {icmp} -j DROP
COMMIT
"""
FAMILIES = {
    "ipv4": dict(tool="iptables-legacy", l="10.231.0.1", r="10.231.0.2", bits="/32", icmp="icmp"),
    "ipv6": dict(tool="ip6tables-legacy", l="fd00:231::1", r="fd00:231::2", bits="/128", icmp="ipv6-icmp"),
}
# The same change through xtblob and through the iptables command: remove one connection rule,
# add one at the top of its leaf, a new leaf reached by a goto, and a rule in it.
CHANGE = r"""
import json, socket, sys
sys.path.insert(0, {root!r})
from profiler.chains import Hop
from profiler.firewall import _Family
from profiler.xtblob import RawTable
family = socket.AF_INET if {name!r} == "ipv4" else socket.AF_INET6
l, r, change = {l!r}, {r!r}, {change!r}
fam = _Family(family)
t = RawTable(family, "filter")
t.load()
removed = {{}}
if change:
    leaf = "NETPROF_IL80_eth9"
    doomed = [e for e in t.rules(leaf) if fam.template.key_of(e.raw) == fam.template.key(r, 80, l, 32800)]
    t.remove(leaf, doomed)
    t.insert(leaf, fam.template.matches(r, 80, l, 32802))
    t.add_chain("NETPROF_IL81_eth9")
    t.add_jump("NETPROF_ILx8_eth9", fam.dispatch_matches(Hop("", "dport", 33024, 33279, "", True)),
               "NETPROF_IL81_eth9", goto=True)
    t.insert("NETPROF_IL81_eth9", fam.template.matches(r, 80, l, 33100))
    t.add_chain("YY_NEW")          # between two chains left as they were: their counts stay theirs
    removed = t.commit()
removed = sorted(removed.values())
t.commit()        # a second commit of the same table changes nothing more
print(json.dumps(removed))
"""


def save(ns, tool, counters=True):
    out = ns.run(f"{tool}-save", "-t", "filter", *(["-c"] if counters else [])).stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


def load(ns, f):
    ns.run(f"{f['tool']}-restore", "-c", input=RULES.format(**f))


def quiet(pair):
    """No packet at all (IPv6 neighbour discovery would count in INPUT and OUTPUT)."""
    pair.a.run("ip", "link", "set", pair.iface_a, "down")
    pair.b.run("ip", "link", "set", pair.iface_b, "down")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_commit_without_change_keeps_every_rule_and_counter(netpair, name):
    ns, f = netpair.a, FAMILIES[name]
    quiet(netpair)
    load(ns, f)
    before = save(ns, f["tool"])
    out = ns.run(PYTHON, "-c", CHANGE.format(root=ROOT, name=name, l=f["l"], r=f["r"], change=False)).stdout
    assert json.loads(out.splitlines()[-1]) == []
    assert save(ns, f["tool"]) == before


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_change_is_what_the_iptables_command_makes_and_counters_go_with_their_rules(netpair, name):
    ns, other, f = netpair.a, netpair.b, FAMILIES[name]
    quiet(netpair)
    for n in (ns, other):
        load(n, f)
    out = ns.run(PYTHON, "-c", CHANGE.format(root=ROOT, name=name, l=f["l"], r=f["r"], change=True)).stdout
    assert json.loads(out.splitlines()[-1]) == [[11, 1100]]     # the removed rule's final count
    conn = ["-s", f["r"] + f["bits"], "-d", f["l"] + f["bits"], "-p", "tcp", "--sport", "80"]
    for args in (["-D", "NETPROF_IL80_eth9", *conn, "--dport", "32800", "-j", "RETURN"],
                 ["-I", "NETPROF_IL80_eth9", *conn, "--dport", "32802", "-j", "RETURN"],
                 ["-N", "NETPROF_IL81_eth9"],
                 ["-A", "NETPROF_ILx8_eth9", "-p", "tcp", "--dport", "33024:33279", "-g", "NETPROF_IL81_eth9"],
                 ["-I", "NETPROF_IL81_eth9", *conn, "--dport", "33100", "-j", "RETURN"],
                 ["-N", "YY_NEW"]):
        other.run(f["tool"], "-w", *args)
    ours = save(ns, f["tool"])
    # The rules are the same; the counters are ours to compare: the command's commits lose the
    # built-in chains' policy counters, ours keep them.
    strip = lambda lines: [line.split("] ", 1)[1] if line.startswith("[") else line.split(" [")[0]  # noqa: E731
                           for line in lines]
    assert strip(ours) == strip(save(other, f["tool"]))
    counts = {line.split("] ", 1)[1]: line.split("]")[0] + "]" for line in ours if line.startswith("[")}
    kept = [rule for rule in counts if "--dport 32801" in rule or "ZZ_OTHER -p" in rule or "-A INPUT" in rule
            or "-A NETPROF_I_eth9" in rule]
    assert len(kept) == 8 and counts[next(r for r in kept if "32801" in r)] == "[12:1200]"
    assert counts[next(r for r in kept if "-A NETPROF_I_eth9" in r)] == "[3:300]"
    assert sorted(counts[r] for r in kept) == ["[12:1200]", "[13:1300]", "[14:1400]", "[3:300]", "[5:500]",
                                               "[6:600]", "[7:700]", "[8:800]"]
    assert ":INPUT ACCEPT [10:1000]" in ours and ":FORWARD DROP [2:200]" in ours
