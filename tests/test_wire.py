"""The wire format (docs/design.md, "Wire format"), read back from captures of
real lab traffic, by scapy and by tshark.

One capture session per module: on the switch side of sled1's two underlay
links (sw1/sled1 and sw2/sled1 see exactly what sled1's u1 and u2 transmit
and receive) and in g1, while g1 pings g2 (with and without a DSCP), sends
a few UDP flows (one with DSCP+ECN) and opens a TCP connection.
"""
import collections
import subprocess
import time

import pytest
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from frames import G1_IP, G1_MAC, G2_IP, G2_MAC, GENEVE_PORT, GW_MAC, U1_ADDR, U2_ADDR, VNI


UDP_SPORTS = (44001, 44002, 44003, 44004)
UDP_TOS = {44004: 0x2A}          # AF11 + ECT(0): DSCP and ECN both carried out
PING_TOS = 0xB8                  # EF
UDP_DPORT, TCP_DPORT = 7000, 7001

SENDER = r"""
import socket, sys, time
dst, dport = sys.argv[1], int(sys.argv[2])
socks = []
for arg in sys.argv[3:]:
    sport, tos = (int(x, 0) for x in arg.split(":"))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    s.bind(("0.0.0.0", sport))
    socks.append(s)
for k in range(5):
    for s in socks:
        s.sendto(b"wire test %d" % k, (dst, dport))
    time.sleep(0.05)
# one 5-tuple from two sockets in turn, each connected
for k in range(2):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", 44010))
    c.connect((dst, dport))
    for _ in range(3):
        c.send(b"same five-tuple %d" % k)
        time.sleep(0.02)
    c.close()
t = socket.socket()
t.settimeout(1.5)
try:
    t.connect((dst, int(sys.argv[2]) + 1))
    t.send(b"hello")
except OSError:
    pass
"""


# g2 -> g1: two UDP flows (checksums offloaded by g2's stack), into a sink
G2_SENDER = r"""
import socket, sys, time
socks = []
for sport in (44101, 44102):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport))
    socks.append(s)
for k in range(5):
    for s in socks:
        s.sendto(b"from g2 %d" % k, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.05)
"""


def geneve_of(pkt):
    """The GENEVE layer of an outer packet, decoded by scapy whatever its ports."""
    udp = pkt[UDP]
    if GENEVE in udp:
        return udp[GENEVE]
    return GENEVE(bytes(udp.payload))


def flow_key(inner):
    """Inner 5-tuple (ICMP echo: addresses and the echo id, which xde mixes
    into the flow hash so that pings spread over ECMP like other flows)."""
    ip = inner[IP]
    if TCP in ip:
        return ("tcp", ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport)
    if UDP in ip:
        return ("udp", ip.src, ip.dst, ip[UDP].sport, ip[UDP].dport)
    return (ip.proto, ip.src, ip.dst, ip[ICMP].type if ICMP in ip else None,
            ip[ICMP].id if ICMP in ip else None)


@pytest.fixture(scope="module")
def wire(xlab, tmp_path_factory):
    d = tmp_path_factory.mktemp("wire")
    out = {}
    xlab.resolve_underlay_neighbours()
    files = {"u1": d / "u1.pcap", "u2": d / "u2.pcap", "g1": d / "g1.pcap"}
    with xlab.capture("sw1", "sled1", files["u1"], f"ip6 and udp port {GENEVE_PORT}"), \
            xlab.capture("sw2", "sled1", files["u2"], f"ip6 and udp port {GENEVE_PORT}"), \
            xlab.capture("g1", "xde0", files["g1"], "ip"):
        xlab.must_ping("g1", G2_IP, count=4, extra=("-Q", hex(PING_TOS)))
        xlab.must_ping("g1", G2_IP, count=4)
        args = [f"{sp}:{UDP_TOS.get(sp, 0)}" for sp in UDP_SPORTS]
        xlab.python("g1", SENDER, G2_IP, UDP_DPORT, *args)
        sink = xlab.start_helper("g1", "udp_count.py", G1_IP, UDP_DPORT)
        try:
            xlab.python("g2", G2_SENDER, G1_IP, UDP_DPORT)
            out["g1_sink"] = int(sink.communicate(timeout=20)[0].split()[-1])
        finally:
            if sink.poll() is None:
                sink.kill()
                sink.wait()
        time.sleep(0.3)
    for link in ("u1", "u2"):
        pkts = [Ether(bytes(p)) for p in rdpcap(str(files[link]))]
        out[link] = [(link, p) for p in pkts]
    out["g1"] = [Ether(bytes(p)) for p in rdpcap(str(files["g1"]))]
    out["files"] = files
    return out


