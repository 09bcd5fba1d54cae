"""The netfilter adapter: the only module that imports iptc (python-iptables).

We own one set of chains in the legacy tables and touch no other rule. One instance looks after
one table of connection rules, filter or security (shards.py splits the rules between two):
- NETPROF_I_<iface> and NETPROF_O_<iface>, one jump each from INPUT and
  OUTPUT (with the fast path, taken only by packets of connections without its
  conntrack label: ctmark.py), each the root of a tree of chains (see chains.py) whose leaves hold,
  per tracked connection, a RETURN rule matching its exact 4-tuple: the
  counters of the pair (one rule per direction) are its byte count. A rule is
  known by its leaf and 4-tuple; which connection id that is, we remember.
- NETPROF_CT, never jumped to: a rule that uses conntrack is what turns
  connection tracking on in a network namespace (see conntrack.py).
- (the filter instance only) mangle NETPROF_HOLD_O / NETPROF_HOLD_I, jumped to by new SYNs from the end
  of mangle OUTPUT and INPUT: they send the SYNs of tracked users and of tracked
  listening ports to an NFQUEUE (with --queue-bypass, so traffic flows if we
  are gone), where the service holds them until their rules are committed.
  With the fast path their last rule labels the connection of every SYN not held (not on lo).

Every change is done while holding /run/xtables.lock, as the iptables
commands do: python-iptables does not take the lock, and two uncoordinated
writers silently drop each other's rules. Many changes are batched into one
commit because each commit rewrites the table.

Connection rules come and go through xtblob.py (rawpath.py): the table is kept as
our last commit left it and committed without libiptc, so a change does not
first read the whole table back (half the cost of a cycle at 10,000 rules).
It is read again whenever another program may have changed it: it used the
lock (xtlock.LockWatch) or the kernel's summary of the table differs. Setup,
verification, repairs and teardown, which are rare, go through python-iptables.
"""
import ctypes
import logging
import os
import socket
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass

import iptc

from .chains import CT_CHAIN, HOLD_IN, HOLD_OUT, PREFIX, Counters, RuleSpec, chain_info, chain_names, outdated, path
from .errors import FirewallError, PartialChange
from .logrules import CaptureRules
from .rawpath import RawPath, _add_count, _Unreadable
from .xtlock import XtablesLock

__all__ = ["Counters", "RuleSpec", "Leftover", "IptablesFirewall", "XtablesLock", "chain_names"]

log = logging.getLogger("netprofiler")


@dataclass(frozen=True)
class Leftover:
    """Counters of a rule pair found from an earlier run."""
    spec: RuleSpec
    counters: Counters
    note: str = ""      # why a pair the durable state still knows was harvested, if it was


# python-iptables decides whether a target names a chain by looking for it in every table it
# believes available (Rule.tables), opening each one it has not yet; and the kernel makes every
# legacy table a program opens, in that network namespace, for good: every packet there would pass
# the hooks of raw and nat too (`bench/run.py --quick`: an untracked 1,500-byte download kept 0.63
# of a bare link's rate with them, 0.70 without). Our targets name chains of the tables we use, and
# only those (_Family marks each as it opens it) are looked in.
for _cls in (iptc.Table, iptc.Table6):
    for _name in _cls.ALL:
        _cls.existing_table_names.setdefault(_name, False)


def _host(addr):
    return addr.split("/")[0]


