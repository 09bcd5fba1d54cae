"""The whole service on the real kernel: namespaces, veth, iptables, libpcap, processes.

Every figure is checked against a packet capture of the same interface.
"""
import json
import os
import signal
import subprocess

import dpkt
import pytest

from harness import PYTHON, MAIN, TRAFFIC, Capture, Service, compare, run_client, start_client, start_server
from nstools import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def service(netpair):
    svc = Service(netpair.a, [netpair.iface_a])
    yield svc
    svc.stop()


def ours_left(ns):
    v4 = ns.run("iptables-legacy-save").stdout     # every table
    v6 = ns.run("ip6tables-legacy-save").stdout
    return [line for line in (v4 + v6).splitlines() if "NETPROF" in line or "netprof" in line]


def assert_exact(svc, iface, truth, conns, job, pid=None):
    logged = svc.logged(iface)
    for conn in conns:
        for direction, got, want, entry in compare(logged, truth, conn):
            assert entry is not None, f"{direction} of {conn} not logged"
            assert entry[0] == job and entry[2] == direction
            assert entry[1] == (pid or conn["pid"])
            assert got == want, f"{direction} {conn}: logged {got}, captured {want}"


def wait_logged(svc, iface, conns):
    def done():
        logged = svc.logged(iface)
        return all((c["local"], c["lport"], c["remote"], c["rport"]) in logged for c in conns)
    wait_for(done, timeout=20, what="connections logged")


def test_registered_child_accepted_and_untracked(netpair, service):
    p = netpair
    service.start()
    cap = Capture(p.a, p.iface_a)
    server_b, _ = start_server(p.b, p.ip_b, 9000)
    server_a, _ = start_server(p.a, p.ip_a, 9100)
    assert service.start_profile("srv#2", server_a.pid)[0] == 200

    sizes = [(1000, 1000), (0, 100_000), (100_000, 0), (0, 10_000_000)]
    clients = []
    for up, down in sizes:
        c = start_client(p.a, p.ip_b, 9000, up=up, down=down)
        assert service.start_profile("cluster#1.0#170", c.pid)[0] == 200
        clients.append(c)
    child = start_client(p.a, p.ip_b, 9000, down=50_000, extra=("--child",))
    grandchild = start_client(p.a, p.ip_b, 9000, up=70_000, extra=("--grandchild",))
    for c in (child, grandchild):
        assert service.start_profile("cluster#1.0#170", c.pid)[0] == 200
    untracked = start_client(p.a, p.ip_b, 9000, down=20_000)

    conns = [run_client(c, 1)[0] for c in clients]
    forked = [run_client(c, 1)[0] for c in (child, grandchild)]
    assert forked[0]["pid"] != child.pid and forked[1]["pid"] != grandchild.pid
    foreign = run_client(untracked, 1)[0]
    inbound = run_client(start_client(p.b, p.ip_a, 9100, up=30_000, down=2_000), 1)[0]
    # As the tracked server sees it: local is its side.
    accepted = {"local": p.ip_a, "lport": 9100, "remote": inbound["local"], "rport": inbound["lport"],
                "pid": server_a.pid}

    wait_logged(service, p.iface_a, conns + forked + [accepted])
    cap.stop()
    truth = cap.bytes()
    assert_exact(service, p.iface_a, truth, conns + forked, "cluster#1.0#170")
    assert_exact(service, p.iface_a, truth, [accepted], "srv#2")
    logged = service.logged(p.iface_a)
    assert (foreign["local"], foreign["lport"], foreign["remote"], foreign["rport"]) not in logged

    code, answer = service.get("/endprofile/jobid=cluster%231.0%23170")
    assert code == 200
    assert answer["totals"]["connections"] == 6
    assert answer["totals"]["in_bytes"] == sum(
        truth[(c["remote"], c["rport"], c["local"], c["lport"])] for c in conns + forked)
    assert all(r["complete"] for r in answer["connections"])

    code, answer = service.get("/shutdown")
    assert code == 200
    service.proc.wait(30)
    assert service.proc.returncode == 0
    assert ours_left(p.a) == []


def site_syns(ns, builtin, comment):
    """SYNs counted by another program's rule in mangle `builtin`, known by its comment."""
    out = ns.run("iptables-legacy", "-t", "mangle", "-L", builtin, "-v", "-x", "-n").stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if f"/* {comment} */" in line)


