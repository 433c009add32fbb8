"""End-to-end overlay tests in the namespace lab (docs/design.md,
"The datapath", "The lab" and "How it is proved"): real traffic between guests
on two sleds through the attached XDP and TC programs, the gateway, boundary
services, two VPCs with overlapping addresses, ECMP over both underlays and
failover, anti-spoofing, and malformed Geneve injected on the underlay.

All tests share one lab (lab_fixture.xlab). A test that changes the lab puts
it back in a finally block.
"""
import hashlib
import io
import json
import random
import subprocess
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

from cases import malformed_cases, valid_cases
from frames import (BSVC_ADDR, G1_IP, G1_MAC, G2_IP, G2_MAC, GW_IP, GW_MAC, OUTSIDE, U1_ADDR,
                    U2_ADDR, geneve, inner_icmp, inner_udp, underlay_frame)





def start_udp_sink(t, host, addr, port):
    return t.start_helper(host, "udp_sink.py", addr, port)


def sink_result(p, timeout=30):
    out, err = p.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, f"udp sink printed nothing; stderr: {err}"
    return json.loads(lines[-1])


def delta(after, before, *keys):
    return {k: after[k] - before[k] for k in keys}


# --- reachability -------------------------------------------------------------

@pytest.mark.parametrize("src,dst_ip,src_sled,dst_sled", [
    ("g1", G2_IP, "sled1", "sled2"),
    ("g2", G1_IP, "sled2", "sled1"),
])
def test_guest_to_guest_ping(xlab, src, dst_ip, src_sled, dst_sled):
    """Guest to guest across sleds, both ways: encapsulated on one sled,
    decapsulated on the other, and the same on the way back."""
    a0, b0 = xlab.port_stats(src_sled), xlab.port_stats(dst_sled)
    xlab.must_ping(src, dst_ip, count=5)
    a1, b1 = xlab.port_stats(src_sled), xlab.port_stats(dst_sled)
    assert a1["encap"] - a0["encap"] >= 5 and a1["decap"] - a0["decap"] >= 5, (a0, a1)
    assert b1["encap"] - b0["encap"] >= 5 and b1["decap"] - b0["decap"] >= 5, (b0, b1)


@pytest.mark.parametrize("guest,sled", [("g1", "sled1"), ("g2", "sled2")])
def test_guest_to_gateway(xlab, guest, sled):
    """The datapath answers ping for the gateway IP itself: nothing is
    encapsulated, and every request is counted as answered."""
    before = xlab.port_stats(sled)
    xlab.must_ping(guest, GW_IP, count=4)
    after = xlab.port_stats(sled)
    assert after["icmp_replies"] - before["icmp_replies"] == 4
    assert after["encap"] - before["encap"] == 0
    # the guest learnt the gateway's MAC from the datapath's ARP reply
    neigh = xlab.ip(guest, "neigh", "show", GW_IP, "dev", "xde0").stdout
    assert GW_MAC in neigh.lower(), neigh


@pytest.mark.parametrize("guest,sled", [("g1", "sled1"), ("g2", "sled2")])
def test_guest_to_outside_via_boundary_services(xlab, guest, sled):
    """An address outside the VPC: routed `ig`, encapsulated to boundary
    services (VNI 99), answered there, and the reply decapsulated."""
    before = xlab.port_stats(sled)
    xlab.must_ping(guest, OUTSIDE, count=3)
    after = xlab.port_stats(sled)
    assert after["encap"] - before["encap"] >= 3
    assert after["decap"] - before["decap"] >= 3


def test_full_size_frames_cross_with_df(xlab):
    """A 1500-byte guest packet with DF set fits the encapsulation on the
    lab's underlay: no fragmentation, no drop (both ways)."""
    for guest, addr in (("g1", G2_IP), ("g2", G1_IP)):
        xlab.must_ping(guest, addr, count=3, extra=("-s", "1472", "-M", "do"))


# --- TCP and UDP ------------------------------------------------------------------




