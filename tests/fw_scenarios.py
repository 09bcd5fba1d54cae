"""Run inside a test's network namespace (as root): the firewall adapter against the real legacy
tables, one scenario per argument; prints one JSON object for the test to check."""
import json
import logging
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from profiler.chains import RuleSpec, outdated, path  # noqa: E402
from profiler.firewall import IptablesFirewall  # noqa: E402

IFACE = "eth9"
A, B = "10.231.0.1", "10.231.0.2"


def spec(cid, lport, rport=443, family=socket.AF_INET, pid=7, job="job#1"):
    local, remote = (A, B) if family == socket.AF_INET else ("fd00:231::1", "fd00:231::2")
    return RuleSpec(cid, IFACE, family, local, lport, remote, rport, pid, job)


def set_counters(s, direction, packets, nbytes, comment=None, insert=False):
    """Give the rule of `s` in `direction` these counters (iptables -R/-I -c), as traffic would."""
    leaf = path(s, direction)[1]
    src, sport, dst, dport = ((s.remote, s.rport, s.local, s.lport) if direction == "I"
                              else (s.local, s.lport, s.remote, s.rport))
    tool = "iptables-legacy" if s.family == socket.AF_INET else "ip6tables-legacy"
    bits = "32" if s.family == socket.AF_INET else "128"
    rule = ["-s", f"{src}/{bits}", "-d", f"{dst}/{bits}", "-p", "tcp", "-m", "tcp", "--sport", str(sport),
            "--dport", str(dport)]
    if comment:
        rule += ["-m", "comment", "--comment", comment]
    op = ["-I", leaf, "1"] if insert else ["-R", leaf, "1"]
    subprocess.run([tool, "-w", *op, "-c", str(packets), str(nbytes), *rule, "-j", "RETURN"], check=True)


def leftovers_and_upgrade():
    """A crash left: a pair the state knows, a pair it does not, and (IPv6) a pair made by an older
    version, with comments. The next start keeps the first and the old one, logs and removes the other."""
    first = IptablesFirewall([IFACE])
    first.setup()
    known, unknown = spec("k1", 40001), spec("u1", 40301)   # in different leaves
    first.apply(add=[known, unknown])
    for s, n in ((known, 1000), (unknown, 2000)):
        set_counters(s, "I", 3, n)
        set_counters(s, "O", 4, n + 1)
    old = spec("o1", 40003, family=socket.AF_INET6)
    first.apply(add=[spec("tmp", 40009, family=socket.AF_INET6)])   # builds the IPv6 tree (and is unknown)
    for direction, n in (("I", 3000), ("O", 3001)):
        set_counters(old, direction, 5, n, comment="netprof o1 7 job%231", insert=True)
    del first   # as a kill -9 would: nothing removed

    second = IptablesFirewall([IFACE])
    left = second.setup(keep={"k1": known, "o1": old})
    out = {"installed": sorted(second.installed),
           "leftovers": sorted([l.spec.local, l.spec.lport, l.spec.remote, l.spec.rport, l.spec.job, l.spec.pid,
                                l.counters.in_bytes, l.counters.out_bytes] for l in left),
           "read": {cid: [c.in_bytes, c.out_bytes] for cid, c in second.read([known, old]).items()},
           "fixes": second.verify(full=True)}
    out["final"] = {cid: [c.in_bytes, c.out_bytes] for cid, c in second.teardown().items()}
    return out


def halved_and_copied_pairs():
    """Another program deletes one rule of a pair, copies one of another, and turns a third into two
    inbound rules: verify puts back only the missing rules, keeps every counter, and leaves a copy
    alone (both copies count, summed)."""
    fw = IptablesFirewall([IFACE])
    fw.setup()
    # In leaves of their own (64 ports each): set_counters() rewrites the first rule of a leaf.
    halved, copied, doubled = spec("halved", 40001), spec("copied", 40101), spec("doubled", 40201)
    fw.apply(add=[halved, copied, doubled])
    for s_ in (halved, copied, doubled):
        set_counters(s_, "I", 5, 500)
        set_counters(s_, "O", 7, 700)

    def delete(s_, direction):
        leaf, port = path(s_, direction)[1], f"--{'d' if direction == 'I' else 's'}port {s_.lport} "
        [line] = [x for x in subprocess.run(["iptables-legacy-save", "-t", "filter"], capture_output=True,
                                            text=True).stdout.splitlines()
                  if x.startswith(f"-A {leaf} ") and port in x + " "]
        subprocess.run(["iptables-legacy", "-w", "-D", *line.split()[1:]], check=True)

    delete(halved, "I")
    set_counters(copied, "O", 1, 100, insert=True)                   # a copy beside the original
    delete(doubled, "O")
    set_counters(doubled, "I", 2, 200, insert=True)                  # two inbound rules, no outbound
    out = {"fixes": fw.verify(full=True), "again": fw.verify(full=True),
           "read": {cid: [c.in_packets, c.in_bytes, c.out_packets, c.out_bytes]
                    for cid, c in fw.read([halved, copied, doubled]).items()}}
    fw.teardown()
    return out


