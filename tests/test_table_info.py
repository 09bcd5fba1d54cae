"""The cheap check between full verifications: the kernel's summary of a legacy table changes when
another program commits a change to it (in a namespace of our own, with the real iptables-legacy)."""
import os

import pytest

from harness import PYTHON, ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

READ = ("import socket, sys; sys.path.insert(0, %r); from profiler.firewall import table_info; "
        "print(table_info(socket.AF_INET, 'filter').hex(), table_info(socket.AF_INET6, 'filter').hex())" % ROOT)


def summary(ns):
    return ns.run(PYTHON, "-c", READ).stdout.split()


def test_summary_changes_with_any_commit_that_changes_the_table(netpair):
    ns = netpair.a
    ns.run("iptables-legacy", "-w", "-L", "-n")       # the legacy filter table exists from here on
    ns.run("ip6tables-legacy", "-w", "-L", "-n")
    before = summary(ns)
    assert summary(ns) == before                       # nothing changed: the same summary
    ns.run("iptables-legacy", "-w", "-I", "INPUT", "1", "-p", "udp", "-j", "ACCEPT")
    after_v4 = summary(ns)
    assert after_v4[0] != before[0] and after_v4[1] == before[1]
    ns.run("ip6tables-legacy", "-w", "-N", "SOMEONE_ELSE")
    assert summary(ns)[1] != before[1]
    ns.run("iptables-legacy", "-w", "-D", "INPUT", "-p", "udp", "-j", "ACCEPT")
    assert summary(ns)[0] == before[0]                 # back as it was: the summary says so too


def test_summary_of_a_missing_table_is_a_clear_error(netpair):
    r = netpair.a.run(PYTHON, "-c", READ.replace("'filter'", "'nosuchtable'", 1), check=False)
    assert r.returncode != 0 and "cannot read the summary of table nosuchtable" in r.stderr
