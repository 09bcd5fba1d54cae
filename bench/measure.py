"""Small measuring tools: percentiles, a process's CPU and RSS, the service's logs, iperf3."""
import glob
import json
import os
import sys
import time
from datetime import datetime

CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(values, p):
    v = percentile(values, p)
    return None if v is None else round(1000 * v, 3)


def cpu_seconds(pid):
    """user + system CPU of every thread of `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def idle_cpu_percent(pid, secs):
    """% of one core `pid` used over `secs` seconds (call it with no traffic)."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(secs)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def machine_busy_percent(secs=1.0):
    """% of all CPUs busy over `secs` (from /proc/stat): what else runs on the machine."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]   # total, idle + iowait
    t0, i0 = sample()
    time.sleep(secs)
    t1, i1 = sample()
    return round(100.0 * (1 - (i1 - i0) / max(t1 - t0, 1)), 1)


def _stamp(text):
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _log_rows(log_dir, iface):
    """The nine columns of every line of the tab log and its rotated files, oldest first."""
    for path in sorted(glob.glob(os.path.join(log_dir, f"{iface}.log*")), reverse=True):
        try:
            with open(path) as f:
                lines = f.readlines()
        except OSError:
            continue   # rotated away under us: the next poll reads it under its new name
        for line in lines:
            cols = line.rstrip("\n").split("\t")
            if len(cols) == 9:
                yield cols


def read_log(log_dir, iface):
    """{(src, sport, dst, dport): (bytes, epoch time written)} from the tab log and its rotated files."""
    return {(c[3], int(c[4]), c[5], int(c[6])): (int(c[8]), c[0]) for c in _log_rows(log_dir, iface)}


def log_counts(log_dir, iface):
    """{(src, sport, dst, dport): number of records} from the tab log and its rotated files."""
    out = {}
    for c in _log_rows(log_dir, iface):
        key = (c[3], int(c[4]), c[5], int(c[6]))
        out[key] = out.get(key, 0) + 1
    return out


def wait_counted(log_dir, iface, expected, timeout, interval=0.2):
    """Poll until every 4-tuple has at least as many records as `expected` ({key: n}) says: a
    4-tuple used twice must be logged twice. Returns how many records are still missing."""
    deadline = time.monotonic() + timeout
    while True:
        counts = log_counts(log_dir, iface)
        short = sum(max(0, n - counts.get(k, 0)) for k, n in expected.items())
        if not short or time.monotonic() > deadline:
            return short
        time.sleep(interval)


def wait_logged(log_dir, iface, keys, timeout, interval=0.1):
    """Poll the log until every key is in it or `timeout` passes: (log, missing keys)."""
    deadline = time.monotonic() + timeout
    while True:
        log = read_log(log_dir, iface)
        missing = [k for k in keys if k not in log]
        if not missing or time.monotonic() > deadline:
            return log, missing
        time.sleep(interval)


def written_at(log, keys):
    """Epoch times at which the records of `keys` were written (their log timestamps)."""
    return [_stamp(log[k][1]) for k in keys if k in log]


def iperf(run, server_ip, port, secs, reverse=False):
    """Throughput in Gbit/s of one iperf3 upload (a download with `reverse`: the data then comes
    in through INPUT); `run(argv)` runs a command and returns stdout."""
    argv = ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(secs), "-J"] + (["-R"] if reverse else [])
    if secs >= 4:
        argv += ["-O", "1"]   # leave out the first second (slow start)
    for attempt in range(3):
        out = run(argv)
        try:
            data = json.loads(out)
            return data["end"]["sum_received"]["bits_per_second"] / 1e9
        except (ValueError, KeyError):
            time.sleep(0.5)   # the server may still be finishing the previous test
    raise RuntimeError(f"iperf3 failed: {out[-500:]}")


class NeighbourLoad:
    """CPU used by processes that are not ours (not descendants of this one), sampled every second.

    The machine has 2 cores and other people's test runs may share it: `by_phase()` says how much of a
    core they took during each phase (kernel threads and processes shorter than a second are not seen).
    """

    def __init__(self, interval=1.0):
        import threading
        self.interval = interval
        self.phase = "start"
        self.samples = {}     # phase -> [% of one core]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    @staticmethod
    def _read():
        procs = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))   # ppid, utime + stime
        return procs

    def _foreign(self, procs):
        me, ours = os.getpid(), set()
        for pid in procs:
            chain, p = [], pid
            while p in procs and p not in ours and p != me and p > 2:
                chain.append(p)
                p = procs[p][0]
            if p == me or p in ours:
                ours.update(chain)
        return {pid: v[1] for pid, v in procs.items() if pid not in ours and pid != me and v[0] != 2 and pid > 2}

    def _run(self):
        before, t0 = self._foreign(self._read()), time.monotonic()
        while not self._stop.wait(self.interval):
            now, t1 = self._foreign(self._read()), time.monotonic()
            ticks = sum(v - before.get(pid, v) for pid, v in now.items())
            self.samples.setdefault(self.phase, []).append(100.0 * ticks / CLK_TCK / (t1 - t0))
            before, t0 = now, t1

    def by_phase(self):
        return {phase: {"mean": round(sum(v) / len(v), 1), "max": round(max(v), 1)}
                for phase, v in self.samples.items() if v}


def rounds_argument(default):
    """ROUNDS, the one argument of the stand-alone experiments (jump_cost.py, layer_cost.py),
    which need root."""
    if os.geteuid() != 0:
        sys.exit("root only")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else default
    if rounds < 1:
        sys.exit("ROUNDS must be at least 1")
    return rounds
