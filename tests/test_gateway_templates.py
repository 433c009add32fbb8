"""Unit tests of xdectl/gateway.py: the frame templates of the gateway's
replies (DHCPv4, router and neighbour advertisements, DHCPv6), decoded with
scapy field by field; the offsets of bpf/gw_reply.h, by patching them as the
datapath does and reading the fields back with scapy; the checksums the
datapath computes, simulated here in plain Python and checked by scapy; the
read-back of what the guest is told; the operator's input checks. No root."""
import ipaddress
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import (DUID_LL, DHCP6_Advertise, DHCP6_Reply, DHCP6OptClientId,
                                DHCP6OptDNSDomains, DHCP6OptDNSServers, DHCP6OptIA_NA,
                                DHCP6OptIAAddress, DHCP6OptRapidCommit, DHCP6OptServerId,
                                DHCP6OptStatusCode)
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (ICMPv6ND_NA, ICMPv6ND_RA, ICMPv6NDOptDstLLAddr, ICMPv6NDOptMTU,
                                ICMPv6NDOptPrefixInfo, ICMPv6NDOptSrcLLAddr, IPv6)
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils6 import in6_mactoifaceid

from model.xde import csum
from xdectl import abi, gateway
from xdectl.errors import XdeError

KINDS = (abi.GW_DHCP4, abi.GW_RA, abi.GW_NA, abi.GW_DHCP6, abi.GW_DHCP6_STATUS)
SIX = (abi.GW_RA, abi.GW_NA, abi.GW_DHCP6, abi.GW_DHCP6_STATUS)
FAST = hsettings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def port(**kw):
    g = dict(mac="02:11:22:33:44:55", gw_mac="A8:40:25:FF:77:77", ip="172.30.0.5",
             gw_ip="172.30.0.1", ip6="fd00:1::5", mtu=1430,
             dns=["192.0.2.53", "2001:db8::53"], hostname="web-1", domain="oxide.example")
    g.update(kw)
    return SimpleNamespace(**g)


# --- strategies for valid inputs ---------------------------------------------

LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
macs = st.binary(min_size=6, max_size=6).map(lambda b: bytes((b[0] & 0xFE,)) + b[1:]) \
    .filter(any).map(lambda b: ":".join(f"{x:02x}" for x in b))
ip4s = st.ip_addresses(v=4).map(str)
ip6s = st.ip_addresses(v=6).map(str)
dns4 = st.ip_addresses(v=4).filter(lambda a: not (a.is_unspecified or a.is_multicast or
                                                  int(a) == 0xFFFFFFFF))
dns6 = st.ip_addresses(v=6).filter(lambda a: not (a.is_unspecified or a.is_multicast))
domains = st.tuples(st.lists(LABEL, min_size=1, max_size=5).map(".".join)
                    .filter(lambda d: len(d) <= 253), st.booleans()) \
    .map(lambda t: t[0] + "." if t[1] else t[0])


@st.composite
def dns_lists(draw):
    """0-3 servers of each family, unique, interleaved at random."""
    v4 = draw(st.lists(dns4, max_size=3, unique=True))
    v6 = draw(st.lists(dns6, max_size=3, unique=True))
    return [str(a) for a in draw(st.permutations(v4 + v6))]


@st.composite
def ports(draw, families=st.sampled_from(["4", "6", "46", ""])):
    fam = draw(families)
    return SimpleNamespace(
        mac=draw(macs), gw_mac=draw(macs), ip=draw(ip4s) if "4" in fam else None,
        gw_ip=draw(ip4s), ip6=draw(ip6s) if "6" in fam else None,
        mtu=draw(st.integers(0, 2**32 - 1)), dns=draw(dns_lists()),
        hostname=draw(st.none() | LABEL), domain=draw(st.none() | domains))


def dhcp4_size(g):
    """The DHCPv4 template's length, from RFC 2131/3442 and this test's list
    of options, not from the code."""
    n4 = sum(ipaddress.ip_address(a).version == 4 for a in g.dns)
    dom = (g.domain or "").rstrip(".")
    opts = 3 + 6 + 6 + 6 + 6 + (2 + 9 + 5) + 1
    opts += (2 + 4 * n4) * bool(n4) + (2 + len(g.hostname or "")) * bool(g.hostname)
    opts += (2 + len(dom)) * bool(dom)
    return 14 + 20 + 8 + max(300, 236 + 4 + opts)


