"""Exact per-connection byte counters read from the kernel's connection tracking.

What makes conntrack track anything in a network namespace (checked on kernel
6.18, everything built in, iptables-legacy):

* Nothing does by default.  A fresh netns has the conntrack tables and the
  sysctls, but its hooks are registered only while at least one rule *in that
  netns* needs conntrack: `-m conntrack`, `-m state` (and other extensions that
  call nf_ct_netns_get, e.g. CONNMARK, NAT targets).  The rule does not even
  have to be reached: one in an unreferenced user chain is enough, e.g.
  `iptables-legacy -N X; iptables-legacy -A X -m conntrack --ctstate INVALID -j RETURN`.
* It is per address family: an iptables-legacy rule tracks IPv4 only; IPv6
  needs the same rule through ip6tables-legacy.
* Not enough: listing any table (`-L`, also nat/mangle), an owner match, an
  NFQUEUE rule, loading the nat table, opening a ctnetlink socket.
* Deleting the last such rule unregisters the hooks again: connections made
  after that have no entry (entries already made stay until they time out).

Accounting (`net.netfilter.nf_conntrack_acct`) is per netns, 0 in a new one,
and only applies to connections whose first packet came after it was set:
older entries carry no counters at all, which `get()` reports as an error
rather than as zero.  Counters are skb->len at the first conntrack hook, i.e.
IP-layer bytes (header included) of every packet, SYN and final ACK included;
GSO super-packets count once with their real IP total length, exactly as
iptables rule counters and a capture on the interface see them.

An entry outlives the socket: after an orderly close it sits in TIME_WAIT for
nf_conntrack_tcp_timeout_time_wait (120 s by default), after a RST in CLOSE
for nf_conntrack_tcp_timeout_close (10 s); expired entries are invisible to
lookups at once, even before the garbage collector frees them.
"""
import errno
import ipaddress
import socket
import threading
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import (
    TCP_CONNTRACK_TO_NAME,
    NFCTAttrTuple,
    NFCTSocket,
)

from profiler.errors import BadInput, ProfilerError

ACCT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_acct"
_ADDR_ATTRS = {socket.AF_INET: "CTA_IP_V4_", socket.AF_INET6: "CTA_IP_V6_"}


class ConntrackError(ProfilerError):
    """ctnetlink could not be opened or answered with an error."""


class AccountingOff(ConntrackError):
    """The entry exists but has no counters: accounting was off when it began."""


@dataclass(frozen=True)
class CtCounters:
    orig_packets: int
    orig_bytes: int
    reply_packets: int
    reply_bytes: int
    state: str | None  # TCP conntrack state name if available


class ConntrackReader:
    """Looks up single TCP entries in the current network namespace.

    One socket per address family, because NFCTSocket stamps its family into
    every request's header.  Sockets open on first use so that constructing
    the reader never fails; a lock serialises requests since the sync API
    shares one netlink socket and sequence counter between threads.
    """

    def __init__(self):
        self._socks = {}
        self._lock = threading.Lock()

    def enable_accounting(self) -> bool:
        try:
            with open(ACCT_SYSCTL, "w") as f:
                f.write("1\n")
            with open(ACCT_SYSCTL) as f:
                return f.read().strip() == "1"
        except FileNotFoundError:
            raise ConntrackError(
                f"{ACCT_SYSCTL} is missing: the kernel has no connection tracking") from None
        except OSError as e:
            raise ConntrackError(f"cannot set {ACCT_SYSCTL}: {e.strerror}") from e

    def get(self, family, src, sport, dst, dport) -> CtCounters | None:
        if family not in _ADDR_ATTRS:
            raise BadInput("family", family, "is not AF_INET or AF_INET6")
        src_ip, dst_ip = _parse(family, "src", src), _parse(family, "dst", dst)
        sport, dport = _port("sport", sport), _port("dport", dport)
        want = NFCTAttrTuple(family=family, saddr=str(src_ip), daddr=str(dst_ip),
                             proto=socket.IPPROTO_TCP, sport=sport, dport=dport)
        with self._lock:
            sock = self._socket(family)
            try:
                msgs = sock.entry("get", tuple_orig=want)
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    return None
                raise ConntrackError(f"conntrack lookup of {want} failed: {e}") from e
            except OSError as e:
                raise ConntrackError(f"conntrack lookup of {want} failed: {e}") from e
        msg = next((m for m in msgs if m.get_attr("CTA_TUPLE_ORIG") is not None), None)
        if msg is None:
            return None
        # The kernel finds an entry by either of its tuples, so asking for
        # a->b also returns the entry of a connection b->a opened the other way.
        if _orig_tuple(family, msg) != (src_ip, sport, dst_ip, dport):
            return None
        orig, reply = msg.get_attr("CTA_COUNTERS_ORIG"), msg.get_attr("CTA_COUNTERS_REPLY")
        if orig is None or reply is None:
            raise AccountingOff(
                f"conntrack entry {want} has no counters: nf_conntrack_acct was 0 "
                "when the connection started")
        return CtCounters(*_counter(orig), *_counter(reply), state=_tcp_state(msg))

    def close(self):
        with self._lock:
            socks, self._socks = self._socks, {}
        for sock in socks.values():
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _socket(self, family):
        sock = self._socks.get(family)
        if sock is None:
            try:
                sock = NFCTSocket(nfgen_family=family)
            except OSError as e:
                raise ConntrackError(f"cannot open a ctnetlink socket: {e}") from e
            self._socks[family] = sock
        return sock


def _parse(family, field, value):
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise BadInput(field, value, "is not an IP address") from None
    if (ip.version == 4) != (family == socket.AF_INET):
        raise BadInput(field, value, "does not match the address family")
    return ip


def _port(field, value):
    if not isinstance(value, int) or not 0 < value < 65536:
        raise BadInput(field, value, "is not a port number")
    return value


def _orig_tuple(family, msg):
    tup = msg.get_attr("CTA_TUPLE_ORIG")
    ip, proto = tup.get_attr("CTA_TUPLE_IP"), tup.get_attr("CTA_TUPLE_PROTO")
    prefix = _ADDR_ATTRS[family]
    return (ipaddress.ip_address(ip.get_attr(prefix + "SRC")),
            proto.get_attr("CTA_PROTO_SRC_PORT"),
            ipaddress.ip_address(ip.get_attr(prefix + "DST")),
            proto.get_attr("CTA_PROTO_DST_PORT"))


def _counter(nla):
    return (int(nla.get_attr("CTA_COUNTERS_PACKETS") or 0),
            int(nla.get_attr("CTA_COUNTERS_BYTES") or 0))


def _tcp_state(msg):
    info = msg.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
    state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE") if tcp is not None else None
    if state is None:
        return None
    return TCP_CONNTRACK_TO_NAME.get(state, "NONE" if state == 0 else str(state))
