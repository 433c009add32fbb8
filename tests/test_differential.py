"""Differential tests (docs/design.md, "How it is proved"): the reference
model in tests/model (written from docs/design.md, not from bpf/) must agree
with the real loaded programs, run with BPF_PROG_TEST_RUN on sled1 of the
session's lab (with the extra state of tests/model/setup.py, taken away
again at the end), on frames generated
with hypothesis: verdict (return code), counter deltas (per-CPU counters
summed, read before and after each frame) and output bytes (the gateway's
replies byte for byte, the flow label and UDP source port of encapsulated
frames from the instance's hash seed).

Both families: IPv4 and IPv6 (extension headers, fragments, link-scoped
traffic), the gateway's DHCPv4, DHCPv6 and neighbour discovery, valid,
edge and malformed, from the guest and inside Geneve.

Each case starts from an empty flow table (the LRU map `flows` is
cleared), so the firewall is modelled exactly; sequences of two or three
frames check its state (replies of an allowed flow, External frames).

The datapath bugs these tests found (B1-B6 in the IPv4 datapath, B7-B16
in the IPv6 and gateway datapath) are fixed; their inputs stay below as
regression tests, each with a minimal frame, and tests/model/gen.py
known_bug() is where an input of a new, known bug would be set aside. The
tests without the lab check the model on its own: its replies are
well-formed protocol messages.
"""
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from frames import G1_IP, G1_IP6, G1_MAC, G2_IP6, G2_MAC, GW_IP, GW_LL, GW_MAC, mac
from model import gen, setup, xde
from model.compare import compare
from model.gen import eth6, ext_hdr, geneve, icmp6, ip6_packet, udp6, underlay
from model.harness import SledRunner, next_hops, run_case
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import (DUID_LL, DHCP6_Confirm, DHCP6_Rebind, DHCP6_Release,
                                DHCP6_Renew, DHCP6_Request, DHCP6_Solicit, DHCP6OptClientId,
                                DHCP6OptElapsedTime, DHCP6OptIA_NA, DHCP6OptIAAddress,
                                DHCP6OptRapidCommit, DHCP6OptServerId)
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6MLReport2, ICMPv6ND_NA, ICMPv6ND_NS,
                                ICMPv6ND_RS, ICMPv6NDOptSrcLLAddr, IPv6, IPv6ExtHdrHopByHop,
                                RouterAlert)
from scapy.layers.l2 import ARP, Ether


@pytest.fixture(scope="module")
def dlab(xlab):
    lab = xlab.lab
    xlab.reset()            # the lab as built, next hops resolved
    runner = None
    try:
        setup.install(lab)
        runner = SledRunner(lab)
        inst = runner.instance()
        port = next(i for i, p in inst.ports.items() if p.name == "xde0")
        yield runner, inst, next_hops(lab), port
    finally:
        if runner is not None:
            runner.close()
        setup.uninstall(lab)
        xlab.reset()


@pytest.fixture(scope="module")
def dlab3(xlab):
    """sled2's xde3, g3's port: IPv6 only, VNI 11 (its guest's and g2's DHCP
    clients stopped meanwhile: sled2's counters must move by our frames
    only)."""
    lab = xlab.lab
    runner = None
    try:
        for g in ("g2", "g3"):
            setup._quiet(lab, g)
        runner = SledRunner(lab, "sled2")
        inst = runner.instance()
        port = next(i for i, p in inst.ports.items() if p.name == "xde3")
        yield runner, inst, next_hops(lab, "sled2"), port
    finally:
        if runner is not None:
            runner.clear_flows()        # all it changed of sled2
            runner.close()
        for g in ("g2", "g3"):
            setup._resume(lab, g)


