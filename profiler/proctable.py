"""The process table: identity, descendants and socket ownership of processes.

Only tracked processes are ever looked at (their /proc/PID/fd), never the
whole host, so the cost does not grow with the number of foreign sockets.
"""
import os
import pwd
from dataclasses import dataclass

import psutil

from .errors import NotFound


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    uid: int
    user: str
    create_time: float  # Unix epoch seconds, as psutil reports it


class ProcessTable:
    def __init__(self, proc_root="/proc"):
        self._proc = proc_root
        self._fd_cache = {}   # pid -> {fd name: what it pointed to at the last look}
        self._socket_fd = {}  # socket inode -> (pid, fd name) where the cache last saw it
        self._suspect = {}    # pid -> fd names whose socket's connection has ended since

    def identity(self, pid):
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                uid = p.uids().real
                created = p.create_time()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            raise NotFound(f"no process with pid {pid}") from None
        except (ValueError, OverflowError):
            raise NotFound(f"no process with pid {pid}") from None
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        return ProcessIdentity(pid, uid, user, created)

    def alive(self, ident):
        """True while the very process `ident` names runs (not a reused PID, not a zombie)."""
        try:
            p = psutil.Process(ident.pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return False
            return abs(p.create_time() - ident.create_time) < 0.01
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False

    def children(self, pid):
        """Direct children of `pid`, from /proc/PID/task/*/children: the cost grows with the job, not the host."""
        out = []
        task_dir = f"{self._proc}/{pid}/task"
        try:
            tids = os.listdir(task_dir)
        except OSError:
            return out
        for tid in tids:
            try:
                with open(f"{task_dir}/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
            except OSError:
                continue
        return out

    def cgroup_of(self, pid):
        """The directory of the cgroup `pid` is in (cgroup v2 if it is in a non-root one, else v1), or None."""
        try:
            with open(f"{self._proc}/{pid}/cgroup") as f:
                lines = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
        except OSError:
            raise NotFound(f"no process with pid {pid}") from None
        mounts = self._cgroup_mounts()
        # The unified hierarchy first: HTCondor gives each job its own cgroup there.
        ordered = sorted(lines, key=lambda parts: parts[0] != "0")
        for hier_id, controllers, path in ordered:
            if path in ("/", ""):
                continue
            key = "" if hier_id == "0" else controllers
            for name in ([key] if key == "" else key.split(",")):
                base = mounts.get(name)
                if base:
                    return os.path.join(base, path.lstrip("/"))
        return None

    def _cgroup_mounts(self):
        """{controller (or '' for cgroup2): mount point}.

        Our own mounts first; when this mount namespace has no cgroup file system (as under
        `ip netns exec`, which mounts a fresh /sys), those of PID 1, reached through /proc/1/root.
        """
        for source, prefix in (("self", ""), ("1", f"{self._proc}/1/root")):
            mounts = {}
            try:
                with open(f"{self._proc}/{source}/mountinfo") as f:
                    for line in f:
                        left, _, right = line.partition(" - ")
                        fields, rfields = left.split(), right.split()
                        if not rfields:
                            continue
                        if rfields[0] == "cgroup2":
                            mounts.setdefault("", prefix + fields[4])
                        elif rfields[0] == "cgroup" and len(rfields) > 2:
                            for opt in rfields[2].split(","):
                                mounts.setdefault(opt, prefix + fields[4])
            except OSError:
                continue
            if mounts:
                return mounts
        return {}

    def cgroup_members(self, directory):
        """PIDs in cgroup `directory` and every cgroup below it."""
        pids = set()
        for root, _dirs, files in os.walk(directory):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(root, "cgroup.procs")) as f:
                        pids.update(int(x) for x in f.read().split())
                except (OSError, ValueError):
                    continue
        return pids

    def _fd_targets(self, pid):
        """What each open file descriptor of `pid` points to ('socket:[123]', '/dev/null', ...)."""
        fd_dir = f"{self._proc}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return
        for name in names:
            try:
                yield os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue

    def socket_inodes(self, pid):
        """Every socket `pid` holds, read afresh (and the cache brought up to date)."""
        self._holds(pid, None, only_new=False)
        return self.cached_socket_inodes(pid)

    def cached_socket_inodes(self, pid):
        """The sockets `pid` holds as far as the cache knows, after reading only its new and
        suspect descriptors: cheap for a process holding thousands of sockets."""
        self._holds(pid, None, only_new=True)
        return {int(t[8:-1]) for t in self._fd_cache.get(pid, {}).values() if t.startswith("socket:[")}

    def socket_closed(self, inode):
        """The connection on socket `inode` has ended: the descriptor that held it is about to be
        free, and the next socket the process opens will likely reuse its number."""
        where = self._socket_fd.pop(inode, None)
        if where is not None:
            self._suspect.setdefault(where[0], set()).add(where[1])

    def forget(self, pid):
        """`pid` has exited: drop what the cache knows of it."""
        for target in self._fd_cache.pop(pid, {}).values():
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if self._socket_fd.get(inode, (None,))[0] == pid:
                    del self._socket_fd[inode]
        self._suspect.pop(pid, None)

    def owner_of(self, inode, pids):
        """The first of `pids` that holds socket `inode` open, or None.

        A first pass reads only the descriptors each process did not have at the last look, and
        those that held a connection that has since ended (socket_closed): a new socket gets the
        lowest free number, usually one of these, and a process may hold thousands. Only if that
        finds nothing (some other descriptor number was reused) is every descriptor read again."""
        needle = f"socket:[{inode}]"
        for only_new in (True, False):
            for pid in pids:
                if self._holds(pid, needle, only_new):
                    return pid
        return None

    def _holds(self, pid, needle, only_new):
        fd_dir = f"{self._proc}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            self.forget(pid)
            return False
        cache = self._fd_cache.setdefault(pid, {})
        if len(cache) > len(names):
            for gone in set(cache) - set(names):
                del cache[gone]
        suspect = self._suspect.pop(pid, ()) if only_new else ()
        found = False
        for name in names:
            if only_new and name in cache and name not in suspect:
                continue
            try:
                cache[name] = target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                self._socket_fd[int(target[8:-1])] = (pid, name)
            found = found or target == needle
        if not only_new:
            self._suspect.pop(pid, None)
        return found
