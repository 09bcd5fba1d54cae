"""Tests of the HTTP API (profiler/api.py) with a fake profiler.

First in-process through web.py's `app.request()`, then the same app served by
cheroot (profiler.service.ApiServer) on 127.0.0.1 and called with urllib.

Note on in-process requests: `app.request()` passes the path still
percent-encoded in PATH_INFO and sets no REQUEST_URI, whereas cheroot decodes
PATH_INFO (all but %2F) and gives the raw path in REQUEST_URI. The API reads
the raw path either way; the HTTP tests at the end cover the cheroot case.
"""
import copy
from http.client import HTTPConnection
import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest

from profiler.api import MAX_JOB_ID, MAX_OWNER, MAX_PID, UNIX_TRANSPORT, make_app
from profiler.errors import BadInput, FirewallError, Forbidden, IdentityMismatch, NotFound, NotReady, Unauthorized

GJID = "schedd.example.org#123.0#1700000000"          # an HTCondor GlobalJobId
GJID_Q = quote(GJID, safe="")                          # schedd.example.org%23123.0%231700000000
BIRTH = 1700000000.25

READY_STATUS = {"interfaces": {"eth0": {"capturing": True, "received": 10},
                               "eth1": {"capturing": True, "received": 3}},
                "jobs": {}, "tracked_processes": 0, "live_connections": 0}


class FakeProfiler:
    """Records every call; answers from `answers`, raises from `raises`, else echoes the call."""

    def __init__(self):
        self.calls = []
        self.answers = {}
        self.raises = {}
        self.status = copy.deepcopy(READY_STATUS)

    def call(self, name, *args, timeout=None):
        self.calls.append((name, args, timeout))
        if name in self.raises:
            raise self.raises[name]
        if name == "status":
            return copy.deepcopy(self.status)
        if name in self.answers:
            return copy.deepcopy(self.answers[name])
        return {"status": "ok", "request": name, "args": list(args)}

    @property
    def names(self):
        return [c[0] for c in self.calls]


class FakeMetrics:
    def __init__(self):
        self.renders = 0

    def render(self):
        self.renders += 1
        return b"# HELP netprofiler_up 1\nnetprofiler_up 1\n", "text/plain; version=0.0.4; charset=utf-8"


class Api:
    def __init__(self, timeout=10.0, **kw):
        self.fake = FakeProfiler()
        self.shutdowns = []
        self.app = make_app(self.fake, lambda: self.shutdowns.append(1), timeout=timeout, **kw)

    def request(self, path, method="GET", body=None, headers=None, env=None):
        """(status code, headers, JSON body); fails unless the answer is JSON."""
        if body is not None and not isinstance(body, str):
            body = json.dumps(body)
        r = self.app.request(path, method=method, data=body, headers=headers, env=env or {})
        code = int(r.status.split()[0])
        assert r.headers.get("Content-Type") == "application/json", (path, method, r.status, r.headers, r.data)
        try:
            data = json.loads(r.data)
        except ValueError:
            pytest.fail(f"{method} {path}: {r.status} body is not JSON: {r.data[:200]!r}")
        if code >= 400:
            assert data["status"] == "error", data
            assert data["code"] == code, data
            assert isinstance(data["error"], str) and data["error"], data
        return code, r.headers, data


@pytest.fixture
def api():
    return Api()


def legacy(route, jobid="job1", pid=4242, owner="alice", birthdate=BIRTH):
    return f"/{route}/jobid={jobid},pid={pid},owner={owner},birthdate={birthdate}"


# --- legacy GET routes -------------------------------------------------------------

def test_startprofile(api):
    code, _, data = api.request(legacy("startprofile"))
    assert code == 200
    assert api.fake.calls == [("start", ("job1", 4242, "alice", BIRTH), 10.0)]
    assert data == {"status": "ok", "request": "start", "args": ["job1", 4242, "alice", BIRTH]}


def test_startprofile_returns_the_profilers_answer(api):
    api.fake.answers["start"] = {"status": "ok", "job": "job1", "pid": 4242, "already_tracked": True}
    code, _, data = api.request(legacy("startprofile"))
    assert (code, data) == (200, api.fake.answers["start"])


def test_endprocessprofile(api):
    code, _, data = api.request(legacy("endprocessprofile", owner="1000", birthdate="1700000000"))
    assert code == 200
    assert api.fake.calls == [("end_process", ("job1", 4242, "1000", 1700000000.0), 10.0)]
    assert data["request"] == "end_process"


@pytest.mark.parametrize("route", ["endjobprofile", "endprofile"])
def test_end_job_routes(api, route):
    code, _, data = api.request(f"/{route}/jobid=job1")
    assert code == 200
    assert api.fake.calls == [("end_job", ("job1",), 10.0)]
    assert data == {"status": "ok", "request": "end_job", "args": ["job1"]}


def test_timeout_is_passed_to_the_profiler():
    api = Api(timeout=2.5)
    api.request(legacy("startprofile"))
    api.request("/status")
    assert [c[2] for c in api.fake.calls] == [2.5, 2.5]