def check(dlab, steps, allow_known=False):
    runner, inst, hops, port = dlab
    bad = run_case(runner, inst, steps, hops, port)
    report = []
    for i, ms, res in bad:
        if not allow_known and gen.known_bug(*steps[i]):
            continue
        report.append(f"step {i} ({steps[i][0]}) {steps[i][1].hex()}\n"
                      f"  model: {res.verdict} {res.reason} {res.counters}\n  " + "\n  ".join(ms))
    assert not report, "datapath and model disagree:\n" + "\n".join(report)


def _not_known(steps):
    return not any(gen.known_bug(d, f) for d, f in steps)


SETTINGS = dict(database=None, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck))


@settings(max_examples=3000, **SETTINGS)
@given(kind=st.sampled_from(gen.OUT_KINDS), seed=st.integers(0, 2**32))
def test_outbound(dlab, kind, seed):
    steps = gen.case("out", kind, seed)
    if not _not_known(steps):
        return
    check(dlab, steps)


@settings(max_examples=1000, **SETTINGS)
@given(kind=st.sampled_from(gen.OUT_KINDS), seed=st.integers(0, 2**32))
def test_outbound_ipv6_only_port(dlab3, kind, seed):
    """The outbound cases as g3 sends them, into a port without IPv4: its
    DHCPv4, ARP and IPv4 go nowhere, its IPv6 as g1's."""
    steps = gen.as_port(gen.case("out", kind, seed))
    if not steps or not _not_known(steps):
        return
    check(dlab3, steps)


@settings(max_examples=1500, **SETTINGS)
@given(kind=st.sampled_from(gen.IN_KINDS), seed=st.integers(0, 2**32))
def test_inbound(dlab, kind, seed):
    steps = gen.case("in", kind, seed)
    if not _not_known(steps):
        return
    check(dlab, steps)


@settings(max_examples=1000, **SETTINGS)
@given(kind=st.sampled_from(gen.SEQ_KINDS), seed=st.integers(0, 2**32))
def test_stateful_sequences(dlab, kind, seed):
    steps = gen.case("seq", kind, seed)
    if not _not_known(steps):
        return
    check(dlab, steps)


@settings(max_examples=300, **SETTINGS)
@given(seed=st.integers(0, 2**32), data=st.data())
def test_geneve_truncated_at_every_offset(dlab, seed, data):
    """A valid Geneve frame (options included) cut at any offset."""
    import random
    r = random.Random(seed)
    f = gen.underlay(r, gen.geneve(opts=gen._options(r)) + gen.inner_frame(r))
    cut = data.draw(st.integers(0, len(f) - 1))
    check(dlab, [("in", f[:cut])])


def test_truncation_sweep(dlab):
    """Every offset of one Geneve frame with all three Oxide options."""
    import random
    r = random.Random(6)
    opts = (gen.geneve_opt(gen.OXIDE, 0) + gen.geneve_opt(gen.OXIDE, 1, b"\0" * 4) +
            gen.geneve_opt(gen.OXIDE, 2, struct.pack("!I", 1400)))
    f = gen.underlay(r, gen.geneve(opts=opts) + gen.inner_frame(r, proto=1, n=16))
    for cut in range(len(f) + 1):
        check(dlab, [("in", f[:cut])])


def test_model_can_fail(dlab):
    """The comparison is not vacuous: a model told the wrong counter fails."""
    runner, inst, hops, port = dlab
    frame = bytes(Ether(src=gen.G1_MAC, dst=gen.GW_MAC) / IP(src="10.0.0.66", dst=gen.G2_IP) / ICMP())
    res = xde.outbound(inst, port, frame)
    rc, out, delta = runner.run("out", frame, port, ports=[port])
    assert compare(res, frame, rc, out, delta, hops) == []
    res.counters = {(port, "drop_out_no_v2p"): 1}
    assert compare(res, frame, rc, out, delta, hops)


# --- datapath bugs these tests found (B1-B6), fixed: they stay as regressions ----

G1E = Ether(src=gen.G1_MAC, dst=gen.GW_MAC)