@pytest.mark.parametrize("src,dst,dst_ip", [("g1", "g2", G2_IP), ("g2", "g1", G1_IP)])
def test_tcp_transfer_8mb(xlab, src, dst, dst_ip):
    """8 MB of random bytes over one TCP connection arrive intact (the far end
    checks length and SHA-256): segmentation offload through the encap works."""
    size = 8 << 20
    xlab.resolve_underlay_neighbours()
    src_sled = "sled1" if src == "g1" else "sled2"
    csum0 = xlab.nstat(dst, "TcpInCsumErrors")["TcpInCsumErrors"]
    st0 = xlab.port_stats(src_sled)
    server = xlab.start_helper(dst, "tcp_sink.py", dst_ip, 5001)
    sent, out, err = [], "", ""
    try:
        t0 = time.monotonic()
        client = xlab.helper(src, "tcp_send.py", dst_ip, 5001, size, timeout=60, check=False)
        sent = client.stdout.split()
        out, err = server.communicate(timeout=30)
        took = time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - reported with the diagnosis below
        err += repr(e)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    got = out.split()
    csum = xlab.nstat(dst, "TcpInCsumErrors")["TcpInCsumErrors"] - csum0
    st1 = xlab.port_stats(src_sled)
    diag = (f"{dst} TcpInCsumErrors +{csum}; {src_sled} xde0 drop_out_underlay_unreachable "
            f"+{st1['drop_out_underlay_unreachable'] - st0['drop_out_underlay_unreachable']}, "
            f"encap +{st1['encap'] - st0['encap']}; client: {client.stderr.strip()[-300:]!r}; "
            f"server: {err.strip()[-300:]!r}" if sent or err else "")
    assert sent and got == sent, f"sent {sent}, server got {got}: {diag}"
    assert int(got[1]) == size
    print(f"8 MB {src}->{dst} in {took:.2f} s")


@pytest.mark.parametrize("src,dst,src_ip,dst_ip", [("g1", "g2", G1_IP, G2_IP),
                                                   ("g2", "g1", G2_IP, G1_IP)])
def test_udp_datagrams_intact(xlab, src, dst, src_ip, dst_ip):
    """UDP datagrams of many sizes, including ones the guest fragments
    (3000, 8000 bytes), all arrive once and unchanged."""
    rng = random.Random(7)
    sizes = [1, 18, 100, 512, 1000, 1400, 1472, 3000, 8000] * 6
    payloads = [rng.randbytes(n) for n in sizes]
    expect = sorted([len(p), hashlib.sha256(p).hexdigest()] for p in payloads)
    xlab.resolve_underlay_neighbours()
    csum0 = xlab.nstat(dst, "UdpInCsumErrors")["UdpInCsumErrors"]
    sink = start_udp_sink(xlab, dst, dst_ip, 5002)
    try:
        code = (
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(({src_ip!r}, 45000))\n"
            "for h in sys.stdin.read().split():\n"
            f"    s.sendto(bytes.fromhex(h), ({dst_ip!r}, 5002)); time.sleep(0.002)\n"
            "time.sleep(0.2)\n"
            f"[s.sendto(b'END', ({dst_ip!r}, 5002)) for _ in range(3)]\n")
        xlab.python(src, code, input="\n".join(p.hex() for p in payloads))
        got = sink_result(sink)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    csum = xlab.nstat(dst, "UdpInCsumErrors")["UdpInCsumErrors"] - csum0
    assert sorted([n, h] for _, n, h in got) == expect, \
        f"{len(got)} of {len(expect)} datagrams arrived; {dst} UdpInCsumErrors +{csum}"
    assert {sp for sp, _, _ in got} == {45000}


# --- guest addressing ------------------------------------------------------------