def dhcp6_size(g):
    n6 = sum(ipaddress.ip_address(a).version == 6 for a in g.dns)
    dom = (g.domain or "").rstrip(".")
    return (14 + 40 + 8 + 4 + 14 + (4 + 12 + 4 + 24) + (4 + 16 * n6) * bool(n6)
            + (4 + len(dom) + 2) * bool(dom))


def valid(g):
    """g with settings check() accepts; hypothesis discards the rest (only
    too-long ones: test_check_refuses_exactly_what_does_not_fit)."""
    assume(dhcp4_size(g) <= abi.GW_TMPL_MAX)
    return g


# --- the checksums the datapath computes, in plain Python --------------------

def finish4(f):
    """Lengths and checksums of an IPv4/UDP frame, as gw_send4 makes them."""
    f = bytearray(f)
    ulen = len(f) - 34
    struct.pack_into("!H", f, 16, len(f) - 14)
    struct.pack_into("!H", f, 24, 0)
    struct.pack_into("!H", f, 24, csum(bytes(f[14:34])))
    struct.pack_into("!HH", f, 38, ulen, 0)
    c = csum(bytes(f[26:34]) + struct.pack("!BBH", 0, 17, ulen) + bytes(f[34:]))
    struct.pack_into("!H", f, 40, c or 0xFFFF)
    return bytes(f)


def finish6(f):
    """Lengths and checksum of an IPv6 frame carrying UDP or ICMPv6."""
    f = bytearray(f)
    plen, nh = len(f) - 54, f[20]
    struct.pack_into("!H", f, 18, plen)
    check = 54 + (6 if nh == 17 else 2)
    if nh == 17:
        struct.pack_into("!H", f, 58, plen)
    struct.pack_into("!H", f, check, 0)
    c = csum(bytes(f[22:54]) + struct.pack("!I3xB", plen, nh) + bytes(f[54:]))
    if nh == 17 and c == 0:
        c = 0xFFFF                               # UDP: 0 would mean none
    struct.pack_into("!H", f, check, c)
    return bytes(f)


def patch(frame, *edits):
    f = bytearray(frame)
    for off, value in edits:
        f[off:off + len(value)] = value
    return bytes(f)


def scapy_checksums_valid(frame):
    """scapy rebuilds the frame with every checksum (and length) field
    deleted, so computing them itself; equal bytes: the frame's are right."""
    p = Ether(frame)
    assert bytes(p) == frame, "scapy does not rebuild the frame as it is"
    for layer in p.iterpayloads():
        fields = ("chksum", "len", "plen") if isinstance(layer, (IP, UDP, IPv6)) else ("cksum",)
        for field in fields:
            if field in layer.fields:
                delattr(layer, field)
    return bytes(p) == frame


def opts4(frame):
    """scapy's DHCP options as a list of (name, value), 'end' and pads out."""
    return [o for o in Ether(frame)[DHCP].options if isinstance(o, tuple)]


def opts6(msg):
    """The options of a scapy DHCPv6 message, in order."""
    out, o = [], msg.payload
    while o and not isinstance(o, Raw):
        out.append(o)
        o = o.payload
    return out


# --- gateway_ll --------------------------------------------------------------

def test_gateway_ll_of_the_default_gateway_mac():
    assert gateway.gateway_ll("A8:40:25:FF:77:77") == "fe80::aa40:25ff:feff:7777"
    assert gateway.gateway_ll("a8:40:25:ff:77:77") == "fe80::aa40:25ff:feff:7777"


@FAST
@given(macs)
def test_gateway_ll_is_the_eui64_link_local(mac):
    ll = ipaddress.IPv6Address(gateway.gateway_ll(mac))
    assert ll == ipaddress.IPv6Address("fe80::" + in6_mactoifaceid(mac).lower())
    assert ll.is_link_local


# --- which templates, and what they all share ----------------------------------

def test_kinds_follow_the_port_families():
    assert set(gateway.templates(port())) == set(KINDS)
    assert set(gateway.templates(port(ip6=None))) == {abi.GW_DHCP4}
    assert set(gateway.templates(port(ip=None))) == set(SIX)
    assert gateway.templates(port(ip=None, ip6=None)) == {}


