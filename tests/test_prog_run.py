"""BPF_PROG_TEST_RUN on the loaded programs of the lab's sled1 root: the
verdicts and the exact bytes encap, decap and the gateway produce for known
frames (docs/design.md, "The datapath" and "How it is proved").

The fixed cases (the gateway's replies, drops, decap, malformed Geneve,
frames for the host) are a table, tests/cases.py, run by test_case; the
rest check what a table cannot: encapsulation (its entropy and next hops),
ICMP errors, the wire.

tc_port_out is a SCHED_CLS program: it finds its port by skb->ifindex, so
each run passes a struct __sk_buff (xdectl.libbpf.skb_ctx) as ctx_in with
ifindex and ingress_ifindex set -- the kernel accepts mark, priority,
ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size and
hwtstamp there and requires every other byte to be zero. The kernel looks
that ifindex up in the caller's network namespace, so runs happen inside
sled1's namespace (Lab.inside). What the kernel really does in a test run:
bpf_redirect() only records the target and the program's return value,
TC_ACT_REDIRECT (7), is reported as is -- nothing is sent; bpf_fib_lookup
works on sled1's real routes and neighbours (the skb's device is xde0_dp).
xdp_underlay returns XDP_REDIRECT (4) without redirecting.
"""
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

from cases import CASES, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP
from frames import (BSVC_ADDR, BSVC_MAC, BSVC_VNI, G1_IP, G1_MAC, G2_MAC, GW_IP, GW_MAC,
                    OUTSIDE, U1_ADDR, U2_ADDR, VNI, encapsulated, g1_frame, geneve, inner_udp, ip6,
                    mac, split_encap, underlay_frame)
from progrun import ProgRun
from xdectl.datapath import Datapath
from xdelab.lab import GUESTS


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

    def run(self, prog, frame, ifindex=None):
        rc, out, _ = ProgRun(self.t.lab, "sled1").run(prog, frame, ifindex or self.port_ifindex)
        return rc, out

    def tc(self, frame, ifindex=None):
        return self.run("tc_port_out", frame, ifindex)

    def xdp(self, frame):
        return self.run("xdp_underlay", frame)


@pytest.fixture(scope="module")
def runner(xlab):
    return Runner(xlab)


def check_entropy(label, sport):
    """label = hash & 0xfffff, sport = 0xc000 | (hash >> 16) & 0x3fff: non-zero,
    in RFC 8926's range, and the 4 bits they share agree."""
    assert label != 0
    assert 0xC000 <= sport <= 0xFFFF
    assert (label >> 16) & 0xF == sport & 0xF, (hex(label), hex(sport))


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
    assert out == encapsulated(frame, out[:12], label, sport, U2_ADDR, VNI, G2_MAC, tos)


def test_encap_exact_bytes_to_boundary_services(xlab, runner):
    """Off-VPC destination (route `ig`): to fd00:99::1 in VNI 99, inner
    destination MAC A8:40:25:77:77:77, the inner packet from g1's SNAT IP
    with an identifier of its range (checksums whole)."""
    frame = g1_frame(ICMP(id=0x78) / Raw(b"outside"), dst=OUTSIDE)
    xlab.resolve_underlay_neighbours(("sled1",))
    rc, out = runner.tc(frame)
    assert rc == TC_ACT_REDIRECT
    assert out[:12] in runner.links.values()
    label, sport = split_encap(out)
    check_entropy(label, sport)
    ext = GUESTS["g1"]["external"]
    ident = struct.unpack_from("!H", out, 70 + 14 + 20 + 4)[0]
    assert ext.snat_start <= ident <= ext.snat_end, ident
    translated = g1_frame(ICMP(id=ident) / Raw(b"outside"), dst=OUTSIDE, src=ext.snat_ips[0])
    assert out == encapsulated(translated, out[:12], label, sport, BSVC_ADDR, BSVC_VNI, BSVC_MAC,
                               0)