def test_slash32_guest_with_gateway_route(xlab):
    """The lab's guests are configured by the gateway's DHCP as 10.0.0.x/32,
    with option 121's link route to the gateway and default route through
    it: g1 reaches its peer, the gateway and the outside, and only the
    gateway is resolved (the peer is reached through it)."""
    ip = xlab.ip
    addrs = ip("g1", "-4", "-o", "addr", "show", "dev", "xde0").stdout
    assert f"{G1_IP}/32" in addrs and f"{G1_IP}/24" not in addrs, addrs
    route = ip("g1", "route", "get", G2_IP).stdout
    assert f"via {GW_IP}" in route, route
    ip("g1", "neigh", "flush", "dev", "xde0")
    xlab.must_ping("g1", G2_IP, count=3)
    xlab.must_ping("g1", GW_IP, count=2)
    xlab.must_ping("g1", OUTSIDE, count=2)
    neigh = ip("g1", "neigh", "show", "dev", "xde0").stdout
    assert GW_IP in neigh and G2_IP not in neigh, neigh


def test_onlink_slash24_guest(xlab):
    """A guest configured statically as 10.0.0.1/24 (beside its lease's /32)
    has its peer on-link: it ARPs for the peer directly and the gateway
    answers (proxy ARP) with its own MAC."""
    ip = xlab.ip
    try:
        ip("g1", "addr", "add", f"{G1_IP}/24", "dev", "xde0")
        route = ip("g1", "route", "get", G2_IP).stdout
        assert "via" not in route and "dev xde0" in route, route
        ip("g1", "neigh", "flush", "dev", "xde0")
        before = xlab.port_stats("sled1")
        xlab.must_ping("g1", G2_IP, count=3)
        after = xlab.port_stats("sled1")
        assert after["arp_replies"] - before["arp_replies"] >= 1
        neigh = ip("g1", "neigh", "show", G2_IP, "dev", "xde0").stdout.lower()
        assert f"lladdr {GW_MAC}" in neigh, neigh
    finally:
        ip("g1", "addr", "del", f"{G1_IP}/24", "dev", "xde0", check=False)
        ip("g1", "neigh", "flush", "dev", "xde0", check=False)
    addrs = ip("g1", "-4", "-o", "addr", "show", "dev", "xde0").stdout
    assert f"{G1_IP}/32" in addrs and f"{G1_IP}/24" not in addrs, addrs
    assert f"via {GW_IP}" in ip("g1", "route", "get", G2_IP).stdout
    xlab.must_ping("g1", G2_IP, count=2)


# --- two VPCs ----------------------------------------------------------------------

VNI20 = 20
V20 = {"sled1": ("v1", "a8:40:25:ff:20:01", G1_IP, U1_ADDR),
       "sled2": ("v2", "a8:40:25:ff:20:02", G2_IP, U2_ADDR)}


def _create_port(t, sled, name, guest, mac, ip, vni, underlay):
    """Another port on sled, its guest end in a new namespace `guest`."""
    t.xdectl(sled, "create", name, "--underlay", "u1", "--underlay", "u2",
             "--mac", mac, "--ip", ip, "--gateway-mac", GW_MAC, "--gateway-ip", GW_IP,
             "--boundary-services", BSVC_ADDR, "--boundary-vni", "99",
             "--vni", str(vni), "--underlay-addr", underlay, "--vpc-subnet", "10.0.0.0/24")
    subprocess.run(["ip", "netns", "add", t.ns(guest)], check=True)
    t.ip(guest, "link", "set", "lo", "up")
    t.ip(sled, "link", "set", name, "netns", t.ns(guest))
    t.ip(guest, "addr", "add", f"{ip}/24", "dev", name)
    t.ip(guest, "link", "set", name, "up")
    t.ip(guest, "route", "add", GW_IP, "dev", name, "scope", "link")
    t.ip(guest, "route", "add", "default", "via", GW_IP, "dev", name)


def _remove_port(t, sled, name, guest):
    t.xdectl(sled, "delete", name, check=False)
    subprocess.run(["ip", "netns", "del", t.ns(guest)], check=False, capture_output=True)


def _create_vni20_port(t, sled):
    guest, mac, ip, under = V20[sled]
    _create_port(t, sled, "xde1", guest, mac, ip, VNI20, under)


