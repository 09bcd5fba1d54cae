"""Optional: sample the service with py-spy during a phase (`run.py --profile DIR`).

py-spy is not a dependency of the project: `.venv/bin/pip install py-spy`. Each phase leaves
DIR/<phase>.txt (collapsed stacks) and `top()` names the functions the profiler thread spent
its samples in.
"""
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager


def _binary():
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.path.exists(here) else shutil.which("py-spy")


@contextmanager
def recording(pid, out_dir, name, rate=50):
    exe = _binary() if out_dir else None
    if not exe:
        yield None
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.txt")
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking", "--threads",
                             "--format", "raw", "--output", path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield path
    finally:
        proc.send_signal(signal.SIGINT)   # py-spy writes its file on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


GENERIC = {"Thread.run", "Thread._bootstrap", "Thread._bootstrap_inner", "Profiler._run", "Profiler._guard"}


def top(path, thread="profiler", n=12, rate=50):
    """The thread's busy seconds (py-spy leaves idle samples out) and the functions on its stack most
    often: {"busy_s": s, "top": [(function, share of its busy samples)]}."""
    inclusive, total = Counter(), 0
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        if not frames[0].endswith(f": {thread}"):
            continue
        total += int(count)
        for fn in {f.split(" (")[0] for f in frames[1:]} - GENERIC:
            inclusive[fn] += int(count)
    return {"busy_s": round(total / rate, 1),
            "top": [(fn, round(c / total, 3)) for fn, c in inclusive.most_common(n)] if total else []}


if __name__ == "__main__":
    found = top(sys.argv[1], *(sys.argv[2:3] or ["profiler"]))
    print(f"busy {found.get('busy_s')} s")
    for fn, share in found.get("top", []):
        print(f"{share:6.1%}  {fn}")