def test_legacy_fields_in_any_order_any_case_with_blanks_and_empty_parts(api):
    code, _, _ = api.request(f"/startprofile/,BirthDate={BIRTH},%20owner=alice,,PID=4242,JOBID=job1,")
    assert code == 200
    assert api.fake.calls[0][:2] == ("start", ("job1", 4242, "alice", BIRTH))


@pytest.mark.parametrize("route,name", [("startprofile", "start"), ("endprocessprofile", "end_process")])
def test_global_job_id_percent_encoded_hash(api, route, name):
    code, _, data = api.request(legacy(route, jobid=GJID_Q))
    assert code == 200
    assert api.fake.calls == [(name, (GJID, 4242, "alice", BIRTH), 10.0)]
    assert data["args"][0] == GJID


@pytest.mark.parametrize("route", ["endjobprofile", "endprofile"])
def test_global_job_id_end_job(api, route):
    assert api.request(f"/{route}/jobid={GJID_Q}")[0] == 200
    assert api.fake.calls == [("end_job", (GJID,), 10.0)]


@pytest.mark.parametrize("raw,value", [
    ("a%2Cb", "a,b"),             # an encoded comma is data, not a separator
    ("a%2cb%2C", "a,b,"),         # lower-case hex too
    ("a%3Db", "a=b"),
    ("a=b", "a=b"),               # only the first '=' separates name and value
    ("a+b", "a+b"),               # '+' is literal in a path
    ("a%2Fb", "a/b"),
    ("a/b", "a/b"),
    ("%C3%BCber%20job", "über job"),
    ("%2523", "%23"),             # decoded once only
    ("a%3Fb%26c", "a?b&c"),
])
def test_legacy_value_encodings(api, raw, value):
    code, _, _ = api.request(legacy("startprofile", jobid=raw))
    assert code == 200
    assert api.fake.calls[0][1][0] == value


def test_legacy_encoded_comma_in_owner_and_encoded_field_name(api):
    code, _, _ = api.request(f"/startprofile/%6Aobid=j,pid=7,owner=dom%2Cuser,birthdate={BIRTH}")
    assert code == 200
    assert api.fake.calls[0][1] == ("j", 7, "dom,user", BIRTH)


def test_query_string_is_not_part_of_the_legacy_params(api):
    code, _, _ = api.request(legacy("startprofile") + "?pid=1&x=,y")
    assert code == 200
    assert api.fake.calls[0][1] == ("job1", 4242, "alice", BIRTH)


@pytest.mark.parametrize("params,field", [
    ("pid=1,owner=a,birthdate=1", "jobid"),                                 # missing
    ("jobid=j,owner=a,birthdate=1", "pid"),
    ("jobid=j,pid=1,birthdate=1", "owner"),
    ("jobid=j,pid=1,owner=a", "birthdate"),
    ("", "jobid"),
    ("jobid=j,pid=1,owner=a,birthdate=1,color=red", "color"),              # unknown
    ("jobid=j,jobid=k,pid=1,owner=a,birthdate=1", "jobid"),                # duplicate
    ("jobid=j,JobId=k,pid=1,owner=a,birthdate=1", "jobid"),
    ("jobid=j,pid,owner=a,birthdate=1", "parameter"),                      # no '='
    ("jobid=j,pid=1,owner=a,birthdate=1,%ff=1", "parameter"),              # name not UTF-8
    ("jobid=%ff,pid=1,owner=a,birthdate=1", "jobid"),                      # value not UTF-8
    ("jobid=%c0%af,pid=1,owner=a,birthdate=1", "jobid"),                   # overlong UTF-8
    ("jobid=%ed%a0%80,pid=1,owner=a,birthdate=1", "jobid"),                # encoded surrogate
    ("jobid=,pid=1,owner=a,birthdate=1", "jobid"),                         # empty
    ("jobid=a%00b,pid=1,owner=a,birthdate=1", "jobid"),                    # NUL
    ("jobid=a%0Ab,pid=1,owner=a,birthdate=1", "jobid"),                    # newline
    ("jobid=a%7Fb,pid=1,owner=a,birthdate=1", "jobid"),                    # DEL
    (f"jobid={'x' * (MAX_JOB_ID + 1)},pid=1,owner=a,birthdate=1", "jobid"),
    ("jobid=j,pid=0,owner=a,birthdate=1", "pid"),
    ("jobid=j,pid=-5,owner=a,birthdate=1", "pid"),
    (f"jobid=j,pid={MAX_PID + 1},owner=a,birthdate=1", "pid"),
    ("jobid=j,pid=99999999999999999999999999,owner=a,birthdate=1", "pid"),
    ("jobid=j,pid=abc,owner=a,birthdate=1", "pid"),
    ("jobid=j,pid=1.5,owner=a,birthdate=1", "pid"),
    ("jobid=j,pid=0x10,owner=a,birthdate=1", "pid"),
    ("jobid=j,pid=%D9%A3,owner=a,birthdate=1", "pid"),                     # Arabic-Indic digit three
    ("jobid=j,pid=%EF%BC%95,owner=a,birthdate=1", "pid"),                  # full-width five
    ("jobid=j,pid=,owner=a,birthdate=1", "pid"),
    ("jobid=j,pid=1,owner=,birthdate=1", "owner"),
    ("jobid=j,pid=1,owner=a%20b,birthdate=1", "owner"),
    ("jobid=j,pid=1,owner=a%00,birthdate=1", "owner"),
    (f"jobid=j,pid=1,owner={'u' * (MAX_OWNER + 1)},birthdate=1", "owner"),
    ("jobid=j,pid=1,owner=a,birthdate=yesterday", "birthdate"),
    ("jobid=j,pid=1,owner=a,birthdate=nan", "birthdate"),
    ("jobid=j,pid=1,owner=a,birthdate=inf", "birthdate"),
    ("jobid=j,pid=1,owner=a,birthdate=-1", "birthdate"),
    ("jobid=j,pid=1,owner=a,birthdate=1e12", "birthdate"),
    ("jobid=j,pid=1,owner=a,birthdate=", "birthdate"),
])
def test_legacy_bad_input_names_the_field(api, params, field):
    code, _, data = api.request(f"/startprofile/{params}")
    assert code == 400, data
    assert data["field"] == field
    assert api.fake.calls == []


