"""config.ini, parsed once into a typed, frozen object.

A bad value or an unknown key stops the start with a message naming the key.
"""
import configparser
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError

SECTION = "CONFIG"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG_PATH = os.path.join(HERE, "config.ini")


@dataclass(frozen=True)
class Config:
    interfaces: tuple = ()
    max_bytes: int = 1048576
    backup_count: int = 100
    rules_threshold: int = 1000
    log_dir: str = os.path.join(HERE, "logs")
    bind_address: str = "127.0.0.1"
    # How long after a connection's end (both FINs, or RST) its rules are left
    # in place so that the final ACK and any late segment are still counted.
    close_linger: float = 1.0
    # How often the profiler checks for exited processes and vanished sockets.
    sweep_interval: float = 0.5
    service_log: str = ""
    # Hold each tracked connection's SYN in an NFQUEUE until its rules are committed.
    hold_syns: bool = True
    queue_num: int = 7913
    # Complete counts from the kernel's connection tracking when rules came late.
    conntrack: bool = True
    # Remote networks counted as internal (on-campus) in the job totals.
    internal_networks: tuple = ()
    # tsv: the nine-column tab log; json: JSON lines (<iface>.json.log); both.
    log_format: str = "tsv"
    # Who belongs to a job: "tree" (the registered process and its descendants) or "cgroup"
    # (every process in the registered process's cgroup: daemonized processes count too).
    membership: str = "tree"
    # An optional unix socket for the API: callers are known by their uid (SO_PEERCRED), and a
    # non-root caller may only profile its own processes. Relative to the config file.
    api_socket: str = ""
    # An optional token the TCP listener requires (header "Authorization: Bearer <token>").
    api_token: str = field(default="", repr=False)
    # How often our chains are checked for changes made by other programs (seconds).
    verify_interval: float = 10.0
    # The durable state a restart carries on from; relative to the config file.
    state_file: str = ""
    # libpcap's buffer per interface, in bytes.
    capture_buffer: int = 32 * 1024 * 1024
    # Seconds a finished job's Prometheus series stay before they are dropped.
    metrics_retention: float = 300.0
    # Where connection rules go: "filter security" (half in each: each commit replaces half as
    # much) or "filter" (all counted at the same point, before filter's own rules decide).
    rule_tables: str = "filter security"
    # Where the capture reads SYN, FIN and RST packets: "nflog" (netfilter rules send only those to
    # an NFLOG group per interface, NFLOG_GROUP upwards) or "interface" (libpcap on the interface
    # itself, which costs every packet the interface sends a copy).
    capture: str = "nflog"
    nflog_group: int = 7460
    # The conntrack label bit of the fast path (None: off): packets of connections with this label
    # (every connection whose SYN is not held gets it, not on lo) pass one rule a table instead of walking our
    # chains. Needs HOLD_SYNS and CONNTRACK.
    fast_path_label: Optional[int] = 121
    extra: dict = field(default_factory=dict, compare=False)


