"""Which tracked process owns a socket: known members first, the job's process trees when needed.

A mixin of the Profiler: it runs on the profiler thread and uses its tables.
"""
from .errors import NotFound
from .model import TrackedProcess

# Pauses between looks for the process that accepted an inbound connection: dense at first,
# because a forked worker may serve a short connection within milliseconds.
RESOLVE_DELAYS = (0.001, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.5)
# While the connection waits to be accepted (or its SYN is still held), look this often, for this long.
ACCEPT_POLL = 0.001
PRE_ACCEPT_WINDOW = 0.05
# Socket lookups one pass of resolve_accepted may make (about 0.1 ms each).
RESOLVE_LOOKS_PER_PASS = 64
# States in which an inbound socket without an inode is still waiting in the listener's queue;
# in the others it has been closed by the process that accepted it.
PRE_ACCEPT_STATES = {"SYN_RECV", "ESTABLISHED", "CLOSE_WAIT"}


class Attribution:
    def _owner(self, family, local, remote, outgoing):
        """(The tracked process that owns this side of the connection, or None; the inode of the
        connection's own socket when that is what was found, else 0)."""
        if not self.procs:
            return None, 0
        info = self.sockets.get(family, local[0], local[1], remote[0], remote[1])
        if not outgoing and (info is None or info.inode == 0):
            info = self.sockets.listener(family, local[0], local[1])
        if info is None or info.inode == 0:
            return None, 0
        return self._holder(info.inode, info.uid), (0 if info.state == "LISTEN" else info.inode)

    def _holder(self, inode, uid, children_first=False):
        """The tracked process holding socket `inode`, or None.

        Known members are looked at first; the job's process trees are walked again only when none
        of them holds it, because a process may have forked since we last looked.
        """
        for attempt in range(2):
            known = [p.pid for p in self.procs.values() if p.ident.uid == uid]
            # The processes that opened connections last first: one that opens a connection usually
            # opens more, and each look is a walk of one process's file descriptors.
            known.sort(key=lambda pid: (self.procs[pid].registered if children_first else 0,
                                        -self._last_owner.get(pid, 0)))
            pid = self.processes.owner_of(inode, known) if known else None
            if pid is not None:
                self._last_owner[pid] = next(self._owner_clock)
                return self.procs[pid]
            if attempt == 0 and not self._adopt_descendants():
                return None
        return None

    def _adopt_descendants(self):
        """Every living descendant of a tracked process joins its job; returns how many were new.

        With MEMBERSHIP = cgroup, so does every process in a job's cgroup (daemons, double forks)."""
        new = 0
        for job in self.jobs.values():
            if not job.cgroup:
                continue
            for pid in self.processes.cgroup_members(job.cgroup) - set(self.procs):
                try:
                    ident = self.processes.identity(pid)
                except NotFound:
                    continue
                self.procs[pid] = TrackedProcess(ident, job.job_id, registered=False,
                                                 root=min(job.roots) if job.roots else pid)
                self._dirty_procs.add(pid)
                new += 1
        before = len(self.procs)
        self._descendants_of(list(self.procs))
        return new + len(self.procs) - before

    def _descendants_of(self, pids):
        """`pids` and every living descendant of theirs; the untracked ones join their ancestor's job."""
        out, seen, stack = [], set(pids), list(pids)
        while stack:
            pid = stack.pop()
            out.append(pid)
            for child in self.processes.children(pid):
                if child not in seen and (child in self.procs or self._adopt(child, pid) is not None):
                    seen.add(child)
                    stack.append(child)
        return out

    def resolve_accepted(self, force=False):
        """Attribute accepted connections to the process holding the accepted socket.

        Until a worker has accepted it, the socket has no inode: it is looked at again every
        ACCEPT_POLL, without using up one of the RESOLVE_DELAYS, because a pre-forked worker may
        accept, serve and close a short connection within a few milliseconds of the handshake."""
        now = self.clock.monotonic()
        looks = 0
        for cid, entry in list(self._unresolved.items()):
            conn, attempts, due, _ = entry
            if not force and now < due:
                continue
            if looks >= RESOLVE_LOOKS_PER_PASS:
                # A deep accept queue must not starve held SYNs and the API: the rest next time.
                entry[2] = now + ACCEPT_POLL
                continue
            looks += 1
            info = self.sockets.get(conn.family, conn.local, conn.lport, conn.remote, conn.rport)
            if info is not None and info.inode and info.state != "LISTEN":
                # Children first: after accept-then-fork both hold the socket for a moment, and the
                # child is the one that serves it. Later looks overrule earlier ones.
                tracked = self._holder(info.inode, info.uid, children_first=True)
                if tracked is not None and tracked.job == conn.job:
                    conn.pid, conn.inode = tracked.pid, info.inode
                    conn.pid_source = "socket"
            elif (not conn.end_reason and conn.pid_source == "listener"
                  and (info is None or info.state in PRE_ACCEPT_STATES or info.state == "LISTEN")):
                # Not accepted yet: the listener itself answers while the SYN is held or in flight.
                if entry[3] is None:
                    entry[3] = now + PRE_ACCEPT_WINDOW
                if now < entry[3]:
                    entry[2] = now + ACCEPT_POLL
                    continue
            attempts += 1
            closed = info is not None and ((info.inode == 0 and info.state not in PRE_ACCEPT_STATES)
                                           or (info.state == "LISTEN" and conn.pid_source == "socket"))
            if attempts >= len(RESOLVE_DELAYS) or closed:
                # Out of looks, or closed by whoever held it: the pid stays what was last seen.
                del self._unresolved[cid]
            else:
                entry[1], entry[2] = attempts, now + RESOLVE_DELAYS[attempts]

    def _adopt(self, pid, ancestor):
        """A descendant of a tracked process: it joins the job of its tracked ancestor."""
        try:
            ident = self.processes.identity(pid)
        except NotFound:
            return None
        parent = self.procs.get(ancestor)
        if parent is None:
            return None
        child = TrackedProcess(ident, parent.job, registered=False, root=parent.root)
        self.procs[pid] = child
        self._dirty_procs.add(pid)
        return child
