"""The durable state: what a restart needs to carry on where a crash left off.

Jobs, processes (with their identity) and connections are written before the
connection's rules are installed, so that after a `kill -9` the rules still in
the kernel can be claimed again by the connection they belong to, and the
records of a job's finished connections survive until its EndProfile.
One sqlite file, written only by the profiler thread, one transaction a batch.
"""
import json
import sqlite3

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, started REAL NOT NULL, cgroup TEXT NOT NULL,
                                 roots TEXT NOT NULL, owner_uid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS processes (pid INTEGER PRIMARY KEY, uid INTEGER NOT NULL, user TEXT NOT NULL,
                                      create_time REAL NOT NULL, job TEXT NOT NULL, registered INTEGER NOT NULL,
                                      root INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS connections (cid TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (cid TEXT PRIMARY KEY, job TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS records_job ON records (job);
"""

CONNECTION_FIELDS = ("cid", "job", "pid", "interface", "family", "local", "lport", "remote", "rport", "outgoing",
                     "opened", "rules_before_first_packet", "incomplete_reason", "pid_source", "inode",
                     "ct_unusable")


class StateStore:
    def __init__(self, path):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        version = self._version()
        if version is None:
            self.db.executescript(SCHEMA)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif version != SCHEMA_VERSION:
            raise ValueError(f"{path} has state schema version {version}; this NetProfiler reads "
                             f"version {SCHEMA_VERSION}: move the file away to start afresh")

    def _version(self):
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:
            return None
        return int(row[0]) if row else None

    def close(self):
        self.db.close()

    def batch(self):
        return _Batch(self.db)

    # --- writes (inside a batch) --------------------------------------------------

    def put_job(self, job):
        self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)",
                        (job.job_id, job.started, job.cgroup, json.dumps(sorted(job.roots)), job.owner_uid))

    def drop_job(self, job_id):
        self.db.execute("DELETE FROM jobs WHERE job_id=?", (job_id,))
        self.db.execute("DELETE FROM records WHERE job=?", (job_id,))
        self.db.execute("DELETE FROM processes WHERE job=?", (job_id,))

    def put_process(self, tracked):
        i = tracked.ident
        self.db.execute("INSERT OR REPLACE INTO processes VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (i.pid, i.uid, i.user, i.create_time, tracked.job, int(tracked.registered), tracked.root))

    def drop_process(self, pid):
        self.db.execute("DELETE FROM processes WHERE pid=?", (pid,))

    def put_connections(self, conns):
        self.db.executemany("INSERT OR REPLACE INTO connections VALUES (?, ?)",
                            [(c.cid, json.dumps({f: getattr(c, f) for f in CONNECTION_FIELDS})) for c in conns])

    def drop_connections(self, cids):
        self.db.executemany("DELETE FROM connections WHERE cid=?", [(cid,) for cid in cids])

    def put_records(self, records):
        self.db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                            [(r.cid, r.job, json.dumps(r.to_json())) for r in records])

    # --- reads ------------------------------------------------------------------------

    def load(self):
        jobs = [dict(job_id=j, started=s, cgroup=c, roots=set(json.loads(r)), owner_uid=u)
                for j, s, c, r, u in self.db.execute("SELECT job_id, started, cgroup, roots, owner_uid FROM jobs")]
        procs = [dict(pid=p, uid=u, user=n, create_time=t, job=j, registered=bool(g), root=r)
                 for p, u, n, t, j, g, r in self.db.execute("SELECT * FROM processes")]
        conns = [json.loads(d) for (d,) in self.db.execute("SELECT data FROM connections")]
        return jobs, procs, conns, self.record_totals()

    def record_totals(self):
        """{job: (records, in_bytes, out_bytes)} of the harvested connections kept for each job."""
        return {job: (n, inb, outb) for job, n, inb, outb in self.db.execute(
            "SELECT job, count(*), coalesce(sum(json_extract(data, '$.in_bytes')), 0),"
            " coalesce(sum(json_extract(data, '$.out_bytes')), 0) FROM records GROUP BY job")}

    def records_of(self, job_id, pids=None):
        """The kept records (JSON form) of a job's harvested connections, in the order written; with
        `pids`, only those of these processes."""
        sql, args = "SELECT data FROM records WHERE job=?", [job_id]
        if pids is not None:
            pids = sorted(pids)
            sql += f" AND json_extract(data, '$.pid') IN ({','.join('?' * len(pids))})"
            args += pids
        return [json.loads(d) for (d,) in self.db.execute(sql + " ORDER BY rowid", args)]


class _Batch:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
