"""A legacy x_tables table kept as its raw entries, changed and committed without libiptc.

python-iptables (libiptc) reads the whole table from the kernel before every change
(IPT_SO_GET_ENTRIES: 3.6 ms of a 7.5 ms cycle at 10,000 rules here), then parses and rebuilds
it. The table only changes when someone commits it, so we keep the entries as we last committed
them, and read them again only when another program may have changed them (firewall.py decides).

A commit (IPT_SO_SET_REPLACE) gives the kernel a new table whose counters start at zero, and
hands back the final counters of every entry of the old one; IPT_SO_SET_ADD_COUNTERS then adds
each kept entry's old count to its new self, as libiptc does. A removed entry's final count is
exact: the kernel reads it once the old table is out of use.

Entries are kept as the kernel gave them (it clears their counters when it takes a table), except
jump verdicts, byte offsets into the table, which are recomputed from what they point to: the start
of a chain or, for a rule without a target, the entry after it.
"""
import ctypes
import errno
import logging
import os
import socket
import struct

from .errors import FirewallError

log = logging.getLogger("netprofiler")

_SO_SET_REPLACE, _SO_SET_ADD_COUNTERS = 64, 65    # IPT_/IP6T_SO_*: the same numbers
_SO_GET_INFO, _SO_GET_ENTRIES = 64, 65
_NUMHOOKS = 5
_HOOK_NAMES = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
_INFO_SIZE = 84            # name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size
_GET_HEADER = 40           # name[32], size, then the (8-aligned) entries
_REPLACE_HEADER = 96       # name[32], valid_hooks, num_entries, size, hook_entry[5], underflow[5],
                           # num_counters, counters pointer (8-aligned), then the entries
_ADD_HEADER = 40           # name[32], num_counters, then the (8-aligned) counters
_TARGET_HEADER = 32        # xt_entry_target: u16 target_size, char name[29], u8 revision
_STANDARD_SIZE = 40        # xt_standard_target: the header, int verdict, padding
_ERROR_SIZE = 64           # xt_error_target: the header, char errorname[32]
RETURN = -5                # XT_RETURN (-NF_REPEAT - 1)
_libc = ctypes.CDLL(None, use_errno=True)


class UnknownLayout(FirewallError):
    """A table this module cannot read, or that the kernel refuses as we wrote it: libiptc's turn."""


class TableChanged(FirewallError):
    """The kernel's table is no longer the one we kept (someone changed it without the lock)."""


class _Layout:
    """Where the fields of ipt_entry / ip6t_entry are."""

    def __init__(self, family):
        v4 = family == socket.AF_INET
        self.level = socket.IPPROTO_IP if v4 else socket.IPPROTO_IPV6
        self.header = 112 if v4 else 168
        self.target_offset = 88 if v4 else 140     # u16 target_offset, u16 next_offset
        self.comefrom = 92 if v4 else 144          # u32; then, 8-aligned, the counters
        self.counters = 96 if v4 else 152
        self.flags = 82 if v4 else 131            # ip.flags / ipv6.flags
        self.goto = 0x02 if v4 else 0x04           # IPT_F_GOTO / IP6T_F_GOTO


class Entry:
    """One rule, chain head or chain tail, as the kernel holds it."""
    __slots__ = ("raw", "index", "jump", "verdict_at")

    def __init__(self, raw, jump=None, verdict_at=None):
        self.raw = raw              # bytes, counters zeroed
        self.index = None           # its place in the kernel's table, while its chain is being changed
        self.jump = jump            # ("chain", name) or ("entry", Entry): what its verdict points to
        self.verdict_at = verdict_at


class Chain:
    __slots__ = ("name", "hook", "head", "rules", "tail", "start", "dirty", "special", "blob", "n", "head_len",
                 "patches", "at")

    def __init__(self, name, hook, head):
        self.name, self.hook, self.head, self.tail = name, hook, head, None
        self.rules = []
        self.start = None    # index of its first entry (the head of a user chain) in the kernel's table
        self.dirty = False   # changed since the last commit: its entries carry their old index
        self.special = False  # holds jumps: their verdicts are set at each commit
        self.blob = None     # its bytes (jumps' verdicts not set), kept while it does not change
        self.n = self.head_len = self.at = 0
        self.patches = ()

    def entries(self):
        return ([self.head] if self.head is not None else []) + self.rules + [self.tail]


