"""End-to-end harness: the real service in namespace `a`, traffic, and the ground truth.

The ground truth is a packet capture (tcpdump) on the same interface: for each
connection and direction, the sum of the IP-layer lengths of its packets, the
same bytes netfilter counts (IPv4 total length; IPv6 payload length + 40).
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict

import dpkt

from nstools import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
MAIN = os.path.join(ROOT, "main.py")
TRAFFIC = os.path.join(ROOT, "tests", "traffic.py")


class Service:
    """main.py running inside namespace `ns`, with its own config and log dir."""

    def __init__(self, ns, interfaces, port=18080, host_mounts=False, **config):
        self.ns = ns
        # `ip netns exec` mounts a fresh /sys (no cgroup file system); nsenter --net keeps the host's.
        self.host_mounts = host_mounts
        self.token = config.get("API_TOKEN", "")
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="netprof-test-")
        self.log_dir = os.path.join(self.dir, "logs")
        lines = ["[CONFIG]", f"INTERFACE = {','.join(interfaces)}", f"LOG_DIR = {self.log_dir}"]
        lines += [f"{k.upper()} = {v}" for k, v in config.items()]
        self.config_path = os.path.join(self.dir, "config.ini")
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.out_path = os.path.join(self.dir, "service.out")
        self.proc = None

    def start(self, timeout=30):
        self._out = open(self.out_path, "w")
        verbose = ["-v"] if os.environ.get("NETPROF_TEST_VERBOSE") else []
        cmd = [PYTHON, MAIN, *verbose, "--config", self.config_path, str(self.port)]
        if self.host_mounts:
            self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns.name}", "--", *cmd],
                                         stdout=self._out, stderr=subprocess.STDOUT)
            self.ns.procs.append(self.proc)
        else:
            self.proc = self.ns.popen(*cmd, stdout=self._out, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self.get("/status")[0] == 200, timeout=timeout,
                 what="service ready")
        assert self.proc.poll() is None, f"service exited early:\n{self.output()}"
        return self

    def output(self):
        with open(self.out_path) as f:
            return f.read()

    def request(self, method, path, body=None):
        cmd = ["curl", "-s", "-g", "-X", method, "-o", "-", "-w", "\n%{http_code}", "--max-time", "30",
               f"http://127.0.0.1:{self.port}{path}"]
        if body is not None:
            cmd += ["-H", "Content-Type: application/json", "--data-binary", body]
        if self.token:
            cmd += ["-H", f"Authorization: Bearer {self.token}"]
        r = self.ns.run(*cmd, check=False)
        text, _, code = r.stdout.rpartition("\n")
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = text
        return int(code or 0), data

    def get(self, path):
        return self.request("GET", path)

    def restarted(self, suffix=".2"):
        """The service started again on this one's config, state and logs (after it was killed)."""
        again = Service(self.ns, [], port=self.port, host_mounts=self.host_mounts)
        again.token = self.token
        again.dir, again.config_path, again.log_dir = self.dir, self.config_path, self.log_dir
        again.out_path = self.out_path + suffix
        again.start()
        return again

    def live_out_bytes(self, job):
        """Bytes sent so far by `job`'s connections, open ones read live (0 before it is known)."""
        from urllib.parse import quote
        code, answer = self.get(f"/v1/jobs/{quote(job, safe='')}")
        return answer["totals"]["out_bytes"] if code == 200 else 0

    def start_profile(self, job, proc_pid, owner="root"):
        import psutil
        created = psutil.Process(proc_pid).create_time()
        from urllib.parse import quote
        return self.get(f"/startprofile/jobid={quote(job, safe='')},pid={proc_pid},owner={owner},"
                        f"birthdate={created}")

    def stop(self, timeout=30):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        self._out.close()
        return self.proc.returncode

    def log_lines(self, iface):
        path = os.path.join(self.log_dir, f"{iface}.log")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            # A line still being written (no newline yet) is read at the next poll.
            return [line.rstrip("\n").split("\t") for line in f if line.endswith("\n") and line.strip()]

    def logged(self, iface):
        """{(src, sport, dst, dport): (job, pid, direction, bytes)} from the tab log."""
        out = {}
        for cols in self.log_lines(iface):
            assert len(cols) == 9, cols
            ts, job, pid, src, sport, dst, dport, direction, nbytes = cols
            out[(src, int(sport), dst, int(dport))] = (job, int(pid), direction, int(nbytes))
        return out


    def json_records(self, iface):
        """{(local, lport, remote, rport): record} from the JSON log (LOG_FORMAT = json or both)."""
        path = os.path.join(self.log_dir, f"{iface}.json.log")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.endswith("\n") and line.strip()]
        return {(r["local"], r["local_port"], r["remote"], r["remote_port"]): r for r in recs}