@FAST
@given(ports())
def test_every_template_is_a_whole_frame_from_the_gateway(g):
    g = valid(g)
    for kind, frame in gateway.templates(g).items():
        assert isinstance(frame, bytes) and len(frame) <= abi.GW_TMPL_MAX
        p = Ether(frame)
        assert p.src == g.gw_mac.lower() and p.dst == g.mac.lower()
        assert len(p) == len(frame)
        if kind == abi.GW_DHCP4:
            assert p[IP].chksum == 0 and p[UDP].chksum == 0
            assert p[IP].len == len(frame) - 14 and p[UDP].len == len(frame) - 34
            assert len(frame) == dhcp4_size(g)
        else:
            assert p[IPv6].plen == len(frame) - 54
            l4 = p[IPv6].payload
            assert (l4.chksum if isinstance(l4, UDP) else l4.cksum) == 0
            if kind == abi.GW_DHCP6:
                assert len(frame) == dhcp6_size(g)


# --- DHCPv4 --------------------------------------------------------------------

@FAST
@given(ports(families=st.just("4")))
def test_dhcp4_lease(g):
    g = valid(g)
    frame = gateway.templates(g)[abi.GW_DHCP4]
    p = Ether(frame)
    ip = p[IP]
    assert (ip.version, ip.ihl, ip.tos, ip.id, int(ip.flags), ip.frag, ip.ttl, ip.proto) == \
        (4, 5, 0, 0, 0, 0, 64, 17)
    assert (ip.src, ip.dst) == (g.gw_ip, g.ip)
    assert (p[UDP].sport, p[UDP].dport) == (67, 68)
    b = p[BOOTP]
    assert (b.op, b.htype, b.hlen, b.hops, b.xid, b.secs, int(b.flags)) == (2, 1, 6, 0, 0, 0, 0)
    assert (b.ciaddr, b.yiaddr, b.siaddr, b.giaddr) == ("0.0.0.0", g.ip, g.gw_ip, "0.0.0.0")
    assert b.chaddr == bytes.fromhex(g.mac.replace(":", "")) + bytes(10)
    assert b.sname == bytes(64) and b.file == bytes(128)
    assert b.options[:4] == bytes((99, 130, 83, 99))
    assert len(p[UDP].payload) >= 300, "RFC 1542: at least 300 bytes of BOOTP"

    dns = [a for a in g.dns if ipaddress.ip_address(a).version == 4]
    want = [("message-type", 0), ("server_id", g.gw_ip), ("lease_time", 86400),
            ("subnet_mask", "255.255.255.255"), ("router", g.gw_ip),
            ("classless_static_routes", [f"{g.gw_ip}/32:0.0.0.0", f"0.0.0.0/0:{g.gw_ip}"])]
    if dns:
        want.append(("name_server", *dns))
    if g.hostname:
        want.append(("hostname", g.hostname.encode()))
    if g.domain:
        want.append(("domain", g.domain.rstrip(".").encode()))
    assert opts4(frame) == want
    # option 53 first, right after the cookie; 'end', then only padding
    assert frame[abi.GW_OFF_DHCP4_TYPE - 2:abi.GW_OFF_DHCP4_TYPE] == bytes((53, 1))
    rest = [o for o in p[DHCP].options if not isinstance(o, tuple)]
    assert rest[0] == "end" and set(rest[1:]) <= {"pad"}


def test_dhcp4_classless_routes_are_rfc3442():
    """Option 121 byte for byte, by hand: 32 + gateway + 0.0.0.0, then
    0 + gateway (the default route)."""
    frame = gateway.templates(port(gw_ip="10.1.2.3"))[abi.GW_DHCP4]
    i = frame.index(bytes((121, 14)))
    assert frame[i + 2:i + 16] == bytes((32, 10, 1, 2, 3, 0, 0, 0, 0, 0, 10, 1, 2, 3))


# --- router advertisement ---------------------------------------------------------

@FAST
@given(ports(families=st.just("6")))
def test_router_advertisement(g):
    g = valid(g)
    p = Ether(gateway.templates(g)[abi.GW_RA])
    ip6 = p[IPv6]
    assert (ip6.version, ip6.tc, ip6.fl, ip6.nh, ip6.hlim) == (6, 0, 0, 58, 255)
    assert ip6.src == gateway.gateway_ll(g.gw_mac) and ip6.dst == "::"
    ra = p[ICMPv6ND_RA]
    assert (ra.type, ra.code, ra.chlim, ra.M, ra.O, ra.H, ra.prf, ra.P) == (134, 0, 64, 1, 0, 0, 0, 0)
    assert (ra.routerlifetime, ra.reachabletime, ra.retranstimer) == (9000, 0, 0)
    assert p[ICMPv6NDOptSrcLLAddr].lladdr == g.gw_mac.lower()
    assert (p[ICMPv6NDOptMTU].res, p[ICMPv6NDOptMTU].mtu) == (0, g.mtu)
    assert ICMPv6NDOptPrefixInfo not in p
    opts = [type(o) for o in ra.payload.iterpayloads() if not isinstance(o, Raw)]
    assert opts == [ICMPv6NDOptSrcLLAddr, ICMPv6NDOptMTU]


