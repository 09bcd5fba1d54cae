"""PcapCapture against the real kernel, always inside the test's namespaces.

The capture runs in-process in a helper interpreter started in namespace `a`
(a thread cannot change namespace on its own), which prints one JSON line per
event; the traffic is made by small client/server scripts in `a` and `b`.
"""
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import uuid

import pytest

from nstools import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
SYN, FIN, RST, ACK = 0x02, 0x01, 0x04, 0x10

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

CAPTURE = r"""
import dataclasses, json, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import profiler.capture
from profiler.capture import PcapCapture
if os.environ.get("NP_CAPTURE_BLOCK_TIMEOUT_MS"):  # only to show what the 1 ms timeout buys
    profiler.capture._BLOCK_TIMEOUT_MS = int(os.environ["NP_CAPTURE_BLOCK_TIMEOUT_MS"])
iface, raise_once, source = sys.argv[2], sys.argv[3] == "raise-once", sys.argv[4]
lock, done, raised = threading.Lock(), threading.Event(), []
firewall = device = None
if source == "nflog":   # the service's capture rules, from the firewall adapter
    from profiler.firewall import IptablesFirewall
    firewall = IptablesFirewall([iface], nflog_groups={iface: 7460})
    firewall.setup()
    device = "nflog:7460"

def emit(**kw):
    with lock:
        print(json.dumps(kw), flush=True)

def on_event(ev):
    recv = time.time()
    if raise_once and not raised:
        raised.append(ev)
        raise RuntimeError("boom from on_event")
    emit(kind="event", recv=recv, **dataclasses.asdict(ev))

def on_error(name, exc):
    emit(kind="error", interface=name, type=type(exc).__name__, message=str(exc),
         running=cap.running)

signal.signal(signal.SIGTERM, lambda *a: done.set())
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
cap = PcapCapture(iface, on_event, on_error=on_error, device=device)
cap.start()
threads = [(t.name, t.daemon) for t in threading.enumerate()]
emit(kind="ready", datalink=cap._datalink, threads=threads, running=cap.running)
while not done.wait(0.02):
    if not cap.running:
        emit(kind="ended")
        done.wait()
t0 = time.monotonic()
cap.stop()
cap.stop()  # idempotent
emit(kind="stopped", stop_s=time.monotonic() - t0, running=cap.running, stats=cap.stats(),
     thread_alive=any(t.name == "capture-" + iface for t in threading.enumerate()))
if firewall is not None:
    firewall.teardown()
"""

SERVER = r"""
import json, socket, sys
host = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, 0))
s.listen()
print(json.dumps({"port": s.getsockname()[1]}), flush=True)
while True:
    c, _ = s.accept()
    with c:
        try:
            while data := c.recv(4096):
                c.sendall(data)
        except ConnectionResetError:
            pass
"""

CLIENT = r"""
import json, socket, struct, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(5)
s.bind(("", 0))
sport = s.getsockname()[1]
try:
    s.connect((host, port))
except ConnectionRefusedError:
    print(json.dumps({"sport": sport, "refused": True}))
    sys.exit(0)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(3):  # data-only segments both ways: the filter must drop them
    s.sendall(b"x" * 100)
    got = b""
    while len(got) < 100:
        got += s.recv(100 - len(got))
if mode == "rst":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
else:
    s.shutdown(socket.SHUT_WR)
    while s.recv(4096):
        pass
s.close()
print(json.dumps({"sport": sport, "refused": False}))
"""