def stale_pair_with_a_reused_4_tuple():
    """The profiler gave up removing a pair; a new connection gets its 4-tuple: the stale pair is
    read and removed in the same commit, and the new connection's counts are its own."""
    fw = IptablesFirewall([IFACE])
    fw.setup()
    old, new = spec("old", 40001), spec("new", 40001)
    fw.apply(add=[old])
    set_counters(old, "I", 9, 9000)
    set_counters(old, "O", 9, 9001)
    harvested = fw.apply(add=[new])
    out = {"installed": sorted(fw.installed), "rules": fw.rule_count,
           "harvested": {cid: [c.in_bytes, c.out_bytes] for cid, c in harvested.items()},
           "new": {cid: [c.in_bytes, c.out_bytes] for cid, c in fw.read([new]).items()},
           "fixes": fw.verify(full=True)}
    fw.teardown()
    return out


def save(tool="iptables-legacy-save"):
    return [line for line in subprocess.run([tool, "-t", "filter", "-c"], check=True, capture_output=True,
                                            text=True).stdout.splitlines() if not line.startswith("#")]


def foreign_changes_between_our_commits():
    """Between two of our commits another program changes the filter table, once without changing
    its size (a policy, a rule replaced by one as long): our next commit keeps what it did, and the
    counters it gave our rules are what a harvest reads."""
    subprocess.run(["iptables-legacy", "-w", "-N", "SOMEONE"], check=True)
    subprocess.run(["iptables-legacy", "-w", "-A", "SOMEONE", "-p", "udp", "--dport", "53", "-j", "ACCEPT"], check=True)
    fw = IptablesFirewall([IFACE])
    fw.setup()
    # set_counters() sets the first rule of a leaf: one connection a leaf, until the third one.
    first, second, third = spec("c1", 40001), spec("c2", 40301), spec("c3", 40003)
    fw.apply(add=[first, second])
    subprocess.run(["iptables-legacy", "-w", "-P", "FORWARD", "DROP"], check=True)
    subprocess.run(["iptables-legacy", "-w", "-R", "SOMEONE", "1", "-p", "udp", "--dport", "54", "-j", "DROP"],
                   check=True)
    set_counters(first, "I", 3, 3000)
    set_counters(first, "O", 4, 4000)
    set_counters(second, "I", 5, 5000)
    set_counters(second, "O", 6, 6000)
    fw.apply(add=[third])                 # the others' entries move: their counts must go with them
    mid = save()
    subprocess.run(["iptables-legacy", "-w", "-A", "SOMEONE", "-p", "udp", "--dport", "55", "-j", "ACCEPT"],
                   check=True)
    harvested = fw.apply(remove=[first])
    out = {"harvested": {cid: [c.in_packets, c.in_bytes, c.out_packets, c.out_bytes] for cid, c in harvested.items()},
           "read": {cid: [c.in_bytes, c.out_bytes] for cid, c in fw.read([second, third]).items()},
           "mid": mid, "after": save(), "fixes": fw.verify(full=True)}
    fw.teardown()
    out["teardown"] = save()
    return out


def failure_in_the_middle_of_a_change():
    """A change fails halfway through (after a removal, before the commit): nothing of it stays
    behind in the table we keep, and the retry reads and removes the rules as if it were the first."""
    fw = IptablesFirewall([IFACE])
    fw.setup()
    old, new = spec("old", 40001), spec("new", 45001)      # the new one needs chains of its own
    fw.apply(add=[old])
    set_counters(old, "I", 2, 2000)
    set_counters(old, "O", 3, 3000)
    fam = fw._fam(socket.AF_INET)
    fw.apply(add=[spec("warm", 40002)], remove=[])          # the table kept as it is now
    fam.dispatch_matches = lambda hop: (_ for _ in ()).throw(RuntimeError("fails halfway"))
    try:
        fw.apply(add=[new], remove=[old])
        failed = False
    except RuntimeError:
        failed = True
    del fam.dispatch_matches
    harvested = fw.apply(add=[new], remove=[old])
    out = {"failed": failed, "installed": sorted(fw.installed),
           "harvested": {cid: [c.in_packets, c.in_bytes, c.out_packets, c.out_bytes] for cid, c in harvested.items()},
           "rules": sorted(line.split(" -s ")[1] for line in save() if line.startswith("[") and " -s " in line),
           "fixes": fw.verify(full=True)}
    fw.teardown()
    return out


