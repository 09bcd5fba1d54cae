"""Who may do what: loopback TCP with an optional token; a unix socket where callers are known by uid."""
import json
import os
import uuid

import psutil
import pytest

from harness import Service

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def unix_get(ns, sock, path, as_nobody=True):
    cmd = (NOBODY if as_nobody else []) + ["curl", "-s", "-g", "--unix-socket", sock, "-w", "\n%{http_code}",
                                           f"http://localhost{path}"]
    r = ns.run(*cmd, check=False)
    text, _, code = r.stdout.rpartition("\n")
    return int(code or 0), json.loads(text) if text else None


def start_path(job, pid):
    return f"/startprofile/jobid={job},pid={pid},owner={psutil.Process(pid).uids().real}," \
           f"birthdate={psutil.Process(pid).create_time()}"


def test_token_and_unix_socket_permissions(netpair):
    p = netpair
    sock = f"/tmp/netprof-test-{uuid.uuid4().hex[:8]}.sock"
    svc = Service(p.a, [p.iface_a], API_SOCKET=sock, API_TOKEN="s3cret")
    try:
        svc.start()
        token, svc.token = svc.token, ""
        assert oct(os.stat(sock).st_mode & 0o777) == "0o666"

        # TCP: the token is required.
        code, body = svc.get("/status")
        assert code == 401 and body["status"] == "error" and "Bearer" in body["error"]
        r = p.a.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {token}",
                    f"http://127.0.0.1:{svc.port}/status", check=False)
        assert r.stdout == "200"
        r = p.a.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Authorization: Bearer nope",
                    f"http://127.0.0.1:{svc.port}/status", check=False)
        assert r.stdout == "401"

        mine = p.a.popen(*NOBODY, "sleep", "60")
        roots = p.a.popen("sleep", "60")
        from nstools import wait_for
        wait_for(lambda: psutil.Process(mine.pid).uids().real == 65534, timeout=5, what="nobody's sleep")
        # nobody may profile its own process, not root's, and may not shut the service down.
        assert unix_get(p.a, sock, start_path("own", mine.pid))[0] == 200
        code, body = unix_get(p.a, sock, start_path("theirs", roots.pid))
        assert code == 403 and "uid 65534" in body["error"]
        assert unix_get(p.a, sock, "/shutdown")[0] == 403
        # root (through the socket) registers its process; nobody may not end that job.
        assert unix_get(p.a, sock, start_path("roots", roots.pid), as_nobody=False)[0] == 200
        assert unix_get(p.a, sock, "/endprofile/jobid=roots")[0] == 403
        assert unix_get(p.a, sock, "/endprofile/jobid=own")[0] == 200
        assert unix_get(p.a, sock, "/endprofile/jobid=roots", as_nobody=False)[0] == 200
        assert unix_get(p.a, sock, "/shutdown", as_nobody=False)[0] == 200
        svc.proc.wait(30)
        assert svc.proc.returncode == 0 and not os.path.exists(sock)
    finally:
        svc.stop()
        if os.path.exists(sock):
            os.remove(sock)
