"""The capture's rules: mangle chains that copy each TCP SYN, FIN and RST of the watched interfaces
to an NFLOG group, which capture.py reads through libpcap ("nflog:<group>").

A mixin of IptablesFirewall (firewall.py), for the instance that looks after mangle.

Why not libpcap on the interface itself: a packet socket on a device gets a clone of every
packet the device sends (the kernel clones before the socket's filter can say no). With
1,500-byte packets that alone cost 11% of a veth's throughput here (paired iperf3 runs); an NFLOG
rule that only SYN, FIN and RST packets reach cost nothing measurable.

  mangle PREROUTING  -p tcp ! --tcp-flags FIN,SYN,RST NONE -j NETPROF_LOG_I
  NETPROF_LOG_I      -i <iface> -j NFLOG --nflog-group <group> --nflog-threshold 16
  mangle POSTROUTING (the same, -o) -> NETPROF_LOG_O

PREROUTING: inbound packets are seen where the interface's own capture saw them, before the
SYN hold in mangle INPUT. POSTROUTING: outbound ones after it, as the connection's socket
addresses them (before any SNAT). --nflog-threshold 16: the kernel hands over what it gathered
at 16 packets, or when the capture's flush timeout (10 ms) is up; without the threshold it
gathers up to 100 packets, and waits a second by default. How much of a packet is copied is the
capture's snapshot length, which libpcap asks the kernel for.
"""
import logging

from .chains import CAPTURE_REPAIRED, LOG_IN, LOG_OUT

log = logging.getLogger("netprofiler")

# How many packets the kernel may gather before handing them over in one read; the capture sets
# how long it may wait (capture.NFLOG_FLUSH_CS, 10 ms) instead of the kernel's second.
NFLOG_BATCH = 16

_HOOKS = ((LOG_IN, "PREROUTING", True), (LOG_OUT, "POSTROUTING", False))


class CaptureRules:
    def _log_rules(self, mangle):
        """Our two chains and their jumps, for the interfaces' NFLOG groups (none without groups)."""
        if not self.nflog_groups:
            return
        for chain, builtin, inbound in _HOOKS:
            mangle.table.create_chain(chain)
            for iface, group in self._log_targets(inbound):
                r = mangle.rule_cls()
                if iface == "any":
                    if inbound:
                        r.in_interface = "!lo"
                elif inbound:
                    r.in_interface = iface
                else:
                    r.out_interface = iface
                t = r.create_target("NFLOG")
                t.nflog_group, t.nflog_threshold = str(group), str(NFLOG_BATCH)
                mangle.chain(chain).append_rule(r)
            jump = mangle.rule_cls()
            jump.protocol = "tcp"
            jump.create_match("tcp").tcp_flags = ["!", "FIN,SYN,RST", "NONE"]
            jump.create_target(chain)
            mangle.chain(builtin).insert_rule(jump)

    def _log_targets(self, inbound):
        """(interface, group) of the rules of one direction. A packet on loopback passes both
        hooks: it is taken on its way out only, as libpcap on lo (or any) takes it once."""
        return [(iface, group) for iface, group in self.nflog_groups.items() if not (inbound and iface == "lo")]

    def _log_intact(self, mangle):
        """Whether the capture's chains hold one rule per interface and are jumped to once each."""
        names = {c.name for c in mangle.table.chains}
        for chain, builtin, inbound in _HOOKS:
            if chain not in names or mangle.jumps(chain) != ["NFLOG"] * len(self._log_targets(inbound)):
                return False
            jumps = mangle.jumps(builtin)
            # First: a rule of another program above ours could take the packets away.
            if jumps.count(chain) != 1 or jumps[0] != chain:
                return False
        return True

    def verify_capture(self):
        """Put the capture's rules back if another program changed them: without them no SYN, FIN
        or RST of the watched interfaces reaches the capture. Returns the fixes made."""
        fixes = []
        if not self.nflog_groups or self.table != "filter":
            return fixes
        for family in self.families:
            mangle = self._mangle(family)
            key = (family, "mangle")
            if self._committed.get(key) is not None and self._summary(key) == self._committed[key]:
                continue
            with self._cycle(mangle):
                if self._log_intact(mangle):
                    continue
                for chain, builtin, _ in _HOOKS:
                    for rule in mangle.chain(builtin).rules:
                        if rule.target and rule.target.name == chain:
                            mangle.chain(builtin).delete_rule(rule)
                    if mangle.table.is_chain(chain):
                        mangle.chain(chain).flush()
                        mangle.table.delete_chain(chain)
                self._log_rules(mangle)
            fixes.append(f"the {self._fname(family)} {CAPTURE_REPAIRED} by another program")
            log.warning("put back the %s capture rules in mangle (changed by another program); SYNs, FINs "
                        "and RSTs passed meanwhile were not seen", self._fname(family))
        return fixes