def captured_syns(cap, dport):
    """SYNs (without ACK) to `dport` in the capture."""
    n = 0
    with open(cap.path, "rb") as f:
        for _, data in dpkt.pcap.Reader(f):
            tcp = dpkt.ethernet.Ethernet(data).data.data
            if isinstance(tcp, dpkt.tcp.TCP) and tcp.dport == dport and tcp.flags & 0x12 == 0x02:
                n += 1
    return n


def test_another_programs_mangle_rules_see_the_held_syns_before_the_hold(netpair):
    """Let go from the queue (NF_ACCEPT), a held SYN skips the rest of the mangle chain it was held in.
    Our jumps into the hold chains are appended, so the rules another program had in mangle OUTPUT and
    INPUT when the service started see every held SYN; one appended later comes after ours and sees
    none (README, Limits). The records are exact either way."""
    p = netpair
    site = lambda builtin, side, port, comment: p.a.run(  # noqa: E731
        "iptables-legacy", "-t", "mangle", "-A", builtin, side, p.iface_a, "-p", "tcp", "--syn", "--dport", port,
        "-m", "comment", "--comment", comment)
    for builtin, side, port in (("OUTPUT", "-o", "9000"), ("INPUT", "-i", "9100")):
        site(builtin, side, port, "site-before")
    svc = Service(p.a, [p.iface_a], LOG_FORMAT="both")
    svc.start()
    try:
        for builtin, side, port in (("OUTPUT", "-o", "9000"), ("INPUT", "-i", "9100")):
            site(builtin, side, port, "site-after")
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        server_a, _ = start_server(p.a, p.ip_a, 9100)
        client = start_client(p.a, p.ip_b, 9000, up=100_000, down=200_000, count=3)
        assert svc.start_profile("site#1", client.pid)[0] == 200
        assert svc.start_profile("site#2", server_a.pid)[0] == 200
        mangle = lambda: p.a.run("iptables-legacy-save", "-t", "mangle").stdout   # noqa: E731
        wait_for(lambda: "--uid-owner" in mangle() and "--dport 9100" in mangle(), timeout=10, what="hold rules")
        conns = run_client(client, 3)
        inbound = run_client(start_client(p.b, p.ip_a, 9100, up=30_000, down=2_000, count=2), 2)
        accepted = [{"local": p.ip_a, "lport": 9100, "remote": c["local"], "rport": c["lport"], "pid": server_a.pid}
                    for c in inbound]
        wait_logged(svc, p.iface_a, conns + accepted)
        cap.stop()
        seen = {comment: (site_syns(p.a, "OUTPUT", comment), site_syns(p.a, "INPUT", comment))
                for comment in ("site-before", "site-after")}
        # Every SYN on the wire (3 and 2, or more should a held one be retransmitted), once each.
        wire = (captured_syns(cap, 9000), captured_syns(cap, 9100))
        assert wire[0] >= 3 and wire[1] >= 2, wire
        assert seen == {"site-before": wire, "site-after": (0, 0)}, (seen, wire)
        truth = cap.bytes()
        assert_exact(svc, p.iface_a, truth, conns, "site#1")
        assert_exact(svc, p.iface_a, truth, accepted, "site#2")
        records = svc.json_records(p.iface_a)
        assert len(records) == 5 and all(r["complete"] and r["count_source"] == "rules" for r in records.values())
    finally:
        svc.stop()


def test_ipv6_exact(netpair, service):
    p = netpair
    p.a.run("ping", "-6", "-c1", "-W2", p.ip6_b, check=False)   # neighbour discovery first
    service.start()
    cap = Capture(p.a, p.iface_a)
    start_server(p.b, p.ip6_b, 9000)
    c = start_client(p.a, p.ip6_b, 9000, up=100_000, down=1_000_000, count=3)
    assert service.start_profile("v6", c.pid)[0] == 200
    conns = run_client(c, 3)
    wait_logged(service, p.iface_a, conns)
    cap.stop()
    assert_exact(service, p.iface_a, cap.bytes(), conns, "v6")


def test_gc_reclaims_rules_at_threshold(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a], RULES_THRESHOLD=4, CLOSE_LINGER=30)
    try:
        svc.start()
        cap = Capture(p.a, p.iface_a)
        start_server(p.b, p.ip_b, 9000)
        c = start_client(p.a, p.ip_b, 9000, up=5_000, down=5_000, count=10)
        assert svc.start_profile("gc", c.pid)[0] == 200
        conns = run_client(c, 10)
        # CLOSE_LINGER is long: only the garbage collector can have harvested the first eight.
        wait_for(lambda: len(svc.log_lines(p.iface_a)) >= 16, timeout=10, what="GC harvests")
        code, status = svc.get("/status")
        assert status["installed_rules"] <= 4 and status["stats"]["gc_runs"] >= 4
        assert svc.get("/endprofile/jobid=gc")[0] == 200
        cap.stop()
        assert_exact(svc, p.iface_a, cap.bytes(), conns, "gc")
        assert "garbage collector" in svc.output()
    finally:
        svc.stop()


