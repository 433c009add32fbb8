"""BPF_PROG_TEST_RUN on the loaded programs of the lab's sled1 root: the
verdicts and the exact bytes encap, decap and the gateway produce for known
frames (docs/design.md, "The datapath" and "How it is proved").

tc_port_out is a SCHED_CLS program: it finds its port by skb->ifindex, so
each run passes a struct __sk_buff (UAPI linux/bpf.h) as ctx_in with only
`ifindex` set, at offset 40 -- the kernel accepts mark, priority,
ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size and
hwtstamp there and requires every other byte to be zero. The kernel looks
that ifindex up in the caller's network namespace, so runs happen inside
sled1's namespace (Lab.inside). What the kernel really does in a test run:
bpf_redirect() only records the target and the program's return value,
TC_ACT_REDIRECT (7), is reported as is -- nothing is sent; bpf_fib_lookup
works on sled1's real routes and neighbours (the skb's device is xde0_dp).
xdp_underlay returns XDP_REDIRECT (4) without redirecting.
"""
import ipaddress
import os
import struct

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

pytest.register_assert_rewrite("lab_fixture")
from lab_fixture import (  # noqa: E402
    BSVC_ADDR, G1_IP, G1_MAC, G2_IP, G2_MAC, GENEVE_PORT, GW_IP, GW_MAC, OUTSIDE, U1_ADDR,
    U2_ADDR, VNI, geneve, inner_icmp, inner_udp, malformed_cases, underlay_frame, valid_cases)
from xdectl import libbpf  # noqa: E402
from xdectl.datapath import Datapath  # noqa: E402

pytest_plugins = ["lab_fixture"]

TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
SKB_CTX_SIZE = 192               # sizeof(struct __sk_buff) in the UAPI header
SKB_IFINDEX_OFF = 40             # offsetof(struct __sk_buff, ifindex)
BSVC_MAC = "a8:40:25:77:77:77"
BSVC_VNI = 99


def mac(s):
    return bytes.fromhex(s.replace(":", ""))


def ip6(a):
    return ipaddress.IPv6Address(a).packed


class Runner:
    """Runs sled1's programs on frames, inside sled1's namespace."""

    def __init__(self, t):
        self.t = t
        self.root = t.lab.root("sled1")
        self.port_ifindex = t.ifindex("sled1", "xde0_dp")
        self.links = {  # outer (dst, src) MACs per underlay
            "u1": mac(t.mac("sw1", "sled1")) + mac(t.mac("sled1", "u1")),
            "u2": mac(t.mac("sw2", "sled1")) + mac(t.mac("sled1", "u2")),
        }
        self.mtu = next(p["mtu"] for p in t.xdectl_json("sled1", "list") if p["name"] == "xde0")

    def ctx(self, ifindex=None):
        c = bytearray(SKB_CTX_SIZE)
        struct.pack_into("<I", c, SKB_IFINDEX_OFF, ifindex or self.port_ifindex)
        return bytes(c)

    def run(self, prog, frame, ifindex=None):
        with self.t.lab.inside("sled1"):
            fd = Datapath(self.root).prog_fd(prog)
            try:
                ctx = self.ctx(ifindex) if prog.startswith("tc_") else None
                rc, out, _ = libbpf.test_run(fd, bytes(frame), ctx=ctx)
            finally:
                os.close(fd)
        return rc, out

    def tc(self, frame, ifindex=None):
        return self.run("tc_port_out", frame, ifindex)

    def xdp(self, frame):
        return self.run("xdp_underlay", frame)


@pytest.fixture(scope="module")
def runner(xlab):
    return Runner(xlab)


def g1_frame(l4, dst=G2_IP, tos=0, src_mac=G1_MAC, src=G1_IP, **ip):
    return bytes(Ether(src=src_mac, dst=GW_MAC) / IP(src=src, dst=dst, tos=tos, id=0x1234, **ip) / l4)


def expected_encap(frame, outer_macs, label, sport, dst6, vni, inner_dmac, tos):
    """The bytes docs/design.md, "Wire format", prescribes around `frame`."""
    n = len(frame)
    ip6hdr = struct.pack("!IHBB", (6 << 28) | (tos << 20) | label, n + 16, 17, 128) + \
        ip6(U1_ADDR) + ip6(dst6)
    udp = struct.pack("!HHHH", sport, GENEVE_PORT, n + 16, 0)
    gnv = bytes([0, 0]) + b"\x65\x58" + vni.to_bytes(3, "big") + b"\0"
    return outer_macs + b"\x86\xdd" + ip6hdr + udp + gnv + mac(inner_dmac) + frame[6:]


