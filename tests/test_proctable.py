"""ProcessTable against this very process's /proc/PID/fd: who holds a socket, and at what cost.

A tracked process may hold thousands of sockets; finding the owner of a new one must not read
them all each time, including when the new socket reuses the number of one just closed.
"""
import os
import socket

import pytest

from profiler import proctable
from profiler.proctable import ProcessTable


@pytest.fixture
def sockets():
    held = [socket.socket() for _ in range(300)]
    yield held
    for s in held:
        s.close()


def inode_of(sock):
    return os.fstat(sock.fileno()).st_ino


@pytest.fixture
def readlinks(monkeypatch):
    """Counts the descriptors the table reads."""
    count = [0]
    real = os.readlink

    def counting(path, *a, **kw):
        count[0] += 1
        return real(path, *a, **kw)
    monkeypatch.setattr(proctable.os, "readlink", counting)
    return count


def test_owner_found_and_only_new_descriptors_read(sockets, readlinks):
    table, me = ProcessTable(), os.getpid()
    assert table.owner_of(inode_of(sockets[0]), [me]) == me
    first = readlinks[0]
    assert first >= len(sockets)
    fresh = socket.socket()
    try:
        readlinks[0] = 0
        assert table.owner_of(inode_of(fresh), [me]) == me
        assert readlinks[0] <= 3, readlinks[0]   # the new descriptor (and the listing's own fd)
    finally:
        fresh.close()


def test_reused_descriptor_of_closed_connection_is_read_first(sockets, readlinks):
    table, me = ProcessTable(), os.getpid()
    table.socket_inodes(me)
    victim = sockets[150]
    old_inode, fd = inode_of(victim), victim.fileno()
    victim.close()
    table.socket_closed(old_inode)
    replacement = socket.socket()
    try:
        assert replacement.fileno() == fd   # the lowest free number: the one just closed
        readlinks[0] = 0
        assert table.owner_of(inode_of(replacement), [me]) == me
        assert readlinks[0] <= 3, readlinks[0]
    finally:
        replacement.close()
        sockets[150] = socket.socket()


@pytest.mark.parametrize("which, most_reads", [(-1, 8), (0, None)])
def test_reused_descriptor_without_notice_still_found(sockets, readlinks, which, most_reads):
    """Not told which descriptor was reused: the newest sockets' numbers are read first (short-lived
    connections come and go; old ones stay), so reusing the newest is cheap, the oldest dear."""
    table, me = ProcessTable(), os.getpid()
    table.socket_inodes(me)
    victim = sockets[which]
    fd = victim.fileno()
    victim.close()
    replacement = socket.socket()
    try:
        assert replacement.fileno() == fd
        readlinks[0] = 0
        assert table.owner_of(inode_of(replacement), [me]) == me
        if most_reads is not None:
            assert readlinks[0] <= most_reads, readlinks[0]
        else:
            assert readlinks[0] >= len(sockets) - 5, readlinks[0]
        assert table.owner_of(inode_of(sockets[1]) + 10**9, [me]) is None
    finally:
        replacement.close()
        sockets[which] = socket.socket()


def test_cached_socket_inodes_and_forget(sockets):
    table, me = ProcessTable(), os.getpid()
    want = {inode_of(s) for s in sockets}
    assert want <= table.cached_socket_inodes(me)
    late = socket.socket()
    try:
        assert inode_of(late) in table.cached_socket_inodes(me)
    finally:
        late.close()
    table.forget(me)
    assert table._fd_cache.get(me) is None and not any(p == me for p, _ in table._socket_fd.values())


def test_number_of_a_socket_found_recently_is_read_first_when_reused(sockets, readlinks):
    """Short connections one after the other: each new socket takes the number of the last one,
    closed before we heard of it; the numbers of the sockets found last are tried early."""
    table, me = ProcessTable(), os.getpid()
    table.socket_inodes(me)
    short = socket.socket()
    assert table.owner_of(inode_of(short), [me]) == me
    for _ in range(20):
        fd = short.fileno()
        short.close()
        short = socket.socket()
        assert short.fileno() == fd
        readlinks[0] = 0
        assert table.owner_of(inode_of(short), [me]) == me
        assert readlinks[0] <= 8, readlinks[0]
    short.close()


def test_sockets_read_past_by_one_search_cost_one_read_when_looked_for(sockets, readlinks):
    """Many connections starting at once: the search for the first reads past the others' new
    sockets, and each of those is then confirmed with a single read, not searched for again."""
    table, me = ProcessTable(), os.getpid()
    table.socket_inodes(me)
    olds = [sockets.pop() for _ in range(20)]   # the newest: their numbers are read first when reused
    for s in olds:
        s.close()
    fresh = [socket.socket() for _ in range(20)]
    try:
        # fresh[0] took the lowest of the freed numbers, whose last socket was the oldest of the
        # twenty: the newest sockets' numbers are read first, and so the others' new sockets.
        readlinks[0] = 0
        assert table.owner_of(inode_of(fresh[0]), [me]) == me
        assert readlinks[0] >= 19, readlinks[0]
        for s in fresh[1:]:
            readlinks[0] = 0
            assert table.owner_of(inode_of(s), [me]) == me
            assert readlinks[0] <= 2, readlinks[0]
        # A cached place no longer right is not trusted: the socket closed, the lookup says so.
        gone = inode_of(fresh[1])
        fresh[1].close()
        assert table.owner_of(gone, [me]) is None
    finally:
        for s in fresh:
            s.close()
        sockets.extend(socket.socket() for _ in range(20))


@pytest.mark.parametrize("told", [True, False], ids=["peer-closed-first", "not-told"])
def test_number_of_a_socket_whose_peer_closed_is_read_first_when_reused(sockets, readlinks, told):
    """A client closes its socket as soon as the server has closed its side, and opens the next one
    before we have seen its own FIN: the number of a socket whose peer closed first is read early,
    even when many sockets were found since (it is no longer among the recent ones)."""
    table, me = ProcessTable(), os.getpid()
    table.socket_inodes(me)
    victim = sockets[100]
    later = [socket.socket() for _ in range(proctable.RECENT_SOCKETS + 10)]
    try:
        for s in later:
            assert table.owner_of(inode_of(s), [me]) == me
        if told:
            table.socket_closing(inode_of(victim))
        fd = victim.fileno()
        victim.close()
        replacement = socket.socket()
        assert replacement.fileno() == fd
        readlinks[0] = 0
        assert table.owner_of(inode_of(replacement), [me]) == me
        if told:
            assert readlinks[0] <= 3, readlinks[0]
        else:
            assert readlinks[0] > proctable.RECENT_SOCKETS, readlinks[0]
        replacement.close()
    finally:
        for s in later:
            s.close()
        sockets[100] = socket.socket()
