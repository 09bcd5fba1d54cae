"""The chain tree's layout: pure logic."""
import socket

from profiler.chains import RuleSpec, chain_info, outdated, path


def spec(lport, rport, iface="eth0"):
    return RuleSpec("c1", iface, socket.AF_INET, "10.0.0.1", lport, "10.0.0.2", rport, 7, "job#1")


def test_outgoing_connections_are_filed_by_their_local_port():
    hops, leaf = path(spec(40001, 443), "O")
    assert [(h.chain, h.field, h.lo, h.hi, h.target, h.goto) for h in hops] == [
        ("NETPROF_O_eth0", "sport", 36864, 40959, "NETPROF_OLx9_eth0", False),
        ("NETPROF_OLx9_eth0", "sport", 39936, 40447, "NETPROF_OLy4eeth0", True),
        ("NETPROF_OLy4eeth0", "sport", 40000, 40063, "NETPROF_OL271eth0", True)]
    assert leaf == "NETPROF_OL271eth0"
    hops, leaf = path(spec(40001, 443), "I")
    assert hops[0].field == "dport" and leaf == "NETPROF_IL271eth0"


def test_accepted_connections_are_filed_by_the_clients_port():
    hops, leaf = path(spec(9000, 51000), "I")
    assert hops[0].field == "sport" and hops[2].lo <= 51000 <= hops[2].hi and leaf == "NETPROF_IR31ceth0"
    hops, leaf = path(spec(9000, 51000), "O")
    assert hops[0].field == "dport" and leaf == "NETPROF_OR31ceth0"


def test_a_leaf_holds_64_ports_and_its_hops_nest():
    for port in (32768, 40001, 60999):
        hops, _ = path(spec(port, 1), "I")
        assert [h.hi - h.lo + 1 for h in hops] == [4096, 512, 64]
        assert hops[0].lo <= hops[1].lo <= hops[2].lo and hops[2].hi <= hops[1].hi <= hops[0].hi
        assert [h.chain for h in hops[1:]] == [h.target for h in hops[:-1]]
    assert path(spec(40000, 1), "I")[1] == path(spec(40063, 1), "I")[1] != path(spec(40064, 1), "I")[1]


def test_every_port_lands_in_the_ranges_of_its_hops():
    for port in (0, 1, 255, 256, 4095, 4096, 32768, 60999, 65535):
        for s in (spec(port, 0), spec(0, port) if port else spec(0, 0)):
            for direction in "IO":
                hops, _ = path(s, direction)
                key = max(s.lport, s.rport)
                assert all(h.lo <= key <= h.hi for h in hops)


def test_chain_names_fit_netfilter_and_are_recognised():
    longest = "abcdefghijklmno"   # IFNAMSIZ - 1
    for direction in "IO":
        hops, leaf = path(spec(65535, 1, longest), direction)
        for name in [h.chain for h in hops] + [leaf]:
            assert len(name) <= 28, name
            kind, d, iface = chain_info(name)
            assert (d, iface) == (direction, longest)
        assert chain_info(leaf)[0] == "leaf" and chain_info(hops[1].chain)[0] == "mid"
        assert chain_info(hops[2].chain)[0] == "mid" and chain_info(hops[0].chain)[0] == "top"
        assert not any(outdated(name) for name in [h.chain for h in hops] + [leaf])
    assert chain_info("NETPROF_HOLD_O") is None and chain_info("NETPROF_CT") is None
    assert chain_info("INPUT") is None


def test_leaves_of_the_two_level_layout_are_recognised_as_outdated():
    # NETPROF_<direction><block><port >> 8, 2 hex>_<iface>: an earlier version's 256-port leaf.
    assert chain_info("NETPROF_IL9c_eth0") == ("leaf", "I", "eth0") and outdated("NETPROF_IL9c_eth0")
    assert chain_info("NETPROF_ORc7_abcdefghijklmno") == ("leaf", "O", "abcdefghijklmno")
    # an interface whose name starts with an underscore or hex digits is told apart by position
    assert chain_info("NETPROF_IL9c__x") == ("leaf", "I", "_x") and outdated("NETPROF_IL9c__x")
    assert chain_info("NETPROF_IL9c0_x") == ("leaf", "I", "_x") and not outdated("NETPROF_IL9c0_x")
    assert chain_info("NETPROF_ILx9_eth0") == ("mid", "I", "eth0") and not outdated("NETPROF_ILx9_eth0")


def test_each_rule_of_a_pair_is_filed_with_its_direction_s_4_tuple():
    s = spec(40001, 443)
    (leaf_in, t_in), (leaf_out, t_out) = s.tuples()
    assert (leaf_in, t_in) == (path(s, "I")[1], ("10.0.0.2", 443, "10.0.0.1", 40001))
    assert (leaf_out, t_out) == (path(s, "O")[1], ("10.0.0.1", 40001, "10.0.0.2", 443))
