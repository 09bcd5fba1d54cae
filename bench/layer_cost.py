#!/usr/bin/env python3
"""What each layer of the service's netfilter set-up costs a flow of no tracked job, without the
service: an untracked 1,500-byte download (all offloads off, iperf3 -R, 5 s), against a link in
namespaces with nothing loaded.

  python bench/layer_cost.py [ROUNDS]      (default 4; about 30 s a round; root only)

One namespace pair per layout, each built fresh (the kernel keeps a legacy table in a namespace
once a program opened it), the layouts run in turn round by round:
  bare           nothing: no table, conntrack off
  conntrack      a filter chain with a conntrack rule, never jumped to (conntrack on, as the service has it)
  +tables        and the mangle and security tables opened, empty (the service's other two)
  +mangle rules  and the service's per-packet mangle rules: the capture's NFLOG jumps in PREROUTING
                 and POSTROUTING, the SYN hold jumps in INPUT and OUTPUT with the label rule
  +label jumps   and the fast path's jump from INPUT and OUTPUT in filter and security (the flow's
                 connection is labelled, so it passes them by): all an untracked flow meets
  two tables     conntrack and the label jumps in filter and security, no mangle: what would be left
                 were the SYN holds and the capture somewhere no untracked packet passes
  one jump       conntrack and one such jump per direction in filter, nothing else: the least any
                 layout with rules of each tracked connection's own costs a flow (every packet must
                 meet one rule that tells whether its connection is tracked)
In the last two the chains jumped to label what enters them, so after its SYN the flow passes the
jumps by, as it does the service's.
Prints each run, then per layout the median and its ratio to bare's and to conntrack's median.
Every namespace it made is removed on exit.
"""
import json
import os
import signal
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from nstools import NetPair  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import rounds_argument  # noqa: E402

PORT = 5201
LABEL = "121"
HOLD = [f"-t mangle -A {chain} -m connlabel --label {LABEL} --set -j RETURN" for chain in ("HOLDO", "HOLDI")]
LAYOUTS = {"bare": []}
LAYOUTS["conntrack"] = ["-N CTON", "-A CTON -m conntrack --ctstate INVALID -j RETURN"]
LAYOUTS["+tables"] = LAYOUTS["conntrack"] + ["-t mangle -L -n", "-t security -L -n"]
LAYOUTS["+mangle rules"] = LAYOUTS["+tables"] + [
    "-t mangle -N LOGI", "-t mangle -N LOGO", "-t mangle -N HOLDO", "-t mangle -N HOLDI",
    "-t mangle -A PREROUTING -p tcp ! --tcp-flags FIN,SYN,RST NONE -j LOGI",
    "-t mangle -A POSTROUTING -p tcp ! --tcp-flags FIN,SYN,RST NONE -j LOGO",
    "-t mangle -A OUTPUT -p tcp --syn -j HOLDO", "-t mangle -A INPUT -p tcp --syn -j HOLDI"] + HOLD
LAYOUTS["+label jumps"] = LAYOUTS["+mangle rules"] + [
    f"-t {table} {rule}" for table in ("filter", "security") for rule in (
        "-N TOPI", "-N TOPO", f"-A INPUT -i IFACE -p tcp -m connlabel ! --label {LABEL} -j TOPI",
        f"-A OUTPUT -o IFACE -p tcp -m connlabel ! --label {LABEL} -j TOPO")]
SET_LABEL = [f"-A {chain} -m connlabel --label {LABEL} --set" for chain in ("TOPI", "TOPO")]   # in filter
LAYOUTS["two tables"] = LAYOUTS["conntrack"] + [
    rule for rule in LAYOUTS["+label jumps"] if rule.startswith(("-t filter ", "-t security "))] + SET_LABEL
LAYOUTS["one jump"] = LAYOUTS["conntrack"] + [
    rule for rule in LAYOUTS["+label jumps"] if rule.startswith("-t filter ")] + SET_LABEL


def iperf(pair):
    out = subprocess.run(["ip", "netns", "exec", pair.a.name, "iperf3", "-c", pair.ip_b, "-p", str(PORT), "-R",
                          "-t", "5", "-J"], capture_output=True, text=True, timeout=60).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def main():
    rounds = rounds_argument(4)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))     # through the finally below
    pairs = {}
    try:
        for name, commands in LAYOUTS.items():
            pair = pairs[name] = NetPair()
            for command in commands:
                subprocess.run(["ip", "netns", "exec", pair.a.name, "iptables-legacy",
                                *command.replace("IFACE", pair.iface_a).split()], check=True, capture_output=True)
            for ns, iface in ((pair.a, pair.iface_a), (pair.b, pair.iface_b)):
                ns.run("ethtool", "-K", iface, "tso", "off", "gso", "off", "gro", "off")
            pair.b.popen("iperf3", "-s", "-p", str(PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        iperf(pairs["bare"])     # warm-up, and the server is up
        runs = {name: [] for name in LAYOUTS}
        names = list(LAYOUTS)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:     # no layout always first
                runs[name].append(iperf(pairs[name]))
                print(f"round {r} {name:14s} {runs[name][-1]:6.2f} Gbit/s", flush=True)
        bare, ct = statistics.median(runs["bare"]), statistics.median(runs["conntrack"])
        for name in names:
            rate = statistics.median(runs[name])
            print(f"{name:14s} {rate:6.2f} Gbit/s, {rate / bare:.3f} of bare, {rate / ct:.3f} of conntrack")
    finally:
        for pair in pairs.values():
            pair.close()


if __name__ == "__main__":
    main()