def rules_put_and_rules_read_removed_together():
    """One leaf holds a pair read with the table (another program used the lock since) and a pair
    put in by our last commit: removed in one commit, each is counted once, from its own rules."""
    fw = IptablesFirewall([IFACE])
    fw.setup()
    read, put = spec("read", 40001), spec("put", 40002)      # the same leaf
    fw.apply(add=[read])
    set_counters(read, "I", 3, 300)      # iptables -w: the table is read again at our next change
    set_counters(read, "O", 4, 400)
    fw.apply(add=[put])
    harvested = fw.apply(remove=[read, put])
    out = {"harvested": {cid: [c.in_bytes, c.out_bytes, c.in_rules, c.out_rules] for cid, c in harvested.items()},
           "rules": fw.rule_count, "fixes": fw.verify(full=True)}
    fw.teardown()
    return out


def two_level_pair(s, counters):
    """The rules of `s` as the earlier two-level layout made them: 4,096-port chains going to
    256-port leaves NETPROF_<d><b><port >> 8 as 2 hex>_<iface>, with these counters per direction."""
    port, block = (s.lport, "L") if s.lport >= s.rport else (s.rport, "R")
    tool = "iptables-legacy" if s.family == socket.AF_INET else "ip6tables-legacy"
    bits = "32" if s.family == socket.AF_INET else "128"
    for d in "IO":
        field = "dport" if (d == "I") == (block == "L") else "sport"
        top, mid = f"NETPROF_{d}_{s.interface}", f"NETPROF_{d}{block}x{port >> 12:x}_{s.interface}"
        leaf = f"NETPROF_{d}{block}{port >> 8:02x}_{s.interface}"
        lo1, lo2 = port >> 12 << 12, port >> 8 << 8
        for chain, (lo, hi), target, how in ((top, (lo1, lo1 + 4095), mid, "-j"), (mid, (lo2, lo2 + 255), leaf, "-g")):
            subprocess.run([tool, "-w", "-N", target], capture_output=True)      # may be there already
            hop = ["-p", "tcp", "-m", "tcp", f"--{field}", f"{lo}:{hi}", how, target]
            if subprocess.run([tool, "-w", "-C", chain, *hop], capture_output=True).returncode:
                subprocess.run([tool, "-w", "-A", chain, *hop], check=True)
        src, sport, dst, dport = ((s.remote, s.rport, s.local, s.lport) if d == "I"
                                  else (s.local, s.lport, s.remote, s.rport))
        packets, nbytes = counters[d]
        subprocess.run([tool, "-w", "-I", leaf, "1", "-c", str(packets), str(nbytes), "-s", f"{src}/{bits}",
                        "-d", f"{dst}/{bits}", "-p", "tcp", "-m", "tcp", "--sport", str(sport), "--dport",
                        str(dport), "-j", "RETURN"], check=True)
    return leaf


def upgrade_from_the_two_level_layout():
    """An earlier version left its rules in 256-port leaves. The next start moves the pairs it
    keeps into this layout's leaves, their counts with them; the others are logged; the old leaves
    and the hops to them go. With STRANDED set, the move is not possible (as when xtblob cannot
    read the table): the kept pairs are harvested as leftovers, saying so, and get no rules."""
    first = IptablesFirewall([IFACE])
    first.setup()           # the top chains and their jumps, the same in both layouts
    kept, unknown, kept6 = spec("k1", 40001), spec("u1", 40301), spec("k6", 40003, family=socket.AF_INET6)
    two_level_pair(kept, {"I": (3, 1000), "O": (4, 1001)})
    two_level_pair(spec("k2", 40002), {"I": (1, 10), "O": (1, 11)})     # the same old leaf as k1
    two_level_pair(unknown, {"I": (5, 2000), "O": (6, 2001)})
    two_level_pair(kept6, {"I": (7, 3000), "O": (8, 3001)})
    subprocess.run(["iptables-legacy", "-w", "-A", "NETPROF_IL9c_eth9", "-p", "udp", "-j", "RETURN"], check=True)
    before = save() + save("ip6tables-legacy-save")
    del first
    second = IptablesFirewall([IFACE])
    if os.environ.get("STRANDED"):
        second._relayout = lambda fam: None
    keep = {s.cid: s for s in (kept, spec("k2", 40002), kept6)}
    left = second.setup(keep=keep)
    chains = lambda: sorted({line.split()[0][1:] for line in save() + save("ip6tables-legacy-save")  # noqa: E731
                             if line.startswith(":NETPROF_")})
    out = {"old_leaves_before": sorted({line.split()[0][1:] for line in before
                                        if line.startswith(":") and outdated(line.split()[0][1:])}),
           "installed": sorted(second.installed),
           "leftovers": sorted([l.spec.cid if l.spec.job else str(l.spec.lport), l.counters.in_bytes,
                                l.counters.out_bytes, bool(l.note)] for l in left),
           "outdated_after": [name for name in chains() if outdated(name)],
           "udp_rules": [line for line in save() if "-p udp" in line],
           "fixes": second.verify(full=True)}
    out["read"] = {cid: [c.in_packets, c.in_bytes, c.out_packets, c.out_bytes]
                   for cid, c in second.read([s for s in keep.values() if s.cid in second.installed]).items()}
    out["harvested"] = {cid: [c.in_bytes, c.out_bytes]
                        for cid, c in second.apply(remove=[s for s in keep.values() if s.cid in second.installed]).items()}
    second.teardown()
    out["after"] = [line for line in save() + save("ip6tables-legacy-save") if "NETPROF" in line]
    return out


