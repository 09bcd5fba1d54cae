"""The firewall adapter against the real legacy tables in a namespace of our own: what a restart
finds (pairs the state knows, pairs it does not, pairs an older version made with comments), and
a pair left under a stale id when a new connection reuses its 4-tuple."""
import json
import os

import pytest

from harness import PYTHON, ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
SCRIPT = os.path.join(ROOT, "tests", "fw_scenarios.py")


def scenario(ns, name, **env):
    r = ns.run(PYTHON, SCRIPT, name, env=dict(os.environ, **env))
    return json.loads(r.stdout.splitlines()[-1])


def leftover_rules(ns):
    return [line for tool in ("iptables-legacy-save", "ip6tables-legacy-save")
            for line in ns.run(tool).stdout.splitlines() if "NETPROF" in line]


def test_restart_keeps_known_pairs_reads_old_ones_and_logs_the_rest(netpair):
    out = scenario(netpair.a, "leftovers_and_upgrade")
    assert out["installed"] == ["k1", "o1"]
    # Not in the state: logged by 4-tuple, with its counters, and removed.
    assert out["leftovers"] == [["10.231.0.1", 40301, "10.231.0.2", 443, "", 0, 2000, 2001],
                                ["fd00:231::1", 40009, "fd00:231::2", 443, "", 0, 0, 0]]
    # Kept: the rules made before the crash go on counting, the old commented ones included.
    assert out["read"] == {"k1": [1000, 1001], "o1": [3000, 3001]}
    assert out["fixes"] == [[], []]
    assert out["final"]["k1"] == [1000, 1001] and out["final"]["o1"] == [3000, 3001]
    assert leftover_rules(netpair.a) == []


def test_a_stale_pair_with_a_new_connection_s_4_tuple_is_removed_not_summed(netpair):
    out = scenario(netpair.a, "stale_pair_with_a_reused_4_tuple")
    assert out["installed"] == ["new"] and out["rules"] == 2
    assert out["harvested"] == {"old": [9000, 9001]}
    assert out["new"] == {"new": [0, 0]}
    assert out["fixes"] == [[], []]
    assert leftover_rules(netpair.a) == []


def test_rules_put_by_us_and_rules_read_with_the_table_are_each_removed_once(netpair):
    out = scenario(netpair.a, "rules_put_and_rules_read_removed_together")
    assert out["harvested"] == {"read": [300, 400, 1, 1], "put": [0, 0, 1, 1]}
    assert out["rules"] == 0 and out["fixes"] == [[], []]
    assert leftover_rules(netpair.a) == []


def test_what_another_program_does_between_our_commits_is_kept(netpair):
    out = scenario(netpair.a, "foreign_changes_between_our_commits")
    for table in (out["mid"], out["after"]):
        # Not ours, made while we kept the table: still there after our commits.
        assert ":FORWARD DROP [0:0]" in table
        assert any("-A SOMEONE -p udp -m udp --dport 54 -j DROP" in line for line in table)
        assert not any("--dport 53 " in line for line in table)
    assert any("-A SOMEONE -p udp -m udp --dport 55 -j ACCEPT" in line for line in out["after"])
    # The counters the other program gave our rules: carried over our commits, read at removal.
    assert out["harvested"] == {"c1": [3, 3000, 4, 4000]}
    assert out["read"] == {"c2": [5000, 6000], "c3": [0, 0]}
    assert out["fixes"] == [[], []]
    assert not any("NETPROF" in line for line in out["teardown"])
    assert any("--dport 55" in line for line in out["teardown"]) and ":FORWARD DROP [0:0]" in out["teardown"]


def test_a_change_that_fails_halfway_leaves_nothing_behind(netpair):
    out = scenario(netpair.a, "failure_in_the_middle_of_a_change")
    assert out["failed"] is True
    assert out["harvested"] == {"old": [2, 2000, 3, 3000]}
    assert out["installed"] == ["new", "warm"]
    ports = sorted(int(rule.split("--sport ")[1].split()[0]) for rule in out["rules"])
    assert ports == [443, 443, 40002, 45001]      # inbound rules by their sport, outbound by theirs
    assert out["fixes"] == [[], []]


def test_verify_puts_back_only_missing_rules_and_leaves_copies_alone(netpair):
    out = scenario(netpair.a, "halved_and_copied_pairs")
    # The halved pair and the one with no outbound rule are repaired; the copy is not a fault.
    assert out["fixes"] == [["2 connections' rules were removed or bypassed"], ["doubled", "halved"]], out
    assert out["again"] == [[], []]                      # nothing left to repair
    assert out["read"] == {"halved": [0, 0, 7, 700],     # the rule left kept its count; the new one from 0
                           "copied": [5, 500, 8, 800],   # both outbound copies, summed
                           "doubled": [7, 700, 0, 0]}, out["read"]