def test_two_vpcs_with_overlapping_addresses_stay_isolated(xlab):
    """VNI 20 gets a port on each sled with the SAME guest IPs as VNI 10 and
    other MACs. Each VPC reaches its own peer only; with VNI 20's V2P entry
    removed, VNI 20 traffic is dropped instead of leaking into VNI 10; and a
    Geneve frame carrying VNI 10 for a VNI 20 MAC finds no port."""
    made = []
    try:
        for sled in ("sled1", "sled2"):
            made.append(sled)
            _create_vni20_port(xlab, sled)
        xlab.xdectl("sled1", "set-v2p", G2_IP, V20["sled2"][1], U2_ADDR, str(VNI20))
        xlab.xdectl("sled2", "set-v2p", G1_IP, V20["sled1"][1], U1_ADDR, str(VNI20))
        v2p = xlab.xdectl_json("sled1", "dump-v2p")
        assert {"vni": 20, "ip": G2_IP, "mac": V20["sled2"][1], "underlay": U2_ADDR} in v2p
        assert {"vni": 10, "ip": G2_IP, "mac": G2_MAC, "underlay": U2_ADDR} in v2p

        # VNI 20 reaches VNI 20's 10.0.0.2, never g2
        g2_0, h2_0 = xlab.port_stats("sled2", "xde0"), xlab.port_stats("sled2", "xde1")
        xlab.must_ping("v1", G2_IP, count=4)
        g2_1, h2_1 = xlab.port_stats("sled2", "xde0"), xlab.port_stats("sled2", "xde1")
        assert h2_1["rx_packets"] - h2_0["rx_packets"] >= 4
        assert g2_1["rx_packets"] == g2_0["rx_packets"], "VNI 20 traffic reached the VNI 10 guest"
        # ... and back: VNI 20 on sled2 reaches VNI 20 on sled1, not g1
        g1_0 = xlab.port_stats("sled1", "xde0")
        xlab.must_ping("v2", G1_IP, count=3)
        assert xlab.port_stats("sled1", "xde0")["rx_packets"] == g1_0["rx_packets"]

        # VNI 10 reaches g2, never VNI 20's guest
        h2_0 = xlab.port_stats("sled2", "xde1")
        xlab.must_ping("g1", G2_IP, count=4)
        assert xlab.port_stats("sled2", "xde1")["rx_packets"] == h2_0["rx_packets"]

        # no V2P for 10.0.0.2 in VNI 20: dropped and counted, nothing leaks
        xlab.xdectl("sled1", "clear-v2p", G2_IP, V20["sled2"][1], U2_ADDR, str(VNI20))
        h1_0 = xlab.port_stats("sled1", "xde1")
        g2_0, h2_0 = xlab.port_stats("sled2", "xde0"), xlab.port_stats("sled2", "xde1")
        ok, out = xlab.ping("v1", G2_IP, count=3)
        assert not ok, out
        h1_1 = xlab.port_stats("sled1", "xde1")
        assert h1_1["drop_out_no_v2p"] - h1_0["drop_out_no_v2p"] == 3
        assert h1_1["encap"] == h1_0["encap"]
        assert xlab.port_stats("sled2", "xde0")["rx_packets"] == g2_0["rx_packets"]
        assert xlab.port_stats("sled2", "xde1")["rx_packets"] == h2_0["rx_packets"]

        # decap side: the port is looked up by (VNI, MAC), not by MAC alone
        g0 = xlab.global_stats("sled2")
        inner = inner_udp(b"XDE-ISOLATION", dst_mac=V20["sled2"][1], src_mac=G1_MAC,
                          src=G1_IP, dst=G2_IP)
        frame = underlay_frame(geneve(vni=10) + inner, xlab.mac("sled2", "u1"),
                               xlab.mac("sw1", "sled2"), src=U1_ADDR, dst=U2_ADDR)
        xlab.send_frames("sw1", "sled2", [frame] * 3)
        time.sleep(0.3)
        assert xlab.global_stats("sled2")["drop_in_no_port"] - g0["drop_in_no_port"] == 3
        assert xlab.port_stats("sled2", "xde1")["rx_packets"] == h2_0["rx_packets"]
    finally:
        for sled in made:
            _remove_port(xlab, sled, "xde1", V20[sled][0])
        xlab.xdectl("sled1", "clear-v2p", G2_IP, V20["sled2"][1], U2_ADDR, str(VNI20), check=False)
        xlab.xdectl("sled2", "clear-v2p", G1_IP, V20["sled1"][1], U1_ADDR, str(VNI20), check=False)
    assert [p["name"] for p in xlab.xdectl_json("sled1", "list")] == ["xde0"]
    xlab.must_ping("g1", G2_IP, count=2)


