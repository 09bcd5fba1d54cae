"""The process table: identity, descendants and socket ownership of processes.

Only tracked processes are ever looked at (their /proc/PID/fd), never the
whole host, so the cost does not grow with the number of foreign sockets.
"""
import os
import pwd
from collections import deque
from dataclasses import dataclass

import psutil

from .errors import NotFound


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    uid: int
    user: str
    create_time: float  # Unix epoch seconds, as psutil reports it


# How many of a process's most recently seen socket descriptors are read first when looking for a
# reused descriptor number.
RECENT_SOCKETS = 64
# How many sockets whose peer closed first are remembered per process (read at each thorough guess
# until their number is taken again: one held half-closed stays a read each time).
CLOSING_SOCKETS = 16
# How many descriptor numbers above the highest known are tried before listing the descriptors.
GUESS_ABOVE = 4
# The processes that owned sockets last are guessed at thoroughly; the others only cheaply.
THOROUGH_GUESSES = 4
# In the likeliest owners with at most this many descriptors, the GUESS_LOW lowest-numbered
# non-socket ones are tried too.
SMALL_PROCESS = 256
GUESS_LOW = 8


class ProcessTable:
    def __init__(self, proc_root="/proc"):
        self._proc = proc_root
        self._fd_cache = {}   # pid -> {fd name: what it pointed to at the last look}
        self._socket_fd = {}  # socket inode -> (pid, fd name) where the cache last saw it
        self._suspect = {}    # pid -> fd names whose socket's connection has ended since
        self._closing = {}    # pid -> fd names of sockets whose peer has closed (newest at the right)
        self._recent = {}     # pid -> the fd names of the sockets found last (newest at the right)
        self._top_fd = {}     # pid -> the highest descriptor number read

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

    def socket_inodes(self, pid):
        """Every socket `pid` holds, read afresh (and the cache brought up to date)."""
        self._holds(pid, None, only_new=False)
        return self.cached_socket_inodes(pid)

    def cached_socket_inodes(self, pid):
        """The sockets `pid` holds as far as the cache knows, after reading only its new and
        suspect descriptors: cheap for a process holding thousands of sockets."""
        self._holds(pid, None, only_new=True)
        inodes = (_socket_inode(t) for t in self._fd_cache.get(pid, {}).values())
        return {inode for inode in inodes if inode is not None}

    def socket_closed(self, inode):
        """The connection on socket `inode` has ended: the descriptor that held it is about to be
        free, and the next socket the process opens will likely reuse its number."""
        where = self._socket_fd.pop(inode, None)
        if where is not None:
            self._suspect.setdefault(where[0], set()).add(where[1])

    def socket_closing(self, inode):
        """The peer of socket `inode` has closed its side: its process will likely close the socket
        soon, often before we hear of it, and the next socket it opens then takes that number."""
        where = self._socket_fd.get(inode)
        if where is not None:
            closing = self._closing.setdefault(where[0], deque(maxlen=CLOSING_SOCKETS))
            if where[1] not in closing:     # a retransmitted FIN
                closing.append(where[1])

    def forget(self, pid):
        """`pid` has exited: drop what the cache knows of it."""
        cache = self._fd_cache.pop(pid, {})
        for name in list(cache):
            self._drop(pid, name, cache)
        self._suspect.pop(pid, None)
        self._closing.pop(pid, None)
        self._recent.pop(pid, None)
        self._top_fd.pop(pid, None)

    def owner_of(self, inode, pids):
        """The first of `pids` that holds socket `inode` open, or None.

        A first pass reads only the descriptors each process did not have at the last look, and
        those that held a connection that has since ended (socket_closed): a new socket gets the
        lowest free number, usually one of these, and a process may hold thousands. Only if that
        finds nothing (some other descriptor number was reused) is every descriptor read again."""
        needle = f"socket:[{inode}]"
        where = self._socket_fd.get(inode)
        if where is not None and pids and where[0] == pids[0] and where[0] in self._fd_cache:
            # Already seen, behind this descriptor, by an earlier search that read past it: with
            # many connections starting at once, one search's reads find the sockets of the next.
            # Only for the first candidate: a later one may share the socket with an earlier one
            # (forked after accept), and the first of `pids` that holds it is the answer.
            pid, name = where
            if self._read(pid, f"{self._proc}/{pid}/fd", name, self._fd_cache[pid]) == needle:
                self._remember(pid, name)
                return pid
        pid = self._search(needle, pids)
        where = self._socket_fd.get(inode)
        if pid is not None and where is not None and where[0] == pid:
            self._remember(pid, where[1])
        return pid

    def _remember(self, pid, name):
        """Descriptor `name` of `pid` holds a new socket: the newest sockets' numbers are the
        likeliest to be reused next, and a process that opened one often opened several."""
        self._recent.setdefault(pid, deque(maxlen=RECENT_SOCKETS)).append(name)

    def _search(self, needle, pids):
        for rank, pid in enumerate(pids):
            # Beyond the first few, only the likeliest places: there may be a thousand processes.
            if self._guess(pid, needle, thorough=rank < THOROUGH_GUESSES):
                return pid
        # The likeliest owners (the callers order `pids` so) are looked at in full first: a process
        # opening several connections is looked for once per connection.
        likely, rest = pids[:THOROUGH_GUESSES], pids[THOROUGH_GUESSES:]
        for pid in likely:
            if self._holds(pid, needle, only_new=True) or self._holds_reused(pid, needle):
                return pid
        # Processes never looked at first: a new socket of an unknown process is most likely theirs.
        rest = sorted(rest, key=lambda pid: pid in self._fd_cache)
        for pid in rest:
            if self._holds(pid, needle, only_new=True):
                return pid
        for pid in rest:
            if self._holds_reused(pid, needle):
                return pid
        return None

    def _drop(self, pid, name, cache):
        """Descriptor `name` of `pid` no longer points where the cache says."""
        inode = _socket_inode(cache.pop(name, ""))
        if inode is not None and self._socket_fd.get(inode) == (pid, name):
            del self._socket_fd[inode]

    def _guess(self, pid, needle, thorough=True):
        """Read only where a new socket most likely is, without listing the descriptors: those whose
        connection ended, the numbers just above the highest known and, when `thorough`, those of
        recent sockets and (in a small process) the lowest numbers not holding a socket."""
        cache = self._fd_cache.get(pid)
        if not cache:
            return False
        fd_dir = f"{self._proc}/{pid}/fd"
        top = self._top_fd.get(pid, 0)
        suspects = self._suspect.pop(pid, set())
        closing = self._closing.get(pid, ()) if thorough else ()
        candidates = (list(suspects) + list(reversed(closing))
                      + [str(top + i) for i in range(1, (GUESS_ABOVE if thorough else 1) + 1)])
        if thorough:
            candidates += reversed(self._recent.get(pid, ()))
            if len(cache) <= SMALL_PROCESS:
                # A small process that closed files since we looked (a forked child closing what
                # it inherited): its new socket takes the lowest of their numbers.
                candidates += _lowest_non_sockets(cache, GUESS_LOW)
        found, settled = False, set()
        for name in dict.fromkeys(candidates):
            before = cache.get(name)
            target = self._read(pid, fd_dir, name, cache)
            if target != before:
                settled.add(name)   # closed or reused since: a suspect no longer
            if target == needle:
                found = True
                break
        left = suspects - settled   # ended connections whose descriptor the process still holds
        if left:
            self._suspect.setdefault(pid, set()).update(left)
        if closing and settled:
            self._closing[pid] = deque((name for name in closing if name not in settled), maxlen=CLOSING_SOCKETS)
        return found

    def _holds_reused(self, pid, needle):
        """Whether `pid` holds `needle` behind a descriptor number it reused, reading the numbers
        whose last socket was the newest first, and stopping at the match: the sockets that come
        and go are the short-lived, recent ones, while a process's old sockets tend to stay."""
        cache = self._fd_cache.get(pid)
        if cache is None:
            return self._holds(pid, needle, only_new=False)
        fd_dir = f"{self._proc}/{pid}/fd"
        recent = [name for name in reversed(self._recent.get(pid, ())) if name in cache]
        others = sorted(set(cache).difference(recent), key=lambda name: -(_socket_inode(cache[name]) or 0))
        return any(self._read(pid, fd_dir, name, cache) == needle for name in dict.fromkeys(recent + others))

    def _read(self, pid, fd_dir, name, cache):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            self._drop(pid, name, cache)
            return None
        if cache.get(name, target) != target:
            self._drop(pid, name, cache)
        cache[name] = target
        if name.isdigit() and int(name) > self._top_fd.get(pid, 0):
            self._top_fd[pid] = int(name)
        inode = _socket_inode(target)
        if inode is not None:
            self._socket_fd[inode] = (pid, name)
        return target

    def _holds(self, pid, needle, only_new):
        fd_dir = f"{self._proc}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            self.forget(pid)
            return False
        cache = self._fd_cache.setdefault(pid, {})
        current = set(names)
        if len(cache) > len(names) or not only_new:
            for gone in set(cache) - current:
                self._drop(pid, gone, cache)
        if only_new:
            todo = current.difference(cache) | (self._suspect.pop(pid, set()) & current)
        else:
            todo = names
            self._suspect.pop(pid, None)
        found = False
        for name in todo:
            target = self._read(pid, fd_dir, name, cache)
            if only_new and _socket_inode(target) is not None:
                self._remember(pid, name)
            found = target == needle or found
        return found


def _socket_inode(target):
    """The inode in a descriptor's target 'socket:[123]', or None for anything else."""
    return int(target[8:-1]) if target and target.startswith("socket:[") else None


def _lowest_non_sockets(cache, n):
    nums = sorted(int(name) for name, target in cache.items()
                  if name.isdigit() and int(name) > 2 and _socket_inode(target) is None)
    return [str(num) for num in nums[:n]]