def outbound(wire):
    """(link, packet) for every Geneve packet sled1 sent."""
    return [(l, p) for l, p in wire["u1"] + wire["u2"] if IPv6 in p and p[IPv6].src == U1_ADDR]


def inbound(wire):
    return [(l, p) for l, p in wire["u1"] + wire["u2"] if IPv6 in p and p[IPv6].src == U2_ADDR]


def test_capture_saw_every_flow(wire):
    keys = {flow_key(geneve_of(p).payload) for _, p in outbound(wire)}
    for sp in UDP_SPORTS:
        assert ("udp", G1_IP, G2_IP, sp, UDP_DPORT) in keys, keys
    assert any(k[0] == "tcp" and k[4] == TCP_DPORT for k in keys), keys
    # the two ping runs: two echo ids, two flows
    assert len({k for k in keys if k[:4] == (1, G1_IP, G2_IP, 8)}) == 2, keys
    ikeys = {flow_key(geneve_of(p).payload) for _, p in inbound(wire)}
    for sp in (44101, 44102):
        assert ("udp", G2_IP, G1_IP, sp, UDP_DPORT) in ikeys, ikeys
    # and g1 got them: delivered with checksums it accepted
    assert wire["g1_sink"] == 10


def test_outer_headers_scapy(wire):
    """Every encapsulated packet sled1 sent: outer IPv6 from fd00:1::1 to
    fd00:2::1, hop limit 128, next header UDP, payload length right; UDP to
    6081 from 49152-65535; Geneve version 0, no options, O and C clear,
    protocol 0x6558, VNI 10; inner Ethernet from g1's MAC to g2's MAC."""
    pkts = outbound(wire)
    assert len(pkts) >= 4 + 4 + 5 * len(UDP_SPORTS) + 1
    for link, p in pkts:
        ip6, udp, g = p[IPv6], p[UDP], geneve_of(p)
        inner = g.payload
        what = f"{link}: {p.summary()}"
        assert p[Ether].type == 0x86DD
        assert (ip6.version, ip6.src, ip6.dst) == (6, U1_ADDR, U2_ADDR), what
        assert ip6.hlim == 128, what
        assert ip6.nh == 17, what
        assert ip6.plen == len(ip6.payload) == udp.len, what
        assert udp.dport == GENEVE_PORT, what
        assert 49152 <= udp.sport <= 65535, what
        assert (g.version, g.optionlen, g.oam, g.critical) == (0, 0, 0, 0), what
        assert g.proto == 0x6558, what
        assert g.vni == VNI, what
        assert isinstance(inner, Ether), what
        assert (inner.dst, inner.src) == (G2_MAC, G1_MAC), what
        assert ip6.fl != 0, what


def test_outer_ethernet_is_the_links_own(wire, xlab):
    """The outer Ethernet header is from sled1's underlay NIC to the switch
    it is plugged into: bpf_fib_lookup's next hop, per link."""
    macs = {"u1": (xlab.mac("sled1", "u1"), xlab.mac("sw1", "sled1")),
            "u2": (xlab.mac("sled1", "u2"), xlab.mac("sw2", "sled1"))}
    for link, p in outbound(wire):
        assert (p[Ether].src, p[Ether].dst) == macs[link], (link, p.summary())