def test_same_host_ports_talk_without_the_wire(xlab):
    """A second VNI 10 port on sled1 (10.0.0.3): g1 and it reach each other
    by direct delivery -- nothing is encapsulated -- and g2 reaches it over
    the underlay once sled2 has its V2P entry."""
    mac3, ip3 = "a8:40:25:ff:00:03", "10.0.0.3"
    try:
        _create_port(xlab, "sled1", "xde2", "l3", mac3, ip3, 10, U1_ADDR)
        a0, c0 = xlab.port_stats("sled1", "xde0"), xlab.port_stats("sled1", "xde2")
        xlab.must_ping("g1", ip3, count=3)
        xlab.must_ping("l3", G1_IP, count=3)
        a1, c1 = xlab.port_stats("sled1", "xde0"), xlab.port_stats("sled1", "xde2")
        assert a1["encap"] == a0["encap"] and c1["encap"] == c0["encap"]
        assert c1["rx_packets"] - c0["rx_packets"] >= 6
        assert a1["rx_packets"] - a0["rx_packets"] >= 6
        assert "lladdr " + GW_MAC in xlab.ip("l3", "neigh", "show", G1_IP).stdout.lower()
        xlab.xdectl("sled2", "set-v2p", ip3, mac3, U1_ADDR, "10")
        xlab.must_ping("g2", ip3, count=2)
    finally:
        _remove_port(xlab, "sled1", "xde2", "l3")
        xlab.xdectl("sled2", "clear-v2p", ip3, mac3, U1_ADDR, "10", check=False)
    assert [p["name"] for p in xlab.xdectl_json("sled1", "list")] == ["xde0"]


# --- ECMP and failover -----------------------------------------------------------

def test_flows_spread_over_both_underlays(xlab):
    """16 UDP flows (distinct source ports) leave sled1 over both u1 and u2:
    the outer entropy reaches the kernel's multipath choice."""
    xlab.resolve_underlay_neighbours()
    tx0 = {u: xlab.tx_packets("sled1", u) for u in ("u1", "u2")}
    enc0 = xlab.port_stats("sled1")["encap"]
    npk = 30
    xlab.helper("g1", "udp_flows.py", G2_IP, 9, 46000, 16, npk, G1_IP)
    tx1 = {u: xlab.tx_packets("sled1", u) for u in ("u1", "u2")}
    enc = xlab.port_stats("sled1")["encap"] - enc0
    d = {u: tx1[u] - tx0[u] for u in tx0}
    assert enc >= 16 * npk
    # every flow sticks to one path, so each underlay carries whole flows
    assert d["u1"] >= npk and d["u2"] >= npk, f"tx per underlay: {d}"


def test_new_flows_delivered_while_next_hops_unresolved(xlab):
    """With sled1's underlay neighbour entries gone (a fresh host, or after
    the kernel aged them out), the first packets of 32 new flows must still
    arrive: bpf_fib_lookup reports NO_NEIGH and bpf_redirect_neigh must
    resolve the next hop that lookup chose, on the interface it chose.
    Raw frames with correct checksums, one per flow."""
    sink = start_udp_sink(xlab, "g2", G2_IP, 5004)
    try:
        for dev in ("u1", "u2"):
            xlab.ip("sled1", "-6", "neigh", "flush", "dev", dev)
        sports = range(43000, 43032)
        xlab.send_frames("g1", "xde0", xlab.udp_frames(sports, G2_IP, 5004), gap=0.02)
        time.sleep(1.5)
        xlab.send_frames("g1", "xde0", xlab.end_frames(G2_IP, 5004))
        got = sink_result(sink)
        neigh = xlab.ip("sled1", "-6", "neigh", "show").stdout
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
        for dev in ("u1", "u2"):
            xlab.ip("sled1", "-6", "neigh", "flush", "dev", dev, check=False)
        xlab.resolve_underlay_neighbours()
    lost = sorted(set(sports) - {sp for sp, _, _ in got})
    assert not lost, (f"{len(lost)} of 32 new flows never arrived; sled1 neighbours "
                      f"afterwards:\n{neigh}")


