"""Per-interface rolling connection logs.

`<LOG_DIR>/<interface>.log` (LOG_FORMAT tsv or both): two tab-separated lines
per connection, one per direction, and nothing else:
  <timestamp>\t<JobId>\t<PID>\t<SrcIP>\t<SrcPort>\t<DestIP>\t<DestPort>\t<IN|OUT>\t<Bytes>
`<LOG_DIR>/<interface>.json.log` (json or both): one JSON object per connection,
in the spirit of Zeek's conn.log.
Diagnostics go to the service's own log, never here.
"""
import json
import logging
import logging.handlers
import os
import threading


def _clean(value):
    # A job id is caller-supplied: a tab or newline in it would break the columns.
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def format_lines(record):
    """The two lines (without timestamp) that a connection record becomes."""
    job, pid = _clean(record.job), record.pid
    return (
        f"{job}\t{pid}\t{record.remote}\t{record.rport}\t{record.local}\t{record.lport}\tIN\t{record.in_bytes}",
        f"{job}\t{pid}\t{record.local}\t{record.lport}\t{record.remote}\t{record.rport}\tOUT\t{record.out_bytes}",
    )


def format_json(record, internal_networks=()):
    from .model import is_internal
    # Zeek's orig/resp are the connection's initiator and responder.
    if record.outgoing:
        orig, resp = (record.local, record.lport), (record.remote, record.rport)
        orig_bytes, resp_bytes = record.out_bytes, record.in_bytes
        orig_pkts, resp_pkts = record.out_packets, record.in_packets
    else:
        orig, resp = (record.remote, record.rport), (record.local, record.lport)
        orig_bytes, resp_bytes = record.in_bytes, record.out_bytes
        orig_pkts, resp_pkts = record.in_packets, record.out_packets
    return json.dumps({
        "ts": round(record.start, 6), "duration": round(max(0.0, record.end - record.start), 6),
        "uid": record.cid, "job": record.job, "pid": record.pid, "interface": record.interface,
        "proto": "tcp", "id.orig_h": orig[0], "id.orig_p": orig[1], "id.resp_h": resp[0], "id.resp_p": resp[1],
        "local": record.local, "local_port": record.lport, "remote": record.remote, "remote_port": record.rport,
        "direction": "outbound" if record.outgoing else "inbound",
        "orig_bytes": orig_bytes, "resp_bytes": resp_bytes, "orig_pkts": orig_pkts, "resp_pkts": resp_pkts,
        "in_bytes": record.in_bytes, "out_bytes": record.out_bytes,
        "in_pkts": record.in_packets, "out_pkts": record.out_packets,
        "internal": is_internal(record.remote, internal_networks),
        "end": record.reason, "open_at_end": record.open_at_end, "complete": record.complete,
        "count_source": record.source, "note": record.note, "pid_source": record.pid_source,
    }, sort_keys=False)


class RollingLogSink:
    def __init__(self, log_dir, max_bytes, backup_count, log_format="tsv", internal_networks=()):
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.tsv = log_format in ("tsv", "both")
        self.json = log_format in ("json", "both")
        self.internal_networks = internal_networks
        self._loggers = {}
        self._lock = threading.Lock()
        os.makedirs(log_dir, exist_ok=True)

    def path(self, interface, kind="tsv"):
        return os.path.join(self.log_dir, f"{interface}.log" if kind == "tsv" else f"{interface}.json.log")

    def _logger(self, interface, kind):
        logger = self._loggers.get((interface, kind))
        if logger is None:
            logger = logging.Logger(f"netprofiler.connections.{kind}.{interface}")
            handler = logging.handlers.RotatingFileHandler(
                self.path(interface, kind), maxBytes=self.max_bytes, backupCount=self.backup_count)
            handler.setFormatter(logging.Formatter("%(asctime)s\t%(message)s" if kind == "tsv" else "%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
            self._loggers[(interface, kind)] = logger
        return logger

    def write(self, record):
        with self._lock:
            if self.tsv:
                logger = self._logger(record.interface, "tsv")
                for line in format_lines(record):
                    logger.info(line)
            if self.json:
                self._logger(record.interface, "json").info(format_json(record, self.internal_networks))

    def reconfigure(self, max_bytes, backup_count, log_format, internal_networks):
        with self._lock:
            self.max_bytes, self.backup_count = max_bytes, backup_count
            self.tsv = log_format in ("tsv", "both")
            self.json = log_format in ("json", "both")
            self.internal_networks = internal_networks
        self.close()

    def reopen(self):
        """After logrotate moved the files away (SIGUSR1): the next write opens new ones."""
        self.close()

    def close(self):
        with self._lock:
            for logger in self._loggers.values():
                for handler in list(logger.handlers):
                    handler.close()
                    logger.removeHandler(handler)
            self._loggers.clear()
