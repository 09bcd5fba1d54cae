"""The profiler's tables: jobs, tracked processes, connections, and records."""
import ipaddress
import socket
from dataclasses import dataclass, field, fields


@dataclass
class TrackedProcess:
    ident: object            # proctable.ProcessIdentity
    job: str
    registered: bool         # named in StartProfile (else found as a descendant)
    root: int                # the registered PID it descends from

    @property
    def pid(self):
        return self.ident.pid


@dataclass
class Job:
    job_id: str
    started: float
    roots: set = field(default_factory=set)
    cgroup: str = ""        # membership by cgroup: the directory whose processes all belong
    untracked: int = 0      # connections left without rules because the rule table was full
    owner_uid: int = -1     # uid of the first registered process: who may end the job from the unix socket
    # Harvested connections: how many, and their bytes. Their records live in the durable store
    # when there is one (a job may close hundreds of thousands of connections before its
    # EndProfile; kept here they cost about 600 bytes each), else in `records`.
    harvested: int = 0
    harvested_in: int = 0
    harvested_out: int = 0
    records: list = field(default_factory=list)

    def count(self, record):
        self.harvested += 1
        self.harvested_in += record.in_bytes
        self.harvested_out += record.out_bytes


@dataclass
class Connection:
    cid: str
    job: str
    pid: int
    interface: str
    family: int
    local: str
    lport: int
    remote: str
    rport: int
    outgoing: bool           # the tracked side sent the first SYN
    opened: float            # wall clock, first seen
    rules_before_first_packet: bool = False
    rules_installed: bool = False
    local_fin: bool = False
    remote_fin: bool = False
    end_reason: str = ""     # closed, reset, process exit, ... once it has ended
    ended_mono: float = 0.0
    incomplete_reason: str = ""   # why the rules may have missed bytes (removed by another program, ...)
    rules_at: float = 0.0    # wall clock when its rules were committed
    # How `pid` was found: "socket" (it held the connection's socket), or "listener" (an accepted
    # connection whose accepting process was never seen: the pid holds the listening socket).
    pid_source: str = "socket"
    inode: int = 0           # its socket, once seen held by the process (0: not seen)
    # Its conntrack entry was made mid-stream (fast path: after a flush): its count misses the start.
    ct_unusable: bool = False

    @property
    def key(self):
        return (self.family, self.local, self.lport, self.remote, self.rport)


@dataclass(frozen=True)
class Record:
    """One harvested connection: what the log, the API and the JSON form show."""
    cid: str
    job: str
    pid: int
    interface: str
    family: int
    local: str
    lport: int
    remote: str
    rport: int
    outgoing: bool
    in_bytes: int
    in_packets: int
    out_bytes: int
    out_packets: int
    start: float
    end: float
    reason: str
    complete: bool
    source: str              # where the count comes from: rules or conntrack
    open_at_end: bool = False
    note: str = ""
    pid_source: str = "socket"

    def to_json(self):
        # Not asdict(): it deep-copies every field, and a record is made into JSON for the state
        # store and the API, thousands a second.
        d = {name: getattr(self, name) for name in _RECORD_FIELDS}
        d["family"] = "ipv4" if self.family == 2 else "ipv6"
        return d

    @classmethod
    def from_json(cls, d):
        return cls(**{**d, "family": socket.AF_INET if d["family"] == "ipv4" else socket.AF_INET6})


_RECORD_FIELDS = tuple(f.name for f in fields(Record))


def is_internal(address, networks):
    if not networks:
        return False
    ip = ipaddress.ip_address(address)
    return any(ip.version == net.version and ip in net for net in networks)


def totals(records, internal_networks=(), untracked=0):
    """Sums over records (or live snapshots), split by whether the remote side is internal."""
    split = {"internal": {"in_bytes": 0, "out_bytes": 0}, "external": {"in_bytes": 0, "out_bytes": 0}}
    for r in records:
        side = split["internal" if is_internal(r.remote, internal_networks) else "external"]
        side["in_bytes"] += r.in_bytes
        side["out_bytes"] += r.out_bytes
    return {
        "connections": len(records),
        "in_bytes": sum(r.in_bytes for r in records),
        "out_bytes": sum(r.out_bytes for r in records),
        "complete": untracked == 0 and all(r.complete for r in records),
        "untracked_connections": untracked,
        **split,
    }
