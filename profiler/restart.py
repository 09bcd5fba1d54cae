"""Carrying on after a restart: the durable state, the rules still in place, connections opened meanwhile.

A mixin of the Profiler: it runs before the profiler thread starts.
"""
import logging
import socket

from .model import Connection, Job, TrackedProcess
from .proctable import ProcessIdentity
from .sockdiag import LIVE_STATES, TCP_STATES

log = logging.getLogger("netprofiler")


class Restart:
    def restore(self, state):
        """Before the thread starts: take back the jobs, processes and connections of the durable state.

        Returns {cid: RuleSpec} of the connections whose rules may still be in the kernel, counting."""
        jobs, procs, conns, record_totals = state
        for j in jobs:
            job = Job(j["job_id"], j["started"], roots=set(j["roots"]), cgroup=j["cgroup"], owner_uid=j["owner_uid"])
            # The records stay in the store, read back when asked for; only their count and bytes here.
            job.harvested, job.harvested_in, job.harvested_out = record_totals.get(job.job_id, (0, 0, 0))
            self.jobs[job.job_id] = job
        for p in procs:
            if p["job"] in self.jobs:
                ident = ProcessIdentity(p["pid"], p["uid"], p["user"], p["create_time"])
                self.procs[p["pid"]] = TrackedProcess(ident, p["job"], registered=p["registered"], root=p["root"])
        for c in conns:
            if c["job"] in self.jobs:
                conn = Connection(**c)
                self.conns[conn.key] = conn
        self._admit_kept(self.firewall.earlier_fast_path())
        return {conn.cid: self._spec(conn) for conn in self.conns.values()}

    def after_setup(self, installed):
        """The firewall kept the rules in `installed`; connections without theirs get new ones,
        and connections opened while we were down are found from the sockets of tracked processes."""
        for conn in list(self.conns.values()):
            if conn.cid in installed:
                conn.rules_installed = True
            else:
                conn.rules_before_first_packet = False
                conn.incomplete_reason = "its rules were gone when the service restarted"
                self._want_rules(conn)
        self._scan_listeners()
        self._discover_connections()
        # FINs and RSTs sent while we were down were seen by no one: look at every socket.
        self._loss_check_left = len(self.conns)
        self.flush()

    def _discover_connections(self):
        """Connections of tracked processes nobody saw start (opened while the service was down)."""
        owners = {}
        for pid in self.procs:
            for inode in self.processes.socket_inodes(pid):
                owners[inode] = pid
        if not owners:
            return
        states = sum(1 << n for n, name in TCP_STATES.items() if name in LIVE_STATES)
        for family in (socket.AF_INET, socket.AF_INET6):
            for info in self.sockets.dump(family, states=states):
                pid = owners.get(info.inode)
                key = (family, info.local, info.lport, info.remote, info.rport)
                if pid is None or key in self.conns:
                    continue
                iface = self._interface_for(info.local)
                if iface is None:
                    continue
                tracked = self.procs[pid]
                conn = Connection(cid=f"{self._run_id}{next(self._ids):x}", job=tracked.job, pid=pid,
                                  interface=iface, family=family, local=info.local, lport=info.lport,
                                  remote=info.remote, rport=info.rport, outgoing=info.lport not in self._listen_ports,
                                  opened=self.clock.time(),
                                  incomplete_reason="opened while the service was not running")
                self.conns[key] = conn
                self._want_rules(conn)
                log.info("found connection %s:%s -> %s:%s of job %s pid %s opened while we were down",
                         info.local, info.lport, info.remote, info.rport, tracked.job, pid)
