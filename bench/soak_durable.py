#!/usr/bin/env python3
"""Is a StartProfile that was answered 200 durable? Register a process, kill -9 the service at once, start it
again with the same config (and so the same state file), let the process connect, look for it in the log.

  python bench/soak_durable.py                      30 tracked processes holding 6,000 descriptors each, 10 rounds
  python bench/soak_durable.py --fat 0              no such processes
  python bench/soak_durable.py --delay 4            wait 4 s between the answer and the kill (the control case)

The processes with many descriptors make the profiler's pass long (its sweep walks their /proc/PID/fd);
the state is written only at the end of a pass, while the answer goes out in its middle. Prints one line
per round and exits 1 if any registration answered 200 was gone after the restart.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

from harness import PYTHON, Service, start_client, start_server  # noqa: E402
from nstools import NetPair, wait_for  # noqa: E402

FAT = ("import resource, socket, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000)); "
       "held = [socket.socketpair() for _ in range({n})]; print('ok', flush=True); sys.stdin.read()")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fat", type=int, default=30, help="tracked processes holding many descriptors")
    ap.add_argument("--fds", type=int, default=3000, help="socket pairs each of them holds")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds between the 200 and the kill")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("must run as root")
    pair = NetPair()
    services = []
    lost = 0
    try:
        svc = Service(pair.a, [pair.iface_a])
        svc.start()
        services.append(svc)
        start_server(pair.b, pair.ip_b, 9000)
        fat = [pair.a.popen(PYTHON, "-c", FAT.format(n=args.fds), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True) for _ in range(args.fat)]
        for proc in fat:
            assert proc.stdout.readline().strip() == "ok"
            assert svc.start_profile("fat", proc.pid)[0] == 200
        for i in range(args.rounds):
            client = start_client(pair.a, pair.ip_b, 9000, down=1000)
            t0 = time.monotonic()
            code, body = svc.start_profile(f"durable#{i}", client.pid)
            assert code == 200, body
            answered = time.monotonic()
            if args.delay:
                time.sleep(args.delay)    # the control case: the pass has ended before the kill
            svc.proc.send_signal(signal.SIGKILL)
            svc.proc.wait(10)
            request_ms, to_kill_ms = 1000 * (answered - t0), 1000 * (time.monotonic() - answered)
            again = Service(pair.a, [pair.iface_a])
            shutil.rmtree(again.dir, ignore_errors=True)     # the old config (and state file) is the one
            again.dir, again.config_path, again.log_dir = svc.dir, svc.config_path, svc.log_dir
            again.out_path = f"{svc.out_path}.{i + 1}"
            again.start()
            services.append(again)
            svc = again
            code, job = svc.get(f"/v1/jobs/durable%23{i}")
            known = code == 200 and client.pid in job.get("processes", [])
            client.stdin.write("go\n")
            client.stdin.flush()
            conn = json.loads(client.stdout.readline())
            client.stdin.close()
            client.wait(30)
            key = (conn["local"], conn["lport"], conn["remote"], conn["rport"])
            try:
                wait_for(lambda: key in svc.logged(pair.iface_a), timeout=5, what="logged")
                logged = True
            except AssertionError:
                logged = False
            lost += not logged
            print(f"round {i}: StartProfile took {request_ms:.0f} ms, 200 -> kill {to_kill_ms:.0f} ms; after the restart the job is known: {known}; "
                  f"its connection is logged: {logged}", flush=True)
        print(f"registrations answered 200 and gone after a kill -9: {lost} of {args.rounds}")
    finally:
        for s in services:
            try:
                s.stop(60)
            except Exception as exc:   # noqa: BLE001 - cleanup goes on
                print(f"stopping a service: {exc}", file=sys.stderr)
        pair.close()
        if services:
            shutil.rmtree(services[0].dir, ignore_errors=True)
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