def check_entropy(label, sport):
    """label = hash & 0xfffff, sport = 0xc000 | (hash >> 16) & 0x3fff: non-zero,
    in RFC 8926's range, and the 4 bits they share agree."""
    assert label != 0
    assert 0xC000 <= sport <= 0xFFFF
    assert (label >> 16) & 0xF == sport & 0xF, (hex(label), hex(sport))


def split_encap(out):
    label = struct.unpack("!I", out[14:18])[0] & 0xFFFFF
    sport = struct.unpack("!H", out[54:56])[0]
    return label, sport


# --- tc_port_out: encapsulation ---------------------------------------------

@pytest.mark.parametrize("tos", [0, 0xB8, 0x2A])
def test_encap_exact_bytes_guest_to_guest(xlab, runner, tos):
    """ICMP echo from g1 to 10.0.0.2: TC_ACT_REDIRECT, and the output is
    outer Ethernet (a resolved next hop: sled1's u1 to sw1 or u2 to sw2),
    IPv6 (version 6, traffic class = inner TOS, flow label, payload length,
    UDP, hop limit 128, fd00:1::1 -> fd00:2::1), UDP (-> 6081, checksum 0),
    Geneve (00 00 65 58, VNI 10, 0) and the input frame with g2's MAC."""
    frame = g1_frame(ICMP(id=0x77, seq=1) / Raw(b"xde prog run"), tos=tos)
    xlab.resolve_underlay_neighbours(("sled1",))
    rc, out = runner.tc(frame)
    assert rc == TC_ACT_REDIRECT
    assert len(out) == len(frame) + 70
    assert out[:12] in runner.links.values(), \
        f"outer MACs {out[:12].hex()} are not a resolved underlay next hop"
    label, sport = split_encap(out)
    check_entropy(label, sport)
    assert out == expected_encap(frame, out[:12], label, sport, U2_ADDR, VNI, G2_MAC, tos)


def test_encap_exact_bytes_to_boundary_services(xlab, runner):
    """Off-VPC destination (route `ig`): to fd00:99::1 in VNI 99, inner
    destination MAC A8:40:25:77:77:77."""
    frame = g1_frame(ICMP(id=0x78) / Raw(b"outside"), dst=OUTSIDE)
    xlab.resolve_underlay_neighbours(("sled1",))
    rc, out = runner.tc(frame)
    assert rc == TC_ACT_REDIRECT
    assert out[:12] in runner.links.values()
    label, sport = split_encap(out)
    check_entropy(label, sport)
    assert out == expected_encap(frame, out[:12], label, sport, BSVC_ADDR, BSVC_VNI, BSVC_MAC, 0)


def test_encap_entropy_is_per_flow(xlab, runner):
    """The same frame gives the same bytes; 16 flows (UDP source ports) give
    16 different flow labels, each consistent with its UDP source port, and
    the kernel's FIB spreads them over both underlays."""
    xlab.resolve_underlay_neighbours(("sled1",))
    f = g1_frame(UDP(sport=40000, dport=53) / Raw(b"q"))
    assert runner.tc(f) == runner.tc(f)
    labels, links = set(), set()
    for sp in range(40000, 40016):
        rc, out = runner.tc(g1_frame(UDP(sport=sp, dport=53) / Raw(b"q")))
        assert rc == TC_ACT_REDIRECT
        label, sport = split_encap(out)
        check_entropy(label, sport)
        labels.add(label)
        links.add(out[:12])
    assert len(labels) == 16
    assert links == set(runner.links.values()), "all 16 flows chose the same underlay"


def forget_next_hops(runner):
    """Empty the datapath's memory of next hops seen resolved."""
    with runner.t.lab.inside("sled1"):
        dp = Datapath(runner.root)
        try:
            m = dp.maps()["nexthops"]
            for k in list(m.keys()):
                m.delete(k)
        finally:
            dp.close()


