"""Hold each new connection's SYN in the kernel (NFQUEUE) until its accounting
rules exist, so that not one byte of the connection escapes them.

Facts this relies on (kernel 6.18, iptables-legacy, NetfilterQueue 1.1.0):

* A SYN accepted from `mangle OUTPUT` continues with the hooks after it,
  `filter OUTPUT` included, and one accepted from `mangle INPUT` continues with
  `filter INPUT`.  Rules read the live ruleset when the packet re-enters it, so
  a counting rule inserted while its SYN was held counts that SYN.
* Accepted, a SYN skips the rest of the mangle chain it was held in: the
  jumps into our hold chains are appended (firewall.py), so the rules other
  programs had there when the service started see every SYN first.  (NF_REPEAT
  walks the whole chain again from the top, and the repeated SYN would need a
  mark of its own to pass our hold: a label set through NFQA_CT, which needs
  CONFIG_NETFILTER_NETLINK_GLUE_CT, not built into this kernel.)
* `--queue-bypass`: with no program bound to the queue, packets pass as if the
  rule were not there.  When the bound program dies (or unbinds), the kernel
  DROPS the packets it still holds; the client retransmits its SYN after the
  initial RTO (1 s) and that copy bypasses.  Hence `stop()` accepts everything
  first (fail open), and a crash costs the held connections one second.
* NetfilterQueue lets a verdict be given after the callback returned (the
  Packet keeps its id and queue; only the payload is gone), and from any
  thread: every libnetfilter_queue call it makes runs under the GIL except the
  recv() in run(), so a verdict (one sendmsg) from another thread cannot
  interleave with the library's state.  Our own lock adds the one thing the
  GIL does not give: no verdict after unbind, and at most one per packet.
* The queue is bound for all families at once (nfq_bind_pf is a no-op since
  Linux 3.8): one queue number serves the iptables and ip6tables rules.
"""
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from netfilterqueue import NetfilterQueue

from profiler.errors import ProfilerError

log = logging.getLogger(__name__)

COPY_RANGE = 128  # IPv6 + a few extension headers + TCP ports; the rest is never read
_IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options


class SynQueueError(ProfilerError):
    """The netfilter queue could not be bound or read."""


@dataclass(frozen=True)
class HeldSyn:
    family: int
    src: str
    sport: int
    dst: str
    dport: int
    ts: float  # wall-clock time when the queue thread read the packet
    hook: int  # netfilter hook: 0 PRE_ROUTING, 1 LOCAL_IN, 3 LOCAL_OUT, ...
    ifindex: int = 0  # the device it arrived on (LOCAL_IN) or leaves by (LOCAL_OUT)


Batch = list[tuple[HeldSyn, Callable[[], None]]]


