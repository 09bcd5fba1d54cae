"""The layout of our chains: names, and the tree a packet walks.

Pure logic, no netfilter calls. With thousands of live connections a flat chain
makes every packet walk thousands of rules (5-15 ns each, 20-25 ns with
1,500-byte packets). Instead each direction's chain dispatches on port ranges,
three levels deep, to leaf chains that hold the per-connection rules:

  NETPROF_I_<iface>       (jumped to from INPUT)  -p tcp --dport 32768:36863 -j NETPROF_ILx8_<iface>
  NETPROF_ILx8_<iface>    (4,096 ports)           -p tcp --dport 32768:33279 -g NETPROF_ILy40<iface>
  NETPROF_ILy40<iface>    (512 ports)             -p tcp --dport 32768:32831 -g NETPROF_IL200<iface>
  NETPROF_IL200<iface>    (64 ports, a leaf)      one rule per connection, -j RETURN

A connection is filed under its larger port, the one that varies between
connections (the ephemeral port): block L when that is the local port (as for
outgoing connections), block R when it is the remote one (a tracked server's
clients). A packet walks the top chain's hops, its block's hops up to the one
that matches (a goto: from the leaf it goes back to the top chain), the same in
its 512 ports, then a leaf of a dozen connections, instead of every rule: at
5,000 connections about 25 rules in all, against 60 with two levels and
256-port leaves (an experiment with paired iperf3 runs: a rule costs a 1,500-byte
packet about 23 ns, a chain hop nothing beyond its rule).

Names fit netfilter's 28 characters with a 15-character interface: the code
after NETPROF_ is five characters, without an underscore where it needs them.
Leaves of the earlier two-level layout (NETPROF_IL80_<iface>, 256 ports) are
still recognised, so that a restart can move their rules, with their counts,
into the leaves of this one.

A connection rule carries no comment: its leaf (direction, interface) and its
exact 4-tuple say which connection it counts, and the durable state (written
before the rules are installed) says whose connection that is. A comment match
is 288 bytes of a rule's 488, and every commit copies the whole table: without
it a commit of 10,000 rules costs a quarter of the time.
"""
import functools
import re
from dataclasses import dataclass, field

PREFIX = "NETPROF"
CT_CHAIN = f"{PREFIX}_CT"
HOLD_OUT, HOLD_IN = f"{PREFIX}_HOLD_O", f"{PREFIX}_HOLD_I"
LOG_OUT, LOG_IN = f"{PREFIX}_LOG_O", f"{PREFIX}_LOG_I"
CAPTURE_REPAIRED = "capture rules in mangle were changed"    # in what verify() says it fixed
# The code after the prefix: x<hex>_ a 4,096-port chain, y<2 hex> 512 ports, <3 hex> a 64-port leaf,
# <2 hex>_ a 256-port leaf of the two-level layout.
_TREE = re.compile(rf"^{PREFIX}_([IO])([LR])(x[0-9a-f]_|y[0-9a-f]{{2}}|[0-9a-f]{{3}}|[0-9a-f]{{2}}_)(.+)$")
_TOP = re.compile(rf"^{PREFIX}_([IO])_(.+)$")


@dataclass(frozen=True)
class RuleSpec:
    cid: str
    interface: str
    family: int
    local: str
    lport: int
    remote: str
    rport: int
    pid: int = 0
    job: str = ""

    def tuples(self):
        """(leaf, (src, sport, dst, dport)) of the inbound and the outbound rule."""
        return ((path(self, "I")[1], (self.remote, self.rport, self.local, self.lport)),
                (path(self, "O")[1], (self.local, self.lport, self.remote, self.rport)))


@dataclass(frozen=True)
class Counters:
    in_packets: int = 0
    in_bytes: int = 0
    out_packets: int = 0
    out_bytes: int = 0
    # How many rules were read per direction, when read from the kernel (None: not known). A
    # direction with none lost its rule to another program: its bytes are not all here.
    in_rules: int = field(default=None, compare=False)
    out_rules: int = field(default=None, compare=False)

    @property
    def one_side_missing(self):
        return self.in_rules == 0 or self.out_rules == 0


@dataclass(frozen=True)
class Hop:
    """One dispatch rule: in `chain`, TCP packets whose `field` port is in lo..hi go to `target`
    (-g with `goto`: at the end of `target` the packet goes back to the chain that jumped to
    `chain`, not on through `chain`'s other hops, which cannot match it)."""
    chain: str
    field: str
    lo: int
    hi: int
    target: str
    goto: bool = False


def chain_names(interface):
    return f"{PREFIX}_I_{interface}", f"{PREFIX}_O_{interface}"


def path(spec, direction):
    """(hops, leaf) for the rule of `spec` in `direction` ("I" inbound, "O" outbound)."""
    if spec.lport >= spec.rport:
        block, port = "L", spec.lport
        field = "dport" if direction == "I" else "sport"
    else:
        block, port = "R", spec.rport
        field = "sport" if direction == "I" else "dport"
    return _path(spec.interface, direction, block, field, port >> 6)


@functools.lru_cache(maxsize=8192)
def _path(interface, direction, block, field, unit):
    # Asked for a dozen times per connection; at most 2,048 answers per interface and direction.
    top = f"{PREFIX}_{direction}_{interface}"
    mid = f"{PREFIX}_{direction}{block}x{unit >> 6:x}_{interface}"
    sub = f"{PREFIX}_{direction}{block}y{unit >> 3:02x}{interface}"
    leaf = f"{PREFIX}_{direction}{block}{unit:03x}{interface}"
    lo1, lo2, lo3 = unit >> 6 << 12, unit >> 3 << 9, unit << 6
    # top -> mid is a jump: the top chain also holds the other block's hops, which the packet may
    # match. The others are gotos: the ranges of one chain's hops do not overlap.
    return (Hop(top, field, lo1, lo1 + 4095, mid), Hop(mid, field, lo2, lo2 + 511, sub, goto=True),
            Hop(sub, field, lo3, lo3 + 63, leaf, goto=True)), leaf


def chain_info(name):
    """("top" | "mid" | "leaf", direction, interface) of one of our rule chains, else None."""
    m = _TREE.match(name)
    if m:
        code = m.group(3)
        return ("mid" if code[0] in "xy" else "leaf"), m.group(1), m.group(4)
    m = _TOP.match(name)
    if m and name not in (HOLD_OUT, HOLD_IN):
        return "top", m.group(1), m.group(2)
    return None


def outdated(name):
    """Whether `name` is a leaf of the two-level layout: its rules belong in this layout's leaves."""
    m = _TREE.match(name)
    return m is not None and m.group(3).endswith("_") and m.group(3)[0] != "x"
