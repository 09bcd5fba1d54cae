"""TCP connection events (SYN, FIN, RST) from libpcap.

The only module that imports pcapy; the rest of the service sees TcpEvent. Two sources: the
interface itself (a BPF filter keeps SYN, FIN and RST), or an NFLOG group ("nflog:<group>") that
the firewall's capture rules (logrules.py) fill with the interface's SYNs, FINs and RSTs only,
which spares every other packet the copy a packet socket on the interface costs.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

import dpkt
import pcapy

from profiler.errors import CaptureError

log = logging.getLogger("netprofiler.capture")

# IPv4: tcp[tcpflags] also excludes later fragments.  IPv6: libpcap cannot index
# the TCP header behind IPv6, so read its flags byte at 40 (fixed header) + 13.
# That offset is right only when TCP follows the fixed header directly, hence
# ip6[6] == 6; TCP behind IPv6 extension headers is out of scope (not captured).
BPF_FILTER = ("(tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0)"
              " or (ip6 and ip6[6] == 6 and ip6[53] & 0x07 != 0)")

DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_LOOP, DLT_LINUX_SLL = 0, 1, 12, 108, 113
LINKTYPE_RAW, DLT_LINUX_SLL2, DLT_NFLOG = 101, 276, 239
_NFULA_PAYLOAD = 9     # the NFLOG TLV that holds the packet from its IP header on
_NFULA_TIMESTAMP = 3   # when the kernel saw it (inbound hooks only): be64 seconds, be64 microseconds
_TLV = struct.Struct("=HH").unpack_from
_STAMP = struct.Struct(">QQ").unpack_from

_IP4, _IP6 = dpkt.ip.IP, dpkt.ip6.IP6
_BY_ETHERTYPE = {0x0800: _IP4, 0x86DD: _IP6}
_VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100, 0x9200))
# (header length, offset of the ethertype) for the Ethernet-like link types.
_L2 = {DLT_EN10MB: (14, 12), DLT_LINUX_SLL: (16, 14), DLT_LINUX_SLL2: (20, 0)}
# DLT_NULL/LOOP carry the *sending* OS's AF_INET6: Linux, BSDs, FreeBSD, macOS.
_AF6_VALUES = frozenset((10, 24, 28, 30))

# libpcap 1.9 reads a TPACKET_V3 ring: the kernel hands over a block only when
# it is full or its retire timer (this timeout) fires.  1 ms stands in for
# pcap_set_immediate_mode, which pcapy-ng lacks.  With the timeout left unset a
# lone SYN was never delivered here (kernel 6.18), with 100 ms ~50 ms late.
_BLOCK_TIMEOUT_MS = 1
_POLL_MS = 50          # bounds how long stop() waits for the thread
_ERROR_PAUSE_S = 0.2   # keeps a persistent error from spinning
_PRESENCE_S = 0.5      # how often a capture from NFLOG checks that its interface is still there
_SO_RCVBUFFORCE = 33
# nfnetlink_log's configuration message: (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, its timeout attribute
_NFULNL_MSG_CONFIG, _NFULA_CFG_TIMEOUT, _NLM_F_REQUEST = (4 << 8) | 1, 4, 1
_NFULA_CFG_MODE, _NFULNL_COPY_PACKET = 2, 2
NFLOG_FLUSH_CS = 1      # 10 ms: the longest an event waits in the kernel for others to share a read
NFLOG_COPY = 256        # bytes of a packet copied: its IP and TCP headers, options and all
_EAGAIN = os.strerror(errno.EAGAIN)     # as libpcap words it
_ACTIVATE_ERRORS = {-5: "no such device", -8: "permission denied", -9: "interface not up",
                    -11: "promiscuous mode not permitted"}


@dataclass(frozen=True, slots=True)
class TcpEvent:
    interface: str
    ts: float      # capture timestamp, Unix epoch seconds
    family: int    # socket.AF_INET or socket.AF_INET6
    src: str
    sport: int
    dst: str
    dport: int
    flags: int     # the TCP flags byte
    # Whether ts is when the kernel saw the packet. Not for a packet read from NFLOG in an outbound
    # hook (the kernel stamps only inbound ones there): ts is then when it was read, later.
    stamped: bool = True

    syn = property(lambda self: bool(self.flags & dpkt.tcp.TH_SYN))
    ack = property(lambda self: bool(self.flags & dpkt.tcp.TH_ACK))
    fin = property(lambda self: bool(self.flags & dpkt.tcp.TH_FIN))
    rst = property(lambda self: bool(self.flags & dpkt.tcp.TH_RST))


def _network_layer(datalink: int, data: bytes):
    """(dpkt IP class, offset of the IP header) or None."""
    if datalink in _L2:
        off, at = _L2[datalink]
        if len(data) < off:
            return None
        ethertype = int.from_bytes(data[at:at + 2], "big")
        # libpcap re-inserts VLAN tags the NIC stripped, in cooked headers too.
        while ethertype in _VLAN_TPIDS and len(data) >= off + 4:
            ethertype = int.from_bytes(data[off + 2:off + 4], "big")
            off += 4
        cls = _BY_ETHERTYPE.get(ethertype)
    elif datalink in (DLT_RAW, LINKTYPE_RAW):
        off = 0
        cls = {4: _IP4, 6: _IP6}.get(data[0] >> 4) if data else None
    elif datalink in (DLT_NULL, DLT_LOOP):
        # NULL is in the writer's byte order, LOOP in network order: try both.
        if len(data) < 4:
            return None
        off = 4
        afs = {int.from_bytes(data[:4], "big"), int.from_bytes(data[:4], "little")}
        cls = _IP4 if socket.AF_INET in afs else _IP6 if afs & _AF6_VALUES else None
    else:
        return None
    return (cls, off) if cls is not None else None


def _nflog(data: bytes):
    """(where the packet starts, the kernel's timestamp or None) in an NFLOG message, or None.

    A 4-byte header (family, version, group), then TLVs: length (header included) and type in
    host byte order, each padded to 4 bytes; the packet is the payload TLV's value."""
    off, size, stamp = 4, len(data), None
    while off + 4 <= size:
        length, kind = _TLV(data, off)
        if length < 4:
            return None
        if kind == _NFULA_PAYLOAD:
            return off + 4, stamp
        if kind == _NFULA_TIMESTAMP and length >= 20 and off + 20 <= size:
            sec, usec = _STAMP(data, off + 4)
            stamp = sec + usec / 1e6
        off += (length + 3) & ~3
    return None


def parse_packet(datalink: int, data: bytes, interface: str, ts: float) -> TcpEvent | None:
    """The TcpEvent in one captured frame, or None if it is not TCP or is cut
    short before the end of the fixed TCP header (payload may be missing).
    `ts`: libpcap's timestamp; from NFLOG the kernel's own, when the message has it."""
    try:
        stamped = True
        if datalink == DLT_NFLOG:
            found = _nflog(data)
            if found is None:
                return None
            off, kernel = found
            cls = {4: _IP4, 6: _IP6}.get(data[off] >> 4) if off < len(data) else None
            if cls is None:
                return None
            # libpcap stamps an NFLOG message when it reads it: the kernel's time, when there is one
            stamped = kernel is not None
            ts = kernel if stamped else ts
        else:
            found = _network_layer(datalink, data)
            if found is None:
                return None
            cls, off = found
        ip = cls(bytes(data[off:]))
        tcp = ip.data  # dpkt leaves raw bytes here for non-TCP and later fragments
        if not isinstance(tcp, dpkt.tcp.TCP):
            return None
        v4 = cls is _IP4
        if ip.v != (4 if v4 else 6):  # the ethertype or AF said otherwise: garbage
            return None
        if v4:      # inet_ntop writes IPv4 as ipaddress does, and is a tenth of its cost
            return TcpEvent(interface, ts, socket.AF_INET, socket.inet_ntop(socket.AF_INET, ip.src), tcp.sport,
                            socket.inet_ntop(socket.AF_INET, ip.dst), tcp.dport, tcp.flags & 0xFF, stamped)
        addr = ipaddress.IPv6Address
        return TcpEvent(interface, ts, socket.AF_INET6, str(addr(ip.src)), tcp.sport,
                        str(addr(ip.dst)), tcp.dport, tcp.flags & 0xFF, stamped)
    except Exception:  # dpkt raises assorted types on hostile bytes; never fail the reader
        return None


class PcapCapture:
    """Reads one interface in a daemon thread and calls on_event per TcpEvent.

    on_event and on_error run in that thread.  on_error(interface, exc) gets a
    CaptureError for libpcap failures (capture continues, except when the
    interface is gone: then the thread ends) and the original exception when
    on_event raised (capture continues).  Without on_error, errors are logged.
    """

    def __init__(self, interface: str, on_event: Callable[[TcpEvent], None], *,
                 snaplen: int = 128, buffer_bytes: int = 32 * 1024 * 1024,
                 on_error: Callable[[str, Exception], None] | None = None, device: str | None = None):
        """`device`: what libpcap opens, if not the interface: "nflog:<group>" for the group the
        capture rules send this interface's packets to (events still name `interface`)."""
        self.interface = interface
        self.device = device or interface
        self._nflog = self.device.startswith("nflog:")
        if self._nflog:
            # libpcap reads NFLOG into a buffer of the snapshot length and 128 bytes: a read holds up
            # to logrules.NFLOG_BATCH messages, each its attributes and NFLOG_COPY bytes of a packet.
            snaplen = 65535
        self._on_event = on_event
        self._on_error = on_error
        self._snaplen = snaplen
        self._buffer_bytes = buffer_bytes
        # libpcap handles are not thread-safe.  Held across dispatch(), so stats()
        # waits for a running on_event; reentrant so on_event may call stats().
        self._lock = threading.RLock()
        self._handle = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_stats = {"received": 0, "dropped": 0, "if_dropped": 0}
        self._datalink = self._ifindex = None
        self._stats_base = (0, 0, 0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"capture on {self.interface} is already running or still stopping")
        try:  # before opening, so a device replaced meanwhile shows as gone
            self._ifindex = socket.if_nametoindex(self.interface)
        except OSError:  # "any" has no index
            self._ifindex = None
        if self._nflog and self._ifindex is None and self.interface != "any":
            # An NFLOG group opens whatever the interface: fail as a capture on it would.
            raise CaptureError(f"cannot capture on interface {self.interface!r}: no such device")
        handle = self._open()
        self._datalink = handle.datalink()
        self._stop = threading.Event()  # fresh per run: a late old thread stays stopped
        self._handle = handle
        self._thread = threading.Thread(target=self._run, args=(handle, self._stop),
                                        name=f"capture-{self.interface}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        if thread is threading.current_thread():
            return  # called from on_event: the loop ends when the callback returns
        thread.join(timeout)
        if thread.is_alive():
            log.warning("capture thread for %s still busy after %.1fs (on_event blocked?);"
                        " the handle closes when it returns", self.interface, timeout)
        else:
            self._thread = None

    def stats(self) -> dict:
        """Since start(): packets that passed the filter (on lo the kernel
        counts each twice), packets lost for want of ring space, and packets
        the interface dropped."""
        with self._lock:
            if self._handle is None:
                return dict(self._last_stats)
            try:
                now = self._handle.stats()
            except pcapy.PcapError as exc:
                raise CaptureError(f"cannot read capture statistics of {self.interface}: {exc}") from exc
            # libpcap's counters are 32-bit unsigned and wrap.
            received, dropped, if_dropped = ((n - b) % (1 << 32) for n, b in zip(now, self._stats_base))
            return {"received": received, "dropped": dropped, "if_dropped": if_dropped}

    def _open(self):
        what = (f"cannot read the capture of interface {self.interface!r} from {self.device}" if self._nflog
                else f"cannot capture on interface {self.interface!r}")
        try:
            handle = pcapy.create(self.device)
        except pcapy.PcapError as exc:
            raise CaptureError(f"{what}: {exc}") from exc
        try:
            handle.set_snaplen(self._snaplen)
            handle.set_promisc(False)  # only this host's own connections matter
            handle.set_timeout(_BLOCK_TIMEOUT_MS)
            handle.set_buffer_size(self._buffer_bytes)
            status = handle.activate()  # pcapy-ng returns the status, it does not raise
            if status < 0:
                hint = (f"; is another program (ulogd?) reading NFLOG group {self.device[6:]}? NFLOG_GROUP "
                        "in the config chooses others" if self._nflog else "")
                raise CaptureError(f"{what}: pcap_activate: {_ACTIVATE_ERRORS.get(status, 'error')}"
                                   f" ({status}){hint}")
            if status > 0:
                log.warning("pcap_activate on %s: warning %d", self.interface, status)
            if not self._nflog:     # NFLOG: the rules chose the packets already
                handle.setfilter(BPF_FILTER)
            else:
                self._force_receive_buffer(handle.getfd())
                self._configure_nflog(handle.getfd())
            # The kernel counted whatever arrived before the filter was set.
            self._stats_base = handle.stats()
            # Blocking reads poll() without a timeout (libpcap leaves timing to
            # the kernel, which wakes readers only for non-empty blocks): on an
            # idle link stop() could never end one.  So: non-blocking + our poll.
            # (libpcap's NFLOG reader reports the end of what is there, EAGAIN, as an error.)
            handle.setnonblock(1)
        except pcapy.PcapError as exc:
            handle.close()
            raise CaptureError(f"{what}: {exc}") from exc
        except BaseException:
            handle.close()
            raise
        return handle

    def _force_receive_buffer(self, fd: int) -> None:
        """libpcap asks for the buffer with SO_RCVBUF, which net.core.rmem_max caps (about 200 KB):
        a few hundred messages, a short stall at 2,000 connections a second. As root, force it."""
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self._buffer_bytes)
        except OSError as exc:
            log.warning("cannot enlarge the receive buffer of %s to %d bytes: %s", self.device,
                        self._buffer_bytes, exc)
        finally:
            sock.close()

    def _configure_nflog(self, fd: int) -> None:
        """The group hands over what it gathered at least every NFLOG_FLUSH_CS hundredths of a
        second (the kernel's default is a second), each packet cut to NFLOG_COPY bytes: the rules let it gather up to
        logrules.NFLOG_BATCH packets, so that under load one read takes many (a read per packet
        cost the profiler thread's GIL dearly at 2,000 connections a second)."""
        group = int(self.device[6:])
        attr = struct.pack("=HH", 8, _NFULA_CFG_TIMEOUT) + struct.pack(">I", NFLOG_FLUSH_CS)
        # And copy at most NFLOG_COPY bytes of each packet (libpcap asked for the snapshot length):
        # sixteen 64 KB FINs in one read would not fit libpcap's buffer, and the headers are all we read.
        attr += struct.pack("=HH", 10, _NFULA_CFG_MODE) + struct.pack(">IBB", NFLOG_COPY, _NFULNL_COPY_PACKET, 0)
        attr += b"\0" * (-len(attr) % 4)
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attr
        msg = struct.pack("=IHHII", 16 + len(body), _NFULNL_MSG_CONFIG, _NLM_F_REQUEST, 0, 0) + body
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.send(msg)
        except OSError as exc:
            raise CaptureError(f"cannot configure {self.device}: {exc}") from None
        finally:
            sock.close()

    def _run(self, handle, stop: threading.Event) -> None:
        poller = select.poll()  # not select(): the fd may be above FD_SETSIZE
        poller.register(handle.getfd(), select.POLLIN)
        looked = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    if poller.poll(_POLL_MS):
                        self._drain(handle, stop)
                    if self._nflog and time.monotonic() - looked > _PRESENCE_S:
                        # The group outlives the interface: say it is gone, as a capture on it would.
                        looked = time.monotonic()
                        if not self._interface_present():
                            raise pcapy.PcapError(f"interface {self.interface} is gone")
                except pcapy.PcapError as exc:
                    if not self._interface_present():
                        stop.set()  # so `running` is already False inside on_error
                        self._report(CaptureError(
                            f"capture on {self.interface} stopped, the interface is gone: {exc}"))
                        break
                    # e.g. link down: the socket resumes when the link is up again
                    self._report(CaptureError(f"capture on {self.interface}: {exc}"))
                    stop.wait(_ERROR_PAUSE_S)
                except Exception as exc:  # a bug must not end the capture silently
                    self._report(exc)
                    stop.wait(_ERROR_PAUSE_S)
        finally:
            stop.set()
            with self._lock:
                try:
                    self._last_stats = self.stats()
                except CaptureError:
                    pass
                self._handle = None
                handle.close()

    def _drain(self, handle, stop: threading.Event) -> None:
        # In non-blocking mode dispatch() hands over one ring block and 0 once empty; from NFLOG
        # one read (up to logrules.NFLOG_BATCH messages), and once empty libpcap's error for EAGAIN.
        while not stop.is_set():
            with self._lock:
                try:
                    if handle.dispatch(-1, self._on_packet) <= 0:
                        return
                except pcapy.PcapError as exc:
                    if self._nflog and _EAGAIN in str(exc):
                        return
                    raise

    def _on_packet(self, hdr, data: bytes) -> None:
        if self._stop.is_set():  # stop() from on_event: skip the rest of the block
            return
        sec, usec = hdr.getts()
        event = parse_packet(self._datalink, data, self.interface, sec + usec / 1e6)
        if event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:
            self._report(exc)

    def _interface_present(self) -> bool:
        if self._ifindex is None:  # "any" and other devices without an index
            return True
        try:
            return socket.if_nametoindex(self.interface) == self._ifindex  # new device, same name: gone
        except OSError:
            return False

    def _report(self, exc: Exception) -> None:
        if self._on_error is not None:
            try:
                self._on_error(self.interface, exc)
                return
            except Exception:
                log.exception("on_error callback failed for %s", self.interface)
        log.error("capture on %s: %s", self.interface, exc, exc_info=exc)