# B1 (fixed)
@pytest.mark.parametrize("ip", [dict(flags="MF"), dict(frag=5)], ids=["first", "later"])
def test_bug_gateway_echo_fragment(dlab, ip):
    check(dlab, [("out", bytes(G1E / IP(src=gen.G1_IP, dst=gen.GW_IP, proto=1, **ip) /
                                 ICMP(id=5) / b"fragment"))], allow_known=True)


# B2 (fixed)
@pytest.mark.parametrize("field", ["version", "len_long", "len_short"])
def test_bug_outbound_ipv4_not_validated(dlab, field):
    f = bytearray(bytes(G1E / IP(src=gen.G1_IP, dst=gen.G2_IP) / UDP(sport=1, dport=2) / b"x"))
    if field == "version":
        f[14] = 0x55
    elif field == "len_long":
        struct.pack_into("!H", f, 16, 400)
    else:
        struct.pack_into("!H", f, 16, 10)
    check(dlab, [("out", bytes(f))], allow_known=True)


# B3 (fixed)
@pytest.mark.parametrize("what", ["trailer"])
def test_bug_decap_trailing_bytes(dlab, what):
    import random
    r = random.Random(3)
    f = gen.underlay(r, gen.geneve() + gen.inner_frame(r, proto=1, n=8))
    if what == "trailer":
        f += b"\xee" * 8
    else:
        f = bytearray(f)
        struct.pack_into("!H", f, 58, struct.unpack_from("!H", f, 58)[0] + 6)
        f = bytes(f)
    check(dlab, [("in", f)], allow_known=True)


# B4 (fixed)
def test_bug_inner_ipv4_truncated(dlab):
    import random
    r = random.Random(4)
    inner = gen.inner_frame(r, proto=17, n=8)[:24]
    check(dlab, [("in", gen.underlay(r, gen.geneve() + inner))], allow_known=True)


# B5 (fixed)
def test_bug_arp_foreign_ethernet_source(dlab):
    f = bytes(Ether(src="a8:40:25:ff:00:66", dst="ff:ff:ff:ff:ff:ff") /
              ARP(hwsrc=gen.G1_MAC, psrc=gen.G1_IP, pdst=gen.GW_IP))
    check(dlab, [("out", f)], allow_known=True)


# B6 (fixed)
def test_bug_option_body_past_packet(dlab):
    import random
    r = random.Random(5)
    g = gen.geneve(optlen=8, opts=gen.geneve_opt(0x0102, 0x01, b"\0" * 28)[:4])
    check(dlab, [("in", gen.underlay(r, g + b"\0" * 6))], allow_known=True)


# --- the gateway and IPv6, one frame each (the generators draw around these) ----------

G1_LL = gen.G1_LL
BCAST = "ff:ff:ff:ff:ff:ff"
DHCP6_DST = dict(src=G1_LL, dst="ff02::1:2", hlim=1)
CLIENT = DHCP6OptClientId(duid=DUID_LL(lladdr=gen.G1_MAC))
OURS = DHCP6OptServerId(duid=DUID_LL(lladdr=GW_MAC))
OTHER = DHCP6OptServerId(duid=DUID_LL(lladdr="a8:40:25:00:00:99"))


def _dhcp4(mtype, flags=0, dst="255.255.255.255", chaddr=G1_MAC, **opts):
    return (Ether(src=G1_MAC, dst=BCAST) / IP(src="0.0.0.0", dst=dst) / UDP(sport=68, dport=67) /
            BOOTP(chaddr=mac(chaddr), xid=0x1234abcd, flags=flags) /
            DHCP(options=[("message-type", mtype), *opts.items(), "end"]))


def _dhcp6(msg, **ip):
    return (Ether(src=G1_MAC, dst="33:33:00:01:00:02") / IPv6(**{**DHCP6_DST, **ip}) /
            UDP(sport=546, dport=547) / msg)


def _icmp6(body, src=G1_LL, dst=GW_LL, hlim=255, dmac=GW_MAC):
    return Ether(src=G1_MAC, dst=dmac) / IPv6(src=src, dst=dst, hlim=hlim) / body


