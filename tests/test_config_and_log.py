import ipaddress
import os

import pytest

from profiler.config import default_route_interface, load_config, nflog_groups, parse_config
from profiler.errors import ConfigError
from profiler.logsink import RollingLogSink, format_json
from profiler.model import Record


def test_defaults_and_default_route(tmp_path):
    cfg = parse_config("[CONFIG]\n", base_dir=str(tmp_path), route_lookup=lambda: "eth7")
    assert cfg.interfaces == ("eth7",)
    assert (cfg.max_bytes, cfg.backup_count, cfg.rules_threshold) == (1048576, 100, 1000)
    assert cfg.bind_address == "127.0.0.1"
    assert cfg.log_dir.endswith("logs")
    assert cfg.rule_tables == "filter security"
    assert cfg.capture == "nflog" and nflog_groups(cfg) == {"eth7": 7460}


def test_values_and_lists(tmp_path):
    cfg = parse_config("[CONFIG]\nINTERFACE = eth0, eth1\nMAX_BYTES = 10\nLOG_DIR = out\n"
                       "INTERNAL_NETWORKS = 10.0.0.0/8, fd00::/8\nLOG_FORMAT = both\nRULE_TABLES = Filter\n",
                       base_dir=str(tmp_path))
    assert cfg.interfaces == ("eth0", "eth1") and cfg.max_bytes == 10 and cfg.rule_tables == "filter"
    assert cfg.log_dir == os.path.join(str(tmp_path), "out")
    assert cfg.internal_networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    with pytest.raises(Exception):
        cfg.max_bytes = 5   # frozen


@pytest.mark.parametrize("line,key", [
    ("MAX_BYTES = lots", "MAX_BYTES"),
    ("BACKUP_COUNT = -1", "BACKUP_COUNT"),
    ("RULES_THRESHOLD = 0", "RULES_THRESHOLD"),
    ("BIND_ADDRESS = localhost:80", "BIND_ADDRESS"),
    ("INTERFACE = ,", "INTERFACE"),
    ("INTERFACE = this-name-is-far-too-long", "INTERFACE"),
    ("COLOUR = blue", "COLOUR"),
    ("LOG_FORMAT = xml", "LOG_FORMAT"),
    ("INTERNAL_NETWORKS = 10.0.0.0/33", "INTERNAL_NETWORKS"),
    ("HOLD_SYNS = maybe", "HOLD_SYNS"),
    ("RULE_TABLES = mangle", "RULE_TABLES"),
    ("CAPTURE = pcap", "CAPTURE"),
    ("NFLOG_GROUP = 70000", "NFLOG_GROUP"),
    ("FAST_PATH_LABEL = 128", "FAST_PATH_LABEL"),        # labels are bits 0 to 127
    ("FAST_PATH_LABEL = -1", "FAST_PATH_LABEL"),
    ("FAST_PATH_LABEL = 0x10", "FAST_PATH_LABEL"),
    ("FAST_PATH_LABEL = on", "FAST_PATH_LABEL"),
    ("FAST_PATH_MARK = 0x10000000", "FAST_PATH_MARK"),   # the key of the earlier fast path is gone
])
def test_bad_values_name_the_key(line, key):
    with pytest.raises(ConfigError) as err:
        parse_config(f"[CONFIG]\nINTERFACE = eth0\n{line}\n")
    assert key in str(err.value)


def test_fast_path_label_is_a_bit_from_0_to_127_or_off():
    label = lambda v: parse_config(f"[CONFIG]\nINTERFACE = eth0\nFAST_PATH_LABEL = {v}\n").fast_path_label  # noqa: E731
    assert parse_config("[CONFIG]\nINTERFACE = eth0\n").fast_path_label == 121
    assert (label("0"), label("127"), label(" 31 "), label("off"), label("No")) == (0, 127, 31, None, None)