class _PairTemplate:
    """Connection rules made by patching the raw entry of one rule python-iptables built, and read
    back from raw entries by the same offsets.

    Building each rule through python-iptables parses its matches again (about half a millisecond
    a rule); a connection's rules differ only in addresses and ports, which sit at fixed places in
    the entry. The patched bytes equal what python-iptables would build (a test checks)."""
    _SPORT, _DPORT = 0x1357, 0x2468

    def __init__(self, fam):
        v4 = fam.family == socket.AF_INET
        self.addr_len = n = 4 if v4 else 16
        src, dst = ("192.0.2.1", "192.0.2.2") if v4 else ("2001:db8::1", "2001:db8::2")
        rule = fam.rule(src, self._SPORT, dst, self._DPORT)
        rule.final_check()
        buf = rule.rule
        self.raw = bytes(ctypes.string_at(ctypes.addressof(buf), ctypes.sizeof(buf)))
        # ipt_entry.ip / ip6t_entry.ipv6 comes first: source, destination, then their masks.
        if self.raw[:4 * n] != (socket.inet_pton(fam.family, src) + socket.inet_pton(fam.family, dst)
                                + b"\xff" * 2 * n):
            raise FirewallError("unexpected layout of a python-iptables rule")
        # xt_tcp: spts[2], dpts[2] as host-order u16.
        self.sport_at = self._find(struct.pack("=HH", self._SPORT, self._SPORT))
        self.dport_at = self._find(struct.pack("=HH", self._DPORT, self._DPORT))
        header = iptc.ip4tc.ipt_entry if v4 else iptc.ip6tc.ip6t_entry
        self.target_offset = header.from_buffer_copy(self.raw[:ctypes.sizeof(header)]).target_offset
        self._tcp_name_at = ctypes.sizeof(header) + 2     # xt_entry_match: u16 size, then the name
        if self.raw[self._tcp_name_at:self._tcp_name_at + 4] != b"tcp\0":
            raise FirewallError("unexpected layout of a python-iptables rule")
        self._masks = b"\xff" * 2 * n
        self.family = fam.family

    def _find(self, needle):
        at = self.raw.find(needle)
        if at < 0 or self.raw.find(needle, at + 1) >= 0:
            raise FirewallError("unexpected layout of a python-iptables rule")
        return at

    def key(self, src, sport, dst, dport):
        """What identifies a connection rule within its leaf: addresses and ports as in the entry."""
        return (socket.inet_pton(self.family, src) + socket.inet_pton(self.family, dst)
                + struct.pack("=HH", sport, dport))

    def key_of(self, raw):
        """key() of a raw entry (its bytes up to the target), or None if it is not a connection rule.

        Longer entries are read too: rules made by earlier versions carried a comment match after
        the tcp one, and their counters must still be found (and removed) after an upgrade."""
        n, s, d = self.addr_len, self.sport_at, self.dport_at
        if (len(raw) < self.target_offset or raw[2 * n:4 * n] != self._masks
                or raw[self._tcp_name_at:self._tcp_name_at + 4] != b"tcp\0"
                or raw[s:s + 2] != raw[s + 2:s + 4] or raw[d:d + 2] != raw[d + 2:d + 4]):
            return None
        return raw[:2 * n] + raw[s:s + 2] + raw[d:d + 2]

    def tuple_of(self, key):
        """(src, sport, dst, dport) of a key."""
        n = self.addr_len
        sport, dport = struct.unpack("=HH", key[2 * n:])
        return (socket.inet_ntop(self.family, key[:n]), sport, socket.inet_ntop(self.family, key[n:2 * n]), dport)

    def matches(self, src, sport, dst, dport):
        """entry() up to its target."""
        return bytes(self.entry(src, sport, dst, dport))[:self.target_offset]

    def entry(self, src, sport, dst, dport):
        buf = bytearray(self.raw)
        n = self.addr_len
        buf[0:n] = socket.inet_pton(self.family, src)
        buf[n:2 * n] = socket.inet_pton(self.family, dst)
        buf[self.sport_at:self.sport_at + 4] = struct.pack("=HH", sport, sport)
        buf[self.dport_at:self.dport_at + 4] = struct.pack("=HH", dport, dport)
        return (ctypes.c_ubyte * len(buf)).from_buffer(buf)


_IPT_SO_GET_INFO = 64      # IPT_BASE_CTL; IP6T_SO_GET_INFO has the same number
_GETINFO_SIZE = 84         # name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size
_libc = ctypes.CDLL(None, use_errno=True)


def table_info(family, name):
    """The kernel's summary of a legacy table (where each chain starts, how many entries, how many
    bytes), in one getsockopt: any change another program commits to the table changes it, except
    a pure reordering of equal-sized rules."""
    level = socket.IPPROTO_IP if family == socket.AF_INET else socket.IPPROTO_IPV6
    buf = ctypes.create_string_buffer(name.encode().ljust(_GETINFO_SIZE, b"\0"), _GETINFO_SIZE)
    size = ctypes.c_uint(_GETINFO_SIZE)
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        if _libc.getsockopt(s.fileno(), level, _IPT_SO_GET_INFO, buf, ctypes.byref(size)) != 0:
            err = ctypes.get_errno()
            raise FirewallError(f"cannot read the summary of table {name}: {os.strerror(err)}")
    return buf.raw[32:size.value]


class _ChainSet:
    """Which chains exist in the table's current handle, asked of libiptc one name at a time:
    listing every chain builds a python-iptables object for each of hundreds of tree chains."""

    def __init__(self, table):
        self._table, self._known = table, {}

    def __contains__(self, name):
        if name not in self._known:
            self._known[name] = bool(self._table.is_chain(name))
        return self._known[name]

    def add(self, name):
        self._known[name] = True


