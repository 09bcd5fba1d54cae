"""Fakes of the adapters, for unit tests of the profiler's pure logic."""
import socket
from dataclasses import dataclass

from profiler.errors import FirewallError, NotFound, PartialChange
from profiler.firewall import Counters
from profiler.proctable import ProcessIdentity
from profiler.sockdiag import ALL_STATES, LISTEN_STATES, TCP_STATES, SocketInfo


class FakeFirewall:
    def __init__(self):
        self.installed = {}      # cid -> RuleSpec
        self.counters = {}       # cid -> Counters, set by tests as "traffic"
        self.commits = 0
        self.hold = (frozenset(), frozenset())
        self.fail_next = False
        self.order = []          # ("commit", cids) / ("release", n) to check ordering
        self.removed_by_other = set()
        self.group_of = lambda spec: spec.family     # which specs share a commit (one table)
        self.partial = None      # (done cids, harvested) for the next apply to raise PartialChange with
        self.found = set()       # cids whose rules setup() finds in place
        self.usable = [socket.AF_INET, socket.AF_INET6]     # families whose table exists
        self.table = "filter"

    @property
    def rule_count(self):
        return 2 * len(self.installed)

    def setup(self, keep=None, families=None):
        self.families = families
        self.installed.update({cid: spec for cid, spec in (keep or {}).items() if cid in self.found})
        return []

    def usable_families(self, families=(socket.AF_INET, socket.AF_INET6)):
        self.looked_at = list(families)
        return [f for f in self.usable if f in families]

    def rule_keys(self, spec):
        return (spec.family, spec.local, spec.lport, spec.remote, spec.rport)

    def holder_of(self, spec, keys=None):
        keys = keys or self.rule_keys(spec)
        return next((cid for cid, s in self.installed.items() if self.rule_keys(s) == keys), None)

    def installed_spec(self, cid):
        return self.installed[cid]

    def holds(self, cid):
        return cid in self.installed

    def commit_group(self, spec):
        return self.group_of(spec)

    def apply(self, add=(), remove=(), keys=None):
        if self.partial is not None:
            done, harvested = self.partial
            self.partial = None
            for spec in add:
                if spec.cid in done:
                    self.installed[spec.cid] = spec
            for spec in remove:
                if spec.cid in done:
                    self.installed.pop(spec.cid, None)
            raise PartialChange("injected failure in one table", done, harvested)
        if self.fail_next:
            self.fail_next = False
            raise FirewallError("injected failure")
        self.commits += 1
        self.order.append(("commit", [s.cid for s in add]))
        out = {}
        for spec in remove:
            if spec.cid in self.installed:
                del self.installed[spec.cid]
                out[spec.cid] = self.counters.pop(spec.cid, Counters())
        for spec in add:
            self.installed[spec.cid] = spec
        return out

    def read(self, specs):
        return {s.cid: self.counters.get(s.cid, Counters()) for s in specs if s.cid in self.installed}

    def verify(self, full=True):
        gone = {cid for cid in self.removed_by_other if cid in self.installed}
        self.removed_by_other = set()
        return ([f"{len(gone)} connections' rules were removed"] if gone else []), gone

    def earlier_fast_path(self):
        return None        # no earlier run's fast path

    def set_hold(self, uids, ports):
        self.hold = (frozenset(uids), frozenset(ports))

    def teardown(self):
        left = {cid: self.counters.get(cid, Counters()) for cid in self.installed}
        self.installed.clear()
        return left


class FakeProcesses:
    def __init__(self):
        self.procs = {}          # pid -> ProcessIdentity
        self.kids = {}           # pid -> [pids]
        self.sockets = {}        # pid -> set(inode)
        self.closed_inodes = []  # what the profiler reported closed (socket_closed)
        self.closing_inodes = []  # sockets whose peer closed first (socket_closing)
        self.forgotten = []      # pids the profiler said have exited (forget)

    def add(self, pid, uid=1000, user="alice", create_time=1_000.0, parent=None, inodes=()):
        self.procs[pid] = ProcessIdentity(pid, uid, user, create_time)
        self.sockets[pid] = set(inodes)
        if parent is not None:
            self.kids.setdefault(parent, []).append(pid)
        return self.procs[pid]

    def kill(self, pid):
        self.procs.pop(pid, None)

    def identity(self, pid):
        if pid not in self.procs:
            raise NotFound(f"no process with pid {pid}")
        return self.procs[pid]

    def alive(self, ident):
        p = self.procs.get(ident.pid)
        return p is not None and p.create_time == ident.create_time

    def children(self, pid):
        return [c for c in self.kids.get(pid, []) if c in self.procs]

    def socket_inodes(self, pid):
        return set(self.sockets.get(pid, ()))

    def cached_socket_inodes(self, pid):
        return self.socket_inodes(pid)

    def socket_closed(self, inode):
        self.closed_inodes.append(inode)

    def socket_closing(self, inode):
        self.closing_inodes.append(inode)

    def forget(self, pid):
        self.forgotten.append(pid)

    def owner_of(self, inode, pids):
        for pid in pids:
            if inode in self.sockets.get(pid, ()):
                return pid
        return None


class FakeSockets:
    def __init__(self):
        self.table = {}          # (family, local, lport, remote, rport) -> SocketInfo
        self.listeners = {}      # (family, local, lport) -> SocketInfo

    def connect(self, local, lport, remote, rport, uid=1000, inode=1, state="SYN_SENT", family=socket.AF_INET):
        self.table[(family, local, lport, remote, rport)] = SocketInfo(family, state, local, lport, remote, rport,
                                                                       uid, inode)

    def listen(self, local, lport, uid=1000, inode=1, family=socket.AF_INET):
        self.listeners[(family, local, lport)] = SocketInfo(family, "LISTEN", local, lport, "0.0.0.0", 0, uid,
                                                            inode)

    def close(self, local, lport, remote, rport, family=socket.AF_INET):
        self.table.pop((family, local, lport, remote, rport), None)

    def get(self, family, local, lport, remote, rport):
        return self.table.get((family, local, lport, remote, rport))

    def listener(self, family, local, lport):
        return self.listeners.get((family, local, lport)) or self.listeners.get((family, "0.0.0.0", lport))

    def dump(self, family, states=ALL_STATES):
        numbers = {name: n for n, name in TCP_STATES.items()}
        out = [i for k, i in self.listeners.items() if k[0] == family] if states & LISTEN_STATES else []
        return out + [i for k, i in self.table.items() if k[0] == family and states & (1 << numbers[i.state])]


class ListSink:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def write_many(self, records):
        self.records.extend(records)

    def close(self):
        pass


@dataclass(frozen=True)
class Ev:
    """A TcpEvent as the capture makes it."""
    interface: str
    ts: float
    family: int
    src: str
    sport: int
    dst: str
    dport: int
    flags: int
    stamped: bool = True

    syn = property(lambda self: bool(self.flags & 0x02))
    ack = property(lambda self: bool(self.flags & 0x10))
    fin = property(lambda self: bool(self.flags & 0x01))
    rst = property(lambda self: bool(self.flags & 0x04))


SYN, SYNACK, FIN, RST, ACK = 0x02, 0x12, 0x11, 0x04, 0x10