GATEWAY_CASES = {
    "dhcp4_discover": _dhcp4("discover"),
    "dhcp4_discover_broadcast": _dhcp4("discover", flags=0x8000),
    "dhcp4_request": _dhcp4("request", requested_addr=G1_IP, server_id=GW_IP),
    "dhcp4_request_broadcast": _dhcp4("request", flags=0x8000, requested_addr=G1_IP),
    "dhcp4_renewal_to_gateway": _dhcp4("request", dst=GW_IP),
    "dhcp4_release": _dhcp4("release"),
    "dhcp4_inform": _dhcp4("inform"),
    "dhcp4_other_chaddr": _dhcp4("discover", chaddr="a8:40:25:ff:00:66"),
    "dhcp6_solicit": _dhcp6(DHCP6_Solicit(trid=0x123456) / DHCP6OptElapsedTime() / CLIENT /
                            DHCP6OptIA_NA(iaid=7)),
    "dhcp6_solicit_rapid": _dhcp6(DHCP6_Solicit(trid=0x654321) / CLIENT / DHCP6OptRapidCommit() /
                                  DHCP6OptIA_NA(iaid=0x01020304)),
    "dhcp6_solicit_from_global": _dhcp6(DHCP6_Solicit(trid=1) / CLIENT / DHCP6OptIA_NA(iaid=1),
                                        src=G1_IP6),
    "dhcp6_solicit_no_client_id": _dhcp6(DHCP6_Solicit(trid=2) / DHCP6OptIA_NA(iaid=1)),
    "dhcp6_solicit_naming_server": _dhcp6(DHCP6_Solicit(trid=2) / CLIENT / OURS),
    "dhcp6_request": _dhcp6(DHCP6_Request(trid=0xabcdef) / CLIENT / OURS /
                            DHCP6OptIA_NA(iaid=9, ianaopts=[DHCP6OptIAAddress(addr=G1_IP6)])),
    "dhcp6_request_no_ia": _dhcp6(DHCP6_Request(trid=3) / CLIENT / OURS),
    "dhcp6_request_other_server": _dhcp6(DHCP6_Request(trid=4) / CLIENT / OTHER /
                                         DHCP6OptIA_NA(iaid=9)),
    "dhcp6_confirm": _dhcp6(DHCP6_Confirm(trid=5) / CLIENT /
                            DHCP6OptIA_NA(iaid=9, ianaopts=[DHCP6OptIAAddress(addr=G1_IP6)])),
    "dhcp6_renew": _dhcp6(DHCP6_Renew(trid=6) / CLIENT / OURS / DHCP6OptIA_NA(iaid=9)),
    "dhcp6_rebind": _dhcp6(DHCP6_Rebind(trid=7) / CLIENT / DHCP6OptIA_NA(iaid=9)),
    "dhcp6_release": _dhcp6(DHCP6_Release(trid=8) / CLIENT / OURS / DHCP6OptIA_NA(iaid=9)),
    "dhcp6_from_547": (Ether(src=G1_MAC, dst="33:33:00:01:00:02") / IPv6(**DHCP6_DST) /
                       UDP(sport=547, dport=547) / DHCP6_Solicit(trid=9) / CLIENT),
    "rs": _icmp6(ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(lladdr=G1_MAC), dst="ff02::2",
                 dmac="33:33:00:00:00:02"),
    "rs_unspecified": _icmp6(ICMPv6ND_RS(), src="::", dst="ff02::2", dmac="33:33:00:00:00:02"),
    "rs_hop_limit_64": _icmp6(ICMPv6ND_RS(), dst="ff02::2", hlim=64),
    "ns_gateway": _icmp6(ICMPv6ND_NS(tgt=GW_LL) / ICMPv6NDOptSrcLLAddr(lladdr=G1_MAC),
                         dst="ff02::1:ff00:1", dmac="33:33:ff:00:00:01"),
    "ns_gateway_unicast": _icmp6(ICMPv6ND_NS(tgt=GW_LL) / ICMPv6NDOptSrcLLAddr(lladdr=G1_MAC)),
    "ns_gateway_dad": _icmp6(ICMPv6ND_NS(tgt=GW_LL), src="::", dst="ff02::1:ff00:1"),
    "ns_own_dad": _icmp6(ICMPv6ND_NS(tgt=G1_IP6), src="::", dst="ff02::1:ff00:1"),
    "ns_peer": _icmp6(ICMPv6ND_NS(tgt=G2_IP6) / ICMPv6NDOptSrcLLAddr(lladdr=G1_MAC),
                      src=G1_IP6, dst="ff02::1:ff00:2"),
    "na_unsolicited": _icmp6(ICMPv6ND_NA(tgt=G1_IP6, R=0, S=0, O=1), src=G1_LL, dst="ff02::1"),
    "echo6_gateway": _icmp6(ICMPv6EchoRequest(id=0x77, seq=3, data=b"x" * 32), hlim=64),
    "echo6_gateway_from_global": _icmp6(ICMPv6EchoRequest(id=1, data=b"y"), src=G1_IP6, hlim=64),
    "echo6_other_link_local": _icmp6(ICMPv6EchoRequest(id=1), dst="fe80::1", hlim=64),
    "mld_report": (Ether(src=G1_MAC, dst="33:33:00:00:00:16") /
                   IPv6(src=G1_LL, dst="ff02::16", hlim=1) /
                   IPv6ExtHdrHopByHop(options=[RouterAlert()]) / ICMPv6MLReport2()),
    "udp6_to_g2": (Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=G1_IP6, dst=G2_IP6, tc=0xb8, fl=5) /
                   UDP(sport=4000, dport=5000) / b"hello"),
    "udp6_spoofed": (Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src="fd00:10::66", dst=G2_IP6) /
                     UDP(sport=4000, dport=5000)),
    "udp6_too_big": (Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=G1_IP6, dst=G2_IP6) /
                     UDP(sport=4000, dport=5000) / (b"z" * 1460)),
    "udp6_off_vpc": (Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=G1_IP6, dst="2001:4860::8888") /
                     UDP(sport=4000, dport=53)),
}