class _Family:
    """One legacy table (filter, security or mangle) of one address family, and its rule type."""

    def __init__(self, family, mangle=False, table="filter"):
        self.family = family
        name = "mangle" if mangle else table
        cls = iptc.Table if family == socket.AF_INET else iptc.Table6
        self.table = cls(name)
        self.rule_cls = iptc.Rule if family == socket.AF_INET else iptc.Rule6
        cls.existing_table_names[name] = True
        self.table.autocommit = False
        self._template = None

    @property
    def template(self):
        if self._template is None:
            self._template = _PairTemplate(self)
        return self._template

    def conn_entry(self, src, sport, dst, dport):
        """The raw entry of a connection rule: what rule(src, sport, dst, dport) builds."""
        return self.template.entry(src, sport, dst, dport)

    def chain(self, name):
        return iptc.Chain(self.table, name)

    def rule(self, src, sport, dst, dport, target="RETURN", in_iface=None, out_iface=None):
        r = self.rule_cls()
        if in_iface:
            r.in_interface = in_iface
        if out_iface:
            r.out_interface = out_iface
        if src is not None:
            r.protocol = "tcp"
            r.src, r.dst = src, dst
            m = r.create_match("tcp")
            m.sport, m.dport = str(sport), str(dport)
        r.create_target(target)
        return r

    def dispatch_rule(self, hop):
        """-p tcp --sport|--dport lo:hi -j|-g target"""
        r = self.rule_cls()
        r.protocol = "tcp"
        m = r.create_match("tcp")
        setattr(m, hop.field, f"{hop.lo}:{hop.hi}")
        r.create_target(hop.target, goto=hop.goto)
        return r

    def dispatch_matches(self, hop):
        """The raw entry of a dispatch rule up to its target: its jump is set in the raw table."""
        r = self.rule_cls()
        r.protocol = "tcp"
        m = r.create_match("tcp")
        setattr(m, hop.field, f"{hop.lo}:{hop.hi}")
        r.create_target("RETURN")
        r.final_check()
        raw = bytes(ctypes.string_at(ctypes.addressof(r.rule), ctypes.sizeof(r.rule)))
        header = iptc.ip4tc.ipt_entry if self.family == socket.AF_INET else iptc.ip6tc.ip6t_entry
        # No addresses: python-iptables leaves whatever was in its buffer beside the zero masks.
        addresses = 16 if self.family == socket.AF_INET else 64
        return bytes(addresses) + raw[addresses:header.from_buffer_copy(raw[:ctypes.sizeof(header)]).target_offset]

    def jumps(self, chain_name):
        """Targets of the rules of a (small) chain, read without parsing the matches."""
        out = []
        entry = self.table.first_rule(chain_name)
        while entry:
            target = self.table.get_target(entry)
            out.append(target.decode() if target else "")
            entry = self.table.next_rule(entry)
        return out

    def syn_rule(self, target, iface=None, inbound=False, uid=None, dport=None, queue_num=None):
        r = self.rule_cls()
        r.protocol = "tcp"
        if iface and iface != "any":
            if inbound:
                r.in_interface = iface
            else:
                r.out_interface = iface
        m = r.create_match("tcp")
        m.syn = "1"
        if dport is not None:
            m.dport = str(dport)
        if uid is not None:
            r.create_match("owner").uid_owner = str(uid)
        t = r.create_target(target)
        if queue_num is not None:
            t.queue_num = str(queue_num)
            t.queue_bypass = "1"
        return r


