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
cleared), so the firewall is modelled exactly, and the flow table is
compared after each frame (entries, epoch, first direction, VNI, rule,
packets, bytes, TCP state); sequences of two to six frames check its
state (replies of an allowed flow, External frames), some with a change
to the port's rules between two frames (re-evaluation where the flow
began, same-host delivery), the rules put back after the case. A port
without IPv4 (sled2's xde3), one without IPv6 (xde5, made for the tests
that need it) and xde0 with the largest gateway settings it may have
(DNS servers, host name, domain) are covered too.

NAT: xde0 has SNAT IPs of both families (tests/model/setup.py), so every
internet-bound frame above goes through SNAT; the NAT sequences add the
replies, ICMP errors both ways, unsolicited and stale traffic, exhaustion
of small ranges, address changes between two frames (floating and
ephemeral IPs among them), and g2's floating IPs on sled2. The NAT
translations, the SNAT ports' owners and the pools' cursors are compared
after each frame too.

The datapath bugs these tests found (B1-B6 in the IPv4 datapath, B7-B16
in the IPv6 and gateway datapath, B17 in NAT) are fixed; their inputs stay below as
regression tests, each with a minimal frame, and tests/model/gen.py
known_bug() is where an input of a new, known bug would be set aside. The
tests without the lab check the model on its own: its replies are
well-formed protocol messages.
"""
import ipaddress
import random
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from frames import (G1_IP, G1_IP6, G1_LL, G1_MAC, G2_IP6, G2_MAC, GW_IP, GW_LL, GW_MAC,
                    link_local, mac)
from model import gen, setup, xde
from model.compare import compare
from model.gen import eth6, ext_hdr, geneve, icmp6, ip6_packet, udp6, underlay
from model.harness import SledRunner, expiring, next_hops, run_case
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
from xdectl import abi, gateway, overlay, ports
from xdectl.errors import XdeError


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


def _step(step):
    d, what = step
    return f"fw {list(what)}" if d == "fw" else f"{d} {what.hex()}"


def check(dlab, steps, allow_known=False, log=None):
    """The datapath and the model agree on every step; log (a list), if
    given, gets harness.run_case's record of each frame."""
    runner, inst, hops, port = dlab
    bad = run_case(runner, inst, steps, hops, port, log=log)
    report = []
    for i, ms, res in bad:
        if not allow_known and steps[i][0] != "fw" and gen.known_bug(*steps[i]):
            continue
        report.append(f"step {i} {_step(steps[i])}\n"
                      f"  model: {res.verdict} {res.reason} {res.counters}\n  " + "\n  ".join(ms))
    if report and len(steps) > 1:
        report.insert(0, "the case: " + "; ".join(_step(st)[:100] for st in steps))
    assert not report, "datapath and model disagree:\n" + "\n".join(report)


def _not_known(steps):
    return not any(gen.known_bug(d, f) for d, f in steps if d != "fw")


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

def _from_g2(pkt):
    return ("in", underlay(random.Random(1), geneve() + eth6(pkt, src=G2_MAC, dst=G1_MAC)))


def test_bug_b7_extension_header_past_1023(dlab):
    """g2's UDP to g1's port 53 is denied by g1's inbound rules (setup.py);
    behind a 1,024-byte destination options header the datapath reads the
    ports at offset 40 again (the header itself) and lets it in."""
    r = random.Random(1)
    pkt = ip6_packet(G2_IP6, G1_IP6, 17, udp6(G2_IP6, G1_IP6, 4000, 53, b"q"),
                     [ext_hdr(r, 60, words=127)])
    check(dlab, [_from_g2(pkt)])


def test_bug_b8_extension_header_cut_short(dlab):
    """A hop-by-hop header declaring 16 bytes, of which the packet holds 8."""
    hbh = ext_hdr(random.Random(1), 0, words=1)
    check(dlab, [("out", eth6(ip6_packet(G1_IP6, G2_IP6, 17, b"", [(0, hbh[1][:8])])))])


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
    check(dlab, [("out", f)])


def test_bug_b10_echo6_fragment(dlab):
    pkt = ip6_packet(G1_LL, GW_LL, 58, icmp6(G1_LL, GW_LL, 128, 0, b"\0\1\0\1fragment"),
                     [ext_hdr(random.Random(1), 44, frag=(0, 1))])
    check(dlab, [("out", eth6(pkt))])


@pytest.mark.parametrize("frag", [(0, 0), (0, 1)], ids=["atomic", "first"])
def test_bug_b11_ndp_fragment(dlab, frag):
    body = bytes(4) + xde.ipaddress.IPv6Address(GW_LL).packed + b"\x01\x01" + mac(G1_MAC)
    pkt = ip6_packet(G1_LL, GW_LL, 58, icmp6(G1_LL, GW_LL, 135, 0, body),
                     [ext_hdr(random.Random(1), 44, frag=frag)], hlim=255)
    check(dlab, [("out", eth6(pkt))])


def test_bug_b12_dhcp6_fragment(dlab):
    msg = bytes(DHCP6_Solicit(trid=1) / CLIENT / DHCP6OptIA_NA(iaid=1))
    src, dst = G1_LL, "ff02::1:2"
    pkt = ip6_packet(src, dst, 17, udp6(src, dst, 546, 547, msg),
                     [ext_hdr(random.Random(1), 44, frag=(0, 1))], hlim=1)
    check(dlab, [("out", eth6(pkt, dst="33:33:00:01:00:02"))])


def test_bug_b13_dhcp6_iaid_zero(dlab):
    check(dlab, [("out", bytes(_dhcp6(DHCP6_Solicit(trid=1) / CLIENT / DHCP6OptIA_NA(iaid=0) /
                                     DHCP6OptIA_NA(iaid=5))))])


@pytest.mark.parametrize("family", [4, 6])
def test_bug_b14_same_host_flow_hit(dlab, family):
    """g1 to its own address: same-host delivery into xde0, whose inbound
    rules are walked after its outbound ones."""
    if family == 4:
        f = Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP, dst=G1_IP) / UDP(sport=1, dport=2)
    else:
        f = Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=G1_IP6, dst=G1_IP6) / UDP(sport=1, dport=2)
    check(dlab, [("out", bytes(f))])