def capture_rules_put_back():
    """The capture's NFLOG rules in mangle: one jump from PREROUTING and POSTROUTING each, one rule
    per interface (none inbound for lo); another program's deletion is repaired by verify()."""
    fw = IptablesFirewall([IFACE, "lo"], nflog_groups={IFACE: 7460, "lo": 7461})
    fw.setup()
    fw.setup()          # idempotent
    mangle = lambda: [line for line in subprocess.run(  # noqa: E731
        ["iptables-legacy-save", "-t", "mangle"], capture_output=True, text=True).stdout.splitlines()
        if "NETPROF_LOG" in line]
    first = mangle()
    clean = fw.verify(full=False)
    subprocess.run(["iptables-legacy", "-w", "-t", "mangle", "-D", "POSTROUTING", "-p", "tcp", "-m", "tcp", "!",
                    "--tcp-flags", "FIN,SYN,RST", "NONE", "-j", "NETPROF_LOG_O"], check=True)
    broken = mangle()
    fixes = fw.verify(full=False)
    out = {"first": first, "clean": clean, "broken": broken, "fixes": fixes, "repaired": mangle()}
    fw.teardown()
    out["after"] = [line for tool in ("iptables-legacy-save", "ip6tables-legacy-save")
                    for line in subprocess.run([tool], capture_output=True, text=True).stdout.splitlines()
                    if "NETPROF" in line]
    return out


def fast_path_jumps_and_hold_labels():
    """An earlier run without the fast path left plain jumps and a pair; a start with FAST_PATH_LABEL
    makes every jump (both families, INPUT and OUTPUT) pass labelled connections by, once, however
    often setup runs; the hold chains label the SYNs they do not queue. earlier_fast_path() tells
    a plain jump, an earlier version's connmark jump and a label jump apart."""
    lines = lambda tool="iptables-legacy-save": [  # noqa: E731
        line for line in subprocess.run([tool], capture_output=True, text=True).stdout.splitlines()
        if "NETPROF" in line and line.startswith(("-A INPUT", "-A OUTPUT", "-A NETPROF_HOLD"))]
    old = IptablesFirewall([IFACE])
    old.setup()
    old.apply([spec("k1", 40001)], [])
    before = lines()
    fw = IptablesFirewall([IFACE], queue_num=7913, fast_label=121)
    seen = [fw.earlier_fast_path()]
    subprocess.run(["iptables-legacy", "-R", "INPUT", "1", "-i", IFACE, "-m", "connmark", "--mark",
                    "0x10000000/0x10000000", "-j", f"NETPROF_I_{IFACE}"], check=True)
    seen.append(fw.earlier_fast_path())
    fw.setup(keep={"k1": spec("k1", 40001)})
    fw.setup(keep={"k1": spec("k1", 40001)})
    seen.append(fw.earlier_fast_path())
    fw.set_hold({1000}, {8080})
    out = {"before": before, "after": lines(), "after6": lines("ip6tables-legacy-save"),
           "installed": sorted(fw.installed), "earlier": seen, "verify": fw.verify(full=True)}
    fw.teardown()
    out["left"] = [line for tool in ("iptables-legacy-save", "ip6tables-legacy-save")
                   for line in subprocess.run([tool], capture_output=True, text=True).stdout.splitlines()
                   if "NETPROF" in line]
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    result = globals()[sys.argv[1]]()
    print(json.dumps(result, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