def test_end_job_needs_only_jobid_but_checks_it(api):
    code, _, data = api.request("/endjobprofile/")
    assert (code, data["field"]) == (400, "jobid")
    code, _, data = api.request("/endprofile/jobid=a%ffb")
    assert (code, data["field"]) == (400, "jobid")
    assert api.fake.calls == []


@pytest.mark.parametrize("pid", ["1", str(MAX_PID), "007", " 12 "])
def test_legacy_pid_edges_accepted(api, pid):
    path = f"/startprofile/jobid=j,pid={quote(pid)},owner=a,birthdate=1"
    assert api.request(path)[0] == 200
    assert api.fake.calls[0][1][1] == int(pid)


# --- JSON REST routes --------------------------------------------------------------

def test_rest_start_process(api):
    body = {"pid": 4242, "owner": "alice", "birthdate": BIRTH}
    code, _, data = api.request(f"/v1/jobs/{GJID_Q}/processes", "POST", body)
    assert code == 200
    assert api.fake.calls == [("start", (GJID, 4242, "alice", BIRTH), 10.0)]
    assert data["request"] == "start"


def test_rest_start_process_trailing_slash_string_pid_numeric_owner(api):
    body = {"pid": "4242", "owner": 1000, "birthdate": "1700000000"}
    code, _, _ = api.request("/v1/jobs/j/processes/", "POST", body, headers={"Content-Type": "application/json"})
    assert code == 200
    assert api.fake.calls[0][1] == ("j", 4242, "1000", 1700000000.0)


@pytest.mark.parametrize("body,field", [
    ("", "pid"),                                     # no body: {} -> pid missing
    ({}, "pid"),
    ({"owner": "a", "birthdate": 1}, "pid"),
    ({"pid": 1, "birthdate": 1}, "owner"),
    ({"pid": 1, "owner": "a"}, "birthdate"),
    ("{not json", "body"),
    ("[1, 2]", "body"),
    ('"text"', "body"),
    ("null", "body"),
    ({"pid": 0, "owner": "a", "birthdate": 1}, "pid"),
    ({"pid": -1, "owner": "a", "birthdate": 1}, "pid"),
    ({"pid": MAX_PID + 1, "owner": "a", "birthdate": 1}, "pid"),
    ({"pid": 10 ** 30, "owner": "a", "birthdate": 1}, "pid"),
    ({"pid": 1.5, "owner": "a", "birthdate": 1}, "pid"),
    ({"pid": True, "owner": "a", "birthdate": 1}, "pid"),
    ({"pid": None, "owner": "a", "birthdate": 1}, "pid"),
    ({"pid": [1], "owner": "a", "birthdate": 1}, "pid"),
    ({"pid": 1, "owner": "", "birthdate": 1}, "owner"),
    ({"pid": 1, "owner": "a b", "birthdate": 1}, "owner"),
    ({"pid": 1, "owner": "a", "birthdate": "soon"}, "birthdate"),
    ({"pid": 1, "owner": "a", "birthdate": -3}, "birthdate"),
    ({"pid": 1, "owner": "a", "birthdate": None}, "birthdate"),
    ({"pid": 1, "owner": "a", "birthdate": [1]}, "birthdate"),
    ('{"pid": 1, "owner": "a", "birthdate": NaN}', "birthdate"),
    ('{"pid": 1, "owner": "a", "birthdate": 1e999}', "birthdate"),
    ('{"pid": ' + "9" * 5000 + ', "owner": "a", "birthdate": 1}', "body"),   # int too long for json
])
def test_rest_start_bad_input(api, body, field):
    code, _, data = api.request("/v1/jobs/j/processes", "POST", body)
    assert code == 400, data
    assert data["field"] == field
    assert api.fake.calls == []


