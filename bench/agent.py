#!/usr/bin/env python3
"""Processes the benchmark runs inside its namespaces, driven by JSON lines.

  agent.py server  --bind IP --port P     one epoll loop: a first byte b"H" = hold (echo, stay open
                                          until the client closes); b"S" = short (read the 64-byte
                                          request, send 256 bytes, close: the server closes first)
  agent.py foreign --count N              N loopback sockets (N/2 connections to itself), idle
  agent.py client                         reads one JSON command a line on stdin, answers one JSON
                                          line on stdout (see Client.op_*)

Every role raises RLIMIT_NOFILE first and ends when its stdin closes (or on SIGTERM).
"""
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline  # noqa: E402

HOLD_HELLO = b"H" * 32
SHORT_REQ = b"S" * 64
SHORT_REPLY = 256


def raise_nofile(want=200_000):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, want)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))   # root may raise the hard limit
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _exit_on_eof():
    def watch():
        sys.stdin.read()
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


# --- server -------------------------------------------------------------------------------


def serve(bind, port):
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(4096)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    print(json.dumps({"listening": port, "pid": os.getpid()}), flush=True)
    reply = b"r" * SHORT_REPLY
    while True:
        for key, _ in sel.select():
            if key.data is None:
                for _ in range(256):
                    try:
                        conn, _ = srv.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, [None, 0])
                continue
            conn, state = key.fileobj, key.data
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                conn.close()
                continue
            if state[0] is None:
                state[0] = data[:1]
            if state[0] == b"H":
                try:
                    conn.send(data)   # echo; tiny, fits the send buffer
                except OSError:
                    pass
                continue
            state[1] += len(data)
            if state[1] >= len(SHORT_REQ):
                sel.unregister(conn)
                try:
                    conn.setblocking(True)
                    conn.sendall(reply)
                except OSError:
                    pass
                conn.close()


# --- foreign sockets --------------------------------------------------------------------------