def test_one_nflog_group_per_interface_or_none_when_capturing_on_the_interface():
    cfg = parse_config("[CONFIG]\nINTERFACE = eth0, eth1\nNFLOG_GROUP = 40\n")
    assert nflog_groups(cfg) == {"eth0": 40, "eth1": 41}
    assert nflog_groups(parse_config("[CONFIG]\nINTERFACE = eth0\nCAPTURE = interface\n")) == {}
    with pytest.raises(ConfigError, match="NFLOG_GROUP.*65536"):
        parse_config("[CONFIG]\nINTERFACE = eth0, eth1\nNFLOG_GROUP = 65535\n")


def test_no_default_route_is_a_clear_error():
    with pytest.raises(ConfigError, match="INTERFACE"):
        parse_config("[CONFIG]\n", route_lookup=lambda: None)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "none.ini"))


def test_route_file_parsing(tmp_path):
    route = tmp_path / "route"
    route.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
                     "eth3\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
                     "eth4\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n")
    assert default_route_interface(str(route), str(tmp_path / "none")) == "eth4"


def _record(**kw):
    base = dict(cid="a.1", job="job\t#1", pid=7, interface="eth0", family=2, local="10.0.0.1", lport=5000,
                remote="10.0.0.2", rport=80, outgoing=True, in_bytes=300, in_packets=3, out_bytes=400,
                out_packets=4, start=100.0, end=101.5, reason="closed", complete=True, source="rules")
    base.update(kw)
    return Record(**base)


def test_tab_log_lines_and_rolling(tmp_path):
    sink = RollingLogSink(str(tmp_path), max_bytes=300, backup_count=2)
    for _ in range(6):
        sink.write(_record())
    sink.close()
    lines = open(tmp_path / "eth0.log").read().splitlines()
    cols = lines[0].split("\t")
    assert len(cols) == 9
    assert cols[1:] == ["job #1", "7", "10.0.0.2", "80", "10.0.0.1", "5000", "IN", "300"]
    assert lines[1].split("\t")[1:] == ["job #1", "7", "10.0.0.1", "5000", "10.0.0.2", "80", "OUT", "400"]
    import re
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", cols[0])
    assert os.path.exists(tmp_path / "eth0.log.1") and not os.path.exists(tmp_path / "eth0.log.3")


def test_json_log(tmp_path):
    import json
    sink = RollingLogSink(str(tmp_path), max_bytes=10_000, backup_count=1, log_format="json",
                          internal_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    sink.write(_record(outgoing=False, complete=False, reason="EndProfile", open_at_end=True))
    sink.close()
    assert not os.path.exists(tmp_path / "eth0.log")
    obj = json.loads(open(tmp_path / "eth0.json.log").read())
    assert obj["id.orig_h"] == "10.0.0.2" and obj["orig_bytes"] == 300 and obj["resp_bytes"] == 400
    assert obj["in_bytes"] == 300 and obj["out_bytes"] == 400 and obj["duration"] == 1.5
    assert obj["internal"] is True and obj["complete"] is False and obj["end"] == "EndProfile"
    assert format_json(_record()) != format_json(_record(cid="b.2"))


def test_log_rolls_on_after_its_file_was_moved_away_and_never_truncates_without_backups(tmp_path):
    sink = RollingLogSink(str(tmp_path), max_bytes=300, backup_count=2)
    sink.write(_record())
    os.rename(tmp_path / "eth0.log", tmp_path / "moved")      # logrotate, before its SIGUSR1
    for _ in range(4):
        sink.write(_record())                                 # rolls over a file that is gone
    sink.close()
    assert os.path.exists(tmp_path / "eth0.log") and os.path.getsize(tmp_path / "eth0.log") > 0
    keep = RollingLogSink(str(tmp_path / "keep"), max_bytes=300, backup_count=0)
    for _ in range(6):
        keep.write(_record())
    keep.close()
    assert len(open(tmp_path / "keep" / "eth0.log").read().splitlines()) == 12
    assert not os.path.exists(tmp_path / "keep" / "eth0.log.1")