def _sockopt(family, fn, opt, buf, size):
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        if fn(s.fileno(), _Layout(family).level, opt, buf, size) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def read_info(family, name):
    """The raw IPT_SO_GET_INFO answer after the name: valid_hooks, hook_entry, underflow, number and size."""
    buf = ctypes.create_string_buffer(name.encode().ljust(_INFO_SIZE, b"\0"), _INFO_SIZE)
    size = ctypes.c_uint(_INFO_SIZE)
    _sockopt(family, _libc.getsockopt, _SO_GET_INFO, buf, ctypes.byref(size))
    return buf.raw[32:size.value]


class _Copies:
    """Counters (16 bytes an entry) from the old table's place to the new one's, joined into one
    memmove wherever consecutive entries stay consecutive: unchanged chains, most of a changed one."""

    def __init__(self, new_base, old_base):
        self.new_base, self.old_base = new_base, old_base
        self.new = self.old = self.n = 0

    def add(self, new, old, n):
        if self.n and self.old + self.n == old and self.new + self.n == new:
            self.n += n
            return
        self.flush()
        self.new, self.old, self.n = new, old, n

    def flush(self):
        if self.n:
            ctypes.memmove(self.new_base + 16 * self.new, self.old_base + 16 * self.old, 16 * self.n)
        self.n = 0


