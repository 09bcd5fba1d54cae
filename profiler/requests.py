"""The requests the API hands the profiler thread: StartProfile, EndProcessProfile, EndProfile, status...

A mixin of the Profiler: each req_* runs on the profiler thread, so it may touch the tables.
"""
import logging

from .errors import Forbidden, IdentityMismatch, NotFound
from .firewall import Counters
from .model import Job, Record, TrackedProcess, totals

log = logging.getLogger("netprofiler")


class Requests:
    def _verify(self, pid, owner, birthdate):
        """The identity of a running pid, checked against the caller's owner and birthdate."""
        ident = self.processes.identity(pid)
        self._check_identity(ident, owner, birthdate)
        return ident

    @staticmethod
    def _check_identity(ident, owner, birthdate):
        if owner not in (ident.user, str(ident.uid)):
            raise IdentityMismatch(f"pid {ident.pid} belongs to {ident.user} (uid {ident.uid}), not {owner!r}")
        if abs(ident.create_time - birthdate) > 1.0:
            raise IdentityMismatch(f"pid {ident.pid} started at {ident.create_time:.3f}, "
                                   f"not at birthdate {birthdate}: the pid was reused")

    @staticmethod
    def _authorize(caller, uid, what):
        """`caller` is None for the TCP listener (trusted), else the uid a unix-socket peer runs as."""
        if caller is not None and caller != 0 and caller != uid:
            raise Forbidden(f"uid {caller} may not act on {what}, which belongs to uid {uid}")

    def _authorize_job(self, caller, job):
        self._authorize(caller, job.owner_uid, f"job {job.job_id!r}")

    def req_start(self, job_id, pid, owner, birthdate, caller=None):
        ident = self._verify(pid, owner, birthdate)
        self._authorize(caller, ident.uid, f"pid {pid}")
        existing = self.jobs.get(job_id)
        if existing is not None:
            self._authorize_job(caller, existing)
        tracked = self.procs.get(pid)
        if tracked is not None and tracked.ident.create_time == ident.create_time:
            if tracked.job != job_id:
                raise IdentityMismatch(f"pid {pid} is already tracked for job {tracked.job!r}")
            tracked.registered = True
            return {"status": "ok", "job": job_id, "pid": pid, "already_tracked": True}
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Job(job_id, self.clock.time(), owner_uid=ident.uid)
        if self.config.membership == "cgroup" and not job.cgroup:
            job.cgroup = self.processes.cgroup_of(pid) or ""
            if not job.cgroup:
                log.warning("job %s: pid %d is in no cgroup of its own; membership falls back to its process "
                            "tree", job_id, pid)
        job.roots.add(pid)
        self.procs[pid] = TrackedProcess(ident, job_id, registered=True, root=pid)
        self._dirty_jobs.add(job_id)
        self._dirty_procs.add(pid)
        self._scan_listeners([pid])
        self._update_hold()
        return {"status": "ok", "job": job_id, "pid": pid, "already_tracked": False}

    def req_end_process(self, job_id, pid, owner, birthdate, caller=None):
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"unknown job {job_id!r}")
        self._authorize_job(caller, job)
        tracked = self.procs.get(pid)
        if tracked is not None and tracked.job == job_id:
            self._check_identity(tracked.ident, owner, birthdate)
        elif pid in job.roots:
            pass   # it was tracked and has exited already: its records are kept in the job
        else:
            self._verify(pid, owner, birthdate)   # 404 if it does not exist, 409 if it is another process
            raise NotFound(f"pid {pid} is not tracked in job {job_id!r}")
        members = {pid} | {p for p, t in self.procs.items() if t.root == pid and not t.registered}
        self._harvest([c for c in self.conns.values() if c.pid in members], reason="EndProcessProfile")
        self.flush()
        for p in members:
            self.procs.pop(p, None)
            self.processes.forget(p)
            self._last_owner.pop(p, None)
            self._dropped_procs.add(p)
        job.roots.discard(pid)
        self._dirty_jobs.add(job_id)
        records = self._records_of(job, members)
        return {"status": "ok", "job": job_id, "pid": pid, "connections": [r.to_json() for r in records],
                "totals": totals(records, self.config.internal_networks)}

    def req_end_job(self, job_id, caller=None):
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"unknown job {job_id!r}")
        self._authorize_job(caller, job)
        self._harvest([c for c in self.conns.values() if c.job == job_id], reason="EndProfile")
        self.flush()
        records = self._records_of(job)     # before the store forgets the job
        for pid in [p for p, t in self.procs.items() if t.job == job_id]:
            del self.procs[pid]
            self.processes.forget(pid)
            self._last_owner.pop(pid, None)
        del self.jobs[job_id]
        self._dropped_jobs.add(job_id)
        self._persist()
        self._ended_jobs[job_id] = (job.harvested_in, job.harvested_out, self.clock.monotonic())
        return {"status": "ok", "job": job_id, "connections": [r.to_json() for r in records],
                "totals": totals(records, self.config.internal_networks, job.untracked)}

    def req_job(self, job_id, caller=None):
        """A running job's bytes so far: harvested connections plus live counters of open ones."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"unknown job {job_id!r}")
        self._authorize_job(caller, job)
        live = self._live_records([c for c in self.conns.values() if c.job == job_id])
        records = self._records_of(job) + live
        return {"status": "ok", "job": job_id,
                "processes": sorted(p for p, t in self.procs.items() if t.job == job_id),
                "connections": [r.to_json() for r in records],
                "totals": totals(records, self.config.internal_networks, job.untracked)}

    def _records_of(self, job, pids=None):
        """The records of a job's harvested connections (with `pids`, of these processes only), oldest
        first: from the durable store (those written) and the batch it has still to write, or from
        the job itself when there is no store."""
        wanted = (lambda r: r.job == job.job_id and (pids is None or r.pid in pids))  # noqa: E731
        if self.store is None:
            return [r for r in job.records if wanted(r)]
        return ([Record.from_json(d) for d in self.store.records_of(job.job_id, pids)]
                + [r for r in self._new_records if wanted(r)])

    def _live_records(self, conns):
        installed = [c for c in conns if c.rules_installed]
        counters = self.firewall.read([self._spec(c) for c in installed]) if installed else {}
        out = []
        for conn in conns:
            c = counters.get(conn.cid, Counters())
            exact = (conn.rules_before_first_packet and conn.cid in counters and not conn.incomplete_reason
                     and not c.one_side_missing)
            out.append(self._make_record(conn, c, exact, "rules", "open: counted so far", reason="open",
                                         open_now=True))
        return out

    def req_status(self):
        stats = self.capture_stats()
        return {
            "interfaces": {i: {**s, **stats.get(i, {})} for i, s in self.capture_status.items()},
            "jobs": {j.job_id: {"processes": sorted(p for p, t in self.procs.items() if t.job == j.job_id),
                                "live_connections": sum(1 for c in self.conns.values() if c.job == j.job_id),
                                "harvested_connections": j.harvested}
                     for j in self.jobs.values()},
            "tracked_processes": len(self.procs),
            "live_connections": len(self.conns),
            "installed_rules": self.firewall.rule_count,
            "threads": {"profiler": {"alive": True, "restarts": self.restarts},
                        **{f"capture-{i}": {"alive": bool(st.get("capturing")), "restarts": st.get("restarts", 0)}
                           for i, st in self.capture_status.items()}},
            "rules_threshold": self.config.rules_threshold,
            "stats": dict(self.stats),
        }

    def req_reconfigure(self, config):
        self.config = config
        return {"status": "ok"}

    def req_metrics(self):
        now = self.clock.monotonic()
        for job_id, (_, _, ended) in list(self._ended_jobs.items()):
            if now - ended > self.config.metrics_retention:
                del self._ended_jobs[job_id]
        jobs = {job_id: (inb, outb) for job_id, (inb, outb, _) in self._ended_jobs.items()}
        live = {r.cid: r for r in self._live_records(list(self.conns.values()))} if self.conns else {}
        for job in self.jobs.values():
            inb, outb = job.harvested_in, job.harvested_out
            for conn in self.conns.values():
                if conn.job == job.job_id and conn.cid in live:
                    inb += live[conn.cid].in_bytes
                    outb += live[conn.cid].out_bytes
            jobs[job.job_id] = (inb, outb)
        return {"jobs": jobs, "live": len(self.conns), "rules": self.firewall.rule_count,
                "processes": len(self.procs), "job_count": len(self.jobs), "stats": dict(self.stats),
                "capture": self.capture_stats()}

    def req_harvest_leftovers(self, leftovers):
        """Rules found from an earlier run: log what they counted, attributed by the durable state
        when it knows them (else by 4-tuple alone)."""
        now = self.clock.time()
        for left in leftovers:
            s, c = left.spec, left.counters
            note = left.note or "found after a restart; bytes counted while the service was down are missing"
            if not s.job:
                note += "; not in the saved state, so its process and job are unknown"
            rec = Record(s.cid, s.job, s.pid, s.interface, s.family, s.local, s.lport, s.remote, s.rport, True,
                         c.in_bytes, c.in_packets, c.out_bytes, c.out_packets, now, now, "restart", False, "rules",
                         note=note)
            self.sink.write(rec)
            if left.note:
                # The first part of a connection that goes on (its rules could not be moved): its
                # job's totals hold both parts.
                self._count_for_job(rec)
        return len(leftovers)