# --- neighbour advertisement --------------------------------------------------------

@FAST
@given(ports(families=st.just("6")))
def test_neighbour_advertisement(g):
    g = valid(g)
    frame = gateway.templates(g)[abi.GW_NA]
    p = Ether(frame)
    assert (p[IPv6].nh, p[IPv6].hlim, p[IPv6].dst) == (58, 255, "::")
    assert p[IPv6].src == gateway.gateway_ll(g.gw_mac)
    na = p[ICMPv6ND_NA]
    assert (na.type, na.code, na.R, na.S, na.O, na.res) == (136, 0, 1, 1, 1, 0)
    assert frame[abi.GW_OFF_NA_FLAGS] == 0xE0
    assert na.tgt == gateway.gateway_ll(g.gw_mac)
    assert p[ICMPv6NDOptDstLLAddr].type == 2 and p[ICMPv6NDOptDstLLAddr].len == 1
    assert p[ICMPv6NDOptDstLLAddr].lladdr == g.gw_mac.lower()
    assert not p[ICMPv6NDOptDstLLAddr].payload


# --- DHCPv6 ---------------------------------------------------------------------------

def dhcp6(frame, as_type=7):
    """The template's headers and DHCPv6 message, the type patched so that
    scapy picks the message class."""
    p = Ether(patch(frame, (abi.GW_OFF_DHCP6_TYPE, bytes((as_type,)))))
    return p, p[UDP].payload


def check_headers6(p, g):
    ip6 = p[IPv6]
    assert (ip6.version, ip6.tc, ip6.fl, ip6.nh, ip6.hlim) == (6, 0, 0, 17, 255)
    assert ip6.src == gateway.gateway_ll(g.gw_mac) and ip6.dst == "::"
    assert (p[UDP].sport, p[UDP].dport) == (547, 546)


def check_server_id(o, g):
    assert isinstance(o, DHCP6OptServerId) and o.optlen == 10
    assert isinstance(o.duid, DUID_LL)
    assert (o.duid.type, o.duid.hwtype, o.duid.lladdr) == (3, 1, g.gw_mac.lower())


@FAST
@given(ports(families=st.just("6")))
def test_dhcp6_lease(g):
    g = valid(g)
    frame = gateway.templates(g)[abi.GW_DHCP6]
    assert frame[abi.GW_OFF_DHCP6_TYPE:abi.GW_OFF_DHCP6_TYPE + 4] == bytes(4)
    p, msg = dhcp6(frame)
    check_headers6(p, g)
    assert isinstance(msg, DHCP6_Reply) and msg.trid == 0
    opts = opts6(msg)
    check_server_id(opts[0], g)
    ia = opts[1]
    assert isinstance(ia, DHCP6OptIA_NA) and (ia.iaid, ia.T1, ia.T2) == (0, 2**32 - 1, 2**32 - 1)
    [addr] = ia.ianaopts
    assert isinstance(addr, DHCP6OptIAAddress)
    assert ipaddress.IPv6Address(addr.addr) == ipaddress.IPv6Address(g.ip6)
    assert (addr.preflft, addr.validlft, addr.iaaddropts) == (2**32 - 1, 2**32 - 1, [])
    rest = opts[2:]
    dns = [ipaddress.IPv6Address(a) for a in g.dns if ipaddress.ip_address(a).version == 6]
    if dns:
        assert isinstance(rest[0], DHCP6OptDNSServers)
        assert [ipaddress.IPv6Address(a) for a in rest.pop(0).dnsservers] == dns
    if g.domain:
        assert isinstance(rest[0], DHCP6OptDNSDomains)
        assert rest.pop(0).dnsdomains == [g.domain.rstrip(".") + "."]
    assert rest == []