def test_bug_b15_dhcp6_request_two_servers(dlab):
    check(dlab, [("out", bytes(_dhcp6(DHCP6_Request(trid=1) / CLIENT / OTHER / OURS /
                                     DHCP6OptIA_NA(iaid=1))))])


def test_bug_b16_arp_probe_port_without_ipv4(dlab3):
    """g3 (no IPv4) probes for 10.0.0.60: answered with the gateway MAC."""
    f = Ether(src=gen.G3["mac"], dst=BCAST) / ARP(op=1, hwsrc=gen.G3["mac"], psrc="0.0.0.0",
                                                  pdst="10.0.0.60")
    check(dlab3, [("out", bytes(f))])


# --- IPv6 packets from or to :: and ::1, and a Confirm naming a server ------------------

LINK_SCOPED_CASES = {
    "udp6_from_unspecified": (Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src="::", dst=G2_IP6) /
                              UDP(sport=4000, dport=5000)),
    "udp6_to_unspecified": (Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=G1_IP6, dst="::") /
                            UDP(sport=4000, dport=5000)),
    "udp6_to_loopback": (Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=G1_IP6, dst="::1") /
                         UDP(sport=4000, dport=5000)),
    "udp6_from_loopback": (Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src="::1", dst=G2_IP6) /
                           UDP(sport=4000, dport=5000)),
    "tcp6_to_loopback_dhcp6_port": (Ether(src=G1_MAC, dst=GW_MAC) /
                                    IPv6(src=G1_IP6, dst="::1") / UDP(sport=546, dport=547) /
                                    DHCP6_Solicit(trid=1) / CLIENT),
    "echo6_to_loopback": _icmp6(ICMPv6EchoRequest(id=3), src=G1_IP6, dst="::1", hlim=64),
    "echo6_gateway_from_unspecified": _icmp6(ICMPv6EchoRequest(id=4), src="::", hlim=64),
    "ns_peer_dad": _icmp6(ICMPv6ND_NS(tgt=G2_IP6), src="::", dst="ff02::1:ff00:2"),
    "ns_gateway_from_loopback": _icmp6(ICMPv6ND_NS(tgt=GW_LL), src="::1"),
    "rs_unspecified": GATEWAY_CASES["rs_unspecified"],
    "dhcp6_confirm_naming_server": _dhcp6(DHCP6_Confirm(trid=10) / CLIENT / OURS /
                                          DHCP6OptIA_NA(iaid=9)),
    "dhcp6_confirm_naming_other": _dhcp6(DHCP6_Confirm(trid=11) / OTHER / CLIENT /
                                         DHCP6OptIA_NA(iaid=9)),
}


@pytest.mark.parametrize("name", list(LINK_SCOPED_CASES))
def test_unspecified_loopback_and_confirm(dlab, name):
    check(dlab, [("out", bytes(LINK_SCOPED_CASES[name]))])


@pytest.mark.parametrize("src,dst", [("::", G1_IP6), ("::1", G1_IP6), (G2_IP6, "::1"),
                                     (G2_IP6, "::")])
def test_inbound_unspecified_and_loopback(dlab, src, dst):
    """From the overlay, :: and ::1 are link-scoped: never delivered."""
    r = random.Random(8)
    inner = gen.inner6_frame(r, src=src, dst=dst, proto=17, sport=7, dport=8, n=4)
    check(dlab, [("in", underlay(r, geneve() + inner))])


def test_inbound_ipv4_to_port_without_ipv4(dlab3):
    """g3's port has no IPv4: an IPv4 packet for it is not its guest's, even
    an ICMP echo its inbound rules would let in."""
    r = random.Random(9)
    for proto in (1, 17):
        inner = gen.inner_frame(r, src="10.0.0.2", dst="10.0.0.3", dst_mac=gen.G3["mac"],
                                proto=proto, n=8)
        check(dlab3, [("in", underlay(r, geneve(vni=11) + inner, dst=gen.U2, src=gen.U1))])


# --- re-evaluation after a rule change: exact counts ------------------------------------

def _count(log, port, step):
    """The counter deltas of a step of a case, on the port (route cache
    lookups left out: the datapath's own business)."""
    delta = next(x for x in log if x[0] == step)[2]
    return {name: n for (p, name), n in delta.items()
            if p == port and name not in ("route_cache_hits", "route_cache_misses")}


def _flows(log, step):
    flows = next(x for x in log if x[0] == step)[3]
    return {(k[1], k[5], k[6]): v for k, v in flows.items()}


G2_PEER = dict(src_mac=G2_MAC, dst_mac=G1_MAC)


def test_reeval_reply_judged_by_the_rules_where_the_flow_began(dlab):
    """g2 opens a UDP flow to g1 (inbound rules: VNI 10 allowed). Then an
    outbound rule denies g2; g1's reply is judged again by the inbound
    rules, where the flow began, and passes: one re-evaluation, one hit, no
    miss, no verdict counted, and the flow's entries carry the new epoch
    and one packet each way."""
    runner, inst, hops, port = dlab
    i = gen.flow_frame(4, gen.G2_IP, G1_IP, 17, 40000, 7000, **G2_PEER)
    o = gen.flow_frame(4, G1_IP, gen.G2_IP, 17, 7000, 40000)
    log = []
    check(dlab, [gen.from_overlay(random.Random(1), i),
                 ("fw", ["dir=out action=deny priority=1 hosts=ip=10.0.0.2"]),
                 ("out", o), ("out", o)], log=log)
    assert _count(log, port, 2) == {"tx_packets": 1, "tx_bytes": len(o), "flow_reevaluated": 1,
                                    "flow_hits": 1, "encap": 1}
    assert _count(log, port, 3) == {"tx_packets": 1, "tx_bytes": len(o), "flow_hits": 1,
                                    "encap": 1}
    flows = _flows(log, 3)
    epoch = inst.ports[port].fw_epoch - 1         # restored since: one more bump
    assert {k: v[:2] + v[4:6] for k, v in flows.items()} == {
        ("in", 40000, 7000): (epoch, "in", 1, len(i)),
        ("out", 7000, 40000): (epoch, "in", 2, 2 * len(o))}


