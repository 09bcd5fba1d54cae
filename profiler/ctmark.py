"""The fast path's conntrack label, cleared and read through ctnetlink.

With the fast path on, the jump from INPUT (or OUTPUT) into each of our top chains is passed over
by packets whose conntrack entry carries one label bit (FAST_PATH_LABEL): the label says "not a
tracked connection". The SYN hold chains (firewall.py) put it on every connection whose SYN they do
not hold (not on lo, where a SYN passes both chains). Everything else takes the jump: a held SYN's connection, whose every packet is then
counted, and packets with no entry at all (INVALID: an out-of-window segment, say; UNTRACKED), or
of an entry made before the label existed (conntrack picked the connection up again after a flush,
or it is older than the service). xt_connlabel matches an absent entry when inverted, which a
conntrack mark cannot: one rule a table does what a mark needed two for.

This module clears the label of connections whose rules come later (whose SYN was not held, and
those a restart carries on with), and reads it back at harvest: an entry with the label (another
program set it) means packets passed uncounted. It also reads an earlier version's fast-path mark,
once, at a restart after an upgrade.

Requests go out many to a datagram, raw: pyroute2's NFCTSocket took 0.87 ms a lookup here, and a
harvest asks for thousands.
"""
import errno
import functools
import socket
import struct
from typing import NamedTuple

NETLINK_NETFILTER = 12
_CT_NEW = 1 << 8 | 0       # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
_CT_GET = 1 << 8 | 1
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NESTED = 0x8000
_CTA_TUPLE_ORIG, _CTA_MARK, _CTA_LABELS, _CTA_LABELS_MASK = 1, 8, 22, 23
# xt_connlabel: bits 0 to 127 of an unsigned long bitmap, which ctnetlink hands over as host-order
# 32-bit words: bit n is bit n % 32 of word n // 32 on a little-endian machine (or a 32-bit one).
LABEL_BITS = 128
_CTA_TUPLE_IP, _CTA_TUPLE_PROTO = 1, 2
_CTA_PROTO_NUM, _CTA_PROTO_SRC_PORT, _CTA_PROTO_DST_PORT = 1, 2, 3
_IP_ATTRS = {socket.AF_INET: (1, 2), socket.AF_INET6: (3, 4)}   # CTA_IP_V4_SRC/DST, CTA_IP_V6_SRC/DST
_CTA_PROTOINFO, _CTA_PROTOINFO_TCP = 4, 1
_TCP_FLAGS_ORIGINAL, _TCP_FLAGS_REPLY = 4, 5
_BE_LIBERAL = 0x08  # IP_CT_TCP_FLAG_BE_LIBERAL: set in both directions of an entry picked up mid-stream
BATCH = 256        # requests a datagram: their answers must fit the socket's buffer
RCVBUF = 4 << 20
SO_RCVBUFFORCE = 33      # not in the socket module


class ConnLabelError(OSError):
    """ctnetlink could not be opened, or did not answer."""


def _attr(kind, payload):
    pad = (-len(payload)) % 4
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * pad