def test_bad_input_gets_4xx_and_service_keeps_running(netpair, service):
    p = netpair
    service.start()
    sleeper = p.a.popen("sleep", "60")
    bad = {
        "/startprofile/jobid=x,pid=abc,owner=root,birthdate=1": 400,
        "/startprofile/jobid=x,pid=-5,owner=root,birthdate=1": 400,
        "/startprofile/jobid=x,pid=99999999999,owner=root,birthdate=1": 400,
        "/startprofile/jobid=x,owner=root,birthdate=1": 400,
        "/startprofile/jobid=x,pid=1,owner=root,birthdate=nan": 400,
        "/startprofile/jobid=x%ff,pid=1,owner=root,birthdate=1": 400,
        "/startprofile/jobid=x,pid=4000000,owner=root,birthdate=1": 404,
        f"/startprofile/jobid=x,pid={sleeper.pid},owner=nobody,birthdate=1": 409,
        f"/startprofile/jobid=x,pid={sleeper.pid},owner=root,birthdate=12345": 409,
        "/endprofile/jobid=never-started": 404,
        "/endprocessprofile/jobid=never,pid=1,owner=root,birthdate=1": 404,
        "/no/such/thing": 404,
    }
    for path, want in bad.items():
        code, body = service.get(path)
        assert code == want, (path, code, body)
        assert isinstance(body, dict) and body["status"] == "error", (path, body)
    code, body = service.get("/startprofile/jobid=x,pid=1,owner=root,birthdate=nan")
    assert body["field"] == "birthdate" and "nan" in body["error"]
    code, status = service.get("/status")
    assert code == 200 and status["installed_rules"] == 0 and status["jobs"] == {}


def test_end_process_and_rest_api(netpair, service):
    p = netpair
    service.start()
    start_server(p.b, p.ip_b, 9000)
    c = start_client(p.a, p.ip_b, 9000, down=10_000, extra=("--linger-stdin",))
    import psutil
    birth = psutil.Process(c.pid).create_time()
    code, ans = service.request("POST", "/v1/jobs/rest%23job/processes",
                                json.dumps({"pid": c.pid, "owner": "0", "birthdate": birth}))
    assert code == 200, ans
    assert service.start_profile("rest#job", c.pid)[0] == 200   # again: harmless
    c.stdin.write("go\n")
    c.stdin.flush()
    conn = json.loads(c.stdout.readline())
    wait_logged(service, p.iface_a, [conn])
    code, ans = service.get(f"/endprocessprofile/jobid=rest%23job,pid={c.pid},owner=root,birthdate={birth}")
    assert code == 200 and ans["totals"]["connections"] == 1 and ans["connections"][0]["lport"] == conn["lport"]
    code, ans = service.request("DELETE", "/v1/jobs/rest%23job")
    assert code == 200 and ans["totals"]["connections"] == 1
    assert service.request("DELETE", "/v1/jobs/rest%23job")[0] == 404


def test_restart_harvests_leftover_rules(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])
    svc.start()
    start_server(p.b, p.ip_b, 9000)
    c = start_client(p.a, p.ip_b, 9000, up=200_000, extra=("--linger-stdin",))
    assert svc.start_profile("crash", c.pid)[0] == 200
    c.stdin.write("go\n")
    c.stdin.flush()
    conn = json.loads(c.stdout.readline())
    wait_for(lambda: svc.get("/status")[1]["installed_rules"] == 2, timeout=10, what="rules installed")
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(10)
    assert any("NETPROF_I_" in line for line in ours_left(p.a))
    # The second service has its own config directory, so not the first one's STATE_FILE: the
    # rules are all it finds. It logs what they counted, known by 4-tuple alone, and removes them.
    svc2 = Service(p.a, [p.iface_a])
    svc2.log_dir = svc.log_dir
    with open(svc2.config_path, "w") as f:
        f.write(f"[CONFIG]\nINTERFACE = {p.iface_a}\nLOG_DIR = {svc.log_dir}\nLOG_FORMAT = both\n")
    try:
        svc2.start()
        key = (conn["local"], conn["lport"], conn["remote"], conn["rport"])
        wait_for(lambda: key in svc2.json_records(p.iface_a), timeout=10, what="leftover logged")
        rec = svc2.json_records(p.iface_a)[key]
        assert rec["end"] == "restart" and rec["job"] == "" and rec["pid"] == 0, rec
        assert "unknown" in rec["note"] and rec["out_bytes"] > 200_000 and rec["in_bytes"] > 0
        assert svc2.get("/status")[1]["installed_rules"] == 0
        jumps = [line for line in ours_left(p.a) if line.startswith("-A INPUT") or line.startswith("-A OUTPUT")]
        # Into our chains from INPUT and OUTPUT, for IPv4 and IPv6: the fast path's one (connections
        # without its label) in filter and security, one in mangle (the hold).
        assert len(jumps) == 2 * 2 * (2 + 1), jumps
        assert sum('-p tcp -m connlabel ! --label "121"' in line for line in jumps) == 8, jumps
    finally:
        c.stdin.close()
        svc2.stop()
    assert ours_left(p.a) == []


