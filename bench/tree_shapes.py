#!/usr/bin/env python3
"""(An experiment of 2026-11-24, kept for its figures: bench/RESULTS.md.) Dispatch-tree shapes for NetProfiler's per-connection legacy-iptables rules:
throughput kept (1500-byte packets, and optionally TSO), table size and python-iptables commit cost.

  python bench/tree_shapes.py [--pairs 7] [--secs 5] [--modes untracked,tracked,tso] [--shapes A,B,C,D,E,F]

Creates namespaces dptA (10.231.250.1) and dptB (10.231.250.2) joined by a veth pair, loads every
ruleset ONLY inside dptA with iptables-legacy-restore, runs iperf3 (server in dptB, client in dptA,
pinned client port, -R so the data packets cross dptA's INPUT tree) interleaved: none, X, none, Y, ..., none, and reports per shape the median of
ratios shape / mean(adjacent no-rule runs). Everything (namespaces, veth, iperf3 server) is removed
on exit. Root only. Raw results are written to ./tree-shapes-<timestamp>.json.
"""
import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

NSA, NSB = "dptA", "dptB"
VA, VB = "dptva", "dptvb"
LOCAL, REMOTE = "10.231.250.1", "10.231.250.2"
RPORT = 7000
IPERF_PORT = 5201
PY = sys.executable
PORT_LO, PORT_HI = 32768, 60999

# shape: (block sizes from the top chain's dispatch down to the leaf, hop kind per level)
# levels[0] is the block size the top chain dispatches on; the last is the leaf's size.
SHAPES = {
    "A": ([4096, 256], ["j", "j"]),
    "B": ([4096, 256], ["j", "g"]),
    "C": ([4096, 256, 64], ["j", "g", "g"]),
    "D": ([4096, 128], ["j", "g"]),
    "E": ([4096, 512, 64], ["j", "g", "g"]),
    "F": ([4096, 512, 64], ["g", "g", "g"]),   # E with goto from the top chain too
    "G": ([4096, 512, 64, 16], ["g", "g", "g", "g"]),   # one more level, 16-port leaves
    "H": ([2048, 256, 32], ["g", "g", "g"]),           # 3 levels, 32-port leaves
}

_procs = []   # Popen objects we started (iperf3 server)


def sh(*cmd, input=None, check=True, capture=True):
    r = subprocess.run(list(cmd), input=input, text=True, capture_output=capture)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: rc={r.returncode} {r.stderr.strip()}")
    return r.stdout if capture else None


def nsa(*cmd, **kw):
    return sh("ip", "netns", "exec", NSA, *cmd, **kw)


def nsb(*cmd, **kw):
    return sh("ip", "netns", "exec", NSB, *cmd, **kw)


# ---------------------------------------------------------------------------------------------- rules

def chain_name(d, size, lo):
    return f"NPT_{d}{size}_{lo}"


def conn_rule(d, chain, lport, rport):
    if d == "O":
        return f"-A {chain} -s {LOCAL}/32 -d {REMOTE}/32 -p tcp -m tcp --sport {lport} --dport {rport} -j RETURN"
    return f"-A {chain} -s {REMOTE}/32 -d {LOCAL}/32 -p tcp -m tcp --sport {rport} --dport {lport} -j RETURN"


