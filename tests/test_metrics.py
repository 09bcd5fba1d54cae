"""/metrics in the Prometheus exposition format, scraped by a real Prometheus server."""
import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse

import pytest

from harness import Service, run_client, start_client, start_server
from nstools import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def metric_lines(svc):
    r = svc.ns.run("curl", "-s", "-D", "-", f"http://127.0.0.1:{svc.port}/metrics", check=False)
    return r.stdout


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed")
def test_prometheus_scrapes_job_bytes(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a], METRICS_RETENTION=600)
    tmp = tempfile.mkdtemp(prefix="netprof-prom-")
    try:
        svc.start()
        start_server(p.b, p.ip_b, 9000)
        c = start_client(p.a, p.ip_b, 9000, up=40_000, down=300_000, count=2)
        assert svc.start_profile("prom#1", c.pid)[0] == 200
        run_client(c, 2)
        wait_for(lambda: svc.get("/status")[1]["live_connections"] == 0, timeout=20, what="harvest")
        code, answer = svc.get("/v1/jobs/prom%231")
        want_in, want_out = answer["totals"]["in_bytes"], answer["totals"]["out_bytes"]

        text = metric_lines(svc)
        assert "text/plain; version=0.0.4" in text
        assert f'netprof_job_bytes_total{{direction="in",job="prom#1"}} {float(want_in)}' in text
        assert "netprof_harvest_seconds_bucket" in text and "netprof_installed_rules 0.0" in text

        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: netprofiler
    honor_labels: true
    static_configs:
      - targets: ['127.0.0.1:{svc.port}']
""")
        prom = p.a.popen("prometheus", f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/data",
                         "--web.listen-address=127.0.0.1:9090", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

        def query():
            q = urllib.parse.quote('netprof_job_bytes_total{job="prom#1"}')
            r = p.a.run("curl", "-s", f"http://127.0.0.1:9090/api/v1/query?query={q}", check=False)
            try:
                data = json.loads(r.stdout)
            except ValueError:
                return None
            result = data.get("data", {}).get("result", [])
            return {s["metric"]["direction"]: int(float(s["value"][1])) for s in result} if len(result) == 2 else None

        got = wait_for(query, timeout=60, interval=0.5, what="prometheus scraped the job's bytes")
        assert got == {"in": want_in, "out": want_out}
        prom.terminate()
        prom.wait(20)
    finally:
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_finished_job_series_are_dropped_after_retention(netpair):
    p = netpair
    svc = Service(p.a, [p.iface_a], METRICS_RETENTION=1)
    try:
        svc.start()
        sleeper = p.a.popen("sleep", "30")
        assert svc.start_profile("short#1", sleeper.pid)[0] == 200
        assert 'job="short#1"' in metric_lines(svc)
        assert svc.get("/endprofile/jobid=short%231")[0] == 200
        assert 'job="short#1"' in metric_lines(svc)
        wait_for(lambda: 'job="short#1"' not in metric_lines(svc), timeout=10, what="series dropped")
    finally:
        svc.stop()