def test_encap_next_hop_unresolved(xlab, runner):
    """With the next hops' neighbour entries flushed and none seen resolved
    before, the program still encapsulates (everything but the outer MACs,
    which the kernel fills in when bpf_redirect_neigh resolves the next
    hop) and returns TC_ACT_REDIRECT."""
    for dev in ("u1", "u2"):
        xlab.ip("sled1", "-6", "neigh", "flush", "dev", dev)
    forget_next_hops(runner)
    try:
        frame = g1_frame(ICMP(id=0x79) / Raw(b"no neighbour"))
        rc, out = runner.tc(frame)
    finally:
        xlab.resolve_underlay_neighbours(("sled1",))
    assert rc == TC_ACT_REDIRECT
    label, sport = split_encap(out)
    assert out == expected_encap(frame, bytes(12), label, sport, U2_ADDR, VNI, G2_MAC, 0)


def test_encap_detours_around_an_unresolved_next_hop(xlab, runner):
    """The FIB picks, for one flow, a next hop whose neighbour entry is gone
    (a link that just came back) while the other underlay's was seen
    resolved: the frame leaves through the other underlay, with its MACs,
    counted as a detour. (The first such frame is also copied to the
    unresolved next hop, to keep the kernel resolving it.)"""
    xlab.resolve_underlay_neighbours(("sled1",))
    frame = g1_frame(UDP(sport=40404, dport=53) / Raw(b"detour"))
    rc, out = runner.tc(frame)        # resolved: its link, and the other's noted
    other = {runner.links["u1"]: "u2", runner.links["u2"]: "u1"}[out[:12]]
    for sp in range(40406, 40430):    # flows on both links: both noted as resolved
        runner.tc(g1_frame(UDP(sport=sp, dport=53) / Raw(b"q")))
    chosen = "u1" if other == "u2" else "u2"
    before = runner.t.xdectl_json("sled1", "stats", "xde0")["xde0"]["underlay_detours"]
    xlab.ip("sled1", "-6", "neigh", "flush", "dev", chosen)
    try:
        results = [runner.tc(frame) for _ in range(3)]
    finally:
        xlab.resolve_underlay_neighbours(("sled1",))
    after = runner.t.xdectl_json("sled1", "stats", "xde0")["xde0"]["underlay_detours"]
    label, sport = split_encap(out)
    for rc, o in results:
        assert rc == TC_ACT_REDIRECT
        assert o == expected_encap(frame, runner.links[other], label, sport, U2_ADDR, VNI,
                                   G2_MAC, 0), f"not through {other}: {o[:12].hex()}"
    assert after - before == 3


def test_encap_matches_the_wire(xlab, runner, tmp_path):
    """A frame g1 really sends (raw, so no socket hash rides along) leaves
    sled1 with exactly the bytes the test run predicts for it."""
    xlab.resolve_underlay_neighbours()
    frame = g1_frame(UDP(sport=42424, dport=4242) / Raw(b"predict me"), ttl=64)
    rc, predicted = runner.tc(frame)
    assert rc == TC_ACT_REDIRECT
    caps = {l: tmp_path / f"{l}.pcap" for l in ("u1", "u2")}
    with xlab.capture("sw1", "sled1", caps["u1"], "ip6 and udp port 6081"), \
            xlab.capture("sw2", "sled1", caps["u2"], "ip6 and udp port 6081"):
        xlab.send_frames("g1", "xde0", [frame])
    seen = [bytes(p) for l in caps for p in rdpcap(str(caps[l]))
            if b"predict me" in bytes(p) and bytes(p)[22:38] == ip6(U1_ADDR)]
    assert seen == [predicted], [s.hex() for s in seen]


# --- tc_port_out: gateway, MTU and drops --------------------------------------

def arp_request(tpa, spa=G1_IP, sha=G1_MAC):
    return bytes(Ether(src=sha, dst="ff:ff:ff:ff:ff:ff") /
                 ARP(op=1, hwsrc=sha, psrc=spa, hwdst="00:00:00:00:00:00", pdst=tpa))


@pytest.mark.parametrize("tpa", [GW_IP, G2_IP, "10.0.0.200"])
def test_gateway_arp_reply_exact(runner, tpa):
    """ARP for the gateway, or (proxy ARP) for another address of the VPC
    subnet: the reply, with the gateway MAC, hairpinned to the guest."""
    rc, out = runner.tc(arp_request(tpa))
    assert rc == TC_ACT_REDIRECT
    expect = (mac(G1_MAC) + mac(GW_MAC) + b"\x08\x06" +
              struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) +
              mac(GW_MAC) + bytes(map(int, tpa.split("."))) +
              mac(G1_MAC) + bytes(map(int, G1_IP.split("."))))
    assert out == expect


