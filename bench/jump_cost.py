#!/usr/bin/env python3
"""What the fast path's jump costs a 1,500-byte download, without the service.

  python bench/jump_cost.py [ROUNDS]      (default 5; about a minute a round; root only)

Uses bench/tree_shapes.py's namespaces (dptA/dptB, 10.231.250.0/24), rules and iperf3 runs: 5,000
connection pairs in the three-level tree (shape E), conntrack on (as the service turns it on), all
offloads off, iperf3 -R so the data packets cross dptA's INPUT. Every layout, the rule-free one
included, has a SYN hold chain in mangle as the service does (reached by SYNs only). Each round
runs, interleaved with rule-free runs: the tree behind a plain jump (every packet walks it); behind
the earlier fast path's two jumps (connections marked by their held SYN, and packets without a
conntrack entry: -m connmark, then -m conntrack --ctstate INVALID,UNTRACKED); and behind this fast
path's one jump (-p tcp -m connlabel ! --label L, the hold chain labelling every SYN it does not
hold). One table here, where the service has two. Prints each run, then per layout the median
throughput over the median rule-free one. Everything it made is removed on exit.
"""
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tree_shapes as T  # noqa: E402
from measure import rounds_argument  # noqa: E402

CT = ":NPT_CT - [0:0]\n-A NPT_CT -m conntrack --ctstate INVALID -j RETURN\nCOMMIT"
MARKED = "-m connmark --mark 0x10000000/0x10000000"
INVALID = "-m conntrack --ctstate INVALID,UNTRACKED"
UNLABELLED = "-p tcp -m connlabel ! --label 121"


def with_conntrack(text):
    return text.replace("COMMIT", CT, 1)


def hold_chain(label):
    """mangle: SYNs go through a hold chain; with `label` its last rule labels them (none is held here)."""
    last = "-A NPH -m connlabel --label 121 --set -j RETURN" if label else "-A NPH -p udp -j RETURN"
    return ("*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n:NPH - [0:0]\n-A OUTPUT -p tcp -m tcp --syn -j NPH\n"
            f"-A INPUT -p tcp -m tcp --syn -j NPH\n{last}\nCOMMIT\n")


def fast_path(text, *conditions):
    for d, builtin, flag in (("O", "OUTPUT", "-o"), ("I", "INPUT", "-i")):
        plain = f"-A {builtin} {flag} {T.VA} -j NPT_{d}"
        assert plain in text
        text = text.replace(plain, "\n".join(f"-A {builtin} {flag} {T.VA} {c} -j NPT_{d}" for c in conditions))
    return text


def main():
    rounds = rounds_argument(5)
    ports = random.Random(20240601).sample(range(T.PORT_LO, T.PORT_HI + 1), 5000)
    cport = next(p for p in range(45123, T.PORT_HI) if p not in set(ports))
    tree = with_conntrack(T.ruleset("E", ports))
    layouts = {"plain jump": tree + hold_chain(False),
               "mark, INVALID": fast_path(tree, MARKED, INVALID) + hold_chain(False),
               "label": fast_path(tree, UNLABELLED) + hold_chain(True)}
    none = with_conntrack(T.ruleset("A", ports, with_rules=False)) + hold_chain(False)
    T.setup()
    try:
        T.offloads(False)
        T.iperf(2, cport)
        runs = {name: [] for name in ["none", *layouts]}
        for r in range(rounds):
            names = list(layouts)[r % len(layouts):] + list(layouts)[:r % len(layouts)]
            for name in [x for n in names for x in ("none", n)] + ["none"]:
                T.load(none if name == "none" else layouts[name])
                gbps, _ = T.iperf(5, cport)
                runs[name].append(gbps)
                print(f"round {r} {name:14s} {gbps:6.2f} Gbit/s", flush=True)
        ref = statistics.median(runs["none"])
        for name in layouts:
            print(f"{name:14s} {statistics.median(runs[name]) / ref:.3f} of the rule-free rate")
    finally:
        T.cleanup()


if __name__ == "__main__":
    main()