@FAST
@given(ports(families=st.just("6")))
def test_dhcp6_reply_to_confirm(g):
    g = valid(g)
    frame = gateway.templates(g)[abi.GW_DHCP6_STATUS]
    p = Ether(frame)
    check_headers6(p, g)
    msg = p[UDP].payload
    assert isinstance(msg, DHCP6_Reply) and msg.msgtype == 7 and msg.trid == 0
    opts = opts6(msg)
    assert len(opts) == 2
    check_server_id(opts[0], g)
    assert isinstance(opts[1], DHCP6OptStatusCode)
    assert (opts[1].optlen, opts[1].statuscode, opts[1].statusmsg) == (2, 0, b"")


def test_dhcp6_iaid_offset_follows_the_server_id():
    """GW_OFF_DHCP6_IAID assumes the server id is a 14-byte DUID-LL option
    and IA_NA the next one: both templates start the same way."""
    t = gateway.templates(port())
    for kind in (abi.GW_DHCP6, abi.GW_DHCP6_STATUS):
        sid = t[kind][abi.GW_OFF_DHCP6_TYPE + 4:abi.GW_OFF_DHCP6_TYPE + 4 + 14]
        assert sid[:8] == bytes((0, 2, 0, 10, 0, 3, 0, 1))
    assert t[abi.GW_DHCP6][abi.GW_OFF_DHCP6_IAID - 4:abi.GW_OFF_DHCP6_IAID] == bytes((0, 3, 0, 40))


# --- the offsets the datapath patches, read back by scapy ------------------------

u32 = st.integers(0, 2**32 - 1)


@FAST
@given(ports(families=st.just("4")), u32, st.integers(0, 0xFFFF), st.sampled_from([2, 5]), ip4s)
def test_dhcp4_offsets(g, xid, flags, mtype, dst):
    g = valid(g)
    f = patch(gateway.templates(g)[abi.GW_DHCP4],
              (abi.GW_OFF_DHCP4_XID, struct.pack("!I", xid)),
              (abi.GW_OFF_DHCP4_FLAGS, struct.pack("!H", flags)),
              (abi.GW_OFF_DHCP4_TYPE, bytes((mtype,))),
              (abi.GW_OFF_IP4_DST, ipaddress.IPv4Address(dst).packed))
    p = Ether(f)
    assert (p[BOOTP].xid, int(p[BOOTP].flags), p[IP].dst) == (xid, flags, dst)
    assert opts4(f)[0] == ("message-type", mtype)
    assert p[BOOTP].yiaddr == g.ip, "the patches moved nothing else"


@FAST
@given(ports(families=st.just("6")), ip6s, st.integers(0, 7))
def test_ndp_offsets(g, dst, flags):
    g = valid(g)
    t = gateway.templates(g)
    ra = Ether(patch(t[abi.GW_RA], (abi.GW_OFF_IP6_DST, ipaddress.IPv6Address(dst).packed)))
    assert ipaddress.IPv6Address(ra[IPv6].dst) == ipaddress.IPv6Address(dst)
    na = Ether(patch(t[abi.GW_NA], (abi.GW_OFF_IP6_DST, ipaddress.IPv6Address(dst).packed),
                     (abi.GW_OFF_NA_FLAGS, bytes((flags << 5,)))))
    assert ipaddress.IPv6Address(na[IPv6].dst) == ipaddress.IPv6Address(dst)
    assert (na[ICMPv6ND_NA].R, na[ICMPv6ND_NA].S, na[ICMPv6ND_NA].O) == \
        (flags >> 2, flags >> 1 & 1, flags & 1)
    assert na[ICMPv6ND_NA].tgt == gateway.gateway_ll(g.gw_mac)


@FAST
@given(ports(families=st.just("6")), ip6s, st.sampled_from([2, 7]),
       st.integers(0, 2**24 - 1), u32)
def test_dhcp6_offsets(g, dst, mtype, xid, iaid):
    g = valid(g)
    t = gateway.templates(g)
    head = bytes((mtype,)) + xid.to_bytes(3, "big")
    to = (abi.GW_OFF_IP6_DST, ipaddress.IPv6Address(dst).packed)
    p = Ether(patch(t[abi.GW_DHCP6], to, (abi.GW_OFF_DHCP6_TYPE, head),
                    (abi.GW_OFF_DHCP6_IAID, struct.pack("!I", iaid))))
    msg = p[UDP].payload
    assert isinstance(msg, DHCP6_Advertise if mtype == 2 else DHCP6_Reply)
    assert (msg.msgtype, msg.trid, msg[DHCP6OptIA_NA].iaid) == (mtype, xid, iaid)
    assert ipaddress.IPv6Address(p[IPv6].dst) == ipaddress.IPv6Address(dst)
    assert ipaddress.IPv6Address(msg[DHCP6OptIAAddress].addr) == ipaddress.IPv6Address(g.ip6)
    # the transaction id follows the type: the datapath writes both at GW_OFF_DHCP6_TYPE
    s = Ether(patch(t[abi.GW_DHCP6_STATUS], to, (abi.GW_OFF_DHCP6_TYPE + 1, head[1:])))
    assert (s[DHCP6_Reply].trid, s[DHCP6OptStatusCode].statuscode) == (xid, 0)