@pytest.mark.parametrize("tpa", [G1_IP, OUTSIDE])
def test_gateway_arp_other_targets_dropped(runner, tpa):
    """ARP for the guest's own address or beyond the subnet: dropped."""
    rc, _ = runner.tc(arp_request(tpa))
    assert rc == TC_ACT_SHOT


def test_gateway_echo_reply_exact(runner):
    """Echo request to the gateway IP: turned into the echo reply in place,
    with valid checksums, and hairpinned to the guest."""
    req = g1_frame(ICMP(type=8, id=0x4242, seq=7) / Raw(b"are you there"), dst=GW_IP)
    rc, out = runner.tc(req)
    assert rc == TC_ACT_REDIRECT
    r = Ether(req)
    expect = Ether(dst=G1_MAC, src=GW_MAC) / IP(src=GW_IP, dst=G1_IP, id=r[IP].id, ttl=r[IP].ttl,
                                                flags=r[IP].flags) / \
        ICMP(type=0, id=0x4242, seq=7) / Raw(b"are you there")
    assert out == bytes(expect)


def test_oversize_df_gets_frag_needed(xlab, runner):
    """A guest packet larger than the port MTU with DF set: ICMP
    "fragmentation needed" with the port MTU, from the gateway, back to the
    guest, quoting the packet's IP header and first 8 bytes."""
    big = g1_frame(UDP(sport=5555, dport=6666) / Raw(b"z" * (runner.mtu + 100 - 28)), flags="DF")
    before = xlab.port_stats("sled1")
    rc, out = runner.tc(big)
    after = xlab.port_stats("sled1")
    assert rc == TC_ACT_REDIRECT
    e = Ether(out)
    assert (e.dst, e.src) == (G1_MAC, GW_MAC)
    assert (e[IP].src, e[IP].dst, e[IP].proto) == (GW_IP, G1_IP, 1)
    assert (e[ICMP].type, e[ICMP].code, e[ICMP].nexthopmtu) == (3, 4, runner.mtu)
    quoted = bytes(e[ICMP].payload)
    assert quoted[:28] == big[14:42]
    fresh = Ether(out)
    del fresh[IP].chksum, fresh[ICMP].chksum
    redone = Ether(bytes(fresh))
    assert (e[IP].chksum, e[ICMP].chksum) == (redone[IP].chksum, redone[ICMP].chksum)
    assert e[IP].len == len(out) - 14
    assert after["mtu_icmp_sent"] - before["mtu_icmp_sent"] == 1


def test_oversize_without_df_dropped_and_counted(xlab, runner):
    big = g1_frame(UDP(sport=5555, dport=6666) / Raw(b"z" * (runner.mtu + 100 - 28)))
    before = xlab.port_stats("sled1")
    rc, _ = runner.tc(big)
    assert rc == TC_ACT_SHOT
    assert xlab.port_stats("sled1")["drop_out_mtu"] - before["drop_out_mtu"] == 1


@pytest.mark.parametrize("kind,frame,counter", [
    ("spoofed_mac", g1_frame(ICMP(), src_mac="a8:40:25:ff:00:66"), "drop_out_spoof"),
    ("spoofed_ip", g1_frame(ICMP(), src="10.0.0.66"), "drop_out_spoof"),
    ("no_v2p", g1_frame(ICMP(), dst="10.0.0.77"), "drop_out_no_v2p"),
    ("ipv6", bytes(Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src="fe80::1", dst="ff02::2") /
                   ICMPv6EchoRequest()), "drop_out_unsupported"),
], ids=["spoofed_mac", "spoofed_ip", "no_v2p", "ipv6"])
def test_tc_drops_counted(xlab, runner, kind, frame, counter):
    before = xlab.port_stats("sled1")
    rc, _ = runner.tc(frame)
    after = xlab.port_stats("sled1")
    assert rc == TC_ACT_SHOT
    assert after[counter] - before[counter] == 1
    assert after["encap"] == before["encap"]