def test_encap_entropy_is_per_flow(xlab, runner):
    """The same frame gives the same bytes; 16 flows (UDP source ports) give
    different flow labels, each consistent with its UDP source port, and
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
    # The seed is random per root: two of 16 flows share a 20-bit label about
    # once in 9000 roots; a hash blind to the port gives one label.
    assert len(labels) >= 15, sorted(labels)
    assert links == set(runner.links.values()), "all 16 flows chose the same underlay"


ROUTE_TO_SLED2 = ("fd00:2::1/128", "nexthop", "via", "fd10:1:1::2", "dev", "u1",
                  "nexthop", "via", "fd10:1:2::2", "dev", "u2")       # as the lab builds it


def route_cache(xlab, dst):
    """The route cache's entries for underlay destination dst: {hash: ifindex}."""
    with xlab.maps("sled1") as maps:
        return {k.hash: v.ifindex for k, v in maps["route_cache"].items()
                if bytes(k.dst) == ip6(dst)}


def clear_route_cache(xlab):
    with xlab.maps("sled1") as maps:
        m = maps["route_cache"]
        for k in m.keys():
            m.delete(k)


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
    clear_route_cache(xlab)     # this is about what the FIB lookup finds
    try:
        frame = g1_frame(ICMP(id=0x79) / Raw(b"no neighbour"))
        rc, out = runner.tc(frame)
    finally:
        xlab.resolve_underlay_neighbours(("sled1",))
    assert rc == TC_ACT_REDIRECT
    label, sport = split_encap(out)
    assert out == encapsulated(frame, bytes(12), label, sport, U2_ADDR, VNI, G2_MAC, 0)


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
    clear_route_cache(xlab)     # this is about what the FIB lookup finds
    try:
        results = [runner.tc(frame) for _ in range(3)]
    finally:
        xlab.resolve_underlay_neighbours(("sled1",))
    after = runner.t.xdectl_json("sled1", "stats", "xde0")["xde0"]["underlay_detours"]
    label, sport = split_encap(out)
    for rc, o in results:
        assert rc == TC_ACT_REDIRECT
        assert o == encapsulated(frame, runner.links[other], label, sport, U2_ADDR, VNI,
                                   G2_MAC, 0), f"not through {other}: {o[:12].hex()}"
    assert after - before == 3


# --- tc_port_out: the underlay route cache ----------------------------------------

def test_route_cache_reuses_the_fibs_answer(xlab, runner):
    """A flow's first packet asks the FIB and caches the answer (a miss);
    the next, within the cache's lifetime, is sent the same way without
    asking (a hit)."""
    xlab.resolve_underlay_neighbours(("sled1",))
    clear_route_cache(xlab)
    frame = g1_frame(UDP(sport=41414, dport=53) / Raw(b"cache me"))
    s0 = xlab.port_stats("sled1")
    first = runner.tc(frame)
    s1 = xlab.port_stats("sled1")
    second = runner.tc(frame)
    s2 = xlab.port_stats("sled1")
    assert first[0] == second[0] == TC_ACT_REDIRECT
    assert first[1] == second[1]
    assert (s1["route_cache_misses"] - s0["route_cache_misses"],
            s1["route_cache_hits"] - s0["route_cache_hits"]) == (1, 0)
    assert (s2["route_cache_misses"] - s1["route_cache_misses"],
            s2["route_cache_hits"] - s1["route_cache_hits"]) == (0, 1)
    assert len(route_cache(xlab, U2_ADDR)) == 1


