"""A connection's rules are made by patching one rule python-iptables built: the bytes must be
exactly those python-iptables builds for the same connection, for any addresses and ports, and
reading an entry back gives the same addresses and ports."""
import ctypes
import ipaddress
import os
import socket

import iptc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiler.chains import Hop
from profiler.firewall import _Family

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="python-iptables loads xtables extensions as root")

FAMILIES = {}


def family(fam_id):
    if fam_id not in FAMILIES:
        FAMILIES[fam_id] = _Family(fam_id)
    return FAMILIES[fam_id]


def raw_of(rule):
    rule.final_check()
    buf = rule.rule     # a new buffer at each access: keep this one alive while it is read
    return bytes(ctypes.string_at(ctypes.addressof(buf), ctypes.sizeof(buf)))


def built_by_python_iptables(fam, src, sport, dst, dport):
    return raw_of(fam.rule(src, sport, dst, dport))


ports = st.integers(min_value=1, max_value=65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


@settings(max_examples=300, deadline=None)
@given(fam_id=st.sampled_from([socket.AF_INET, socket.AF_INET6]), data=st.data(), sport=ports, dport=ports)
def test_patched_entry_equals_python_iptables_rule_and_reads_back(fam_id, data, sport, dport):
    addrs = v4 if fam_id == socket.AF_INET else v6
    src, dst = data.draw(addrs), data.draw(addrs)
    fam = family(fam_id)
    built = built_by_python_iptables(fam, src, sport, dst, dport)
    assert bytes(fam.conn_entry(src, sport, dst, dport)) == built
    t = fam.template
    key = t.key_of(built[:t.target_offset])
    assert key == t.key(src, sport, dst, dport)
    a, ap, b, bp = t.tuple_of(key)
    assert (ipaddress.ip_address(a), ap, ipaddress.ip_address(b), bp) == \
        (ipaddress.ip_address(src), sport, ipaddress.ip_address(dst), dport)


def test_other_rules_are_not_read_as_connection_rules():
    for fam_id, src, dst in ((socket.AF_INET, "10.231.0.1", "10.231.0.2"), (socket.AF_INET6, "fd00::1", "fd00::2")):
        fam = family(fam_id)
        t = fam.template
        others = [
            fam.rule(None, 0, None, 0, target="ACCEPT", in_iface="eth0"),
            fam.rule(src + ("/24" if fam_id == socket.AF_INET else "/64"), 1, dst, 2),   # not an exact address
            fam.dispatch_rule(Hop("NETPROF_I_eth0", "dport", 1000, 2000, "RETURN")),
        ]
        header = iptc.ip4tc.ipt_entry if fam_id == socket.AF_INET else iptc.ip6tc.ip6t_entry
        for rule in others:
            raw = raw_of(rule)
            target_offset = header.from_buffer_copy(raw[:ctypes.sizeof(header)]).target_offset
            assert t.key_of(raw[:target_offset]) is None
        # The same rule as a connection's, with another target: still read (the target is not compared).
        rule = fam.rule(src, 1, dst, 2, target="ACCEPT")
        raw = raw_of(rule)
        assert t.key_of(raw[:t.target_offset]) == t.key(src, 1, dst, 2)
