"""Unit tests of the profiler's logic, with fakes of every adapter."""
import dataclasses
import socket

import pytest

from fakes import FIN, RST, SYN, SYNACK, Ev, FakeFirewall, FakeProcesses, FakeSockets, ListSink
from nstools import wait_for
from profiler.clock import FakeClock, SystemClock
from profiler.config import Config
from profiler.core import REMOVE_RETRIES, Profiler
from profiler.errors import IdentityMismatch, NotFound
from profiler.firewall import Counters, RuleSpec
from synqueue_stub import HeldSynStub

L, R = "10.231.0.1", "10.231.0.2"


@pytest.fixture
def env():
    fw, procs, socks, sink, clock = FakeFirewall(), FakeProcesses(), FakeSockets(), ListSink(), FakeClock()
    config = Config(interfaces=("eth9",), rules_threshold=1000, close_linger=1.0, sweep_interval=0.5)
    prof = Profiler(config, fw, procs, socks, sink, clock)
    return prof, fw, procs, socks, sink, clock


def ev(src, sport, dst, dport, flags):
    return Ev("eth9", 0.0, socket.AF_INET, src, sport, dst, dport, flags)


def register(prof, procs, pid=100, job="job#1", **kw):
    ident = procs.add(pid, **kw)
    return prof.req_start(job, pid, ident.user, ident.create_time)


def open_conn(prof, socks, lport, inode, uid=1000, rport=80):
    socks.connect(L, lport, R, rport, uid=uid, inode=inode)
    prof.on_packet(ev(L, lport, R, rport, SYN))
    prof.flush()


def close_conn(prof, socks, lport, rport=80):
    prof.on_packet(ev(L, lport, R, rport, FIN))
    prof.on_packet(ev(R, rport, L, lport, FIN))
    socks.close(L, lport, R, rport)


def test_connection_of_tracked_process_gets_rules_and_is_harvested_after_both_fins(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    assert len(fw.installed) == 1
    cid = next(iter(fw.installed))
    fw.counters[cid] = Counters(3, 300, 4, 400)
    prof.on_packet(ev(L, 5000, R, 80, FIN))          # half-close: the other side may still send
    prof.sweep()
    clock.advance(5)
    prof.sweep()
    prof.flush()
    assert sink.records == [] and len(fw.installed) == 1
    prof.on_packet(ev(R, 80, L, 5000, FIN))
    prof.sweep()
    prof.flush()
    assert sink.records == []                         # lingers for the last ACK
    clock.advance(1.0)
    prof.sweep()
    prof.flush()
    [rec] = sink.records
    assert (rec.job, rec.pid, rec.in_bytes, rec.out_bytes, rec.reason) == ("job#1", 100, 300, 400, "closed")
    assert fw.installed == {}


def test_who_closed_first_says_which_descriptor_will_be_free(env):
    """A FIN from the peer: the process will likely close its socket next (socket_closing); a FIN
    from the process: the socket is closed (socket_closed). Either tells the process table where
    the process's next socket will be."""
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11, 12})
    open_conn(prof, socks, 5000, 11)
    open_conn(prof, socks, 5001, 12)
    prof.on_packet(ev(R, 80, L, 5000, FIN))
    assert (procs.closing_inodes, procs.closed_inodes) == ([11], [])
    prof.on_packet(ev(L, 5000, R, 80, FIN))
    prof.on_packet(ev(L, 5001, R, 80, FIN))
    assert (procs.closing_inodes, procs.closed_inodes) == ([11], [11, 12])


