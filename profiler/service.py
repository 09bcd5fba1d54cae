"""Wires the adapters into a profiler and runs it, with a fixed shutdown order:
stop taking API calls, stop capture, harvest and log what is still open,
remove rules, close logs.
"""
import dataclasses
import logging
import os
import threading

from .clock import SystemClock
from .config import nflog_groups
from .core import Profiler
from .errors import ProfilerError

log = logging.getLogger("netprofiler")


class ApiServer:
    """cheroot's WSGI server in its own thread (web.py's app.run() would read sys.argv).

    With `unix_path`, it listens on that unix socket instead, where cheroot reads each peer's
    uid (SO_PEERCRED) into the environ, and marks the requests as coming through it."""

    def __init__(self, app, address=None, port=None, unix_path=None):
        from cheroot import wsgi

        from .api import UNIX_TRANSPORT
        wsgi_app = app.wsgifunc()
        self.unix_path = unix_path
        if unix_path:
            def marked(environ, start_response):
                environ[UNIX_TRANSPORT] = True
                return wsgi_app(environ, start_response)
            self.server = wsgi.Server(unix_path, marked, numthreads=16, server_name="netprofiler",
                                      peercreds_enabled=True, request_queue_size=512)
        else:
            # A burst of callers (every job start on a node at once) waits in the backlog, not refused.
            self.server = wsgi.Server((address, port), wsgi_app, numthreads=16, server_name="netprofiler",
                                      request_queue_size=512)
        self.thread = None

    def start(self):
        if self.unix_path and os.path.exists(self.unix_path):
            import stat
            if not stat.S_ISSOCK(os.stat(self.unix_path).st_mode):
                raise ProfilerError(f"API_SOCKET {self.unix_path} exists and is not a socket")
            os.remove(self.unix_path)    # left by an earlier run
        self.server.prepare()   # binds now, so a port in use fails the start, not the thread
        if self.unix_path:
            os.chmod(self.unix_path, 0o666)   # anyone may connect; each request is judged by its uid
        self.thread = threading.Thread(target=self.server.serve, name="api", daemon=True)
        self.thread.start()

    @property
    def port(self):
        return self.server.bind_addr[1]

    def stop(self):
        self.server.stop()
        if self.thread:
            self.thread.join(10)