def test_rest_start_bad_job_in_path(api):
    code, _, data = api.request("/v1/jobs/a%00b/processes", "POST", {"pid": 1, "owner": "a", "birthdate": 1})
    assert (code, data["field"]) == (400, "job")
    code, _, data = api.request("/v1/jobs/%ff/processes", "POST", {"pid": 1, "owner": "a", "birthdate": 1})
    assert (code, data["field"]) == (400, "path")
    code, _, data = api.request(f"/v1/jobs/{'x' * (MAX_JOB_ID + 1)}/processes", "POST",
                                {"pid": 1, "owner": "a", "birthdate": 1})
    assert (code, data["field"]) == (400, "job")
    assert api.fake.calls == []


def test_rest_end_process(api):
    code, _, data = api.request(f"/v1/jobs/{GJID_Q}/processes/4242?owner=alice&birthdate={BIRTH}", "DELETE")
    assert code == 200
    assert api.fake.calls == [("end_process", (GJID, 4242, "alice", BIRTH), 10.0)]
    assert data["request"] == "end_process"


def test_rest_end_process_query_is_percent_decoded(api):
    code, _, _ = api.request("/v1/jobs/j/processes/7/?birthdate=1.5&owner=dom%2Cuser%C3%A9&extra=1", "DELETE")
    assert code == 200
    assert api.fake.calls[0][1] == ("j", 7, "dom,useré", 1.5)


@pytest.mark.parametrize("path,field", [
    ("/v1/jobs/j/processes/7?birthdate=1", "owner"),
    ("/v1/jobs/j/processes/7?owner=a", "birthdate"),
    ("/v1/jobs/j/processes/7", "owner"),
    ("/v1/jobs/j/processes/abc?owner=a&birthdate=1", "pid"),
    ("/v1/jobs/j/processes/0?owner=a&birthdate=1", "pid"),
    ("/v1/jobs/j/processes/-4?owner=a&birthdate=1", "pid"),
    (f"/v1/jobs/j/processes/{MAX_PID + 1}?owner=a&birthdate=1", "pid"),
    ("/v1/jobs/j/processes/7?owner=&birthdate=1", "owner"),
    ("/v1/jobs/j/processes/7?owner=a&birthdate=", "birthdate"),
    ("/v1/jobs/j/processes/7?owner=a&birthdate=nan", "birthdate"),
    ("/v1/jobs/j%01/processes/7?owner=a&birthdate=1", "job"),
    ("/v1/jobs/j/processes/%ff?owner=a&birthdate=1", "path"),
])
def test_rest_end_process_bad_input(api, path, field):
    code, _, data = api.request(path, "DELETE")
    assert code == 400, data
    assert data["field"] == field
    assert api.fake.calls == []


@pytest.mark.parametrize("method,name", [("GET", "job"), ("DELETE", "end_job")])
@pytest.mark.parametrize("raw,job", [(GJID_Q, GJID), ("plain", "plain"), ("a%2Fb", "a/b"), ("a%2Cb", "a,b"),
                                     ("%C3%BC", "ü")])
def test_rest_job(api, method, name, raw, job):
    code, _, data = api.request(f"/v1/jobs/{raw}", method)
    assert code == 200
    assert api.fake.calls == [(name, (job,), 10.0)]
    code, _, data = api.request(f"/v1/jobs/{raw}/", method)
    assert code == 200
    assert api.fake.calls[-1] == (name, (job,), 10.0)


# --- exceptions -> status codes ---------------------------------------------------

ROUTES = [  # (method, path, body, profiler request)
    ("GET", legacy("startprofile"), None, "start"),
    ("GET", legacy("endprocessprofile"), None, "end_process"),
    ("GET", "/endjobprofile/jobid=job1", None, "end_job"),
    ("GET", "/endprofile/jobid=job1", None, "end_job"),
    ("POST", "/v1/jobs/job1/processes", {"pid": 4242, "owner": "alice", "birthdate": BIRTH}, "start"),
    ("DELETE", f"/v1/jobs/job1/processes/4242?owner=alice&birthdate={BIRTH}", None, "end_process"),
    ("DELETE", "/v1/jobs/job1", None, "end_job"),
    ("GET", "/v1/jobs/job1", None, "job"),
    ("GET", "/status", None, "status"),
    ("GET", "/v1/status", None, "status"),
]

EXCEPTIONS = [
    (NotFound("unknown job 'job1'"), 404),
    (IdentityMismatch("pid 4242 belongs to bob (uid 1001), not 'alice'"), 409),
    (NotReady("the profiler did not answer within 10.0s"), 503),
    (BadInput("pid", 4242, "is gone"), 400),
]