def test_untracked_process_gets_no_rules(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    procs.add(200, inodes={22})
    open_conn(prof, socks, 5001, 22)
    assert fw.installed == {}


def test_reset_ends_the_connection(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    prof.on_packet(ev(R, 80, L, 5000, RST))
    clock.advance(2)
    prof.sweep()
    prof.flush()
    assert [r.reason for r in sink.records] == ["reset"]


def test_process_exit_is_noticed_without_a_call(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    socks.table[(socket.AF_INET, L, 5000, R, 80)] = socks.table[(socket.AF_INET, L, 5000, R, 80)].__class__(
        socket.AF_INET, "ESTABLISHED", L, 5000, R, 80, 1000, 11)
    procs.kill(100)
    prof.sweep()
    clock.advance(2)
    prof.sweep()
    prof.flush()
    assert [r.reason for r in sink.records] == ["process exit"]
    assert prof.procs == {}


def test_lost_fin_is_caught_by_the_socket_sweep(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    socks.close(L, 5000, R, 80)                       # closed, but no FIN reached us
    clock.advance(2)
    prof.sweep()
    clock.advance(2)
    prof.sweep()
    prof.flush()
    assert [r.reason for r in sink.records] == ["closed"]


class CountingSockets(FakeSockets):
    def __init__(self):
        super().__init__()
        self.gets = 0

    def get(self, *args):
        self.gets += 1
        return super().get(*args)


def _many_live_with_one_lost_fin(prof, procs, clock, n=3000):
    """n live connections, one of them closed without a FIN reaching us, after one sweep (which sets
    the loss baseline); socket lookups are counted from here on."""
    socks = prof.sockets = CountingSockets()
    prof.config = dataclasses.replace(prof.config, rules_threshold=100_000)
    register(prof, procs, inodes=set(range(1, n + 1)))
    for i in range(n):
        open_conn(prof, socks, 10000 + i, i + 1)
    socks.close(L, 10000 + n // 2, R, 80)
    clock.advance(2)
    prof.sweep()
    socks.gets = 0
    return socks


def test_idle_sweep_looks_at_few_sockets_when_no_packet_was_lost(env):
    prof, fw, procs, _, sink, clock = env
    socks = _many_live_with_one_lost_fin(prof, procs, clock)
    prof.sweep()
    assert socks.gets == 0                              # the first sweep took this 10 s's slice
    # 3,000 live, each looked at once in five minutes, a slice every 10 s: 100 lookups, not 3,000.
    for _ in range(20):
        clock.advance(0.5)
        prof.sweep()
    assert socks.gets == 100                            # one slice in 10 s
    for _ in range(600):                                # ...and within five minutes, every one of them
        clock.advance(0.5)
        prof.sweep()
    prof.flush()
    assert [r.lport for r in sink.records] == [11500]


def test_lost_packets_make_the_sweep_look_at_every_socket_at_once(env):
    prof, fw, procs, _, sink, clock = env
    drops = {"eth9": {"received": 10, "dropped": 0, "if_dropped": 0}}
    prof.capture_stats = lambda: drops
    socks = _many_live_with_one_lost_fin(prof, procs, clock)
    drops["eth9"]["dropped"] = 7                        # the capture lost packets: maybe that FIN
    prof.sweep()
    assert socks.gets == 2000                           # LOSS_CHECK_BUDGET
    prof.sweep()
    assert socks.gets == 3000
    clock.advance(1.5)
    prof.sweep()
    prof.flush()
    assert [r.lport for r in sink.records] == [11500]


def test_child_forked_later_is_adopted_into_the_job(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    procs.add(101, parent=100, inodes={33})
    procs.add(102, parent=101, inodes={44})
    open_conn(prof, socks, 5002, 44)
    [spec] = fw.installed.values()
    assert (spec.pid, spec.job) == (102, "job#1")
    assert prof.procs[102].root == 100


def test_accepted_connection_found_through_the_listener(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={55})
    socks.listen(L, 9100, inode=55)
    prof.on_packet(ev(R, 40000, L, 9100, SYN))
    prof.flush()
    [spec] = fw.installed.values()
    assert (spec.local, spec.lport, spec.remote, spec.rport) == (L, 9100, R, 40000)
    conn = next(iter(prof.conns.values()))
    assert conn.outgoing is False


def test_a_deep_accept_queue_is_looked_at_a_slice_at_a_time(env):
    """Connections waiting to be accepted are polled every millisecond, but one pass looks at no
    more than RESOLVE_LOOKS_PER_PASS of them: held SYNs and API calls must not wait behind them."""
    from profiler.attribution import RESOLVE_LOOKS_PER_PASS
    prof, fw, procs, _, sink, clock = env
    socks = prof.sockets = CountingSockets()
    register(prof, procs, inodes={55})
    socks.listen(L, 9100, inode=55)
    for i in range(200):
        socks.connect(L, 9100, R, 40000 + i, inode=0, state="ESTABLISHED")   # queued, not accepted
        prof.on_packet(ev(R, 40000 + i, L, 9100, SYN))
    prof.flush()
    assert len(prof._unresolved) == 200
    socks.gets = 0
    prof.resolve_accepted()
    assert socks.gets == RESOLVE_LOOKS_PER_PASS
    clock.advance(0.001)
    socks.gets = 0
    prof.resolve_accepted()
    assert socks.gets == RESOLVE_LOOKS_PER_PASS
    assert len(prof._unresolved) == 200          # still waiting to be accepted: none given up


def test_gc_reclaims_ended_connections_and_reports_untracked_when_full(env, caplog):
    prof, fw, procs, socks, sink, clock = env
    prof.config = Config(interfaces=("eth9",), rules_threshold=4, close_linger=100.0)
    register(prof, procs, inodes={1, 2, 3, 4})
    open_conn(prof, socks, 5001, 1)
    open_conn(prof, socks, 5002, 2)
    close_conn(prof, socks, 5001)                     # ended, lingering: reclaimable
    open_conn(prof, socks, 5003, 3)
    assert prof.stats["gc_runs"] == 1 and [r.lport for r in sink.records] == [5001]
    assert fw.rule_count == 4
    open_conn(prof, socks, 5004, 4)                    # nothing to reclaim: untracked
    assert prof.stats["untracked_full"] == 1
    assert "untracked" in caplog.text and fw.rule_count == 4


def test_gc_of_a_full_table_ends_connections_whose_socket_is_gone_before_their_fins_are_seen(env):
    prof, fw, procs, socks, sink, clock = env
    prof.config = Config(interfaces=("eth9",), rules_threshold=4, close_linger=100.0, sweep_interval=0.5)
    register(prof, procs, inodes={1, 2, 3, 4, 5, 55})
    socks.listen(L, 9100, inode=55)
    prof.on_packet(ev(R, 40000, L, 9100, SYN))     # accepted: no socket of its own yet
    prof.flush()
    open_conn(prof, socks, 5001, 1)
    socks.close(L, 5001, R, 80)       # closed; its FINs are still in the capture's queue
    open_conn(prof, socks, 5002, 2)
    assert [(r.lport, r.reason) for r in sink.records] == [(5001, "closed")]
    socks.close(L, 5002, R, 80)
    clock.advance(1.0)                # the accepted one is past its grace, and has no socket
    open_conn(prof, socks, 5003, 3)
    assert sorted((r.lport, r.reason) for r in sink.records) == [(5001, "closed"), (5002, "closed"), (9100, "closed")]
    assert fw.rule_count == 2
    open_conn(prof, socks, 5002, 2)
    sink.records.clear()
    assert prof.stats["untracked_full"] == 0 and fw.rule_count == 4
    clock.advance(1.0)
    open_conn(prof, socks, 5004, 4)   # every socket live: untracked, and no socket dump for a while
    assert prof.stats["untracked_full"] == 1
    socks.close(L, 5002, R, 80)
    open_conn(prof, socks, 5005, 5)   # within the sweep interval of a dump that found nothing
    assert prof.stats["untracked_full"] == 2
    clock.advance(0.5)
    socks.connect(L, 5006, R, 80, inode=5)
    prof.on_packet(ev(L, 5006, R, 80, SYN))
    prof.flush()
    assert [r.lport for r in sink.records] == [5002] and prof.stats["untracked_full"] == 2
    assert sorted(c.lport for c in prof.conns.values()) == [5003, 5006] and fw.rule_count == 4


def test_identity_checks(env):
    prof, fw, procs, socks, sink, clock = env
    procs.add(100, create_time=5000.0)
    with pytest.raises(IdentityMismatch):
        prof.req_start("j", 100, "mallory", 5000.0)
    with pytest.raises(IdentityMismatch):
        prof.req_start("j", 100, "alice", 4998.5)
    assert prof.req_start("j", 100, "1000", 5000.9)["already_tracked"] is False
    assert prof.req_start("j", 100, "alice", 5000.0)["already_tracked"] is True
    with pytest.raises(IdentityMismatch):
        prof.req_start("other", 100, "alice", 5000.0)
    with pytest.raises(NotFound):
        prof.req_start("j", 999, "alice", 5000.0)
    with pytest.raises(NotFound):
        prof.req_end_job("nope")


def test_end_profile_harvests_open_connections_and_totals(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11, 12})
    open_conn(prof, socks, 5000, 11)
    open_conn(prof, socks, 5001, 12)
    for cid in fw.installed:
        fw.counters[cid] = Counters(1, 100, 2, 200)
    live = prof.req_job("job#1")
    assert live["totals"]["in_bytes"] == 200 and all(c["open_at_end"] for c in live["connections"])
    answer = prof.req_end_job("job#1")
    assert answer["totals"]["connections"] == 2
    assert answer["totals"]["in_bytes"] == 200 and answer["totals"]["out_bytes"] == 400
    assert all(c["reason"] == "EndProfile" and c["open_at_end"] for c in answer["connections"])
    assert fw.installed == {} and prof.jobs == {}


def test_internal_external_split(env):
    prof, fw, procs, socks, sink, clock = env
    import ipaddress
    prof.config = Config(interfaces=("eth9",), internal_networks=(ipaddress.ip_network("10.231.0.0/24"),))
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    fw.counters[next(iter(fw.installed))] = Counters(1, 100, 1, 50)
    t = prof.req_end_job("job#1")["totals"]
    assert t["internal"] == {"in_bytes": 100, "out_bytes": 50}
    assert t["external"] == {"in_bytes": 0, "out_bytes": 0}


def test_held_syn_is_released_only_after_its_rules_are_committed(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    socks.connect(L, 5000, R, 80, inode=11)
    released = []
    prof.on_held_syns([(HeldSynStub(socket.AF_INET, L, 5000, R, 80), lambda: released.append(fw.commits))])
    assert released == []
    prof.flush()
    assert released == [1] and len(fw.installed) == 1
    conn = next(iter(prof.conns.values()))
    assert conn.rules_before_first_packet
    fw.counters[conn.cid] = Counters(2, 120, 3, 180)
    rec = prof.req_end_job("job#1")["connections"][0]
    assert rec["complete"] is True and rec["source"] == "rules"


def test_late_rules_without_conntrack_are_marked_incomplete(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    fw.counters[next(iter(fw.installed))] = Counters(2, 100, 2, 100)
    rec = prof.req_end_job("job#1")["connections"][0]
    assert rec["complete"] is False and "after" in rec["note"]


def test_late_rules_completed_by_conntrack(env):
    prof, fw, procs, socks, sink, clock = env

    class CT:
        def get(self, family, src, sport, dst, dport):
            from profiler.conntrack import CtCounters
            assert (src, sport, dst, dport) == (L, 5000, R, 80)   # original direction: we initiated
            return CtCounters(5, 500, 6, 600, "TIME_WAIT")

    prof.conntrack = CT()
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    fw.counters[next(iter(fw.installed))] = Counters(2, 100, 2, 100)
    rec = prof.req_end_job("job#1")["connections"][0]
    assert (rec["complete"], rec["source"], rec["in_bytes"], rec["out_bytes"]) == (True, "conntrack", 600, 500)


def test_firewall_failure_does_not_kill_the_profiler(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    fw.fail_next = True
    socks.connect(L, 5000, R, 80, inode=11)
    prof.on_packet(ev(L, 5000, R, 80, SYN))
    prof.flush()
    open_conn(prof, socks, 5001, 11)
    assert len(fw.installed) == 1


def test_hold_rules_follow_tracked_users_and_listening_ports(env):
    prof, fw, procs, socks, sink, clock = env
    socks.listen("0.0.0.0", 9100, inode=55)
    register(prof, procs, inodes={55}, uid=1234)
    assert fw.hold == (frozenset({1234}), frozenset({9100}))
    procs.kill(100)
    prof.sweep()
    prof.flush()
    assert fw.hold == (frozenset(), frozenset())


def test_shutdown_harvests_everything(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    prof.shutdown()
    assert [r.reason for r in sink.records] == ["shutdown"] and fw.installed == {}


def test_thread_answers_requests_through_the_queue(env):
    prof, fw, procs, socks, sink, clock = env
    procs.add(100)
    prof.start()
    try:
        assert prof.call("start", "j", 100, "alice", 1000.0)["status"] == "ok"
        with pytest.raises(NotFound):
            prof.call("end_job", "unknown")
        assert prof.call("status")["tracked_processes"] == 1
    finally:
        prof.stop()
    assert not prof.running


def test_accepted_connection_is_attributed_to_the_worker_that_accepted_it(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={55})                 # the parent listens
    procs.add(101, parent=100, inodes={55, 66})        # a worker forked after listen() accepts
    socks.listen(L, 9100, inode=55)
    prof.on_packet(ev(R, 40000, L, 9100, SYN))
    prof.flush()
    conn = next(iter(prof.conns.values()))
    assert conn.pid == 100
    socks.connect(L, 9100, R, 40000, inode=66, state="ESTABLISHED")
    clock.advance(0.01)
    prof.resolve_accepted()
    assert conn.pid == 101 and prof.procs[101].job == "job#1"


def test_untracked_connection_makes_the_job_incomplete(env):
    prof, fw, procs, socks, sink, clock = env
    prof.config = Config(interfaces=("eth9",), rules_threshold=2)
    register(prof, procs, inodes={1, 2})
    open_conn(prof, socks, 5001, 1)
    open_conn(prof, socks, 5002, 2)          # table full, nothing to reclaim
    totals = prof.req_end_job("job#1")["totals"]
    assert totals["untracked_connections"] == 1 and totals["complete"] is False


def test_rules_removed_by_another_program_make_the_record_incomplete(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    socks.connect(L, 5000, R, 80, inode=11)
    prof.on_held_syns([(HeldSynStub(socket.AF_INET, L, 5000, R, 80), lambda: None)])
    prof.flush()
    cid = next(iter(fw.installed))
    fw.counters[cid] = Counters(1, 60, 1, 60)
    fw.removed_by_other = {cid}
    prof.verify_rules()
    rec = prof.req_end_job("job#1")["connections"][0]
    assert rec["complete"] is False and "another program" in rec["note"]


def test_a_repair_marks_the_connection_incomplete_durably_and_a_harvested_one_still_to_be_removed(tmp_path):
    """The mark survives a restart (the repaired rules would read as complete), and a connection whose
    record waits for its rules' removal gets it too."""
    from profiler.store import StateStore
    fw, procs, socks, sink, clock = FakeFirewall(), FakeProcesses(), FakeSockets(), ListSink(), FakeClock()
    config = Config(interfaces=("eth9",), rules_threshold=1000, close_linger=1.0, sweep_interval=0.5)
    store = StateStore(str(tmp_path / "state.db"))
    prof = Profiler(config, fw, procs, socks, sink, clock, store=store)
    register(prof, procs, inodes={11, 12})
    open_conn(prof, socks, 5000, 11)
    open_conn(prof, socks, 5001, 12)
    by_port = {spec.lport: cid for cid, spec in fw.installed.items()}
    [waiting] = [k for k, c in prof.conns.items() if c.lport == 5001]
    prof._pending_remove[by_port[5001]] = (prof.conns.pop(waiting), fw.installed[by_port[5001]])
    fw.removed_by_other = set(by_port.values())
    prof.verify_rules()
    assert all("another program" in c.incomplete_reason for c, _ in prof._pending_remove.values())
    saved = {c["cid"]: c["incomplete_reason"] for c in store.load()[2]}
    assert set(saved) == set(by_port.values()) and all("another program" in r for r in saved.values())
    [live] = prof.req_job("job#1")["connections"]          # the open one: not exact any more
    assert live["lport"] == 5000 and live["complete"] is False
    prof.flush()                                           # the waiting one's rules go, its record is written
    assert [c["cid"] for c in store.load()[2]] == [by_port[5000]]
    [rec] = [r for r in sink.records if r.lport == 5001]
    assert not rec.complete and "another program" in rec.note
    store.close()


class LookupCountingSockets(FakeSockets):
    def __init__(self):
        super().__init__()
        self.looked = []

    def get(self, family, local, lport, remote, rport):
        self.looked.append(("get", local, lport))
        return super().get(family, local, lport, remote, rport)

    def listener(self, family, local, lport):
        self.looked.append(("listener", local, lport))
        return super().listener(family, local, lport)


@pytest.mark.parametrize("hook, src, dst, looked", [
    (3, L, R, {("get", L, 5000)}),                                   # held in OUTPUT: sent by us
    (1, R, L, {("get", L, 80), ("listener", L, 80)}),                # held in INPUT: for us
    (3, "127.0.0.1", "127.0.0.1", {("get", "127.0.0.1", 5000), ("get", "127.0.0.1", 80),
                                   ("listener", "127.0.0.1", 80)}),  # both ends here: both sides
])
def test_a_held_syn_is_looked_up_only_on_the_side_its_hook_says_is_local(env, hook, src, dst, looked):
    prof, fw, procs, _, sink, clock = env
    socks = prof.sockets = LookupCountingSockets()
    register(prof, procs, inodes={11})
    sport, dport = (5000, 80)
    prof.on_held_syns([(HeldSynStub(socket.AF_INET, src, sport, dst, dport, hook=hook), lambda: None)])
    assert set(socks.looked) == looked


def test_closed_connection_is_harvested_when_its_linger_is_up_not_at_the_next_sweep():
    """The real thread and clock: CLOSE_LINGER 0.2 s, a sweep only every 30 s."""
    fw, procs, socks, sink = FakeFirewall(), FakeProcesses(), FakeSockets(), ListSink()
    config = Config(interfaces=("eth9",), rules_threshold=1000, close_linger=0.2, sweep_interval=30.0)
    prof = Profiler(config, fw, procs, socks, sink, SystemClock())
    register(prof, procs, inodes={11, 12})
    open_conn(prof, socks, 5000, 11)
    open_conn(prof, socks, 5001, 12)
    prof.start()
    try:
        for lport in (5000, 5001):
            prof.submit(ev(L, lport, R, 80, FIN))
            prof.submit(ev(R, 80, L, lport, FIN))
        wait_for(lambda: len(sink.records) == 2, timeout=5, what="both records")
        assert [r.lport for r in sink.records] == [5000, 5001]
        assert all(r.reason == "closed" for r in sink.records)
    finally:
        prof.stop()


def test_a_failed_removal_is_tried_again_and_keeps_its_counts(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11, 12})
    open_conn(prof, socks, 5000, 11)
    open_conn(prof, socks, 5001, 12)
    a, b = sorted(prof.conns.values(), key=lambda c: c.lport)
    fw.counters[a.cid], fw.counters[b.cid] = Counters(2, 120, 3, 180), Counters(1, 60, 1, 60)
    close_conn(prof, socks, 5000)
    close_conn(prof, socks, 5001)
    clock.advance(2)
    prof.sweep()
    fw.fail_next = True
    prof.flush()
    assert sink.records == [] and set(fw.installed) == {a.cid, b.cid}   # still counting, not given up
    prof.flush()
    assert sorted((r.lport, r.in_bytes, r.out_bytes, r.source) for r in sink.records) == [
        (5000, 120, 180, "rules"), (5001, 60, 60, "rules")]
    assert not any("vanished" in r.note for r in sink.records)
    assert fw.installed == {}


def test_a_removal_that_keeps_failing_is_recorded_as_vanished(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    open_conn(prof, socks, 5000, 11)
    close_conn(prof, socks, 5000)
    clock.advance(2)
    prof.sweep()
    for _ in range(REMOVE_RETRIES + 1):
        assert sink.records == []
        fw.fail_next = True
        prof.flush()
    assert [(r.complete, r.note.split(";")[0]) for r in sink.records] == [
        (False, "rules vanished before they were read")]


def harvest_due(prof, socks, clock, lport):
    """The connection from `lport` closes and, its linger up, waits to be harvested."""
    close_conn(prof, socks, lport)
    clock.advance(2)
    prof.sweep()


def hold_syn(prof, socks, lport, inode, release=lambda: None):
    """A SYN from a new socket `inode` at `lport`, held until its rules are committed."""
    socks.connect(L, lport, R, 80, inode=inode)
    prof.on_held_syns([(HeldSynStub(socket.AF_INET, L, lport, R, 80), release)])


def test_a_held_syn_waits_for_its_own_table_not_for_another_table_s_harvest(env):
    prof, fw, procs, socks, sink, clock = env
    fw.group_of = lambda spec: spec.lport % 2         # odd and even local ports: two tables
    register(prof, procs, inodes={11, 12, 13})
    open_conn(prof, socks, 5001, 11)
    open_conn(prof, socks, 5003, 12)
    odd, same = sorted(prof.conns.values(), key=lambda c: c.lport)
    fw.counters[odd.cid], fw.counters[same.cid] = Counters(2, 120, 3, 180), Counters(1, 60, 1, 60)
    for lport in (5001, 5003):
        harvest_due(prof, socks, clock, lport)       # both wait to be harvested
    prof.flush(defer_harvest=True, for_held=True)
    fw.order.clear()
    fw.commits = 0
    released = []
    hold_syn(prof, socks, 5002, 13, lambda: released.append(fw.commits))     # even: the other table
    prof.flush(defer_harvest=True, for_held=True)
    assert released == [1] and fw.order == [("commit", [c.cid for c in prof.conns.values() if c.lport == 5002])]
    assert sink.records == [] and {odd.cid, same.cid} <= set(fw.installed)
    clock.advance(0.2)                               # HARVEST_BATCH_WAIT: the harvest's own commit
    prof.flush(defer_harvest=True, for_held=True)
    assert sorted((r.lport, r.in_bytes, r.out_bytes) for r in sink.records) == [(5001, 120, 180), (5003, 60, 60)]
    # A held SYN of the same table takes the harvest along in its commit.
    open_conn(prof, socks, 5005, 11)
    five = next(c for c in prof.conns.values() if c.lport == 5005)
    harvest_due(prof, socks, clock, 5005)
    hold_syn(prof, socks, 5007, 12)
    prof.flush(defer_harvest=True, for_held=True)
    assert five.cid not in fw.installed and [r.lport for r in sink.records][-1] == 5005


def test_end_profile_gets_every_harvest_even_while_a_syn_is_held(env):
    prof, fw, procs, socks, sink, clock = env
    fw.group_of = lambda spec: spec.lport % 2
    register(prof, procs, inodes={11, 12})
    open_conn(prof, socks, 5001, 11)
    fw.counters[next(iter(prof.conns.values())).cid] = Counters(2, 120, 3, 180)
    harvest_due(prof, socks, clock, 5001)
    hold_syn(prof, socks, 5002, 12)
    answer = prof.req_end_job("job#1")
    assert [(c["lport"], c["in_bytes"], c["out_bytes"]) for c in answer["connections"] if c["lport"] == 5001] == [
        (5001, 120, 180)]


def test_a_pair_whose_4_tuple_a_held_syn_takes_is_removed_in_the_same_flush(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11, 12})
    old = held_connection(prof, socks, 11, lport=5000)
    fw.group_of = lambda spec: "old" if spec.cid == old.cid else "new"     # a pair left in the other table
    fw.counters[old.cid] = Counters(2, 120, 3, 180)
    harvest_due(prof, socks, clock, 5000)
    hold_syn(prof, socks, 5000, 12)
    prof.flush(defer_harvest=True, for_held=True)
    assert old.cid not in fw.installed and len(fw.installed) == 1
    assert [(r.lport, r.in_bytes, r.out_bytes) for r in sink.records] == [(5000, 120, 180)]


def test_a_change_made_in_one_table_and_not_in_the_other_keeps_what_was_made(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11, 12, 13, 14})
    open_conn(prof, socks, 5001, 11)
    open_conn(prof, socks, 5002, 12)
    made, failed = sorted(prof.conns.values(), key=lambda c: c.lport)
    for lport in (5001, 5002):
        close_conn(prof, socks, lport)
    clock.advance(2)
    prof.sweep()
    socks.connect(L, 5003, R, 80, inode=13)
    socks.connect(L, 5004, R, 80, inode=14)
    prof.on_packet(ev(L, 5003, R, 80, SYN))
    prof.on_packet(ev(L, 5004, R, 80, SYN))
    new_made, new_failed = sorted((c for c in prof.conns.values() if c.lport > 5002), key=lambda c: c.lport)
    fw.partial = ({made.cid, new_made.cid}, {made.cid: Counters(2, 120, 3, 180)})
    prof.flush()
    assert [(r.lport, r.in_bytes, r.out_bytes) for r in sink.records] == [(5001, 120, 180)]
    assert new_made.rules_installed and not new_failed.rules_installed
    assert failed.cid in fw.installed and failed.cid in prof._pending_remove    # tried again
    prof.flush()
    assert sorted(r.lport for r in sink.records) == [5001, 5002]


def test_the_capture_of_a_held_syn_and_its_syn_ack_costs_no_lookup_of_the_other_side(env):
    prof, fw, procs, _, sink, clock = env
    socks = prof.sockets = LookupCountingSockets()
    register(prof, procs, inodes={11})
    socks.connect(L, 5000, R, 80, inode=11)
    prof.on_held_syns([(HeldSynStub(socket.AF_INET, L, 5000, R, 80, hook=3), lambda: None)])
    prof.flush()
    assert socks.looked == [("get", L, 5000)]
    prof.on_packet(ev(L, 5000, R, 80, SYN))
    prof.on_packet(ev(R, 80, L, 5000, SYNACK))
    assert socks.looked == [("get", L, 5000)]      # R's side was ruled out by the hook, L's is tracked
    assert len(prof.conns) == 1 and prof._local_side == {}
    # Without a held SYN before it, the capture looks at both sides, as it must.
    prof.on_packet(ev(L, 5001, R, 80, SYN))
    assert ("listener", R, 80) in socks.looked and ("get", L, 5001) in socks.looked


def held_connection(prof, socks, inode, lport=5000):
    """The connection a held SYN from socket `inode` starts, its rules committed."""
    socks.connect(L, lport, R, 80, inode=inode)
    prof.on_held_syns([(HeldSynStub(socket.AF_INET, L, lport, R, 80), lambda: None)])
    prof.flush()
    return next(c for c in prof.conns.values() if c.lport == lport)


def test_a_4_tuple_reused_within_the_linger_gets_a_record_of_its_own(env):
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11, 12})
    first = held_connection(prof, socks, 11)
    fw.counters[first.cid] = Counters(3, 300, 4, 400)
    close_conn(prof, socks, 5000)
    clock.advance(0.1)            # well within CLOSE_LINGER
    second = held_connection(prof, socks, 12)
    assert second.cid != first.cid and list(fw.installed) == [second.cid]
    assert [(r.lport, r.in_bytes, r.out_bytes) for r in sink.records] == [(5000, 300, 400)]
    fw.counters[second.cid] = Counters(1, 100, 1, 100)
    close_conn(prof, socks, 5000)
    clock.advance(2)
    prof.sweep()
    prof.flush()
    assert [(r.lport, r.in_bytes, r.out_bytes) for r in sink.records] == [(5000, 300, 400), (5000, 100, 100)]


def test_a_4_tuple_taken_again_before_the_old_fins_are_handled_gets_a_record_of_its_own(env):
    """Under load the capture's FINs may wait in the queue while the SYN of a new socket with the
    same 4-tuple is held: the socket's inode tells them apart, and the old FINs do not end the new one."""
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11, 12})
    first = held_connection(prof, socks, 11)
    fw.counters[first.cid] = Counters(3, 300, 4, 400)
    captured_before = clock.time() + 1.0
    clock.advance(2)
    socks.close(L, 5000, R, 80)   # the old FINs have not been handled yet
    second = held_connection(prof, socks, 12)
    assert second.cid != first.cid and second.inode == 12 and list(fw.installed) == [second.cid]
    assert [(r.lport, r.in_bytes, r.out_bytes, r.reason) for r in sink.records] == [(5000, 300, 400, "closed")]
    # A retransmitted SYN of the same socket is not a new connection.
    prof.on_held_syns([(HeldSynStub(socket.AF_INET, L, 5000, R, 80), lambda: None)])
    prof.flush()
    assert next(iter(prof.conns.values())).cid == second.cid and len(sink.records) == 1
    # The old connection's FINs, captured before the new SYN, come now: they end nothing.
    for src, sport, dst, dport in ((L, 5000, R, 80), (R, 80, L, 5000)):
        prof.on_packet(Ev("eth9", captured_before, socket.AF_INET, src, sport, dst, dport, FIN))
    assert not second.end_reason
    # Its own FINs, captured later, do.
    for src, sport, dst, dport in ((L, 5000, R, 80), (R, 80, L, 5000)):
        prof.on_packet(Ev("eth9", clock.time() + 1, socket.AF_INET, src, sport, dst, dport, FIN))
    assert second.end_reason == "closed"


def test_old_fins_read_from_nflog_without_a_kernel_time_do_not_end_the_new_connection(env):
    """From NFLOG an outbound packet carries no kernel timestamp, only when it was read: the old
    connection's FIN, read after the new SYN was held, looks newer than it is. The group hands
    packets over in order, so until the capture delivers the new connection's own SYN such
    events are the old connection's."""
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11, 12})
    held_connection(prof, socks, 11)
    clock.advance(2)
    socks.close(L, 5000, R, 80)
    second = held_connection(prof, socks, 12)
    read_late = clock.time() + 1     # after the new SYN was held
    prof.on_packet(Ev("eth9", read_late, socket.AF_INET, L, 5000, R, 80, FIN, stamped=False))
    assert not second.end_reason and not second.local_fin
    # The new connection's SYN through the capture, then its own FIN, unstamped too: that ends it.
    prof.on_packet(Ev("eth9", read_late, socket.AF_INET, L, 5000, R, 80, SYN, stamped=False))
    prof.on_packet(Ev("eth9", read_late, socket.AF_INET, L, 5000, R, 80, FIN, stamped=False))
    prof.on_packet(Ev("eth9", read_late, socket.AF_INET, R, 80, L, 5000, FIN))
    assert second.end_reason == "closed"


def test_old_fins_read_late_do_not_end_an_inbound_connection_that_took_the_4_tuple(env):
    """The same for a tracked server: a client reuses its 4-tuple (a new accepted socket, its SYN
    held in INPUT) before our side's FIN of the old connection, logged without a kernel time,
    is read."""
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={55, 66, 67})
    socks.listen(L, 9100, inode=55)

    def held_inbound(inode):
        socks.connect(L, 9100, R, 40000, inode=inode, state="ESTABLISHED")
        prof.on_held_syns([(HeldSynStub(socket.AF_INET, R, 40000, L, 9100, hook=1), lambda: None)])
        prof.flush()
        clock.advance(0.01)
        prof.resolve_accepted(force=True)
        return next(c for c in prof.conns.values() if c.lport == 9100)

    first = held_inbound(66)
    assert first.inode == 66
    clock.advance(2)
    second = held_inbound(67)
    assert second.cid != first.cid
    read_late = clock.time() + 1
    prof.on_packet(Ev("eth9", read_late, socket.AF_INET, L, 9100, R, 40000, FIN, stamped=False))
    assert not second.local_fin
    # The new SYN through the capture (logged before the hold, with the kernel's time), then our FIN.
    prof.on_packet(Ev("eth9", clock.time(), socket.AF_INET, R, 40000, L, 9100, SYN))
    prof.on_packet(Ev("eth9", read_late, socket.AF_INET, L, 9100, R, 40000, FIN, stamped=False))
    assert second.local_fin


def test_counts_of_rules_that_could_not_be_moved_at_a_restart_count_for_the_job(env):
    """A kept connection whose rules an upgrade could not move: what they counted is logged as a
    leftover with a note, and counts in its job's totals; an unknown leftover counts for no job."""
    from profiler.firewall import Leftover
    prof, fw, procs, socks, sink, clock = env
    register(prof, procs, inodes={11})
    spec = RuleSpec("k1", "eth9", socket.AF_INET, L, 5000, R, 80, 100, "job#1")
    stranger = RuleSpec("left1", "eth9", socket.AF_INET, L, 5001, R, 80)
    prof.req_harvest_leftovers([Leftover(spec, Counters(1, 100, 2, 200), "not moved"),
                                Leftover(stranger, Counters(1, 7, 1, 8))])
    job = prof.jobs["job#1"]
    assert (job.harvested, job.harvested_in, job.harvested_out) == (1, 100, 200)
    assert [(r.cid, r.note) for r in sink.records][0] == ("k1", "not moved")


def test_harvested_records_are_kept_in_the_store_not_in_memory_and_survive_a_restart(tmp_path, monkeypatch):
    import sqlite3
    from profiler.store import StateStore
    fw, procs, socks, sink, clock = FakeFirewall(), FakeProcesses(), FakeSockets(), ListSink(), FakeClock()
    config = Config(interfaces=("eth9",), rules_threshold=1000, close_linger=1.0, sweep_interval=0.5)
    store = StateStore(str(tmp_path / "state.db"))
    prof = Profiler(config, fw, procs, socks, sink, clock, store=store)
    first, second = procs.add(100, inodes={11, 13}), procs.add(200, inodes={12})
    prof.req_start("job#1", 100, first.user, first.create_time)
    prof.req_start("job#1", 200, second.user, second.create_time)

    def connection(lport, inode, counters):
        open_conn(prof, socks, lport, inode)
        fw.counters[next(iter(fw.installed))] = counters
        close_conn(prof, socks, lport)
        prof.sweep()
        clock.advance(1.0)
        prof.sweep()
        prof.flush()

    connection(5000, 11, Counters(1, 100, 2, 200))
    connection(5001, 12, Counters(1, 101, 2, 201))
    job = prof.jobs["job#1"]
    assert job.records == [] and (job.harvested, job.harvested_in, job.harvested_out) == (2, 201, 401)
    assert store.record_totals() == {"job#1": (2, 201, 401)}
    assert prof.req_status()["jobs"]["job#1"]["harvested_connections"] == 2
    assert prof.req_metrics()["jobs"]["job#1"] == (201, 401)
    assert [(c["lport"], c["in_bytes"]) for c in prof.req_job("job#1")["connections"]] == [(5000, 100), (5001, 101)]
    # A record the store failed to take is still answered from the batch it has to write again.
    put_records = store.put_records

    def failing(records):
        if records:
            raise sqlite3.OperationalError("disk I/O error")
        put_records(records)

    with monkeypatch.context() as m:
        m.setattr(store, "put_records", failing)
        connection(5002, 13, Counters(1, 7, 1, 9))
    assert [r.lport for r in prof._new_records] == [5002] and store.record_totals()["job#1"][0] == 2
    assert [c["lport"] for c in prof.req_job("job#1")["connections"]] == [5000, 5001, 5002]
    ended = prof.req_end_process("job#1", 200, second.user, second.create_time)
    assert [(c["lport"], c["pid"], c["out_bytes"]) for c in ended["connections"]] == [(5001, 200, 201)]
    assert prof._new_records == [] and store.record_totals()["job#1"][0] == 3
    store.close()

    store = StateStore(str(tmp_path / "state.db"))
    again = Profiler(config, FakeFirewall(), procs, FakeSockets(), ListSink(), clock, store=store)
    again.restore(store.load())
    assert again.req_status()["jobs"]["job#1"]["harvested_connections"] == 3
    answer = again.req_end_job("job#1")
    assert [(c["lport"], c["in_bytes"], c["out_bytes"]) for c in answer["connections"]] == [
        (5000, 100, 200), (5001, 101, 201), (5002, 7, 9)]
    assert answer["totals"]["in_bytes"] == 208 and answer["totals"]["connections"] == 3
    assert store.record_totals() == {} and store.records_of("job#1") == []
    store.close()