class Service:
    def __init__(self, config, *, firewall, processes, sockets, sink, capture_factory, clock=None,
                 conntrack=None, synqueue_factory=None, store=None, labels=None):
        self.config = config
        self.store = store
        self.synqueue_factory = synqueue_factory
        self.synqueue = None
        self.firewall = firewall
        self.sink = sink
        self.conntrack = conntrack
        self.capture_factory = capture_factory
        self.profiler = Profiler(config, firewall, processes, sockets, sink, clock or SystemClock(),
                                 conntrack=conntrack, store=store, labels=labels)
        self.captures = {}
        self.profiler.capture_stats = self._capture_stats
        self.api = None
        self.unix_api = None
        self.stop_requested = threading.Event()
        self._wake = threading.Event()
        self._reload = self._reopen = False
        self.config_path = None
        self._stopped = False

    def start(self, port=None):
        if self.synqueue_factory is not None:
            try:
                self.synqueue = self.synqueue_factory(self.profiler.submit_held)
                self.synqueue.start()
            except ProfilerError as exc:
                log.warning("SYNs will not be held (%s): connections rely on conntrack for exact counts", exc)
                self.synqueue = None
                self.firewall.queue_num = None
                self._fast_path_off("SYNs are not held")
        keep = self.profiler.restore(self.store.load()) if self.store is not None else {}
        leftovers = self.firewall.setup(keep=keep)
        self.profiler.after_setup(self.firewall.installed)
        if keep:
            log.warning("restart: carried on with %d jobs, %d processes, %d connections (%d rule pairs still "
                        "in place)", len(self.profiler.jobs), len(self.profiler.procs), len(self.profiler.conns),
                        len(self.firewall.installed & set(keep)))
        self.profiler.start()
        if leftovers:
            n = self.profiler.call("harvest_leftovers", leftovers)
            log.warning("harvested %d rule pairs left by an earlier run", n)
        for iface in self.config.interfaces:
            self.profiler.capture_status[iface] = {"capturing": False}
            cap = self.capture_factory(iface, self.profiler.submit, self._capture_error)
            self.captures[iface] = cap
            cap.start()
            self.profiler.capture_status[iface] = {"capturing": True}
        if port is not None:
            from .api import make_app
            from .metrics import Metrics
            app = make_app(self.profiler, self.request_shutdown, metrics=Metrics(self.profiler),
                           token=self.config.api_token)
            # The unix socket first: once /status answers on TCP (the readiness check), both are ready.
            if self.config.api_socket:
                self.unix_api = ApiServer(app, unix_path=self.config.api_socket)
                self.unix_api.start()
            self.api = ApiServer(app, self.config.bind_address, port)
            self.api.start()
        log.info("netprofiler running on %s%s", ", ".join(self.config.interfaces),
                 f", API on {self.config.bind_address}:{self.api.port}" if self.api else "")

    def _fast_path_off(self, why):
        """Without held SYNs no connection is counted from its first packet: every packet walks the rules."""
        if getattr(self.firewall, "fast_label", None) is not None:
            log.warning("fast path off (%s): every packet on the watched interfaces walks the rule tree", why)
            self.firewall.fast_label = None
        if self.profiler.labels is not None:
            self.profiler.labels.close()
            self.profiler.labels = None

    def _capture_stats(self):
        out = {}
        for iface, cap in list(self.captures.items()):
            try:
                out[iface] = cap.stats()
            except ProfilerError as exc:
                out[iface] = {"error": str(exc)}
        return out

    def _capture_error(self, iface, exc):
        log.error("capture on %s: %s", iface, exc)
        status = self.profiler.capture_status.get(iface)
        if status is not None:
            status["capturing"] = bool(self.captures.get(iface) and self.captures[iface].running)
            status["error"] = str(exc)

    def request_shutdown(self):
        """Safe from signal handlers and API threads: it only sets an event."""
        self.stop_requested.set()
        self._wake.set()

    def request_reload(self):
        """SIGHUP: re-read the config file (from the main thread, not the handler)."""
        self._reload = True
        self._wake.set()

    def request_reopen(self):
        """SIGUSR1: reopen the logs after logrotate moved them."""
        self._reopen = True
        self._wake.set()

    def supervise(self):
        """Restart what died: a capture whose interface vanished and came back, the profiler thread."""
        for iface, cap in self.captures.items():
            if cap.running:
                continue
            status = self.profiler.capture_status.setdefault(iface, {})
            if status.get("capturing", True):
                log.error("capture on %s stopped; reopening it when the interface is back", iface)
                status["capturing"] = False
            try:
                cap.stop()
                cap.start()
            except (ProfilerError, RuntimeError) as exc:
                status["error"] = str(exc)
                continue
            status.clear()
            status["capturing"] = True
            status["restarts"] = status.get("restarts", 0) + 1
            log.warning("capture on %s reopened", iface)
        if not self.profiler.running and not self.stop_requested.is_set():
            log.error("the profiler thread died; restarting it")
            self.profiler.restarts += 1
            self.profiler.start()

    def wait(self):
        while not self.stop_requested.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            self.supervise()
            if self._reopen:
                self._reopen = False
                self.sink.reopen()
                log.info("logs reopened")
            if self._reload:
                self._reload = False
                self.reload()

    # Keys that take effect on SIGHUP; the others need a restart.
    RELOADABLE = ("max_bytes", "backup_count", "rules_threshold", "log_format", "internal_networks",
                  "close_linger", "sweep_interval", "metrics_retention")

    def reload(self):
        from .config import load_config
        try:
            new = load_config(self.config_path)
        except ProfilerError as exc:
            log.error("SIGHUP: the new config is not taken, the old one stays: %s", exc)
            return
        changes = {k: getattr(new, k) for k in self.RELOADABLE if getattr(new, k) != getattr(self.config, k)}
        fixed = [f.name for f in dataclasses.fields(new)
                 if f.name not in self.RELOADABLE and f.compare and getattr(new, f.name) != getattr(self.config, f.name)]
        if fixed:
            log.warning("SIGHUP: %s changed; that takes a restart", ", ".join(k.upper() for k in fixed))
        if not changes:
            log.info("SIGHUP: nothing to change")
            return
        self.config = dataclasses.replace(self.config, **changes)
        self.profiler.call("reconfigure", self.config)
        self.sink.reconfigure(self.config.max_bytes, self.config.backup_count, self.config.log_format,
                              self.config.internal_networks)
        log.info("SIGHUP: now in effect: %s", ", ".join(f"{k.upper()}={v}" for k, v in changes.items()))

    def shutdown(self):
        if self._stopped:
            return
        self._stopped = True
        for server in (self.api, self.unix_api):
            if server:
                server.stop()
        if self.unix_api and os.path.exists(self.unix_api.unix_path):
            os.remove(self.unix_api.unix_path)
        for iface, cap in self.captures.items():
            try:
                cap.stop()
            except ProfilerError as exc:
                log.error("stopping capture on %s: %s", iface, exc)
            self.profiler.capture_status[iface] = {"capturing": False}
        self.profiler.stop()
        if self.synqueue is not None:
            self.synqueue.stop()
        if self.profiler.running:
            log.error("the profiler did not finish its shutdown in time")
        self.sink.close()
        if self.store is not None and not self.profiler.running:
            self.store.close()
            try:
                # A clean stop harvested everything: nothing is left to carry on from.
                os.remove(self.config.state_file)
                for suffix in ("-wal", "-shm"):
                    if os.path.exists(self.config.state_file + suffix):
                        os.remove(self.config.state_file + suffix)
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.config.state_file, exc)
        if self.conntrack is not None:
            self.conntrack.close()
        if self.profiler.labels is not None and not self.profiler.running:
            self.profiler.labels.close()
        log.info("netprofiler stopped")


