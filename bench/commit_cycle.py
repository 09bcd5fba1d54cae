"""The cost of one connection's change at 5,000 installed pairs, through the service's firewall
adapter: 400 cycles of one pair added and the previous one removed, in one table (filter).

    python bench/commit_cycle.py [TREE]

TREE: the root of a checkout to measure (default: this one), so that two versions can be
compared in turns. Prints the median cycle and its part outside the kernel's setsockopt calls
(Python). Runs in a namespace of its own (npcc-cycle), removed at the end, also on failure.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = "npcc-cycle"
INNER = r"""
import random, socket, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from profiler.firewall import IptablesFirewall
from profiler.chains import RuleSpec
from profiler import xtblob
fw = IptablesFirewall(["eth9"])
fw.setup()
random.seed(1)
ports = random.sample(range(32768, 61000), 5400)
specs = [RuleSpec(f"c{i}", "eth9", socket.AF_INET, "10.231.0.1", ports[i], "10.231.0.2", 7000) for i in range(5000)]
for k in range(0, 5000, 500):
    fw.apply(specs[k:k + 500], [])
extra = [RuleSpec(f"x{i}", "eth9", socket.AF_INET, "10.231.0.1", ports[5000 + i], "10.231.0.2", 7001) for i in range(400)]
sock, orig = [0.0], xtblob._sockopt
def timed(*a):
    t = time.perf_counter()
    try:
        return orig(*a)
    finally:
        sock[0] += time.perf_counter() - t
xtblob._sockopt = timed
total, python, prev = [], [], None
for spec in extra:
    sock[0] = 0.0
    t = time.perf_counter()
    fw.apply([spec], [prev] if prev else [])
    d = time.perf_counter() - t
    total.append(d)
    python.append(d - sock[0])
    prev = spec
fw.apply([], [prev])
chains = len(fw._raw[socket.AF_INET][0].chains)
fw.teardown()
print(f"{sys.argv[1]}: {chains} chains; cycle median {1000 * statistics.median(total):.2f} ms, "
      f"python part {1000 * statistics.median(python):.2f} ms")
"""


def main():
    tree = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else HERE
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", INNER, tree], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


if __name__ == "__main__":
    main()
