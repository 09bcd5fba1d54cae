"""parse_packet against frames built with dpkt, for every supported link type."""
import dataclasses
import random
import socket
import struct

import dpkt
import pytest
from dpkt.tcp import TH_ACK, TH_FIN, TH_PUSH, TH_RST, TH_SYN

from profiler.capture import BPF_FILTER, TcpEvent, parse_packet

SRC4, DST4 = "10.231.1.1", "10.231.1.2"
SRC6, DST6 = "fd00:231:1::1", "fd00:231:1::2"
MSS_OPT = b"\x02\x04\x05\xb4\x01\x03\x03\x07"  # MSS, NOP, window scale: a typical SYN


def tcp(flags=TH_SYN, sport=40000, dport=5201, payload=b"", opts=MSS_OPT):
    seg = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=1, opts=opts, data=payload)
    seg.off = (20 + len(opts)) // 4
    return seg


def ip4(seg, src=SRC4, dst=DST4, p=dpkt.ip.IP_PROTO_TCP, **kw):
    return dpkt.ip.IP(src=socket.inet_pton(socket.AF_INET, src),
                      dst=socket.inet_pton(socket.AF_INET, dst), p=p, ttl=64, data=seg, **kw)


def ip6(seg, src=SRC6, dst=DST6, nxt=dpkt.ip.IP_PROTO_TCP):
    return dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src),
                        dst=socket.inet_pton(socket.AF_INET6, dst),
                        nxt=nxt, hlim=64, plen=len(bytes(seg)), data=seg)


ETH_TYPE = {4: dpkt.ethernet.ETH_TYPE_IP, 6: dpkt.ethernet.ETH_TYPE_IP6}
MAC_A, MAC_B = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"


def vlan_tags(v, ids):
    tags = [dpkt.ethernet.VLANtag8021Q(id=i, type=dpkt.ethernet.ETH_TYPE_8021Q) for i in ids]
    tags[-1].type = ETH_TYPE[v]
    return tags


# name -> (datalink, wrap(ip_packet, version) -> frame bytes, link header length)
LINKS = {
    "en10mb": (1, lambda pkt, v: bytes(dpkt.ethernet.Ethernet(
        dst=MAC_B, src=MAC_A, type=ETH_TYPE[v], data=pkt)), 14),
    "en10mb-vlan": (1, lambda pkt, v: bytes(dpkt.ethernet.Ethernet(
        dst=MAC_B, src=MAC_A, vlan_tags=vlan_tags(v, [42]), data=pkt)), 18),
    "en10mb-qinq": (1, lambda pkt, v: bytes(dpkt.ethernet.Ethernet(
        dst=MAC_B, src=MAC_A, vlan_tags=vlan_tags(v, [7, 42]), data=pkt)), 22),
    "linux-sll": (113, lambda pkt, v: bytes(dpkt.sll.SLL(
        type=4, hrd=1, hlen=6, hdr=MAC_A + b"\0\0", ethtype=ETH_TYPE[v], data=pkt)), 16),
    "linux-sll2": (276, lambda pkt, v: bytes(dpkt.sll2.SLL2(
        ethtype=ETH_TYPE[v], intindex=3, hrd=1, type=0, hlen=6, hdr=MAC_A + b"\0\0",
        data=pkt)), 20),
    "raw-12": (12, lambda pkt, v: bytes(pkt), 0),
    "raw-101": (101, lambda pkt, v: bytes(pkt), 0),
    "null-native": (0, lambda pkt, v: bytes(dpkt.loopback.Loopback(
        family=socket.AF_INET if v == 4 else 30, data=pkt)), 4),   # 30: macOS AF_INET6
    "null-le": (0, lambda pkt, v: struct.pack("<I", 2 if v == 4 else 24) + bytes(pkt), 4),
    "null-be": (0, lambda pkt, v: struct.pack(">I", 2 if v == 4 else 28) + bytes(pkt), 4),
    "loop": (108, lambda pkt, v: struct.pack(">I", 2 if v == 4 else 24) + bytes(pkt), 4),
    "loop-linux-af": (108, lambda pkt, v: struct.pack(">I", 2 if v == 4 else 10) + bytes(pkt), 4),
}
IP = {4: (ip4, SRC4, DST4, socket.AF_INET, 20), 6: (ip6, SRC6, DST6, socket.AF_INET6, 40)}