class RawTable:
    def __init__(self, family, name):
        self.family, self.name = family, name
        self.lay = _Layout(family)
        self.chains = []          # in table order: the built-in chains, then user chains by name
        self.by_name = {}
        self.trailer = None       # the ERROR entry that ends every table
        self.valid_hooks = 0
        self.count = 0            # entries in the kernel's table
        self._removed = []

    # --- reading ----------------------------------------------------------------------

    def load(self):
        """Read the table from the kernel, whatever it holds now."""
        try:
            info = read_info(self.family, self.name)
            valid, *rest = struct.unpack_from(f"={1 + 2 * _NUMHOOKS + 2}I", info)
            size = rest[-1]
            buf = ctypes.create_string_buffer(_GET_HEADER + size)
            struct.pack_into("=32sI", buf, 0, self.name.encode(), size)
            length = ctypes.c_uint(_GET_HEADER + size)
            _sockopt(self.family, _libc.getsockopt, _SO_GET_ENTRIES, buf, ctypes.byref(length))
        except OSError as exc:
            raise FirewallError(f"cannot read the {self.name} table: {exc.strerror}") from None
        self.valid_hooks, self._removed = valid, []
        try:
            self._parse(buf.raw[_GET_HEADER:_GET_HEADER + size], rest[:_NUMHOOKS], rest[_NUMHOOKS:2 * _NUMHOOKS],
                        rest[-2])
        except (IndexError, KeyError, UnicodeDecodeError, struct.error) as exc:
            raise UnknownLayout(f"the {self.name} table: an entry we cannot read ({exc!r})") from None

    def _parse(self, blob, hooks, underflows, number):
        lay = self.lay
        starts = {hooks[h]: h for h in range(_NUMHOOKS) if self.valid_hooks & (1 << h)}
        ends = {underflows[h] for h in range(_NUMHOOKS) if self.valid_hooks & (1 << h)}
        # (offset, Entry, target name, verdict, target data). The counters stay in the bytes: the
        # kernel clears an entry's counters (and comefrom) when it takes a table.
        parsed, at, size = [], 0, len(blob)
        unpack, where = struct.unpack_from, lay.target_offset
        while at < size:
            t, next_offset = unpack("=HH", blob, at + where)
            if t < lay.header or next_offset < t + _TARGET_HEADER:
                raise UnknownLayout(f"the {self.name} table: an entry of {next_offset} bytes at offset {at}")
            raw = blob[at:at + next_offset]
            if raw[t + 2] == 0:          # a standard target: no name
                parsed.append((at, Entry(raw, verdict_at=t + _TARGET_HEADER), b"",
                               unpack("=i", raw, t + _TARGET_HEADER)[0], None))
            else:
                name = raw[t + 2:t + 31].split(b"\0")[0]
                parsed.append((at, Entry(raw), name, None, raw[t + _TARGET_HEADER:] if name == b"ERROR" else None))
            at += next_offset
        if len(parsed) != number:
            raise UnknownLayout(f"the {self.name} table: {len(parsed)} entries read, the kernel said {number}")
        by_offset = {at: entry for at, entry, *_ in parsed}
        chains, chain, chain_at = [], None, {}
        for i, (at, entry, name, verdict, data) in enumerate(parsed):
            if at in starts:
                chain = Chain(_HOOK_NAMES[starts[at]], starts[at], None)
                chain.start = i
                chains.append(chain)
            if name == b"ERROR":
                if i == len(parsed) - 1:
                    self.trailer = entry
                    break
                chain = Chain(data[:32].split(b"\0")[0].decode(), None, entry)
                chain.start = i
                chains.append(chain)
                chain_at[parsed[i + 1][0]] = chain.name
                continue
            if chain is None:
                raise UnknownLayout(f"the {self.name} table: an entry outside every chain at offset {at}")
            if verdict is not None and verdict >= 0:
                entry.jump = verdict
                chain.special = True
            # A built-in chain ends at its policy; a user chain at the RETURN just before the next
            # chain's head (a rule of it may RETURN too).
            if (at in ends) if chain.hook is not None else (verdict == RETURN and parsed[i + 1][2] == b"ERROR"):
                chain.tail = entry
                chain = None
            else:
                chain.rules.append(entry)
        for _, entry, *_ in parsed:
            if entry.jump is not None:
                if entry.jump in chain_at:
                    entry.jump = ("chain", chain_at[entry.jump])
                elif entry.jump in by_offset:
                    entry.jump = ("entry", by_offset[entry.jump])   # a rule without a target: the next
                else:
                    raise UnknownLayout(f"the {self.name} table: a jump to offset {entry.jump}, where no entry is")
        if self.trailer is None or any(c.tail is None for c in chains):
            raise UnknownLayout(f"the {self.name} table: cannot find where its chains end")
        self.chains, self.count = chains, number
        self.by_name = {c.name: c for c in chains}

    # --- changing -----------------------------------------------------------------------

    def __contains__(self, chain):
        return chain in self.by_name

    def rules(self, chain):
        return self.by_name[chain].rules

    def jumps(self, chain):
        """Names of the chains the rules of `chain` jump or go to."""
        return [e.jump[1] for e in self.by_name[chain].rules if e.jump is not None and e.jump[0] == "chain"]

    def _touch(self, chain):
        if not chain.dirty:
            for i, e in enumerate(chain.entries()):
                e.index = chain.start + i if chain.start is not None else None
            chain.dirty = True
        chain.blob = None

    def insert(self, chain, matches, verdict=RETURN, position=0):
        """A rule into a chain: `matches` (a raw entry up to its target), then a standard target
        with this (negative) verdict."""
        c = self.by_name[chain]
        self._touch(c)
        entry = self.standard_entry(matches, verdict)
        c.rules.insert(position, entry)
        return entry

    def remove(self, chain, entries):
        c = self.by_name[chain]
        self._touch(c)
        doomed = {id(e) for e in entries}
        self._removed.extend(e for e in c.rules if id(e) in doomed and e.index is not None)
        c.rules = [e for e in c.rules if id(e) not in doomed]

    def move(self, source, entries, target):
        """Rules from one chain to the front of another, in their order. Each stays one entry,
        whose count goes on in its new place: not a removal, whose count would end, and an insertion."""
        src, dst = self.by_name[source], self.by_name[target]
        self._touch(src)      # first: the moved entries get their place in the kernel's table
        self._touch(dst)
        moving = {id(e) for e in entries}
        src.rules = [e for e in src.rules if id(e) not in moving]
        dst.rules[0:0] = entries
        if any(e.jump is not None for e in entries):
            dst.special = True      # its verdicts are set at each commit

    def remove_chain(self, name):
        """A user chain and whatever it holds; nothing may jump to it any more."""
        if any(e.jump == ("chain", name) for c in self.chains for e in c.rules):
            raise FirewallError(f"chain {name} is still jumped to")
        c = self.by_name.pop(name)
        self.chains.remove(c)

    def add_chain(self, name):
        """An empty user chain, in its place by name (as libiptc keeps them)."""
        lay = self.lay
        head = bytearray(lay.header + _ERROR_SIZE)
        struct.pack_into("=HH", head, lay.target_offset, lay.header, len(head))
        struct.pack_into("=H29sB32s", head, lay.header, _ERROR_SIZE, b"ERROR", 0, name.encode())
        c = Chain(name, None, Entry(bytes(head)))
        c.tail = self.standard_entry(b"", RETURN)
        c.dirty = True
        users = [i for i, x in enumerate(self.chains) if x.hook is None]
        at = next((i for i in users if self.chains[i].name > name), len(self.chains))
        self.chains.insert(at, c)
        self.by_name[name] = c

    def add_jump(self, chain, matches, target, goto=False):
        """A rule to the end of `chain`: `matches`, a raw entry up to its target (as built by
        python-iptables), then a jump (or goto) to chain `target`."""
        c = self.by_name[chain]
        self._touch(c)
        entry = self.standard_entry(bytes(matches), 0, goto)
        entry.jump = ("chain", target)
        c.rules.append(entry)
        c.special = True

    def standard_entry(self, matches, verdict, goto=False):
        """An entry: `matches` (its bytes up to the target; empty for none), a standard target."""
        lay = self.lay
        raw = bytearray(matches or bytes(lay.header))
        t = len(raw)
        raw += bytes(_STANDARD_SIZE)
        struct.pack_into("=HH", raw, lay.target_offset, t, len(raw))
        struct.pack_into("=I", raw, lay.comefrom, 0)
        struct.pack_into("=QQ", raw, lay.counters, 0, 0)
        if goto:
            raw[lay.flags] |= lay.goto
        struct.pack_into("=H29sBi", raw, t, _STANDARD_SIZE, b"", 0, verdict)
        return Entry(bytes(raw), verdict_at=t + _TARGET_HEADER)

    # --- committing ---------------------------------------------------------------------

    def commit(self):
        """Replace the kernel's table by ours. Returns {Entry: (packets, bytes)}: the final counters
        of the rules removed since the last load or commit."""
        chain_at, at, count = {}, 0, 1       # the trailer counts
        parts, jumping = [b""], []
        for c in self.chains:
            if c.blob is None:
                self._build(c)
            c.at = at
            chain_at[c.name] = at + c.head_len
            at += len(c.blob)
            count += c.n
            parts.append(c.blob)
            if c.patches:
                jumping.append(c)
        parts.append(self.trailer.raw)
        size = at + len(self.trailer.raw)
        hooks, underflows = [0] * _NUMHOOKS, [0] * _NUMHOOKS
        for c in self.chains:
            if c.hook is not None:
                hooks[c.hook] = c.at
                underflows[c.hook] = c.at + len(c.blob) - len(c.tail.raw)
        old = ctypes.create_string_buffer(16 * self.count)
        parts[0] = struct.pack(f"=32s{3 + 2 * _NUMHOOKS + 1}IQ", self.name.encode(), self.valid_hooks, count,
                               size, *hooks, *underflows, self.count, ctypes.addressof(old)).ljust(_REPLACE_HEADER,
                                                                                                   b"\0")
        # One buffer of every chain's bytes (2 MB at 10,000 rules); then the verdicts of jumps are
        # set to where their targets are now.
        replace = bytearray().join(parts)
        # Entries and their verdicts are 8-aligned: set as ints of the buffer, not packed one by one.
        ints = memoryview(replace).cast("i")
        for c in jumping:
            base, start = (_REPLACE_HEADER + c.at) >> 2, c.at
            for rel, target, inside in c.patches:
                ints[base + (rel >> 2)] = start + target if inside else chain_at[target]
        ints.release()
        try:
            _sockopt(self.family, _libc.setsockopt, _SO_SET_REPLACE,
                     (ctypes.c_char * len(replace)).from_buffer(replace), len(replace))
        except OSError as exc:
            if exc.errno == errno.EAGAIN:      # its number of entries is not the one we kept
                raise TableChanged(f"the {self.name} table changed under us") from None
            if exc.errno in (errno.EINVAL, errno.ELOOP):
                raise UnknownLayout(f"the kernel refused the {self.name} table as we made it: {exc.strerror}") from None
            raise FirewallError(f"cannot replace the {self.name} table: {exc.strerror}") from None
        # What each kept entry had counted goes to its new place; new entries start from zero.
        add = ctypes.create_string_buffer(_ADD_HEADER + 16 * count)
        struct.pack_into("=32sI", add, 0, self.name.encode(), count)
        copies = _Copies(ctypes.addressof(add) + _ADD_HEADER, ctypes.addressof(old))
        position = 0
        # A run of unchanged chains, joined here rather than through copies.add(): a table has a
        # thousand chains, and all but a few are unchanged at each commit.
        run_new = run_old = run_n = 0
        for c in self.chains:
            if not c.dirty:
                if run_n and run_old + run_n == c.start and run_new + run_n == position:
                    run_n += c.n
                else:
                    if run_n:
                        copies.add(run_new, run_old, run_n)
                    run_new, run_old, run_n = position, c.start, c.n
            else:
                if run_n:
                    copies.add(run_new, run_old, run_n)
                    run_n = 0
                # New entries keep the buffer's zeros; kept ones, mostly side by side, move in runs.
                for k, e in enumerate(c.entries()):
                    if e.index is not None:
                        copies.add(position + k, e.index, 1)
                c.dirty = False
            c.start = position
            position += c.n
        if run_n:
            copies.add(run_new, run_old, run_n)
        copies.add(position, self.count - 1, 1)     # the trailer
        copies.flush()
        removed = {e: struct.unpack_from("=QQ", old, 16 * e.index) for e in self._removed}
        self.count, self._removed = count, []
        try:
            _sockopt(self.family, _libc.setsockopt, _SO_SET_ADD_COUNTERS, add, _ADD_HEADER + 16 * count)
        except OSError as exc:
            # The new table is in place and the removed rules' counts are read: the commit stands.
            # What the kept rules had counted before it is lost; say so.
            log.error("the %s table was replaced, but the counts of the rules kept in it could not be carried "
                      "over (%s): they count again from zero", self.name, exc.strerror)
        return removed

    def _build(self, chain):
        """A chain's bytes, its number of entries, and where its jumps' verdicts go: (offset in the
        chain, target, inside) with target a chain name, or (inside) an offset in this chain."""
        entries = chain.entries()
        chain.blob = b"".join(e.raw for e in entries)
        chain.n = len(entries)
        chain.head_len = len(chain.head.raw) if chain.head is not None else 0
        patches = []
        if chain.special:
            where, at = {}, 0
            for e in entries:
                where[id(e)] = at
                at += len(e.raw)
            for e in entries:
                if e.jump is None:
                    continue
                kind, target = e.jump
                if kind == "chain":
                    patches.append((where[id(e)] + e.verdict_at, target, False))
                elif id(target) in where:
                    patches.append((where[id(e)] + e.verdict_at, where[id(target)], True))
                else:
                    chain.blob = None
                    raise UnknownLayout(f"the {self.name} table: a rule of {chain.name} goes on to an entry of "
                                        "another chain")
        chain.patches = patches
