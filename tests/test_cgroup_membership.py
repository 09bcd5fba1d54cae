"""MEMBERSHIP = cgroup: every process in the registered process's cgroup belongs to the job,
daemonized (double-forked) ones included, as HTCondor gives each job its own cgroup."""
import json
import os
import uuid

import pytest

from harness import PYTHON, TRAFFIC, Capture, Service, start_server
from nstools import wait_for
from profiler.proctable import ProcessTable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def cgroup():
    mounts = ProcessTable()._cgroup_mounts()
    base = mounts.get("") or mounts.get("pids")
    if not base:
        pytest.skip("no cgroup hierarchy to make a test cgroup in")
    path = os.path.join(base, f"netprof-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        # Whatever is left goes back to the parent cgroup so that ours can be removed.
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                left = f.read().split()
            for pid in left:
                with open(os.path.join(base, "cgroup.procs"), "w") as f:
                    f.write(pid)
        except OSError:
            pass
        wait_for(lambda: _rmdir(path), timeout=10, what="test cgroup removed")


def _rmdir(path):
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def test_daemonized_process_in_the_job_cgroup_is_tracked(netpair, cgroup, tmp_path):
    p = netpair
    svc = Service(p.a, [p.iface_a], host_mounts=True, MEMBERSHIP="cgroup")
    try:
        svc.start()
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        out = tmp_path / "daemon.json"
        # The job starts a daemon with setsid -f: reparented away, no longer a descendant of the job.
        job = p.a.popen("sh", "-c", f"read go; setsid -f {PYTHON} {TRAFFIC} client --connect {p.ip_b} "
                                    f"--port 9000 --down 200000 > {out}; read done",
                        stdin=__import__("subprocess").PIPE, text=True)
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(job.pid))
        assert svc.start_profile("cg#1", job.pid)[0] == 200
        job.stdin.write("go\n")
        job.stdin.flush()
        conn = json.loads(wait_for(lambda: out.exists() and out.read_text().strip(), timeout=20,
                                   what="daemon connected"))
        assert conn["pid"] != job.pid
        key = (conn["local"], conn["lport"], conn["remote"], conn["rport"])
        wait_for(lambda: key in svc.logged(p.iface_a), timeout=20, what="daemon's connection logged")
        cap.stop()
        job_id, pid, direction, nbytes = svc.logged(p.iface_a)[key]
        assert (job_id, pid, direction) == ("cg#1", conn["pid"], "OUT")
        assert nbytes == cap.bytes()[key]
        job.stdin.write("done\n")
        job.stdin.close()
        job.wait(10)
    finally:
        svc.stop()