class Lines:
    """Collects a subprocess's JSON stdout lines in a background thread."""

    def __init__(self, proc):
        self.proc, self.items, self._q = proc, [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._q.put(json.loads(line))

    def _drain(self):
        while True:
            try:
                self.items.append(self._q.get_nowait())
            except queue.Empty:
                return self.items

    def wait(self, predicate, what, timeout=10.0):
        return wait_for(lambda: [i for i in self._drain() if predicate(i)], timeout, what=what)


class Capture(Lines):
    def __init__(self, ns, iface, mode="plain", source="interface"):
        proc = ns.popen(PY, "-c", CAPTURE, ROOT, iface, mode, source, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
        super().__init__(proc)
        self.iface, self.source = iface, source
        self.ready = self.wait(lambda i: i["kind"] == "ready", f"capture on {iface} ready")[0]

    def events(self, match=lambda e: True):
        return [i for i in self._drain() if i["kind"] == "event" and match(i)]

    def finish(self):
        """Stop the capture cleanly; return its final report."""
        self.proc.stdin.close()
        report = self.wait(lambda i: i["kind"] == "stopped", "capture stopped")[0]
        self.proc.wait(timeout=10)
        assert report["stop_s"] < 0.5 and not report["running"] and not report["thread_alive"]
        return report


def serve(ns, host):
    server = Lines(ns.popen(PY, "-c", SERVER, host, stdout=subprocess.PIPE, text=True))
    return server.wait(lambda i: "port" in i, f"server on {host} listening")[0]["port"]


def connect(ns, host, port, mode="close"):
    out = ns.run(PY, "-c", CLIENT, host, str(port), mode, timeout=20).stdout
    return json.loads(out)["sport"]


def conn_events(cap, client, sport, server, port, count):
    """Exactly `count` events of one connection (waits for them, then for stragglers)."""
    def mine(e):
        ends = {(e["src"], e["sport"]), (e["dst"], e["dport"])}
        return ends == {(client, sport), (server, port)}
    cap.wait(lambda i: i["kind"] == "event" and mine(i), f"{count} events", timeout=10)
    wait_for(lambda: len(cap.events(mine)) >= count, what=f"{count} events of the connection")
    return [((e["src"], e["sport"]) == (client, sport), e["flags"]) for e in cap.events(mine)]


def lifecycle(pair, cap, client_ns, client, server_ns, server, family):
    port = serve(server_ns, server)
    sport = connect(client_ns, server, port)
    events = conn_events(cap, client, sport, server, port, 4)
    # True = sent by the client.  SYN, SYN-ACK, both FINs; the handshake's ACK,
    # the six data segments, their ACKs and the last ACK are filtered out.
    assert sorted(events) == sorted([(True, SYN), (False, SYN | ACK),
                                     (True, FIN | ACK), (False, FIN | ACK)])
    for e in cap.events():
        assert e["family"] == family and e["interface"] == cap.iface
        assert e["flags"] & (SYN | FIN | RST), e
    rst_sport = connect(client_ns, server, port, "rst")
    events = conn_events(cap, client, rst_sport, server, port, 3)
    assert sorted(events) == sorted([(True, SYN), (False, SYN | ACK), (True, RST | ACK)])
    report = cap.finish()
    assert report["stats"]["received"] >= 7 and report["stats"]["dropped"] == 0
    # Nothing passed the filter unparsed.  On lo the kernel counts each packet
    # twice (sent and received) and libpcap drops the sent copy.
    # From NFLOG a loopback packet is taken once, on its way out.
    looped = client == server and cap.source == "interface"
    assert report["stats"]["received"] == len(cap.events()) * (2 if looped else 1)


SOURCES = pytest.mark.parametrize("source", ["interface", "nflog"])
DLT_NFLOG = 239


@SOURCES
def test_ipv4_over_veth(netpair, source):
    cap = Capture(netpair.a, netpair.iface_a, source=source)
    assert cap.ready["datalink"] == (1 if source == "interface" else DLT_NFLOG) and cap.ready["running"]
    assert [f"capture-{netpair.iface_a}", True] in cap.ready["threads"]
    lifecycle(netpair, cap, netpair.a, netpair.ip_a, netpair.b, netpair.ip_b, socket.AF_INET)


@SOURCES
def test_ipv6_over_veth_peer_initiated(netpair, source):
    cap = Capture(netpair.a, netpair.iface_a, source=source)
    lifecycle(netpair, cap, netpair.b, netpair.ip6_b, netpair.a, netpair.ip6_a, socket.AF_INET6)


@SOURCES
def test_loopback_inside_namespace(netpair, source):
    cap = Capture(netpair.a, "lo", source=source)
    lifecycle(netpair, cap, netpair.a, "127.0.0.1", netpair.a, "127.0.0.1", socket.AF_INET)


@SOURCES
def test_any_uses_linux_cooked_capture(netpair, source):
    cap = Capture(netpair.a, "any", source=source)
    assert cap.ready["datalink"] == (113 if source == "interface" else DLT_NFLOG)  # DLT_LINUX_SLL
    lifecycle(netpair, cap, netpair.a, netpair.ip6_a, netpair.b, netpair.ip6_b, socket.AF_INET6)
    # loopback as well, each packet once
    cap = Capture(netpair.a, "any", source=source)
    lifecycle(netpair, cap, netpair.a, "127.0.0.1", netpair.a, "127.0.0.1", socket.AF_INET)


@SOURCES
def test_single_syn_is_delivered_promptly(netpair, source):
    """The immediate-mode stand-in: a lone SYN must not wait for a ring block
    to fill or for a long timeout.  Without it this fails: with
    NP_CAPTURE_BLOCK_TIMEOUT_MS=0 (libpcap's default) nothing is delivered at
    all, with =100 the delays are ~45-85 ms. From NFLOG: without the capture's flush timeout (10 ms)
    the kernel holds packets up to a second."""
    cap = Capture(netpair.a, netpair.iface_a, source=source)
    closed_port = 9
    delays = []
    for _ in range(5):
        sport = connect(netpair.b, netpair.ip_a, closed_port)  # SYN in, RST out: no other traffic
        ev = cap.wait(lambda i: i["kind"] == "event" and i["sport"] == sport and i["flags"] == SYN,
                      "the SYN", timeout=5)[0]
        delays.append((ev["recv"] - ev["ts"]) * 1000)
    print("SYN delivery delays (ms):", [round(d, 2) for d in delays])
    assert max(delays) < 100 and statistics.median(delays) < 20, delays
    cap.finish()


def test_callback_errors_are_reported_and_capture_continues(netpair):
    cap = Capture(netpair.a, netpair.iface_a, mode="raise-once")
    port = serve(netpair.b, netpair.ip_b)
    sport = connect(netpair.a, netpair.ip_b, port)
    err = cap.wait(lambda i: i["kind"] == "error", "on_error")[0]
    assert (err["interface"], err["type"], err["message"]) == (netpair.iface_a, "RuntimeError",
                                                               "boom from on_event")
    conn_events(cap, netpair.ip_a, sport, netpair.ip_b, port, 3)  # all but the one that raised
    cap.finish()


def test_link_down_is_reported_and_capture_resumes(netpair):
    cap = Capture(netpair.a, netpair.iface_a)
    netpair.a.run("ip", "link", "set", netpair.iface_a, "down")
    err = cap.wait(lambda i: i["kind"] == "error", "on_error for link down")[0]
    assert err["type"] == "CaptureError" and netpair.iface_a in err["message"] and err["running"]
    netpair.a.run("ip", "link", "set", netpair.iface_a, "up")
    wait_for(lambda: netpair.a.run("ping", "-c1", "-W1", netpair.ip_b, check=False).returncode == 0,
             what="link up again")
    port = serve(netpair.b, netpair.ip_b)
    sport = connect(netpair.a, netpair.ip_b, port)
    conn_events(cap, netpair.ip_a, sport, netpair.ip_b, port, 4)
    assert not [i for i in cap.items if i["kind"] == "ended"]
    cap.finish()


@SOURCES
def test_vanished_interface_is_reported_and_capture_ends(netpair, source):
    cap = Capture(netpair.a, netpair.iface_a, source=source)
    netpair.a.run("ip", "link", "del", netpair.iface_a)
    err = cap.wait(lambda i: i["kind"] == "error", "on_error for vanished interface")[0]
    assert err["type"] == "CaptureError" and "gone" in err["message"] and not err["running"]
    assert netpair.iface_a in err["message"]
    cap.wait(lambda i: i["kind"] == "ended", "capture thread ended")
    cap.finish()


@SOURCES
def test_missing_interface_fails_start_with_its_name(source):
    from profiler.capture import PcapCapture
    from profiler.errors import CaptureError
    name = "npx" + uuid.uuid4().hex[:8]  # cannot exist: nothing on the host is opened
    cap = PcapCapture(name, lambda ev: None, device="nflog:7460" if source == "nflog" else None)
    with pytest.raises(CaptureError, match=name):
        cap.start()
    assert not cap.running
    cap.stop()


def test_an_nflog_group_another_program_reads_fails_start_naming_it(netpair):
    out = netpair.a.run(PY, "-c", r"""
import sys
sys.path.insert(0, sys.argv[1])
import pcapy
from profiler.capture import PcapCapture
from profiler.errors import CaptureError
other = pcapy.create("nflog:7470")      # as ulogd would hold it
assert other.activate() == 0
try:
    PcapCapture("lo", lambda ev: None, device="nflog:7470").start()
except CaptureError as exc:
    print(exc)
""", ROOT).stdout
    assert "NFLOG group 7470" in out and "NFLOG_GROUP" in out


BULK = r"""
import json, socket, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
def sink():
    while True:
        c, _ = srv.accept()
        threading.Thread(target=lambda c=c: (c.recv(1 << 20) and None, [None for _ in iter(lambda: c.recv(1 << 20), b"")], c.close()), daemon=True).start()
threading.Thread(target=sink, daemon=True).start()
clients = [socket.create_connection(srv.getsockname()) for _ in range(40)]
ports = [c.getsockname()[1] for c in clients]
for c in clients:       # corked: the FIN rides on the data, a packet of 64 KB on lo
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    c.sendall(b"x" * 65000)
    c.close()
print(json.dumps({"port": srv.getsockname()[1], "clients": ports}), flush=True)
import time; time.sleep(1)
"""


def test_nflog_reads_of_many_large_fins_lose_none(netpair):
    """The kernel gathers up to 16 packets a read: the capture has it copy only the first 256
    bytes of each (were a read of FINs on 64 KB segments copied whole, it could outgrow
    libpcap's buffer) and hand them over within 10 ms; FINs on large segments all arrive."""
    cap = Capture(netpair.a, "lo", source="nflog")
    # group, portid, queued, copy mode, copy range, flush timeout (1/100 s), use
    groups = [line.split() for line in netpair.a.run("cat", "/proc/net/netfilter/nfnetlink_log").stdout.splitlines()]
    assert [g[3:6] for g in groups if g[0] == "7460"] == [["2", "256", "1"]]
    out = json.loads(netpair.a.run(PY, "-c", BULK).stdout.splitlines()[0])
    fins = lambda: {e["sport"] for e in cap.events(lambda e: e["flags"] & FIN and e["dport"] == out["port"])}  # noqa: E731
    wait_for(lambda: fins() >= set(out["clients"]), timeout=10, what="every client's FIN")
    assert not [i for i in cap.items if i["kind"] == "error"]
    report = cap.finish()
    assert report["stats"]["dropped"] == 0
