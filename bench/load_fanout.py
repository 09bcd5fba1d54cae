#!/usr/bin/env python3
"""One parent that forks many children, each holding several TCP connections open until told (tests/test_load.py).

  load_fanout.py --connect IP --port P [--children 1000] [--conns 10] [--api-port N --jobs 5 --job-prefix J]
                 --out FILE

Run it in the service's namespace. The parent forks the children first (they wait on a pipe), then,
with --api-port, registers every child with StartProfile at 127.0.0.1:<api-port>, child i in job
<job-prefix><i % jobs>. Then it is driven by lines on stdin, and answers each with a JSON line:

  (start)  {"phase": "forked", "pids": [...]}            then {"phase": "registered", "ok", "errors", "secs"}
  go       every child (in waves of --wave children, each once the last has connected) opens its --conns connections to IP:P (--pattern sequential: one after the other;
           parallel: all its SYNs at once, then the exchanges) (bench/load_server.py
           protocol: "<up> <down>\\n", <up> bytes up, <down> bytes down; the sizes vary per connection)
           and keeps them open: {"phase": "connected", "conns", "errors", "secs"}; FILE gets one JSON line
           per child: {"pid", "local", "conns": [[lport, up, down, received], ...]}
  close    every child closes its connections (the client closes first): {"phase": "closed", "secs"}
  exit     the children exit, the parent reaps them and exits: {"phase": "exited", "children"}

The children die with the parent (PR_SET_PDEATHSIG); on SIGTERM the parent kills them (by PID) first.
"""
import argparse
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from urllib.parse import quote

PR_SET_PDEATHSIG = 1
PHASE_TIMEOUT = 600.0


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def sizes(child, j):
    """(up, down) of connection j of child `child`: 0 B to ~40 KB, every child a different mix."""
    up = (child * 131 + j * 977) % 9000
    down = (child * 71 + j * 3313) % 40000
    if j == 0:
        up, down = 0, 0          # a connection that carries only the header
    return up, down


def wait_eof(fd):
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except InterruptedError:
            continue


def exchange(s, index, j, conns):
    up, down = sizes(index, j)
    lport = s.getsockname()[1]
    s.sendall(f"{up} {down}\n".encode() + b"u" * up)
    got = 0
    while got < down:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    conns.append([lport, up, down, got])


def child_main(index, args, go_r, close_r, exit_r, res_w):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)
    wait_eof(go_r)
    socks, conns, err, local = [], [], "", ""
    family = socket.AF_INET6 if ":" in args.connect else socket.AF_INET
    try:
        for j in range(args.conns):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            if args.pattern == "parallel":
                s.setblocking(False)
                s.connect_ex((args.connect, args.port))   # all SYNs of this child at once
            else:
                s.settimeout(args.timeout)
                s.connect((args.connect, args.port))      # one after the other: each waits for the last
                exchange(s, index, j, conns)
        if args.pattern == "parallel":
            deadline = time.monotonic() + args.timeout
            pending = list(socks)
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(pending)} connects still pending")
                _, writable, _ = select.select([], pending, [], left)
                for s in writable:
                    pending.remove(s)
                    error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, os.strerror(error))
            for j, s in enumerate(socks):
                s.settimeout(args.timeout)
                exchange(s, index, j, conns)
        local = socks[0].getsockname()[0] if socks else ""
    except OSError as exc:
        err = f"{type(exc).__name__}: {exc}"
    msg = json.dumps({"pid": os.getpid(), "local": local, "conns": conns, "err": err}) + "\n"
    os.write(res_w, msg.encode())           # < PIPE_BUF: one atomic write
    wait_eof(close_r)
    for s in socks:
        s.close()
    os.write(res_w, (json.dumps({"pid": os.getpid(), "closed": True}) + "\n").encode())
    wait_eof(exit_r)
    os._exit(0)