def _tuple(family, src, sport, dst, dport):
    a_src, a_dst = _IP_ATTRS[family]
    ip = _attr(a_src, socket.inet_pton(family, src)) + _attr(a_dst, socket.inet_pton(family, dst))
    proto = (_attr(_CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP])) + _attr(_CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
             + _attr(_CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
    return _attr(_CTA_TUPLE_ORIG | _NESTED, _attr(_CTA_TUPLE_IP | _NESTED, ip) + _attr(_CTA_TUPLE_PROTO | _NESTED, proto))


# An IPv4 GET whole, in one pack: a harvest asks for each connection it reads.
_GET4 = struct.Struct("=IHHII BBH HH HH HH4s HH4s HH HHB3x HH2s2x HH2s2x")


def _get4(seq, src, sport, dst, dport):
    return _GET4.pack(_GET4.size, _CT_GET, _NLM_F_REQUEST, seq, 0, socket.AF_INET, 0, 0,
                      52, _CTA_TUPLE_ORIG | _NESTED, 20, _CTA_TUPLE_IP | _NESTED,
                      8, 1, socket.inet_aton(src), 8, 2, socket.inet_aton(dst),
                      28, _CTA_TUPLE_PROTO | _NESTED, 5, _CTA_PROTO_NUM, socket.IPPROTO_TCP,
                      6, _CTA_PROTO_SRC_PORT, sport.to_bytes(2, "big"), 6, _CTA_PROTO_DST_PORT, dport.to_bytes(2, "big"))


@functools.lru_cache(maxsize=None)
def _clearing(bit):
    """The attributes of an update that clears label `bit` alone: every label clear, under a mask
    of that bit (built once: a flush clears the label of each late connection)."""
    words = [0] * (LABEL_BITS // 32)
    words[bit // 32] = 1 << (bit % 32)
    return _attr(_CTA_LABELS, bytes(LABEL_BITS // 8)) + _attr(_CTA_LABELS_MASK, struct.pack("=4I", *words))


def request(kind, flags, seq, conn, clear=None):
    """One ctnetlink message for conn = (family, src, sport, dst, dport): either direction's tuple
    finds the entry. With `clear` (a label bit), an update that clears that label alone."""
    family = conn[0]
    if kind == _CT_GET and family == socket.AF_INET and clear is None and flags == _NLM_F_REQUEST:
        return _get4(seq, *conn[1:])
    body = struct.pack("=BBH", family, 0, 0) + _tuple(*conn)
    if clear is not None:
        body += _clearing(clear)
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _attrs(data, start, end):
    """{type: (start, end)} of the attributes between start and end (nesting flags cleared)."""
    out = {}
    pos = start
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4 or pos + length > end:
            break
        out[kind & 0x3fff] = (pos + 4, pos + length)
        pos += (length + 3) & ~3
    return out


def mark_of(payload):
    """CTA_MARK of a ctnetlink entry message's payload (after the netlink header); 0 when absent:
    the kernel leaves a zero mark out."""
    where = _attrs(payload, 4, len(payload)).get(_CTA_MARK)       # after the nfgenmsg
    return struct.unpack_from("!I", payload, where[0])[0] if where and where[1] - where[0] >= 4 else 0


def labelled(payload, bit):
    """Whether label `bit` is set in a ctnetlink entry message's payload (the kernel leaves out
    CTA_LABELS when no label is set, or the entry has none)."""
    where = _attrs(payload, 4, len(payload)).get(_CTA_LABELS)
    if not where or where[1] - where[0] < (bit // 32 + 1) * 4:
        return False
    return bool(struct.unpack_from("=I", payload, where[0] + bit // 32 * 4)[0] >> (bit % 32) & 1)


def picked_up(payload):
    """Whether conntrack made this entry from a packet in the middle of the connection (after a
    flush, say) rather than from its SYN: its counters then miss what came before."""
    info = _attrs(payload, 4, len(payload)).get(_CTA_PROTOINFO)
    tcp = info and _attrs(payload, *info).get(_CTA_PROTOINFO_TCP)
    if not tcp:
        return False
    flags = _attrs(payload, *tcp)
    return all(k in flags and payload[flags[k][0]] & _BE_LIBERAL for k in (_TCP_FLAGS_ORIGINAL, _TCP_FLAGS_REPLY))


class Entry(NamedTuple):
    """What a harvest needs to know of a connection's entry."""
    counted: bool       # its packets take the jump into our chains
    picked_up: bool


COUNTED = Entry(True, False)     # how nearly every entry reads: one object for all


class ConnLabels:
    """Clears and reads one conntrack label bit of TCP connections, many per system call."""

    def __init__(self, bit):
        if not 0 <= bit < LABEL_BITS:
            raise ValueError(f"a conntrack label is a bit from 0 to {LABEL_BITS - 1}, not {bit}")
        self.bit = bit
        self._sock = None
        self._seq = 0
        self._batch = BATCH
        self._buf = bytearray(1 << 16)     # one answer a read: received into, not allocated each time

    def _socket(self):
        if self._sock is None:
            try:
                s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                try:    # past net.core.rmem_max (root): a batch's answers must fit
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                    got = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                    self._batch = max(1, min(BATCH, got // 2048))   # an entry's answer is under 1 KB
                s.bind((0, 0))
            except OSError as exc:
                raise ConnLabelError(exc.errno, f"cannot open a ctnetlink socket: {exc.strerror}") from None
            s.settimeout(5)
            self._sock = s
        return self._sock

    def _exchange(self, conns, kind, flags, clear=None):
        """{conn: (errno, payload)} of one answer per request; errno 0 with the entry's payload for
        a GET, errno 0 and b"" for an acknowledged update."""
        out = {}
        conns = list(dict.fromkeys(conns))     # one request each: one answer each
        self._socket()                         # opened first: it sets the batch size
        buf = self._buf
        for start in range(0, len(conns), self._batch):
            chunk = conns[start:start + self._batch]
            if self._seq + len(chunk) >= 1 << 32:
                self._seq = 0
            base = self._seq + 1
            self._seq += len(chunk)
            try:
                sock = self._socket()
                sock.send(b"".join(request(kind, flags, base + i, c, clear) for i, c in enumerate(chunk)))
                pending = len(chunk)
                while pending:
                    size = sock.recv_into(buf)
                    data = buf
                    pos = 0
                    while pos + 16 <= size:
                        length, mtype, _, seq, _ = struct.unpack_from("=IHHII", data, pos)
                        if length < 16:
                            break
                        i = seq - base
                        if 0 <= i < len(chunk) and chunk[i] not in out:
                            if mtype == _NLMSG_ERROR:
                                code = -struct.unpack_from("=i", data, pos + 16)[0]
                                out[chunk[i]] = (code, b"")
                                pending -= 1
                            elif mtype != _NLMSG_DONE:
                                out[chunk[i]] = (0, bytes(data[pos + 16:pos + length]))
                                pending -= 1
                        pos += (length + 3) & ~3
            except OSError as exc:
                self.close()       # answers of this batch may still be queued: start afresh
                raise ConnLabelError(exc.errno or errno.EIO, f"ctnetlink did not answer: {exc}") from None
        return out

    def clear(self, conns):
        """Clear the label of each connection's entry, so that its packets take the jump. Returns
        {conn: errno} of those that failed (ENOENT: no entry). An update without NLM_F_CREATE
        never makes an entry; an entry made before the label existed has none to clear (ENOSPC),
        and its packets take the jump already."""
        answers = self._exchange(conns, _CT_NEW, _NLM_F_REQUEST | _NLM_F_ACK, self.bit)
        return {c: code for c, (code, _) in answers.items() if code and code != errno.ENOSPC}

    def read(self, conns, mark=None, label=None):
        """{conn: Entry, None (no entry) or the errno of a failed read}. With `mark` (the mark bit an
        earlier version's jumps took), whether the entry carries that mark instead; with `label`,
        whether it is without that label rather than ours (an earlier run's)."""
        label = self.bit if label is None else label
        out = {}
        for conn, (code, payload) in self._exchange(conns, _CT_GET, _NLM_F_REQUEST).items():
            if code == errno.ENOENT:
                out[conn] = None
            elif code:
                out[conn] = code
            elif (mark_of(payload) & mark) if mark else not labelled(payload, label):
                out[conn] = COUNTED
            else:       # how it began matters only to an entry whose packets passed uncounted
                out[conn] = Entry(False, picked_up(payload))
        return out

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