def test_flow_label_and_source_port_per_flow(wire):
    """The flow label and UDP source port are a function of the flow: one
    value per flow (and one underlay per flow), different between flows
    (the UDP flows and the two ping runs)."""
    by_flow = collections.defaultdict(set)
    for link, p in outbound(wire):
        k = flow_key(geneve_of(p).payload)
        if k[0] == "udp" and k[3] in UDP_SPORTS or k[:4] == (1, G1_IP, G2_IP, 8):
            by_flow[k].add((p[IPv6].fl, p[UDP].sport, link))
    assert len(by_flow) == len(UDP_SPORTS) + 2  # + the two ping runs
    for k, vals in by_flow.items():
        assert len(vals) == 1, f"flow {k} used several labels/ports/links: {vals}"
    labels = [next(iter(v))[0] for v in by_flow.values()]
    sports = [next(iter(v))[1] for v in by_flow.values()]
    # the seed is random per root: two of these flows share a 14-bit source
    # port about once in 1,100 roots (a 20-bit label once in 70,000); a hash
    # blind to the flow gives them all one
    assert len(set(labels)) >= len(labels) - 1, f"flows share a flow label: {dict(by_flow)}"
    assert len(set(sports)) >= len(sports) - 1, f"flows share a source port: {dict(by_flow)}"


def test_flow_label_is_a_function_of_the_inner_five_tuple(wire):
    """docs/design.md, "Wire format": flow label and UDP source port are
    hashes of the inner 5-tuple. The same 5-tuple sent from two sockets one
    after the other must get the same label and port (not, say, each socket's
    random transmit hash, which the kernel also re-rolls on TCP timeouts)."""
    vals = collections.defaultdict(set)
    for link, p in outbound(wire):
        k = flow_key(geneve_of(p).payload)
        if k == ("udp", G1_IP, G2_IP, 44010, UDP_DPORT):
            payload = bytes(geneve_of(p).payload[UDP].payload)
            vals[payload[-1:]].add((p[IPv6].fl, p[UDP].sport, link))
    assert set(vals) == {b"0", b"1"}, vals
    assert vals[b"0"] == vals[b"1"] and len(vals[b"0"]) == 1, \
        f"one 5-tuple, two sockets: (flow label, UDP source port, link) {dict(vals)}"


def test_traffic_class_carries_inner_dscp_and_ecn(wire):
    """Outer traffic class = inner DS field (DSCP and ECN, RFC 6040 normal
    mode): ping -Q 0xb8 -> 0xb8, a plain ping -> 0, UDP with TOS 0x2a -> 0x2a."""
    seen = collections.defaultdict(set)
    for _, p in outbound(wire):
        inner_ip = geneve_of(p).payload[IP]
        seen[inner_ip.tos].add(p[IPv6].tc)
        assert p[IPv6].tc == inner_ip.tos, p.summary()
    assert seen[PING_TOS] == {PING_TOS}
    assert seen[0x2A] == {0x2A}
    assert seen[0] == {0}


def _checksum_problems(pkts):
    bad = []
    for _, p in pkts:
        ip = geneve_of(p).payload[IP]
        fresh = IP(bytes(ip))
        for layer in (IP, TCP, UDP, ICMP):
            if layer in fresh:
                del fresh[layer].chksum
        redone = IP(bytes(fresh))
        for layer in (IP, TCP, UDP, ICMP):
            if layer not in ip or ip[layer].chksum == redone[layer].chksum:
                continue
            bad.append(f"{layer.__name__} {flow_key(ip)}: {ip[layer].chksum:#06x} "
                       f"!= {redone[layer].chksum:#06x}")
    return bad


def test_inner_checksums_on_the_wire(wire):
    """Inner checksums are complete both ways on the wire: the lab's underlays
    are veths, which pass a checksum still to be filled in as it is, so
    xdectl has the kernel fill them in before the frame leaves (a real NIC
    does it itself). Anything else would reach a receiver that cannot finish
    it (XDP on a veth, a userspace peer) with a bad checksum."""
    bad = _checksum_problems(outbound(wire))
    assert not bad, f"{len(bad)} bad inner checksums leaving sled1, e.g. {bad[:5]}"
    bad = _checksum_problems(inbound(wire))
    assert not bad, f"{len(bad)} bad inner checksums arriving at sled1, e.g. {bad[:5]}"