def register(children, args):
    """StartProfile for every child, 8 callers at once: (ok count, [errors])."""
    import http.client

    import psutil
    ok, errors, lock = [0], [], threading.Lock()
    todo = list(enumerate(children))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, pid = todo.pop()
            job = f"{args.job_prefix}{i % args.jobs}"
            try:
                birth = psutil.Process(pid).create_time()
                conn = http.client.HTTPConnection("127.0.0.1", args.api_port, timeout=60)
                conn.request("GET", f"/startprofile/jobid={quote(job, safe='')},pid={pid},owner=root,birthdate={birth}")
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                good = resp.status == 200
                detail = f"{resp.status} {body[:200]!r}"
            except Exception as exc:   # noqa: BLE001 - reported, not hidden
                good, detail = False, f"{type(exc).__name__}: {exc}"
            with lock:
                if good:
                    ok[0] += 1
                elif len(errors) < 20:
                    errors.append({"pid": pid, "job": job, "error": detail})
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ok[0], errors


class Lines:
    """Newline-delimited messages from the children's result pipe, read with a deadline."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def read(self, n, timeout):
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            while b"\n" in self.buf and len(out) < n:
                line, self.buf = self.buf.split(b"\n", 1)
                out.append(json.loads(line))
            if len(out) >= n:
                break
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                break
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                break
            self.buf += chunk
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--children", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--api-port", type=int)
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--job-prefix", default="fan#")
    ap.add_argument("--pattern", choices=("sequential", "parallel"), default="sequential",
                    help="a child's connections one after the other, or all its SYNs at once")
    ap.add_argument("--wave", type=int, default=0,
                    help="children released at once; the next wave goes when they have all connected (0: all)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per socket operation in the children")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))

    wave = args.wave or args.children
    go_pipes = [os.pipe() for _ in range(0, args.children, wave)]    # one "go" per wave of children
    close_r, close_w = os.pipe()
    exit_r, exit_w = os.pipe()
    res_r, res_w = os.pipe()
    children = []

    def kill_children(signum=None, frame=None):
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        if signum is not None:
            os._exit(1)
    signal.signal(signal.SIGTERM, kill_children)

    try:
        for i in range(args.children):
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                for fd in [w for _, w in go_pipes] + [close_w, exit_w, res_r]:
                    os.close(fd)
                for r, _ in go_pipes[:i // wave] + go_pipes[i // wave + 1:]:
                    os.close(r)
                try:
                    child_main(i, args, go_pipes[i // wave][0], close_r, exit_r, res_w)
                finally:
                    os._exit(2)
            children.append(pid)
        for fd in [r for r, _ in go_pipes] + [close_r, exit_r, res_w]:
            os.close(fd)
        say({"phase": "forked", "pids": children})
        if args.api_port:
            t0 = time.monotonic()
            ok, errors = register(children, args)
            say({"phase": "registered", "ok": ok, "errors": errors, "secs": round(time.monotonic() - t0, 2)})
        lines = Lines(res_r)
        for command in sys.stdin:
            command = command.strip()
            if command == "go":
                t0 = time.monotonic()
                results, wave_secs = [], []
                for w, (_, go_w) in enumerate(go_pipes):
                    tw = time.monotonic()
                    os.close(go_w)
                    size = min(wave, len(children) - w * wave)
                    got = lines.read(size, PHASE_TIMEOUT)
                    results += got
                    wave_secs.append(round(time.monotonic() - tw, 2))
                    if len(got) < size:
                        break
                with open(args.out, "w") as f:
                    for r in results:
                        f.write(json.dumps(r) + "\n")
                errors = [r for r in results if r["err"]][:20]
                say({"phase": "connected", "children": len(results), "conns": sum(len(r["conns"]) for r in results),
                     "errors": errors, "secs": round(time.monotonic() - t0, 2), "wave_secs": wave_secs})
            elif command == "close":
                t0 = time.monotonic()
                os.close(close_w)
                done = lines.read(len(children), PHASE_TIMEOUT)
                say({"phase": "closed", "children": len(done), "secs": round(time.monotonic() - t0, 2)})
            elif command == "exit":
                os.close(exit_w)
                reaped = 0
                deadline = time.monotonic() + 120
                while children and time.monotonic() < deadline:
                    try:
                        pid, _ = os.waitpid(-1, 0)
                    except ChildProcessError:
                        break
                    if pid in children:
                        children.remove(pid)      # reaped: its pid may be reused, never signal it again
                        reaped += 1
                say({"phase": "exited", "children": reaped})
                return
    finally:
        kill_children()


if __name__ == "__main__":
    main()
