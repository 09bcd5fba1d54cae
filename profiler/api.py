"""The HTTP API: a thin web.py layer over the profiler's requests.

Every answer is JSON. Each project exception maps to one status code:
BadInput 400, NotFound 404, IdentityMismatch 409, NotReady 503.
"""
import json
import math
from urllib.parse import parse_qsl, unquote

import web

import hmac

from .errors import BadInput, Forbidden, ProfilerError, Unauthorized

web.config.debug = False

MAX_PID = 4194304          # the kernel's largest pid_max
MAX_JOB_ID = 1024
MAX_OWNER = 256
LEGACY_FIELDS = ("jobid", "pid", "owner", "birthdate")

UNIX_TRANSPORT = "netprofiler.unix"   # set in the environ of requests that came through the unix socket

STATUS_LINES = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized", 403: "403 Forbidden",
                404: "404 Not Found", 405: "405 Method Not Allowed",
                409: "409 Conflict", 500: "500 Internal Server Error", 503: "503 Service Unavailable"}


def _json_error(status, message, **extra):
    body = json.dumps({"status": "error", "code": status, "error": message, **extra})
    return web.HTTPError(STATUS_LINES[status], {"Content-Type": "application/json"}, body)


def _ok(payload):
    web.header("Content-Type", "application/json")
    return json.dumps(payload)


def _unquote(field, raw):
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadInput(field, raw, "is not valid UTF-8 once percent-decoded") from None


def parse_job_id(raw, field="jobid"):
    if not raw:
        raise BadInput(field, raw, "must not be empty")
    if len(raw) > MAX_JOB_ID:
        raise BadInput(field, raw[:40] + "...", f"is longer than {MAX_JOB_ID} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in raw):
        raise BadInput(field, raw, "contains control characters")
    return raw


def parse_pid(raw, field="pid"):
    text = str(raw).strip()
    if not text.isascii() or not text.isdigit():
        raise BadInput(field, raw, "is not a positive integer")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_PID)):   # before int(), which refuses huge digit strings itself
        raise BadInput(field, text[:20] + "...", f"is out of range 1..{MAX_PID}")
    pid = int(digits)
    if not 1 <= pid <= MAX_PID:
        raise BadInput(field, raw, f"is out of range 1..{MAX_PID}")
    return pid


def parse_owner(raw, field="owner"):
    if not raw or len(raw) > MAX_OWNER or any(ord(ch) < 33 or ord(ch) == 127 for ch in raw):
        raise BadInput(field, raw, "is not a user name or numeric uid")
    return raw


def parse_birthdate(raw, field="birthdate"):
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise BadInput(field, raw, "is not a number of seconds since the epoch") from None
    if not math.isfinite(value) or value < 0 or value > 1e11:
        raise BadInput(field, raw, "is not a plausible start time in epoch seconds")
    return value


def parse_legacy_params(raw_params, required):
    """`jobid=J,pid=P,owner=O,birthdate=B`; each value may be percent-encoded."""
    values = {}
    for part in raw_params.split(","):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = _unquote("parameter", name).strip().lower()
        if not sep:
            raise BadInput("parameter", part, "is not of the form name=value")
        if name not in LEGACY_FIELDS:
            raise BadInput(name, value, f"is not a known field; expected {', '.join(required)}")
        if name in values:
            raise BadInput(name, value, "is given twice")
        values[name] = _unquote(name, value)
    for name in required:
        if name not in values:
            raise BadInput(name, None, "is missing")
    parsed = {}
    if "jobid" in values:
        parsed["jobid"] = parse_job_id(values["jobid"])
    if "pid" in values:
        parsed["pid"] = parse_pid(values["pid"])
    if "owner" in values:
        parsed["owner"] = parse_owner(values["owner"])
    if "birthdate" in values:
        parsed["birthdate"] = parse_birthdate(values["birthdate"])
    return parsed


def _raw_path():
    """The request path as sent, still percent-encoded, so that an encoded ',' or '/' stays data."""
    env = web.ctx.env
    uri = env.get("REQUEST_URI") or env.get("RAW_URI")
    if uri:
        return uri.split("?", 1)[0]
    return env.get("PATH_INFO", "")