def test_reeval_denied_where_it_began_then_judged_as_new(dlab):
    """As above, but the change denies g2 inbound: the reply's flow is now
    denied where it began, its entries go, and the reply is judged as new
    (outbound: allowed), starting a flow of g1's; g2's next packet is that
    flow's reply and passes, the new inbound rule notwithstanding."""
    runner, inst, hops, port = dlab
    i = gen.flow_frame(4, gen.G2_IP, G1_IP, 17, 40001, 7001, **G2_PEER)
    o = gen.flow_frame(4, G1_IP, gen.G2_IP, 17, 7001, 40001)
    log = []
    r = random.Random(2)
    check(dlab, [gen.from_overlay(r, i),
                 ("fw", ["dir=in action=deny priority=1 hosts=ip=10.0.0.2"]),
                 ("out", o), gen.from_overlay(r, i)], log=log)
    assert _count(log, port, 2) == {"tx_packets": 1, "tx_bytes": len(o), "flow_reevaluated": 1,
                                    "flow_misses": 1, "fw_allowed": 1, "encap": 1}
    assert _count(log, port, 3) == {"flow_hits": 1, "decap": 1, "rx_packets": 1,
                                    "rx_bytes": len(i)}
    assert {k: v[1] for k, v in _flows(log, 3).items()} == {("out", 7001, 40001): "out",
                                                            ("in", 40001, 7001): "out"}


def test_reeval_records_the_rule_that_allows_it_now(dlab):
    """g1's UDP flow to g2 (allowed by no rule: the outbound default, rule
    0); a rule allowing g2 outbound is added: the reply is judged again,
    allowed by that rule, and both entries of the flow now name it."""
    runner, inst, hops, port = dlab
    o = gen.flow_frame(4, G1_IP, gen.G2_IP, 17, 7002, 40002)
    i = gen.flow_frame(4, gen.G2_IP, G1_IP, 17, 40002, 7002, **G2_PEER)
    log = []
    check(dlab, [("out", o), ("fw", ["dir=out action=allow priority=2 hosts=ip=10.0.0.2"]),
                 gen.from_overlay(random.Random(3), i)], log=log)
    rules = {k: v[3] for k, v in _flows(log, 2).items()}
    assert set(rules) == {("out", 7002, 40002), ("in", 40002, 7002)}, rules
    assert len(set(rules.values())) == 1 and 0 not in rules.values(), rules


@pytest.mark.parametrize("family", [4, 6])
def test_reeval_same_host_counts_once_on_the_port(dlab, family):
    """g1 to its own address, twice, the rules changed (the epoch only) in
    between: the second packet's two flows (xde0 outbound, then xde0
    inbound as the destination) are each judged again, once, and the
    packet counts once: one tx, one rx, one hit per direction."""
    runner, inst, hops, port = dlab
    me = G1_IP if family == 4 else G1_IP6
    f = gen.flow_frame(family, me, me, 17, 5000, 6000)
    log = []
    check(dlab, [("out", f), ("fw", []), ("out", f)], log=log)
    n = len(f)
    assert _count(log, port, 0) == {"tx_packets": 1, "tx_bytes": n, "flow_misses": 2,
                                    "fw_allowed": 2, "rx_packets": 1, "rx_bytes": n}
    assert _count(log, port, 2) == {"tx_packets": 1, "tx_bytes": n, "flow_reevaluated": 2,
                                    "flow_hits": 2, "rx_packets": 1, "rx_bytes": n}
    flows = _flows(log, 2)
    assert {k: v[4:6] for k, v in flows.items()} == {
        ("out", 5000, 6000): (2, 2 * n), ("in", 6000, 5000): (0, 0),
        ("in", 5000, 6000): (2, 2 * n), ("out", 6000, 5000): (0, 0)}


def test_reeval_same_host_echo_one_flow(dlab):
    """An echo to g1's own address: its outbound entry's reverse is the
    inbound one, so a re-evaluation of the one refreshes both: one
    re-evaluation, two hits."""
    runner, inst, hops, port = dlab
    f = gen.flow_frame(4, G1_IP, G1_IP, 1, 77, 77)
    log = []
    check(dlab, [("out", f), ("fw", []), ("out", f)], log=log)
    assert _count(log, port, 2) == {"tx_packets": 1, "tx_bytes": len(f), "flow_reevaluated": 1,
                                    "flow_hits": 2, "rx_packets": 1, "rx_bytes": len(f)}


def test_reeval_same_host_denied_inbound(dlab):
    """g1 to itself, then an inbound rule denies g1: the outbound entry
    stays allowed, the inbound one is denied where it began (inbound), so
    it goes and the packet, judged as new, is dropped by xde0's inbound
    firewall; the source side counted once."""
    runner, inst, hops, port = dlab
    f = gen.flow_frame(4, G1_IP, G1_IP, 17, 5001, 6001)
    log = []
    check(dlab, [("out", f), ("fw", ["dir=in action=deny priority=1 hosts=ip=10.0.0.1"]),
                 ("out", f)], log=log)
    assert _count(log, port, 2) == {"tx_packets": 1, "tx_bytes": len(f), "flow_reevaluated": 2,
                                    "flow_hits": 1, "flow_misses": 1, "fw_denied": 1,
                                    "drop_in_firewall": 1}


@settings(max_examples=300, **SETTINGS)
@given(kind=st.sampled_from(["reeval_in_then_out", "reeval_out_then_in", "reeval_same_host"]),
       seed=st.integers(0, 2**32))
def test_reeval_sequences(dlab, kind, seed):
    """More of the rule-change sequences test_stateful_sequences draws."""
    check(dlab, gen.case("seq", kind, seed))


# --- a port without IPv6 ------------------------------------------------------------------

G5 = {"port": "xde5", "mac": "a8:40:25:ff:00:0e", "ip": "10.0.0.14", "ip6": "fd00:10::14"}


