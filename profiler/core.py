"""The profiler: one thread that owns the job, process and connection tables.

Capture threads and API handlers never touch the tables; they hand events and
requests to this thread through one queue. Requests carry a Future that the
caller waits on with a timeout. Every pass of the loop handles what is queued,
then makes all the netfilter changes it collected in one batch (the firewall
adapter commits once per address family), then writes the harvested records.
"""
import itertools
import logging
import math
import queue
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from .attribution import Attribution
from .chains import CAPTURE_REPAIRED
from .errors import FirewallError, NotReady, PartialChange, ProfilerError
from .fastpath import FastPath
from .firewall import Counters, RuleSpec
from .model import Connection, Record
from .requests import Requests
from .restart import Restart
from .sockdiag import LIVE_STATES, TCP_STATES

# Sockets looked at per sweep after packets may have been lost (see _check_sockets).
LOSS_CHECK_BUDGET = 2000
# Otherwise, each live connection's socket is looked at once in this many seconds.
BACKGROUND_CHECK_PERIOD = 300.0
BACKGROUND_CHECK_STEP = 10.0   # ...a slice of them this often
# In a backlog of events, the held SYNs are committed and let go after this many, or after this
# many seconds of work, rather than after the whole backlog; with no backlog, at once. Waiting
# for a backlog (fewer, larger commits) took connect() p50 at 2,200 new connections a second from
# 268 to 147 ms; 40 ms rather than 20: 110 against 129 ms at 2,000 (bench/RESULTS.md).
HELD_FLUSH_COUNT = 256
HELD_FLUSH_AFTER = 0.04
# The garbage collector of a full table ends an accepted connection whose socket is gone only this
# many seconds after its rules were committed (it may have no socket until then).
SOCKETLESS_GRACE = 1.0
# Every this many VERIFY_INTERVALs, every rule is read; in between, only the tables' summaries.
FULL_VERIFY_EVERY = 6
# Harvests (rule removals) alone are committed at most this often, unless this many are waiting.
HARVEST_BATCH_WAIT = 0.1
HARVEST_BATCH_MAX = 2000
# Held SYNs remembered until the capture shows their SYN-ACK (those never answered drop out first).
LOCAL_SIDE_MAX = 16384
# A removal that failed (netfilter change refused) is tried again at this many later flushes.
REMOVE_RETRIES = 3

log = logging.getLogger("netprofiler")

HOOK_LOCAL_IN, HOOK_LOCAL_OUT = 1, 3   # netfilter hooks where our SYN hold rules are (mangle INPUT, OUTPUT)


def _loopback(addr):
    return addr.startswith("127.") or addr == "::1" or addr.startswith("::ffff:127.")


class _Request:
    __slots__ = ("name", "args", "future")

    def __init__(self, name, args):
        self.name, self.args, self.future = name, args, Future()


class _Stop:
    pass