class SynQueue:
    """Hands held SYNs to `on_syns` in batches, from the queue's own thread.

    `on_syns` gets every packet that was waiting when the thread woke up, each
    with a `release()` that accepts it; release may be called at any time
    from any thread, more than once, and after stop() (then it does nothing).
    A packet `on_syns` never releases stays held until stop().  If on_syns
    raises, its whole batch is released so that connections are not stalled.
    A SYN held for longer than the client's RTO (1 s) is retransmitted and
    queued again: the same 4-tuple then arrives twice, so commits must be
    idempotent.  Beyond `max_len` held packets the kernel drops new SYNs
    (NetfilterQueue 1.1.0 cannot set NFQA_CFG_F_FAIL_OPEN).
    """

    def __init__(self, queue_num: int, on_syns: Callable[[Batch], None], *, max_len=4096):
        self.queue_num = queue_num
        self._on_syns = on_syns
        self._max_len = max_len
        self._lock = threading.Lock()
        self._held = {}  # kernel packet id -> Packet, for fail-open on stop
        self._batch = []
        self._nfq = None
        self._thread = None
        self._wake_r = self._wake_w = None
        self._stopping = threading.Event()
        self._stats = {"held": 0, "released": 0, "received": 0, "batches": 0,
                       "max_batch": 0, "unparsed": 0}

    def start(self):
        if self._thread is not None:
            raise SynQueueError("SynQueue can be started once")
        nfq = None
        try:
            nfq = NetfilterQueue()
            nfq.bind(self.queue_num, self._on_packet, max_len=self._max_len, range=COPY_RANGE)
        except OSError as e:
            if nfq is not None:
                nfq.unbind()
            raise SynQueueError(
                f"cannot bind NFQUEUE {self.queue_num} (root needed; is another "
                f"process bound to it?): {e}") from e
        self._nfq = nfq
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=f"synqueue-{self.queue_num}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout=5.0):
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            if self._wake_w is not None:  # None: the thread already shut down
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass  # pipe full: the thread is being woken anyway
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("NFQUEUE %d: on_syns did not return within %.1fs; releasing "
                          "held SYNs from the stopping thread", self.queue_num, timeout)
                self._shutdown()

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, held=len(self._held))

    def _run(self):
        fd = self._nfq.get_fd()
        try:
            while not self._stopping.is_set():
                ready, _, _ = select.select([fd, self._wake_r], [], [])
                if fd in ready:
                    # Non-blocking drain: whatever queued up meanwhile is one batch.
                    self._nfq.run(block=False)
                batch, self._batch = self._batch, []
                if batch and not self._stopping.is_set():
                    self._deliver(batch)
        except Exception:
            log.exception("NFQUEUE %d reader failed; releasing held SYNs", self.queue_num)
        finally:
            self._shutdown()

    def _deliver(self, batch):
        with self._lock:
            self._stats["batches"] += 1
            self._stats["max_batch"] = max(self._stats["max_batch"], len(batch))
        try:
            self._on_syns(batch)
        except Exception:
            log.exception("on_syns failed; releasing its %d SYNs", len(batch))
            for _, release in batch:
                release()

    def _on_packet(self, pkt):
        # Runs inside nfq_handle_packet: an exception here would abort run(),
        # so anything unexpected lets the packet through instead.
        try:
            syn = _parse(pkt.get_payload(), pkt.hook)
            if syn is not None:
                syn = replace(syn, ifindex=pkt.outdev if pkt.hook == 3 else pkt.indev)
        except Exception:
            syn = None
        with self._lock:
            self._stats["received"] += 1
            if syn is None:
                self._stats["unparsed"] += 1
                self._verdict(pkt)
                return
            self._held[pkt.id] = pkt
        self._batch.append((syn, lambda pid=pkt.id: self._release(pid)))

    def _release(self, pid):
        with self._lock:
            pkt = self._held.pop(pid, None)
            if pkt is not None:
                self._verdict(pkt)

    def _verdict(self, pkt):
        # Caller holds self._lock.
        try:
            pkt.accept()
            self._stats["released"] += 1
        except (OSError, RuntimeError) as e:
            log.warning("NFQUEUE %d: verdict for packet %d failed: %s",
                        self.queue_num, pkt.id, e)

    def _shutdown(self):
        with self._lock:
            if self._nfq is None:
                return
            held, self._held = self._held, {}
            for pkt in held.values():
                self._verdict(pkt)
            self._nfq.unbind()
            self._nfq = None
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None
        if held:
            log.info("NFQUEUE %d stopped; released %d held SYNs", self.queue_num, len(held))


def _parse(data, hook):
    version = data[0] >> 4
    if version == 4:
        family, proto, l4 = socket.AF_INET, data[9], (data[0] & 15) * 4
        src, dst = data[12:16], data[16:20]
    elif version == 6:
        family, proto, l4 = socket.AF_INET6, data[6], 40
        src, dst = data[8:24], data[24:40]
        while proto in _IPV6_EXT:
            proto, l4 = data[l4], l4 + (data[l4 + 1] + 1) * 8
    else:
        return None
    if proto != socket.IPPROTO_TCP:
        return None
    sport, dport = struct.unpack_from("!HH", data, l4)
    return HeldSyn(family, str(ipaddress.ip_address(src)), sport,
                   str(ipaddress.ip_address(dst)), dport, time.time(), hook)
