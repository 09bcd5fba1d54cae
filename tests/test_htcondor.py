"""The HTCondor drop-in (contrib/htcondor), replaying what condor_starter does.

HTCondor is not installed here, so the tests do its part by hand, the way the
starter does it:
  * the job: netprof-wrapper is run as the job's user (nobody), with
    _CONDOR_JOB_AD naming the job ad file and the job's command line as its
    arguments; it must register its own PID and then exec the job, keeping it;
  * the exit hook: netprof-job-exit is run as the job's user with the reason
    as its argument and the job ad (with JobPid and ExitCode) on stdin;
    condor_chirp is a fake on PATH that records its calls.
The scripts run with the system's python3 (/usr/bin/python3, not the venv),
from a world-readable copy, as they would from /usr/local/libexec/netprofiler.
Figures are checked against the service's tab log and a packet capture.
"""
import ast
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import unquote

import psutil
import pytest

from harness import TRAFFIC, Capture, Service, start_server
from nstools import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, setpriv)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib", "htcondor")
SYS_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else shutil.which("python3")
NOBODY = 65534
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GLOBAL_JOB_ID = "submit.example.org#4242.0#1700000000"
CHIRP_NAMES = ("ChirpNetworkBytesSent", "ChirpNetworkBytesReceived", "ChirpNetworkConnections",
               "ChirpNetworkProfileStatus", "ChirpNetworkBytesSentInternal", "ChirpNetworkBytesSentExternal",
               "ChirpNetworkBytesReceivedInternal", "ChirpNetworkBytesReceivedExternal")

FAKE_CHIRP = """#!/bin/sh
# A stand-in for condor_chirp: records each call (config, then the arguments, tab-separated).
{ printf '%s' "${_CONDOR_CHIRP_CONFIG:-}"; for a in "$@"; do printf '\\t%s' "$a"; done; printf '\\n'; } >> RECORD
"""

HANGING_CHIRP = """#!/bin/sh
echo $$ >> PIDS
exec sleep 300
"""


def job_ad(global_job_id=GLOBAL_JOB_ID, cluster=4242, proc=0):
    """A job ad as condor_starter writes it to .job.ad: `Attr = value`, strings double-quoted."""
    lines = ['MyType = "Job"', f"ClusterId = {cluster}", f"ProcId = {proc}"]
    if global_job_id is not None:
        lines.append(f'GlobalJobId = "{global_job_id}"')
    lines += ['Owner = "nobody"', 'Cmd = "/usr/bin/python3"', 'Iwd = "/var/lib/condor/execute/dir_1"',
              'Requirements = (TARGET.Arch == "X86_64") && (TARGET.OpSys == "LINUX")',
              'Environment = "A=1 B=\'x = y\'"', "JobUniverse = 5", "QDate = 1700000000",
              "RequestCpus = 1"]
    return "\n".join(lines) + "\n"


def exit_ad(ad_text, pid, exit_code):
    """What the starter gives the exit hook on stdin: the job ad plus the exit attributes."""
    return ad_text + (f"JobPid = {pid}\nExitCode = {exit_code}\nExitBySignal = false\n"
                      f'ExitReason = "exited normally"\nJobDuration = 3\nJobState = "Exited"\n')