@pytest.fixture
def dlab5(xlab, dlab):
    """An IPv4-only VNI 10 port on sled1 (xde5, 10.0.0.14), its guest end
    left in sled1's namespace with IPv6 off (a quiet guest), and a V2P
    entry that wrongly sends fd00:10::14 to its MAC on this sled; removed
    afterwards."""
    runner, _, hops, _ = dlab
    root = xlab.lab.root("sled1")
    v2p = (G5["ip6"], G5["mac"], gen.U1, 10)
    try:
        xlab.xdectl("sled1", "create", G5["port"], "--underlay", "u1", "--underlay", "u2",
                    "--mac", G5["mac"], "--ip", G5["ip"], "--gateway-mac", GW_MAC,
                    "--gateway-ip", GW_IP, "--boundary-services", gen.BSVC6,
                    "--boundary-vni", "99", "--vni", "10", "--underlay-addr", gen.U1,
                    "--vpc-subnet", "10.0.0.0/24")
        xlab.run("sled1", "sysctl", "-qw", f"net.ipv6.conf.{G5['port']}.disable_ipv6=1")
        with xlab.lab.inside("sled1"):
            overlay.set_v2p(root, *v2p)
        inst = runner.instance()
        port = next(i for i, p in inst.ports.items() if p.name == G5["port"])
        assert inst.ports[port].ip6 is None
        yield runner, inst, hops, port
    finally:
        with xlab.lab.inside("sled1"):
            try:
                overlay.clear_v2p(root, *v2p)
            except XdeError:
                pass
        xlab.xdectl("sled1", "delete", G5["port"], check=False)


def test_port_without_ipv6_echo6_to_gateway(dlab5):
    """A port without IPv6 has no IPv6 gateway: its guest's echo to the
    gateway's link-local address is dropped (link_local), not answered."""
    f = gen.flow_frame(6, link_local(G5["mac"]), GW_LL, 58, 1, 1, src_mac=G5["mac"])
    check(dlab5, [("out", f)])


def test_port_without_ipv6_inbound_ipv6(dlab5):
    """IPv6 from the overlay for a port without IPv6: unsupported, before
    its firewall."""
    r = random.Random(10)
    for proto in (58, 17):
        inner = gen.inner6_frame(r, src=G2_IP6, dst=G5["ip6"], dst_mac=G5["mac"], proto=proto,
                                 icmp_type=128, n=8)
        check(dlab5, [("in", underlay(r, geneve() + inner))])


@pytest.mark.parametrize("family", [4, 6])
def test_same_host_to_port_without_the_family(dlab5, family):
    """g1 to xde5 on the same sled: IPv4 is delivered (after xde5's inbound
    firewall); IPv6, which xde5 lacks, is dropped on xde5 as unsupported
    (inbound), after g1's own outbound firewall."""
    runner, inst, hops, _ = dlab5
    g1 = next(i for i, p in inst.ports.items() if p.name == "xde0")
    src, dst = (G1_IP, G5["ip"]) if family == 4 else (G1_IP6, G5["ip6"])
    f = gen.flow_frame(family, src, dst, 17, 4000, 5000)
    check((runner, inst, hops, g1), [("out", f)])


@settings(max_examples=500, **SETTINGS)
@given(kind=st.sampled_from(gen.OUT_KINDS), seed=st.integers(0, 2**32))
def test_outbound_ipv4_only_port(dlab5, kind, seed):
    """The outbound cases as a guest of a port without IPv6 sends them: its
    IPv4 as g1's, its IPv6 nowhere (the gateway answers none of it)."""
    steps = gen.as_port(gen.case("out", kind, seed), G5["mac"], G5["ip6"], G5["ip"])
    if not steps or not _not_known(steps):
        return
    check(dlab5, steps)


# --- the gateway's replies with large settings ----------------------------------------------

BIG_DNS = ["192.0.2.53", "198.51.100.53", "203.0.113.53", "2001:db8::53", "2001:db8:1::53",
           "2001:db8:2::53"]
BIG_HOSTNAME = "h" * 63


@pytest.fixture
def big_gateway(xlab, dlab):
    """xde0's gateway told 3 IPv4 and 3 IPv6 DNS servers, a 63-character
    host name and the longest domain its DHCPv4 reply still holds (the
    template's 512 bytes); what it had before put back afterwards."""
    runner, inst, hops, port = dlab
    root = xlab.lab.root("sled1")
    p = inst.ports[port]
    g = dict(mac=gen.G1_MAC, gw_mac=GW_MAC, ip=G1_IP, gw_ip=GW_IP, ip6=G1_IP6, mtu=p.mtu,
             dns=BIG_DNS, hostname=BIG_HOSTNAME)

    def fits(domain):
        try:
            return max(map(len, gateway.templates(SimpleNamespace(**g, domain=domain)).values()))
        except XdeError:
            return None
    domain = None
    for n in range(253, 0, -1):
        d = (("d" * 63 + ".") * 4)[:n].strip(".")
        if fits(d):
            domain = d
            break
    assert domain and len(domain) > 60 and fits(domain) == abi.GW_TMPL_MAX, domain
    with xlab.lab.inside("sled1"):
        before = ports.gateway_settings(runner.maps, port)
        ports.set_gateway(root, "xde0", BIG_DNS, BIG_HOSTNAME, domain)
    try:
        runner.read_templates(inst)
        yield domain
    finally:
        with xlab.lab.inside("sled1"):
            ports.set_gateway(root, "xde0", before["dns"], before["hostname"], before["domain"])
        runner.read_templates(inst)


BIG_DUID = b"\x00\x02" + bytes(range(126))                  # 128 bytes: the longest echoed


def _dhcp6_raw(mtype, *opts):
    msg = bytes((mtype, 0x12, 0x34, 0x56)) + b"".join(opts)
    src, dst = G1_LL, "ff02::1:2"
    return eth6(ip6_packet(src, dst, 17, udp6(src, dst, 546, 547, msg), hlim=1),
                dst="33:33:00:01:00:02")


BIG_CLIENT = gen._opt6(1, BIG_DUID)
IA = gen._opt6(3, struct.pack("!III", 0x0a0b0c0d, 0, 0))
BIG_CASES = {
    "dhcp4_discover": lambda: bytes(_dhcp4("discover")),
    "dhcp4_discover_broadcast": lambda: bytes(_dhcp4("discover", flags=0x8000)),
    "dhcp4_request": lambda: bytes(_dhcp4("request", requested_addr=G1_IP, server_id=GW_IP)),
    "dhcp6_solicit_rapid": lambda: _dhcp6_raw(1, BIG_CLIENT, gen._opt6(14, b""), IA),
    "dhcp6_solicit": lambda: _dhcp6_raw(1, gen._opt6(8, b"\0\0"), BIG_CLIENT, IA),
    "dhcp6_request": lambda: _dhcp6_raw(3, BIG_CLIENT, gen._opt6(2, gen.MY_DUID), IA),
    "dhcp6_confirm": lambda: _dhcp6_raw(4, BIG_CLIENT, IA),
}


