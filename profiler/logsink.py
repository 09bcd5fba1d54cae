"""Per-interface rolling connection logs.

`<LOG_DIR>/<interface>.log` (LOG_FORMAT tsv or both): two tab-separated lines
per connection, one per direction, and nothing else:
  <timestamp>\t<JobId>\t<PID>\t<SrcIP>\t<SrcPort>\t<DestIP>\t<DestPort>\t<IN|OUT>\t<Bytes>
`<LOG_DIR>/<interface>.json.log` (json or both): one JSON object per connection,
in the spirit of Zeek's conn.log.
Diagnostics go to the service's own log, never here.
"""
import json
import os
import threading
import time


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


class _RollingFile:
    """Lines appended to a file that is rolled over (file.1, file.2, ...) before it would reach
    max_bytes, as logging.handlers.RotatingFileHandler does, but a batch of lines in one write:
    through `logging`, each line cost a format, a seek and a flush (a tenth of the profiler
    thread's time when thousands of connections close a second)."""

    def __init__(self, path, max_bytes, backup_count):
        self.path, self.max_bytes, self.backup_count = path, max_bytes, backup_count
        self._stream = None
        self._size = 0

    def _open(self):
        self._stream = open(self.path, "ab")
        self._size = self._stream.tell()

    def write(self, lines):
        if self._stream is None:
            self._open()
        else:
            self._size = os.fstat(self._stream.fileno()).st_size   # truncated by someone (copytruncate)?
        chunk = []
        # As RotatingFileHandler: no rollover when either limit is zero.
        rolls = self.max_bytes > 0 and self.backup_count > 0
        for line in lines:
            data = line.encode("utf-8", "backslashreplace") + b"\n"
            if rolls and self._size + len(data) >= self.max_bytes and (self._size or chunk):
                self._stream.write(b"".join(chunk))
                chunk = []
                self._roll()
            chunk.append(data)
            self._size += len(data)
        self._stream.write(b"".join(chunk))
        self._stream.flush()

    def _roll(self):
        self._stream.close()
        self._stream = None
        for i in range(self.backup_count - 1, 0, -1):
            if os.path.exists(f"{self.path}.{i}"):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        try:
            os.replace(self.path, f"{self.path}.1")
        except FileNotFoundError:
            pass        # moved away already (logrotate before its SIGUSR1): start a new one anyway
        self._open()

    def close(self):
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _timestamp(now):
    """What logging's %(asctime)s shows: local time, milliseconds after a comma."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"


class RollingLogSink:
    def __init__(self, log_dir, max_bytes, backup_count, log_format="tsv", internal_networks=()):
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.tsv = log_format in ("tsv", "both")
        self.json = log_format in ("json", "both")
        self.internal_networks = internal_networks
        self._files = {}
        self._lock = threading.Lock()
        os.makedirs(log_dir, exist_ok=True)

    def path(self, interface, kind="tsv"):
        return os.path.join(self.log_dir, f"{interface}.log" if kind == "tsv" else f"{interface}.json.log")

    def _file(self, interface, kind):
        f = self._files.get((interface, kind))
        if f is None:
            f = self._files[(interface, kind)] = _RollingFile(self.path(interface, kind), self.max_bytes,
                                                              self.backup_count)
        return f

    def write(self, record):
        self.write_many([record])

    def write_many(self, records):
        """The records' lines, one write per file."""
        lines = {}
        with self._lock:
            if self.tsv:
                stamp = _timestamp(time.time())
                for record in records:
                    lines.setdefault((record.interface, "tsv"), []).extend(
                        f"{stamp}\t{line}" for line in format_lines(record))
            if self.json:
                for record in records:
                    lines.setdefault((record.interface, "json"), []).append(
                        format_json(record, self.internal_networks))
            for (interface, kind), batch in lines.items():
                self._file(interface, kind).write(batch)

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
            for f in self._files.values():
                f.close()
            self._files.clear()
