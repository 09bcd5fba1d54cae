"""The benchmark's world: tools, two namespaces joined by a veth, and the processes in them.

Everything made here is removed by `Env.close()` (processes by PID, then the namespaces), which
run.py calls from a `finally`, on SIGTERM and on Ctrl-C as well.
"""
import json
import os
import select
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]

from nstools import NetPair  # noqa: E402

PYTHON = sys.executable
AGENT = os.path.join(HERE, "agent.py")
TOOLS = {"netstat": "net-tools", "iperf3": "iperf3", "ethtool": "ethtool"}
HOLD_PORT, SHORT_PORT, IPERF_PORT = 7000, 7001, 5201
PER_FOREIGN = 10_000
# The driver runs in the host's namespace: the agents (inside ours) refuse netfilter work in this one.
os.environ.setdefault("BENCH_HOST_NETNS", str(os.stat("/proc/self/ns/net").st_ino))


def ensure_tools():
    """Install the Debian packages of missing tools; returns notes on what was installed."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return []
    print(f"installing {' '.join(missing)} with apt-get ...", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return [f"installed with apt-get: {' '.join(missing)}"]


class Agent:
    """A bench/agent.py process in a namespace, answering one JSON line per request."""

    def __init__(self, ns, role, *args):
        self.proc = ns.popen(PYTHON, AGENT, role, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        self.pid = self.proc.pid   # `ip netns exec` execs: the same process

    def read(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"agent {self.pid} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {self.pid} exited (code {self.proc.poll()})")
        return json.loads(line)

    def call(self, op, timeout=120, **kw):
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        ans = self.read(timeout)
        if "error" in ans:
            raise RuntimeError(f"agent {op}: {ans['error']}")
        return ans


class Env:
    def __init__(self, foreign_sockets):
        self.bare = None
        self.pair = NetPair()
        try:
            p = self.pair
            self.servers = [Agent(p.b, "server", "--bind", p.ip_b, "--port", str(port))
                            for port in (HOLD_PORT, SHORT_PORT)]
            for s in self.servers:
                s.read(30)
            self._ref_link()
            # RLIMIT_NOFILE's hard limit may be 20,000 (no CAP_SYS_RESOURCE): at most 10,000 a process.
            shares = [min(PER_FOREIGN, foreign_sockets - i) for i in range(0, foreign_sockets, PER_FOREIGN)]
            self.foreign = [Agent(p.a, "foreign", "--count", str(n)) for n in shares]
            self.foreign_count = sum(f.read(300)["sockets"] for f in self.foreign)
            self.iperf_server = p.b.popen("iperf3", "-s", "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            # A link in namespaces of its own, where no table is loaded and conntrack is off: the
            # data path with nothing of the service at all (the reference link above shares the
            # service's namespace, so its packets meet the service's tables and mangle rules too).
            self.bare = NetPair()
            self.bare.b.popen("iperf3", "-s", "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        except BaseException:
            self.close()
            raise

    def _ref_link(self):
        """A second veth between the same namespaces that the service does not watch: the rule-free
        data path, measured interleaved with the watched one (same CPUs, same moment)."""
        p = self.pair
        self.ref_a, self.ref_b = "r" + p.iface_a[1:], "r" + p.iface_b[1:]
        octet = int(p.ip_a.split(".")[2]) % 250 + 1
        self.ref_ip_a, self.ref_ip_b = f"10.231.{octet}.1", f"10.231.{octet}.2"
        subprocess.run(["ip", "link", "add", self.ref_a, "netns", p.a.name, "type", "veth", "peer", "name",
                        self.ref_b, "netns", p.b.name], check=True, capture_output=True)
        for ns, iface, ip in ((p.a, self.ref_a, self.ref_ip_a), (p.b, self.ref_b, self.ref_ip_b)):
            ns.run("ip", "addr", "add", f"{ip}/24", "dev", iface)
            ns.run("ip", "link", "set", iface, "up")
        p.a.run("ping", "-c1", "-W2", self.ref_ip_b, check=False)

    def offloads(self, on):
        """TSO/GSO/GRO on or off on every veth end (off: netfilter sees 1,500-byte packets)."""
        state = "on" if on else "off"
        p = self.pair
        ends = [(p.a, p.iface_a), (p.b, p.iface_b), (p.a, self.ref_a), (p.b, self.ref_b)]
        if self.bare is not None:
            ends += [(self.bare.a, self.bare.iface_a), (self.bare.b, self.bare.iface_b)]
        for ns, iface in ends:
            ns.run("ethtool", "-K", iface, "tso", state, "gso", state, "gro", state)

    def client(self):
        return Agent(self.pair.a, "client")

    def close(self):
        if self.bare is not None:
            self.bare.close()
        self.pair.close()