@pytest.mark.parametrize("name", list(GATEWAY_CASES))
def test_gateway_and_ipv6(dlab, name):
    check(dlab, [("out", bytes(GATEWAY_CASES[name]))])


def test_inbound_ipv6_echo_and_ndp(dlab):
    """From g2: an echo request in (firewall: ICMPv6 allowed), a router
    advertisement (never from the overlay), link-local (never either)."""
    r = random.Random(7)
    for icmp_type, src, dst in ((128, G2_IP6, G1_IP6), (134, "fe80::2", "ff02::1"),
                                (129, "fe80::2", G1_LL)):
        inner = gen.inner6_frame(r, src=src, dst=dst, proto=58, icmp_type=icmp_type, n=8)
        check(dlab, [("in", underlay(r, geneve() + inner))])


# --- datapath bugs B7-B16 (IPv6 and the gateway), fixed: minimal frames ---------------

def _bug(dlab, steps):
    check(dlab, steps)


def _from_g2(pkt):
    return ("in", underlay(random.Random(1), geneve() + eth6(pkt, src=G2_MAC, dst=G1_MAC)))


def test_bug_b7_extension_header_past_1023(dlab):
    """g2's UDP to g1's port 53 is denied by g1's inbound rules (setup.py);
    behind a 1,024-byte destination options header the datapath reads the
    ports at offset 40 again (the header itself) and lets it in."""
    r = random.Random(1)
    pkt = ip6_packet(G2_IP6, G1_IP6, 17, udp6(G2_IP6, G1_IP6, 4000, 53, b"q"),
                     [ext_hdr(r, 60, words=127)])
    _bug(dlab, [_from_g2(pkt)])