@pytest.mark.parametrize("name", list(BIG_CASES))
def test_gateway_replies_with_large_settings(dlab, big_gateway, name):
    """Replies of 256 bytes and more, up to the template's 512 plus a
    132-byte client identifier: the bytes the model predicts, and on their
    own, right lengths and checksums, and what the guest is to be told."""
    runner, inst, hops, port = dlab
    frame = BIG_CASES[name]()
    check(dlab, [("out", frame)])
    rc, out, _ = runner.run("out", frame, port)
    assert rc == xde.TC_ACT_REDIRECT and len(out) > (200 if name == "dhcp6_confirm" else 256), \
        (rc, len(out))
    e = Ether(out)
    label = bytes((63,)) + b"d" * 63                  # the domain's first label, on the wire
    if name.startswith("dhcp4"):
        ip = out[14:]
        assert len(out) == abi.GW_TMPL_MAX
        assert e[IP].len == len(ip) and e[UDP].len == len(ip) - 20
        assert xde.csum(ip[:20]) == 0
        assert xde.csum(ip[12:20] + struct.pack("!BBH", 0, 17, len(ip) - 20) + ip[20:]) == 0
        assert DHCP in e
        dns = bytes((6, 12)) + b"".join(ipaddress.ip_address(a).packed for a in BIG_DNS[:3])
        for want in (dns, bytes((12, 63)) + BIG_HOSTNAME.encode(), big_gateway.encode()):
            assert want in out, want
    else:
        assert e[IPv6].plen == len(out) - 54 and e[UDP].len == len(out) - 54
        assert _l4_sum_ok(out[14:])
        rapid = b"\x00\x0e\x00\x00" if name == "dhcp6_solicit_rapid" else b""
        assert out.endswith(BIG_CLIENT + rapid)
        if name != "dhcp6_confirm":
            dns = struct.pack("!HH", 23, 48) + b"".join(ipaddress.ip_address(a).packed
                                                         for a in BIG_DNS[3:])
            assert dns in out and label in out


# --- NAT (bpf/nat.h): g1's SNAT IPs (tests/model/setup.py), floating and ephemeral IPs ------

SNAT4, SNAT6 = gen.G1_EXTERNAL["snat"]
FIRST = gen.G1_EXTERNAL["snat_start"]            # a case's first SNAT port of each pool
INET = {4: "8.8.8.8", 6: "2001:4860::8888"}
ME = {4: G1_IP, 6: G1_IP6}
ECHO = {4: 1, 6: 58}


def _proto(family, proto):
    return ECHO[family] if proto == "echo" else proto


def _to_inet(family, proto, sp, dp, flags="S", reply=False, src=None, dst=None):
    """g1's packet to the internet (an echo: identifier sp)."""
    return ("out", gen.flow_frame(family, src or ME[family], dst or INET[family], proto, sp,
                                  sp if proto in (1, 58) else dp, flags, reply))


def _from_inet(family, proto, sp, dp, dst, flags="SA", reply=True, src=None, external=True):
    """What boundary services brings g1 from the internet: Geneve in VNI 10
    with the External option (an echo: identifier dp)."""
    f = gen.flow_frame(family, src or INET[family], dst, proto, dp if proto in (1, 58) else sp,
                       dp, flags, reply, src_mac=gen.BSVC_MAC_S, dst_mac=G1_MAC)
    return gen.from_overlay(random.Random(sp ^ dp), f, external)


def _ip_l4(frame):
    """(IP header, L4 bytes, protocol, family) of a frame without IPv6
    extension headers."""
    if frame[12:14] == b"\x08\x00":
        ihl = (frame[14] & 0xF) * 4
        tot = struct.unpack_from("!H", frame, 16)[0]
        return frame[14:14 + ihl], frame[14 + ihl:14 + tot], frame[23], 4
    n = struct.unpack_from("!H", frame, 18)[0]
    return frame[14:54], frame[54:54 + n], frame[20], 6


def _sums_ok(frame):
    """The frame's IPv4 header checksum and L4 checksum verify (a UDP
    checksum of 0 is none)."""
    ip, l4, proto, family = _ip_l4(frame)
    if family == 4 and xde.csum(ip) != 0:
        return False
    if proto == 17 and l4[6:8] == b"\0\0":
        return True
    if proto == 1:
        return xde.csum(l4) == 0
    pseudo = (ip[12:20] + struct.pack("!BBH", 0, proto, len(l4)) if family == 4 else
              ip[8:40] + struct.pack("!IxxxB", len(l4), proto))
    return xde.csum(pseudo + l4) == 0


def _addrs_ports(frame):
    """(source, destination, source port, destination port) of a frame;
    ICMP echo: the identifier for both ports."""
    ip, l4, proto, family = _ip_l4(frame)
    a = (ip[12:16], ip[16:20]) if family == 4 else (ip[8:24], ip[24:40])
    src, dst = (str(ipaddress.ip_address(x)) for x in a)
    if proto in (1, 58):
        i = struct.unpack_from("!H", l4, 4)[0]
        return src, dst, i, i
    return (src, dst) + struct.unpack_from("!HH", l4)


def _out_of(log, step):
    return next(x for x in log if x[0] == step)[4]


