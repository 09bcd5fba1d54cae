"""Real TCP traffic for the end-to-end tests (a server and a client in one script).

server: for each connection reads a header line "<download> <mode>\n", then
    mode "normal": reads the upload until the client half-closes, then sends
      <download> bytes and closes (the half-close case);
    mode "rst-server": the same, but resets (SO_LINGER 0) after half the download;
    mode "hold": sends <download> at once, then waits for the client's EOF.
client: makes connections and prints one JSON line per connection
    {"pid", "local", "lport", "remote", "rport", "received"}; with --wait it
    first reads a line from stdin, so a test can register it before any connection.
"""
import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time


def serve(args):
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.bind, args.port))
    srv.listen(1024)
    workers = []
    for _ in range(args.prefork):
        pid = os.fork()
        if pid == 0:
            while True:   # a pre-forked worker: all share the listening socket
                conn, _ = srv.accept()
                handle(conn)
        workers.append(pid)
    print(json.dumps({"listening": srv.getsockname()[1], "pid": os.getpid(), "workers": workers}), flush=True)
    if workers:
        signal.signal(signal.SIGTERM, lambda s, f: [os.kill(w, signal.SIGTERM) for w in workers] and sys.exit(0))
        while True:
            signal.pause()
    while True:
        conn, _ = srv.accept()
        if args.fork:
            if os.fork() == 0:
                srv.close()
                handle(conn)
                os._exit(0)
            conn.close()
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
        else:
            threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _recv_line(conn):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def handle(conn):
    try:
        header = _recv_line(conn).split()
        if len(header) < 2:
            return
        download, mode = int(header[0]), header[1]
        while mode != "hold":
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
        block = b"x" * (1 << 16)
        to_send = download // 2 if mode == "rst-server" else download
        while to_send > 0:
            n = conn.send(block[:min(len(block), to_send)])
            to_send -= n
        if mode == "rst-server":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if mode == "hold":
            while conn.recv(1 << 16):
                pass
    except OSError:
        pass
    finally:
        conn.close()


def one_connection(args, remote, port):
    family = socket.AF_INET6 if ":" in remote else socket.AF_INET
    c = socket.socket(family, socket.SOCK_STREAM)
    c.connect((remote, port))
    local = c.getsockname()
    mode = "rst-server" if args.reset == "server" else "hold" if args.keep_open else "normal"
    c.sendall(f"{args.down} {mode}\n".encode())
    block = b"u" * (1 << 16)
    left = args.up
    started = time.monotonic()
    while left > 0:
        left -= c.send(block[:min(len(block), left)])
        if args.pace:
            # Upload at about --pace bytes a second, so a test can act in the middle of a transfer.
            ahead = (args.up - left) / args.pace - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    received = 0
    if args.keep_open:
        while received < args.down:
            received += len(c.recv(1 << 16))
        result = {"pid": os.getpid(), "local": local[0], "lport": local[1], "remote": remote, "rport": port,
                  "received": received}
        print(json.dumps(result), flush=True)
        sys.stdin.readline()       # stays open, idle, until the test says so
        c.close()
        return None
    if args.reset == "client":
        # Read some of the download, then reset from our side in the middle of it.
        c.shutdown(socket.SHUT_WR)
        while received < args.down // 2:
            chunk = c.recv(1 << 16)
            if not chunk:
                break
            received += len(chunk)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    else:
        c.shutdown(socket.SHUT_WR)
        try:
            while True:
                chunk = c.recv(1 << 16)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass
        c.close()
    return {"pid": os.getpid(), "local": local[0], "lport": local[1], "remote": remote, "rport": port,
            "received": received}


def hold_all(args):
    """Open --count connections, exchange the data on each, keep them all open until stdin says."""
    socks = []
    for _ in range(args.count):
        family = socket.AF_INET6 if ":" in args.connect else socket.AF_INET
        c = socket.socket(family, socket.SOCK_STREAM)
        c.connect((args.connect, args.port))
        c.sendall(f"{args.down} hold\n".encode() + b"u" * args.up)
        received = 0
        while received < args.down:
            received += len(c.recv(1 << 16))
        local = c.getsockname()
        print(json.dumps({"pid": os.getpid(), "local": local[0], "lport": local[1], "remote": args.connect,
                          "rport": args.port, "received": received}), flush=True)
        socks.append(c)
    sys.stdin.readline()
    for c in socks:
        c.close()


def client(args):
    if args.wait:
        sys.stdin.readline()
    if args.hold_all:
        return hold_all(args)
    if args.parallel > 1:
        lock = threading.Lock()

        def worker(n):
            for _ in range(n):
                out = json.dumps(one_connection(args, args.connect, args.port))
                with lock:
                    print(out, flush=True)
        share = [args.count // args.parallel + (i < args.count % args.parallel) for i in range(args.parallel)]
        threads = [threading.Thread(target=worker, args=(n,)) for n in share]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return
    for _ in range(args.count):
        if args.child or args.grandchild:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                if args.grandchild and os.fork() != 0:
                    os.wait()
                    os._exit(0)
                out = json.dumps(one_connection(args, args.connect, args.port))
                os.write(w, (out + "\n").encode())
                os._exit(0)
            os.close(w)
            data = b""
            while True:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                data += chunk
            os.waitpid(pid, 0)
            sys.stdout.write(data.decode())
            sys.stdout.flush()
        else:
            result = one_connection(args, args.connect, args.port)
            if result is not None:
                print(json.dumps(result), flush=True)
    if args.linger_stdin:
        sys.stdin.readline()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--fork", action="store_true", help="serve each connection in a forked child")
    s.add_argument("--prefork", type=int, default=0, help="accept in this many workers forked after listen()")
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--up", type=int, default=0)
    c.add_argument("--pace", type=float, default=0, help="upload at about this many bytes a second")
    c.add_argument("--down", type=int, default=0)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--parallel", type=int, default=1, help="connections made by this many threads at once")
    c.add_argument("--child", action="store_true")
    c.add_argument("--grandchild", action="store_true")
    c.add_argument("--reset", choices=("client", "server"))
    c.add_argument("--wait", action="store_true")
    c.add_argument("--keep-open", action="store_true", help="after the download, stay connected until stdin")
    c.add_argument("--hold-all", action="store_true", help="all --count connections open at once until stdin")
    c.add_argument("--linger-stdin", action="store_true", help="stay alive until a line on stdin")
    args = p.parse_args()
    serve(args) if args.cmd == "server" else client(args)


if __name__ == "__main__":
    main()