def _positive_int(key, raw, minimum=1):
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigError(key, f"{raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(key, f"{raw!r} must be at least {minimum}")
    return value


def _positive_float(key, raw):
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(key, f"{raw!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(key, f"{raw!r} must be a positive number")
    return value


def _boolean(key, raw):
    value = raw.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ConfigError(key, f"{raw!r} is not yes or no")


def _queue_num(key, raw):
    value = _positive_int(key, raw, 0)
    if value > 65535:
        raise ConfigError(key, f"{raw!r} must be at most 65535")
    return value


def _label_bit(key, raw):
    value = raw.strip().lower()
    if value in ("no", "off"):
        return None
    try:
        bit = int(value, 10)
    except ValueError:
        raise ConfigError(key, f"{raw!r} is not a conntrack label bit (0 to 127), or 'off'") from None
    if not 0 <= bit <= 127:
        raise ConfigError(key, f"{raw!r} must be a conntrack label bit from 0 to 127, or 'off'")
    return bit


def _networks(key, raw):
    nets = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(key, f"{part!r} is not a CIDR network") from None
    return tuple(nets)


def _choice(key, raw, choices):
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(key, f"{raw!r} is not one of {', '.join(choices)}")
    return value


def _rule_tables(key, raw):
    value = " ".join(raw.replace(",", " ").lower().split())
    if value not in ("filter security", "filter"):
        raise ConfigError(key, f"{raw!r}: must be 'filter security' (half the rules in each) or 'filter'")
    return value


def _log_format(key, raw):
    return _choice(key, raw, ("tsv", "json", "both"))


def _interfaces(key, raw):
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    if not names:
        raise ConfigError(key, "is empty; name an interface or leave the key out")
    for name in names:
        if name != "any" and (len(name) > 15 or "/" in name or not name.isprintable() or " " in name):
            raise ConfigError(key, f"{name!r} is not a valid interface name")
    if len(set(names)) != len(names):
        raise ConfigError(key, f"{raw!r} names an interface twice")
    return names


def _bind_address(key, raw):
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ConfigError(key, f"{raw!r} is not an IP address") from None


def default_route_interface(route_file="/proc/net/route", route6_file="/proc/net/ipv6_route"):
    """The interface of the IPv4 default route, else of the IPv6 one, else None."""
    try:
        with open(route_file) as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 2 and cols[1] == "00000000" and cols[7] == "00000000":
                    return cols[0]
    except OSError:
        pass
    try:
        with open(route6_file) as f:
            for line in f:
                cols = line.split()
                if len(cols) >= 10 and cols[0] == "0" * 32 and cols[1] == "00" and cols[9] != "lo":
                    return cols[9]
    except OSError:
        pass
    return None


_PARSERS = {
    "INTERFACE": ("interfaces", _interfaces),
    "MAX_BYTES": ("max_bytes", lambda k, v: _positive_int(k, v, 0)),
    "BACKUP_COUNT": ("backup_count", lambda k, v: _positive_int(k, v, 0)),
    "RULES_THRESHOLD": ("rules_threshold", lambda k, v: _positive_int(k, v, 1)),
    "LOG_DIR": ("log_dir", None),
    "BIND_ADDRESS": ("bind_address", _bind_address),
    "CLOSE_LINGER": ("close_linger", _positive_float),
    "SWEEP_INTERVAL": ("sweep_interval", _positive_float),
    "SERVICE_LOG": ("service_log", None),
    "HOLD_SYNS": ("hold_syns", _boolean),
    "QUEUE_NUM": ("queue_num", _queue_num),
    "CONNTRACK": ("conntrack", _boolean),
    "INTERNAL_NETWORKS": ("internal_networks", _networks),
    "LOG_FORMAT": ("log_format", _log_format),
    "METRICS_RETENTION": ("metrics_retention", _positive_float),
    "VERIFY_INTERVAL": ("verify_interval", _positive_float),
    "API_SOCKET": ("api_socket", None),
    "API_TOKEN": ("api_token", None),
    "STATE_FILE": ("state_file", None),
    "MEMBERSHIP": ("membership", lambda k, v: _choice(k, v, ("tree", "cgroup"))),
    "CAPTURE_BUFFER": ("capture_buffer", lambda k, v: _positive_int(k, v, 4096)),
    "RULE_TABLES": ("rule_tables", _rule_tables),
    "CAPTURE": ("capture", lambda k, v: _choice(k, v, ("nflog", "interface"))),
    "NFLOG_GROUP": ("nflog_group", _queue_num),
    "FAST_PATH_LABEL": ("fast_path_label", _label_bit),
}
KNOWN_KEYS = tuple(_PARSERS)


def parse_config(text, base_dir=HERE, route_lookup=default_route_interface):
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    parser.optionxform = str.upper
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise ConfigError("(file)", f"cannot be parsed: {exc}") from None
    for section in parser.sections():
        if section != SECTION:
            raise ConfigError(section, f"unknown section [{section}]; only [{SECTION}] is read")
    values = {}
    items = parser.items(SECTION) if parser.has_section(SECTION) else []
    for key, raw in items:
        if key == "FAST_PATH_MARK":
            raise ConfigError(key, "replaced by FAST_PATH_LABEL: a conntrack label bit from 0 to 127 (default "
                                   "121), or off")
        if key not in _PARSERS:
            raise ConfigError(key, f"unknown key; known keys are {', '.join(KNOWN_KEYS)}")
        attr, convert = _PARSERS[key]
        raw = raw.strip()
        if convert is None:
            if not raw:
                raise ConfigError(key, "is empty")
            values[attr] = raw
        else:
            values[attr] = convert(key, raw)
    if "log_dir" in values and not os.path.isabs(values["log_dir"]):
        values["log_dir"] = os.path.join(base_dir, values["log_dir"])
    if "api_socket" in values and not os.path.isabs(values["api_socket"]):
        values["api_socket"] = os.path.join(base_dir, values["api_socket"])
    values.setdefault("state_file", "netprofiler-state.db")
    if not os.path.isabs(values["state_file"]):
        values["state_file"] = os.path.join(base_dir, values["state_file"])
    if "service_log" in values and not os.path.isabs(values["service_log"]):
        values["service_log"] = os.path.join(base_dir, values["service_log"])
    if "interfaces" not in values:
        iface = route_lookup()
        if iface is None:
            raise ConfigError("INTERFACE", "is not set and this machine has no default route to take it from")
        values["interfaces"] = (iface,)
    last = values.get("nflog_group", Config.nflog_group) + len(values["interfaces"]) - 1
    if last > 65535:
        raise ConfigError("NFLOG_GROUP", f"{values['nflog_group']} leaves no room for a group per interface "
                          f"(one each, up to {last}; at most 65535)")
    return Config(**values)


def nflog_groups(config):
    """{interface: NFLOG group} of the capture rules: one group per interface, NFLOG_GROUP upwards."""
    if config.capture != "nflog":
        return {}
    return {iface: config.nflog_group + i for i, iface in enumerate(config.interfaces)}


def load_config(path=None, route_lookup=default_route_interface):
    path = path or DEFAULT_CONFIG_PATH
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, base_dir=os.path.dirname(os.path.abspath(path)), route_lookup=route_lookup)
