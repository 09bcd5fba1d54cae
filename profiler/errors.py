"""The project's own exceptions.

Adapters translate the errors of the libraries they wrap into these at their
edge, and the API maps each class to exactly one HTTP status code.
"""


class ProfilerError(Exception):
    """Base of every error the service raises on purpose."""

    http_status = 500


class BadInput(ProfilerError):
    """A caller sent a malformed value; the message names the field and value."""

    http_status = 400

    def __init__(self, field, value, why="is not valid"):
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r} {why}")


class NotFound(ProfilerError):
    """Unknown job, or a PID that does not exist."""

    http_status = 404


class IdentityMismatch(ProfilerError):
    """The PID exists, but its owner or start time differ: the PID was reused."""

    http_status = 409


class Unauthorized(ProfilerError):
    """The TCP listener wants API_TOKEN and the request did not carry it."""

    http_status = 401


class Forbidden(ProfilerError):
    """The caller (a non-root uid on the unix socket) may not act on this process or job."""

    http_status = 403


class NotReady(ProfilerError):
    """The service cannot answer now (starting, shutting down, or busy)."""

    http_status = 503


class ConfigError(ProfilerError):
    """A configuration value is wrong; the message names the key."""

    def __init__(self, key, message):
        self.key = key
        super().__init__(f"config key {key}: {message}")


class FirewallError(ProfilerError):
    """netfilter refused a change or could not be read."""


class PartialChange(FirewallError):
    """A change committed in some tables and failed in others. `done`: the connection ids whose
    rules were added or removed all the same; `harvested`: {cid: Counters} of those removed."""

    def __init__(self, message, done, harvested):
        super().__init__(message)
        self.done, self.harvested = set(done), dict(harvested)


class CaptureError(ProfilerError):
    """libpcap could not open or read an interface."""
