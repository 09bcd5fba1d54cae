"""The profiler's side of the fast path: which connections' entries must be without the conntrack
label, and whether they still were when their records are made (ctmark.py says why it exists)."""
import errno
import logging

from .ctmark import Entry

log = logging.getLogger("netprofiler")

# A late connection's entry may not be confirmed yet when its rules go in (an inbound SYN the
# capture saw before netfilter let it through): asked again at the next flushes.
ADMIT_RETRIES = 3

LOST = ("its conntrack entry carried the fast-path label (set by another program, or its first SYN was not "
        "held): packets passed its rules uncounted")
UNREAD = "the fast-path label of its conntrack entry could not be read ({}): its rules may have missed packets"
PICKED_UP = "; conntrack picked the connection up again mid-stream, so its count misses the start as well"
NOT_ADMITTED = ("after a restart the fast-path label of its conntrack entry could not be cleared: packets since "
                "then may have passed its rules uncounted")


def _tuple(conn):
    return conn.family, conn.local, conn.lport, conn.remote, conn.rport


class FastPath:
    """Mixed into the Profiler: self.labels (ctmark.ConnLabels, or None when the fast path is off),
    self.conns, self.firewall, self.stats."""

    def _init_fast_path(self, labels):
        self.labels = labels
        self._admit_retry = {}          # cid -> (Connection, tries) of late connections not yet admitted

    def _admit_late(self, conns):
        """Clear the label of connections whose rules come after their first packet (a SYN not held
        got it), before the commit: their rules count what follows, for the record conntrack
        cannot complete. Never raises: held SYNs wait on this flush."""
        if self.labels is None or not (conns or self._admit_retry):
            return
        todo = {c.cid: c for c in conns}
        for cid, (conn, _) in self._admit_retry.items():
            if self.conns.get(conn.key) is conn:
                todo.setdefault(cid, conn)
        try:
            failed = self.labels.clear([_tuple(c) for c in todo.values()])
        except Exception as exc:
            log.warning("cannot clear the fast-path label of %d connections: %s", len(todo), exc)
            return
        retry = {}
        for cid, conn in todo.items():
            code = failed.get(_tuple(conn))
            tries = self._admit_retry.get(cid, (conn, 0))[1] + 1
            if code == errno.ENOENT and tries < ADMIT_RETRIES:
                retry[cid] = (conn, tries)
            elif code:
                log.info("connection %s keeps the fast-path label (%s): its rules count nothing; "
                         "conntrack completes it", cid, errno.errorcode.get(code, code))
        self._admit_retry = retry

    def _check_labels(self, conns):
        """Connections counted by their rules alone, before their records: an entry with the label
        let packets pass uncounted, and the record must not say complete."""
        if self.labels is None or not conns:
            return
        self._flag_passed(conns, self.labels.read, "harvest")

    def _flag_passed(self, conns, read, when):
        """Flag the connections whose packets passed the jumps by; returns those flagged."""
        pairs = [(_tuple(c), c) for c in conns]    # a 4-tuple may be in a harvest twice
        try:
            entries = read(list(dict.fromkeys(t for t, _ in pairs)))
        except Exception as exc:
            entries = dict.fromkeys((t for t, _ in pairs), getattr(exc, "errno", None) or errno.EIO)
        lost = unread = 0
        flagged = []
        for t, conn in pairs:
            entry = entries.get(t, errno.EIO)
            self._admit_retry.pop(conn.cid, None)
            if entry is None or (isinstance(entry, Entry) and entry.counted):
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
            self.stats["fast_path_passed"] = self.stats.get("fast_path_passed", 0) + lost
            log.warning("%s: %d connections' conntrack entries let packets pass their rules by, %d could not "
                        "be read: their rule counts are not taken as complete", when, lost, unread)
        return flagged

    def _admit_kept(self, earlier):
        """Before setup() makes the jumps anew: check the connections carried on against what the
        earlier run's jumps passed packets by (`earlier`: ("label", bit), ("mark", bit) or None; a
        loss then, or while no service ran, must not be hidden by clearing the label), then clear
        the label of every one of them."""
        kept = list(self.conns.values())
        if not kept:
            return
        exact = [c for c in kept if c.rules_before_first_packet]
        flagged = []
        if earlier and exact:
            kind, bit = earlier
            if self.labels is not None and bit is not None:
                flagged = self._flag_passed(exact, lambda ts: self.labels.read(ts, **{kind: bit}), "restart")
            else:
                why = "fast path now off" if self.labels is None else "the earlier run's label is named, not numbered"
                for conn in exact:
                    conn.incomplete_reason = conn.incomplete_reason or UNREAD.format(why)
                flagged = exact
        if flagged:
            # Durable before the label is cleared, which erases the evidence: another crash before
            # their harvest must not make them complete.
            self._save_connections(flagged)
        if self.labels is None:
            return
        try:
            failed = self.labels.clear([_tuple(c) for c in kept])
        except Exception as exc:
            log.warning("cannot clear the fast-path label of the %d connections carried on: %s", len(kept), exc)
            failed = dict.fromkeys(map(_tuple, kept), errno.EIO)
        for conn in kept:
            if _tuple(conn) in failed and not conn.end_reason:
                conn.incomplete_reason = conn.incomplete_reason or NOT_ADMITTED

    @staticmethod
    def _ct_can_complete(conn):
        """Whether conntrack's count may stand for this connection."""
        return not conn.ct_unusable
