"""Profiling without a batch system: `run -- CMD` and `profile --pid PID`."""
import os
import signal
import sys
import threading

from .errors import ProfilerError


def format_report(answer, out):
    conns = answer.get("connections", [])
    out.write(f"{'PID':>7}  {'LOCAL':<28} {'REMOTE':<28} {'DIR':<3} {'IN BYTES':>12} {'OUT BYTES':>12}  END\n")
    for c in conns:
        local = f"{c['local']}:{c['lport']}"
        remote = f"{c['remote']}:{c['rport']}"
        flag = "" if c["complete"] else " (incomplete)"
        out.write(f"{c['pid']:>7}  {local:<28} {remote:<28} {'out' if c['outgoing'] else 'in':<3} "
                  f"{c['in_bytes']:>12} {c['out_bytes']:>12}  {c['reason']}{flag}\n")
    t = answer.get("totals", {})
    out.write(f"total: {t.get('connections', 0)} connections, {t.get('in_bytes', 0)} bytes in, "
              f"{t.get('out_bytes', 0)} bytes out{'' if t.get('complete', True) else ' (incomplete)'}\n")


def _finish(service, job, out, settle):
    # Let the last FIN/ACK exchanges of the command's connections be counted.
    threading.Event().wait(settle)
    try:
        answer = service.profiler.call("end_job", job, timeout=30)
    except ProfilerError as exc:
        out.write(f"netprofiler: {exc}\n")
        answer = {"connections": [], "totals": {}}
    format_report(answer, out)
    return answer


def run_command(service, job, argv, out=sys.stderr):
    """Start `argv` registered before its first instruction; return its exit status."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        os.read(read_fd, 1)   # wait until the parent has registered us
        os.close(read_fd)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"netprofiler: cannot run {argv[0]}: {exc.strerror}\n".encode())
            os._exit(127)
    os.close(read_fd)
    try:
        ident = service.profiler.processes.identity(pid)
        service.profiler.call("start", job, pid, str(ident.uid), ident.create_time)
    finally:
        os.write(write_fd, b"g")
        os.close(write_fd)
    forward = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        forward[sig] = signal.signal(sig, lambda s, f: os.kill(pid, s))
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, old in forward.items():
            signal.signal(sig, old)
    _finish(service, job, out, service.config.close_linger + service.config.sweep_interval)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def profile_pid(service, job, pid, out=sys.stderr):
    ident = service.profiler.processes.identity(pid)
    service.profiler.call("start", job, pid, str(ident.uid), ident.create_time)
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda s, f: stop.set())
    old_term = signal.signal(signal.SIGTERM, lambda s, f: stop.set())
    try:
        while not stop.wait(0.2):
            if not service.profiler.processes.alive(ident):
                break
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
    _finish(service, job, out, service.config.close_linger + service.config.sweep_interval)
    return 0