def _route_state(t, host):
    """The routes of host that xdectl and the lab made (not the kernel)."""
    rows = json.loads(t.ip(host, "-j", "-6", "route", "show", "table", "all").stdout)
    out = []
    for r in rows:
        if r.get("protocol") == "kernel" or r.get("type") in ("local", "multicast"):
            continue
        nh = sorted((n.get("gateway"), n.get("dev")) for n in r.get("nexthops", []))
        out.append((r.get("dst"), r.get("table", "main"), r.get("gateway"), r.get("dev"),
                    tuple(nh), tuple(sorted(r.get("flags", [])))))
    return sorted(out, key=repr)


def _restore_u1(t):
    """Bring sled1's u1 and sw1's side back, and put back what the kernel
    dropped on link down: the switch's address, the lab's routes."""
    t.ip("sled1", "link", "set", "u1", "up", check=False)
    t.ip("sw1", "link", "set", "sled1", "up", check=False)
    t.ip("sled1", "addr", "replace", "fd10:1:1::1/64", "dev", "u1", "nodad", check=False)
    t.ip("sw1", "addr", "replace", "fd10:1:1::2/64", "dev", "sled1", "nodad", check=False)
    t.ip("sw1", "-6", "route", "replace", f"{U1_ADDR}/128", "via", "fd10:1:1::1", "dev", "sled1",
         check=False)
    for dst in (U2_ADDR, BSVC_ADDR):
        t.ip("sled1", "-6", "route", "replace", f"{dst}/128", "nexthop", "via", "fd10:1:1::2",
             "dev", "u1", "nexthop", "via", "fd10:1:2::2", "dev", "u2", check=False)
    t.ip("sled2", "-6", "route", "replace", f"{U1_ADDR}/128", "nexthop", "via", "fd10:2:1::2",
         "dev", "u1", "nexthop", "via", "fd10:2:2::2", "dev", "u2", check=False)


def test_underlay_link_down_traffic_continues(xlab):
    """sled1's u1 goes down (both ends). sled1's encapsulated traffic then
    leaves through u2 only, and every flow still arrives. (sled2's route back
    through sw1 is withdrawn, as the fabric's routing would do: sw1 has lost
    its only path to sled1.) The 16 UDP flows are sent as raw frames with
    their checksums filled in, so this test does not depend on checksum
    offload (test_udp_datagrams_intact covers that)."""
    xlab.resolve_underlay_neighbours()
    before = {h: _route_state(xlab, h) for h in ("sled1", "sled2", "sw1")}
    sink = None
    try:
        xlab.ip("sled1", "link", "set", "u1", "down")
        xlab.ip("sw1", "link", "set", "sled1", "down")
        xlab.ip("sled2", "-6", "route", "replace", f"{U1_ADDR}/128", "via", "fd10:2:2::2",
                "dev", "u2")
        tx0 = {u: xlab.tx_packets("sled1", u) for u in ("u1", "u2")}
        xlab.must_ping("g1", G2_IP, count=10)
        xlab.must_ping("g2", G1_IP, count=5)
        sink = start_udp_sink(xlab, "g2", G2_IP, 5003)
        npk = 10
        sports = range(47000, 47016)
        xlab.send_frames("g1", "xde0", xlab.udp_frames(sports, G2_IP, 5003, count=npk), gap=0.002)
        time.sleep(0.2)
        xlab.send_frames("g1", "xde0", xlab.end_frames(G2_IP, 5003))
        got = sink_result(sink)
        tx1 = {u: xlab.tx_packets("sled1", u) for u in ("u1", "u2")}
        per_flow = {}
        for sport, _, _ in got:
            per_flow[sport] = per_flow.get(sport, 0) + 1
        assert per_flow == {47000 + i: npk for i in range(16)}, per_flow
        assert tx1["u1"] == tx0["u1"]
        assert tx1["u2"] - tx0["u2"] >= 16 * npk + 10
    finally:
        if sink is not None and sink.poll() is None:
            sink.kill()
            sink.wait()
        _restore_u1(xlab)
    # the lab is as it was, and u1 carries traffic again
    after = {h: _route_state(xlab, h) for h in ("sled1", "sled2", "sw1")}
    assert after == before
    xlab.resolve_underlay_neighbours()
    xlab.must_ping("g1", G2_IP, count=2)
    tx0 = xlab.tx_packets("sled1", "u1")
    xlab.helper("g1", "udp_flows.py", G2_IP, 9, 48000, 16, 5, G1_IP)
    assert xlab.tx_packets("sled1", "u1") - tx0 >= 5