class Profiler(Attribution, Restart, Requests, FastPath):
    def __init__(self, config, firewall, processes, sockets, sink, clock, conntrack=None, queue_size=100_000,
                 store=None, labels=None):
        self.store = store
        self._init_fast_path(labels)
        # What the durable store still has to learn, written in the next flush.
        self._dirty_jobs, self._dropped_jobs = set(), set()
        self._dirty_procs, self._dropped_procs = set(), set()
        self._new_records = []
        self._gone_conns = set()
        self._gc_socket_check_at, self._gc_socket_check_found = -math.inf, False
        self._next_verify = 0.0
        self._next_full_verify = 0.0
        self._next_scan = 0.0
        self.config = config
        self.firewall = firewall
        self.processes = processes
        self.sockets = sockets
        self.sink = sink
        self.clock = clock
        self.conntrack = conntrack
        self.jobs = {}
        self.procs = {}        # pid -> TrackedProcess
        self.conns = {}        # key -> Connection
        self._queue = queue.Queue(maxsize=queue_size)
        self._pending_add = {}      # cid -> (Connection, RuleSpec)
        self._pending_remove = {}   # cid -> (Connection, RuleSpec)
        self._held_releases = []
        self._held_since = None      # perf_counter() when the oldest of _held_releases was taken
        self._ifnames = {}
        self._listen_ports = set()
        # cid -> [Connection, attempts, next look (monotonic), end of the accept-queue polling or None]
        self._unresolved = {}
        self._next_background_check = 0.0
        self._remove_failures = {}   # cid -> failed attempts to remove its rules
        self._local_side = {}        # held SYN's 4-tuple -> the side on this host, until its SYN-ACK
        self._not_before = {}        # cid -> capture events older than this are another connection's
        # Connections that took a 4-tuple from one we knew, whose own SYN the capture has not yet
        # delivered: until it does, a FIN or RST without the kernel's timestamp may be the old one's.
        self._await_syn = set()
        self._ended = {}          # cid -> Connection that has ended and waits out CLOSE_LINGER
        self._listener_ours = {}  # listening socket inode -> whether a tracked process holds it
        self._remove_since = None  # monotonic time the oldest waiting removal was first deferred
        self._capture_broken = False  # whether a capture was failing or stopped at the last sweep
        self._received_seen = {}  # interface -> packets its capture had passed at the last sweep
        self._lost_seen = 0       # packets the captures and our queue had lost at the last sweep
        self._loss_check_left = 0  # live connections still to look at since packets were lost
        self._last_owner = {}     # pid -> when it last owned a new connection (a counter)
        self._owner_clock = itertools.count(1)
        self._ids = itertools.count(1)
        # Connection ids stay unique across restarts: rules of an earlier run may still be found.
        self._run_id = f"{int(clock.time()) & 0xFFFFFFF:x}."
        self._thread = None
        self.restarts = 0
        self._next_sweep = 0.0
        self._sweep_cursor = 0
        self.stats = {"events": 0, "events_dropped": 0, "untracked_full": 0, "gc_runs": 0,
                      "harvested": 0, "errors": 0}
        self.capture_status = {}   # interface -> dict, set by the service
        self.capture_stats = dict  # () -> {interface: {received, dropped, if_dropped}}, set by the service
        self.observe_harvest = lambda seconds: None   # set by the metrics
        self._ended_jobs = {}      # job id -> (in bytes, out bytes, when it ended): metrics keep them a while

    # --- thread plumbing ------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._run, name="profiler", daemon=True)
        self._thread.start()

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def submit(self, event):
        """From capture threads: never blocks; a full queue drops and counts."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.stats["events_dropped"] += 1

    def call(self, name, *args, timeout=10.0):
        if not self.running:
            raise NotReady("the profiler is not running")
        req = _Request(name, args)
        try:
            self._queue.put(req, timeout=timeout)
            return req.future.result(timeout=timeout)
        except (queue.Full, FutureTimeout):
            # Not started yet: it never will be, so the caller's 503 tells the truth.
            req.future.cancel()
            raise NotReady(f"the profiler did not answer {name} within {timeout}s") from None

    def stop(self, timeout=30.0):
        """Harvest and log everything still open, remove every rule, end the thread."""
        if not self.running:
            return
        self._queue.put(_Stop())
        self._thread.join(timeout)

    def _run(self):
        self._next_sweep = self.clock.monotonic() + self.config.sweep_interval
        while True:
            due = self._next_sweep
            if self._unresolved:
                due = min(due, min(entry[2] for entry in self._unresolved.values()))
            if self._remove_since is not None:
                due = min(due, self._remove_since + HARVEST_BATCH_WAIT)
            if self._ended:
                due = min(due, self._linger_due())
            wait = max(0.0, due - self.clock.monotonic())
            items = []
            try:
                items.append(self._queue.get(timeout=min(wait, self.config.sweep_interval)))
                while len(items) < 5000:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            stop = False
            for item in items:
                if isinstance(item, _Stop):
                    stop = True
                    continue
                self._handle(item)
                if self._held_releases:
                    # Held SYNs wait for the commit: do not make them wait for the whole backlog too.
                    self._held_since = self._held_since or time.perf_counter()
                    if self._held_due():
                        self._guard(self.flush, False, True)
            if self._unresolved:
                self._guard(self.resolve_accepted)
            if self.clock.monotonic() >= self._next_sweep:
                self._guard(self.sweep)
                self._next_sweep = self.clock.monotonic() + self.config.sweep_interval
            elif self._ended and self.clock.monotonic() >= self._linger_due():
                # Harvest when CLOSE_LINGER is up, not at the next sweep: records come half a
                # second sooner on average, and a burst of closes is not held back for it.
                self._guard(self._harvest_lingered, self.clock.monotonic())
            if stop or not self._held_releases or self._queue.empty() or self._held_due():
                # Otherwise more events wait already: their SYNs share this commit (each rewrites
                # the whole table), which comes HELD_FLUSH_AFTER after the first SYN at the latest.
                self._guard(self.flush, True, True)
            if self._unresolved:
                # The flush released held SYNs: a worker may accept and serve within milliseconds.
                self._guard(self.resolve_accepted)
            if stop:
                self._guard(self.shutdown)
                return

    def _held_due(self):
        """Whether the held SYNs must be committed now, whatever else waits."""
        return (len(self._held_releases) >= HELD_FLUSH_COUNT
                or time.perf_counter() - (self._held_since or 0) >= HELD_FLUSH_AFTER)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except Exception:
            self.stats["errors"] += 1
            log.exception("profiler: %s failed", getattr(fn, "__name__", fn))

    def _handle(self, item):
        if isinstance(item, _Request):
            if not item.future.set_running_or_notify_cancel():
                return
            if self._pending_remove:
                # A connection waiting to be harvested is in neither the live table nor the
                # records: no answer may be computed from that in-between state.
                self._guard(self.flush)
            try:
                result = getattr(self, "req_" + item.name)(*item.args)
                # Durable before the caller hears 200: a crash right after must not lose a registration.
                self._persist()
                item.future.set_result(result)
            except ProfilerError as exc:
                item.future.set_exception(exc)
            except Exception as exc:
                self.stats["errors"] += 1
                log.exception("profiler: request %s failed", item.name)
                item.future.set_exception(exc)
        elif isinstance(item, list):
            self._guard(self.on_held_syns, item)
        else:
            self.stats["events"] += 1
            self._guard(self.on_packet, item)

    # --- packets ---------------------------------------------------------------

    def on_packet(self, ev):
        if ev.syn:
            if self._await_syn:
                for key in ((ev.family, ev.src, ev.sport, ev.dst, ev.dport), (ev.family, ev.dst, ev.dport, ev.src,
                                                                              ev.sport)):
                    conn = self.conns.get(key)
                    if conn is not None:
                        self._await_syn.discard(conn.cid)
            # A held SYN's hook said which side is on this host: the other needs no lookup.
            if ev.ack:   # SYN-ACK: its destination sent the SYN we may have missed
                sides = self._local_side.pop((ev.family, ev.dst, ev.dport, ev.src, ev.sport), None)
                self._maybe_new(ev.interface, ev.family, (ev.dst, ev.dport), (ev.src, ev.sport), held=False,
                                seen=ev.ts, sides=sides)
            else:
                sides = self._local_side.get((ev.family, ev.src, ev.sport, ev.dst, ev.dport))
                self._maybe_new(ev.interface, ev.family, (ev.src, ev.sport), (ev.dst, ev.dport), held=False,
                                seen=ev.ts, sides=sides)
            return
        now = self.clock.monotonic()
        for conn, sent_by_local in self._match(ev.family, ev.src, ev.sport, ev.dst, ev.dport):
            if conn.end_reason:
                continue
            if ev.ts and ev.ts < self._not_before.get(conn.cid, 0.0):
                continue   # the end of the connection that had this 4-tuple before
            if not ev.stamped and conn.cid in self._await_syn:
                # Read from NFLOG after the new SYN was held, but the kernel logged it before: the
                # group hands packets over in order, and this connection's SYN is not through yet.
                continue
            if conn.inode and (ev.rst or (ev.fin and sent_by_local)):
                # Closed by its process (or reset): the next socket will likely get its fd number.
                self.processes.socket_closed(conn.inode)
            elif conn.inode and ev.fin:
                # Closed by the peer: its process will likely close it next, maybe before its FIN
                # gets here, and open another socket in its place (a client's next request).
                self.processes.socket_closing(conn.inode)
            if ev.rst:
                self._end(conn, "reset", now)
            elif ev.fin:
                if conn.cid in self._unresolved:
                    self.resolve_accepted(force=True)
                if sent_by_local:
                    conn.local_fin = True
                else:
                    conn.remote_fin = True
                if conn.local_fin and conn.remote_fin:
                    self._end(conn, "closed", now)

    def _match(self, family, src, sport, dst, dport):
        out = []
        c = self.conns.get((family, src, sport, dst, dport))
        if c:
            out.append((c, True))
        c = self.conns.get((family, dst, dport, src, sport))
        if c:
            out.append((c, False))
        return out

    def submit_held(self, batch):
        """From the SYN queue thread: a batch of held SYNs. Never leaves a SYN held if we cannot take it."""
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.stats["events_dropped"] += len(batch)
            for _, release in batch:
                release()

    def on_held_syns(self, batch):
        """SYNs the kernel holds until we say so: attribute, add rules, release after the commit."""
        for syn, release in batch:
            iface = self._ifname(syn.ifindex)
            initiator, responder = (syn.src, syn.sport), (syn.dst, syn.dport)
            for key in ((syn.family, syn.src, syn.sport, syn.dst, syn.dport),
                        (syn.family, syn.dst, syn.dport, syn.src, syn.sport)):
                conn = self.conns.get(key)
                if conn is not None and not conn.end_reason:
                    # Seen first by the capture (it sees inbound SYNs before netfilter does): its
                    # rules are committed before this SYN, the first packet, is let through.
                    conn.rules_before_first_packet = True
            # Held in OUTPUT, the SYN was sent by a local socket; held in INPUT, it is for one: only
            # that side can be ours, unless both ends are on this host. A socket lookup saved a SYN.
            both = syn.src == syn.dst or _loopback(syn.src) or _loopback(syn.dst)
            sides = None if both else ("outgoing" if syn.hook == HOOK_LOCAL_OUT else
                                       "incoming" if syn.hook == HOOK_LOCAL_IN else None)
            self._maybe_new(iface, syn.family, initiator, responder, held=True, sides=sides)
            if sides is not None:
                # The capture sees this SYN and its SYN-ACK too: only this side can be ours.
                self._local_side[(syn.family, syn.src, syn.sport, syn.dst, syn.dport)] = sides
                if len(self._local_side) > LOCAL_SIDE_MAX:   # SYNs never answered
                    del self._local_side[next(iter(self._local_side))]
            # Only now: a flush inside _maybe_new (the GC's) must not let this SYN go before its rules.
            self._held_releases.append(release)

    def _ifname(self, ifindex):
        if "any" in self.config.interfaces or not ifindex:
            return None
        name = self._ifnames.get(ifindex)
        if name is None:
            try:
                name = self._ifnames[ifindex] = socket.if_indextoname(ifindex)
            except OSError:
                return None
        return name if name in self.config.interfaces else None

    def _maybe_new(self, interface, family, initiator, responder, held, seen=None, sides=None):
        """A connection from `initiator` to `responder` starts; track the side(s) that are ours.

        `seen`: when the capture saw its SYN (the connection's start, for a SYN that was not held).
        `sides`: "outgoing" or "incoming" when only that side can be on this host."""
        for local, remote, outgoing in ((initiator, responder, True), (responder, initiator, False)):
            if sides is not None and sides != ("outgoing" if outgoing else "incoming"):
                continue
            key = (family, local[0], local[1], remote[0], remote[1])
            existing = self.conns.get(key)
            replaced = False
            if existing is not None:
                if not existing.end_reason and not (held and self._new_socket(family, local, remote, existing)):
                    continue   # a retransmitted SYN, or the SYN-ACK of a connection we know
                # The 4-tuple is in use again: the connection that had it is over, whatever is left
                # of its CLOSE_LINGER (or its FINs still wait in the capture's queue). Harvested
                # now (its rules go before the new ones come), so that the new connection gets a
                # record of its own.
                self._harvest([existing], reason="closed")
                replaced = True
            owner, inode = self._owner(family, local, remote, outgoing)
            if owner is None:
                continue
            iface = interface or self._interface_for(local[0])
            if iface is None:
                continue
            conn = Connection(
                cid=f"{self._run_id}{next(self._ids):x}", job=owner.job, pid=owner.pid, interface=iface, family=family,
                local=local[0], lport=local[1], remote=remote[0], rport=remote[1], outgoing=outgoing,
                opened=seen or self.clock.time(), rules_before_first_packet=held, inode=inode,
                pid_source="socket" if outgoing else "listener")
            self.conns[key] = conn
            if replaced:
                # FINs and RSTs of the connection that had this 4-tuple before, captured before now
                # but not yet handled, must not end this one.
                self._not_before[conn.cid] = self.clock.time()
                if held and iface != "lo":
                    # Its SYN is held: the capture delivers it (logged after the hold going out,
                    # before it coming in, and handed over in batches, so later than the held
                    # one) after every packet logged before. On lo packets are logged going out
                    # only: an inbound SYN's copy may come first.
                    self._await_syn.add(conn.cid)
            if not outgoing:
                # The listener's owner may not be the process that accepts: workers forked after
                # listen() share the socket. Look again once the connection has been accepted.
                self._unresolved[conn.cid] = [conn, 0, self.clock.monotonic(), None]
            self._want_rules(conn)

    def _new_socket(self, family, local, remote, conn):
        """Whether the local socket of this 4-tuple is another than `conn`'s (the 4-tuple was freed
        and taken again before we saw the old connection end)."""
        if not conn.inode:
            return False
        info = self.sockets.get(family, local[0], local[1], remote[0], remote[1])
        return info is not None and info.inode != 0 and info.inode != conn.inode

    def _interface_for(self, local_ip):
        ifaces = self.config.interfaces
        if len(ifaces) == 1:
            return ifaces[0]
        if "lo" in ifaces and (local_ip.startswith("127.") or local_ip == "::1"):
            return "lo"
        return None

    # --- rules, harvest, GC ------------------------------------------------------

    def _spec(self, conn):
        return RuleSpec(conn.cid, conn.interface, conn.family, conn.local, conn.lport, conn.remote, conn.rport,
                        conn.pid, conn.job)

    def _want_rules(self, conn):
        if self.firewall.rule_count + 2 * (len(self._pending_add) + 1) > self.config.rules_threshold:
            self.collect_garbage()
        if self.firewall.rule_count + 2 * (len(self._pending_add) + 1) > self.config.rules_threshold:
            self.stats["untracked_full"] += 1
            log.warning("rule table full (%d rules, RULES_THRESHOLD %d): connection %s:%s -> %s:%s of job %s "
                        "pid %s is untracked", self.firewall.rule_count, self.config.rules_threshold,
                        conn.local, conn.lport, conn.remote, conn.rport, conn.job, conn.pid)
            self.conns.pop(conn.key, None)
            job = self.jobs.get(conn.job)
            if job is not None:
                job.untracked += 1   # its totals can no longer claim to be complete
            return
        self._pending_add[conn.cid] = (conn, self._spec(conn))

    def collect_garbage(self):
        """Reclaim the rules of ended connections and of exited processes, harvesting them first."""
        self.stats["gc_runs"] += 1
        now = self.clock.monotonic()
        self._check_processes(now)
        ended = [c for c in self.conns.values() if c.end_reason]
        if not ended and (self._gc_socket_check_found or now >= self._gc_socket_check_at + self.config.sweep_interval):
            ended = self._end_socketless(now)
        self._harvest(ended)
        self.flush()
        log.info("garbage collector reclaimed %d connections; %d rules installed", len(ended),
                 self.firewall.rule_count)

    def _end(self, conn, reason, now):
        conn.end_reason = reason
        conn.ended_mono = now
        # Harvested from here (not from every connection), in order of ending: at the end, always.
        self._ended.pop(conn.cid, None)
        self._ended[conn.cid] = conn

    def _harvest(self, conns, reason=None):
        for conn in conns:
            if reason and not conn.end_reason:
                conn.end_reason = reason
            self.conns.pop(conn.key, None)
            self._ended.pop(conn.cid, None)
            self._unresolved.pop(conn.cid, None)
            self._not_before.pop(conn.cid, None)
            self._await_syn.discard(conn.cid)
            if conn.cid in self._pending_add:
                # Never committed: nothing to read or remove.
                del self._pending_add[conn.cid]
                self._record(conn, Counters(), committed=False)
            else:
                self._pending_remove[conn.cid] = (conn, self._spec(conn))

    def _update_hold(self):
        uids = {p.ident.uid for p in self.procs.values()}
        try:
            self.firewall.set_hold(uids, self._listen_ports if self.procs else ())
        except FirewallError as exc:
            log.error("cannot update the SYN hold rules: %s", exc)

    def _save_connections(self, conns):
        """Their state into the store now (an incomplete mark a crash must not erase)."""
        try:
            self._persist(new_conns=conns)
        except Exception:
            log.exception("cannot write the durable state")

    def _persist(self, new_conns=(), gone_conns=()):
        """One transaction: what must be durable before the rules of `new_conns` are installed."""
        if self.store is None:
            self._dirty_jobs.clear(), self._dropped_jobs.clear(), self._dirty_procs.clear()
            self._dropped_procs.clear()
            return
        # Kept until written: a connection left in the store would come back after a restart and
        # be recorded a second time, over its first record.
        self._gone_conns.update(gone_conns)
        if not (self._dirty_jobs or self._dropped_jobs or self._dirty_procs or self._dropped_procs
                or self._new_records or new_conns or self._gone_conns):
            return
        with self.store.batch():
            for job_id in self._dirty_jobs - self._dropped_jobs:
                if job_id in self.jobs:
                    self.store.put_job(self.jobs[job_id])
            for pid in self._dirty_procs - self._dropped_procs:
                if pid in self.procs:
                    self.store.put_process(self.procs[pid])
            for pid in self._dropped_procs:
                if pid not in self.procs:
                    self.store.drop_process(pid)
            self.store.put_connections(new_conns)
            self.store.drop_connections(sorted(self._gone_conns))
            self.store.put_records([r for r in self._new_records if r.job in self.jobs])
            for job_id in self._dropped_jobs:
                if job_id not in self.jobs:
                    self.store.drop_job(job_id)
        self._dirty_jobs.clear(), self._dropped_jobs.clear(), self._dirty_procs.clear()
        self._dropped_procs.clear(), self._new_records.clear(), self._gone_conns.clear()

    def flush(self, defer_harvest=False, for_held=False):
        """Commit what is pending. With `defer_harvest`, removals alone wait up to HARVEST_BATCH_WAIT
        to share a commit with others: each commit rewrites the whole table, and a closed
        connection's counters no longer move. With `for_held` (the loop's flushes, never one whose
        caller needs the harvest done: EndProfile, the garbage collector), removals in a table no
        new rule goes in wait for the next flush, so that held SYNs do not wait for them."""
        if defer_harvest and self._pending_remove and not self._pending_add and not self._held_releases:
            now = self.clock.monotonic()
            if self._remove_since is None:
                self._remove_since = now
            if now - self._remove_since < HARVEST_BATCH_WAIT and len(self._pending_remove) < HARVEST_BATCH_MAX:
                return
        since, self._remove_since = self._remove_since, None
        self._update_hold()
        adds = list(self._pending_add.values())
        removes = list(self._pending_remove.values())
        releases, self._held_releases = self._held_releases, []
        self._held_since = None
        self._pending_add, self._pending_remove = {}, {}
        if (for_held and releases and removes
                and (since is None or self.clock.monotonic() - since < HARVEST_BATCH_WAIT)):
            # Held SYNs wait for the commits of the tables their rules go in, not for another
            # table's harvest: that one waits for the next flush, HARVEST_BATCH_WAIT at most. Never
            # a pair whose 4-tuple a new connection takes: it must be gone before the new one counts.
            groups = {self.firewall.commit_group(s) for _, s in adds}
            taken = {c.key for c, _ in adds}
            later = {c.cid: (c, s) for c, s in removes
                     if self.firewall.commit_group(s) not in groups and c.key not in taken}
            if later:
                self._pending_remove = later
                self._remove_since = since if since is not None else self.clock.monotonic()
                removes = [(c, s) for c, s in removes if c.cid not in later]
        harvested = {}
        started = time.perf_counter()
        try:
            self._admit_late([c for c, _ in adds if not c.rules_before_first_packet])
            self._persist(new_conns=[c for c, _ in adds])
            if adds or removes:
                harvested = self.firewall.apply([s for _, s in adds], [s for _, s in removes])
            now = self.clock.time()
            for conn, _ in adds:
                conn.rules_installed = True
                conn.rules_at = now
        except FirewallError as exc:
            # Some tables' commits may have been made (PartialChange): those connections' rules are
            # in place, or harvested, all the same.
            done, harvested = (exc.done, exc.harvested) if isinstance(exc, PartialChange) else (set(), {})
            now = self.clock.time()
            failed = [(c, s) for c, s in adds if c.cid not in done]
            log.error("netfilter change failed, %d new connections stay without rules: %s", len(failed), exc)
            for conn, _ in adds:
                if conn.cid in done:
                    conn.rules_installed = True
                    conn.rules_at = now
                else:
                    conn.rules_before_first_packet = False
            # Their rules are still counting: read and remove them at the next flush, a few times
            # before recording them without (a lock held for good by another program).
            retry = [(c, s) for c, s in removes
                     if c.cid not in done and self._remove_failures.get(c.cid, 0) < REMOVE_RETRIES]
            for conn, spec in retry:
                self._remove_failures[conn.cid] = self._remove_failures.get(conn.cid, 0) + 1
                self._pending_remove[conn.cid] = (conn, spec)
            removes = [(c, s) for c, s in removes if c.cid not in self._pending_remove]
        finally:
            for release in releases:
                release()
        records = []
        self._check_labels([c for c, _ in removes if c.rules_before_first_packet])
        for conn, _ in removes:
            self._remove_failures.pop(conn.cid, None)
            records.append(self._record(conn, harvested.get(conn.cid), committed=True, write=False))
        self._write(records)
        try:
            self._persist(gone_conns=[c.cid for c, _ in removes])
        except Exception:
            log.exception("cannot write the durable state")
        if removes:
            self.observe_harvest(time.perf_counter() - started)

    def _write(self, records):
        if not records:
            return
        try:
            self.sink.write_many(records)
        except Exception:
            log.exception("cannot write the records of connections %s", ", ".join(r.cid for r in records))

    def _record(self, conn, counters, committed, write=True):
        """Rule counters are exact when the rules existed before the first packet passed.
        Otherwise conntrack, which counts from the first packet, supplies the count."""
        complete = (conn.rules_before_first_packet and counters is not None and committed
                    and not conn.incomplete_reason)
        if complete and (counters.out_packets if conn.outgoing else counters.in_packets) == 0:
            complete = False   # rules that were first would have counted the SYN: they came late
        source, note = "rules", conn.incomplete_reason
        if counters is None:
            counters, note = Counters(), "rules vanished before they were read"
        elif counters.one_side_missing:
            complete = False
            note = note or "one of its two rules was removed by another program"
        if not complete and self.conntrack is not None and self._ct_can_complete(conn):
            ct = self._conntrack_counts(conn)
            if ct is not None and ct.in_bytes >= counters.in_bytes and ct.out_bytes >= counters.out_bytes:
                counters, complete, source, note = ct, True, "conntrack", ""
        if not complete and not note:
            note = "rules were installed after the connection's first packets; no conntrack entry to complete them"
        if not complete and conn.rules_at and not conn.rules_before_first_packet:
            # How much may be missing: whatever the connection sent in this window before its rules.
            note += f"; uncounted: the first {max(0.0, conn.rules_at - conn.opened) * 1000:.1f} ms"
        rec = self._make_record(conn, counters, complete, source, note)
        self.stats["harvested"] += 1
        self._count_for_job(rec)
        if write:
            self._write([rec])
        return rec

    def _count_for_job(self, rec):
        """The record into its job's totals, and kept (in the store, or in memory without one)."""
        job = self.jobs.get(rec.job)
        if job is not None:
            job.count(rec)
            if self.store is None:
                job.records.append(rec)
            else:
                self._new_records.append(rec)

    def _make_record(self, conn, counters, complete, source, note, reason=None, open_now=False):
        return Record(conn.cid, conn.job, conn.pid, conn.interface, conn.family, conn.local, conn.lport,
                      conn.remote, conn.rport, conn.outgoing, counters.in_bytes, counters.in_packets,
                      counters.out_bytes, counters.out_packets, conn.opened, self.clock.time(),
                      reason or conn.end_reason or "unknown", complete, source,
                      open_at_end=open_now or conn.end_reason in ("EndProfile", "EndProcessProfile", "shutdown"),
                      note=note, pid_source=conn.pid_source)

    def _conntrack_counts(self, conn):
        try:
            if conn.outgoing:
                ct = self.conntrack.get(conn.family, conn.local, conn.lport, conn.remote, conn.rport)
            else:
                ct = self.conntrack.get(conn.family, conn.remote, conn.rport, conn.local, conn.lport)
        except Exception as exc:
            log.debug("conntrack lookup failed: %s", exc)
            return None
        if ct is None:
            return None
        if conn.outgoing:
            return Counters(ct.reply_packets, ct.reply_bytes, ct.orig_packets, ct.orig_bytes)
        return Counters(ct.orig_packets, ct.orig_bytes, ct.reply_packets, ct.reply_bytes)

    # --- sweep: exited processes, lingering and vanished connections ---------------

    def sweep(self):
        now = self.clock.monotonic()
        if now >= self._next_verify:
            self._next_verify = now + self.config.verify_interval
            self.verify_rules()
        self._check_processes(now)
        self._check_sockets(now)
        if now >= self._next_scan:
            # Walking every tracked process's children and descriptors costs with the job count:
            # not at every sweep. A fork in between is found when it opens a connection anyway.
            self._next_scan = now + max(self.config.sweep_interval, 2.0)
            self._scan_listeners()
        self._harvest_lingered(now)

    def _linger_due(self):
        """When the connection that ended first has lingered long enough (_ended is in order of ending)."""
        return next(iter(self._ended.values())).ended_mono + self.config.close_linger

    def _harvest_lingered(self, now):
        done = []
        for conn in self._ended.values():
            if now - conn.ended_mono < self.config.close_linger:
                break
            done.append(conn)
        self._harvest(done)

    def _end_socketless(self, now):
        """Connections whose socket the kernel no longer has (their FINs may still wait in our
        queue): ended, for a full table to take new ones. One dump of the live sockets, at most
        once a sweep interval unless the last one found some."""
        states = sum(1 << n for n, name in TCP_STATES.items() if name in LIVE_STATES)
        live = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                infos = self.sockets.dump(family, states=states)
            except OSError as exc:
                log.warning("cannot list the sockets for the garbage collector: %s", exc)
                return []
            for info in infos:
                live.add((family, info.local, info.lport, info.remote, info.rport))
                if family == socket.AF_INET6 and info.local.startswith("::ffff:"):   # dual-stack socket
                    live.add((socket.AF_INET, info.local[7:], info.lport, info.remote[7:], info.rport))
        # Only connections whose rules are committed. An outgoing one has had its socket since its
        # connect(); an accepted one may have none for a while (its SYN held on the way in, or
        # syncookies until the handshake ends): it waits SOCKETLESS_GRACE after its rules.
        settled = self.clock.time() - SOCKETLESS_GRACE
        ended = [c for c in self.conns.values() if not c.end_reason and c.rules_installed
                 and c.cid not in self._pending_add and (c.outgoing or c.rules_at <= settled)
                 and c.key not in live]
        for conn in ended:
            self._end(conn, "closed", now)
        self._gc_socket_check_at, self._gc_socket_check_found = now, bool(ended)
        return ended

    def _check_processes(self, now):
        for pid, tracked in list(self.procs.items()):
            if self.processes.alive(tracked.ident):
                continue
            del self.procs[pid]
            self.processes.forget(pid)
            self._last_owner.pop(pid, None)
            self._dropped_procs.add(pid)
            for conn in self.conns.values():
                if conn.pid == pid and not conn.end_reason:
                    self._end(conn, "process exit", now)

    def _check_sockets(self, now):
        """Connections whose FIN or RST we never saw: the kernel says their socket is gone.

        Packets are lost only when a capture drops some, fails or reopens, or our queue overflows;
        then every live connection is looked at, LOSS_CHECK_BUDGET a sweep. Otherwise each is looked
        at once every BACKGROUND_CHECK_PERIOD, a slice every BACKGROUND_CHECK_STEP: a socket may also
        vanish silently (timed out), but its count is final by then, only its record comes later;
        at 10,000 live connections that is a few hundred lookups every 10 s, not thousands a sweep."""
        if self._packets_lost():
            self._loss_check_left = len(self.conns)
        if self._loss_check_left <= 0 and now < self._next_background_check:
            return
        live = [c for c in self.conns.values() if not c.end_reason]
        if not live:
            return
        if self._loss_check_left > 0:
            budget = min(LOSS_CHECK_BUDGET, self._loss_check_left)
            self._loss_check_left -= budget
        else:
            step = max(self.config.sweep_interval, BACKGROUND_CHECK_STEP)
            self._next_background_check = now + step
            budget = math.ceil(len(live) * step / BACKGROUND_CHECK_PERIOD)
        start = self._sweep_cursor % len(live)
        for conn in (live[start:] + live[:start])[:budget]:
            if now - conn.ended_mono < 0 or self.clock.time() - conn.opened < self.config.close_linger:
                continue
            info = self.sockets.get(conn.family, conn.local, conn.lport, conn.remote, conn.rport)
            if info is None or info.state not in LIVE_STATES or (info.state == "LISTEN"):
                self._end(conn, "closed", now)
        self._sweep_cursor = start + budget

    def _packets_lost(self):
        """True when a FIN or RST may have been lost since the last look."""
        try:
            stats = self.capture_stats()
        except Exception:
            stats = {}
        lost = self.stats["events_dropped"] + sum(s.get("dropped", 0) + s.get("if_dropped", 0)
                                                  for s in stats.values())
        broken = (any("error" in s for s in stats.values())
                  or any(not st.get("capturing", True) for st in self.capture_status.values()))
        received = {iface: s.get("received", 0) for iface, s in stats.items()}
        # A capture that reopened counts from 0 again: whatever passed meanwhile went unseen.
        reopened = any(n < self._received_seen.get(iface, 0) for iface, n in received.items())
        changed = lost != self._lost_seen
        # Once when a capture stops and once when it runs again, not at every sweep in between.
        turned = broken != self._capture_broken
        self._lost_seen, self._received_seen, self._capture_broken = lost, received, broken
        return changed or turned or reopened

    def verify_rules(self):
        """Another program may flush, delete or reorder our rules: notice, repair, and say so."""
        now = self.clock.monotonic()
        full = now >= self._next_full_verify
        if full:
            self._next_full_verify = now + FULL_VERIFY_EVERY * self.config.verify_interval
        fixes, missing = self.firewall.verify(full=full)
        if not fixes:
            return
        self.stats["repairs"] = self.stats.get("repairs", 0) + 1
        log.warning("our netfilter rules were changed by another program and are repaired: %s",
                    "; ".join(fixes))
        # Those already harvested but whose rules are not removed yet too: their record is still to come.
        affected = [c for c in list(self.conns.values()) + [c for c, _ in self._pending_remove.values()]
                    if c.cid in missing]
        for conn in affected:
            conn.incomplete_reason = ("its rules (both, or one of them) were removed or bypassed by another "
                                      "program: what they would have counted until the repair is missing")
        if affected:
            # Durable: after a restart their rules, repaired, would otherwise read as complete.
            self._save_connections(affected)
        if any(CAPTURE_REPAIRED in fix for fix in fixes):
            # SYNs, FINs and RSTs passed unseen while the capture's rules were gone: look at every socket.
            self._loss_check_left = len(self.conns)

    def _scan_listeners(self, pids=None):
        """Local ports that tracked processes listen on: their inbound SYNs are held too.

        With `pids` (a new registration), those processes' and their descendants' descriptors are
        read. Otherwise only listening sockets not seen before are looked for among the tracked
        processes; whether a listener is ours is remembered for as long as it listens, so a
        periodic scan costs one sock_diag dump of the listeners, not a walk of every descriptor."""
        if not self.procs:
            self._listen_ports = set()
            self._listener_ours.clear()
            return
        listeners = [info for family in (socket.AF_INET, socket.AF_INET6)
                     for info in self.sockets.dump(family, states=1 << 10)]
        if pids is not None:
            inodes = set()
            for pid in self._descendants_of(pids):
                inodes |= self.processes.cached_socket_inodes(pid)
            for info in listeners:
                if info.inode in inodes:
                    self._listener_ours[info.inode] = True
        else:
            self._adopt_descendants()
            for info in listeners:
                if info.inode not in self._listener_ours:
                    known = [p.pid for p in self.procs.values() if p.ident.uid == info.uid]
                    self._listener_ours[info.inode] = bool(known) and \
                        self.processes.owner_of(info.inode, known) is not None
        live = {info.inode for info in listeners}
        for inode in [i for i in self._listener_ours if i not in live]:
            del self._listener_ours[inode]
        self._listen_ports = {info.lport for info in listeners if self._listener_ours.get(info.inode)}

    def shutdown(self):
        live = list(self.conns.values())
        self._harvest(live, reason="shutdown")
        self.flush()
        try:
            leftovers = self.firewall.teardown()
            if leftovers:
                log.warning("teardown found %d rule pairs not harvested", len(leftovers))
        except FirewallError as exc:
            log.error("cannot remove our chains at shutdown: %s", exc)