# --- what the datapath sends: patched, echoed, lengths and checksums computed ----

# client DUIDs (RFC 8415 11): LLT, EN (up to the 128 bytes a DUID may have), LL
DUIDS = st.one_of(
    st.tuples(u32, macs).map(lambda t: struct.pack("!HHI", 1, 1, t[0]) + bytes.fromhex(
        t[1].replace(":", ""))),
    st.tuples(u32, st.binary(min_size=1, max_size=128 - 6)).map(
        lambda t: struct.pack("!HI", 2, t[0]) + t[1]),
    macs.map(lambda m: struct.pack("!HH", 3, 1) + bytes.fromhex(m.replace(":", ""))))


@FAST
@given(ports(), u32, st.booleans(), ip6s, DUIDS, st.booleans(), st.booleans())
def test_replies_the_datapath_finishes_have_valid_checksums(g, xid, bcast, src, duid, rapid,
                                                            from_unspec):
    g = valid(g)
    t = gateway.templates(g)
    seen = 0
    if abi.GW_DHCP4 in t:
        edits = [(abi.GW_OFF_DHCP4_XID, struct.pack("!I", xid)),
                 (abi.GW_OFF_DHCP4_FLAGS, struct.pack("!H", 0x8000 if bcast else 0)),
                 (abi.GW_OFF_DHCP4_TYPE, b"\x05")]
        if bcast:
            edits += [(0, b"\xff" * 6), (abi.GW_OFF_IP4_DST, b"\xff" * 4)]
        f = finish4(patch(t[abi.GW_DHCP4], *edits))
        assert scapy_checksums_valid(f)
        assert Ether(f)[UDP].chksum != 0
        seen += 1
    if abi.GW_RA in t:
        to = (abi.GW_OFF_IP6_DST,
              ipaddress.IPv6Address("ff02::1" if from_unspec else src).packed)
        for kind in (abi.GW_RA, abi.GW_NA):
            edits = [to] + ([(abi.GW_OFF_NA_FLAGS, b"\xa0")] if kind == abi.GW_NA and from_unspec
                            else [])
            assert scapy_checksums_valid(finish6(patch(t[kind], *edits)))
        head = (abi.GW_OFF_DHCP6_TYPE, struct.pack("!I", (7 << 24) | (xid & 0xFFFFFF)))
        client = struct.pack("!HH", 1, len(duid)) + duid
        f = finish6(patch(t[abi.GW_DHCP6], to, head,
                          (abi.GW_OFF_DHCP6_IAID, struct.pack("!I", xid)))
                    + client + (b"\x00\x0e\x00\x00" if rapid else b""))
        assert scapy_checksums_valid(f)
        msg = Ether(f)[DHCP6_Reply]
        assert bytes(msg[DHCP6OptClientId].duid) == duid
        assert (DHCP6OptRapidCommit in msg) == rapid
        assert Ether(f)[DHCP6OptIA_NA].iaid == xid
        f = finish6(patch(t[abi.GW_DHCP6_STATUS], to, head) + client)
        assert scapy_checksums_valid(f)
        assert bytes(Ether(f)[DHCP6OptClientId].duid) == duid
        seen += 4
    assert seen == len(t)


def test_a_wrong_checksum_is_seen():
    """Not vacuous: one flipped bit after the checksums fails the check."""
    t = gateway.templates(port())
    good4 = finish4(patch(t[abi.GW_DHCP4], (abi.GW_OFF_DHCP4_TYPE, b"\x02")))
    good6 = finish6(patch(t[abi.GW_NA], (abi.GW_OFF_IP6_DST, b"\xfe\x80" + bytes(13) + b"\x01")))
    assert scapy_checksums_valid(good4) and scapy_checksums_valid(good6)
    for good, where in ((good4, 26), (good4, 14 + 20 + 8 + 28 + 10), (good6, 22 + 15),
                        (good6, len(good6) - 1)):
        bad = bytearray(good)
        bad[where] ^= 0x10                      # an address, chaddr padding, the MAC option
        assert not scapy_checksums_valid(bytes(bad)), where
    assert not scapy_checksums_valid(good4[:24] + bytes(2) + good4[26:])