@pytest.mark.parametrize("movable", [True, False], ids=["moved", "stranded"])
def test_an_upgrade_from_the_two_level_layout_keeps_every_count(netpair, movable):
    out = scenario(netpair.a, "upgrade_from_the_two_level_layout", **({} if movable else {"STRANDED": "1"}))
    assert out["old_leaves_before"] == ["NETPROF_IL9c_eth9", "NETPROF_IL9d_eth9", "NETPROF_OL9c_eth9",
                                        "NETPROF_OL9d_eth9"]
    # Not in the state: logged by its 4-tuple, as any pair an earlier run left.
    unknown = ["40301", 2000, 2001, False]
    if movable:
        # Each kept rule counts on in its new leaf from what it had counted (read() looks only there).
        assert out["installed"] == ["k1", "k2", "k6"] and out["leftovers"] == [unknown]
        assert out["read"] == {"k1": [3, 1000, 4, 1001], "k2": [1, 10, 1, 11], "k6": [7, 3000, 8, 3001]}
        assert out["harvested"] == {"k1": [1000, 1001], "k2": [10, 11], "k6": [3000, 3001]}
    else:
        # What the kept pairs counted is logged, saying why; their connections get new rules later.
        assert out["installed"] == []
        assert out["leftovers"] == [unknown, ["k1", 1000, 1001, True], ["k2", 10, 11, True],
                                    ["k6", 3000, 3001, True]]
        assert out["read"] == {} and out["harvested"] == {}
    # The old leaves, the hops to them and a rule of someone else's in one of them are gone.
    assert out["outdated_after"] == [] and out["udp_rules"] == []
    assert out["fixes"] == [[], []]
    assert out["after"] == [] and leftover_rules(netpair.a) == []


def test_capture_rules_are_ours_to_put_back_and_to_remove(netpair):
    out = scenario(netpair.a, "capture_rules_put_back")
    jump = "-p tcp -m tcp ! --tcp-flags FIN,SYN,RST NONE -j NETPROF_LOG_"
    assert sorted(out["first"]) == sorted([
        ":NETPROF_LOG_I - [0:0]", ":NETPROF_LOG_O - [0:0]",
        f"-A PREROUTING {jump}I", f"-A POSTROUTING {jump}O",
        "-A NETPROF_LOG_I -i eth9 -j NFLOG --nflog-group 7460 --nflog-threshold 16",
        "-A NETPROF_LOG_O -o eth9 -j NFLOG --nflog-group 7460 --nflog-threshold 16",
        "-A NETPROF_LOG_O -o lo -j NFLOG --nflog-group 7461 --nflog-threshold 16"])
    assert out["clean"] == [[], []]
    assert f"-A POSTROUTING {jump}O" not in out["broken"]
    assert out["fixes"][0] == ["the IPv4 capture rules in mangle were changed by another program"]
    assert sorted(out["repaired"]) == sorted(out["first"])
    assert out["after"] == []


def test_the_fast_path_label_is_on_every_jump_once_and_set_on_syns_not_held(netpair):
    out = scenario(netpair.a, "fast_path_jumps_and_hold_labels")
    assert sorted(out["before"]) == ["-A INPUT -i eth9 -j NETPROF_I_eth9", "-A OUTPUT -o eth9 -j NETPROF_O_eth9"]
    jumps = [line for line in out["after"] if line.startswith(("-A INPUT", "-A OUTPUT")) and "HOLD" not in line]
    unlabelled = '-p tcp -m connlabel ! --label "121"'    # also every packet without an entry
    assert jumps == [f"-A INPUT -i eth9 {unlabelled} -j NETPROF_I_eth9",
                     f"-A OUTPUT -o eth9 {unlabelled} -j NETPROF_O_eth9"]
    assert [line for line in out["after6"] if "HOLD" not in line] == jumps
    # plain jumps, an earlier version's mark (read once at a restart), then ours
    assert out["earlier"] == [None, ["mark", 0x10000000], ["label", 121]]
    assert out["installed"] == ["k1"]          # the pair the earlier run made is kept
    assert out["verify"] == [[], []]           # the jumps are what verify() expects
    # In each chain's order: the queue for what is held, then the label on every other SYN (not on lo,
    # where a SYN passes both chains).
    hold = ([line for line in out["after"] if line.startswith("-A NETPROF_HOLD_O")]
            + [line for line in out["after"] if line.startswith("-A NETPROF_HOLD_I")])
    assert hold == [
        "-A NETPROF_HOLD_O -o eth9 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m owner --uid-owner 1000 "
        "-j NFQUEUE --queue-num 7913 --queue-bypass",
        '-A NETPROF_HOLD_O ! -o lo -m connlabel --label "121" --set -j RETURN',
        "-A NETPROF_HOLD_I -i eth9 -p tcp -m tcp --dport 8080 --tcp-flags FIN,SYN,RST,ACK SYN "
        "-j NFQUEUE --queue-num 7913 --queue-bypass",
        '-A NETPROF_HOLD_I ! -i lo -m connlabel --label "121" --set -j RETURN'], hold
    hold6 = ([line for line in out["after6"] if line.startswith("-A NETPROF_HOLD_O")]
             + [line for line in out["after6"] if line.startswith("-A NETPROF_HOLD_I")])
    assert hold6 == hold          # IPv6 holds the same way
    assert out["left"] == []