@pytest.mark.parametrize("proto", [17, 6, "echo"])
@pytest.mark.parametrize("family", [4, 6])
def test_nat_snat_first_packet_and_reply(dlab, family, proto):
    """g1's first packet to the internet leaves from its SNAT IP and the
    range's first port (an echo: that identifier), checksums mended; the
    reply to that address and port reaches g1 with its own address and
    port back, checksums mended, through the flow g1's packet made."""
    runner, inst, hops, port = dlab
    p = _proto(family, proto)
    snat = SNAT4 if family == 4 else SNAT6
    log = []
    check(dlab, [_to_inet(family, p, 40000, 53), _from_inet(family, p, 53, FIRST, snat)], log=log)
    inner = _out_of(log, 0)[70:]
    assert _addrs_ports(inner)[:3] == (snat, INET[family], FIRST) and _sums_ok(inner)
    assert _count(log, port, 0) == {"tx_packets": 1, "tx_bytes": len(inner), "flow_misses": 1,
                                    "fw_allowed": 1, "snat_allocated": 1, "nat_out": 1,
                                    "encap": 1}
    back = _out_of(log, 1)
    ports = (40000, 40000) if p == ECHO[family] else (53, 40000)
    assert _addrs_ports(back)[1:] == (ME[family], *ports) and _sums_ok(back)
    assert _count(log, port, 1) == {"nat_in": 1, "flow_hits": 1, "decap": 1, "rx_packets": 1,
                                    "rx_bytes": len(back)}


@pytest.mark.parametrize("family", [4, 6])
def test_nat_echo_identifiers_per_pool(dlab, family):
    """Two pings and a UDP flow: each protocol has its own pool, so the
    second ping gets the ICMP pool's second port and UDP its pool's first;
    each echo reply finds its own request's identifier."""
    snat = SNAT4 if family == 4 else SNAT6
    e = ECHO[family]
    log = []
    check(dlab, [_to_inet(family, e, 7, 7), _to_inet(family, e, 8, 8),
                 _to_inet(family, 17, 7, 7),
                 _from_inet(family, e, FIRST + 1, FIRST + 1, snat),
                 _from_inet(family, e, FIRST, FIRST, snat)], log=log)
    assert [_addrs_ports(_out_of(log, i)[70:])[2] for i in range(3)] == [FIRST, FIRST + 1, FIRST]
    assert [_addrs_ports(_out_of(log, i))[3] for i in (3, 4)] == [8, 7]


def _sums_to_zero(proto, sport):
    """g1's packet to the internet whose checksum, once translated (SNAT4
    and the first port), is 0x0000: (frame, offset of its checksum). Its
    two payload bytes are the checksum the rest sums to: with them the sum
    is 0xffff, whose complement is 0."""
    at = 34 + (6 if proto == 17 else 16)

    def translated_sum(w):
        f = gen.flow_frame(4, G1_IP, INET[4], proto, sport, 53, "A", payload=struct.pack("!H", w))
        b = bytearray(f)
        b[26:30] = ipaddress.ip_address(SNAT4).packed
        struct.pack_into("!H", b, 34, FIRST)
        b[at:at + 2] = b"\0\0"
        ip, l4, _, _ = _ip_l4(bytes(b))
        return f, xde.csum(ip[12:20] + struct.pack("!BBH", 0, proto, len(l4)) + l4)
    f, rest = translated_sum(0)
    f, total = translated_sum(rest)
    assert total == 0, (rest, total)
    return f, at


def test_nat_checksum_zero(dlab):
    """UDP: a datagram whose translated checksum comes to 0 leaves with
    0xffff (RFC 768), one without a checksum (0) without one; TCP's comes
    to 0x0000 (the kernel helpers' zero)."""
    udp, at = _sums_to_zero(17, 40000)
    tcp, at_t = _sums_to_zero(6, 40000)
    nosum = bytearray(gen.flow_frame(4, G1_IP, INET[4], 17, 40001, 53))
    nosum[40:42] = b"\0\0"
    log = []
    check(dlab, [("out", udp), ("out", tcp), ("out", bytes(nosum))], log=log)
    assert _out_of(log, 0)[70 + at:70 + at + 2] == b"\xff\xff"
    assert _out_of(log, 1)[70 + at_t:70 + at_t + 2] == b"\0\0"
    assert _out_of(log, 2)[70 + 40:70 + 42] == b"\0\0"
    assert _sums_ok(_out_of(log, 0)[70:]) and _sums_ok(_out_of(log, 1)[70:])


def test_nat_exhausted_then_reclaimed(dlab):
    """A range of 4 ports: 4 UDP flows take them, the fifth finds none
    (nat_exhausted); the second flow expires, and the next new flow takes
    its port over (snat_reclaimed), its old translation forgotten: the
    reply to that port reaches the new flow."""
    runner, inst, hops, port = dlab
    ext = {"snat": [SNAT4], "snat_start": 5000, "snat_end": 5003}
    steps = [("ext", ext)] + [_to_inet(4, 17, 41000 + i, 53) for i in range(5)] + [
        ("expire", (17, 41001)), _to_inet(4, 17, 41010, 53),
        _from_inet(4, 17, 53, 5001, SNAT4), _to_inet(4, 1, 9, 9)]
    log = []
    check(dlab, steps, log=log)
    assert [_addrs_ports(_out_of(log, i)[70:])[2] for i in range(1, 5)] == [5000, 5001, 5002, 5003]
    assert _count(log, port, 5).get("drop_out_nat_exhausted") == 1
    c = _count(log, port, 7)
    assert c["snat_allocated"] == 1 and c["snat_reclaimed"] == 1, c
    assert _addrs_ports(_out_of(log, 7)[70:])[2] == 5001
    assert _addrs_ports(_out_of(log, 8))[3] == 41010
    assert _addrs_ports(_out_of(log, 9)[70:])[2] == 5000      # the ICMP pool has its own


@pytest.mark.parametrize("family", [4, 6])
def test_nat_floating_inbound_starts_a_flow(dlab, family):
    """To a floating IP from the internet: a flow of its own (1:1, the
    address alone changes), judged by g1's inbound rules (echo: allowed;
    setup.py's rules: UDP from 192.0.2.0/24, TCP to 80 and 443 from
    2001:db8::/32); g1's answers leave from the floating IP, whatever else
    the port has."""
    fl = {4: "198.51.100.20", 6: "2001:db8:5::20"}[family]
    ext = {"floating": [fl], "snat": [SNAT4, SNAT6], "snat_start": 1024, "snat_end": 2047}
    e = ECHO[family]
    src, proto, svc = {4: ("192.0.2.1", 17, 53), 6: ("2001:db8::1", 6, 443)}[family]
    log = []
    check(dlab, [("ext", ext),
                 _from_inet(family, e, 0, 77, fl, reply=False),
                 _to_inet(family, e, 77, 77, reply=True),
                 _from_inet(family, proto, 5353, svc, fl, flags="S", src=src),
                 _to_inet(family, proto, svc, 5353, flags="SA", dst=src)], log=log)
    assert _addrs_ports(_out_of(log, 1))[1:] == (ME[family], 77, 77)
    assert _addrs_ports(_out_of(log, 2)[70:])[:3] == (fl, INET[family], 77)
    assert _addrs_ports(_out_of(log, 3))[1:] == (ME[family], 5353, svc)
    assert _addrs_ports(_out_of(log, 4)[70:])[:3] == (fl, src, svc)
    assert all(_sums_ok(_out_of(log, i)) for i in (1, 3))