# --- settings(): what the guest is told, read back --------------------------------

def told(g):
    """What a port's guest is told: IPv4 servers and the host name by DHCPv4,
    IPv6 servers by DHCPv6, the domain by either."""
    fam = {a: ipaddress.ip_address(a) for a in g.dns}
    return {"dns": [str(fam[a]) for a in g.dns if g.ip and fam[a].version == 4]
            + [str(fam[a]) for a in g.dns if g.ip6 and fam[a].version == 6],
            "hostname": g.hostname if g.ip else None,
            "domain": g.domain.rstrip(".") if g.domain and (g.ip or g.ip6) else None}


@FAST
@given(ports())
def test_settings_round_trip(g):
    g = valid(g)
    assert gateway.settings(gateway.templates(g)) == told(g)


@FAST
@given(ports(families=st.just("46")))
def test_check_normalises_to_what_settings_reads_back(g):
    g = valid(g)
    dns, hostname, domain = gateway.check(g.dns, g.hostname, g.domain)
    assert gateway.settings(gateway.templates(g)) == \
        {"dns": dns, "hostname": hostname, "domain": domain}
    # and the normalised values make the same templates
    again = SimpleNamespace(**{**vars(g), "dns": dns, "hostname": hostname, "domain": domain})
    assert gateway.templates(again) == gateway.templates(g)


def test_settings_of_a_port_without_addresses():
    assert gateway.settings({}) == {"dns": [], "hostname": None, "domain": None}


def test_settings_refuses_a_truncated_template():
    t = gateway.templates(port())
    end = t[abi.GW_DHCP4].rstrip(b"\0")
    with pytest.raises(XdeError):
        gateway.settings({abi.GW_DHCP4: end[:-1]})


def _one_line(fn, *args):
    with pytest.raises(XdeError) as exc:
        fn(*args)
    msg = str(exc.value)
    assert msg and "\n" not in msg and "malformed" in msg, msg
    return msg


def test_settings_refuses_any_unreadable_template_with_one_line():
    """Not a struct or decoding error: XdeError, so that list can report it."""
    t = gateway.templates(port())
    four, six = t[abi.GW_DHCP4], t[abi.GW_DHCP6]
    at = four.index(b"web-1")
    _one_line(gateway.settings, {abi.GW_DHCP4: four[:at] + b"w\xe9b-1" + four[at + 5:]})
    _one_line(gateway.settings, {abi.GW_DHCP6: six[:gateway.DHCP6_OPTS - 1]})
    _one_line(gateway.settings, {abi.GW_DHCP6: six[:20]})
    at = six.index(b"oxide")
    _one_line(gateway.settings, {abi.GW_DHCP6: six[:at] + b"\xffxide" + six[at + 5:]})


# --- check(): the operator's input ------------------------------------------------

def refused(dns=(), hostname=None, domain=None, says=""):
    with pytest.raises(XdeError) as exc:
        gateway.check(list(dns), hostname, domain)
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"one line: {msg!r}"
    assert says in msg, msg
    return msg


@pytest.mark.parametrize("dns,says", [
    (["1.1.1.1", "1.0.0.1", "8.8.8.8", "9.9.9.9"], "at most 3 IPv4"),
    (["::1", "::2", "::3", "::4"], "at most 3 IPv6"),
    (["1.1.1.1", "one.one"], "'one.one' is not an IPv4 or IPv6"),
    (["1.1.1.1", "1.1.1.1"], "twice"),
    (["0.0.0.0"], "unicast"), (["::"], "unicast"), (["224.0.0.251"], "unicast"),
    (["ff02::fb"], "unicast"), (["255.255.255.255"], "unicast"),
    (["fe80::1%eth0"], "scope"),
])
def test_check_refuses_dns(dns, says):
    refused(dns=dns, says=says)


def test_three_of_each_family_is_fine():
    dns = ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2", "2001:db8::3", "192.0.2.3"]
    assert gateway.check(dns, None, None)[0] == dns[1::2] + dns[0::2]


@pytest.mark.parametrize("hostname", ["", "-web", "web-", "web.example", "a" * 64, "we b",
                                      "web_1", "_web", "web_", "wéb", "web\n"])
