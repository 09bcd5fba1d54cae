"""What a capture costs the data path, alone: paired iperf3 runs with 1,500-byte packets (TSO, GSO
and GRO off) over a veth between two namespaces of our own, without a capture and with one.

    python bench/capture_cost.py [interface|nflog] [repetitions]

interface: tcpdump with the service's SYN/FIN/RST filter on the sender's veth end, as libpcap on
the interface does it (the kernel clones every sent packet for a packet socket before its filter).
nflog: the service's rules in mangle (NETPROF_LOG_*) and tcpdump on the NFLOG group, so that only
SYN, FIN and RST packets are copied. Prints the Gbit/s of each run and the median ratio
with/without. Namespaces npcc-x/npcc-y, 10.231.77.0/24; removed at the end, also on failure.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
X, Y, PORT = "npcc-x", "npcc-y", 5299


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def setup():
    sh("ip", "netns", "add", X)
    sh("ip", "netns", "add", Y)
    sh("ip", "link", "add", "npcc0", "netns", X, "type", "veth", "peer", "name", "npcc1", "netns", Y)
    for ns, dev, ip in ((X, "npcc0", "10.231.77.1/24"), (Y, "npcc1", "10.231.77.2/24")):
        sh("ip", "-n", ns, "addr", "add", ip, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off")


def cleanup():
    for ns in (X, Y):
        sh("ip", "netns", "del", ns, check=False)


def iperf(secs=5):
    out = sh("ip", "netns", "exec", X, "iperf3", "-c", "10.231.77.2", "-p", str(PORT), "-t", str(secs), "-O", "1",
             "-J", check=False).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def with_capture(mode):
    """Start the capture; returns a function that stops it and removes what it added."""
    if mode == "nflog":
        rules = subprocess.Popen(["ip", "netns", "exec", X, sys.executable, "-c", (
            "import sys, signal; sys.path.insert(0, sys.argv[1]);"
            "from profiler.firewall import IptablesFirewall;"
            "fw = IptablesFirewall(['npcc0'], nflog_groups={'npcc0': 7460}); fw.setup(); print('up', flush=True);"
            "signal.sigwait([signal.SIGTERM]); fw.teardown()"), os.path.dirname(os.path.dirname(
                os.path.abspath(__file__)))], stdout=subprocess.PIPE, text=True)
        rules.stdout.readline()
        dump = ["tcpdump", "-i", "nflog:7460", "-n", "-s", "256", "--immediate-mode", "-w", "/dev/null"]
    else:
        rules = None
        dump = ["tcpdump", "-i", "npcc0", "-n", "-s", "128", "--immediate-mode", "-w", "/dev/null",
                "tcp[13] & 7 != 0"]
    tap = subprocess.Popen(["ip", "netns", "exec", X, *dump], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)

    def stop():
        tap.send_signal(signal.SIGINT)
        tap.wait(10)
        if rules is not None:
            rules.send_signal(signal.SIGTERM)
            rules.wait(10)
    return stop


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "interface"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    if mode not in ("interface", "nflog"):
        sys.exit("usage: capture_cost.py [interface|nflog] [repetitions]")
    cleanup()
    setup()
    server = subprocess.Popen(["ip", "netns", "exec", Y, "iperf3", "-s", "-p", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        runs = {"none": [], mode: []}
        for rep in range(reps):
            for name in ((("none", mode) if rep % 2 == 0 else (mode, "none"))):
                stop = with_capture(mode) if name == mode else None
                try:
                    runs[name].append(iperf())
                finally:
                    if stop:
                        stop()
        ratios = [a / b for a, b in zip(runs[mode], runs["none"])]
        print(json.dumps({k: [round(x, 2) for x in v] for k, v in runs.items()}))
        print(f"{mode}: median ratio {statistics.median(ratios):.3f} (runs {', '.join(f'{r:.3f}' for r in ratios)})")
    finally:
        server.terminate()
        server.wait(5)
        cleanup()


if __name__ == "__main__":
    main()