def test_inbound_geneve_from_sled2(wire):
    """What sled1 receives from sled2 (captured as the switches forward it,
    hop limit 127): the same format, VNI 10, inner from g2 to g1's MAC."""
    pkts = inbound(wire)
    for link, p in pkts:
        ip6, udp, g = p[IPv6], p[UDP], geneve_of(p)
        assert (ip6.src, ip6.dst, ip6.hlim, ip6.nh) == (U2_ADDR, U1_ADDR, 127, 17)
        assert udp.dport == GENEVE_PORT and 49152 <= udp.sport <= 65535
        assert (g.version, g.oam, g.critical, g.proto, g.vni) == (0, 0, 0, 0x6558, VNI)
        assert (g.payload.dst, g.payload.src) == (G1_MAC, G2_MAC)


def test_guest_sees_gateway_mac_as_source(wire):
    """Decapsulated frames delivered to g1 come from the gateway MAC."""
    rx = [f for f in wire["g1"] if f.dst == G1_MAC and IP in f and f[IP].src == G2_IP]
    assert len(rx) >= 8, [f.summary() for f in wire["g1"]]
    assert {f.src for f in rx} == {GW_MAC}
    # and g1 sends to the gateway MAC too (it resolved its peer by proxy ARP)
    tx = [f for f in wire["g1"] if f.src == G1_MAC and IP in f and f[IP].dst == G2_IP]
    assert tx and {f.dst for f in tx} == {GW_MAC}


TSHARK_FIELDS = ["eth.src", "eth.dst", "ipv6.src", "ipv6.dst", "ipv6.hlim", "ipv6.nxt",
                 "ipv6.flow", "ipv6.tclass", "ipv6.plen", "udp.srcport", "udp.dstport",
                 "udp.length", "geneve.version", "geneve.flags.oam", "geneve.flags.critical",
                 "geneve.proto_type", "geneve.vni", "ip.src", "ip.dst", "ip.dsfield"]


def tshark(path):
    cmd = ["tshark", "-n", "-r", str(path), "-d", f"udp.port=={GENEVE_PORT},geneve",
           "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in TSHARK_FIELDS:
        cmd += ["-e", f]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = []
    for line in p.stdout.splitlines():
        rows.append(dict(zip(TSHARK_FIELDS, line.split("|"))))
    return rows


def _int(v):
    """The first (outer) occurrence of a field, as an int."""
    return int(v.split(";")[0], 0)


def _bool(v):
    return v.split(";")[0].lower() in ("1", "true")


def test_tshark_decodes_the_same(wire):
    """tshark's Geneve dissector reads the same outer and inner fields from
    the captures, packet for packet."""
    n = 0
    for link in ("u1", "u2"):
        rows = tshark(wire["files"][link])
        pkts = wire[link]
        assert len(rows) == len(pkts)
        for row, (_, p) in zip(rows, pkts):
            if p[IPv6].src != U1_ADDR:
                continue
            n += 1
            inner = geneve_of(p).payload
            assert row["ipv6.src"] == U1_ADDR and row["ipv6.dst"] == U2_ADDR, row
            assert _int(row["ipv6.hlim"]) == 128, row
            assert _int(row["ipv6.nxt"]) == 17, row
            assert _int(row["ipv6.flow"]) == p[IPv6].fl != 0, row
            assert _int(row["ipv6.tclass"]) == p[IPv6].tc == inner[IP].tos, row
            assert _int(row["ipv6.plen"]) == _int(row["udp.length"]) == p[UDP].len, row
            assert _int(row["udp.dstport"]) == GENEVE_PORT, row
            assert 49152 <= _int(row["udp.srcport"]) <= 65535, row
            assert _int(row["geneve.version"]) == 0, row
            assert not _bool(row["geneve.flags.oam"]) and not _bool(row["geneve.flags.critical"]), row
            assert _int(row["geneve.proto_type"]) == 0x6558, row
            assert _int(row["geneve.vni"]) == VNI, row
            # two Ethernet headers: outer, then inner
            assert row["eth.src"].split(";")[1] == G1_MAC, row
            assert row["eth.dst"].split(";")[1] == G2_MAC, row
            assert (row["ip.src"], row["ip.dst"]) == (G1_IP, G2_IP), row
    assert n >= 4 + 4 + 5 * len(UDP_SPORTS)
