"""A connection's rules are made by patching one rule python-iptables built: the bytes must be
exactly those python-iptables builds for the same connection, for any addresses, ports and comment."""
import ctypes
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiler.chains import RuleSpec
from profiler.firewall import _Family

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="python-iptables loads xtables extensions as root")

FAMILIES = {}


def family(fam_id):
    if fam_id not in FAMILIES:
        FAMILIES[fam_id] = _Family(fam_id)
    return FAMILIES[fam_id]


def built_by_python_iptables(fam, src, sport, dst, dport, comment):
    rule = fam.rule(src, sport, dst, dport, comment)
    rule.final_check()
    buf = rule.rule
    return bytes(ctypes.string_at(ctypes.addressof(buf), ctypes.sizeof(buf)))


ports = st.integers(min_value=1, max_value=65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
jobs = st.text(min_size=0, max_size=300)


@settings(max_examples=300, deadline=None)
@given(fam_id=st.sampled_from([socket.AF_INET, socket.AF_INET6]), data=st.data(), sport=ports, dport=ports,
       pid=st.integers(min_value=1, max_value=2**22), job=jobs)
def test_patched_entry_equals_python_iptables_rule(fam_id, data, sport, dport, pid, job):
    addrs = v4 if fam_id == socket.AF_INET else v6
    src, dst = data.draw(addrs), data.draw(addrs)
    comment = RuleSpec("abc.1f", "eth0", fam_id, src, sport, dst, dport, pid, job).comment()
    fam = family(fam_id)
    assert bytes(fam.conn_entry(src, sport, dst, dport, comment)) == \
        built_by_python_iptables(fam, src, sport, dst, dport, comment)