def ruleset(shape, ports, tracked_port=None, with_rules=True):
    """iptables-legacy-restore text. ports: list in insertion order (newest last).
    tracked_port: a local port whose pair (remote port IPERF_PORT) goes FIRST in its leaf."""
    out = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if not with_rules:
        return "\n".join(out + ["COMMIT", ""])
    levels, hops = SHAPES[shape]
    chains, rules = [], []
    for d in "OI":
        top = f"NPT_{d}"
        chains.append(top)
        pflag = "--sport" if d == "O" else "--dport"
        # leaves: dict leaf-lo -> list of rules (newest first)
        leafsize = levels[-1]
        leaves = {}
        for p in reversed(ports):      # newest first
            leaves.setdefault((p // leafsize) * leafsize, []).append(conn_rule(d, None, p, RPORT))
        if tracked_port is not None:
            lo = (tracked_port // leafsize) * leafsize
            leaves.setdefault(lo, []).insert(0, conn_rule(d, None, tracked_port, IPERF_PORT))
        # blocks in use per level
        used = [sorted({(lo // s) * s for lo in leaves}) for s in levels]
        body = {}
        # top dispatch
        body[top] = [f"-A {top} -p tcp -m tcp {pflag} {b}:{b + levels[0] - 1} -{hops[0]} {chain_name(d, levels[0], b)}"
                     for b in used[0]]
        for li in range(len(levels) - 1):
            s, s2 = levels[li], levels[li + 1]
            for b in used[li]:
                name = chain_name(d, s, b)
                body[name] = [f"-A {name} -p tcp -m tcp {pflag} {c}:{c + s2 - 1} -{hops[li + 1]} {chain_name(d, s2, c)}"
                              for c in used[li + 1] if b <= c < b + s]
        for lo, rl in leaves.items():
            name = chain_name(d, leafsize, lo)
            body[name] = [r.replace("-A None ", f"-A {name} ") for r in rl]
        for name in body:
            if name != top:
                chains.append(name)
        for name in body:
            rules.extend(body[name])
    out += [f":{c} - [0:0]" for c in chains]
    out += [f"-A OUTPUT -o {VA} -j NPT_O", f"-A INPUT -i {VA} -j NPT_I"]
    out += rules
    return "\n".join(out + ["COMMIT", ""])


def leaf_of(shape, port, d="O"):
    s = SHAPES[shape][0][-1]
    return chain_name(d, s, (port // s) * s)


def simulate(text, pkt, base):
    """Walk `text` (restore format) like x_tables would for packet pkt (dict with s, d, sport, dport, i, o)
    starting at builtin chain `base`. Returns (rules evaluated, list of matched RETURN rules)."""
    chains = {}
    for l in text.splitlines():
        if l.startswith("-A "):
            t = l.split()
            f = {}
            k = 2
            while k < len(t):
                if t[k] in ("-s", "-d", "--sport", "--dport", "-i", "-o", "-j", "-g", "-p", "-m"):
                    f[t[k]] = t[k + 1]; k += 2
                else:
                    k += 1
            chains.setdefault(t[1], []).append((f, l))

    def match(f):
        for key, pk in (("-s", "s"), ("-d", "d"), ("-i", "i"), ("-o", "o")):
            if key in f and f[key].split("/")[0] != pkt.get(pk):
                return False
        for key, pk in (("--sport", "sport"), ("--dport", "dport")):
            if key in f:
                lo, _, hi = f[key].partition(":")
                if not int(lo) <= pkt[pk] <= int(hi or lo):
                    return False
        return True

    n, hits, stack = 0, [], []
    chain, idx = base, 0
    while True:
        rl = chains.get(chain, [])
        if idx >= len(rl):
            if not stack:
                return n, hits
            chain, idx = stack.pop(); continue
        f, line = rl[idx]
        n += 1
        if not match(f):
            idx += 1; continue
        if f.get("-j") == "RETURN":
            hits.append(line)
            if not stack:
                return n, hits
            chain, idx = stack.pop()
        elif "-j" in f:
            stack.append((chain, idx + 1)); chain, idx = f["-j"], 0
        elif "-g" in f:
            chain, idx = f["-g"], 0
        else:
            idx += 1


def walk_len(shape, ports, port):
    """Rules evaluated by an untracked data packet (O direction) and its ACK (I direction)."""
    text = ruleset(shape, ports)
    o = simulate(text, dict(s=LOCAL, d=REMOTE, sport=port, dport=IPERF_PORT, o=VA), "OUTPUT")[0]
    i = simulate(text, dict(s=REMOTE, d=LOCAL, sport=IPERF_PORT, dport=port, i=VA), "INPUT")[0]
    return o, i


def sim_check(shape, ports, sample):
    """Every sampled connection hits exactly its own rule in both directions (simulated)."""
    text = ruleset(shape, ports)
    bad = []
    for p in sample:
        for base, pkt, d in (("OUTPUT", dict(s=LOCAL, d=REMOTE, sport=p, dport=RPORT, o=VA), "O"),
                             ("INPUT", dict(s=REMOTE, d=LOCAL, sport=RPORT, dport=p, i=VA), "I")):
            hits = simulate(text, pkt, base)[1]
            if hits != [conn_rule(d, leaf_of(shape, p, d), p, RPORT)]:
                bad.append((p, d, hits))
    return bad


# ---------------------------------------------------------------------------------------------- measurement

GETINFO = r'''
import ctypes, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
buf = ctypes.create_string_buffer(b"filter", 84); ln = ctypes.c_uint(84)
if libc.getsockopt(fd, 0, 64, buf, ctypes.byref(ln)) != 0: raise OSError(ctypes.get_errno(), "IPT_SO_GET_INFO")
num_entries, size = struct.unpack_from("II", buf.raw, 76)
print(num_entries, size)
'''

CYCLE = r'''
import statistics, sys, time, iptc
leaf = sys.argv[1]
tab = iptc.Table(iptc.Table.FILTER); tab.autocommit = False
times = []
for i in range(15):
    t = time.perf_counter()
    tab.refresh()
    rule = iptc.Rule(); rule.protocol = "tcp"; rule.src = "10.231.250.1"; rule.dst = "10.231.250.2"
    m = rule.create_match("tcp"); m.sport = sys.argv[2]; m.dport = str(6000 + i)
    rule.create_target("RETURN")
    iptc.Chain(tab, leaf).insert_rule(rule)
    tab.commit()
    times.append(time.perf_counter() - t)
print(round(1000 * statistics.median(times), 2))
'''


def load(text):
    t = time.perf_counter()
    nsa("iptables-legacy-restore", input=text)
    return time.perf_counter() - t


def table_cost(shape, ports, cport):
    text = ruleset(shape, ports)
    restore_s = load(text)
    save = nsa("iptables-legacy-save")
    chains = sum(1 for l in save.splitlines() if l.startswith(":") and l.split()[1] == "-")
    rules = save.count("\n-A ")
    conn = sum(1 for l in save.splitlines() if l.startswith("-A") and "-j RETURN" in l)
    ent, size = map(int, nsa(PY, "-c", GETINFO).split())
    leaf = leaf_of(shape, cport)
    cyc = []
    for _ in range(3):
        load(text)
        cyc.append(float(nsa(PY, "-c", CYCLE, leaf, str(cport)).strip()))
    ms = statistics.median(cyc)
    return dict(shape=shape, user_chains=chains, rules=rules, conn_rules=conn, dispatch_rules=rules - conn - 2,
                kernel_entries=ent, kernel_bytes=size, restore_ms=round(1000 * restore_s, 1), commit_cycle_ms=ms, commit_cycle_runs=cyc,
                text_bytes=len(text))


def counters():
    """(chain, rule-text-without-counters) -> pkts, from iptables-legacy-save -c"""
    res = {}
    for l in nsa("iptables-legacy-save", "-c").splitlines():
        if l.startswith("[") and " -A " in l:
            c, rest = l.split("] ", 1)
            pk = int(c[1:].split(":")[0])
            res[rest] = res.get(rest, 0) + pk
    return res


def check_shape(shape, ports, sample):
    """Send one SYN from each sampled local port to REMOTE:RPORT (closed -> RST back). Exactly those
    connections' O and I rules must count 1 packet; every other connection rule 0."""
    load(ruleset(shape, ports))
    script = ("import socket,sys\n"
              "for p in map(int, sys.argv[1:]):\n"
              "    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              f"    s.bind(('{LOCAL}', p)); s.settimeout(2)\n"
              "    try: s.connect(('%s', %d))\n" % (REMOTE, RPORT) +
              "    except OSError: pass\n"
              "    s.close()\n")
    nsa(sys.executable, "-c", script, *map(str, sample))
    c = counters()
    bad = []
    want = set()
    for p in sample:
        for d in "OI":
            r = conn_rule(d, leaf_of(shape, p, d), p, RPORT)
            want.add(r)
            if c.get(r, 0) != 1:
                bad.append((r, c.get(r)))
    for r, pk in c.items():
        if "-j RETURN" in r and r not in want and pk:
            bad.append((r, pk))
    return bad


def iperf(secs, cport):
    for attempt in range(3):
        # -R: B sends, A receives, so the 1500-byte data packets cross A's INPUT hook (NPT_I tree, dport =
        # cport); A's OUTPUT (NPT_O tree) sees the ACKs. See REPORT.md for why not the forward direction.
        r = subprocess.run(["ip", "netns", "exec", NSA, "iperf3", "-c", REMOTE, "-p", str(IPERF_PORT), "-R",
                            "-C", "cubic", "--cport", str(cport), "-t", str(secs), "-J"],
                           capture_output=True, text=True)
        try:
            j = json.loads(r.stdout)
            if "error" in j:
                raise ValueError(j["error"])
            return j["end"]["sum_received"]["bits_per_second"] / 1e9, j["end"]["sum_sent"].get("retransmits")
        except (ValueError, KeyError) as e:
            print(f"    iperf3 failed ({e}); retry", flush=True)
            time.sleep(2)
    raise RuntimeError("iperf3 failed 3 times")


def offloads(on):
    v = "on" if on else "off"
    nsa("ethtool", "-K", VA, "tso", v, "gso", v, "gro", v)
    nsb("ethtool", "-K", VB, "tso", v, "gso", v, "gro", v)


# ---------------------------------------------------------------------------------------------- neighbours

HZ = os.sysconf("SC_CLK_TCK")


def _cpu_by_pid():
    """user+system ticks of every userspace process except this one, its children and our iperf3 server."""
    mine = {os.getpid()} | {p.pid for p in _procs}
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        ppid, flags = int(fields[1]), int(fields[6])
        if flags & 0x00200000 or int(d) in mine or ppid in mine:   # kernel thread / ours
            continue
        out[int(d)] = int(fields[11]) + int(fields[12])
    return out


class ForeignCPU:
    """Samples every 0.5 s how much CPU other processes (the neighbours) use; stop() -> mean cores."""
    def __init__(self):
        import threading
        self.stop_ev = threading.Event()
        self.ticks = 0
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self):
        prev = _cpu_by_pid()
        while not self.stop_ev.wait(0.5):
            cur = _cpu_by_pid()
            self.ticks += sum(max(0, v - prev.get(p, 0)) for p, v in cur.items())
            prev = cur

    def start(self):
        self.t0 = time.monotonic()
        self.th.start()

    def stop(self):
        self.stop_ev.set()
        self.th.join()
        return self.ticks / HZ / max(1e-9, time.monotonic() - self.t0)


def wait_quiet(busy, max_wait, quiet_secs=10):
    """Wait (up to max_wait s) until the neighbours have used fewer than `busy` cores for quiet_secs in a row
    (sampled in 2-s windows). Returns the seconds waited beyond the minimum."""
    t0 = time.monotonic()
    quiet = 0.0
    while quiet < quiet_secs and time.monotonic() - t0 < max_wait:
        m = ForeignCPU()
        m.start()
        time.sleep(2)
        quiet = quiet + 2 if m.stop() < busy else 0.0
    w = time.monotonic() - t0 - quiet_secs
    return w if w > 0.5 else 0.0


def clean_ratios(runs, shapes, busy):
    out = {s: [] for s in shapes}
    for i, x in enumerate(runs):
        if x["shape"] != "none" and 0 < i < len(runs) - 1:
            trio = runs[i - 1:i + 2]
            if all(y["foreign_cpu"] < busy for y in trio) and trio[0]["shape"] == trio[2]["shape"] == "none":
                out[x["shape"]].append(x["gbps"] / ((trio[0]["gbps"] + trio[2]["gbps"]) / 2))
    return out


# ---------------------------------------------------------------------------------------------- setup

def setup():
    for ns in (NSA, NSB):
        if ns in sh("ip", "netns", "list"):
            raise SystemExit(f"namespace {ns} already exists; refusing to touch it")
    sh("ip", "netns", "add", NSA)
    sh("ip", "netns", "add", NSB)
    sh("ip", "link", "add", VA, "netns", NSA, "type", "veth", "peer", "name", VB, "netns", NSB)
    nsa("ip", "addr", "add", f"{LOCAL}/24", "dev", VA)
    nsb("ip", "addr", "add", f"{REMOTE}/24", "dev", VB)
    for f, dev in ((nsa, VA), (nsb, VB)):
        f("ip", "link", "set", dev, "mtu", "1500", "up")
        f("ip", "link", "set", "lo", "up")
    # the pinned client port is reused run after run: allow reuse of its TIME_WAIT (namespace-local sysctl)
    nsa("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
    srv = subprocess.Popen(["ip", "netns", "exec", NSB, "iperf3", "-s", "-B", REMOTE, "-p", str(IPERF_PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _procs.append(srv)   # `ip netns exec` execs iperf3: this PID is the iperf3 server
    time.sleep(1)


def cleanup():
    for p in _procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    for ns in (NSA, NSB):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ---------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--pairs", type=int, default=7, help="rounds per mode (each shape run once per round)")
    ap.add_argument("--tso-pairs", type=int, default=5)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--modes", default="untracked,tracked,tso")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--busy", type=float, default=0.08,
                    help="a run is 'clean' if other processes used fewer cores than this (default 0.08)")
    ap.add_argument("--max-wait", type=float, default=600, help="max seconds to wait for quiet before a run")
    ap.add_argument("--quiet-secs", type=float, default=10,
                    help="neighbours must have been quiet this long before each run (default 10)")
    ap.add_argument("--max-rounds-factor", type=int, default=3,
                    help="stop a mode after pairs*this rounds even without enough clean pairs")
    ap.add_argument("--skip-cost", action="store_true", help="skip the correctness check and table cost")
    ap.add_argument("--cost-only", action="store_true", help="only the correctness check and table cost")
    ap.add_argument("--cport", type=int, default=0, help="iperf client port (default: chosen from the port set)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("root only")
    shapes = args.shapes.split(",")
    modes = args.modes.split(",")
    rng = random.Random(args.seed)
    ports = rng.sample(range(PORT_LO, PORT_HI + 1), args.conns)   # insertion order; newest = last
    pset = set(ports)
    if args.cport:
        cport = args.cport
    else:
        # a port not in the set, in a 256-block holding about the median number of connections, and in a
        # 64-block holding about the median too; 4096-block in the middle of the range (block 0xb)
        cnt256 = {}
        for p in ports:
            cnt256[p // 256] = cnt256.get(p // 256, 0) + 1
        cnt64 = {}
        for p in ports:
            cnt64[p // 64] = cnt64.get(p // 64, 0) + 1
        m256 = statistics.median(cnt256.values())
        m64 = statistics.median(cnt64.values())
        cands = [p for p in range(0xb000, 0xc000) if p not in pset]
        cport = min(cands, key=lambda p: (abs(cnt256.get(p // 256, 0) - m256) + abs(cnt64.get(p // 64, 0) - m64),
                                          abs((p % 4096) - 2048)))
    info = dict(conns=args.conns, seed=args.seed, cport=cport,
                leaf_counts={s: sum(1 for p in ports if p // SHAPES[s][0][-1] == cport // SHAPES[s][0][-1]) for s in shapes},
                walk_model={s: walk_len(s, ports, cport) for s in shapes})
    print(json.dumps(info), flush=True)

    res = dict(info=info, cost=[], runs={}, check={})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = f"tree-shapes-{stamp}.json"

    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
    try:
        setup()
        # correctness + cost
        sample = rng.sample(ports, 40)
        for s in ([] if args.skip_cost else shapes):
            bad = check_shape(s, ports, sample)
            res["check"][s] = "ok" if not bad else bad[:5]
            print(f"check {s}: {'ok' if not bad else bad[:5]}", flush=True)
        for s in ([] if args.skip_cost else shapes):
            waited = wait_quiet(args.busy, args.max_wait, args.quiet_secs)
            mon = ForeignCPU()
            mon.start()
            c = table_cost(s, ports, cport)
            c["foreign_cpu"] = round(mon.stop(), 3)
            c["waited_s"] = round(waited, 1)
            res["cost"].append(c)
            print(json.dumps(c), flush=True)
        if args.cost_only:
            with open(out, "w") as f:
                json.dump(res, f, indent=1)
            print(f"raw: {out}")
            return
        texts = {s: ruleset(s, ports) for s in shapes}
        ttexts = {s: ruleset(s, ports, tracked_port=cport) for s in shapes}
        empty = ruleset("A", ports, with_rules=False)
        for mode in modes:
            offloads(mode == "tso")
            npairs = args.tso_pairs if mode == "tso" else args.pairs
            runs = []
            res["runs"][mode] = runs
            iperf(2, cport)   # warm-up
            r = 0
            while True:
                clean = clean_ratios(runs, shapes, args.busy)
                if all(len(clean[s]) >= npairs for s in shapes):
                    break
                if r >= args.max_rounds_factor * npairs:
                    print(f"  {mode}: giving up after {r} rounds; clean pairs: "
                          + ", ".join(f"{s}={len(clean[s])}" for s in shapes), flush=True)
                    break
                order = shapes[r % len(shapes):] + shapes[:r % len(shapes)]   # rotate position each round
                seq = []
                for s in order:
                    seq += [None, s]
                seq.append(None)
                for s in seq:
                    load(empty if s is None else (ttexts if mode == "tracked" else texts)[s])
                    waited = wait_quiet(args.busy, args.max_wait, args.quiet_secs)
                    mon = ForeignCPU()
                    mon.start()
                    g, rt = iperf(args.secs, cport)
                    busy = mon.stop()
                    extra, avg = "", None
                    if s is not None:
                        # packets that entered the tree and their mean size; tracked: the flow's own I rule
                        for l in nsa("iptables-legacy-save", "-c").splitlines():
                            if l.endswith("-A INPUT -i %s -j NPT_I" % VA):
                                pk, by = map(int, l[1:l.index("]")].split(":"))
                                avg = by / max(pk, 1)
                                extra = f" INPUT pkts={pk} avg={avg:.0f}B"
                        if mode == "tracked":
                            pk = counters().get(conn_rule("I", leaf_of(s, cport, "I"), cport, IPERF_PORT), 0)
                            extra += f" tracked-I-rule pkts={pk}"
                    runs.append(dict(round=r, shape=s or "none", gbps=g, retrans=rt, avg_pkt=avg,
                                     foreign_cpu=round(busy, 3), waited_s=round(waited, 1), t=time.time()))
                    print(f"  {mode} r{r} {s or 'none':4s} {g:6.2f} Gbit/s retrans={rt} foreign={busy:.2f}cpu"
                          f"{' waited %.0fs' % waited if waited else ''}{extra}", flush=True)
                r += 1
                with open(out, "w") as f:
                    json.dump(res, f, indent=1)
        # summary
        print(f"\nSUMMARY (ratio = shape / mean of the two adjacent no-rule runs; 'clean' = foreign CPU < "
              f"{args.busy} cores during all three runs)")
        for mode, runs in res["runs"].items():
            none = [x["gbps"] for x in runs if x["shape"] == "none"]
            nonec = [x["gbps"] for x in runs if x["shape"] == "none" and x["foreign_cpu"] < args.busy]
            print(f"{mode}: no-rule median {statistics.median(none):.2f} Gbit/s all (n={len(none)}), "
                  f"clean median {statistics.median(nonec) if nonec else float('nan'):.2f} "
                  f"(min {min(nonec, default=0):.2f} max {max(nonec, default=0):.2f}, n={len(nonec)})")
            clean = clean_ratios(runs, shapes, args.busy)
            alls = clean_ratios(runs, shapes, 1e9)
            for s in shapes:
                c, a_ = clean[s], alls[s]
                if not c:
                    print(f"  {s}: no clean pairs; all-pairs median {statistics.median(a_):.3f} n={len(a_)}")
                    continue
                q = statistics.quantiles(c, n=4) if len(c) > 1 else [c[0]] * 3
                print(f"  {s}: clean median {statistics.median(c):.3f}  IQR {q[0]:.3f}-{q[2]:.3f}  "
                      f"range {min(c):.3f}-{max(c):.3f}  n={len(c)}   | all pairs median {statistics.median(a_):.3f} n={len(a_)}")
                res.setdefault("summary", {}).setdefault(mode, {})[s] = dict(
                    clean_median=statistics.median(c), clean=c, all_median=statistics.median(a_), all=a_)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"raw: {out}")
    finally:
        cleanup()
        print("netns left:", sh("ip", "netns", "list").strip() or "(none)")


if __name__ == "__main__":
    main()