@pytest.mark.parametrize("method,path,body,name", ROUTES, ids=[f"{r[0]} {r[1][:30]}" for r in ROUTES])
@pytest.mark.parametrize("exc,status", EXCEPTIONS, ids=[type(e[0]).__name__ for e in EXCEPTIONS])
def test_exception_maps_to_status(api, method, path, body, name, exc, status):
    api.fake.raises[name] = exc
    code, _, data = api.request(path, method, body)
    assert code == status
    assert data["error"] == str(exc)
    if isinstance(exc, BadInput):
        assert data["field"] == "pid"
    else:
        assert "field" not in data
    assert api.fake.names == [name]


@pytest.mark.parametrize("method,path,body,name", ROUTES[:8], ids=[f"{r[0]} {r[1][:30]}" for r in ROUTES[:8]])
def test_other_project_errors_are_json_500(api, method, path, body, name):
    api.fake.raises[name] = FirewallError("iptables: resource busy")
    code, _, data = api.request(path, method, body)
    assert code == 500
    assert data["error"] == "iptables: resource busy"


def test_unexpected_exception_is_json_500_without_details(api):
    api.fake.raises["start"] = RuntimeError("secret internals")
    code, _, data = api.request(legacy("startprofile"))
    assert code == 500
    assert "secret" not in json.dumps(data)


# --- /status ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/status", "/status/", "/v1/status", "/v1/status/"])
def test_status_ready(api, path):
    code, _, data = api.request(path)
    assert code == 200
    assert data == {**READY_STATUS, "ready": True}
    assert api.fake.calls == [("status", (), 10.0)]


@pytest.mark.parametrize("path", ["/status", "/v1/status"])
def test_status_503_until_every_interface_captures(api, path):
    api.fake.status["interfaces"]["eth1"]["capturing"] = False
    code, _, data = api.request(path)
    assert code == 503
    assert data["ready"] is False
    assert data["interfaces"]["eth1"] == {"capturing": False, "received": 3}
    assert data["jobs"] == {}
    api.fake.status["interfaces"]["eth1"] = {"error": "pcap: device went away"}     # no "capturing" key
    assert api.request(path)[0] == 503
    api.fake.status["interfaces"]["eth1"] = {"capturing": True}
    code, _, data = api.request(path)
    assert (code, data["ready"]) == (200, True)


def test_status_503_without_interfaces(api):
    api.fake.status["interfaces"] = {}
    code, _, data = api.request("/status")
    assert (code, data["ready"]) == (503, False)


def test_status_head(api):
    r = api.app.request("/status", method="HEAD")
    assert r.status.startswith("200")
    assert r.headers["Content-Type"] == "application/json"


# --- /shutdown -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/shutdown", "/shutdown/", "/v1/shutdown", "/v1/shutdown/"])
def test_shutdown(api, method, path):
    code, _, data = api.request(path, method)
    assert (code, data["status"]) == (200, "ok")
    assert api.shutdowns == [1]
    assert api.fake.calls == []


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_shutdown_wrong_method(api, method):
    code, _, _ = api.request("/v1/shutdown", method)
    assert code == 405
    assert api.shutdowns == []


# --- unknown URLs, wrong methods ----------------------------------------------------

@pytest.mark.parametrize("path", [
    "/", "/nope", "/v1", "/v1/", "/v1/jobs", "/v1/jobs/", "/v2/status", "/STATUS", "/startprofile",
    "/StartProfile/jobid=j,pid=1,owner=a,birthdate=1", "/v1/jobs/j/processes/1/extra", "/v1/jobs//processes",
    "/status/extra", "/shutdownnow", "/favicon.ico", "/v1/jobs/j/nope", "/%ff", "/v1/jobs/j/processes/%2F/x",
])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_unknown_url_is_json_404(api, path, method):
    code, _, data = api.request(path, method)
    assert code == 404, data
    assert "no such endpoint" in data["error"]
    assert api.fake.calls == [] and api.shutdowns == []


@pytest.mark.parametrize("method,path", [
    ("POST", "/status"), ("DELETE", "/status"), ("PUT", "/v1/status"), ("OPTIONS", "/status"),
    ("POST", legacy("startprofile")), ("DELETE", legacy("endprocessprofile")), ("PUT", "/endprofile/jobid=j"),
    ("PUT", "/v1/jobs/j"), ("POST", "/v1/jobs/j"), ("PATCH", "/v1/jobs/j"),
    ("GET", "/v1/jobs/j/processes"), ("DELETE", "/v1/jobs/j/processes"),
    ("GET", "/v1/jobs/j/processes/5"), ("POST", "/v1/jobs/j/processes/5"),
    ("BREW", "/status"), ("TRACE", "/v1/jobs/j"),
])
def test_wrong_method_is_json_405(api, method, path):
    code, _, data = api.request(path, method)
    assert code == 405, data
    assert method in data["error"]
    assert api.fake.calls == [] and api.shutdowns == []


def test_405_keeps_the_allow_header(api):
    _, headers, _ = api.request("/v1/jobs/j", "PUT")
    assert "GET" in headers.get("Allow", "") and "DELETE" in headers.get("Allow", "")


# --- access control: API token on TCP, caller uid on the unix socket ------------------