def test_bug_b8_extension_header_cut_short(dlab):
    """A hop-by-hop header declaring 16 bytes, of which the packet holds 8."""
    hbh = ext_hdr(random.Random(1), 0, words=1)
    _bug(dlab, [("out", eth6(ip6_packet(G1_IP6, G2_IP6, 17, b"", [(0, hbh[1][:8])])))])


@pytest.mark.parametrize("frame", ["rs", "udp6", "udp4"])
def test_bug_b9_headers_past_the_packet(dlab, frame):
    """rs: a router solicitation whose payload length holds 2 bytes of its
    ICMPv6 header (the rest follows as trailer) is answered; udp6/udp4: the
    ports of a UDP header cut by the IP length are read from the trailer
    (the flow hash differs)."""
    if frame == "rs":
        pkt = bytearray(ip6_packet(G1_LL, "ff02::2", 58, icmp6(G1_LL, "ff02::2", 133, 0, bytes(4)),
                                   hlim=255))
        pkt[4:6] = b"\x00\x02"
        f = eth6(bytes(pkt), dst="33:33:00:00:00:02")
    elif frame == "udp6":
        pkt = bytearray(ip6_packet(G1_IP6, G2_IP6, 17, udp6(G1_IP6, G2_IP6, 4000, 5000, b"")))
        pkt[4:6] = b"\x00\x04"
        f = eth6(bytes(pkt))
    else:
        f = bytearray(bytes(Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP, dst=gen.G2_IP) /
                            UDP(sport=4000, dport=5000)))
        struct.pack_into("!H", f, 16, 24)
        f[24:26] = b"\0\0"
        f[24:26] = struct.pack("!H", xde.csum(bytes(f[14:34])))
        f = bytes(f)
    _bug(dlab, [("out", f)])


def test_bug_b10_echo6_fragment(dlab):
    pkt = ip6_packet(G1_LL, GW_LL, 58, icmp6(G1_LL, GW_LL, 128, 0, b"\0\1\0\1fragment"),
                     [ext_hdr(random.Random(1), 44, frag=(0, 1))])
    _bug(dlab, [("out", eth6(pkt))])


@pytest.mark.parametrize("frag", [(0, 0), (0, 1)], ids=["atomic", "first"])
def test_bug_b11_ndp_fragment(dlab, frag):
    body = bytes(4) + xde.ipaddress.IPv6Address(GW_LL).packed + b"\x01\x01" + mac(G1_MAC)
    pkt = ip6_packet(G1_LL, GW_LL, 58, icmp6(G1_LL, GW_LL, 135, 0, body),
                     [ext_hdr(random.Random(1), 44, frag=frag)], hlim=255)
    _bug(dlab, [("out", eth6(pkt))])


def test_bug_b12_dhcp6_fragment(dlab):
    msg = bytes(DHCP6_Solicit(trid=1) / CLIENT / DHCP6OptIA_NA(iaid=1))
    src, dst = G1_LL, "ff02::1:2"
    pkt = ip6_packet(src, dst, 17, udp6(src, dst, 546, 547, msg),
                     [ext_hdr(random.Random(1), 44, frag=(0, 1))], hlim=1)
    _bug(dlab, [("out", eth6(pkt, dst="33:33:00:01:00:02"))])


def test_bug_b13_dhcp6_iaid_zero(dlab):
    _bug(dlab, [("out", bytes(_dhcp6(DHCP6_Solicit(trid=1) / CLIENT / DHCP6OptIA_NA(iaid=0) /
                                     DHCP6OptIA_NA(iaid=5))))])


@pytest.mark.parametrize("family", [4, 6])
def test_bug_b14_same_host_flow_hit(dlab, family):
    """g1 to its own address: same-host delivery into xde0, whose inbound
    rules are walked after its outbound ones."""
    if family == 4:
        f = Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP, dst=G1_IP) / UDP(sport=1, dport=2)
    else:
        f = Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=G1_IP6, dst=G1_IP6) / UDP(sport=1, dport=2)
    _bug(dlab, [("out", bytes(f))])


