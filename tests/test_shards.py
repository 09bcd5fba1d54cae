"""Which table a connection's rules go in, and what happens when one table fails (unit tests with
fake tables; tests/test_many_live_connections.py checks the real ones)."""
import socket

import pytest

from fakes import FakeFirewall
from profiler.chains import Counters, RuleSpec
from profiler.errors import FirewallError, PartialChange
from profiler.shards import ShardedFirewall, shard_of


def spec(cid, lport, rport=443):
    return RuleSpec(cid, "eth9", socket.AF_INET, "10.231.0.1", lport, "10.231.0.2", rport)


@pytest.fixture
def parts():
    filter_part, security_part = FakeFirewall(), FakeFirewall()
    security_part.table = "security"
    return filter_part, security_part, ShardedFirewall(filter_part, security_part)


def test_alternate_port_blocks_go_to_alternate_tables_filed_under_the_larger_port():
    assert [shard_of(spec("c", port)) for port in (32768, 36863, 36864, 40960, 45056, 60999)] == [0, 0, 1, 0, 1, 0]
    assert shard_of(spec("server", 443, rport=36864)) == 1      # a tracked server: the client's port


def test_rules_are_added_and_removed_in_the_table_of_their_block(parts):
    filter_part, security_part, fw = parts
    fw.setup()
    a, b = spec("a", 33000), spec("b", 37000)
    fw.apply(add=[a, b])
    assert set(filter_part.installed) == {"a"} and set(security_part.installed) == {"b"}
    assert fw.installed == {"a", "b"} and fw.rule_count == 4
    assert fw.commit_group(a) != fw.commit_group(b)
    filter_part.counters["a"], security_part.counters["b"] = Counters(1, 10, 2, 20), Counters(3, 30, 4, 40)
    assert fw.read([a, b]) == {"a": Counters(1, 10, 2, 20), "b": Counters(3, 30, 4, 40)}
    assert fw.apply(remove=[a, b]) == {"a": Counters(1, 10, 2, 20), "b": Counters(3, 30, 4, 40)}
    assert fw.installed == set() and filter_part.installed == {} == security_part.installed


def test_after_a_restart_kept_rules_stay_in_the_table_they_were_found_in(parts):
    filter_part, security_part, fw = parts
    old = spec("old", 37000)             # an older version put every rule in filter
    filter_part.found = {"old"}
    fw.setup(keep={"old": old})
    assert set(filter_part.installed) == {"old"} and security_part.installed == {}
    filter_part.counters["old"] = Counters(5, 500, 6, 600)
    assert fw.apply(remove=[old]) == {"old": Counters(5, 500, 6, 600)}
    fw.apply(add=[spec("new", 37001)])
    assert set(security_part.installed) == {"new"}


def test_without_a_security_table_every_rule_goes_in_filter(parts, caplog):
    filter_part, security_part, fw = parts
    security_part.usable = []
    fw.setup()
    assert "security table cannot be used" in caplog.text
    fw.apply(add=[spec("a", 33000), spec("b", 37000)])
    assert set(filter_part.installed) == {"a", "b"} and security_part.installed == {}
    assert fw.commit_group(spec("a", 33000)) == fw.commit_group(spec("b", 37000))


def test_a_family_without_a_security_table_puts_its_rules_in_filter(parts):
    filter_part, security_part, fw = parts
    security_part.usable = [socket.AF_INET]          # ip6table_security missing
    fw.setup()
    assert security_part.families == [socket.AF_INET]
    v6 = RuleSpec("v6", "eth9", socket.AF_INET6, "fd00:231::1", 37000, "fd00:231::2", 443)
    fw.apply(add=[spec("v4", 37000), v6])
    assert set(security_part.installed) == {"v4"} and set(filter_part.installed) == {"v6"}


def test_a_pair_kept_in_the_other_table_with_a_new_connection_s_4_tuple_is_removed_first(parts):
    filter_part, security_part, fw = parts
    filter_part.order = security_part.order = []     # one list: the order of both tables' commits
    old = spec("old", 37000)                          # kept in filter from before a restart
    filter_part.found = {"old"}
    fw.setup(keep={"old": old})
    filter_part.counters["old"] = Counters(5, 500, 6, 600)
    harvested = fw.apply(add=[spec("new", 37000)])    # its block is security's
    assert filter_part.order == [("commit", []), ("commit", ["new"])]
    assert harvested == {"old": Counters(5, 500, 6, 600)}
    assert filter_part.installed == {} and set(security_part.installed) == {"new"} and fw.installed == {"new"}