class Capture:
    """tcpdump on an interface of a namespace; `bytes()` gives IP-layer bytes per flow."""

    def __init__(self, ns, iface, bpf="tcp", buffer_kib=None):
        self.ns = ns
        self.path = tempfile.mktemp(prefix="netprof-cap-", suffix=".pcap")
        args = ["tcpdump", "-i", iface, "-s", "128", "-n", "--immediate-mode", "-U", "-w", self.path]
        if buffer_kib:
            args += ["-B", str(buffer_kib)]
        self.proc = ns.popen(*args, bpf, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(self.path) and os.path.getsize(self.path) >= 24, timeout=10,
                 what="tcpdump started")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(10)
        err = self.proc.stderr.read().decode()
        return err

    def bytes(self, until=None):
        flows = defaultdict(int)
        with open(self.path, "rb") as f:
            for ts, data in dpkt.pcap.Reader(f):
                if until is not None and ts > until:
                    continue
                eth = dpkt.ethernet.Ethernet(data)
                ip = eth.data
                if isinstance(ip, dpkt.ip.IP):
                    length = ip.len
                    src, dst = _ntop(ip.src), _ntop(ip.dst)
                elif isinstance(ip, dpkt.ip6.IP6):
                    length = ip.plen + 40
                    src, dst = _ntop(ip.src), _ntop(ip.dst)
                else:
                    continue
                tcp = ip.data
                if not isinstance(tcp, dpkt.tcp.TCP):
                    continue
                flows[(src, tcp.sport, dst, tcp.dport)] += length
        return dict(flows)


def _ntop(raw):
    import ipaddress
    return str(ipaddress.ip_address(raw))


def start_server(ns, bind, port, fork=False, prefork=0):
    args = [PYTHON, TRAFFIC, "server", "--bind", bind, "--port", str(port), "--prefork", str(prefork)]
    if fork:
        args.append("--fork")
    proc = ns.popen(*args, stdout=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline())
    return proc, info


def start_client(ns, remote, port, *, up=0, down=0, count=1, wait=True, extra=()):
    args = [PYTHON, TRAFFIC, "client", "--connect", remote, "--port", str(port), "--up", str(up),
            "--down", str(down), "--count", str(count), *extra]
    if wait:
        args.append("--wait")
    return ns.popen(*args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def key(conn):
    """A client's connection (its JSON line) as the logs and the capture name its outbound bytes."""
    return conn["local"], conn["lport"], conn["remote"], conn["rport"]


def start_upload(svc, p, job, total, pace, sent):
    """A tracked client in `a` sending `total` bytes at `pace` bytes/s to a server in `b`, under way:
    returns once the service counts `sent` of them. `finish_upload()` lets it end."""
    start_server(p.b, p.ip_b, 9000)
    client = start_client(p.a, p.ip_b, 9000, up=total, extra=("--pace", str(pace)))
    assert svc.start_profile(job, client.pid)[0] == 200
    client.stdin.write("go\n")
    client.stdin.flush()
    wait_for(lambda: svc.live_out_bytes(job) > sent, timeout=30, what=f"{sent} bytes sent")
    return client


def finish_upload(client):
    """The connection (JSON line) of a client from start_upload(), once it has exited."""
    conn = json.loads(client.stdout.readline())
    client.stdin.close()
    client.wait(60)
    return conn


def run_client(proc, count, timeout=120):
    """Let a waiting client go; return its per-connection JSON lines once it exits."""
    proc.stdin.write("go\n")
    proc.stdin.flush()
    lines = [json.loads(proc.stdout.readline()) for _ in range(count)]
    proc.stdin.close()
    proc.wait(timeout)
    return lines


def compare(logged, truth, conn):
    """Logged and captured bytes of one connection, both directions: [(dir, logged, truth)]."""
    l, lp, r, rp = conn["local"], conn["lport"], conn["remote"], conn["rport"]
    out = []
    for direction, key in (("OUT", (l, lp, r, rp)), ("IN", (r, rp, l, lp))):
        entry = logged.get(key)
        out.append((direction, None if entry is None else entry[3], truth.get(key, 0), entry))
    return out
