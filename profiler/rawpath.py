"""The fast path of the netfilter adapter: connection rules added and removed through xtblob,
on the filter table as our last commit left it, and the full check of our chains read the
same way. A mixin of IptablesFirewall (firewall.py); it does not import iptc: the rules it
inserts are built by the adapter's templates.

The table is read again whenever another program may have changed it: it used the xtables
lock (xtlock.LockWatch), the kernel's summary of the table is not the one our last commit
left, or RAW_MAX_AGE has passed.
"""
import logging
import time

from .chains import CT_CHAIN, PREFIX, Counters, RuleSpec, chain_info, chain_names, outdated, path
from .errors import FirewallError
from .xtblob import RawTable, TableChanged, UnknownLayout
from .xtlock import LockWatch

log = logging.getLogger("netprofiler")

# The kept filter table is read again at least this often (seconds), even when no other program
# seems to have used the lock: one that changes the table without taking it, and without
# changing its size, would otherwise be undone by our commits until the next full verification.
RAW_MAX_AGE = 10.0


def _add_count(found, cid, inbound, packets, nbytes):
    """One rule's counters into found[cid]. Summed: should a connection have two rules in one
    direction (another program copied one, or a restart put one back beside a survivor), a packet
    RETURNs from the first it matches, so each counted byte is in exactly one of them."""
    c = found.get(cid, Counters(in_rules=0, out_rules=0))
    found[cid] = (Counters(c.in_packets + packets, c.in_bytes + nbytes, c.out_packets, c.out_bytes,
                           c.in_rules + 1, c.out_rules) if inbound
                  else Counters(c.in_packets, c.in_bytes, c.out_packets + packets, c.out_bytes + nbytes,
                                c.in_rules, c.out_rules + 1))


class _Unreadable(Exception):
    """xtblob cannot read a table (a layout it does not know): libiptc is used instead."""