def test_a_failure_in_the_second_table_reports_what_the_first_one_did(parts):
    filter_part, security_part, fw = parts
    fw.setup()
    a, b = spec("a", 33000), spec("b", 37000)
    fw.apply(add=[a])
    filter_part.counters["a"] = Counters(1, 10, 1, 10)
    security_part.fail_next = True
    with pytest.raises(PartialChange) as caught:
        fw.apply(add=[b], remove=[a])
    assert caught.value.done == {"a"} and caught.value.harvested == {"a": Counters(1, 10, 1, 10)}
    assert fw.installed == set()
    filter_part.fail_next = True          # nothing made at all: a plain failure
    with pytest.raises(FirewallError) as caught:
        fw.apply(add=[spec("c", 33001)])
    assert not isinstance(caught.value, PartialChange)


def test_the_table_holding_the_old_pair_commits_first_whichever_it_is(parts):
    filter_part, security_part, fw = parts
    order = filter_part.order = security_part.order = []
    old = spec("old", 33000)                          # filter's block, but found in security
    security_part.found = {"old"}
    fw.setup(keep={"old": old})
    fw.apply(add=[spec("new", 33000)])
    assert order == [("commit", []), ("commit", ["new"])]
    assert security_part.installed == {} and set(filter_part.installed) == {"new"}


def test_stale_pairs_in_both_tables_are_removed_before_either_table_gets_a_new_pair(parts):
    filter_part, security_part, fw = parts
    order = filter_part.order = security_part.order = []
    x, y = spec("x", 33000), spec("y", 37000)       # each kept in the table its block is not
    security_part.found, filter_part.found = {"x"}, {"y"}
    fw.setup(keep={"x": x, "y": y})
    fw.apply(add=[spec("a", 33000), spec("b", 37000)])
    assert order == [("commit", []), ("commit", []), ("commit", ["a"]), ("commit", ["b"])]
    assert set(filter_part.installed) == {"a"} and set(security_part.installed) == {"b"}
    assert fw.installed == {"a", "b"}


def test_without_the_split_pairs_left_in_security_are_still_taken_over():
    filter_part, security_part = FakeFirewall(), FakeFirewall()
    left = spec("left", 37000)
    security_part.found = {"left"}
    fw = ShardedFirewall(filter_part, security_part, split=False, table_made=lambda table, family: True)
    fw.setup(keep={"left": left})
    assert set(security_part.installed) == {"left"}      # counting on where it was, until removed
    security_part.counters["left"] = Counters(1, 10, 1, 10)
    assert fw.apply(remove=[left]) == {"left": Counters(1, 10, 1, 10)}
    fw.apply(add=[spec("new", 37001)])
    assert set(filter_part.installed) == {"new"}
    # Nothing left there at the start: the security table is given up at once.
    empty_filter, empty_security = FakeFirewall(), FakeFirewall()
    fw = ShardedFirewall(empty_filter, empty_security, split=False, table_made=lambda table, family: True)
    fw.setup()
    fw.apply(add=[spec("c", 37000)])
    assert set(empty_filter.installed) == {"c"} and fw.tables == ["filter"]
    # Made for IPv4 only (by an earlier run, say): the IPv6 one is not opened, which would make it.
    v4_filter, v4_security = FakeFirewall(), FakeFirewall()
    fw = ShardedFirewall(v4_filter, v4_security, split=False,
                         table_made=lambda table, family: family == socket.AF_INET)
    fw.setup()
    assert v4_security.looked_at == [socket.AF_INET]
    # Made for neither: never opened at all.
    none_filter, none_security = FakeFirewall(), FakeFirewall()
    fw = ShardedFirewall(none_filter, none_security, split=False, table_made=lambda table, family: False)
    fw.setup()
    assert not hasattr(none_security, "looked_at") and fw.tables == ["filter"]


def test_a_lock_held_too_long_stops_the_start_instead_of_skipping_the_security_table():
    from profiler.firewall import IptablesFirewall

    class BusyLock:
        def held(self):
            raise FirewallError("the xtables lock is held by another program")

    with pytest.raises(FirewallError, match="held by another program"):
        IptablesFirewall(["eth9"], lock=BusyLock(), table="security").usable_families()