class Work:
    """A world-readable directory: the installed scripts, the job ad, a fake condor_chirp."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="netprof-condor-")
        os.chmod(self.dir, 0o755)
        self.libexec = os.path.join(self.dir, "libexec")
        os.mkdir(self.libexec)
        for name in ("netprof-wrapper", "netprof-job-exit"):
            shutil.copy(os.path.join(CONTRIB, name), self.libexec)
            os.chmod(os.path.join(self.libexec, name), 0o755)
        self.wrapper = os.path.join(self.libexec, "netprof-wrapper")
        self.job_exit = os.path.join(self.libexec, "netprof-job-exit")
        self.traffic = os.path.join(self.dir, "traffic.py")
        shutil.copy(TRAFFIC, self.traffic)
        os.chmod(self.traffic, 0o644)
        self.scratch = os.path.join(self.dir, "scratch")       # the job's sandbox
        os.mkdir(self.scratch)
        os.chmod(self.scratch, 0o777)
        self.bin = os.path.join(self.dir, "bin")
        os.mkdir(self.bin)
        os.chmod(self.bin, 0o755)
        self.record = os.path.join(self.dir, "chirp-calls")
        self.chirp_pids = os.path.join(self.dir, "chirp-pids")
        for path in (self.record, self.chirp_pids):
            open(path, "w").close()
            os.chmod(path, 0o666)
        self.set_chirp(FAKE_CHIRP)
        self.chirp_config = os.path.join(self.scratch, ".chirp.config")
        with open(self.chirp_config, "w") as f:
            f.write("127.0.0.1 9618 cookie\n")
        os.chmod(self.chirp_config, 0o644)
        self.ad_path = os.path.join(self.scratch, ".job.ad")
        self.write_ad(job_ad())

    def set_chirp(self, script):
        path = os.path.join(self.bin, "condor_chirp")
        with open(path, "w") as f:
            f.write(script.replace("RECORD", self.record).replace("PIDS", self.chirp_pids))
        os.chmod(path, 0o755)

    def write_ad(self, text):
        with open(self.ad_path, "w") as f:
            f.write(text)
        os.chmod(self.ad_path, 0o644)

    def job_env(self, url, **extra):
        """The job's environment, as the starter builds it (plus NETPROF_URL)."""
        env = {"PATH": BASE_PATH, "_CONDOR_JOB_AD": self.ad_path, "_CONDOR_SCRATCH_DIR": self.scratch,
               "_CONDOR_CHIRP_CONFIG": self.chirp_config, "HOME": self.scratch, "LANG": "C.UTF-8",
               "NETPROF_CONF": os.path.join(self.dir, "no-such.conf")}
        if url is not None:
            env["NETPROF_URL"] = url
        env.update(extra)
        return env

    def hook_env(self, url, **extra):
        """The exit hook's environment: the fake condor_chirp first on PATH."""
        env = self.job_env(url, **extra)
        env["PATH"] = f"{self.bin}:{BASE_PATH}"
        return env

    def chirp_calls(self):
        calls = []
        with open(self.record) as f:
            for line in f:
                config, *args = line.rstrip("\n").split("\t")
                calls.append((config, args))
        return calls

    def chirped(self):
        """{attribute: value} from the recorded set_job_attr_delayed calls; checks each call's form."""
        out = {}
        for config, args in self.chirp_calls():
            assert len(args) == 3 and args[0] == "set_job_attr_delayed", args
            assert args[1] not in out, f"{args[1]} set twice"
            assert args[1].startswith("Chirp") and not args[1].startswith("Network"), args[1]
            assert config == self.chirp_config
            out[args[1]] = args[2]
        return out

    def cleanup(self):
        kill_pids(self.chirp_pids)
        shutil.rmtree(self.dir, ignore_errors=True)


def kill_pids(path):
    try:
        with open(path) as f:
            pids = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def work():
    w = Work()
    try:
        yield w
    finally:
        w.cleanup()


@pytest.fixture
def lab(netpair):
    """Makes services and captures in namespace `a`; stops them and removes their files afterwards."""
    made = []

    class Lab:
        def service(self, **config):
            svc = Service(netpair.a, [netpair.iface_a], **config)
            made.append(svc)
            return svc.start()

        def capture(self):
            cap = Capture(netpair.a, netpair.iface_a)
            made.append(cap)
            return cap

    try:
        yield Lab()
    finally:
        for thing in reversed(made):
            try:
                thing.stop()
            finally:
                if isinstance(thing, Service):
                    shutil.rmtree(thing.dir, ignore_errors=True)
                elif os.path.exists(thing.path):
                    os.unlink(thing.path)