def foreign(count):
    """count/2 loopback connections held by this (untracked) process: count sockets in all."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    held = []
    for _ in range(count // 2):
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        held += [c, s]
    print(json.dumps({"sockets": len(held), "pid": os.getpid()}), flush=True)
    sys.stdin.read()


# --- tracked client ---------------------------------------------------------------------------


def _addr(host, port):
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)


def short_connection(host, port, timeout=10.0):
    """connect, send the 64-byte request, read the reply to EOF, close: (connect secs, local, lport, got)."""
    family, addr = _addr(host, port)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        t0 = time.perf_counter()
        s.connect(addr)
        t1 = time.perf_counter()
        local = s.getsockname()
        s.sendall(SHORT_REQ)
        got = 0
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        return t1 - t0, local[0], local[1], got
    finally:
        s.close()


class Client:
    def __init__(self):
        self.groups = defaultdict(list)   # name -> [socket]

    def op_open(self, host, port, n, group="live", parallel=128, deadline=300.0):
        """Open n held connections, at most `parallel` connecting at once; each exchanges 32 bytes."""
        family, addr = _addr(host, port)
        sel = selectors.DefaultSelector()
        done, failed, started, inflight = 0, 0, 0, 0
        lat = []
        t_start = time.perf_counter()
        deadline = time.monotonic() + deadline
        while done + failed < n and time.monotonic() < deadline:
            while started < n and inflight < parallel:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex(addr)
                sel.register(s, selectors.EVENT_WRITE, ["connecting", time.perf_counter(), 0])
                started += 1
                inflight += 1
            for key, _ in sel.select(0.5):
                s, st = key.fileobj, key.data
                if st[0] == "connecting":
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        sel.unregister(s)
                        s.close()
                        failed += 1
                        inflight -= 1
                        continue
                    lat.append(time.perf_counter() - st[1])
                    s.send(HOLD_HELLO)
                    st[0] = "echo"
                    sel.modify(s, selectors.EVENT_READ, st)
                    continue
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                st[2] += len(data)
                if not data or st[2] >= len(HOLD_HELLO):
                    sel.unregister(s)
                    inflight -= 1
                    if data:
                        self.groups[group].append(s)
                        done += 1
                    else:
                        s.close()
                        failed += 1
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)
            key.fileobj.close()
            failed += 1
        lat.sort()
        return {"opened": done, "failed": failed + (n - started), "secs": time.perf_counter() - t_start,
                "connect_p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
                "total": sum(len(g) for g in self.groups.values())}

    def op_probe(self, host, port, n, gap=0.01):
        """n sequential short connections: connect() latency of each, and its 4-tuple."""
        lat, conns, errors = [], [], 0
        for _ in range(n):
            try:
                secs, local, lport, got = short_connection(host, port)
            except OSError:
                errors += 1
                continue
            lat.append(secs)
            conns.append([local, lport, got])
            time.sleep(gap)
        return {"lat": lat, "conns": conns, "errors": errors}

    def op_churn(self, host, port, secs, parallel=16):
        """As many short connections as `parallel` threads make in `secs` seconds."""
        deadline = time.monotonic() + secs
        out, errors, lock = [], [0], threading.Lock()

        def worker():
            mine, err = [], 0
            while time.monotonic() < deadline:
                try:
                    _, local, lport, got = short_connection(host, port)
                    mine.append([local, lport, got])
                except OSError:
                    err += 1
            with lock:
                out.extend(mine)
                errors[0] += err
        threads = [threading.Thread(target=worker) for _ in range(parallel)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"conns": out, "errors": errors[0], "secs": time.perf_counter() - t0}

    def op_churn_rate(self, host, port, rate, secs, sources=(), timeout=10.0, max_inflight=2000):
        """Open loop: start `rate` short connections a second for `secs` seconds, whatever the answers
        (a closed loop of N clients measures N / latency, not what the service sustains). Each
        connects, sends the 64-byte request, reads the reply to EOF and closes. `sources`: local
        addresses used in turn, so that no 4-tuple repeats within the run (each has its own ports).
        At most `max_inflight` connections wait at once: beyond that the offer falls behind its
        schedule (and the rate achieved says so) instead of running out of descriptors; what was
        not started within `secs` is not started at all (`not_started`)."""
        family, addr = _addr(host, port)
        sel = selectors.DefaultSelector()
        conns, errors, lat, started, inflight, peak = [], 0, [], 0, 0, 0
        total = int(rate * secs)
        t0 = time.perf_counter()
        last_done = next_check = last_start = t0

        def finish(sock, ok, st):
            nonlocal inflight, errors, last_done
            sel.unregister(sock)
            if ok:
                conns.append([st[3], st[4], st[2]])
                last_done = time.perf_counter()
            else:
                errors += 1
            sock.close()
            inflight -= 1

        end = t0 + secs
        while (started < total and time.perf_counter() < end) or inflight:
            now = time.perf_counter()
            while started < total and t0 + started / rate <= now < end and inflight < max_inflight:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                if sources:
                    sock.setsockopt(socket.IPPROTO_IP, 24, 1)   # IP_BIND_ADDRESS_NO_PORT: a port per 4-tuple
                    sock.bind((sources[started % len(sources)], 0))
                sock.connect_ex(addr)
                sel.register(sock, selectors.EVENT_WRITE, ["connecting", now, 0, None, None])
                last_start = now
                started += 1
                inflight += 1
            peak = max(peak, inflight)
            wait = (max(0.0, t0 + started / rate - time.perf_counter())
                    if started < total and inflight < max_inflight else 0.2)
            for key, _ in sel.select(min(wait, 0.2)):
                sock, st = key.fileobj, key.data
                if st[0] == "connecting":
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        finish(sock, False, st)
                        continue
                    lat.append(time.perf_counter() - st[1])
                    try:
                        st[3], st[4] = sock.getsockname()[:2]
                        sock.send(SHORT_REQ)   # 64 bytes: always fits an empty send buffer
                    except OSError:
                        finish(sock, False, st)
                        continue
                    st[0] = "reading"
                    sel.modify(sock, selectors.EVENT_READ, st)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    finish(sock, False, st)
                    continue
                if data:
                    st[2] += len(data)
                else:
                    finish(sock, True, st)
            now = time.perf_counter()
            if now >= next_check:
                next_check = now + 0.1
                for key in list(sel.get_map().values()):
                    if now - key.data[1] > timeout:
                        finish(key.fileobj, False, key.data)
        lat.sort()
        return {"conns": conns, "errors": errors, "offered": total, "offer_secs": total / rate,
                "not_started": total - started,
                "offer_late_s": round(max(0.0, last_start - t0 - (total - 1) / rate), 3),
                "secs": last_done - t0, "max_inflight": peak,
                "connect_p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
                "connect_p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None}

    def op_close(self, group):
        """Close every socket of `group` at once; their 4-tuples."""
        socks = self.groups.pop(group, [])
        tuples = [list(s.getsockname()[:2]) for s in socks]
        t = time.time()
        for s in socks:
            s.close()
        return {"closed": len(socks), "conns": tuples, "t_close": t}

    def op_trim(self, group, keep):
        socks = self.groups.get(group, [])
        extra, self.groups[group] = socks[keep:], socks[:keep]
        for s in extra:
            s.close()
        return {"closed": len(extra), "total": sum(len(g) for g in self.groups.values())}

    def op_tuples(self):
        return {"conns": [[*s.getsockname()[:2], *s.getpeername()[:2]] for g in self.groups.values() for s in g]}

    def op_exec(self, argv, limit=120):
        """Run a command as our child (a tracked process's child joins its job)."""
        r = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
        return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr[-2000:]}

    # The 2011 design, measured from inside this namespace (see baseline.py).
    def op_baseline_populate(self, iface):
        return baseline.populate(iface, self.op_tuples()["conns"])

    def op_baseline_probe(self, iface, host, port, n, gap=0.01):
        return baseline.probe(iface, host, port, n, gap, self.groups["bprobe"])

    def op_baseline_harvest(self, iface):
        return baseline.harvest(iface, self.groups.pop("bprobe", []))

    def op_baseline_churn(self, iface, host, port, secs, parallel=16):
        return baseline.churn(iface, host, port, secs, parallel)

    def op_baseline_clear(self):
        return baseline.clear()


def client():
    c = Client()
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            ans = getattr(c, "op_" + op)(**req)
        except Exception as exc:   # answer, never hang the driver
            ans = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(ans) + "\n")
        sys.stdout.flush()


def main():
    signal.signal(signal.SIGTERM, lambda s, f: os._exit(0))
    raise_nofile()
    role = sys.argv[1]
    if role == "server":
        _exit_on_eof()
        serve(sys.argv[sys.argv.index("--bind") + 1], int(sys.argv[sys.argv.index("--port") + 1]))
    elif role == "foreign":
        foreign(int(sys.argv[sys.argv.index("--count") + 1]))
    elif role == "client":
        client()
    else:
        sys.exit(f"unknown role {role}")


if __name__ == "__main__":
    main()