def test_tc_unknown_port_dropped(xlab, runner):
    """A device that is not a port (sled1's u1): dropped, counted globally."""
    before = xlab.global_stats("sled1")
    rc, _ = runner.tc(g1_frame(ICMP()), ifindex=xlab.ifindex("sled1", "u1"))
    assert rc == TC_ACT_SHOT
    assert xlab.global_stats("sled1")["drop_out_unknown_port"] - before["drop_out_unknown_port"] == 1


# --- xdp_underlay: decapsulation ------------------------------------------------

def to_sled1(payload, **kw):
    return underlay_frame(payload, "02:00:00:00:00:01", "02:00:00:00:00:02", **kw)


def test_decap_exact_bytes(xlab, runner):
    """Geneve from sled2 for g1: XDP_REDIRECT, and the output is the inner
    frame exactly, its source MAC replaced by the gateway's."""
    inner = bytes(Ether(dst=G1_MAC, src=G2_MAC) / IP(src=G2_IP, dst=G1_IP) /
                  ICMP(type=0, id=9) / Raw(b"decap me"))
    before = xlab.port_stats("sled1")
    rc, out = runner.xdp(to_sled1(geneve() + inner, tc=0xB8, fl=0x12345))
    after = xlab.port_stats("sled1")
    assert rc == XDP_REDIRECT
    assert out == mac(G1_MAC) + mac(GW_MAC) + inner[12:]
    assert after["decap"] - before["decap"] == 1
    assert after["rx_packets"] - before["rx_packets"] == 1


@pytest.mark.parametrize("case", valid_cases(b"XDE-PR-"), ids=lambda c: c[0])
def test_decap_with_options_exact(runner, case):
    """Options (Oxide External/Multicast/MSS, unknown non-critical) are
    skipped: the output is the inner frame alone."""
    name, payload = case
    inner = inner_icmp(b"XDE-PR-" + name.encode())
    rc, out = runner.xdp(to_sled1(payload))
    assert rc == XDP_REDIRECT
    assert out == mac(G1_MAC) + mac(GW_MAC) + inner[12:]


@pytest.mark.parametrize("case", malformed_cases(b"XDE-PR-"), ids=lambda c: c[0])
def test_xdp_malformed_dropped_counted(xlab, runner, case):
    name, payload, counter = case
    before = xlab.global_stats("sled1")
    rc, _ = runner.xdp(to_sled1(payload))
    after = xlab.global_stats("sled1")
    assert rc == XDP_DROP
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert moved == {counter: 1}


def test_xdp_truncated_ipv6_payload_dropped(runner):
    """IPv6 payload length claiming more than the frame holds: truncated."""
    f = bytearray(to_sled1(geneve() + inner_udp(b"short")))
    struct.pack_into("!H", f, 18, struct.unpack_from("!H", f, 18)[0] + 100)
    rc, _ = runner.xdp(bytes(f))
    assert rc == XDP_DROP


@pytest.mark.parametrize("name,frame", [
    ("icmpv6_to_us", bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") /
                           IPv6(src=U2_ADDR, dst=U1_ADDR) / ICMPv6EchoRequest(data=b"ping"))),
    ("udp_6082_to_us", underlay_frame(geneve() + inner_udp(b"x"), "02:00:00:00:00:01",
                                      "02:00:00:00:00:02", dport=6082)),
    ("geneve_to_other_address", underlay_frame(geneve() + inner_udp(b"x"), "02:00:00:00:00:01",
                                               "02:00:00:00:00:02", dst="fd00:1::2")),
    ("ipv4", bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") /
                   IP(src="192.0.2.9", dst="192.0.2.10") / UDP(dport=GENEVE_PORT) / Raw(geneve()))),
    ("arp_broadcast", bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:02") /
                            ARP(psrc="192.0.2.9", pdst="192.0.2.10"))),
    ("ethernet_header_only", bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02",
                                         type=0x86DD))[:14]),
], ids=["icmpv6_to_us", "udp_6082_to_us", "geneve_to_other_address", "ipv4", "arp_broadcast",
        "ethernet_header_only"])
def test_xdp_not_for_us_passes_unchanged(xlab, runner, name, frame):
    before = xlab.global_stats("sled1")
    rc, out = runner.xdp(frame)
    after = xlab.global_stats("sled1")
    assert rc == XDP_PASS
    assert out == frame
    assert after["passed_to_host"] - before["passed_to_host"] == 1