TOKEN = "s3cret-tok"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALL_ROUTES = [(m, p, b) for m, p, b, _ in ROUTES] + [("GET", "/shutdown", None), ("POST", "/v1/shutdown", None),
                                                    ("GET", "/metrics", None)]


@pytest.mark.parametrize("method,path,body", ALL_ROUTES, ids=[f"{r[0]} {r[1][:30]}" for r in ALL_ROUTES])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Bearer {TOKEN}x", f"bearer{TOKEN}", TOKEN, "",
                                  f"Basic {TOKEN}", f"Bearer  {TOKEN}"])
def test_token_required(method, path, body, auth):
    api = Api(token=TOKEN, metrics=FakeMetrics())
    code, _, data = api.request(path, method, body, headers=None if auth is None else {"Authorization": auth})
    assert code == 401
    assert "Bearer" in data["error"]
    assert api.fake.calls == [] and api.shutdowns == []


@pytest.mark.parametrize("method,path,body,name", ROUTES, ids=[f"{r[0]} {r[1][:30]}" for r in ROUTES])
def test_token_accepted(method, path, body, name):
    api = Api(token=TOKEN)
    code, _, _ = api.request(path, method, body, headers=AUTH)
    assert code == 200
    assert api.fake.names == [name]
    assert all(len(args) in (0, 1, 4) for _, args, _ in api.fake.calls)     # no caller uid over TCP
    assert api.request("/shutdown", headers=AUTH)[0] == 200
    assert api.shutdowns == [1]


def test_token_does_not_leak_into_answers():
    api = Api(token=TOKEN)
    for headers in (None, {"Authorization": "Bearer nope"}):
        _, _, data = api.request("/status", headers=headers)
        assert TOKEN not in json.dumps(data)


@pytest.mark.parametrize("transport", ["token", "unix without uid"])
@pytest.mark.parametrize("method,path,body", [
    ("GET", "/startprofile/jobid=j,pid=-1,owner=a,birthdate=1", None),
    ("GET", "/endprofile/", None),
    ("POST", "/v1/jobs/j/processes", "{nope"),
    ("DELETE", "/v1/jobs/j/processes/x?owner=a&birthdate=1", None),
    ("GET", "/v1/jobs/%ff", None),
])
def test_caller_checked_before_input(method, path, body, transport):
    api = Api(token=TOKEN)
    if transport == "token":
        code, _, _ = api.request(path, method, body)
        assert code == 401
    else:
        code, _, _ = api.request(path, method, body, env=unix_env(None))
        assert code == 403


def unix_env(uid):
    env = {UNIX_TRANSPORT: True}
    if uid is not None:
        env["X_REMOTE_UID"] = str(uid)
    return env


@pytest.mark.parametrize("uid", [0, 1000, 65534])
@pytest.mark.parametrize("method,path,body,name", ROUTES, ids=[f"{r[0]} {r[1][:30]}" for r in ROUTES])
def test_unix_caller_uid_is_passed_on(method, path, body, name, uid):
    api = Api(token=TOKEN)                    # the token is for TCP only
    code, _, _ = api.request(path, method, body, env=unix_env(uid))
    assert code == 200
    (called, args, _), = api.fake.calls
    assert called == name
    if name == "status":
        assert args == ()
    else:
        assert args[-1] == uid and len(args) in (2, 5)


def test_unix_start_args():
    api = Api()
    assert api.request(legacy("startprofile", jobid=GJID_Q), env=unix_env(1000))[0] == 200
    assert api.fake.calls == [("start", (GJID, 4242, "alice", BIRTH, 1000), 10.0)]


@pytest.mark.parametrize("method,path,body,name", ROUTES, ids=[f"{r[0]} {r[1][:30]}" for r in ROUTES])
def test_unix_without_peer_uid_is_403(method, path, body, name):
    api = Api()
    code, _, data = api.request(path, method, body, env=unix_env(None))
    assert code == 403
    assert api.fake.calls == []


def test_unix_forbidden_from_the_profiler_is_403():
    api = Api()
    api.fake.raises["end_job"] = Forbidden("uid 65534 may not act on job 'roots', which belongs to uid 0")
    code, _, data = api.request("/endprofile/jobid=roots", env=unix_env(65534))
    assert code == 403
    assert data["error"] == str(api.fake.raises["end_job"])