def as_nobody(*argv):
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def start_job(ns, work, env, *argv):
    """The starter's spawn of the job through USER_JOB_WRAPPER, as nobody, in namespace `ns`."""
    return ns.popen(*as_nobody(work.wrapper, *argv), env=env, cwd=work.scratch,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_exit_hook(ns, work, env, ad_text, reason="exit", timeout=40):
    """The starter's run of NETPROF_HOOK_JOB_EXIT: as the job's user, reason argument, ad on stdin."""
    started = time.monotonic()
    r = ns.run(*as_nobody(work.job_exit, reason), env=env, cwd=work.scratch, input=ad_text,
               check=False, timeout=timeout)
    return r, time.monotonic() - started


def logged_totals(svc, iface, job):
    """Sums over the service's tab log lines of `job`: (connections, sent, received, pids)."""
    sent = received = conns = 0
    pids = set()
    for cols in svc.log_lines(iface):
        assert len(cols) == 9, cols
        _ts, j, pid, _src, _sport, _dst, _dport, direction, nbytes = cols
        if j != job:
            continue
        pids.add(int(pid))
        if direction == "OUT":
            sent += int(nbytes)
            conns += 1
        else:
            received += int(nbytes)
    return conns, sent, received, pids


def captured(truth, conns):
    """Bytes sent and received over `conns` (client JSON lines) in the packet capture."""
    sent = sum(truth.get((c["local"], c["lport"], c["remote"], c["rport"]), 0) for c in conns)
    received = sum(truth.get((c["remote"], c["rport"], c["local"], c["lport"]), 0) for c in conns)
    return sent, received


# --- the real service in a namespace ---------------------------------------------------------


def test_job_through_wrapper_and_exit_hook_is_accounted_exactly(netpair, work, lab):
    p = netpair
    svc = lab.service(INTERNAL_NETWORKS="10.231.0.0/16")
    cap = lab.capture()
    start_server(p.b, p.ip_b, 9000)
    url = f"http://127.0.0.1:{svc.port}"
    job = start_job(p.a, work, work.job_env(url), SYS_PYTHON, work.traffic, "client", "--connect", p.ip_b,
                    "--port", "9000", "--up", "150000", "--down", "2000000", "--count", "3")
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert err == "", err                      # registered: the wrapper said nothing
    conns = [json.loads(line) for line in out.splitlines()]
    assert len(conns) == 3
    # exec kept the PID: the client is the process the starter spawned, the wrapper.
    assert {c["pid"] for c in conns} == {job.pid}
    code, status = svc.get("/status")
    assert code == 200 and GLOBAL_JOB_ID in status["jobs"], status

    r, elapsed = run_exit_hook(p.a, work, work.hook_env(url), exit_ad(job_ad(), job.pid, 0))
    assert r.returncode == 0, r.stderr
    assert elapsed < 10, elapsed
    assert r.stdout == ""
    assert "complete" in r.stderr and GLOBAL_JOB_ID in r.stderr, r.stderr
    chirped = work.chirped()
    cap.stop()

    n, sent, received, pids = logged_totals(svc, p.iface_a, GLOBAL_JOB_ID)
    assert n == 3 and pids == {job.pid}
    assert sent > 150_000 and received > 2_000_000
    cap_sent, cap_received = captured(cap.bytes(), conns)
    assert (sent, received) == (cap_sent, cap_received)
    assert chirped["ChirpNetworkBytesSent"] == str(sent)
    assert chirped["ChirpNetworkBytesReceived"] == str(received)
    assert chirped["ChirpNetworkConnections"] == "3"
    assert chirped["ChirpNetworkProfileStatus"] == '"complete"'
    assert set(chirped) <= set(CHIRP_NAMES)
    if "ChirpNetworkBytesSentInternal" in chirped:    # the service gives the split
        assert chirped["ChirpNetworkBytesSentInternal"] == str(sent)
        assert chirped["ChirpNetworkBytesReceivedInternal"] == str(received)
        assert chirped["ChirpNetworkBytesSentExternal"] == "0"
        assert chirped["ChirpNetworkBytesReceivedExternal"] == "0"
    # EndProfile ended the job in the service.
    assert svc.get("/status")[1]["jobs"] == {}


def test_job_children_and_the_internal_external_split(netpair, work, lab):
    p = netpair
    p.a.run("ping", "-6", "-c1", "-W2", p.ip6_b, check=False)   # neighbour discovery before the capture
    svc = lab.service(INTERNAL_NETWORKS=f"{p.ip_b}/32")
    cap = lab.capture()
    start_server(p.b, p.ip_b, 9000)
    start_server(p.b, p.ip6_b, 9001)
    url = f"http://127.0.0.1:{svc.port}"
    client = f"{SYS_PYTHON} {work.traffic} client"
    script = (f"{client} --connect {p.ip_b} --port 9000 --up 40000 --down 300000 --count 2 && "
              f"{client} --connect {p.ip6_b} --port 9001 --up 70000 --down 500000 --child; "
              f"exit 3")
    job = start_job(p.a, work, work.job_env(url), "/bin/sh", "-c", script)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 3, err             # the job's own exit code
    conns = [json.loads(line) for line in out.splitlines()]
    v4 = [c for c in conns if ":" not in c["remote"]]
    v6 = [c for c in conns if ":" in c["remote"]]
    assert len(v4) == 2 and len(v6) == 1
    assert all(c["pid"] != job.pid for c in conns)   # children of the job, accounted to it

    r, _ = run_exit_hook(p.a, work, work.hook_env(url), exit_ad(job_ad(), job.pid, 3))
    assert r.returncode == 0, r.stderr
    chirped = work.chirped()
    cap.stop()
    truth = cap.bytes()
    n, sent, received, pids = logged_totals(svc, p.iface_a, GLOBAL_JOB_ID)
    assert n == 3 and pids == {c["pid"] for c in conns}
    assert (sent, received) == captured(truth, conns)
    assert chirped["ChirpNetworkBytesSent"] == str(sent)
    assert chirped["ChirpNetworkBytesReceived"] == str(received)
    assert chirped["ChirpNetworkConnections"] == "3"
    assert chirped["ChirpNetworkProfileStatus"] == '"complete"'
    if "ChirpNetworkBytesSentInternal" not in chirped:
        pytest.skip("the service's EndProfile answer has no totals.internal / totals.external")
    int_sent, int_received = captured(truth, v4)
    ext_sent, ext_received = captured(truth, v6)
    assert chirped["ChirpNetworkBytesSentInternal"] == str(int_sent)
    assert chirped["ChirpNetworkBytesReceivedInternal"] == str(int_received)
    assert chirped["ChirpNetworkBytesSentExternal"] == str(ext_sent)
    assert chirped["ChirpNetworkBytesReceivedExternal"] == str(ext_received)
    assert int_received > 600_000 and ext_received > 500_000


def test_profiler_down_the_job_still_runs_promptly_and_the_hook_says_error(netpair, work):
    p = netpair
    url = "http://127.0.0.1:18080"        # nothing listens in namespace a
    started = time.monotonic()
    job = start_job(p.a, work, work.job_env(url), "/bin/sh", "-c", "echo ran as $(id -u) pid $$; exit 7")
    out, err = job.communicate(timeout=30)
    elapsed = time.monotonic() - started
    assert job.returncode == 7
    assert out == f"ran as {NOBODY} pid {job.pid}\n"
    assert elapsed < 3.0, elapsed
    assert "netprof-wrapper:" in err and "not profiled" in err, err

    r, elapsed = run_exit_hook(p.a, work, work.hook_env(url), exit_ad(job_ad(), job.pid, 7))
    assert r.returncode == 0
    assert elapsed < 5.0, elapsed
    assert work.chirped() == {"ChirpNetworkProfileStatus": '"error"'}
    assert "error" in r.stderr, r.stderr


def test_service_refuses_unknown_job_gives_error(netpair, work, lab):
    """The service runs, but the job was never registered (say the wrapper was not configured): 404."""
    p = netpair
    svc = lab.service()
    url = f"http://127.0.0.1:{svc.port}"
    r, elapsed = run_exit_hook(p.a, work, work.hook_env(url), exit_ad(job_ad(), 12345, 0), reason="remove")
    assert r.returncode == 0 and elapsed < 10
    assert work.chirped() == {"ChirpNetworkProfileStatus": '"error"'}
    assert "404" in r.stderr and "remove" in r.stderr, r.stderr


# --- the scripts against a stand-in service (no namespaces needed) ------------------------------


class FakeService:
    """A loopback HTTP server that records the paths asked and answers what the test sets."""

    def __init__(self, status=200, body=None):
        self.status, self.body = status, body
        self.paths = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                data = json.dumps(outer.body).encode() if not isinstance(outer.body, bytes) else outer.body
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(**kw):
        s = FakeService(**kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def run_hook_here(work, env, ad_text, reason="exit", timeout=40):
    started = time.monotonic()
    r = subprocess.run([work.job_exit, reason], env=env, cwd=work.scratch, input=ad_text,
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - started


def legacy_params(path):
    prefix, _, rest = path.partition("/startprofile/")
    return {k: unquote(v) for k, _, v in (part.partition("=") for part in rest.split(","))}


def test_wrapper_registers_its_own_pid_and_start_time_then_execs(work, fake):
    svc = fake(body={"status": "ok"})
    # A job's PYTHONPATH may shadow the standard library, and its proxy variables point elsewhere.
    shadow = os.path.join(work.dir, "shadow")
    for pkg in ("http", "urllib"):
        os.makedirs(os.path.join(shadow, pkg))
        with open(os.path.join(shadow, pkg, "__init__.py"), "w") as f:
            f.write("raise ImportError('shadowed by the job')\n")
    with open(os.path.join(shadow, "json.py"), "w") as f:
        f.write("raise ImportError('shadowed by the job')\n")
    env = work.job_env(svc.url, PYTHONPATH=shadow, http_proxy="http://192.0.2.1:3128",
                       HTTP_PROXY="http://192.0.2.1:3128", no_proxy="")
    job = subprocess.Popen(as_nobody(work.wrapper, "/bin/sh", "-c", "grep SigIgn /proc/$$/status; exec sleep 60"),
                           env=env, cwd=work.scratch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = job.stdout.readline()
        wait_for(lambda: psutil.Process(job.pid).name() == "sleep", timeout=10, what="job exec'd")
        birth = psutil.Process(job.pid).create_time()
        assert len(svc.paths) == 1, svc.paths
        params = legacy_params(svc.paths[0])
        assert params["jobid"] == GLOBAL_JOB_ID
        assert "%23" in svc.paths[0] and "#" not in svc.paths[0]
        assert int(params["pid"]) == job.pid
        assert params["owner"] == str(NOBODY)
        assert abs(float(params["birthdate"]) - birth) < 0.05
        # The job does not inherit Python's ignored SIGPIPE / SIGXFSZ.
        assert line.split() == ["SigIgn:", "0000000000000000"]
    finally:
        job.kill()
        job.wait(10)
    assert job.stderr.read() == ""


def test_wrapper_gives_up_on_a_hanging_service_after_its_timeout(work):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)        # accepts connections (the kernel does), never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        r = subprocess.run(as_nobody(work.wrapper, "/bin/sh", "-c", "exit 42"), env=work.job_env(url),
                           cwd=work.scratch, capture_output=True, text=True, timeout=30)
        elapsed = time.monotonic() - started
        assert r.returncode == 42
        assert 1.9 < elapsed < 3.0, elapsed
        assert "did not answer" in r.stderr, r.stderr
        # The exit hook: bounded by NETPROF_TIMEOUT too.
        r, elapsed = run_hook_here(work, work.hook_env(url, NETPROF_TIMEOUT="1"), exit_ad(job_ad(), 1, 42))
        assert r.returncode == 0 and elapsed < 3.0, (elapsed, r.stderr)
        assert work.chirped() == {"ChirpNetworkProfileStatus": '"error"'}
    finally:
        listener.close()


def test_wrapper_quiet_and_without_job_ad_still_runs_the_job(work):
    env = work.job_env("http://127.0.0.1:1", NETPROF_QUIET="1")
    r = subprocess.run([work.wrapper, "/bin/sh", "-c", "echo $0 \"$@\"", "x y", "z"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "x y z\n" and r.stderr == ""
    del env["_CONDOR_JOB_AD"]
    del env["NETPROF_QUIET"]
    r = subprocess.run([work.wrapper, "true"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "_CONDOR_JOB_AD" in r.stderr
    r = subprocess.run([work.wrapper, "/no/such/program"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 127 and "/no/such/program" in r.stderr
    script = os.path.join(work.scratch, "job.sh")          # no #! line: the shell runs it, as with exec "$@"
    with open(script, "w") as f:
        f.write('echo "$$ $1"\nexit 4\n')
    os.chmod(script, 0o755)
    job = subprocess.Popen([work.wrapper, script, "arg"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 4 and out == f"{job.pid} arg\n"


def test_wrapper_uses_the_config_file_when_no_netprof_url(work, fake):
    svc = fake(status=409, body={"status": "error", "error": "pid 1 belongs to root"})
    conf = os.path.join(work.dir, "htcondor.conf")
    with open(conf, "w") as f:
        f.write(f"# NetProfiler\nNETPROF_URL = {svc.url}\n")
    os.chmod(conf, 0o644)
    r = subprocess.run(as_nobody(work.wrapper, "true"), env=work.job_env(None, NETPROF_CONF=conf),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert len(svc.paths) == 1 and "HTTP 409" in r.stderr and "belongs to root" in r.stderr


def test_hook_tolerates_an_answer_without_the_split_and_reports_partial(work, fake):
    svc = fake(body={"status": "ok", "job": "x", "connections": [],
                     "totals": {"connections": 2, "in_bytes": 1234, "out_bytes": 567, "complete": False}})
    gid = "sched.example.org#12.3#1700000001"
    r, elapsed = run_hook_here(work, work.hook_env(svc.url), exit_ad(job_ad(gid, 12, 3), 99, 0), reason="evict")
    assert r.returncode == 0 and elapsed < 5
    assert svc.paths == ["/endprofile/jobid=sched.example.org%2312.3%231700000001"]
    assert work.chirped() == {"ChirpNetworkBytesSent": "567", "ChirpNetworkBytesReceived": "1234",
                              "ChirpNetworkConnections": "2", "ChirpNetworkProfileStatus": '"partial"'}
    assert "evict" in r.stderr and "JobPid 99" in r.stderr


def test_hook_sets_the_split_when_given_and_status_first_of_the_rest(work, fake):
    totals = {"connections": 1, "in_bytes": 30, "out_bytes": 70, "complete": True,
              "internal": {"in_bytes": 10, "out_bytes": 20}, "external": {"in_bytes": 20, "out_bytes": 50}}
    svc = fake(body={"status": "ok", "totals": totals})
    r, _ = run_hook_here(work, work.hook_env(svc.url), exit_ad(job_ad(), 5, 0))
    assert r.returncode == 0
    names = [args[1] for _, args in work.chirp_calls()]
    assert names == list(CHIRP_NAMES)
    chirped = work.chirped()
    assert chirped["ChirpNetworkProfileStatus"] == '"complete"'
    assert (chirped["ChirpNetworkBytesSentInternal"], chirped["ChirpNetworkBytesSentExternal"]) == ("20", "50")
    assert (chirped["ChirpNetworkBytesReceivedInternal"], chirped["ChirpNetworkBytesReceivedExternal"]) == \
        ("10", "20")


@pytest.mark.parametrize("status,body", [
    (404, {"status": "error", "code": 404, "error": "unknown job"}),
    (503, {"status": "error", "code": 503, "error": "not ready"}),
    (200, b"<html>not json</html>"),
    (200, {"status": "ok", "totals": {"connections": 1, "in_bytes": "12", "out_bytes": 3, "complete": True}}),
])
def test_hook_says_error_on_bad_answers(work, fake, status, body):
    svc = fake(status=status, body=body)
    r, _ = run_hook_here(work, work.hook_env(svc.url), exit_ad(job_ad(), 5, 0))
    assert r.returncode == 0
    assert work.chirped() == {"ChirpNetworkProfileStatus": '"error"'}
    assert "error" in r.stderr


def test_hook_finds_chirp_and_its_config(work, fake):
    svc = fake(body={"status": "ok", "totals": {"connections": 0, "in_bytes": 0, "out_bytes": 0, "complete": True}})
    ad = exit_ad(job_ad(None), 5, 0)            # no GlobalJobId: ClusterId.ProcId, as the wrapper uses
    # CONDOR_CHIRP names it; no _CONDOR_CHIRP_CONFIG: the sandbox's .chirp.config is used.
    env = work.job_env(svc.url, CONDOR_CHIRP=os.path.join(work.bin, "condor_chirp"))
    del env["_CONDOR_CHIRP_CONFIG"]
    r, _ = run_hook_here(work, env, ad)
    assert r.returncode == 0, r.stderr
    assert svc.paths == ["/endprofile/jobid=4242.0"]
    assert work.chirped()["ChirpNetworkProfileStatus"] == '"complete"'
    # No condor_chirp anywhere: still exit 0, and say so.
    if not os.path.exists("/usr/libexec/condor/condor_chirp"):
        r, _ = run_hook_here(work, work.job_env(svc.url), ad)
        assert r.returncode == 0 and "condor_chirp not found" in r.stderr


def test_hook_is_bounded_when_condor_chirp_hangs(work, fake):
    work.set_chirp(HANGING_CHIRP)
    r, elapsed = run_hook_here(work, work.hook_env("http://127.0.0.1:1"), exit_ad(job_ad(), 5, 0))
    assert r.returncode == 0
    assert elapsed < 8, elapsed
    assert "did not finish" in r.stderr
    with open(work.chirp_pids) as f:
        pids = [int(x) for x in f.read().split()]
    assert len(pids) == 1
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE


SLOW_CHIRP = """#!/bin/sh
sleep 3
{ printf '%s' "${_CONDOR_CHIRP_CONFIG:-}"; for a in "$@"; do printf '\\t%s' "$a"; done; printf '\\n'; } >> RECORD
"""


def test_hook_stays_within_the_starters_30_s_when_condor_chirp_is_slow(work, fake):
    totals = {"connections": 1, "in_bytes": 30, "out_bytes": 70, "complete": True,
              "internal": {"in_bytes": 10, "out_bytes": 20}, "external": {"in_bytes": 20, "out_bytes": 50}}
    svc = fake(body={"status": "ok", "totals": totals})
    work.set_chirp(SLOW_CHIRP)                 # 3 s a call: eight calls would take 24 s
    r, elapsed = run_hook_here(work, work.hook_env(svc.url), exit_ad(job_ad(), 5, 0))
    assert r.returncode == 0
    assert elapsed < 22, elapsed
    assert "out of time" in r.stderr, r.stderr
    names = [args[1] for _, args in work.chirp_calls()]
    assert names == list(CHIRP_NAMES[:len(names)]) and len(names) >= 4   # totals and status first


def test_hook_survives_no_stdin_and_garbage(work):
    r, _ = run_hook_here(work, work.hook_env("http://127.0.0.1:1"), "")
    assert r.returncode == 0
    r = subprocess.run([work.job_exit], env=work.hook_env("http://127.0.0.1:1"), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    assert r.returncode == 0
    r, _ = run_hook_here(work, work.hook_env("http://127.0.0.1:1"), "\x00\xff garbage ===\n-----\n")
    assert r.returncode == 0
    calls = work.chirp_calls()
    assert len(calls) == 3
    assert all(args == ["set_job_attr_delayed", "ChirpNetworkProfileStatus", '"error"'] for _, args in calls)


def test_scripts_are_python3_stdlib_only_and_executable():
    for name in ("netprof-wrapper", "netprof-job-exit"):
        path = os.path.join(CONTRIB, name)
        assert os.access(path, os.X_OK), f"{path} is not executable"
        with open(path) as f:
            source = f.read()
        assert source.startswith("#!/usr/bin/env python3\n")
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
        assert imported and imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
