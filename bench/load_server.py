#!/usr/bin/env python3
"""A single-process selectors (epoll) TCP server that copes with tens of thousands of connections.

  load_server.py --bind IP --port P

Protocol, per connection: the client sends a header line "<up> <down>\\n" and then <up> bytes; once it
has them all the server sends <down> bytes and then waits; when the client closes, the server closes.
Prints {"listening": port, "pid": pid} once ready; ends on SIGTERM (or, with --stdin, when stdin closes). Raises RLIMIT_NOFILE first (root may raise the hard limit).
"""
import argparse
import json
import os
import resource
import selectors
import signal
import socket
import sys

BLOCK = b"d" * (1 << 16)


def raise_nofile(want=200_000):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, want)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Conn:
    __slots__ = ("sock", "buf", "up_left", "down_left", "header_done")

    def __init__(self, sock):
        self.sock, self.buf, self.up_left, self.down_left, self.header_done = sock, b"", 0, 0, False


def serve(bind, port, backlog, stdin_watch=False):
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(backlog)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    if stdin_watch:
        sel.register(0, selectors.EVENT_READ, "stdin")
    print(json.dumps({"listening": srv.getsockname()[1], "pid": os.getpid()}), flush=True)
    open_conns = 0

    def close(c):
        nonlocal open_conns
        sel.unregister(c.sock)
        c.sock.close()
        open_conns -= 1

    def send_some(c):
        while c.down_left > 0:
            try:
                n = c.sock.send(BLOCK[:min(len(BLOCK), c.down_left)])
            except BlockingIOError:
                sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                return
            except OSError:
                close(c)
                return
            c.down_left -= n
        sel.modify(c.sock, selectors.EVENT_READ, c)

    while True:
        for key, events in sel.select():
            if key.data is None:
                for _ in range(512):
                    try:
                        sock, _ = srv.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    sock.setblocking(False)
                    sel.register(sock, selectors.EVENT_READ, Conn(sock))
                    open_conns += 1
                continue
            if key.data == "stdin":
                if not os.read(0, 4096):
                    return
                continue
            c = key.data
            if events & selectors.EVENT_WRITE:
                send_some(c)
                if c.sock.fileno() < 0:
                    continue
            if not events & selectors.EVENT_READ:
                continue
            try:
                data = c.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(c)
                continue
            if not c.header_done:
                c.buf += data
                if b"\n" not in c.buf:
                    continue
                line, _, rest = c.buf.partition(b"\n")
                up, down = (int(x) for x in line.split())
                c.header_done, c.buf = True, b""
                c.up_left, c.down_left = up - len(rest), down
            else:
                c.up_left -= len(data)
            if c.up_left <= 0 and c.down_left > 0:
                send_some(c)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--stdin", action="store_true", help="end when stdin closes")
    args = ap.parse_args()
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
    serve(args.bind, args.port, args.backlog, args.stdin)


if __name__ == "__main__":
    main()
