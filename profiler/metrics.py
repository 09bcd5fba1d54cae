"""Prometheus exposition of the profiler's state (`GET /metrics`).

Job byte counters are harvested bytes plus the live counters of open
connections, read at scrape time; a finished job's series stay for
METRICS_RETENTION seconds, then go, so cardinality stays bounded.
"""
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _Snapshot:
    def __init__(self, profiler, timeout):
        self.profiler = profiler
        self.timeout = timeout

    def collect(self):
        snap = self.profiler.call("metrics", timeout=self.timeout)
        job_bytes = CounterMetricFamily("netprof_job_bytes", "IP-layer bytes of a job's TCP connections",
                                        labels=["job", "direction"])
        for job, (inb, outb) in sorted(snap["jobs"].items()):
            job_bytes.add_metric([job, "in"], inb)
            job_bytes.add_metric([job, "out"], outb)
        yield job_bytes
        for name, doc, key in (("netprof_live_connections", "tracked connections not yet harvested", "live"),
                               ("netprof_installed_rules", "per-connection netfilter rules installed", "rules"),
                               ("netprof_tracked_processes", "processes of tracked jobs", "processes"),
                               ("netprof_jobs", "jobs being profiled", "job_count")):
            yield GaugeMetricFamily(name, doc, value=snap[key])
        for name, doc, key in (("netprof_gc_runs", "garbage collector runs", "gc_runs"),
                               ("netprof_untracked_connections", "connections left untracked: rule table full",
                                "untracked_full"),
                               ("netprof_harvested_connections", "connections harvested and logged", "harvested"),
                               ("netprof_events_dropped", "capture events dropped: profiler queue full",
                                "events_dropped")):
            yield CounterMetricFamily(name, doc, value=snap["stats"][key])
        received = CounterMetricFamily("netprof_capture_received_packets", "packets the capture passed",
                                       labels=["interface"])
        dropped = CounterMetricFamily("netprof_capture_dropped_packets", "packets the capture dropped",
                                      labels=["interface"])
        for iface, st in sorted(snap["capture"].items()):
            received.add_metric([iface], st.get("received", 0))
            dropped.add_metric([iface], st.get("dropped", 0) + st.get("if_dropped", 0))
        yield received
        yield dropped


class Metrics:
    def __init__(self, profiler, timeout=10.0):
        self.registry = CollectorRegistry(auto_describe=False)
        self.harvest_seconds = Histogram(
            "netprof_harvest_seconds", "time to read, log and remove one batch of harvested connections",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=self.registry)
        self.registry.register(_Snapshot(profiler, timeout))
        profiler.observe_harvest = self.harvest_seconds.observe

    def render(self):
        # The classic text format: what every Prometheus server (Debian 12 ships 2.42) parses.
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
