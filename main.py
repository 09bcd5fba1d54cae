#!/usr/bin/env python3
"""NetProfiler: per-connection network accounting for batch-system jobs.

  python main.py [--config PATH] PORT                      run the service with its HTTP API on PORT
  python main.py [--config PATH] run [--job NAME] -- CMD    profile CMD and its children, print a table
  python main.py [--config PATH] profile --pid PID [--job NAME]   profile a running process until it exits
"""
import argparse
import logging
import logging.handlers
import os
import signal
import sys

from profiler.config import DEFAULT_CONFIG_PATH, load_config
from profiler.errors import ConfigError, ProfilerError

log = logging.getLogger("netprofiler")


def _port(text):
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"PORT {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"PORT {text} is not between 0 and 65535")
    return port


def build_parser():
    parser = argparse.ArgumentParser(
        prog="main.py", description="Per-connection network accounting for batch-system jobs (runs as root).",
        epilog="commands:\n"
               "  main.py [--config PATH] PORT                          run the service, HTTP API on PORT\n"
               "  main.py [--config PATH] run [--job NAME] -- CMD ...   profile CMD, print its connections\n"
               "  main.py [--config PATH] profile --pid PID [--job NAME]  profile a running process\n"
               "(main.py run --help, main.py profile --help for theirs)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help="configuration file (default: config.ini beside main.py)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def build_serve_parser():
    parser = build_parser()
    parser.add_argument("port", type=_port, metavar="PORT", help="TCP port of the HTTP API (on BIND_ADDRESS)")
    return parser


def build_run_parser():
    parser = build_parser()
    parser.prog = "main.py run"
    parser.description = "Run CMD profiled from its first instruction; print its connections when it exits."
    parser.add_argument("--job", default=None, help="job name in the logs (default: run-<pid>)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return parser


def build_profile_parser():
    parser = build_parser()
    parser.prog = "main.py profile"
    parser.description = "Profile a running process and its descendants until it exits or Ctrl-C."
    parser.add_argument("--pid", type=int, required=True, help="the process to profile")
    parser.add_argument("--job", default=None, help="job name in the logs (default: pid-<PID>)")
    return parser


def split_command(argv):
    """Which command, and its arguments; --config/-v may come before the command word."""
    for i, arg in enumerate(argv):
        if arg in ("run", "profile"):
            return arg, argv[:i] + argv[i + 1:]
        if arg == "--":
            break
        if arg == "--config":
            continue
        if not arg.startswith("-") and (i == 0 or argv[i - 1] != "--config"):
            break
    return "serve", argv


def setup_logging(config, verbose):
    handlers = [logging.StreamHandler(sys.stderr)]
    if config is not None and config.service_log:
        # Reopens by itself when logrotate moves the file away.
        handlers.append(logging.handlers.WatchedFileHandler(config.service_log))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s", force=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = split_command(argv)
    parser = {"serve": build_serve_parser, "run": build_run_parser, "profile": build_profile_parser}[command]()
    args = parser.parse_args(rest)
    if command == "run":
        if args.cmd and args.cmd[0] == "--":
            args.cmd = args.cmd[1:]
        if not args.cmd:
            parser.error("name the command to run after --")
    if os.geteuid() != 0:
        print("netprofiler: must run as root (it installs netfilter rules and captures packets); "
              "try: sudo python main.py ...", file=sys.stderr)
        return 1
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"netprofiler: {exc}", file=sys.stderr)
        return 2
    setup_logging(config, args.verbose)

    from profiler.service import build_service
    from profiler.standalone import profile_pid, run_command

    try:
        service = build_service(config)
    except ProfilerError as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        service.start(port=args.port if command == "serve" else None)
    except ProfilerError as exc:
        log.error("cannot start: %s", exc)
        service.shutdown()
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        service.shutdown()
        return 1
    code = 0
    try:
        if command == "serve":
            service.config_path = args.config
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda s, f: service.request_shutdown())
            signal.signal(signal.SIGHUP, lambda s, f: service.request_reload())
            signal.signal(signal.SIGUSR1, lambda s, f: service.request_reopen())
            service.wait()
        elif command == "run":
            code = run_command(service, args.job or f"run-{os.getpid()}", args.cmd)
        else:
            code = profile_pid(service, args.job or f"pid-{args.pid}", args.pid)
    except ProfilerError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        service.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
