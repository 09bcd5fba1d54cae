#!/usr/bin/env python3
"""What one refresh-modify-commit cycle of the legacy filter table costs, with connection rules
made as the service made them before (a comment match each) and without, through python-iptables;
then the cycle the service does now: no refresh, the table kept from its last commit (xtblob).

  .venv/bin/python bench/commit_cost.py [--pairs 5000]

Builds a network namespace of its own (no traffic), loads `pairs` connection rule pairs into 64
leaf chains with iptables-legacy-restore, then times python-iptables refresh() + one insert +
commit(), median of 15, and prints the table's size; then the same insert and commit through
xtblob.RawTable (with the summary read that precedes each). Removes the namespace on exit. Root only."""
import argparse
import os
import subprocess
import sys

NS = f"npcost{os.getpid()}"
CYCLE = r'''
import statistics, sys, time, iptc
tab = iptc.Table(iptc.Table.FILTER); tab.autocommit = False
times = []
for i in range(15):
    t = time.perf_counter()
    tab.refresh()
    rule = iptc.Rule(); rule.protocol = "tcp"
    m = rule.create_match("tcp"); m.sport = "4000"; m.dport = str(6000 + i)
    rule.create_target("RETURN")
    iptc.Chain(tab, "IL00").insert_rule(rule)
    tab.commit()
    times.append(time.perf_counter() - t)
print(round(1000 * statistics.median(times), 2))
'''

# The service's way since xtblob: the table kept from the last commit, not read back; each cycle
# still asks the kernel for the table's summary, to notice another program's change.
RAW_CYCLE = r'''
import socket, statistics, sys, time
sys.path.insert(0, %r)
from profiler.firewall import _Family
from profiler.xtblob import RawTable, read_info
fam = _Family(socket.AF_INET)
t = RawTable(socket.AF_INET, "filter"); t.load()
times = []
for i in range(15):
    s = time.perf_counter()
    read_info(socket.AF_INET, "filter")
    t.insert("IL00", fam.template.matches("10.231.0.9", 4000, "10.231.0.1", 6000 + i))
    t.commit()
    times.append(time.perf_counter() - s)
print(round(1000 * statistics.median(times), 2))
''' % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruleset(pairs, comments):
    leaves = [f"L{i:02x}" for i in range(64)]
    out = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    out += [f":{d}{leaf} - [0:0]" for leaf in leaves for d in "IO"] + [":TOPI - [0:0]", ":TOPO - [0:0]"]
    out += ["-A INPUT -j TOPI", "-A OUTPUT -j TOPO"]
    for i, leaf in enumerate(leaves):
        lo = 32768 + i * 256
        out += [f"-A TOPI -p tcp --dport {lo}:{lo + 255} -j I{leaf}", f"-A TOPO -p tcp --sport {lo}:{lo + 255} -j O{leaf}"]
    for k in range(pairs):
        port = 32768 + k % (64 * 256)
        leaf = leaves[(port - 32768) // 256]
        note = f' -m comment --comment "netprof c{k:08d} 1234 job%23{k}"' if comments else ""
        out.append(f"-A I{leaf} -s 10.231.0.2/32 -d 10.231.0.1/32 -p tcp -m tcp --sport 5000 --dport {port}{note} -j RETURN")
        out.append(f"-A O{leaf} -s 10.231.0.1/32 -d 10.231.0.2/32 -p tcp -m tcp --sport {port} --dport 5000{note} -j RETURN")
    return "\n".join(out + ["COMMIT", ""])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5000, help="connection rule pairs (default 5000)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/commit_cost.py must run as root (a network namespace, netfilter)")
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        print(f"{args.pairs} pairs ({2 * args.pairs} connection rules), one cycle: refresh + insert + commit")
        for comments in (True, False):
            subprocess.run(["ip", "netns", "exec", NS, "iptables-legacy-restore"], input=ruleset(args.pairs, comments),
                           text=True, check=True)
            size = subprocess.run(["ip", "netns", "exec", NS, "iptables-legacy-save"], capture_output=True,
                                  text=True, check=True).stdout.count("\n-A ")
            ms = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", CYCLE], capture_output=True,
                                text=True, check=True).stdout.strip()
            print(f"  {'with' if comments else 'without'} comments: {ms} ms (median of 15; {size} rules in the table)")
        ms = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", RAW_CYCLE], capture_output=True,
                            text=True, check=True).stdout.strip()
        print(f"  without comments, table kept (xtblob, no read back): {ms} ms (median of 15)")
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


if __name__ == "__main__":
    main()