@pytest.mark.parametrize("family", [4, 6])
def test_nat_no_external_ip(dlab, family):
    """A port without an external address of the packet's family drops its
    internet traffic (no_external_ip), after its firewall let it out."""
    runner, inst, hops, port = dlab
    other = SNAT6 if family == 4 else SNAT4
    f = _to_inet(family, 17, 40000, 53)
    log = []
    check(dlab, [("ext", {"snat": [other], "snat_start": 1024, "snat_end": 2047}), f], log=log)
    assert _count(log, port, 1) == {"tx_packets": 1, "tx_bytes": len(f[1]), "flow_misses": 1,
                                    "fw_allowed": 1, "drop_out_no_external_ip": 1}


@pytest.mark.parametrize("family", [4, 6])
def test_nat_icmp_error_reaches_the_guest(dlab, family):
    """A router's ICMP error quoting g1's UDP packet as it left (SNAT IP,
    first port): g1 gets it to its own address, quoting its own address and
    port, the checksums of the message and of the quoted IPv4 header
    mended."""
    r = random.Random(1)
    n = gen.NatGen(r, gen.NAT_G1)
    fl = n.flow(family, 17, INET[family], 40000, 53)
    n.out(fl)
    n.icmp_error(fl, quote_len=48, what=(3, 3, 0) if family == 4 else (1, 4, 0))
    log = []
    check(dlab, n.steps, log=log)
    err = _out_of(log, 1)
    ip, l4, proto, _ = _ip_l4(err)
    assert _addrs_ports(err)[1] == ME[family] and _sums_ok(err)
    q = l4[8:]
    if family == 4:
        assert xde.csum(q[:20]) == 0
        assert q[12:16] == ipaddress.ip_address(G1_IP).packed
        assert struct.unpack_from("!H", q, 20)[0] == 40000
    else:
        assert q[8:24] == ipaddress.ip_address(G1_IP6).packed
        assert struct.unpack_from("!H", q, 40)[0] == 40000


@pytest.mark.parametrize("family", [4, 6])
def test_nat_guest_icmp_error_leaves_from_the_floating_ip(dlab, family):
    """g1's port unreachable about a packet that reached it through its
    floating IP: it leaves from the floating IP, quoting the floating IP
    and port the packet was sent to, its checksums mended; one about a
    packet of no translated flow goes nowhere (no_nat)."""
    fl_ip = {4: "198.51.100.20", 6: "2001:db8:5::20"}[family]
    src, proto, svc = {4: ("192.0.2.1", 17, 53), 6: ("2001:db8::1", 6, 443)}[family]
    n = gen.NatGen(random.Random(4), gen.NAT_G1)
    n.set_ext({"floating": [fl_ip]})
    fl = gen.NatFlow(family, proto, svc, 5353, src, fl_ip, svc)
    n.inbound(fl)
    gen._guest_error(n, fl, what=(3, 3) if family == 4 else (1, 4))
    other = gen.NatFlow(family, proto, svc + 1, 5353, src, fl_ip, svc + 1)
    gen._guest_error(n, other, what=(3, 3) if family == 4 else (1, 4))
    log = []
    check(dlab, n.steps, log=log)
    err = _out_of(log, 2)[70:]
    ip, l4, _, _ = _ip_l4(err)
    assert _addrs_ports(err)[:2] == (fl_ip, src) and _sums_ok(err)
    q = l4[8:]
    if family == 4:
        assert xde.csum(q[:20]) == 0 and q[16:20] == ipaddress.ip_address(fl_ip).packed
        assert struct.unpack_from("!H", q, 22)[0] == svc
    else:
        assert q[24:40] == ipaddress.ip_address(fl_ip).packed
        assert struct.unpack_from("!H", q, 42)[0] == svc
    runner, inst, hops, port = dlab
    assert _count(log, port, 3).get("drop_out_no_nat") == 1


def test_nat_fragments(dlab):
    """Fragments are not translated: a first fragment never starts a flow's
    translation (nat_untranslatable), nor does a later one (no ports) find
    one; from outside, a later fragment to the SNAT IP is no_nat."""
    r = random.Random(2)
    n = gen.NatGen(r, gen.NAT_G1)
    fl = n.flow(4, 17, INET[4], 40000, 53)
    n.out(fl, frag=(0, 1))
    n.out(fl)
    n.out(fl, frag=(0, 1))
    n.out(fl, frag=(5, 0))
    n.reply(fl, frag=(5, 0))
    check(dlab, n.steps)


# B17 (fixed)
@pytest.mark.parametrize("family", [4, 6])
def test_nat_later_fragment_of_a_portless_flow(dlab, family):
    """A UDP flow from port 0 to port 0 (an echo with identifier 0 alike)
    is translated like any other; a later fragment of the same addresses
    and protocol carries no ports, so its key is that flow's. The datapath
    rewrote it as if it had the flow's L4 header, at p->l4: for IPv4 that
    is 0, the IP header itself (version and IHL overwritten with the
    external port, the fragment offset mended as a checksum); for IPv6 the
    fragment's data. A fragment is never translated (nat_untranslatable)."""
    r = random.Random(3)
    n = gen.NatGen(r, gen.NAT_G1)
    for proto in (17, ECHO[family]):
        fl = n.flow(family, proto, INET[family])
        fl.gport = fl.rport = 0
        n.out(fl)
        n.out(fl, frag=(5, 0), payload=b"later fragment data")
    check(dlab, n.steps)