def test_bug_b15_dhcp6_request_two_servers(dlab):
    _bug(dlab, [("out", bytes(_dhcp6(DHCP6_Request(trid=1) / CLIENT / OTHER / OURS /
                                     DHCP6OptIA_NA(iaid=1))))])


def test_bug_b16_arp_probe_port_without_ipv4(dlab3):
    """g3 (no IPv4) probes for 10.0.0.60: answered with the gateway MAC."""
    f = Ether(src=gen.G3["mac"], dst=BCAST) / ARP(op=1, hwsrc=gen.G3["mac"], psrc="0.0.0.0",
                                                  pdst="10.0.0.60")
    check(dlab3, [("out", bytes(f))])


# --- the model on its own (no lab) ------------------------------------------------

def _l4_sum_ok(ip6):
    """The UDP or ICMPv6 checksum of an IPv6 packet without extension headers."""
    n = struct.unpack_from("!H", ip6, 4)[0]
    return xde.csum(ip6[8:40] + struct.pack("!IxxxB", n, ip6[6]) + ip6[40:40 + n]) == 0


def test_model_gateway_replies_are_well_formed():
    """Every reply the model makes of the generators' frames and of the
    cases above (DHCPv4, DHCPv6, RA, NA, echo, Packet Too Big) is a frame
    scapy reads as that message, with right lengths and checksums."""
    inst = setup.offline_instance()
    port = next(iter(inst.ports))
    frames = [bytes(f) for f in GATEWAY_CASES.values()]
    for kind in gen.OUT_KINDS:
        for seed in range(40):
            frames += [f for d, f in gen.case("out", kind, seed) if d == "out"]
    seen = set()
    for f in frames:
        inst.flows.clear()
        res = xde.outbound(inst, port, f)
        if res.verdict != "hairpin" or res.out is None:
            continue
        e = Ether(res.out)
        if IP in e:
            ip = res.out[14:]
            assert xde.csum(ip[:(ip[0] & 0xF) * 4]) == 0
            if UDP in e:
                assert e[UDP].len == len(ip) - 20
                assert DHCP in e and dict(o for o in e[DHCP].options
                                          if isinstance(o, tuple))["message-type"] in (2, 5)
                ph = ip[12:20] + struct.pack("!BBH", 0, 17, len(ip) - 20)
                assert xde.csum(ph + ip[20:]) == 0
                seen.add("dhcp4")
        elif IPv6 in e and e[IPv6].nh in (17, 58) and e[IPv6].src == GW_LL:
            t = res.out[54] if e[IPv6].nh == 58 else res.out[62]
            if e[IPv6].nh == 58 and t == 129:
                continue        # an echo reply is the request, turned around
            assert e[IPv6].plen == len(res.out) - 54 and _l4_sum_ok(res.out[14:])
            seen.add({2: "ptb", 134: "ra", 136: "na"}[t] if e[IPv6].nh == 58 else f"dhcp6 {t}")
    assert {"dhcp4", "ptb", "ra", "na", "dhcp6 2", "dhcp6 7"} <= seen, seen


def test_model_takes_every_kind():
    """The model takes every generator kind without an exception; the
    gateway's kinds get answers."""
    inst = setup.offline_instance()
    port = next(iter(inst.ports))
    answered = set()
    for d, kind in gen.KINDS:
        for seed in range(30):
            inst.flows.clear()
            for direction, f in gen.case(d, kind, seed):
                res = (xde.outbound(inst, port, f) if direction == "out" else xde.inbound(inst, f))
                if res.verdict == "hairpin":
                    answered.add(kind)
    assert {"dhcp4", "dhcp6", "ndp", "gw_echo6", "ipv6_big", "arp", "gw_echo"} <= answered