def test_check_refuses_hostname(hostname):
    refused(hostname=hostname, says="host name")


@pytest.mark.parametrize("hostname", ["a", "A", "0", "web-1", "a" * 63, "1-2-3"])
def test_check_takes_hostname(hostname):
    assert gateway.check([], hostname, None) == ([], hostname, None)


@pytest.mark.parametrize("domain", ["", ".", "example..com", ".example.com", "-a.com", "a-.com",
                                    "a" * 64 + ".com", "ex ample.com", "exa_mple.com", "_dmarc.example.com", "a.com..",
                                    "éxample.com"])
def test_check_refuses_domain(domain):
    refused(domain=domain, says="domain")


def test_check_refuses_a_domain_longer_than_253():
    name = ".".join(["a" * 63] * 4)               # 255 characters
    refused(domain=name, says="253")


@pytest.mark.parametrize("domain,norm", [("example.com", "example.com"),
                                         ("example.com.", "example.com"), ("local", "local")])
def test_check_takes_domain(domain, norm):
    assert gateway.check([], None, domain) == ([], None, norm)


def domain_of(n):
    """A valid domain of n characters (labels of at most 63)."""
    labels = []
    while n > 63:
        k = min(63, n - 2)                      # leave at least one for the next label
        labels.append("d" * k)
        n -= k + 1
    labels.append("d" * n)
    name = ".".join(labels)
    assert all(1 <= len(x) <= 63 for x in labels)
    return name


@pytest.mark.parametrize("n", [1, 62, 63, 64, 65, 127, 128, 184, 185, 253])
def test_domain_of(n):
    assert len(domain_of(n)) == n


def test_the_template_limit_at_its_boundary():
    """A domain that makes the DHCPv4 reply exactly GW_TMPL_MAX bytes is
    taken, one character more is refused, naming the limit."""
    g = port(ip6=None, dns=[], hostname=None)
    n = next(n for n in range(1, 254)
             if dhcp4_size(SimpleNamespace(**{**vars(g), "domain": domain_of(n)})) ==
             abi.GW_TMPL_MAX)
    g.domain = domain_of(n)
    assert len(gateway.templates(g)[abi.GW_DHCP4]) == abi.GW_TMPL_MAX
    gateway.check([], None, g.domain)
    g.domain = domain_of(n + 1)
    refused(domain=g.domain, says=str(abi.GW_TMPL_MAX))
    with pytest.raises(XdeError):
        gateway.templates(g)


def test_check_fits_the_replies_of_the_port_families_only():
    """A domain too long for a DHCPv4 reply but not for a DHCPv6 one is
    refused for a port with IPv4, taken for an IPv6-only port."""
    name = domain_of(243)
    g = port(ip=None, dns=["fd10::53"], hostname=None, domain=name)
    assert dhcp4_size(g) == 571 and dhcp6_size(g) <= abi.GW_TMPL_MAX
    assert gateway.check(["fd10::53"], None, name, (6,)) == (["fd10::53"], None, name)
    assert len(gateway.templates(g)[abi.GW_DHCP6]) == dhcp6_size(g)
    assert gateway.settings(gateway.templates(g))["domain"] == name
    for families in ((4,), (4, 6)):
        with pytest.raises(XdeError, match="DHCPv4 reply 571 bytes"):
            gateway.check([], None, name, families)
    refused(["fd10::53"], None, name, says="DHCPv4 reply 571 bytes")   # by default: both
    with pytest.raises(XdeError, match="DHCPv4 reply 571 bytes"):
        gateway.templates(port(dns=["fd10::53"], hostname=None, domain=name))


@FAST
@given(dns_lists(), st.none() | LABEL, st.none() | domains)
def test_check_refuses_exactly_what_does_not_fit(dns, hostname, domain):
    g = port(dns=dns, hostname=hostname, domain=domain)
    assert dhcp6_size(g) <= abi.GW_TMPL_MAX, "DHCPv6 always fits (DHCPv4 is the longer)"
    if dhcp4_size(g) > abi.GW_TMPL_MAX:
        refused(dns, hostname, domain, says=f"more than the {abi.GW_TMPL_MAX}")
        with pytest.raises(XdeError):
            gateway.templates(g)
    else:
        gateway.check(dns, hostname, domain)
        assert {k: len(f) for k, f in gateway.templates(g).items()}[abi.GW_DHCP4] == dhcp4_size(g)