def test_route_cache_follows_a_route_change_within_its_lifetime(xlab, runner):
    """The route to sled2 changes to one link only: a flow cached on the
    other link leaves through the new one once the cache's 100 ms are over."""
    xlab.resolve_underlay_neighbours(("sled1",))
    clear_route_cache(xlab)
    # a flow the FIB sends over u1
    for sp in range(42000, 42064):
        frame = g1_frame(UDP(sport=sp, dport=53) / Raw(b"move me"))
        rc, out = runner.tc(frame)
        if out[:12] == runner.links["u1"]:
            break
    else:
        pytest.fail("64 flows and none through u1")
    xlab.ip("sled1", "-6", "route", "replace", "fd00:2::1/128", "via", "fd10:1:2::2", "dev", "u2")
    try:
        time.sleep(0.15)
        rc, moved = runner.tc(frame)
    finally:
        xlab.ip("sled1", "-6", "route", "replace", *ROUTE_TO_SLED2)
    assert rc == TC_ACT_REDIRECT
    assert moved[:12] == runner.links["u2"], "the flow stayed on u1 past the cache's lifetime"
    assert moved[12:] == out[12:]


def test_route_cache_never_keeps_a_failed_lookup(xlab, runner):
    """With no route to sled2 the frame is dropped (underlay_unreachable)
    and nothing is cached: once the route is back the next packet goes,
    without waiting for any cache to expire."""
    xlab.resolve_underlay_neighbours(("sled1",))
    clear_route_cache(xlab)
    frame = g1_frame(UDP(sport=43434, dport=53) / Raw(b"no route"))
    before = xlab.port_stats("sled1")
    xlab.ip("sled1", "-6", "route", "del", "fd00:2::1/128")
    try:
        rc, _ = runner.tc(frame)
        cached = route_cache(xlab, U2_ADDR)
    finally:
        xlab.ip("sled1", "-6", "route", "replace", *ROUTE_TO_SLED2)
    assert rc == TC_ACT_SHOT
    assert xlab.port_stats("sled1")["drop_out_underlay_unreachable"] - \
        before["drop_out_underlay_unreachable"] == 1
    assert cached == {}, f"a failed lookup was cached: {cached}"
    rc, out = runner.tc(frame)
    assert rc == TC_ACT_REDIRECT and out[:12] in runner.links.values()


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


def test_tc_unknown_port_dropped(xlab, runner):
    """A device that is not a port (sled1's u1): dropped, counted globally."""
    before = xlab.global_stats("sled1")
    rc, _ = runner.tc(g1_frame(ICMP()), ifindex=xlab.ifindex("sled1", "u1"))
    assert rc == TC_ACT_SHOT
    assert xlab.global_stats("sled1")["drop_out_unknown_port"] - before["drop_out_unknown_port"] == 1


# --- xdp_underlay ----------------------------------------------------------------

def test_xdp_truncated_ipv6_payload_dropped(runner):
    """IPv6 payload length claiming more than the frame holds: truncated."""
    f = bytearray(underlay_frame(geneve() + inner_udp(b"short")))
    struct.pack_into("!H", f, 18, struct.unpack_from("!H", f, 18)[0] + 100)
    rc, _ = runner.xdp(bytes(f))
    assert rc == XDP_DROP


# --- the fixture table (tests/cases.py) ----------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case(xlab, runner, case):
    """The case's verdict, its exact output frame, and its counters: the
    port's listed ones move by exactly that much, and of the root's drops
    exactly the listed ones move."""
    port0, root0 = xlab.port_stats("sled1"), xlab.global_stats("sled1")
    rc, out = runner.run(case.prog, case.frame)
    port1, root1 = xlab.port_stats("sled1"), xlab.global_stats("sled1")
    assert rc == case.verdict
    if case.output is not None:
        assert out == case.output, f"output {out.hex()}\nwanted {case.output.hex()}"
    assert {k: port1[k] - port0[k] for k in case.port} == case.port
    assert {k: root1[k] - root0[k] for k in case.root} == case.root
    root_drops = {k: root1[k] - root0[k] for k in root1
                  if k.startswith("drop_") and root1[k] != root0[k]}
    assert root_drops == {k: v for k, v in case.root.items() if k.startswith("drop_")}