class IptablesFirewall(RawPath, CaptureRules):
    def __init__(self, interfaces, lock=None, queue_num=None, table="filter", nflog_groups=None, fast_label=None):
        """`table`: where the connection rules and their chains go. Only the one in "filter" also
        looks after the SYN hold chains in mangle (shards.py puts half the rules in "security"),
        and the capture's NFLOG rules (logrules.py) for `nflog_groups` ({interface: group}).
        `fast_label`: the conntrack label bit of the fast path (ctmark.py), None for none: packets of
        connections carrying it pass the jumps into our chains by, and SYNs not held get it."""
        self.interfaces = tuple(interfaces)
        self.lock = lock or XtablesLock()
        self.queue_num = queue_num
        self.fast_label = fast_label
        self.nflog_groups = dict(nflog_groups or {})
        self.table = table
        self.families = (socket.AF_INET, socket.AF_INET6)   # where setup() and verify() look
        self._families = {}
        self._mangles = {}
        self._installed = {}  # cid -> RuleSpec
        self._owner = {}      # (family, leaf, rule key) -> cid, for both rules of each installed pair
        self._hold = (frozenset(), frozenset())
        self._committed = {}  # (family, table) -> table_info() right after our last commit of it
        self._foreign = set()   # (family, table) changed by another program since verify() last looked
        # The filter table of each family as our last commit left it (xtblob.py), and the lock
        # watch's generation then: read again only when another program may have changed it.
        self._raw = {}
        self._pair_keys = {}    # cid -> _keys() of an installed pair
        self._placed = {}       # family -> (RawTable, {cid: [(leaf, Entry, inbound)]}) of rules put in it
        self._watch = None
        self._no_raw = set()    # families whose table xtblob cannot read: libiptc does it all

    @property
    def rule_count(self):
        return 2 * len(self._installed)

    @property
    def installed(self):
        return set(self._installed)

    def _fam(self, family):
        if family not in self._families:
            try:
                self._families[family] = _Family(family, table=self.table)
            except iptc.IPTCError as exc:
                raise FirewallError(f"cannot open the {self._fname(family)} {self.table} table: {exc}") from None
        return self._families[family]

    def _mangle(self, family):
        if family not in self._mangles:
            try:
                self._mangles[family] = _Family(family, mangle=True)
            except iptc.IPTCError as exc:
                raise FirewallError(f"cannot open the {self._fname(family)} mangle table: {exc}") from None
        return self._mangles[family]

    @staticmethod
    def _fname(family):
        return "IPv4" if family == socket.AF_INET else "IPv6"

    @contextmanager
    def _cycle(self, fam):
        """refresh, modify, commit, all under the xtables lock."""
        key = (fam.family, fam.table.name)
        with self.lock.held():
            # Whatever another program changed since our last commit is about to be read and
            # committed along with our change: remember that it happened, for verify().
            before = self._summary(key)
            if before is None or before != self._committed.get(key, before):
                self._foreign.add(key)
            if fam.table.name == self.table:
                self._raw.pop(fam.family, None)      # libiptc changes it: read again before use
            try:
                fam.table.refresh()
                yield
                fam.table.commit()
                self._committed[key] = self._summary(key)
            except iptc.IPTCError as exc:
                try:
                    fam.table.refresh()
                except iptc.IPTCError:
                    pass
                raise FirewallError(f"{self._fname(fam.family)} netfilter change failed: {exc}") from None

    def _summary(self, key):
        """table_info() of (family, table), or None (and no cheap verification) if it cannot be read."""
        try:
            return table_info(*key)
        except (FirewallError, OSError) as exc:
            log.warning("cannot read the summary of the %s table: %s", key[1], exc)
            return None

    # --- setup and teardown -------------------------------------------------

    def setup(self, keep=None, families=None):
        """Take over what an earlier run left, and make our chains and jumps exactly as they should be.

        `keep` ({cid: RuleSpec}) holds the connections the durable state still knows: their rule
        pairs stay in place and go on counting. Every other rule pair found is read, returned as a
        leftover to be logged (attributed from `keep` when it is there but on an interface no
        longer watched, else known by its 4-tuple alone), and removed. Idempotent: running it
        twice leaves one set of chains, one jump each. `families`: only these (default both).
        """
        keep = keep or {}
        if families is not None:
            self.families = tuple(families)
        leftovers = []
        run = int(time.time() * 1000)   # leftover ids must not repeat those of another start
        for family in self.families:
            fam = self._fam(family)
            # An earlier version's leaves hand their rules, with their counts, to this layout's;
            # when that cannot be done they are harvested, and their connections get new rules.
            if family not in self._no_raw:
                self._relayout(fam)
            with self._cycle(fam):
                specs = {cid: spec for cid, spec in keep.items() if spec.family == family}
                owner = {k: cid for cid, spec in specs.items() for k in self._keys(spec)}
                # A rule's connection by its 4-tuple, whichever leaf it is in: the two rules of a
                # pair may be found in leaves of an earlier layout.
                by_tuple = {(s.interface, s.local, s.lport, s.remote, s.rport): cid for cid, s in specs.items()}
                present, stranded = set(), set()
                for name in self._leaves(fam):
                    _, direction, iface = chain_info(name)
                    for key, _, _ in self._raw_rules(fam, name):
                        if key is None:
                            continue
                        k = (family, name, key)
                        if k not in owner:
                            src, sport, dst, dport = fam.template.tuple_of(key)
                            local, lport, remote, rport = ((dst, dport, src, sport) if direction == "I"
                                                           else (src, sport, dst, dport))
                            # The pair's other rule, if it is there, is the same connection.
                            other = by_tuple.get((iface, local, lport, remote, rport))
                            if other is None:
                                other = f"left{run:x}.{self.table}.{self._fname(family)}.{len(specs)}"
                                specs[other] = RuleSpec(other, iface, family, local, lport, remote, rport)
                                by_tuple[(iface, local, lport, remote, rport)] = other
                            owner[k] = other
                        present.add(owner[k])
                        if outdated(name):      # left there by an earlier layout, and not moved
                            stranded.add(owner[k])
                drop = {cid for cid in present if cid not in keep or specs[cid].interface not in self.interfaces}
                for cid, counters in self._counters(fam, drop | stranded, delete=True, owner=owner).items():
                    note = ""
                    if cid in keep and cid not in drop:
                        note = ("its rules were in an earlier version's chain layout and could not be moved with "
                                "their counts: this record holds what they counted up to the restart, the "
                                "connection's next record what its new rules count")
                    leftovers.append(Leftover(specs[cid], counters, note))
                for cid in present - drop - stranded:
                    self._own(specs[cid])
                self._ensure_structure(fam, rejump=True)
            if self.table != "filter":
                continue
            mangle = self._mangle(family)
            with self._cycle(mangle):
                self._remove_ours(mangle)
            with self._cycle(mangle):
                if self.queue_num is not None:
                    for chain, builtin, inbound in ((HOLD_OUT, "OUTPUT", False), (HOLD_IN, "INPUT", True)):
                        mangle.table.create_chain(chain)
                        # Last: a SYN let go from the queue skips the rest of the chain (NF_ACCEPT
                        # goes on with the next hook), so other programs' rules come first.
                        mangle.chain(builtin).append_rule(mangle.syn_rule(chain, inbound=inbound))
                    self._label_others(mangle)
                self._log_rules(mangle)
        self._hold = (frozenset(), frozenset())
        return leftovers

    def teardown(self):
        """Read every rule still installed, then remove everything of ours."""
        final = {}
        for mangle in list(self._mangles.values()):
            with self._cycle(mangle):
                self._remove_ours(mangle)
        for fam in list(self._families.values()):
            with self._cycle(fam):
                final.update(self._counters(fam, None))
                self._remove_ours(fam)
        self._installed.clear()
        self._owner.clear()
        self._pair_keys.clear()
        return final

    def _remove_ours(self, fam):
        for builtin in ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"):
            if not fam.table.is_chain(builtin):
                continue
            chain = fam.chain(builtin)
            for rule in chain.rules:
                if rule.target and rule.target.name.startswith(PREFIX + "_"):
                    chain.delete_rule(rule)
        ours = [c for c in fam.table.chains if c.name.startswith(PREFIX + "_")]
        for chain in ours:      # every jump between our chains goes first, then the chains
            chain.flush()
        for chain in ours:
            fam.table.delete_chain(chain.name)

    def _ensure_structure(self, fam, rejump=False):
        """Our chains exist and are reached as they should be: one jump each at the top of INPUT /
        OUTPUT, and every dispatch hop to each leaf in use. Returns the fixes made. With `rejump`
        (setup) the jumps are made anew: an earlier run's may differ in their fast-path match."""
        fixes = []
        tops = {}
        for iface in self.interfaces:
            in_chain, out_chain = chain_names(iface)
            tops[in_chain], tops[out_chain] = ("INPUT", iface), ("OUTPUT", iface)
        existing = {c.name for c in fam.table.chains}
        for name in list(tops) + [CT_CHAIN]:
            if name not in existing:
                fam.table.create_chain(name)
                existing.add(name)
                fixes.append(f"chain {name} was missing")
        stale = [n for n in existing if n.startswith(PREFIX + "_") and n not in tops and n != CT_CHAIN
                 and (chain_info(n) is None or chain_info(n)[2] not in self.interfaces or outdated(n))]
        doomed = set(stale)
        for name in (existing - doomed) if doomed else ():     # hops to a stale chain from one that stays
            if not name.startswith(PREFIX + "_"):
                continue
            for index, target in reversed(list(enumerate(fam.jumps(name)))):
                if target in doomed and fam.table._iptc.iptc_delete_num_entry(
                        name.encode(), index, fam.table._handle) != 1:
                    raise iptc.IPTCError(f"cannot delete rule {index} of {name}")
        for name in stale:
            fam.chain(name).flush()
        for name in stale:
            fam.table.delete_chain(name)
            existing.discard(name)
        if fam.jumps(CT_CHAIN) != ["RETURN"]:
            fam.chain(CT_CHAIN).flush()
            ct = fam.rule_cls()
            ct.create_match("conntrack").ctstate = "INVALID"
            ct.create_target("RETURN")
            fam.chain(CT_CHAIN).insert_rule(ct)
        for builtin in ("INPUT", "OUTPUT"):
            ours = [name for name, (b, _) in tops.items() if b == builtin]
            jumps = fam.jumps(builtin)
            if (not rejump and sorted(jumps[:len(ours)]) == sorted(ours)
                    and sum(j.startswith(PREFIX + "_") for j in jumps) == len(ours)):
                continue
            if not rejump:
                fixes.append(f"jumps from {builtin} were moved or removed")
            chain = fam.chain(builtin)
            for rule in chain.rules:
                if rule.target and rule.target.name.startswith(PREFIX + "_"):
                    chain.delete_rule(rule)
            for name in ours:
                chain.insert_rule(self._jump(fam, builtin, name, tops[name][1]))   # each goes on top
        # Dispatch hops of the tree: every leaf in use must be reachable.
        jumps = {}
        for spec in self._installed.values():
            if spec.family != fam.family:
                continue
            for direction in ("I", "O"):
                hops, _ = path(spec, direction)
                for hop in hops:
                    if hop.chain not in jumps:
                        jumps[hop.chain] = set(fam.jumps(hop.chain)) if hop.chain in existing else set()
                    if hop.target not in existing:
                        fam.table.create_chain(hop.target)
                        existing.add(hop.target)
                        fixes.append(f"chain {hop.target} was missing")
                    if hop.target not in jumps[hop.chain]:
                        fam.chain(hop.chain).append_rule(fam.dispatch_rule(hop))
                        jumps[hop.chain].add(hop.target)
                        fixes.append(f"the jump from {hop.chain} to {hop.target} was missing")
        return fixes

    def _jump(self, fam, builtin, name, iface):
        """The jump from `builtin` into top chain `name`. With the fast path, only TCP packets of
        connections without the label take it: xt_connlabel, inverted, also matches a packet with
        no conntrack entry (INVALID: an out-of-window segment, say; UNTRACKED: the raw table's
        notrack), which the capture counts as well."""
        where = {"in_iface" if builtin == "INPUT" else "out_iface": None if iface == "any" else iface}
        jump = fam.rule(None, 0, None, 0, name, **where)
        if self.fast_label is not None:
            jump.protocol = "tcp"
            jump.create_match("connlabel").label = f"! {self.fast_label}"
        return jump

    def earlier_fast_path(self):
        """What the jumps into our chains pass packets by now (an earlier run's): ("label", bit),
        ("mark", bit) of a version whose jumps took marked connections only, or None. The bit is
        None when it cannot be told."""
        for family in self.families:
            try:
                fam = self._fam(family)
                with self.lock.held():
                    fam.table.refresh()
                    rules = fam.chain("INPUT").rules
            except (FirewallError, iptc.IPTCError):
                continue
            for rule in rules:
                if rule.target and rule.target.name.startswith(PREFIX + "_"):
                    for m in rule.matches:
                        if m.name == "connlabel":
                            # A name instead of the number when /etc/xtables/connlabel.conf names it.
                            value = m.parameters.get("label", "").lstrip("!").strip()
                            return "label", int(value) if value.isdigit() else None
                        if m.name == "connmark" and m.parameters.get("mark"):
                            return "mark", int(m.parameters["mark"].split("/")[0], 16)
        return None

    def _insert_pair(self, fam, spec, existing, jumps, directions="IO"):
        """The two rules of a connection (or those of `directions`), in their leaves, creating the
        path to them as needed."""
        for direction in directions:
            hops, leaf = path(spec, direction)
            for hop in hops:
                if hop.target not in existing:
                    fam.table.create_chain(hop.target)
                    existing.add(hop.target)
                known = jumps.get(hop.chain)
                if known is None:   # read once a cycle: a top chain has dozens of dispatch rules
                    known = jumps[hop.chain] = set(fam.jumps(hop.chain))
                if hop.target not in known:
                    fam.chain(hop.chain).append_rule(fam.dispatch_rule(hop))
                    known.add(hop.target)
            if direction == "I":
                entry = fam.conn_entry(spec.remote, spec.rport, spec.local, spec.lport)
            else:
                entry = fam.conn_entry(spec.local, spec.lport, spec.remote, spec.rport)
            # Newest first: a young connection carries most of the traffic.
            fam.table.insert_entry(leaf, entry, 0)

    # --- SYN holding ------------------------------------------------------------

    def set_hold(self, uids, ports):
        """Hold the SYNs sent by these uids and those arriving for these local ports.

        Only rewrites the mangle chains when the sets change.
        """
        wanted = (frozenset(uids), frozenset(ports))
        if self.queue_num is None or wanted == self._hold:
            return
        for family in (socket.AF_INET, socket.AF_INET6):
            mangle = self._mangle(family)
            with self._cycle(mangle):
                out_chain, in_chain = mangle.chain(HOLD_OUT), mangle.chain(HOLD_IN)
                out_chain.flush()
                in_chain.flush()
                for iface in self.interfaces:
                    for chain, inbound, match in ([(out_chain, False, {"uid": u}) for u in sorted(wanted[0])]
                                                  + [(in_chain, True, {"dport": p}) for p in sorted(wanted[1])]):
                        chain.append_rule(mangle.syn_rule("NFQUEUE", iface, inbound, queue_num=self.queue_num, **match))
                self._label_others(mangle)
        self._hold = wanted

    def _label_others(self, mangle):
        """With the fast path: the last rule of each hold chain labels the connection of every SYN
        not held (held ones leave the chain at their NFQUEUE rule): its packets then pass the
        jumps into our chains by. Not on lo, where a SYN passes both chains: one may hold what
        the other would label."""
        if self.fast_label is None:
            return
        for name, side in ((HOLD_OUT, "out_interface"), (HOLD_IN, "in_interface")):
            rule = mangle.rule_cls()
            setattr(rule, side, "!lo")
            m = rule.create_match("connlabel")
            m.label, m.set = str(self.fast_label), ""
            rule.create_target("RETURN")
            mangle.chain(name).append_rule(rule)

    # --- rule pairs -----------------------------------------------------------

    def _leaves(self, fam):
        return [c.name for c in fam.table.chains if (chain_info(c.name) or ("",))[0] == "leaf"]

    def _keys(self, spec):
        """(family, leaf, rule key) of the inbound and the outbound rule of a pair."""
        template = self._fam(spec.family).template
        return [(spec.family, leaf, template.key(*t)) for leaf, t in spec.tuples()]

    def _own(self, spec, keys=None):
        keys = keys or self._keys(spec)
        self._pair_keys[spec.cid] = keys      # computed once: they are asked for at each change
        for k in keys:
            other = self._owner.get(k)
            if other is not None and other != spec.cid:
                # The profiler harvests a connection before another with its 4-tuple gets rules; were
                # two pairs ever alike, their counters could not be told apart.
                log.error("connection %s gets the rules of %s, still installed (same 4-tuple)", spec.cid, other)
            self._owner[k] = spec.cid
        self._installed[spec.cid] = spec

    def _disown(self, cid):
        spec = self._installed.pop(cid, None)
        if spec is not None:
            for k in self._pair_keys.pop(cid, None) or self._keys(spec):
                if self._owner.get(k) == cid:
                    del self._owner[k]

    @staticmethod
    def _raw_rules(fam, chain_name):
        """(rule key or None, packets, bytes) of each rule of a chain, read from the raw entries.

        Building python-iptables Rule objects parses every match of every rule (about 0.1 ms a
        rule); the counters and the 4-tuple are all a harvest needs, and they sit in the entry."""
        out = []
        template = fam.template
        entry = fam.table.first_rule(chain_name)
        while entry:
            raw = ctypes.string_at(ctypes.addressof(entry), entry.target_offset)
            out.append((template.key_of(raw), entry.counters.pcnt, entry.counters.bcnt))
            entry = fam.table.next_rule(entry)
        return out

    def _counters(self, fam, wanted, delete=False, chains=None, owner=None):
        """{cid: Counters} of the wanted pairs (all when None); with `delete`, the rules go in the same cycle."""
        owner = self._owner if owner is None else owner
        found = {}
        for name in chains if chains is not None else self._leaves(fam):
            inbound = chain_info(name)[1] == "I"
            doomed = []
            for index, (key, packets, nbytes) in enumerate(self._raw_rules(fam, name)):
                cid = owner.get((fam.family, name, key)) if key is not None else None
                if cid is None or (wanted is not None and cid not in wanted):
                    continue
                _add_count(found, cid, inbound, packets, nbytes)
                doomed.append(index)
            if delete:
                for index in reversed(doomed):   # from the end, so that earlier numbers stay valid
                    if fam.table._iptc.iptc_delete_num_entry(name.encode(), index, fam.table._handle) != 1:
                        raise iptc.IPTCError(f"cannot delete rule {index} of {name}")
        return found

    def _leaves_of(self, specs):
        """Only the leaves these connections' rules are in: a harvest reads a few small chains."""
        return sorted({path(spec, d)[1] for spec in specs for d in ("I", "O")})

    def usable_families(self, families=(socket.AF_INET, socket.AF_INET6)):
        """Those of `families` whose table of ours the kernel has (iptable_security may be missing).
        Only a table that cannot be opened is left out: a lock held too long stops the start."""
        usable = []
        for family in families:
            with self.lock.held():
                try:
                    self._fam(family).table.refresh()
                except (FirewallError, iptc.IPTCError) as exc:
                    log.warning("the %s %s table cannot be used: %s", self._fname(family), self.table, exc)
                    self._families.pop(family, None)
                    continue
            usable.append(family)
        return usable

    def installed_spec(self, cid):
        return self._installed[cid]

    def holds(self, cid):
        return cid in self._installed

    def rule_keys(self, spec):
        """What tells the rules of `spec` apart in any of our tables: the same in filter and security."""
        return self._keys(spec)

    def holder_of(self, spec, keys=None):
        """The id under which a pair with the rules of `spec` (its 4-tuple) is installed, or None."""
        return next((self._owner[k] for k in keys or self._keys(spec) if k in self._owner), None)

    def commit_group(self, spec):
        """Changes of specs in one group share a commit: one family's table."""
        return spec.family

    def apply(self, add=(), remove=(), keys=None):
        """Install the pairs in `add`, read and remove those in `remove`, one commit per family.
        `keys`: {cid: rule_keys(spec)} of pairs in `add` whose keys the caller already made.

        Returns {cid: Counters} for the removed pairs, read in the same locked
        cycle that removes them, so no counted byte falls between read and delete.
        Raises PartialChange when one family's commit failed after another's was made.
        """
        harvested, done = {}, set()
        families = sorted({s.family for s in add} | {s.family for s in remove})
        for family in families:
            try:
                got = self._apply_family(family, [s for s in add if s.family == family],
                                         [s for s in remove if s.family == family], keys or {})
            except FirewallError as exc:
                if not done:
                    raise
                raise PartialChange(str(exc), done, harvested) from None
            harvested.update(got)
            done.update(s.cid for s in add if s.family == family)
            done.update(s.cid for s in remove if s.family == family)
        return harvested

    def _apply_family(self, family, adds, gone, known_keys):
        harvested = {}
        fam = self._fam(family)
        # A pair still installed under another connection's id with a new one's 4-tuple (its
        # removal failed, and the profiler gave up on it): read and removed with the others,
        # or its counters would be summed into the new connection's.
        keys = {spec.cid: known_keys.get(spec.cid) or self._keys(spec) for spec in adds}
        stale = {self._owner[k] for spec in adds for k in keys[spec.cid]
                 if self._owner.get(k) not in (None, spec.cid)} - {s.cid for s in gone}
        if stale:
            log.error("removing the stale rules of %s: a new connection has their 4-tuple", sorted(stale))
            gone = gone + [self._installed[cid] for cid in stale if cid in self._installed]
        raw_done = False
        if family not in self._no_raw:
            try:
                harvested.update(self._apply_raw(fam, adds, gone))
                raw_done = True
            except _Unreadable as exc:
                log.warning("the %s %s table is changed through libiptc from now on: %s",
                            self._fname(family), self.table, exc)
                self._no_raw.add(family)
        if not raw_done:
            with self._cycle(fam):
                if gone:
                    existing = _ChainSet(fam.table)
                    leaves = [name for name in self._leaves_of(gone) if name in existing]
                    harvested.update(self._counters(fam, {s.cid for s in gone}, delete=True, chains=leaves))
                if adds:
                    existing, jumps = _ChainSet(fam.table), {}
                    for spec in adds:
                        self._insert_pair(fam, spec, existing, jumps)
        for spec in gone:       # first: a new connection may reuse a removed one's 4-tuple
            self._disown(spec.cid)
        for spec in adds:
            self._own(spec, keys[spec.cid])
        return harvested

    def read(self, specs):
        """Live counters of installed pairs, without changing anything."""
        result = {}
        for family in {s.family for s in specs}:
            fam = self._fam(family)
            mine = [s for s in specs if s.family == family]
            with self.lock.held():
                try:
                    fam.table.refresh()
                    existing = _ChainSet(fam.table)
                    leaves = [name for name in self._leaves_of(mine) if name in existing]
                    result.update(self._counters(fam, {s.cid for s in mine}, chains=leaves))
                except iptc.IPTCError as exc:
                    raise FirewallError(f"cannot read counters: {exc}") from None
        return result

    def verify(self, full=True):
        """Find what another program did to our chains, and repair it.

        Returns (fixes, cids) where cids are connections whose rules had vanished or were
        bypassed; their rules are put back (counting from now), so their rule counts are no
        longer complete. Unless `full`, a table whose kernel summary is what our last commit left
        is taken as untouched: reading every rule of a large table costs a good part of a second.
        """
        fixes, missing = [], set()
        for family in {s.family for s in self._installed.values()} | ({socket.AF_INET} & set(self.families)):
            fam = self._fam(family)
            key = (family, fam.table.name)
            if not full and key not in self._foreign and self._committed.get(key) is not None:
                if self._summary(key) == self._committed[key]:
                    continue
            expected = {cid: spec for cid, spec in self._installed.items() if spec.family == family}
            if family not in self._no_raw and self._intact(fam, expected):
                self._foreign.discard(key)
                continue
            with self._cycle(fam):
                structural = self._ensure_structure(fam)
                if structural:
                    # Packets passed around our chains: every connection of this family missed some.
                    fixes += structural
                    missing |= set(expected)
                present = {(family, name, rule_key) for name in self._leaves(fam)
                           for rule_key, _, _ in self._raw_rules(fam, name) if rule_key is not None}
                existing, jumps = _ChainSet(fam.table), {}
                for cid, spec in expected.items():
                    # Only what is gone is put back: the rule left of a halved pair keeps counting,
                    # and libiptc's commit carries its counters over. (A copy more is harmless.)
                    gone = [d for d, k in zip("IO", self._pair_keys[cid]) if k not in present]
                    if gone:
                        missing.add(cid)
                        self._insert_pair(fam, spec, existing, jumps, directions=gone)
            # Only now: this cycle's own check of the summary saw the same foreign change again.
            self._foreign.discard(key)
        if missing:
            fixes.append(f"{len(missing)} connections' rules were removed or bypassed")
        fixes += self.verify_capture()
        return fixes, missing