@pytest.mark.parametrize("path", ["/shutdown", "/v1/shutdown/"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unix_shutdown_only_by_root(path, method):
    api = Api()
    for uid in (1000, 65534, 1):
        code, _, _ = api.request(path, method, env=unix_env(uid))
        assert code == 403
    assert api.request(path, method, env=unix_env(None))[0] == 403
    assert api.shutdowns == []
    assert api.request(path, method, env=unix_env(0))[0] == 200
    assert api.shutdowns == [1]


def test_spoofed_unix_headers_over_tcp_do_nothing():
    """A TCP client cannot claim the unix transport or a uid with headers (they land in HTTP_*)."""
    api = Api(token=TOKEN)
    headers = {"X-Remote-Uid": "0", "Netprofiler.Unix": "1", "X_REMOTE_UID": "0"}
    assert api.request("/shutdown", headers=headers)[0] == 401
    assert api.shutdowns == []


def test_unauthorized_from_the_profiler_is_401():
    api = Api()
    api.fake.raises["job"] = Unauthorized("no")
    assert api.request("/v1/jobs/j")[0] == 401


# --- /metrics --------------------------------------------------------------------------

def test_metrics_disabled_is_json_404(api):
    code, _, data = api.request("/metrics")
    assert code == 404 and "not enabled" in data["error"]


def test_metrics_page():
    metrics = FakeMetrics()
    api = Api(metrics=metrics)
    for path in ("/metrics", "/metrics/"):
        r = api.app.request(path)
        assert r.status.startswith("200")
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")     # Prometheus, not JSON
        assert b"netprofiler_up 1" in r.data
    assert metrics.renders == 2
    code, _, _ = api.request("/metrics", "POST")
    assert code == 405


def test_metrics_token():
    api = Api(metrics=FakeMetrics(), token=TOKEN)
    assert api.request("/metrics")[0] == 401
    assert api.app.request("/metrics", headers=AUTH).status.startswith("200")


def test_metrics_failure_is_json():
    class Broken:
        def render(self):
            raise RuntimeError("registry exploded")
    api = Api(metrics=Broken())
    code, _, data = api.request("/metrics")
    assert code == 500 and "exploded" not in data["error"]


# --- huge and deeply nested input: 400, never 500 ----------------------------------------

HUGE_PID = "1" * 5000      # all digits, longer than Python's 4300-digit int() limit
ZERO_PADDED_PID = "0" * 4400 + "7"


@pytest.mark.parametrize("method,path,body", [
    ("GET", f"/startprofile/jobid=j,pid={HUGE_PID},owner=a,birthdate=1", None),
    ("GET", f"/endprocessprofile/jobid=j,pid={HUGE_PID},owner=a,birthdate=1", None),
    pytest.param("GET", f"/startprofile/jobid=j,pid={ZERO_PADDED_PID},owner=a,birthdate=1", None, id="leading-zeros"),
    pytest.param("GET", f"/startprofile/jobid=j,pid={'0' * 5000},owner=a,birthdate=1", None, id="all-zeros"),
    pytest.param("POST", "/v1/jobs/j/processes", {"pid": ZERO_PADDED_PID, "owner": "a", "birthdate": 1}, id="rest-body-leading-zeros"),
    pytest.param("DELETE", f"/v1/jobs/j/processes/{ZERO_PADDED_PID}?owner=a&birthdate=1", None, id="rest-path-leading-zeros"),
    ("GET", f"/startprofile/jobid=j,pid={'0' * 4000}7,owner=a,birthdate=1", None),          # under the limit: ok
    ("POST", "/v1/jobs/j/processes", {"pid": HUGE_PID, "owner": "a", "birthdate": 1}),
    ("DELETE", f"/v1/jobs/j/processes/{HUGE_PID}?owner=a&birthdate=1", None),
], ids=["start", "end_process", "leading-zeros", "all-zeros", "rest-body-leading-zeros", "rest-path-leading-zeros",
        "leading-zeros-under-limit", "rest-body", "rest-path"])
def test_huge_digit_pid_is_400_not_500(api, method, path, body):
    code, _, data = api.request(path, method, body)
    if "0" * 4000 + "7" in path + json.dumps(body):
        assert code == 200            # 0...07 is pid 7, however many zeros lead
        return
    assert (code, data.get("field")) == (400, "pid")


@pytest.mark.parametrize("body", ["[" * 100000, '{"a":' * 100000, "[" * 5000 + "]" * 5000])
def test_deeply_nested_json_body_is_400(api, body):
    code, _, data = api.request("/v1/jobs/j/processes", "POST", body)
    assert (code, data.get("field")) == (400, "body")


# --- the same app over real HTTP (cheroot on loopback) -------------------------------

class Http:
    def __init__(self, api, port):
        self.api = api
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))    # never via a proxy

    def request(self, path, method="GET", body=None, headers=None):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self.opener.open(req, timeout=10) as r:
                code, headers, raw = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            code, headers, raw = e.code, e.headers, e.read()
        assert headers.get("Content-Type") == "application/json", (method, path, code, dict(headers), raw)
        data = json.loads(raw)
        if code >= 400:
            assert (data["status"], data["code"]) == ("error", code), data
        return code, data


@pytest.fixture(scope="module")
def served():
    from profiler.service import ApiServer
    api = Api()
    server = ApiServer(api.app, "127.0.0.1", 0)
    server.start()
    try:
        yield Http(api, server.port)
    finally:
        server.stop()


@pytest.fixture
def http(served):
    served.api.fake.__init__()          # a fresh fake for every test, same server
    served.api.shutdowns.clear()
    return served


def test_http_startprofile_global_job_id(http):
    code, data = http.request(legacy("startprofile", jobid=GJID_Q))
    assert code == 200
    assert http.api.fake.calls == [("start", (GJID, 4242, "alice", BIRTH), 10.0)]
    assert data["args"][0] == GJID