# --- anti-spoofing ----------------------------------------------------------------

def _spoofed(kind, n):
    e = Ether(src=G1_MAC, dst=GW_MAC)
    if kind == "source_mac":
        e = Ether(src="a8:40:25:ff:00:66", dst=GW_MAC)
    if kind == "arp_sender_ip":
        return [bytes(Ether(src=G1_MAC, dst="ff:ff:ff:ff:ff:ff") /
                      ARP(op=1, hwsrc=G1_MAC, psrc="10.0.0.66", pdst=G2_IP))] * n
    src = "10.0.0.66" if kind == "source_ip" else G1_IP
    return [bytes(e / IP(src=src, dst=G2_IP) / UDP(sport=41000 + i, dport=9) / Raw(b"spoof"))
            for i in range(n)]


@pytest.mark.parametrize("kind", ["source_mac", "source_ip", "arp_sender_ip"])
def test_spoofed_source_dropped_and_counted(xlab, kind):
    """Frames from g1 with another source MAC or IP are dropped; drop_out_spoof
    (as `xdectl stats xde0 --json` shows it) rises by exactly the number
    sent, and nothing is encapsulated."""
    n = 5
    before = xlab.cli_stats("sled1")
    g2_before = xlab.port_stats("sled2")
    xlab.send_frames("g1", "xde0", _spoofed(kind, n), gap=0.01)
    time.sleep(0.3)
    after = xlab.cli_stats("sled1")
    assert after["drop_out_spoof"] - before["drop_out_spoof"] == n
    assert after["encap"] == before["encap"]
    assert after["arp_replies"] == before["arp_replies"]
    assert xlab.port_stats("sled2")["rx_packets"] == g2_before["rx_packets"]


# --- malformed Geneve on the underlay ----------------------------------------------

MARK = b"XDE-MARK-"
GLOBAL_DROPS = ("drop_in_no_port", "drop_in_arp_in_geneve", "drop_in_malformed_truncated",
                "drop_in_malformed_version", "drop_in_malformed_options", "drop_in_malformed_critical_option",
                "drop_in_malformed_protocol", "drop_in_malformed_inner", "drop_out_unknown_port")


def _inject(t, payloads, tmp_path, name):
    """Send Geneve payloads from sw1 to sled1's u1 (outer: sled2 -> sled1),
    capturing g1's xde0 meanwhile. Returns the captured bytes."""
    dmac, smac = t.mac("sled1", "u1"), t.mac("sw1", "sled1")
    frames = [underlay_frame(p, dmac, smac) for p in payloads]
    pcap = tmp_path / f"{name}.pcap"
    with t.capture("g1", "xde0", pcap, "ip"):
        t.send_frames("sw1", "sled1", frames, gap=0.01)
    return pcap.read_bytes()


