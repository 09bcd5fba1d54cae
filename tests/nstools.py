"""Real network namespaces for tests: two hosts joined by a veth pair.

Everything made here is removed in `close()`, which the fixtures call even when
a test fails: the processes we started (by PID), then the namespaces (which
takes their veth ends and every netfilter rule inside them along).
"""
import itertools
import os
import signal
import subprocess
import time
import uuid

_counter = itertools.count(1)


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll `predicate` until it returns a truthy value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Namespace:
    def __init__(self, name):
        self.name = name
        self.procs = []

    def cmd(self, *args):
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args, check=True, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(*args), check=check, **kw)

    def popen(self, *args, **kw):
        proc = subprocess.Popen(self.cmd(*args), **kw)
        self.procs.append(proc)
        return proc

    def stop_processes(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
                except ProcessLookupError:
                    pass
        self.procs.clear()


class NetPair:
    """Namespaces `a` (the worker node) and `b` (the peer) joined by a veth.

    a: 10.231.N.1/24 and fd00:231:N::1/64 on interface `self.iface_a`
    b: 10.231.N.2/24 and fd00:231:N::2/64 on interface `self.iface_b`
    """

    def __init__(self):
        n = (os.getpid() + next(_counter)) % 250 + 1
        tag = uuid.uuid4().hex[:6]
        self.a = Namespace(f"np-a-{tag}")
        self.b = Namespace(f"np-b-{tag}")
        self.iface_a = f"npa{tag}"
        self.iface_b = f"npb{tag}"
        self.ip_a, self.ip_b = f"10.231.{n}.1", f"10.231.{n}.2"
        self.ip6_a, self.ip6_b = f"fd00:231:{n}::1", f"fd00:231:{n}::2"
        self._created = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _sh(self, *args):
        subprocess.run(args, check=True, capture_output=True, text=True)

    def _build(self):
        for ns in (self.a, self.b):
            self._sh("ip", "netns", "add", ns.name)
            self._created.append(ns)
        self.make_link()

    def make_link(self):
        """The veth pair with its addresses; also to bring it back after a test deleted it."""
        self._sh("ip", "link", "add", self.iface_a, "netns", self.a.name,
                 "type", "veth", "peer", "name", self.iface_b, "netns", self.b.name)
        for ns, iface, ip4, ip6 in ((self.a, self.iface_a, self.ip_a, self.ip6_a),
                                    (self.b, self.iface_b, self.ip_b, self.ip6_b)):
            ns.run("ip", "link", "set", "lo", "up")
            ns.run("ip", "addr", "add", f"{ip4}/24", "dev", iface)
            ns.run("ip", "-6", "addr", "add", f"{ip6}/64", "dev", iface, "nodad")
            ns.run("ip", "link", "set", iface, "up")
        wait_for(lambda: self.a.run("ping", "-c1", "-W1", self.ip_b, check=False).returncode == 0,
                 timeout=10, what="veth link up")

    def close(self):
        for ns in (self.a, self.b):
            ns.stop_processes()
        for ns in self._created:
            subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        self._created.clear()