class RawPath:
    def _raw_table(self, fam):
        """Under the lock: the filter table, read again only if another program may have changed it
        since our last commit (it closed the lock file, or the kernel's summary differs)."""
        if self._watch is None:
            self._watch = LockWatch(self.lock)
        generation = self._watch.current()
        key = (fam.family, fam.table.name)
        held = self._raw.get(fam.family)
        summary = self._summary(key)
        now = time.monotonic()
        if (held is not None and held[1] == generation and now - held[2] < RAW_MAX_AGE
                and summary is not None and summary == self._committed.get(key)):
            return held[0]
        if summary is None or summary != self._committed.get(key, summary):
            self._foreign.add(key)
        raw = RawTable(fam.family, self.table)
        try:
            raw.load()
        except UnknownLayout as exc:
            raise _Unreadable(str(exc)) from None
        self._raw[fam.family] = (raw, generation, now)
        return raw

    def _intact(self, fam, expected):
        """Whether our chains, jumps and every expected rule pair are as they should be, read from
        the kernel through xtblob: no commit when nothing is wrong (a libiptc cycle of a 20,000-rule
        table, then reading it back for xtblob, took about 0.4 s of the profiler thread)."""
        with self.lock.held():
            self._raw.pop(fam.family, None)
            try:
                raw = self._raw_table(fam)
            except _Unreadable:
                return False
            tops = {}
            for iface in self.interfaces:
                in_chain, out_chain = chain_names(iface)
                tops[in_chain], tops[out_chain] = "INPUT", "OUTPUT"
            for c in raw.chains:
                info = chain_info(c.name)
                if c.name.startswith(PREFIX + "_") and c.name not in tops and c.name != CT_CHAIN and (
                        info is None or info[2] not in self.interfaces or outdated(c.name)):
                    return False        # a chain we no longer use: the repair removes it
            if any(name not in raw for name in list(tops) + [CT_CHAIN]) or len(raw.rules(CT_CHAIN)) != 1:
                return False
            for builtin in ("INPUT", "OUTPUT"):
                ours = {name for name, b in tops.items() if b == builtin}
                n = len(ours)
                first = [e.jump[1] if e.jump and e.jump[0] == "chain" else None for e in raw.rules(builtin)[:n]]
                if set(first) != ours or sum(j.startswith(PREFIX + "_") for j in raw.jumps(builtin)) != n:
                    return False
            jumps, routed = {}, set()
            for spec in expected.values():
                for direction in ("I", "O"):
                    hops, leaf = path(spec, direction)
                    if leaf in routed:
                        continue        # a dozen connections share a leaf, and its route
                    routed.add(leaf)
                    for hop in hops:
                        if hop.chain not in raw or hop.target not in raw:
                            return False
                        if hop.chain not in jumps:
                            jumps[hop.chain] = set(raw.jumps(hop.chain))
                        if hop.target not in jumps[hop.chain]:
                            return False
            present = set()
            template = fam.template
            for c in raw.chains:
                if (chain_info(c.name) or ("",))[0] != "leaf":
                    continue
                for e in c.rules:
                    k = template.key_of(e.raw)
                    if k is not None:
                        present.add((fam.family, c.name, k))
            # Each rule of each pair where it belongs (a copy more is harmless: _add_count sums).
            return all(k in present for cid in expected for k in self._pair_keys[cid])

    def _apply_raw(self, fam, adds, gone):
        """apply() for one family on the table kept from our last commit: the kernel is asked for
        it again only after another program's change. Removed rules' counters come from the
        commit itself, final to the packet."""
        try:
            return self._apply_raw_once(fam, adds, gone)
        except TableChanged:
            log.warning("the %s %s table was changed by a program that does not take the xtables lock; "
                        "read again", self._fname(fam.family), self.table)
            return self._apply_raw_once(fam, adds, gone)

    def _apply_raw_once(self, fam, adds, gone):
        key, template = (fam.family, fam.table.name), fam.template
        with self.lock.held():
            try:
                raw = self._raw_table(fam)
                for spec in adds:
                    for direction in ("I", "O"):
                        top = path(spec, direction)[0][0].chain
                        if top not in raw:
                            raise FirewallError(f"chain {top} is missing")
                # The rules we put in this very table since it was read are known by their entries;
                # only the others (read with it) are looked for in their leaves.
                if self._placed.get(fam.family, (None,))[0] is not raw:
                    self._placed[fam.family] = (raw, {})
                placed = self._placed[fam.family][1]
                doomed, doomed_in, search = [], {}, []      # doomed: (entry, cid, inbound)
                for spec in gone:
                    known = placed.pop(spec.cid, None)
                    if known is None:
                        search.append(spec)
                        continue
                    for leaf, e, inbound in known:
                        doomed_in.setdefault(leaf, []).append(e)
                        doomed.append((e, spec.cid, inbound))
                wanted = {s.cid for s in search}
                for leaf in self._leaves_of(search):
                    if leaf not in raw:
                        continue
                    inbound = chain_info(leaf)[1] == "I"
                    for e in raw.rules(leaf):
                        k = template.key_of(e.raw)
                        cid = self._owner.get((fam.family, leaf, k)) if k is not None else None
                        if cid in wanted:
                            doomed_in.setdefault(leaf, []).append(e)
                            doomed.append((e, cid, inbound))
                for leaf, entries in doomed_in.items():
                    if leaf in raw:
                        raw.remove(leaf, entries)
                jumps = {}
                for spec in adds:
                    for direction, (leaf, four) in zip(("I", "O"), spec.tuples()):
                        self._raw_route(raw, fam, path(spec, direction)[0], jumps)
                        e = raw.insert(leaf, template.matches(*four))     # newest first
                        placed.setdefault(spec.cid, []).append((leaf, e, direction == "I"))
                final = raw.commit()
            except UnknownLayout as exc:
                self._raw.pop(fam.family, None)
                raise _Unreadable(str(exc)) from None
            except BaseException:
                # Changed in part, or in whatever state the kernel has: read it again next time.
                self._raw.pop(fam.family, None)
                raise
            self._committed[key] = self._summary(key)
        found = {}
        for e, cid, inbound in doomed:
            _add_count(found, cid, inbound, *final[e])
        return found


    @staticmethod
    def _raw_route(raw, fam, hops, jumps):
        """The chains and dispatch rules of `hops`, where missing. `jumps`: {chain: its targets},
        filled as chains are first looked at."""
        for hop in hops:
            if hop.target not in raw:
                raw.add_chain(hop.target)
            known = jumps.get(hop.chain)
            if known is None:
                known = jumps[hop.chain] = set(raw.jumps(hop.chain))
            if hop.target not in known:
                raw.add_jump(hop.chain, fam.dispatch_matches(hop), hop.target, hop.goto)
                known.add(hop.target)

    def _relayout(self, fam):
        """The rules an earlier version left in leaves of the two-level layout (chains.outdated) go to
        this layout's leaves in one commit, each entry moved with its count, so that no packet is
        missed or counted twice; the old leaves and the hops to them go. Returns how many rules
        moved, or None when xtblob cannot read the table (setup then harvests them as leftovers)."""
        template, moved, jumps = fam.template, 0, {}
        with self.lock.held():
            self._raw.pop(fam.family, None)
            try:
                raw = self._raw_table(fam)
            except _Unreadable:
                return None
            old = sorted(c.name for c in raw.chains if outdated(c.name))
            if not old:
                return 0
            try:
                for name in old:
                    _, direction, iface = chain_info(name)
                    into = {}
                    for e in raw.rules(name):
                        k = template.key_of(e.raw)
                        if k is None:
                            continue        # not a connection rule: it goes with the chain
                        src, sport, dst, dport = template.tuple_of(k)
                        local = (dst, dport, src, sport) if direction == "I" else (src, sport, dst, dport)
                        hops, leaf = path(RuleSpec("", iface, fam.family, *local), direction)
                        self._raw_route(raw, fam, hops, jumps)
                        into.setdefault(leaf, []).append(e)
                    for leaf, entries in into.items():
                        raw.move(name, entries, leaf)
                        moved += len(entries)
                gone = set(old)
                for c in list(raw.chains):
                    hops = [e for e in c.rules if e.jump is not None and e.jump[0] == "chain" and e.jump[1] in gone]
                    if hops:
                        raw.remove(c.name, hops)
                for name in old:
                    raw.remove_chain(name)
                raw.commit()
            except (UnknownLayout, TableChanged, KeyError) as exc:
                # Not readable as we expect (or changed meanwhile, or a chain missing): the pairs
                # there are read by libiptc at setup and logged, as when xtblob cannot read it.
                log.warning("cannot move the rules of the earlier layout in the %s %s table: %r",
                            self._fname(fam.family), self.table, exc)
                self._raw.pop(fam.family, None)
                return None
            except BaseException:
                self._raw.pop(fam.family, None)
                raise
            self._committed[(fam.family, fam.table.name)] = self._summary((fam.family, fam.table.name))
        log.warning("moved %d rules of the %s %s table from %d leaves of the earlier two-level layout into "
                    "this layout's, with their counts", moved, self._fname(fam.family), self.table, len(old))
        return moved