def build_service(config):
    """The service with the real adapters of this machine."""
    from .capture import PcapCapture
    from .firewall import IptablesFirewall
    from .shards import ShardedFirewall
    from .logsink import RollingLogSink
    from .proctable import ProcessTable
    from .sockdiag import SockDiag

    groups = nflog_groups(config)

    def capture_factory(iface, on_event, on_error):
        device = f"nflog:{groups[iface]}" if iface in groups else None
        return PcapCapture(iface, on_event, on_error=on_error, buffer_bytes=config.capture_buffer, device=device)

    conntrack = None
    if config.conntrack:
        from .conntrack import ConntrackReader
        conntrack = ConntrackReader()
        try:
            if not conntrack.enable_accounting():
                raise ProfilerError("net.netfilter.nf_conntrack_acct stays 0")
        except ProfilerError as exc:
            log.warning("conntrack accounting unavailable (%s): late rules make incomplete records", exc)
            conntrack.close()
            conntrack = None
    def synqueue_factory(on_syns):
        from .synqueue import SynQueue
        return SynQueue(config.queue_num, on_syns)

    from .store import StateStore
    try:
        store = StateStore(config.state_file)
    except Exception as exc:
        raise ProfilerError(f"cannot open the state file {config.state_file}: {exc}") from None
    labels = None
    fast_label = config.fast_path_label if config.hold_syns and conntrack is not None else None
    if config.fast_path_label is not None and fast_label is None:
        log.warning("fast path off: it needs HOLD_SYNS and conntrack accounting (CONNTRACK)")
    if fast_label is not None:
        from .ctmark import ConnLabels
        labels = ConnLabels(fast_label)
    filter_part = IptablesFirewall(config.interfaces, queue_num=config.queue_num if config.hold_syns else None,
                                   nflog_groups=groups, fast_label=fast_label)
    # The same lock object: one writer, and our own commits are not taken for another program's. With
    # RULE_TABLES = filter the security table is still looked at once, for pairs an earlier run left,
    # if the kernel has made it (shards.py).
    firewall = ShardedFirewall(filter_part, IptablesFirewall(config.interfaces, lock=filter_part.lock, table="security",
                                                             fast_label=fast_label),
                               split=config.rule_tables == "filter security")
    return Service(config, firewall=firewall, processes=ProcessTable(), sockets=SockDiag(),
                   sink=RollingLogSink(config.log_dir, config.max_bytes, config.backup_count, config.log_format,
                                       config.internal_networks),
                   capture_factory=capture_factory, conntrack=conntrack,
                   synqueue_factory=synqueue_factory if config.hold_syns else None,
                   store=store, labels=labels)