def test_http_encoded_comma_slash_and_utf8(http):
    code, _ = http.request(legacy("endprocessprofile", jobid="a%2Cb%2Fc%C3%BC", owner="dom%2Cuser"))
    assert code == 200
    assert http.api.fake.calls[0][1] == ("a,b/cü", 4242, "dom,user", BIRTH)
    assert http.request("/endprofile/jobid=" + GJID_Q)[0] == 200
    assert http.api.fake.calls[-1] == ("end_job", (GJID,), 10.0)


def test_http_rest_routes(http):
    assert http.request(f"/v1/jobs/{GJID_Q}/processes", "POST", {"pid": 7, "owner": "a", "birthdate": 1})[0] == 200
    assert http.request(f"/v1/jobs/{GJID_Q}/processes/7?owner=a&birthdate=1", "DELETE")[0] == 200
    assert http.request("/v1/jobs/a%2Fb")[0] == 200            # cheroot keeps %2F encoded in PATH_INFO
    assert http.request("/v1/jobs/a%2Fb", "DELETE")[0] == 200
    assert http.api.fake.calls == [("start", (GJID, 7, "a", 1.0), 10.0), ("end_process", (GJID, 7, "a", 1.0), 10.0),
                                   ("job", ("a/b",), 10.0), ("end_job", ("a/b",), 10.0)]


def test_http_errors_are_json(http):
    code, data = http.request("/startprofile/jobid=j,pid=-1,owner=a,birthdate=1")
    assert (code, data["field"]) == (400, "pid")
    code, data = http.request("/v1/jobs/j/processes", "POST", b"{nope")
    assert (code, data["field"]) == (400, "body")
    http.api.fake.raises["end_job"] = NotFound("unknown job 'j'")
    assert http.request("/endjobprofile/jobid=j")[0] == 404
    http.api.fake.raises["job"] = IdentityMismatch("reused")
    assert http.request("/v1/jobs/j")[0] == 409
    assert http.request("/no/such/thing")[0] == 404
    assert http.request("/v1/jobs/j", "PUT")[0] == 405
    assert http.request("/status", "POST", {})[0] == 405


def test_http_status_and_shutdown(http):
    code, data = http.request("/status")
    assert (code, data["ready"]) == (200, True)
    http.api.fake.status["interfaces"]["eth0"]["capturing"] = False
    code, data = http.request("/v1/status")
    assert (code, data["ready"]) == (503, False)
    http.api.fake.raises["status"] = NotReady("the profiler is not running")
    assert http.request("/status")[0] == 503
    code, data = http.request("/v1/shutdown", "POST", {})
    assert (code, data["status"]) == (200, "ok")
    assert http.request("/shutdown")[0] == 200
    assert http.api.shutdowns == [1, 1]


def test_http_huge_digit_pid_is_400(http):
    code, data = http.request(f"/startprofile/jobid=j,pid={HUGE_PID},owner=a,birthdate=1")
    assert (code, data.get("field")) == (400, "pid")


@pytest.fixture
def token_server():
    from profiler.service import ApiServer
    api = Api(token=TOKEN)
    server = ApiServer(api.app, "127.0.0.1", 0)
    server.start()
    try:
        yield Http(api, server.port)
    finally:
        server.stop()


def test_http_token(token_server):
    http = token_server
    assert http.request("/status")[0] == 401
    assert http.request("/status", headers={"Authorization": "Bearer nope"})[0] == 401
    assert http.request("/shutdown", "POST", {})[0] == 401
    assert http.api.fake.calls == [] and http.api.shutdowns == []
    code, data = http.request(legacy("startprofile", jobid=GJID_Q), headers=AUTH)
    assert code == 200
    assert http.api.fake.calls == [("start", (GJID, 4242, "alice", BIRTH), 10.0)]     # no caller uid over TCP


class UnixHTTPConnection(HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def test_unix_socket_passes_the_peer_uid():
    from profiler.service import ApiServer
    api = Api(token=TOKEN)                 # not needed through the socket
    with tempfile.TemporaryDirectory(prefix="netprof-api-") as tmp:
        path = os.path.join(tmp, "api.sock")
        server = ApiServer(api.app, unix_path=path)
        server.start()
        try:
            def get(target):
                conn = UnixHTTPConnection(path)
                try:
                    conn.request("GET", target)
                    r = conn.getresponse()
                    assert r.getheader("Content-Type") == "application/json"
                    return r.status, json.loads(r.read())
                finally:
                    conn.close()

            code, data = get(legacy("startprofile", jobid=GJID_Q))
            assert code == 200
            assert api.fake.calls == [("start", (GJID, 4242, "alice", BIRTH, os.getuid()), 10.0)]
            assert get("/no/such")[0] == 404
            code, _ = get("/shutdown")
            assert code == (200 if os.getuid() == 0 else 403)
            assert api.shutdowns == ([1] if os.getuid() == 0 else [])
        finally:
            server.stop()