def tlv(kind, value):
    """One NFLOG TLV: length (header included) and type in host byte order, padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def nflog(pkt, v, stamp=None):
    """What libpcap reads from an NFLOG group: family, version, group, then the TLVs the kernel
    sends (packet header, prefix, the timestamp in inbound hooks, interface) and last the packet."""
    return (struct.pack(">BBH", socket.AF_INET if v == 4 else socket.AF_INET6, 0, 7460)
            + tlv(1, struct.pack(">HBB", 0x0800 if v == 4 else 0x86DD, 0, 0))
            + tlv(10, b"np\0")
            + (tlv(3, struct.pack(">QQ", *stamp)) if stamp else b"")
            + tlv(5, struct.pack(">I", 3))
            + tlv(9, bytes(pkt)))


LINKS["nflog"] = (239, nflog, 4 + 8 + 8 + 8 + 4)


def test_nflog_time_is_the_kernel_s_when_the_message_has_it():
    pkt = ip4(tcp(TH_FIN | TH_ACK))
    inbound = parse_packet(239, nflog(pkt, 4, stamp=(1_800_000_000, 250_000)), "if0", 1_900_000_000.0)
    assert (inbound.ts, inbound.stamped) == (1_800_000_000.25, True)
    outbound = parse_packet(239, nflog(pkt, 4), "if0", 1_900_000_000.0)     # libpcap's time of reading
    assert (outbound.ts, outbound.stamped) == (1_900_000_000.0, False)
    assert parse_packet(1, frame("en10mb", 4, tcp(TH_SYN))[1], "if0", 5.0).stamped


def frame(link, v, seg):
    datalink, wrap, _ = LINKS[link]
    return datalink, wrap(IP[v][0](seg), v)


@pytest.mark.parametrize("v", [4, 6])
@pytest.mark.parametrize("link", sorted(LINKS))
def test_every_link_type_and_family(link, v):
    datalink, data = frame(link, v, tcp(TH_SYN, 40000, 5201, payload=b"x" * 30))
    _, src, dst, family, _ = IP[v]
    ev = parse_packet(datalink, data, "eth7", 1700000000.25)
    # An NFLOG message without the kernel's timestamp keeps libpcap's, and says so.
    assert ev == TcpEvent("eth7", 1700000000.25, family, src, 40000, dst, 5201, TH_SYN, link != "nflog")


@pytest.mark.parametrize("flags, expect", [
    (TH_SYN, dict(syn=True, ack=False, fin=False, rst=False)),
    (TH_SYN | TH_ACK, dict(syn=True, ack=True, fin=False, rst=False)),
    (TH_FIN | TH_ACK, dict(syn=False, ack=True, fin=True, rst=False)),
    (TH_RST, dict(syn=False, ack=False, fin=False, rst=True)),
    (TH_RST | TH_ACK, dict(syn=False, ack=True, fin=False, rst=True)),
    (TH_PUSH | TH_ACK, dict(syn=False, ack=True, fin=False, rst=False)),
    (0xFF, dict(syn=True, ack=True, fin=True, rst=True)),
])
@pytest.mark.parametrize("v", [4, 6])
def test_flag_decoding(v, flags, expect):
    datalink, data = frame("en10mb", v, tcp(flags))
    ev = parse_packet(datalink, data, "eth0", 0.0)
    assert ev.flags == flags
    assert {k: getattr(ev, k) for k in expect} == expect


def test_ns_bit_is_not_part_of_the_flags_byte():
    seg = tcp(TH_SYN)
    seg.flags = 0x100 | TH_SYN | TH_ACK  # NS sits in the byte before; flags is one byte
    ev = parse_packet(12, bytes(ip4(seg)), "tun0", 0.0)
    assert ev.flags == TH_SYN | TH_ACK


def test_addresses_are_in_compressed_form():
    seg = tcp()
    ev = parse_packet(12, bytes(ip6(seg, src="fd00:0231:0000::0002", dst="FD00:231:0:0:0:0:0:1")), "x", 0)
    assert (ev.src, ev.dst) == ("fd00:231::2", "fd00:231::1")


def test_event_is_frozen_and_hashable():
    ev = parse_packet(*frame("raw-12", 4, tcp()), "tun0", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.flags = 0
    assert len({ev, dataclasses.replace(ev)}) == 1


def test_ipv6_extension_header_before_tcp_is_parsed():
    seg = tcp(TH_FIN | TH_ACK)
    hop = b"\x06\x00" + b"\x01\x04\x00\x00\x00\x00"  # hop-by-hop: next=TCP, PadN
    pkt = ip6(seg, nxt=0)
    raw = bytearray(bytes(pkt))
    raw[4:6] = struct.pack(">H", len(hop) + len(bytes(seg)))
    data = bytes(raw[:40]) + hop + bytes(raw[40:])
    ev = parse_packet(12, data, "tun0", 0.0)
    assert (ev.src, ev.dport, ev.fin) == (SRC6, 5201, True)


@pytest.mark.parametrize("datalink, data", [
    (1, bytes(dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP,
                                     data=ip4(dpkt.udp.UDP(sport=53, dport=53, data=b"q"),
                                              p=dpkt.ip.IP_PROTO_UDP)))),
    (1, bytes(dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_ARP, data=dpkt.arp.ARP()))),
    (12, bytes(ip4(dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=1)),
                   p=dpkt.ip.IP_PROTO_ICMP))),
    (12, bytes(ip6(dpkt.icmp6.ICMP6(type=128, data=b"\0" * 8), nxt=dpkt.ip.IP_PROTO_ICMP6))),
    (105, bytes(ip4(tcp()))),                        # 802.11: unsupported link type
    (1, b""), (12, b""), (0, b""), (113, b""), (276, b""),
    (12, b"\x00" * 60),                              # version 0
    (12, b"\xff" * 60),
    (0, struct.pack("<I", 7) + bytes(ip4(tcp()))),   # unknown address family
])
def test_non_tcp_and_garbage_return_none(datalink, data):
    assert parse_packet(datalink, data, "if0", 0.0) is None


def test_later_ipv4_fragment_is_not_tcp():
    pkt = ip4(tcp(), offset=185 * 8)  # fragment at byte 1480: the bytes there are not a TCP header
    assert parse_packet(12, bytes(pkt), "if0", 0.0) is None


def test_ethertype_and_version_disagree():
    datalink, data = frame("en10mb", 6, tcp())
    data = data[:12] + struct.pack(">H", dpkt.ethernet.ETH_TYPE_IP) + data[14:]
    assert parse_packet(datalink, data, "if0", 0.0) is None


@pytest.mark.parametrize("field, value", [("ihl", 4), ("tcp_off", 3)])
def test_impossible_header_lengths(field, value):
    raw = bytearray(bytes(ip4(tcp())))
    if field == "ihl":
        raw[0] = 0x40 | value
    else:
        raw[20 + 12] = value << 4
    assert parse_packet(12, bytes(raw), "if0", 0.0) is None


@pytest.mark.parametrize("v", [4, 6])
@pytest.mark.parametrize("link", sorted(LINKS))
def test_truncation(link, v):
    """Cut anywhere before the end of the fixed TCP header: None.  Beyond
    (TCP options or payload cut by the snaplen): the full event."""
    datalink, data = frame(link, v, tcp(TH_SYN | TH_ACK, payload=b"p" * 40))
    needed = LINKS[link][2] + IP[v][4] + 20
    full = parse_packet(datalink, data, "if0", 5.0)
    assert full is not None
    for n in range(len(data) + 1):
        got = parse_packet(datalink, data[:n], "if0", 5.0)
        assert got == (full if n >= needed else None), n


@pytest.mark.parametrize("link", sorted(LINKS))
def test_mutated_frames_never_raise(link):
    rng = random.Random(link)
    for v in (4, 6):
        datalink, data = frame(link, v, tcp(TH_SYN))
        for _ in range(1500):
            buf = bytearray(data[:rng.randint(0, len(data))])
            for _ in range(rng.randint(1, 6)):
                if buf:
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
            got = parse_packet(datalink, bytes(buf), "if0", 0.0)
            assert got is None or isinstance(got, TcpEvent)


def test_random_bytes_never_raise():
    rng = random.Random(7)
    for _ in range(3000):
        buf = rng.randbytes(rng.randint(0, 140))
        for datalink in (0, 1, 12, 101, 108, 113, 239, 276):
            got = parse_packet(datalink, buf, "if0", 0.0)
            assert got is None or isinstance(got, TcpEvent)


def test_filter_compiles_for_every_live_link_type():
    pcapy = pytest.importorskip("pcapy")
    for datalink in (0, 1, 12, 108, 113):
        pcapy.compile(datalink, 128, BPF_FILTER, 1, 0)


def test_nflog_without_its_payload_or_with_a_broken_tlv_is_not_an_event():
    pkt = bytes(ip4(tcp(TH_FIN | TH_ACK)))
    header = struct.pack(">BBH", socket.AF_INET, 0, 7460)
    assert parse_packet(239, header + tlv(10, b"np\0") + tlv(9, pkt), "if0", 1.0).flags == TH_FIN | TH_ACK
    assert parse_packet(239, header + tlv(10, b"np\0"), "if0", 1.0) is None
    assert parse_packet(239, header + struct.pack("=HH", 2, 10) + tlv(9, pkt), "if0", 1.0) is None