def test_run_mode_profiles_command_and_returns_its_exit_code(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])   # only for its config file
    start_server(p.b, p.ip_b, 9000)
    cap = Capture(p.a, p.iface_a)
    cmd = p.a.run(PYTHON, MAIN, "--config", svc.config_path, "run", "--job", "standalone", "--",
                  PYTHON, TRAFFIC, "client", "--connect", p.ip_b, "--port", "9000", "--down", "300000",
                  check=False, timeout=120)
    assert cmd.returncode == 0, cmd.stderr
    conn = json.loads(cmd.stdout.splitlines()[0])
    cap.stop()
    assert "total: 1 connections" in cmd.stderr
    assert_exact(svc, p.iface_a, cap.bytes(), [conn], "standalone")
    failing = p.a.run(PYTHON, MAIN, "--config", svc.config_path, "run", "--", "sh", "-c", "exit 3",
                      check=False, timeout=60)
    assert failing.returncode == 3
    assert ours_left(p.a) == []


def test_not_root_is_refused():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, MAIN, "8080"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "must run as root" in r.stderr


def test_sighup_rereads_config_and_sigusr1_reopens_logs(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])
    try:
        svc.start()
        start_server(p.b, p.ip_b, 9000)
        c = start_client(p.a, p.ip_b, 9000, down=1000)
        assert svc.start_profile("sig", c.pid)[0] == 200
        first = run_client(c, 1)[0]
        wait_logged(svc, p.iface_a, [first])
        # logrotate moves the file away; SIGUSR1 makes the next record go to a new file.
        log_path = os.path.join(svc.log_dir, f"{p.iface_a}.log")
        os.rename(log_path, log_path + ".rotated")
        svc.proc.send_signal(signal.SIGUSR1)
        with open(svc.config_path, "a") as f:
            f.write("RULES_THRESHOLD = 321\nLOG_FORMAT = both\nBIND_ADDRESS = 127.0.0.2\n")
        svc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: svc.get("/status")[1]["rules_threshold"] == 321, timeout=10, what="reload")
        c = start_client(p.a, p.ip_b, 9000, down=1000)
        assert svc.start_profile("sig", c.pid)[0] == 200
        second = run_client(c, 1)[0]
        wait_logged(svc, p.iface_a, [second])
        assert os.path.exists(os.path.join(svc.log_dir, f"{p.iface_a}.json.log"))
        assert (first["local"], first["lport"], first["remote"], first["rport"]) not in svc.logged(p.iface_a)
        assert "BIND_ADDRESS changed; that takes a restart" in svc.output()
    finally:
        svc.stop()


def test_profile_mode_follows_a_running_process_until_it_exits(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a])   # only for its config file
    start_server(p.b, p.ip_b, 9000)
    cap = Capture(p.a, p.iface_a)
    client = start_client(p.a, p.ip_b, 9000, up=50_000, down=250_000, count=2, extra=("--child",))
    profiler = p.a.popen(PYTHON, MAIN, "--config", svc.config_path, "profile", "--pid", str(client.pid),
                         "--job", "watched", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The profiler is ready once its hold rule for our uid is in place.
    wait_for(lambda: "--uid-owner 0" in p.a.run("iptables-legacy-save", "-t", "mangle").stdout, timeout=20,
             what="profile mode ready")
    conns = run_client(client, 2)
    out, err = profiler.communicate(timeout=60)
    assert profiler.returncode == 0, err
    cap.stop()
    assert "total: 2 connections" in err
    assert_exact(svc, p.iface_a, cap.bytes(), conns, "watched")
    assert all(c["pid"] != client.pid for c in conns)     # made by a child it forked
    assert ours_left(p.a) == []
