"""The connection rules spread over two tables, filter and security, half in each.

Every commit replaces a whole table, and at 5,000 connections the kernel spends about 3 ms
taking a 2 MB filter table: a held SYN waits for that. With the rules split by port block
between filter and security (the two tables with INPUT and OUTPUT hooks that come after
mangle, where SYNs are held), a new connection's commit replaces half as much. A packet
walks both tables' top chains, each with the hops of its own blocks, then two dispatch chains
(512, then 64 ports) and one leaf in the table that has its block.

A connection's rules stay in the table they were put in (or found in, after a restart)
until they are removed. A family without the security table (a kernel built without it)
puts all its rules in filter.
"""
import logging
import socket

from .errors import FirewallError, PartialChange

log = logging.getLogger("netprofiler")


def shard_of(spec):
    """0 (filter) or 1 (security): alternate 4,096-port blocks of the port a connection is filed
    under (chains.path), so that each table's top chain dispatches only its own blocks."""
    port = spec.lport if spec.lport >= spec.rport else spec.rport
    return (port >> 12) & 1


def _loaded(table, family):
    """Whether the kernel has made legacy table `table` of `family` in this network namespace (it
    makes one when a program first opens it)."""
    path = "/proc/net/ip_tables_names" if family == socket.AF_INET else "/proc/net/ip6_tables_names"
    try:
        with open(path) as f:
            return table in f.read().split()
    except OSError:
        return False


class ShardedFirewall:
    """The netfilter adapter's interface, over one IptablesFirewall per table."""

    def __init__(self, primary, secondary, split=True, table_made=_loaded):
        self.primary = primary          # filter; it also owns the SYN hold chains in mangle
        self._table_made = table_made   # (table, family) -> whether the kernel has made it here
        self._split_wanted = split
        self._parts = [primary, secondary]
        self._where = {}                # cid -> index in _parts of the table holding its rules
        # Families whose rules are split (set again by setup(): those whose security table exists).
        self._split = {socket.AF_INET, socket.AF_INET6} if split else set()

    @property
    def queue_num(self):
        return self.primary.queue_num

    @queue_num.setter
    def queue_num(self, value):
        self.primary.queue_num = value

    @property
    def fast_label(self):
        return self.primary.fast_label

    @fast_label.setter
    def fast_label(self, value):
        for part in self._parts:
            part.fast_label = value

    def earlier_fast_path(self):
        return self.primary.earlier_fast_path()

    @property
    def interfaces(self):
        return self.primary.interfaces

    @property
    def tables(self):
        return [part.table for part in self._parts]

    @property
    def rule_count(self):
        return sum(part.rule_count for part in self._parts)

    @property
    def installed(self):
        return set(self._where)

    def _index(self, spec):
        i = self._where.get(spec.cid)
        if i is None:
            i = shard_of(spec) if spec.family in self._split else 0
        return i

    def commit_group(self, spec):
        return (spec.family, self._index(spec))

    def setup(self, keep=None):
        """Both tables taken over as IptablesFirewall.setup does. A family whose security table the
        kernel does not have puts all its rules in filter; any other failure stops the start.
        Without the split (RULE_TABLES = filter) the security table is still taken over, so that
        pairs an earlier run left there are read; its chains go once it holds none. Unless the
        kernel has not made that table in this namespace yet: opening it would make it, and every
        packet would then pass its hooks."""
        leftovers = self.primary.setup(keep)
        usable = []
        if len(self._parts) > 1:
            families = [f for f in (socket.AF_INET, socket.AF_INET6)
                        if self._split_wanted or self._table_made(self._parts[1].table, f)]
            usable = self._parts[1].usable_families(families) if families else []
        if usable:
            leftovers += self._parts[1].setup(keep, families=usable)
            if not self._split_wanted and not self._parts[1].installed:
                self._parts[1].teardown()
                usable = []
        if not usable and len(self._parts) > 1:
            if self._split_wanted:
                log.warning("every connection rule goes in the filter table: the security table cannot be used")
            del self._parts[1:]
        self._split = set(usable) if self._split_wanted else set()
        # A kept connection goes on counting where its rules were found.
        self._where = {cid: i for i, part in enumerate(self._parts) for cid in part.installed}
        return leftovers

    def apply(self, add=(), remove=()):
        """As IptablesFirewall.apply, one commit per table and family. Raises PartialChange when
        a commit failed after another was made."""
        by_part, early, stale, keys = {}, {}, [], {}
        for spec in remove:
            by_part.setdefault(self._index(spec), ([], []))[1].append(spec)
        removing = {s.cid for s in remove}
        for spec in add:
            i = self._index(spec)
            by_part.setdefault(i, ([], []))[0].append(spec)
            # A pair still installed with this 4-tuple (its removal failed and was given up, or it
            # was kept from before a restart): in this table its own part removes it in the same
            # commit; in another, a commit of that table that removes it comes before any add, or
            # both pairs would count the new connection's packets in between.
            keys[spec.cid] = self.primary.rule_keys(spec)
            for j, part in enumerate(self._parts):
                other = part.holder_of(spec, keys[spec.cid])
                if other in (None, spec.cid):
                    continue
                stale.append((j, other))
                if j == i or other in early.get(j, {}):
                    continue
                if other not in removing:
                    log.error("removing the stale rules of %s in %s: a new connection has their 4-tuple",
                              other, part.table)
                early.setdefault(j, {})[other] = part.installed_spec(other)
        steps = [(j, [], list(gone.values())) for j, gone in sorted(early.items())]
        for i, (adds, gone) in sorted(by_part.items()):
            gone = [s for s in gone if s.cid not in early.get(i, {})]
            if adds or gone:
                steps.append((i, adds, gone))
        harvested, done = {}, set()
        try:
            for i, adds, gone in steps:
                try:
                    harvested.update(self._parts[i].apply(adds, gone, keys))
                except PartialChange as exc:
                    self._settle(i, [s for s in adds if s.cid in exc.done], [s for s in gone if s.cid in exc.done])
                    raise PartialChange(str(exc), done | exc.done, {**harvested, **exc.harvested}) from None
                except FirewallError as exc:
                    if not done:
                        raise
                    raise PartialChange(str(exc), done, harvested) from None
                self._settle(i, adds, gone)
                done.update(s.cid for s in adds)
                done.update(s.cid for s in gone)
        finally:
            for j, cid in stale:       # removed by their part's own stale check, or above
                if self._where.get(cid) == j and not self._parts[j].holds(cid):
                    del self._where[cid]
        return harvested

    def _settle(self, i, adds, gone):
        for spec in gone:
            self._where.pop(spec.cid, None)
        for spec in adds:
            self._where[spec.cid] = i

    def read(self, specs):
        result = {}
        by_part = {}
        for spec in specs:
            by_part.setdefault(self._index(spec), []).append(spec)
        for i, mine in by_part.items():
            result.update(self._parts[i].read(mine))
        return result

    def verify(self, full=True):
        fixes, missing = [], set()
        for part in self._parts:
            f, m = part.verify(full)
            fixes += f
            missing |= m
        return fixes, missing

    def set_hold(self, uids, ports):
        self.primary.set_hold(uids, ports)

    def teardown(self):
        final = {}
        for part in self._parts:
            final.update(part.teardown())
        self._where.clear()
        return final