def make_app(profiler, request_shutdown, timeout=10.0, metrics=None, token=""):
    """The web.py application for `profiler`; `request_shutdown()` starts the service's shutdown.

    Over TCP a caller is trusted (once it shows `token`, if one is set); through the unix socket
    it is known by its uid, and a non-root uid may only act on its own processes and jobs.
    """

    def who():
        """() for a trusted caller, (uid,) for a unix-socket peer: appended to the profiler call."""
        env = web.ctx.env
        if env.get(UNIX_TRANSPORT):
            uid = env.get("X_REMOTE_UID")
            if uid is None:
                raise Forbidden("the caller's uid could not be read from the unix socket")
            return (int(uid),)
        if token:
            scheme, _, given = env.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
                raise Unauthorized("this API needs the header 'Authorization: Bearer <API_TOKEN>'")
        return ()

    def call(name, *args):
        return profiler.call(name, *args, timeout=timeout)

    def caller():
        return web.ctx.netprofiler_caller

    def guarded(fn):
        def wrapper(*args):
            try:
                # Who is asking comes first: a caller without the token learns nothing from validation.
                web.ctx.netprofiler_caller = who()
                return fn(*args)
            except web.HTTPError:
                raise
            except ProfilerError as exc:
                status = exc.http_status if exc.http_status in STATUS_LINES else 500
                extra = {"field": exc.field} if isinstance(exc, BadInput) else {}
                raise _json_error(status, str(exc), **extra) from None
        return wrapper

    def legacy_suffix(prefix):
        raw = _raw_path()
        idx = raw.lower().find(prefix)
        return raw[idx + len(prefix):] if idx >= 0 else ""

    def status_answer():
        status = call("status")
        ready = bool(status["interfaces"]) and all(i.get("capturing") for i in status["interfaces"].values())
        status["ready"] = ready
        if not ready:
            raise _json_error(503, "capture is not running on every interface", **status)
        return _ok(status)

    class StartProfile:
        @guarded
        def GET(self, _):
            p = parse_legacy_params(legacy_suffix("/startprofile/"), LEGACY_FIELDS)
            return _ok(call("start", p["jobid"], p["pid"], p["owner"], p["birthdate"], *caller()))

    class EndProcessProfile:
        @guarded
        def GET(self, _):
            p = parse_legacy_params(legacy_suffix("/endprocessprofile/"), LEGACY_FIELDS)
            return _ok(call("end_process", p["jobid"], p["pid"], p["owner"], p["birthdate"], *caller()))

    class EndProfile:
        @guarded
        def GET(self, which, _):
            p = parse_legacy_params(legacy_suffix(f"/{which.lower()}/"), ("jobid",))
            return _ok(call("end_job", p["jobid"], *caller()))

    class Shutdown:
        @guarded
        def GET(self):
            if caller() not in ((), (0,)):
                raise Forbidden("only root may shut the service down")
            request_shutdown()
            return _ok({"status": "ok", "message": "shutting down"})

        POST = GET

        def HEAD(self):
            # web.py would run GET for HEAD: a probe must not stop the service.
            raise _json_error(405, "HEAD /shutdown is not allowed; use GET or POST")

    class MetricsPage:
        @guarded
        def GET(self):
            if metrics is None:
                raise _json_error(404, "metrics are not enabled")
            body, content_type = metrics.render()
            web.header("Content-Type", content_type)
            return body

    class Status:
        @guarded
        def GET(self):
            return status_answer()

    def _segments():
        raw = _raw_path()
        parts = raw.split("/")
        return [_unquote("path", p) for p in parts if p]

    def _body():
        try:
            data = json.loads(web.data() or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadInput("body", "(request body)", "is not JSON (or nested too deeply)") from None
        if not isinstance(data, dict):
            raise BadInput("body", "(request body)", "is not a JSON object")
        return data

    class RestProcesses:
        @guarded
        def POST(self, _):
            job = parse_job_id(_segments()[2], "job")
            body = _body()
            for name in ("pid", "owner", "birthdate"):
                if name not in body:
                    raise BadInput(name, None, "is missing")
            return _ok(call("start", job, parse_pid(body["pid"]), parse_owner(str(body["owner"])),
                            parse_birthdate(body["birthdate"]), *caller()))

    class RestProcess:
        @guarded
        def DELETE(self, _, __):
            seg = _segments()
            job, pid = parse_job_id(seg[2], "job"), parse_pid(seg[4])
            query = dict(parse_qsl(web.ctx.env.get("QUERY_STRING", ""), keep_blank_values=True))
            for name in ("owner", "birthdate"):
                if name not in query:
                    raise BadInput(name, None, "is missing (query parameter)")
            return _ok(call("end_process", job, pid, parse_owner(query["owner"]),
                            parse_birthdate(query["birthdate"]), *caller()))

    class RestJob:
        @guarded
        def DELETE(self, _):
            return _ok(call("end_job", parse_job_id(_segments()[2], "job"), *caller()))

        @guarded
        def GET(self, _):
            return _ok(call("job", parse_job_id(_segments()[2], "job"), *caller()))

    urls = (
        r"/startprofile/(.*)", StartProfile,
        r"/endprocessprofile/(.*)", EndProcessProfile,
        r"/(endjobprofile|endprofile)/(.*)", EndProfile,
        r"/shutdown/?", Shutdown,
        r"/status/?", Status,
        r"/metrics/?", MetricsPage,
        r"/v1/status/?", Status,
        r"/v1/shutdown/?", Shutdown,
        r"/v1/jobs/([^/]+)/processes/?", RestProcesses,
        r"/v1/jobs/([^/]+)/processes/([^/]+)/?", RestProcess,
        r"/v1/jobs/([^/]+)/?", RestJob,
    )
    app = web.application(urls, {})

    def notfound():
        return _json_error(404, f"no such endpoint: {web.ctx.path}")

    def internalerror():
        return _json_error(500, "internal error; see the service log")

    def json_errors(handler):
        # web.py answers some errors (405) itself, in plain text: make them JSON too.
        try:
            return handler()
        except web.HTTPError as exc:
            if "json" in str(web.ctx.headers).lower():
                raise
            code = int(str(exc.args[0] if exc.args else web.ctx.status).split()[0] or 500)
            allow = [(k, v) for k, v in web.ctx.headers if k.lower() == "allow"]
            web.ctx.headers = allow    # a 405 must keep saying which methods are allowed
            raise _json_error(code if code in STATUS_LINES else 500,
                              f"{web.ctx.method} {web.ctx.path}: {str(exc.args[0]) if exc.args else 'error'}")

    app.notfound = notfound
    app.internalerror = internalerror
    app.add_processor(json_errors)
    return app
