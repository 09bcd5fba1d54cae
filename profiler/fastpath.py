"""The profiler's side of the fast path: which connections carry the conntrack mark, and whether
they still did when their records are made (ctmark.py says why it exists)."""
import errno
import logging

from .ctmark import Entry

log = logging.getLogger("netprofiler")

# A late connection's entry may not be confirmed yet when its rules go in (an inbound SYN the
# capture saw before netfilter let it through): asked again at the next flushes.
MARK_RETRIES = 3

LOST = ("its conntrack entry lost the fast-path mark (conntrack flushed, or the mark rewritten by another "
        "program): packets after that passed its rules uncounted")
UNREAD = "the fast-path mark of its conntrack entry could not be read ({}): its rules may have missed packets"
PICKED_UP = "; conntrack picked the connection up again mid-stream, so its count misses the start as well"
NOT_MARKED = ("after a restart its conntrack entry could not be marked for the fast path: packets since then "
              "may have passed its rules uncounted")


def _tuple(conn):
    return conn.family, conn.local, conn.lport, conn.remote, conn.rport


class FastPath:
    """Mixed into the Profiler: self.marks (ctmark.ConnMarks, or None when the fast path is off),
    self.conns, self.firewall, self.stats."""

    def _init_fast_path(self, marks):
        self.marks = marks
        self._mark_retry = {}          # cid -> (Connection, tries) of late connections not yet marked

    def _mark_late(self, conns):
        """Mark connections whose rules come after their first packet (a held SYN's connection is
        marked by the rule before its hold), before the commit: their rules count what follows,
        for the record conntrack cannot complete. Never raises: held SYNs wait on this flush."""
        if self.marks is None or not (conns or self._mark_retry):
            return
        todo = {c.cid: c for c in conns}
        for cid, (conn, _) in self._mark_retry.items():
            if self.conns.get(conn.key) is conn:
                todo.setdefault(cid, conn)
        try:
            failed = self.marks.set([_tuple(c) for c in todo.values()])
        except Exception as exc:
            log.warning("cannot mark %d connections for the fast path: %s", len(todo), exc)
            return
        retry = {}
        for cid, conn in todo.items():
            code = failed.get(_tuple(conn))
            tries = self._mark_retry.get(cid, (conn, 0))[1] + 1
            if code == errno.ENOENT and tries < MARK_RETRIES:
                retry[cid] = (conn, tries)
            elif code:
                log.info("connection %s not marked for the fast path (%s): its rules count nothing; "
                         "conntrack completes it", cid, errno.errorcode.get(code, code))
        self._mark_retry = retry

    def _check_marks(self, conns):
        """Connections counted by their rules alone, before their records: an entry without the mark
        let packets pass uncounted, and the record must not say complete."""
        if self.marks is None or not conns:
            return
        self._flag_unmarked(conns, self.marks.read, "harvest")

    def _flag_unmarked(self, conns, read, when):
        """Flag the connections whose entry lost the mark; returns those flagged."""
        pairs = [(_tuple(c), c) for c in conns]    # a 4-tuple may be in a harvest twice
        try:
            entries = read(list(dict.fromkeys(t for t, _ in pairs)))
        except Exception as exc:
            entries = dict.fromkeys((t for t, _ in pairs), getattr(exc, "errno", None) or errno.EIO)
        lost = unread = 0
        flagged = []
        for t, conn in pairs:
            entry = entries.get(t, errno.EIO)
            self._mark_retry.pop(conn.cid, None)
            if entry is None or (isinstance(entry, Entry) and entry.marked):
                continue        # no entry left to read: README, Limits, says when that hides a loss
            if isinstance(entry, Entry):
                lost += 1
                reason = LOST
                if entry.picked_up:
                    reason += PICKED_UP
                    conn.ct_unusable = True
            else:
                unread += 1
                reason = UNREAD.format(errno.errorcode.get(entry, entry))
            conn.incomplete_reason = conn.incomplete_reason or reason
            flagged.append(conn)
        if lost or unread:
            self.stats["fast_path_unmarked"] = self.stats.get("fast_path_unmarked", 0) + lost
            log.warning("%s: %d connections' conntrack entries had lost the fast-path mark, %d could not be "
                        "read: their rule counts are not taken as complete", when, lost, unread)
        return flagged

    def _mark_kept(self, previous_mark):
        """Before setup() makes the jumps take marked packets only: check the connections carried on
        against the mark the earlier run's jumps matched (a mark lost then, or while no service ran,
        must not be hidden by marking again), then mark every one of them."""
        kept = list(self.conns.values())
        if not kept:
            return
        exact = [c for c in kept if c.rules_before_first_packet]
        flagged = []
        if previous_mark and exact:
            if self.marks is not None:
                flagged = self._flag_unmarked(exact, lambda ts: self.marks.read(ts, bit=previous_mark), "restart")
            else:
                for conn in exact:
                    conn.incomplete_reason = conn.incomplete_reason or UNREAD.format("fast path now off")
                flagged = exact
        if flagged and self.store is not None:
            # Durable before the mark is set again, which erases the evidence: another crash before
            # their harvest must not make them complete.
            try:
                with self.store.batch():
                    self.store.put_connections(flagged)
            except Exception:
                log.exception("cannot write the durable state")
        if self.marks is None:
            return
        try:
            failed = self.marks.set([_tuple(c) for c in kept])
        except Exception as exc:
            log.warning("cannot mark the %d connections carried on for the fast path: %s", len(kept), exc)
            failed = dict.fromkeys(map(_tuple, kept), errno.EIO)
        for conn in kept:
            if _tuple(conn) in failed and not conn.end_reason:
                conn.incomplete_reason = conn.incomplete_reason or NOT_MARKED

    @staticmethod
    def _ct_can_complete(conn):
        """Whether conntrack's count may stand for this connection."""
        return not conn.ct_unusable