@pytest.mark.parametrize("case", malformed_cases(MARK), ids=lambda c: c[0])
def test_malformed_geneve_dropped_and_counted(xlab, tmp_path, case):
    """Each kind of bad Geneve for our underlay address is dropped in XDP,
    counted under its own reason, and never reaches the guest."""
    name, payload, counter = case
    n = 3
    g0, p0 = xlab.global_stats("sled1"), xlab.port_stats("sled1")
    seen = _inject(xlab, [payload] * n, tmp_path, name)
    g1, p1 = xlab.global_stats("sled1"), xlab.port_stats("sled1")
    changed = {k: g1[k] - g0[k] for k in GLOBAL_DROPS if g1[k] != g0[k]}
    assert changed == {counter: n}, f"global counters moved: {changed}"
    assert p1["rx_packets"] == p0["rx_packets"] and p1["decap"] == p0["decap"]
    assert MARK not in seen, "a malformed frame's inner packet reached g1"


@pytest.mark.parametrize("case", valid_cases(MARK), ids=lambda c: c[0])
def test_valid_geneve_with_options_delivered(xlab, tmp_path, case):
    """Well-formed Geneve for g1 (VNI 10, g1's MAC), with Oxide options
    (External, Multicast, MSS) or an unknown non-critical option, is
    decapsulated and delivered, the source MAC rewritten to the gateway's."""
    name, payload = case
    n = 2
    g0, p0 = xlab.global_stats("sled1"), xlab.port_stats("sled1")
    seen = _inject(xlab, [payload] * n, tmp_path, name)
    g1, p1 = xlab.global_stats("sled1"), xlab.port_stats("sled1")
    assert {k: g1[k] - g0[k] for k in GLOBAL_DROPS if g1[k] != g0[k]} == {}
    assert p1["decap"] - p0["decap"] == n
    assert p1["rx_packets"] - p0["rx_packets"] == n
    tag = MARK + name.encode()
    # what g1 received (not its ICMP errors quoting them on the way out)
    frames = [Ether(bytes(p)) for p in rdpcap(io.BytesIO(seen))]
    got = [f for f in frames if f.dst == G1_MAC and ICMP in f and f[ICMP].type == 8 and
           bytes(f[ICMP].payload) == tag]
    assert len(got) == n, f"g1 received {len(got)} of {n}: {[f.summary() for f in frames]}"
    assert all(f.src == GW_MAC for f in got), [f.src for f in got]
    sent = inner_icmp(tag)
    assert bytes(got[0]) == sent[:6] + bytes.fromhex(GW_MAC.replace(":", "")) + sent[12:], \
        "the delivered frame is not the inner frame with the gateway's source MAC"


def test_host_traffic_on_underlay_still_works(xlab, tmp_path):
    """Not Geneve for us: the XDP program passes it to the host untouched.
    sw1 pings sled1's underlay address, and Geneve to another address is not
    treated as ours."""
    before = xlab.global_stats("sled1")
    out = xlab.run("sw1", "ping", "-6", "-c", "3", "-i", "0.2", "-W", "1", U1_ADDR).stdout
    assert "3 received" in out, out
    after = xlab.global_stats("sled1")
    assert after["passed_to_host"] - before["passed_to_host"] >= 3
    assert {k: after[k] - before[k] for k in GLOBAL_DROPS if after[k] != before[k]} == {}

    # well-formed Geneve for g1, but to an underlay address that is not sled1's
    tag = MARK + b"not-ours"
    frame = underlay_frame(geneve() + inner_udp(tag), xlab.mac("sled1", "u1"),
                           xlab.mac("sw1", "sled1"), dst="fd00:1::99")
    p0, g0 = xlab.port_stats("sled1"), xlab.global_stats("sled1")
    pcap = tmp_path / "not-ours.pcap"
    with xlab.capture("g1", "xde0", pcap, "ip"):
        xlab.send_frames("sw1", "sled1", [frame] * 3, gap=0.01)
    p1, g1 = xlab.port_stats("sled1"), xlab.global_stats("sled1")
    assert g1["passed_to_host"] - g0["passed_to_host"] >= 3
    assert {k: g1[k] - g0[k] for k in GLOBAL_DROPS if g1[k] != g0[k]} == {}
    assert p1["decap"] == p0["decap"]
    assert tag not in pcap.read_bytes()