# B18 (fixed)
@pytest.mark.parametrize("proto", [6, 17, 1])
def test_nat_cut_short_transport_header(dlab, proto):
    """A packet whose IP length ends inside its TCP, UDP or ICMP header has
    no ports (ICMP: reads as type 0, an echo reply). SNAT gave it a port
    all the same and wrote port and checksum past the packet's end, into
    the frame's padding (or dropped it, csum_failed, past the frame's).
    NAT translates only whole transport headers: nat_untranslatable."""
    l4 = {6: bytes.fromhex("9c4000350000000100000000"),     # 12 of TCP's 20 bytes
          17: bytes.fromhex("9c400035"),                    # 4 of UDP's 8
          1: bytes.fromhex("0800f7ff")}[proto]              # 4 of ICMP's 8
    ip = IP(src=G1_IP, dst=INET[4], proto=proto, id=7, ttl=64, len=20 + len(l4))
    frame = bytes(Ether(src=G1_MAC, dst=GW_MAC) / ip / l4) + bytes(20)   # padded on the wire
    check(dlab, [("out", frame)])


# B19 (fixed)
def test_nat_snat_port_released_with_its_translation(dlab):
    """When the generation check forgets a SNAT translation (its range
    moved away from the port), the port goes back to the pool: before, its
    owner entry stayed, held by the live flow, outside any range probed
    again, until the port was deleted."""
    moved = {"snat": [SNAT4, SNAT6], "snat_start": 1100, "snat_end": 2047}
    back = {"snat": [SNAT4, SNAT6], "snat_start": 1024, "snat_end": 2047}
    steps = [_to_inet(4, 17, 40000, 53), ("ext_raw", moved), _to_inet(4, 17, 40000, 53),
             ("ext_raw", back), _to_inet(4, 17, 40001, 53)]
    check(dlab, steps)


# B20 (fixed)
def test_nat_inbound_does_not_take_over_a_translation(dlab):
    """g1 with two floating IPs has a flow to a peer leaving from one of
    them (by hash). A packet from that peer's port to the other floating IP
    and g1's port is no flow of that address: before, it replaced the
    flow's translation (the connection then left from the other address);
    it is no_nat, and the flow's replies still find it."""
    two = {"floating": ["198.51.100.30", "198.51.100.31"]}
    steps = [("ext", two), _to_inet(4, 17, 40000, 53)]
    for f in two["floating"]:
        steps.append(_from_inet(4, 17, 53, 40000, f))
    steps.append(_to_inet(4, 17, 40000, 53))
    check(dlab, steps)


def test_nat_generation(dlab):
    """The addresses change under a flow: written alone (raw), the flow's
    translation made under the old ones is checked at its next packet: kept
    if the port still has its address and port (the generation moves on),
    forgotten and made again otherwise; through set-external-ips, those the
    new addresses lack go at once, with their flows."""
    moved = {"snat": [SNAT4, SNAT6], "snat_start": 1025, "snat_end": 2047}
    other = {"snat": ["198.51.100.11"], "snat_start": 1024, "snat_end": 2047}
    for change in ("ext_raw", "ext"):
        steps = [_to_inet(4, 17, 40000, 53), _to_inet(4, 17, 40001, 53),
                 (change, moved), _to_inet(4, 17, 40000, 53), _to_inet(4, 17, 40001, 53),
                 _from_inet(4, 17, 53, 1024, SNAT4), (change, other),
                 _to_inet(4, 17, 40001, 53), _from_inet(4, 17, 53, 1025, SNAT4)]
        check(dlab, steps)


@settings(max_examples=400, **SETTINGS)
@given(kind=st.sampled_from(gen.NAT_KINDS), seed=st.integers(0, 2**32))
def test_nat_sequences(dlab, kind, seed):
    """g1's traffic with the internet through its SNAT IPs, replies, ICMP
    errors, unsolicited and stale traffic, exhaustion, address changes,
    floating and ephemeral IPs."""
    check(dlab, gen.case("nat", kind, seed))


@pytest.fixture(scope="module")
def dlab2(xlab):
    """sled2's xde0, g2's port, with its floating IPs (the lab's IPv4 one and
    an IPv6 one: setup.EXTERNAL_G2); g2's and g3's DHCP clients stopped
    meanwhile (sled2's counters must move by our frames only)."""
    lab = xlab.lab
    runner = None
    try:
        for g in ("g2", "g3"):
            setup._quiet(lab, g)
        setup.give_external(lab, "sled2", "xde0", setup.EXTERNAL_G2)
        xlab.resolve_underlay_neighbours(("sled2",))   # no detours: the model has none
        runner = SledRunner(lab, "sled2")
        inst = runner.instance()
        port = next(i for i, p in inst.ports.items() if p.name == "xde0")
        yield runner, inst, next_hops(lab, "sled2"), port
    finally:
        if runner is not None:
            runner.clear_flows()
            runner.clear_nat(runner.instance())
            runner.close()
        setup.take_external(lab, "sled2", "xde0")
        for g in ("g2", "g3"):
            setup._resume(lab, g)


@settings(max_examples=200, **SETTINGS)
@given(kind=st.sampled_from(gen.NAT2_KINDS), seed=st.integers(0, 2**32))
def test_nat_floating_port(dlab2, kind, seed):
    """g2's traffic through its floating IPs: out and back, flows the
    internet starts, ICMP errors, unsolicited and stale traffic."""
    check(dlab2, gen.case("nat2", kind, seed))


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
            inst.nat_flows.clear()
            inst.snat_ports.clear()
            inst.ports[port].nat = xde.nat_cfg_of(gen.G1_EXTERNAL, 1)
            for direction, f in gen.case(d, kind, seed):
                if direction == "fw":
                    inst.ports[port].fw_epoch += 1   # the rules as they were: the epoch moves
                    continue
                if direction in ("ext", "ext_raw"):
                    xde.set_external(inst, port, f, direction == "ext_raw")
                    continue
                if direction == "expire":
                    match = expiring(port, f)
                    for k in [k for k in inst.flows if match(k)]:
                        del inst.flows[k]
                    continue
                res = (xde.outbound(inst, port, f) if direction == "out" else xde.inbound(inst, f))
                if res.verdict == "hairpin":
                    answered.add(kind)
    assert {"dhcp4", "dhcp6", "ndp", "gw_echo6", "ipv6_big", "arp", "gw_echo"} <= answered
