"""/run/xtables.lock: taking it, and noticing that another program did.

The iptables commands take this lock around each change of a legacy table; so do we. Between
our commits we keep the table as we left it (xtblob.py) instead of reading it again, so we must
know when another program may have changed it: every iptables command opens the lock file and
closes it after its change, and inotify tells us. Our own descriptor of the file stays open, so
every such event is another program's.
"""
import ctypes
import errno
import fcntl
import os
import struct
import threading
import time
from contextlib import contextmanager

from .errors import FirewallError

LOCK_PATH = "/run/xtables.lock"

_IN_ATTRIB, _IN_CLOSE_WRITE, _IN_CLOSE_NOWRITE, _IN_OPEN = 0x04, 0x08, 0x10, 0x20
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("=iIII")    # wd, mask, cookie, len (then len bytes of name)
_libc = ctypes.CDLL(None, use_errno=True)


class XtablesLock:
    """flock() of the lock file, kept open between uses: opening and closing it is how
    LockWatch tells that another program used it."""

    def __init__(self, path=LOCK_PATH, timeout=10.0):
        self.path = path
        self.timeout = timeout
        self._fd = None
        # flock() excludes other open files, not other threads sharing ours: they take turns here,
        # and a nested held() neither takes nor releases the file lock again.
        self._threads = threading.RLock()
        self._depth = 0

    @contextmanager
    def held(self):
        with self._threads:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._take()
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _take(self):
        deadline = time.monotonic() + self.timeout
        while True:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise FirewallError(f"cannot take {self.path}: another program holds it") from None
                time.sleep(0.001)
                continue
            # The file may have been removed (and made again) since we opened it: a lock on a file
            # no longer at the path excludes no one.
            try:
                mine, now = os.fstat(self._fd), os.stat(self.path)
                if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LockWatch:
    """A generation number that moves whenever a program may have used the lock: it opened or
    closed the lock file (we keep ours open), or the file was replaced, or we cannot tell."""

    def __init__(self, lock):
        self.lock = lock
        self.generation = 0
        self._fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        self._wd = None

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def current(self):
        """The generation now. Ask while holding the lock: a program that changed a table before
        we took it has closed the lock file by then."""
        if self._fd < 0:
            self.generation += 1
            return self.generation
        if self._wd is None:
            wd = _libc.inotify_add_watch(self._fd, self.lock.path.encode(), _IN_OPEN | _IN_CLOSE_WRITE
                                         | _IN_CLOSE_NOWRITE | _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF)
            self.generation += 1      # not watched until now: anything may have happened
            if wd < 0:
                return self.generation
            self._wd = wd
        moved = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            moved = True
            at = 0
            while at < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, at)
                at += _EVENT.size + length
                if wd == self._wd and mask & (_IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
                    if not mask & _IN_IGNORED:
                        _libc.inotify_rm_watch(self._fd, wd)
                    self._wd = None     # removed or replaced, perhaps: watch what is at the path
        if moved:
            self.generation += 1
        return self.generation
