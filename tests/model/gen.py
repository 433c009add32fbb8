"""Frame generators for the differential tests: one case is a short list of
(direction, frame) steps run in order on an empty flow table, drawn from a
seeded random.Random, so that a case is reproducible from (kind, seed).

Also `known_bug()`: the datapath bugs the differential tests found (see
tests/test_differential.py), so the generative test can leave those inputs
to their own strict-xfail tests and bench/fuzz.py can count them apart.
"""
import collections
import ipaddress
import random
import struct

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from frames import BSVC_ADDR as BSVC6
from frames import BSVC_MAC as BSVC_MAC_S
from frames import (G1_IP, G1_IP6, G1_LL, G1_MAC, G2_IP, G2_IP6, G2_MAC, G3, GW_IP, GW_LL, GW_MAC,
                    OXIDE, link_local)
from frames import U1_ADDR as U1
from frames import U2_ADDR as U2
from frames import geneve, geneve_opt

from .xde import csum

# sled1 of the lab (xdelab/lab.py) plus tests/model/setup.py's extra state
MTU = 1500
DESTS = ["10.0.0.2", "10.0.0.4", "10.0.0.3", "10.0.0.77", "10.0.0.200", "10.0.0.255",
         "192.0.2.1", "192.0.2.200", "198.51.100.7", "203.0.113.5", "203.0.114.5",
         "10.1.2.3", "10.0.0.9", "8.8.8.8", "224.0.0.1", "255.255.255.255", GW_IP]
OTHER_MACS = ["a8:40:25:ff:00:66", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01",
              "a8:40:25:ff:00:02", "00:00:00:00:00:00"]

# IPv6 (the lab's VPC /64 and the extra state of setup.py)
DESTS6 = [G2_IP6, G2_IP6, "fd00:10::44", "fd00:10::33", "fd00:10::77", "fd00:10::99",
          "fd00:10::8000:0:0:5", G1_IP6, "2001:db8:dead::1", "2001:db8:dead:beef::1",
          "2001:db8:1::1", "2001:db8:2::1", "fd00:11::5", "fd00:11::6", "2001:4860::8888",
          "::1", "::", "::ffff:10.0.0.2", "64:ff9b::a00:2", "fd00:99::1"]
LINK_SCOPED = ["fe80::1", GW_LL, "ff02::1", "ff02::2", "ff02::1:2", "ff02::16", "ff05::1:3",
               "ff02::1:ff00:1", "ff0e::101", "fe80::aa40:25ff:feff:2", "febf::1"]
ALL_DHCP6 = "ff02::1:2"
MY_DUID = bytes.fromhex("00030001") + bytes.fromhex(GW_MAC.replace(":", ""))
NDP_TYPES = {"rs": 133, "ra": 134, "ns": 135, "na": 136, "redirect": 137}

OUT_KINDS = ["arp", "gw_echo", "ipv4", "ipv4", "ipv4", "ipv4_big", "ipv4_frag", "spoof",
             "vlan", "ethertype", "random_after_eth", "malformed_ipv4",
             "dhcp4", "dhcp4", "dhcp4_edge", "ipv6", "ipv6", "ipv6", "ipv6_ext", "ipv6_ext",
             "ipv6_big", "malformed_ipv6", "ndp", "ndp", "ndp_edge", "gw_echo6", "link_local",
             "dhcp6", "dhcp6", "dhcp6_edge", "l4_trailer"]
IN_KINDS = ["geneve", "geneve", "geneve", "geneve_options", "geneve_options", "truncated",
            "bad_lengths", "bad_header", "inner_odd", "not_geneve", "random", "random_udp",
            "trailing", "geneve6", "geneve6", "geneve6", "inner6_odd"]
SEQ_KINDS = ["reply_in", "reply_external", "repeat_out", "in_then_out", "reply_in6",
             "in_then_out6", "repeat_out6", "mapped_alias", "reeval_in_then_out",
             "reeval_in_then_out", "reeval_out_then_in", "reeval_same_host", "reeval_same_host"]
# NAT (nat_case below): g1's on sled1 (SNAT), and g2's on sled2 (floating)
NAT_KINDS = ["nat_out", "nat_out", "nat_reply", "nat_reply", "nat_reply", "nat_icmp_error",
             "nat_unsolicited", "nat_stale", "nat_exhaust", "nat_exhaust", "nat_change",
             "nat_change", "nat_floating", "nat_floating"]
NAT2_KINDS = ["nat_out", "nat_reply", "nat_icmp_error", "nat_unsolicited", "nat_inbound",
              "nat_inbound", "nat_stale"]
KINDS = [("out", k) for k in OUT_KINDS] + [("in", k) for k in IN_KINDS] + \
    [("seq", k) for k in SEQ_KINDS] + [("nat", k) for k in NAT_KINDS]


def _payload(r, n):
    return bytes(r.getrandbits(8) for _ in range(n))


def _ip_options(r):
    if r.random() < 0.8:
        return []
    n = r.choice([1, 2, 3, 4, 8, 12, 20, 40])
    body = bytearray(b"\x01" * n)           # NOPs ...
    if n >= 4 and r.random() < 0.5:
        body[:4] = b"\x94\x04\x00\x00"        # ... or a router alert first
    if r.random() < 0.3:
        body[-1] = 0                          # EOL
    return [IPOption(bytes(body))]


SERVICES = [7, 9, 22, 25, 53, 80, 443]          # ports tests/model/setup.py's rules name


def _port(r):
    return r.choice(SERVICES) if r.random() < 0.25 else r.randrange(1, 65536)


def _l4(r, proto, n):
    if proto == 17:
        return UDP(sport=r.randrange(1, 65536), dport=_port(r)) / Raw(_payload(r, n))
    if proto == 6:
        return TCP(sport=r.randrange(1, 65536), dport=_port(r),
                   flags=r.choice(["S", "SA", "A", "PA", "F", "R", "FA"]),
                   seq=r.getrandbits(32)) / Raw(_payload(r, n))
    if proto == 1:
        t = r.choice([8, 8, 0, 3, 11, 13])
        return ICMP(type=t, code=r.choice([0, 0, 1]), id=r.getrandbits(16),
                    seq=r.getrandbits(16)) / Raw(_payload(r, n))
    return Raw(_payload(r, n))


def _guest_ip(r, dst, proto, n, **kw):
    ip = IP(src=G1_IP, dst=dst, proto=proto, tos=r.choice([0, 0, r.getrandbits(8)]),
            ttl=r.choice([64, 1, 255, r.randrange(256)]), id=r.getrandbits(16),
            flags=r.choice([0, "DF"]), options=_ip_options(r))
    for k, v in kw.items():
        setattr(ip, k, v)
    return Ether(src=G1_MAC, dst=GW_MAC) / ip / _l4(r, proto, n)


def _pad(r, f):
    f = bytes(f)
    if r.random() < 0.15:
        f += bytes(r.choice([1, 4, 18, 60 - len(f) if len(f) < 60 else 2]))
    return f


def outbound(r, kind):
    if kind == "arp":
        tpa = r.choice([GW_IP, G2_IP, "10.0.0.%d" % r.randrange(256), G1_IP, "192.0.2.1",
                        "0.0.0.0"])
        sha, spa = G1_MAC, G1_IP
        if r.random() < 0.1:
            sha = r.choice(OTHER_MACS)
        if r.random() < 0.1:
            spa = r.choice(["0.0.0.0", "10.0.0.66"])
        a = ARP(op=r.choice([1, 1, 1, 2, 3]), hwsrc=sha, psrc=spa, pdst=tpa,
                hwdst=r.choice(["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"]))
        if r.random() < 0.05:
            a.hwtype = r.choice([6, 0])
        if r.random() < 0.05:
            a.ptype = 0x86DD
        f = bytes(Ether(src=G1_MAC, dst=r.choice(["ff:ff:ff:ff:ff:ff", GW_MAC])) / a)
        if r.random() < 0.1:
            f = f[:r.randrange(14, len(f))]
        return [("out", _pad(r, f))]
    if kind == "gw_echo":
        n = r.choice([0, 1, 8, 56, r.randrange(0, 1400)])
        f = Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP if r.random() < 0.9 else "10.0.0.66",
                                               dst=GW_IP, ttl=r.randrange(1, 256),
                                               tos=r.getrandbits(8), id=r.getrandbits(16),
                                               flags=r.choice([0, "DF"]), options=_ip_options(r)) / \
            ICMP(type=r.choice([8, 8, 8, 0, 13]), code=r.choice([0, 0, 0, 3]),
                 id=r.getrandbits(16), seq=r.getrandbits(16)) / Raw(_payload(r, n))
        return [("out", _pad(r, f))]
    if kind in ("ipv4", "ipv4_big"):
        dst = r.choice(DESTS) if r.random() < 0.9 else "%d.%d.%d.%d" % tuple(
            r.randrange(256) for _ in range(4))
        proto = r.choice([1, 6, 17, 17, 47, r.randrange(256)])
        n = r.choice([0, 1, 20, r.randrange(0, 200)]) if kind == "ipv4" else \
            r.randrange(MTU - 80, MTU + 60)
        f = _guest_ip(r, dst, proto, n)
        if dst == G1_IP or r.random() < 0.02:
            pass
        return [("out", _pad(r, f))]
    if kind == "ipv4_frag":
        dst = r.choice(DESTS[:-1])
        proto = r.choice([1, 6, 17])
        f = _guest_ip(r, dst, proto, r.randrange(0, 100),
                      flags=r.choice(["MF", "MF+DF", 0]), frag=r.choice([0, 1, 185, 8191]))
        return [("out", bytes(f))]
    if kind == "spoof":
        f = _guest_ip(r, r.choice(DESTS), r.choice([1, 6, 17]), r.randrange(0, 64))
        if r.random() < 0.5:
            f[Ether].src = r.choice(OTHER_MACS)
        else:
            f[IP].src = r.choice(["10.0.0.66", "10.0.0.2", "0.0.0.0", "192.0.2.1"])
        return [("out", bytes(f))]
    if kind == "vlan":
        f = Ether(src=r.choice([G1_MAC, G1_MAC, OTHER_MACS[0]]), dst=GW_MAC) / \
            Dot1Q(vlan=r.randrange(4096)) / IP(src=G1_IP, dst=r.choice(DESTS)) / ICMP()
        return [("out", bytes(f))]
    if kind == "ethertype":
        et = r.choice([0x8847, 0x88CC, 0x0842, 0x88A8, r.getrandbits(16)])
        if et in (0x0800, 0x0806):
            et = 0x1234
        f = bytes(Ether(src=G1_MAC, dst=GW_MAC, type=et)) + _payload(r, r.randrange(0, 100))
        return [("out", f)]
    if kind == "random_after_eth":
        et = r.choice([0x0800, 0x0806, 0x86DD])
        return [("out", bytes(Ether(src=G1_MAC, dst=GW_MAC, type=et)) +
                 _payload(r, r.randrange(0, 80)))]
    if kind == "malformed_ipv4":
        f = bytearray(bytes(_guest_ip(r, r.choice(DESTS), r.choice([1, 6, 17]), r.randrange(0, 40))))
        what = r.choice(["version", "len_long", "len_short", "ihl"])
        if what == "version":
            f[14] = (r.choice([0, 5, 6, 15]) << 4) | (f[14] & 0xF)
        elif what == "len_long":
            struct.pack_into("!H", f, 16, len(f) - 14 + r.randrange(1, 500))
        elif what == "len_short":
            struct.pack_into("!H", f, 16, r.randrange(0, (f[14] & 0xF) * 4))
        else:
            f[14] = 0x40 | r.randrange(16)
        return [("out", bytes(f))]
    if kind in OUT6:
        return OUT6[kind](r)
    raise ValueError(kind)


# --- inbound ---------------------------------------------------------------------

def underlay(r, payload, dst=U1, dport=6081, src=U2, checksum=None):
    u = UDP(sport=r.randrange(49152, 65536), dport=dport)
    f = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") / \
        IPv6(src=src, dst=dst, hlim=r.choice([128, 64, 1]), tc=r.getrandbits(8),
             fl=r.getrandbits(20)) / u / Raw(payload)
    if checksum is None and r.random() < 0.5:
        f[UDP].chksum = 0
    return bytes(f)


def _options(r):
    out = b""
    for _ in range(r.choice([0, 1, 1, 2, 3])):
        c = r.random()
        if c < 0.25:
            out += geneve_opt(OXIDE, 0x00)
        elif c < 0.4:
            out += geneve_opt(OXIDE, 0x01, _payload(r, 4))
        elif c < 0.6:
            out += geneve_opt(OXIDE, 0x02, struct.pack("!I", r.randrange(500, 9000)))
        elif c < 0.85:
            out += geneve_opt(r.choice([0x0000, 0x0102, 0xFFFF, OXIDE]),
                              r.choice([0x03, 0x05, 0x7F]), _payload(r, 4 * r.randrange(0, 4)))
        else:
            out += geneve_opt(r.choice([0xFFFF, OXIDE, 0x0102]),
                              r.choice([0x80, 0x83, 0xFF, 0x85]), _payload(r, 4 * r.randrange(0, 3)))
    return out


def inner_frame(r, src=G2_IP, dst=G1_IP, dst_mac=G1_MAC, proto=None, n=None, **l4):
    proto = proto if proto is not None else r.choice([1, 1, 6, 17, 17, 47])
    n = n if n is not None else r.choice([0, 8, r.randrange(0, 300)])
    if proto == 1 and not l4:
        body = ICMP(type=r.choice([8, 0, 3]), id=r.getrandbits(16)) / Raw(_payload(r, n))
    elif proto in (6, 17) and l4:
        body = (TCP(flags="SA", **l4) if proto == 6 else UDP(**l4)) / Raw(_payload(r, n))
    else:
        body = _l4(r, proto, n)
    return bytes(Ether(dst=dst_mac, src=r.choice([G2_MAC, BSVC_MAC_S])) /
                 IP(src=src, dst=dst, proto=proto, tos=r.getrandbits(8),
                    options=_ip_options(r)) / body)



def inbound(r, kind):
    vni = r.choice([10, 10, 10, 99, 11, r.getrandbits(24)])
    dmac = G1_MAC if r.random() < 0.85 else r.choice(OTHER_MACS)
    src = r.choice([G2_IP, G2_IP, "192.0.2.1", "8.8.8.8"])
    inner = inner_frame(r, src=src, dst_mac=dmac)
    if kind == "geneve":
        return [("in", underlay(r, geneve(vni=vni if r.random() < 0.3 else 10,
                                          flags=r.choice([0, 0, 0x80, 0x40, 0x3F])) + inner))]
    if kind == "geneve_options":
        return [("in", underlay(r, geneve(vni=vni if r.random() < 0.2 else 10,
                                          opts=_options(r)) + inner))]
    if kind == "truncated":
        f = underlay(r, geneve(opts=_options(r)) + inner)
        return [("in", f[:r.randrange(0, len(f))])]
    if kind == "bad_lengths":
        f = bytearray(underlay(r, geneve(opts=_options(r)) + inner))
        which = r.choice(["plen", "ulen", "optlen"])
        if which == "plen":
            struct.pack_into("!H", f, 18, r.randrange(0, 65536) if r.random() < 0.5 else
                             max(0, struct.unpack_from("!H", f, 18)[0] + r.randrange(-30, 30)))
        elif which == "ulen":
            struct.pack_into("!H", f, 58, r.randrange(0, 65536) if r.random() < 0.5 else
                             max(0, struct.unpack_from("!H", f, 58)[0] + r.randrange(-30, 30)))
        else:
            f[62] = (f[62] & 0xC0) | r.randrange(64)
        return [("in", bytes(f))]
    if kind == "bad_header":
        g = bytearray(geneve(opts=_options(r)))
        which = r.choice(["ver", "proto", "rsvd", "opt_len_field"])
        if which == "ver":
            g[0] = (r.randrange(1, 4) << 6) | (g[0] & 0x3F)
        elif which == "proto":
            g[2:4] = r.choice([0x0800, 0x86DD, 0x0000, r.getrandbits(16)]).to_bytes(2, "big")
        elif which == "rsvd":
            g[7] = r.randrange(1, 256)
        elif len(g) > 8:
            g[11] = r.getrandbits(8)
        return [("in", underlay(r, bytes(g) + inner))]
    if kind == "inner_odd":
        c = r.choice(["arp", "ipv6", "vlan", "short", "ip_trunc", "bad_ip", "frag", "empty"])
        if c == "arp":
            i = bytes(Ether(dst=dmac, src=G2_MAC) / ARP(psrc=G2_IP, pdst=G1_IP))
        elif c == "ipv6":
            i = bytes(Ether(dst=dmac, src=G2_MAC) / IPv6() / UDP())
        elif c == "vlan":
            i = bytes(Ether(dst=dmac, src=G2_MAC) / Dot1Q() / IP(src=G2_IP, dst=G1_IP) / UDP())
        elif c == "short":
            i = inner[:r.randrange(0, 14)]
        elif c == "ip_trunc":
            i = inner[:r.randrange(14, 34)]
        elif c == "bad_ip":
            b = bytearray(inner)
            b[14] = r.choice([0x55, 0x44, 0x4F, 0x65])
            i = bytes(b)
        elif c == "frag":
            i = bytes(Ether(dst=dmac, src=G2_MAC) / IP(src=src, dst=G1_IP, flags="MF",
                                                       frag=r.choice([0, 3])) / UDP() / b"xx")
        else:
            i = b""
        return [("in", underlay(r, geneve(vni=vni if r.random() < 0.2 else 10) + i))]
    if kind == "not_geneve":
        c = r.choice(["ipv4", "arp", "icmp6", "port", "dst", "hbh", "routing", "runt", "v4geneve"])
        E = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
        if c == "ipv4":
            f = E / IP(src="192.0.2.9", dst="192.0.2.10") / UDP(dport=6081) / Raw(geneve() + inner)
        elif c == "arp":
            f = Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:02") / ARP()
        elif c == "icmp6":
            f = E / IPv6(src=U2, dst=U1) / ICMPv6EchoRequest(data=_payload(r, 8))
        elif c == "port":
            return [("in", underlay(r, geneve() + inner, dport=r.choice([6082, 4789, 53])))]
        elif c == "dst":
            return [("in", underlay(r, geneve() + inner, dst=r.choice(["fd00:1::2", U2, BSVC6])))]
        elif c == "hbh":
            f = E / IPv6(src=U2, dst=U1) / IPv6ExtHdrHopByHop() / UDP(dport=6081) / Raw(geneve() + inner)
        elif c == "routing":
            f = E / IPv6(src=U2, dst=U1) / IPv6ExtHdrRouting() / UDP(dport=6081) / Raw(geneve() + inner)
        elif c == "runt":
            f = bytes(E / IPv6(src=U2, dst=U1))[:r.randrange(14, 54)]
        else:
            f = E / IP() / UDP(dport=6081) / Raw(geneve())
        return [("in", bytes(f))]
    if kind == "random":
        n = r.randrange(14, 200)
        return [("in", _payload(r, n))]
    if kind == "random_udp":
        return [("in", underlay(r, _payload(r, r.randrange(0, 120))))]
    if kind == "trailing":
        f = underlay(r, geneve(opts=_options(r)) + inner)
        return [("in", f + _payload(r, r.randrange(1, 40)))]
    if kind == "geneve6":
        return [("in", underlay(r, geneve(vni=r.choice([10] * 8 + [11, 99]),
                                          opts=_options(r) if r.random() < 0.3 else b"") +
                                inner6_frame(r)))]
    if kind == "inner6_odd":
        return [("in", underlay(r, geneve() + inner6_odd(r)))]
    raise ValueError(kind)


# --- sequences (stateful firewall) ---------------------------------------------------

def sequence(r, kind):
    proto = r.choice([1, 6, 17])
    sp, dp = r.randrange(1, 65536), r.randrange(1, 65536)
    ident = r.getrandbits(16)
    if kind in ("reply_in", "reply_external"):
        remote = G2_IP if kind == "reply_in" else r.choice(["192.0.2.1", "8.8.8.8"])
        l4 = {}
        if proto == 1:
            o = Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP, dst=remote) / ICMP(type=8, id=ident)
            back = ICMP(type=0, id=r.choice([ident, ident ^ 1]))
        else:
            o = Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP, dst=remote) / \
                (UDP(sport=sp, dport=dp) if proto == 17 else TCP(sport=sp, dport=dp, flags="S"))
            l4 = {"sport": dp if r.random() < 0.8 else dp ^ 1, "dport": sp}
        ir = Ether(dst=G1_MAC, src=G2_MAC) / IP(src=remote, dst=G1_IP, proto=proto)
        ir = ir / (back if proto == 1 else (UDP(**l4) if proto == 17 else TCP(flags="SA", **l4)))
        opts = geneve_opt(OXIDE, 0x00) if kind == "reply_external" else b""
        vni = 10
        steps = [("out", bytes(o))] if r.random() < 0.9 else []
        steps.append(("in", underlay(r, geneve(vni=vni, opts=opts) + bytes(ir))))
        return steps
    if kind == "repeat_out":
        steps = outbound(r, "ipv4")
        return steps * r.randrange(2, 4)
    if kind == "in_then_out":
        i = inner_frame(r, src=r.choice([G2_IP, "192.0.2.1"]), proto=proto,
                        sport=sp, dport=dp) if proto != 1 else inner_frame(r, proto=1)
        opts = geneve_opt(OXIDE, 0x00) if r.random() < 0.5 else b""
        ii = Ether(i)
        back = Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP, dst=ii[IP].src, proto=proto)
        if proto == 17:
            back = back / UDP(sport=dp, dport=sp)
        elif proto == 6:
            back = back / TCP(sport=dp, dport=sp, flags="A")
        else:
            back = back / ICMP(type=0)
        return [("in", underlay(r, geneve(opts=opts) + i)), ("out", bytes(back))]
    if kind in SEQ6:
        return SEQ6[kind](r)
    raise ValueError(kind)


def case(kind_dir, kind, seed):
    r = random.Random(f"{kind_dir}/{kind}/{seed}")
    if kind_dir == "out":
        return outbound(r, kind)
    if kind_dir == "in":
        return inbound(r, kind)
    if kind_dir == "nat":
        return nat_case(r, kind)
    if kind_dir == "nat2":
        return nat_case(r, kind, NAT_G2)
    return sequence(r, kind)


# --- IPv6, DHCP and neighbour discovery ------------------------------------------------
#
# IPv6 packets are built byte by byte (extension headers, lengths and cuts
# under the generator's control); L4 checksums are right for the addresses
# in the header, as a guest's stack would make them.

TCP_FLAGS = {"S": 0x02, "SA": 0x12, "A": 0x10, "PA": 0x18, "F": 0x01, "R": 0x04, "FA": 0x11}


def a6(s):
    return ipaddress.IPv6Address(s).packed


def _mac(s):
    return bytes.fromhex(s.replace(":", ""))


def _l4_csum6(src, dst, nh, body, at):
    b = bytearray(body)
    b[at:at + 2] = b"\0\0"
    ck = csum(a6(src) + a6(dst) + struct.pack("!IxxxB", len(b), nh) + bytes(b))
    b[at:at + 2] = struct.pack("!H", ck or 0xFFFF if nh == 17 else ck)
    return bytes(b)


def udp6(src, dst, sport, dport, payload):
    return _l4_csum6(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) +
                     payload, 6)


def tcp6(r, src, dst, sport, dport, flags, payload):
    h = struct.pack("!HHIIBBHHH", sport, dport, r.getrandbits(32), 0, 5 << 4, TCP_FLAGS[flags],
                    65535, 0, 0)
    return _l4_csum6(src, dst, 6, h + payload, 16)


def icmp6(src, dst, typ, code, rest):
    return _l4_csum6(src, dst, 58, bytes((typ, code, 0, 0)) + rest, 2)


def ext_hdr(r, kind, words=None, frag=None):
    """One extension header (its next-header byte filled in by ip6_packet):
    hop-by-hop or destination options padded with one PadN, a routing
    header with no segments left, or a fragment header (frag: (offset in
    8-byte units, more-fragments bit))."""
    if kind == 44:
        off, more = frag if frag is not None else r.choice(FRAGS)
        return (44, struct.pack("!BBHI", 0, 0, (off << 3) | more, r.getrandbits(32)))
    n = words if words is not None else r.choice([0, 0, 0, 1, 2])
    body = bytearray(8 * (n + 1))
    body[1] = n
    if kind == 43:
        body[2], body[3] = r.choice([0, 2, 4, 253]), 0
    else:
        i = 2                                   # PadN options (Pad1 for one byte left)
        while i < len(body):
            left = len(body) - i
            if left == 1:
                break
            k = min(left - 2, 255)
            if left - 2 - k == 1:
                k -= 1
            body[i], body[i + 1] = 1, k
            i += 2 + k
    return (kind, bytes(body))


FRAGS = [(0, 1), (0, 1), (0, 0), (1, 0), (185, 1), (8191, 0)]


def ip6_packet(src, dst, proto, l4, exts=(), hlim=64, tc=0, fl=0, plen=None):
    """An IPv6 packet: header, extension headers [(type, bytes)] chained in
    order, then the L4 bytes; plen overrides the payload length."""
    types = [t for t, _ in exts] + [proto]
    payload = b"".join(bytes((types[i + 1],)) + e[1:] for i, (_, e) in enumerate(exts)) + l4
    return struct.pack("!IHBB", (6 << 28) | (tc << 20) | fl,
                       len(payload) if plen is None else plen, types[0], hlim) + \
        a6(src) + a6(dst) + payload


def eth6(pkt, src=G1_MAC, dst=GW_MAC):
    return _mac(dst) + _mac(src) + b"\x86\xdd" + pkt


def _some_exts(r, n=None):
    n = n if n is not None else r.choice([0, 0, 0, 1, 1, 2, 3, 4])
    return [ext_hdr(r, r.choice([0, 43, 44, 60])) for _ in range(n)]


def _l4_6(r, proto, src, dst, n, icmp_types=None):
    if proto == 17:
        return udp6(src, dst, r.randrange(1, 65536), _port(r), _payload(r, n))
    if proto == 6:
        return tcp6(r, src, dst, r.randrange(1, 65536), _port(r), r.choice(list(TCP_FLAGS)),
                    _payload(r, n))
    if proto == 58:
        t = r.choice(icmp_types or [128, 128, 129, 1, 2, 3, 4, 143, 133, 135])
        return icmp6(src, dst, t, r.choice([0, 0, 0, 1]),
                     struct.pack("!HH", r.getrandbits(16), r.getrandbits(16)) + _payload(r, n))
    return _payload(r, n)


def _rand6(r):
    return str(ipaddress.IPv6Address(r.getrandbits(128)))


def out_ipv6(r, big=False):
    src = G1_IP6 if r.random() < 0.93 else r.choice(["fd00:10::66", G2_IP6, "::", "2001:db8::1",
                                                     "::ffff:10.0.0.1"])
    dst = r.choice(DESTS6) if r.random() < 0.92 else _rand6(r)
    proto = r.choice([6, 17, 17, 58, 58, 47, r.randrange(256)])
    if big:
        n = r.randrange(MTU - 100, MTU + 60) - 48
    else:
        n = r.choice([0, 1, 20, r.randrange(0, 200)])
    exts = _some_exts(r) if r.random() < 0.1 else []
    pkt = ip6_packet(src, dst, proto, _l4_6(r, proto, src, dst, n), exts,
                     hlim=r.choice([64, 64, 1, 255, 0]), tc=r.choice([0, 0, r.getrandbits(8)]),
                     fl=r.getrandbits(20) if r.random() < 0.5 else 0)
    return [("out", _pad(r, eth6(pkt)))]


def out_ipv6_ext(r):
    """Extension headers: up to five, fragments, ones longer than a kilobyte,
    and ones cut short by the payload length or the frame."""
    src = G1_IP6 if r.random() < 0.8 else r.choice([G1_LL, "fe80::7"])
    dst = r.choice(DESTS6[:8] + [GW_LL, "ff02::1", "2001:4860::8888"])
    proto = r.choice([6, 17, 58, 58, 59])
    n = r.choice([0, 5, r.randrange(0, 100)])
    exts = _some_exts(r, r.choice([1, 1, 2, 3, 4, 4, 5, 6]))
    if r.random() < 0.25:
        # one long header: the walk must reach past a kilobyte
        i = r.randrange(len(exts))
        exts[i] = ext_hdr(r, r.choice([0, 60, 43]), words=r.choice([62, 120, 124, 125, 126,
                                                                    127, 130, 160]))
    l4 = _l4_6(r, proto, src, dst, n, icmp_types=[128, 129, 1, 133, 135])
    pkt = ip6_packet(src, dst, proto, l4, exts, hlim=r.choice([64, 255]))
    c = r.random()
    if c < 0.15:
        # the payload length ends inside the headers; the rest stays as trailer
        cut = r.randrange(0, len(pkt) - 40)
        pkt = pkt[:4] + struct.pack("!H", cut) + pkt[6:]
    elif c < 0.3:
        # the frame ends inside the headers (payload length to match)
        cut = r.randrange(0, len(pkt) - 40)
        pkt = (pkt[:4] + struct.pack("!H", cut) + pkt[6:])[:40 + cut]
    return [("out", _pad(r, eth6(pkt)))]


def out_malformed_ipv6(r):
    pkt = bytearray(ip6_packet(G1_IP6, r.choice(DESTS6[:4]), 17,
                               udp6(G1_IP6, G2_IP6, 1, 2, _payload(r, r.randrange(0, 40))),
                               _some_exts(r, r.choice([0, 1]))))
    what = r.choice(["version", "plen_long", "short_header", "plen_random", "five_ext",
                     "zero_plen"])
    if what == "version":
        pkt[0] = (r.choice([0, 4, 5, 7, 15]) << 4) | (pkt[0] & 0xF)
    elif what == "plen_long":
        struct.pack_into("!H", pkt, 4, len(pkt) - 40 + r.randrange(1, 300))
    elif what == "short_header":
        pkt = pkt[:r.randrange(0, 40)]
    elif what == "plen_random":
        struct.pack_into("!H", pkt, 4, r.randrange(0, 65536))
    elif what == "zero_plen":
        struct.pack_into("!H", pkt, 4, 0)
    else:
        exts = [ext_hdr(r, r.choice([0, 43, 60])) for _ in range(r.choice([5, 5, 6]))]
        pkt = ip6_packet(G1_IP6, G2_IP6, 17, udp6(G1_IP6, G2_IP6, 1, 2, b"x"), exts)
    return [("out", _pad(r, eth6(bytes(pkt))))]


def _slla(mac=G1_MAC):
    return b"\x01\x01" + _mac(mac)


def ndp_body(r, t, src):
    """The ICMPv6 body after type, code and checksum of an NDP message."""
    opt = _slla() if src != "::" and r.random() < 0.8 else b""
    if r.random() < 0.1:
        opt += bytes((r.choice([3, 5, 14, 25]), 1)) + _payload(r, 6)
    if t == 133:
        return bytes(4) + opt
    if t == 135:
        tgt = GW_LL if r.random() < 0.8 else r.choice([G1_LL, G2_IP6, "fe80::1", G1_IP6, "::"])
        return bytes(4) + a6(tgt) + opt
    if t == 136:
        return bytes((r.choice([0x60, 0x20, 0xE0]), 0, 0, 0)) + a6(G1_LL) + opt
    if t == 134:
        return struct.pack("!BBHII", 64, 0, 1800, 0, 0) + opt
    return bytes(4) + a6(r.choice([G2_IP6, "fe80::1"])) + a6(G2_IP6) + opt   # redirect


def out_ndp(r, edge=False):
    t = NDP_TYPES[r.choice(["rs", "rs", "ns", "ns", "ns", "na", "ra", "redirect"])]
    if t == 133:
        src = r.choice([G1_LL, G1_LL, G1_LL, "::", G1_IP6, "fe80::99"])
        dst = r.choice(["ff02::2", "ff02::2", "ff02::2", GW_LL, "ff02::1", G2_IP6])
    elif t == 135:
        src = r.choice([G1_LL, G1_LL, "::", G1_IP6])
        dst = r.choice(["ff02::1:ff00:1", "ff02::1:ff00:1", GW_LL, GW_LL, "ff02::1", G2_IP6])
    else:
        src = r.choice([G1_LL, G1_IP6, "::"])
        dst = r.choice(["ff02::1", GW_LL, "ff02::2", G2_IP6])
    hlim = 255 if r.random() < 0.85 else r.choice([64, 1, 254, 0])
    code = 0 if r.random() < 0.9 else r.choice([1, 255])
    body = ndp_body(r, t, src)
    exts = []
    cut = None
    if edge:
        what = r.choice(["frag", "atomic", "hbh", "short", "plen_cut", "target_cut", "ext4"])
        if what == "frag":
            exts = [ext_hdr(r, 44, frag=r.choice([(0, 1), (3, 0), (3, 1)]))]
        elif what == "atomic":
            exts = [ext_hdr(r, 44, frag=(0, 0))]
        elif what == "hbh":
            exts = [ext_hdr(r, r.choice([0, 60]))]
        elif what == "ext4":
            exts = _some_exts(r, 4)
        elif what == "short":
            body = body[:r.randrange(0, 4)]
        elif what == "plen_cut":
            cut = r.randrange(0, 8 + len(body))
        else:
            body = body[:r.randrange(4, 20)]
    l4 = icmp6(src, dst, t, code, body)
    pkt = ip6_packet(src, dst, 58, l4, exts, hlim=hlim)
    if cut is not None:
        pkt = pkt[:4] + struct.pack("!H", len(pkt) - 40 - len(l4) + cut) + pkt[6:]
    dmac = r.choice(["33:33:00:00:00:02", "33:33:ff:00:00:01", GW_MAC, "33:33:00:00:00:01"])
    return [("out", _pad(r, eth6(pkt, dst=dmac)))]


def out_gw_echo6(r):
    src = r.choice([G1_LL, G1_LL, G1_LL, G1_IP6, "::", "fe80::5", "2001:db8::1"])
    dst = GW_LL if r.random() < 0.9 else r.choice(["fe80::aa40:25ff:fe00:2", "ff02::1", GW_LL])
    t = 128 if r.random() < 0.85 else r.choice([129, 1, 130])
    code = 0 if r.random() < 0.85 else r.choice([1, 7])
    n = r.choice([0, 1, 8, 56, r.randrange(0, 1300)])
    exts = []
    c = r.random()
    if c < 0.1:
        exts = [ext_hdr(r, r.choice([0, 60, 43]))]
    elif c < 0.2:
        exts = [ext_hdr(r, 44, frag=r.choice([(0, 1), (0, 0), (5, 0)]))]
    body = struct.pack("!HH", r.getrandbits(16), r.getrandbits(16)) + _payload(r, n)
    if r.random() < 0.05:
        body = body[:r.randrange(0, 4)]
    pkt = ip6_packet(src, dst, 58, icmp6(src, dst, t, code, body), exts,
                     hlim=r.choice([64, 255, 1]), tc=r.choice([0, r.getrandbits(8)]))
    return [("out", _pad(r, eth6(pkt)))]


def out_link_local(r):
    src = r.choice([G1_LL, G1_LL, G1_IP6, "fe80::42", "::"])
    dst = r.choice(LINK_SCOPED) if src != G1_IP6 or r.random() < 0.8 else G2_IP6
    if src.startswith("fe80") and r.random() < 0.3:
        dst = r.choice(DESTS6[:4])
    proto = r.choice([17, 17, 6, 58, 58, 47])
    if proto == 17 and r.random() < 0.4:
        l4 = udp6(src, dst, r.choice([5353, 546, 547, 68, 1234]),
                  r.choice([5353, 546, 547, 548, 1234]), _payload(r, r.randrange(0, 40)))
    else:
        l4 = _l4_6(r, proto, src, dst, r.randrange(0, 40),
                   icmp_types=[128, 129, 130, 131, 143, 1, 2, 138, 139])
    pkt = ip6_packet(src, dst, proto, l4, _some_exts(r) if r.random() < 0.1 else [],
                     hlim=r.choice([1, 64, 255]))
    return [("out", _pad(r, eth6(pkt, dst=r.choice(["33:33:00:00:00:fb", GW_MAC]))))]


def _opt6(code, body):
    return struct.pack("!HH", code, len(body)) + body


def _duid(r):
    c = r.random()
    if c < 0.5:
        return bytes.fromhex("00030001") + _mac(G1_MAC)
    if c < 0.75:
        return bytes.fromhex("00010001") + r.getrandbits(32).to_bytes(4, "big") + _mac(G1_MAC)
    if c < 0.9:
        return bytes.fromhex("0002") + _payload(r, r.randrange(4, 20))
    return bytes.fromhex("0004") + _payload(r, 16)


def _ia_na(r, iaid=None, n=None):
    iaid = r.getrandbits(32) if iaid is None else iaid
    body = struct.pack("!III", iaid, r.choice([0, 3600]), r.choice([0, 5400]))
    if r.random() < 0.3:
        body += _opt6(5, a6(G1_IP6) + struct.pack("!II", 0, 0))
    return _opt6(3, body if n is None else body[:n])


def dhcp6_message(r, mtype, edge=None):
    """A DHCPv6 client message: type, transaction id, options (a client id,
    a server id for the types that name one, an IA_NA, and the usual
    others), with edge cases when edge is given."""
    client = _opt6(1, _duid(r))
    ours = _opt6(2, MY_DUID)
    other = _opt6(2, bytes.fromhex("00030001") + _mac("a8:40:25:00:00:99"))
    opts = [client]
    if mtype in (3, 5, 6, 8) or (mtype not in (1, 4, 11) and r.random() < 0.5):
        opts.append(ours if r.random() < 0.85 else other)
    elif r.random() < 0.05:
        opts.append(r.choice([ours, other]))
    if r.random() < 0.85:
        opts.append(_ia_na(r))
    if r.random() < 0.6:
        opts.append(_opt6(8, struct.pack("!H", r.getrandbits(16))))     # elapsed time
    if r.random() < 0.5:
        opts.append(_opt6(6, struct.pack("!HH", 23, 24)))               # option request
    if mtype == 1 and r.random() < 0.35:
        opts.append(_opt6(14, b""))                                     # rapid commit
    if r.random() < 0.3:
        r.shuffle(opts)
    if edge == "no_client":
        opts.remove(client)
    elif edge == "long_client":
        opts[opts.index(client)] = _opt6(1, b"\x00\x02" + _payload(r, r.choice(
            [100, 125, 126, 127, 128, 129, 130, 140])))
    elif edge == "two_clients":
        opts.append(_opt6(1, _duid(r)))
    elif edge == "two_servers":
        opts = [o for o in opts if o[:2] != b"\x00\x02"]
        opts += r.choice([[ours, other], [other, ours], [ours, ours]])
    elif edge == "ia_na_short":
        opts = [o for o in opts if o[:2] != b"\x00\x03"]
        opts.insert(r.randrange(len(opts) + 1), _ia_na(r, n=r.choice([0, 4, 8, 11])))
        if r.random() < 0.5:
            opts.append(_ia_na(r))
    elif edge == "ia_na_zero":
        opts = [o for o in opts if o[:2] != b"\x00\x03"]
        opts += [_ia_na(r, iaid=0), _ia_na(r)]
    elif edge == "many":
        k = r.choice([13, 14, 15, 16, 17, 20])
        opts = [_opt6(8, b"\0\0")] * k + opts
    elif edge == "rapid_body":
        opts.append(_opt6(14, _payload(r, r.choice([1, 4]))))
    msg = bytes((mtype,)) + r.getrandbits(24).to_bytes(3, "big") + b"".join(opts)
    if edge == "opt_past_end":
        msg = msg + struct.pack("!HH", r.choice([1, 2, 3, 14]), r.randrange(1, 40)) + \
            _payload(r, r.randrange(0, 4))
    elif edge == "short":
        msg = msg[:r.randrange(0, 4)]
    elif edge == "cut":
        msg = msg[:r.randrange(4, len(msg))]
    return msg


DHCP6_EDGES = ["no_client", "long_client", "two_clients", "two_servers", "ia_na_short",
               "ia_na_zero", "many", "rapid_body", "opt_past_end", "short", "cut", "sport", "dst",
               "frag", "atomic", "plen_cut", "hbh"]


def out_dhcp6(r, edge=False):
    mtype = r.choice([1, 1, 1, 3, 3, 3, 4, 4, 5, 6, 8, 9, 11, 12, 2, 7])
    e = r.choice(DHCP6_EDGES) if edge else None
    msg = dhcp6_message(r, mtype, e)
    src = r.choice([G1_LL] * 6 + [G1_IP6, "::", "fe80::5"])
    dst = ALL_DHCP6
    sport = 546
    exts = []
    if e == "sport":
        sport = r.choice([547, 5460, 1])
    elif e == "dst":
        dst = r.choice(["ff05::1:3", GW_LL, "ff02::1", "ff02::1:3"])
    elif e == "frag":
        exts = [ext_hdr(r, 44, frag=(0, 1))]
    elif e == "atomic":
        exts = [ext_hdr(r, 44, frag=(0, 0))]
    elif e == "hbh":
        exts = [ext_hdr(r, r.choice([0, 60]))]
    l4 = udp6(src, dst, sport, 547, msg)
    pkt = ip6_packet(src, dst, 17, l4, exts, hlim=r.choice([1, 1, 64, 255]))
    if e == "plen_cut":
        # the UDP datagram cut short by the payload length; the rest is trailer
        cut = r.randrange(0, len(l4))
        pkt = pkt[:4] + struct.pack("!H", len(pkt) - 40 - len(l4) + cut) + pkt[6:]
    return [("out", _pad(r, eth6(pkt, dst="33:33:00:01:00:02")))]


def bootp_request(r, mtype=None, edge=None):
    """A DHCPv4 client message (BOOTP and options) as g1 sends it."""
    mtype = mtype if mtype is not None else r.choice([1, 1, 3, 3, 3])
    flags = r.choice([0, 0, 0x8000, 0x8000, r.getrandbits(16)])
    op, htype, hlen, chaddr = 1, 1, 6, _mac(G1_MAC)
    cookie = bytes((99, 130, 83, 99))
    if edge == "op":
        op = r.choice([2, 0, 3])
    elif edge == "htype":
        htype = r.choice([6, 0])
    elif edge == "hlen":
        hlen = r.choice([0, 16, 8])
    elif edge == "cookie":
        cookie = r.choice([bytes(4), bytes((99, 130, 83, 98))])
    elif edge == "chaddr":
        chaddr = _mac(r.choice(OTHER_MACS))
    ciaddr = r.choice([bytes(4), bytes(4), bytes((10, 0, 0, 1))])
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, htype, hlen, 0, r.getrandbits(32),
                        r.choice([0, 3]), flags, ciaddr, bytes(4), bytes(4), bytes(4), chaddr,
                        b"", b"") + cookie
    opts = b""
    if r.random() < 0.3:
        opts += b"\0" * r.randrange(1, 6)
    before = [bytes((61, 7, 1)) + chaddr, bytes((12, 2)) + b"g1", bytes((57, 2, 2, 64)),
              bytes((50, 4, 10, 0, 0, 1)), bytes((54, 4)) + bytes((172, 30, 0, 5))]
    for o in r.sample(before, r.randrange(0, 3)):
        opts += o
    typ = bytes((53, 1, mtype))
    if edge == "type_len":
        typ = bytes((53, 2, mtype, 0)) if r.random() < 0.5 else bytes((53, 0))
    elif edge == "no_type":
        typ = b""
    elif edge == "end_first":
        opts += b"\xff"
    elif edge == "pads":
        opts += b"\0" * r.choice([58, 60, 61, 62, 63, 64, 70])
    elif edge == "many":
        opts += bytes((57, 2, 2, 64)) * r.choice([60, 61, 62, 63, 64])
    opts += typ + bytes((55, 3, 1, 3, 6))
    if r.random() < 0.9:
        opts += b"\xff"
    bootp += opts
    if r.random() < 0.5:
        bootp += bytes(max(0, 300 - len(bootp)))
    return bootp


DHCP4_EDGES = ["op", "htype", "hlen", "cookie", "chaddr", "type_len", "no_type", "end_first",
               "pads", "many", "type", "dst", "sport", "short", "cut", "frag", "ip_options",
               "src", "udp_len"]


def out_dhcp4(r, edge=False):
    e = r.choice(DHCP4_EDGES) if edge else None
    mtype = r.choice([2, 4, 5, 6, 7, 8, 0, 255]) if e == "type" else None
    bootp = bootp_request(r, mtype, e)
    src = r.choice(["0.0.0.0", "0.0.0.0", G1_IP])
    dst = "255.255.255.255" if r.random() < 0.95 else GW_IP
    sport = 68
    kw = {}
    if e == "dst":
        dst = r.choice([GW_IP, GW_IP, "10.0.0.255", "10.0.0.2", "224.0.0.1"])
    elif e == "sport":
        sport = r.choice([67, 6800, 1])
    elif e == "src":
        src = r.choice(["10.0.0.66", "192.0.2.1"])
    elif e == "frag":
        kw = r.choice([dict(flags="MF"), dict(frag=r.choice([1, 40])), dict(flags="MF", frag=3)])
    elif e == "ip_options":
        kw = dict(options=[IPOption(b"\x94\x04\x00\x00")])
    elif e == "short":
        bootp = bootp[:r.randrange(200, 240)]
    u = UDP(sport=sport, dport=67)
    if e == "udp_len":
        u.len = r.choice([8, 100, 2000])
    f = bytearray(bytes(Ether(src=G1_MAC, dst="ff:ff:ff:ff:ff:ff") /
                        IP(src=src, dst=dst, ttl=r.choice([64, 128, 1]), **kw) / u / Raw(bootp)))
    if e == "cut":
        # the IP total length ends inside the BOOTP message or its options;
        # the rest of the frame stays as trailer
        ihl = (f[14] & 0xF) * 4
        tot = r.randrange(ihl + 8 + 200, len(f) - 14)
        struct.pack_into("!H", f, 16, tot)
        f[24:26] = b"\0\0"
        f[24:26] = struct.pack("!H", csum(bytes(f[14:14 + ihl])))
    return [("out", _pad(r, bytes(f)))]


def out_l4_trailer(r):
    """An L4 header cut short by the IP length, followed by more bytes of
    the frame (Ethernet padding, or junk): the L4 fields are not the
    packet's."""
    proto = r.choice([6, 17, 17, 1, 58])
    if proto == 58 or r.random() < 0.5:
        dst = r.choice(DESTS6[:6] + [GW_LL, "ff02::1:2"])
        src = G1_IP6 if not dst.startswith(("fe", "ff")) else G1_LL
        if proto == 1:
            proto = 58
        if proto == 17 and dst == "ff02::1:2":
            l4 = udp6(src, dst, 546, 547, dhcp6_message(r, 1))
        else:
            l4 = _l4_6(r, proto, src, dst, 30, icmp_types=[128, 133, 135])
        exts = [ext_hdr(r, 0)] if r.random() < 0.2 else []
        pkt = ip6_packet(src, dst, proto, l4, exts, hlim=255)
        keep = r.randrange(0, {6: 20, 17: 8, 58: 24}[proto])
        cut = len(pkt) - 40 - len(l4) + keep
        pkt = pkt[:4] + struct.pack("!H", cut) + pkt[6:]
        return [("out", eth6(pkt))]
    f = bytearray(bytes(_guest_ip(r, r.choice(DESTS[:6] + ["255.255.255.255"]), proto, 30)))
    ihl = (f[14] & 0xF) * 4
    keep = r.randrange(0, 20 if proto == 6 else 8)
    struct.pack_into("!H", f, 16, ihl + keep)
    f[24:26] = b"\0\0"
    f[24:26] = struct.pack("!H", csum(bytes(f[14:14 + ihl])))
    return [("out", bytes(f))]


OUT6 = {
    "ipv6": out_ipv6,
    "ipv6_big": lambda r: out_ipv6(r, big=True),
    "ipv6_ext": out_ipv6_ext,
    "malformed_ipv6": out_malformed_ipv6,
    "ndp": out_ndp,
    "ndp_edge": lambda r: out_ndp(r, edge=True),
    "gw_echo6": out_gw_echo6,
    "link_local": out_link_local,
    "dhcp6": out_dhcp6,
    "dhcp6_edge": lambda r: out_dhcp6(r, edge=True),
    "dhcp4": out_dhcp4,
    "dhcp4_edge": lambda r: out_dhcp4(r, edge=True),
    "l4_trailer": out_l4_trailer,
}


# --- inbound IPv6 -------------------------------------------------------------------------

def inner6_frame(r, src=None, dst=None, dst_mac=G1_MAC, proto=None, sport=None, dport=None,
                 icmp_type=None, ident=None, n=None):
    """An inner IPv6 frame as a peer would carry it to g1."""
    src = src or (r.choice([G2_IP6, G2_IP6, G2_IP6, "fd00:10::44", "2001:db8::1",
                            "::ffff:10.0.0.2", "fe80::2", "ff02::1", "::"]))
    dst = dst or (G1_IP6 if r.random() < 0.85 else r.choice(
        ["ff02::1", G1_LL, GW_LL, "fd00:10::66", G2_IP6, "::ffff:10.0.0.1"]))
    proto = proto if proto is not None else r.choice([58, 58, 6, 17, 17, 47])
    n = n if n is not None else r.choice([0, 8, r.randrange(0, 300)])
    if proto == 17:
        l4 = udp6(src, dst, sport or r.randrange(1, 65536), dport or _port(r), _payload(r, n))
    elif proto == 6:
        l4 = tcp6(r, src, dst, sport or r.randrange(1, 65536), dport or _port(r),
                  "SA" if sport else r.choice(list(TCP_FLAGS)), _payload(r, n))
    elif proto == 58:
        t = icmp_type if icmp_type is not None else r.choice(
            [128, 128, 129, 1, 2, 3, 133, 134, 135, 136, 137, 143])
        if 133 <= t <= 137:
            l4 = icmp6(src, dst, t, 0, ndp_body(r, t, src))
        else:
            i = ident if ident is not None else r.getrandbits(16)
            l4 = icmp6(src, dst, t, r.choice([0, 0, 1]),
                       struct.pack("!HH", i, r.getrandbits(16)) + _payload(r, n))
    else:
        l4 = _payload(r, n)
    exts = _some_exts(r) if r.random() < 0.15 else []
    pkt = ip6_packet(src, dst, proto, l4, exts, hlim=r.choice([64, 255, 1]),
                     tc=r.getrandbits(8), fl=r.getrandbits(20))
    return eth6(pkt, src=r.choice([G2_MAC, BSVC_MAC_S]), dst=dst_mac)


def inner6_odd(r):
    c = r.choice(["version", "plen_long", "short", "ext_cut", "five_ext", "ndp", "link",
                  "big_ext", "trailer"])
    f = bytearray(inner6_frame(r, dst=G1_IP6, src=G2_IP6))
    if c == "version":
        f[14] = (r.choice([4, 5, 0]) << 4) | (f[14] & 0xF)
    elif c == "plen_long":
        struct.pack_into("!H", f, 18, len(f) - 54 + r.randrange(1, 100))
    elif c == "short":
        f = f[:r.randrange(14, 54)]
    elif c == "ext_cut":
        pkt = ip6_packet(G2_IP6, G1_IP6, 17, udp6(G2_IP6, G1_IP6, 5, 6, b"abc"),
                         _some_exts(r, r.choice([1, 2, 3])))
        cut = r.randrange(0, len(pkt) - 40)
        pkt = pkt[:4] + struct.pack("!H", cut) + pkt[6:]
        if r.random() < 0.5:
            pkt = pkt[:40 + cut]
        f = eth6(pkt, src=G2_MAC, dst=G1_MAC)
    elif c == "five_ext":
        pkt = ip6_packet(G2_IP6, G1_IP6, 58, icmp6(G2_IP6, G1_IP6, 128, 0, b"\0\1\0\1"),
                         [ext_hdr(r, r.choice([0, 60])) for _ in range(r.choice([4, 5]))])
        f = eth6(pkt, src=G2_MAC, dst=G1_MAC)
    elif c == "ndp":
        f = inner6_frame(r, proto=58, icmp_type=r.choice([133, 134, 135, 136, 137]),
                         src=r.choice(["fe80::2", G2_IP6]), dst=r.choice(["ff02::1", G1_IP6]))
    elif c == "link":
        f = inner6_frame(r, src=r.choice(["fe80::2", G2_IP6]),
                         dst=r.choice(["ff02::1", G1_LL, "ff05::2", G1_IP6]))
    elif c == "big_ext":
        pkt = ip6_packet(G2_IP6, G1_IP6, 17, udp6(G2_IP6, G1_IP6, 7, 8, b"x"),
                         [ext_hdr(r, 60, words=r.choice([120, 125, 126, 127]))])
        f = eth6(pkt, src=G2_MAC, dst=G1_MAC)
    else:
        pkt = ip6_packet(G2_IP6, G1_IP6, 17, udp6(G2_IP6, G1_IP6, 7, 8, b"hello"))
        pkt = pkt[:4] + struct.pack("!H", r.randrange(0, 8)) + pkt[6:]
        f = eth6(pkt, src=G2_MAC, dst=G1_MAC)
    return bytes(f)


# --- IPv6 sequences -----------------------------------------------------------------------

def seq_reply_in6(r):
    proto = r.choice([58, 6, 17])
    remote = r.choice([G2_IP6, G2_IP6, "2001:4860::8888", "fd00:10::8000:0:0:5"])
    external = not remote.startswith("fd00:10::") or remote.startswith("fd00:10::8")
    sp, dp, ident = r.randrange(1, 65536), r.randrange(1, 65536), r.getrandbits(16)
    if proto == 58:
        o = icmp6(G1_IP6, remote, 128, 0, struct.pack("!HH", ident, 1) + b"ping")
        back = dict(icmp_type=129, ident=r.choice([ident, ident, ident ^ 1]))
    elif proto == 17:
        o = udp6(G1_IP6, remote, sp, dp, b"q")
        back = dict(sport=dp if r.random() < 0.8 else dp ^ 1, dport=sp)
    else:
        o = tcp6(r, G1_IP6, remote, sp, dp, "S", b"")
        back = dict(sport=dp if r.random() < 0.8 else dp ^ 1, dport=sp)
    steps = [("out", eth6(ip6_packet(G1_IP6, remote, proto, o)))] if r.random() < 0.9 else []
    inner = inner6_frame(r, src=remote, dst=G1_IP6, proto=proto, n=4, **back)
    opts = geneve_opt(OXIDE, 0x00) if external and r.random() < 0.8 else b""
    steps.append(("in", underlay(r, geneve(vni=10, opts=opts) + inner)))
    return steps


def seq_in_then_out6(r):
    proto = r.choice([58, 6, 17])
    remote = r.choice([G2_IP6, "2001:db8::1"])
    sp, dp = r.randrange(1, 65536), r.randrange(1, 65536)
    if proto == 58:
        i = inner6_frame(r, src=remote, dst=G1_IP6, proto=58, icmp_type=128, ident=sp, n=8)
        back = icmp6(G1_IP6, remote, 129, 0, struct.pack("!HH", sp, 1))
    elif proto == 17:
        i = inner6_frame(r, src=remote, dst=G1_IP6, proto=17, sport=sp, dport=dp, n=8)
        back = udp6(G1_IP6, remote, dp, sp, b"r")
    else:
        i = inner6_frame(r, src=remote, dst=G1_IP6, proto=6, sport=sp, dport=dp, n=0)
        back = tcp6(r, G1_IP6, remote, dp, sp, "A", b"")
    opts = geneve_opt(OXIDE, 0x00) if r.random() < 0.5 else b""
    return [("in", underlay(r, geneve(opts=opts) + i)),
            ("out", eth6(ip6_packet(G1_IP6, remote, proto, back)))]


def seq_mapped_alias(r):
    """An IPv4 flow, then IPv6 packets whose IPv4-mapped addresses spell
    that flow's reply: the tables key both families by 16 bytes, so such a
    packet must never reach them (malformed_ipv6)."""
    sp, dp = r.randrange(1, 65536), r.randrange(1, 65536)
    o = Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP, dst=G2_IP) / UDP(sport=sp, dport=dp)
    m1, m2 = "::ffff:" + G1_IP, "::ffff:" + G2_IP
    i = eth6(ip6_packet(m2, m1, 17, udp6(m2, m1, dp, sp, b"alias")), src=G2_MAC, dst=G1_MAC)
    steps = [("out", bytes(o)), ("in", underlay(r, geneve() + i))]
    if r.random() < 0.5:
        back = eth6(ip6_packet(m1, m2, 17, udp6(m1, m2, sp, dp, b"x")))
        steps.append(("out", back))
    return steps


# --- sequences that change the rules between frames ------------------------------------
#
# A ("fw", lines) step changes the port's rules between two frames: its
# rules as they were before the case plus these set-fw-rules lines (none:
# the same rules again, only the epoch moves). The harness makes the change
# through xdectl and puts the rules back after the case
# (tests/model/harness.py).

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}


def flow_frame(family, src, dst, proto, sp, dp, flags="S", reply=False, src_mac=G1_MAC,
               dst_mac=GW_MAC, payload=b"flow"):
    """One packet of a flow: UDP or TCP sp -> dp, or an ICMP(v6) echo
    request (reply: an echo reply) with identifier sp (an echo flow's
    identifier stands for both ports: dp is sp)."""
    if family == 4:
        if proto == 17:
            l4 = UDP(sport=sp, dport=dp) / Raw(payload)
        elif proto == 6:
            l4 = TCP(sport=sp, dport=dp, flags=flags, seq=1) / Raw(payload)
        else:
            l4 = ICMP(type=0 if reply else 8, id=sp, seq=1) / Raw(payload)
        return bytes(Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=dst) / l4)
    if proto == 17:
        l4 = udp6(src, dst, sp, dp, payload)
    elif proto == 6:
        l4 = _l4_csum6(src, dst, 6, struct.pack("!HHIIBBHHH", sp, dp, 1, 0, 5 << 4,
                                                TCP_FLAGS[flags], 65535, 0, 0) + payload, 16)
    else:
        l4 = icmp6(src, dst, 129 if reply else 128, 0, struct.pack("!HH", sp, 1) + payload)
    return eth6(ip6_packet(src, dst, proto, l4), src=src_mac, dst=dst_mac)


def from_overlay(r, inner, external=False, vni=10):
    return ("in", underlay(r, geneve(vni=vni, opts=geneve_opt(OXIDE, 0x00) if external else b"")
                           + inner))


def _rule_change(r, remote, proto, service, origin):
    """Lines for a rule change that may or may not touch a flow with this
    remote host, protocol and local service port (the destination port of
    the flow's first packet), first seen going `origin`."""
    pname = PROTO_NAMES[proto]
    other = "in" if origin == "out" else "out"
    ports = f" ports={service}" if proto in (6, 17) else ""
    choices = [
        [],                                                             # the epoch only
        ["dir=out action=deny priority=1 hosts=ip=198.51.100.99"],      # touches nothing here
        [f"dir={origin} action=deny priority=1 hosts=ip={remote}"],     # now denied where it began
        [f"dir={other} action=deny priority=1 hosts=ip={remote}"],      # denied the other way only
        [f"dir={origin} action=deny priority=1 protocol={pname}{ports}"],
        [f"dir={other} action=deny priority=1 protocol={pname}{ports}"],
        [f"dir={origin} action=allow priority=2 hosts=ip={remote}"],    # allowed by another rule
        [f"dir=in action=deny priority=1 hosts=ip={remote}",
         f"dir=out action=deny priority=1 hosts=ip={remote}"],          # denied both ways
        [f"dir={origin} action=deny priority=1 hosts=ip={remote}",
         f"dir={origin} action=allow priority=0 hosts=ip={remote} protocol={pname}"],
    ]
    return ("fw", tuple(r.choice(choices)))


def seq_reeval_in_then_out(r):
    """A flow a peer starts (from g2 in VNI 10, or from outside the VPC),
    g1's reply, a rule change, then g1's reply again (judged again by the
    inbound rules, where the flow began), and maybe more of it."""
    family = r.choice([4, 6])
    proto = r.choice([17, 17, 6, 1 if family == 4 else 58])
    local, remote = (G1_IP, r.choice([G2_IP, G2_IP, "192.0.2.1"])) if family == 4 else \
        (G1_IP6, r.choice([G2_IP6, G2_IP6, "2001:db8::1"]))
    external = not remote.startswith(("10.", "fd00:10:")) and r.random() < 0.9
    sp = r.randrange(1024, 65536)
    dp = sp if proto in (1, 58) else r.choice([80, 443, 53, r.randrange(1, 65536)])

    def peer(flags="S"):
        return from_overlay(r, flow_frame(family, remote, local, proto, sp, dp, flags,
                                          src_mac=G2_MAC, dst_mac=G1_MAC), external)

    def reply(flags="SA"):
        return ("out", flow_frame(family, local, remote, proto, dp, sp, flags, reply=True))
    steps = [peer()]
    if r.random() < 0.6:
        steps.append(reply())
    steps.append(_rule_change(r, remote, proto, dp, "in"))
    steps.append(reply(r.choice(["SA", "A", "PA"])))
    if r.random() < 0.6:
        steps.append(peer(r.choice(["A", "PA", "S"])))
    if r.random() < 0.3:
        steps += [_rule_change(r, remote, proto, dp, "in"), reply("A")]
    return steps


def seq_reeval_out_then_in(r):
    """A flow g1 starts (to g2, or out of the VPC), a rule change, the
    peer's reply (judged again by the outbound rules, in g1's VNI), and
    maybe more of it."""
    family = r.choice([4, 6])
    proto = r.choice([17, 17, 6, 1 if family == 4 else 58])
    local, remote = (G1_IP, r.choice([G2_IP, G2_IP, "8.8.8.8"])) if family == 4 else \
        (G1_IP6, r.choice([G2_IP6, G2_IP6, "2001:4860::8888"]))
    external = not remote.startswith(("10.", "fd00:10:")) and r.random() < 0.9
    sp = r.randrange(1024, 65536)
    dp = sp if proto in (1, 58) else r.choice([80, 443, 9, r.randrange(1, 65536)])

    def out(flags="S"):
        return ("out", flow_frame(family, local, remote, proto, sp, dp, flags))

    def peer(flags="SA"):
        return from_overlay(r, flow_frame(family, remote, local, proto, dp, sp, flags, reply=True,
                                          src_mac=G2_MAC, dst_mac=G1_MAC), external)
    steps = [out()]
    if r.random() < 0.5:
        steps.append(peer())
    steps.append(_rule_change(r, remote, proto, dp, "out"))
    steps.append(peer(r.choice(["SA", "A"])))
    if r.random() < 0.6:
        steps.append(out(r.choice(["A", "PA"])))
    return steps


def seq_reeval_same_host(r):
    """g1 to its own address: same-host delivery, judged by xde0's outbound
    rules and then its inbound ones; a rule change; more of the flow
    (either way), each entry judged again where its flow began."""
    family = r.choice([4, 6])
    proto = r.choice([17, 17, 6, 1 if family == 4 else 58])
    me = G1_IP if family == 4 else G1_IP6
    sp = r.randrange(1024, 65536)
    dp = sp if proto in (1, 58) else r.choice([sp, 80, r.randrange(1, 65536)])

    def pkt(back=False, flags="S"):
        a, b = (dp, sp) if back else (sp, dp)
        return ("out", flow_frame(family, me, me, proto, a, b, flags, reply=back))
    steps = [pkt()]
    if r.random() < 0.5:
        steps.append(pkt(True, "SA"))
    steps.append(_rule_change(r, me, proto, dp, r.choice(["out", "in"])))
    steps.append(pkt(r.random() < 0.5, r.choice(["A", "PA"])))
    if r.random() < 0.5:
        steps.append(pkt(r.random() < 0.5, "A"))
    return steps


SEQ6 = {
    "reply_in6": seq_reply_in6,
    "in_then_out6": seq_in_then_out6,
    "repeat_out6": lambda r: out_ipv6(r) * r.randrange(2, 4),
    "mapped_alias": seq_mapped_alias,
    "reeval_in_then_out": seq_reeval_in_then_out,
    "reeval_out_then_in": seq_reeval_out_then_in,
    "reeval_same_host": seq_reeval_same_host,
}


# --- NAT (bpf/nat.h): g1's SNAT IPs, g2's floating IPs ----------------------------------
#
# Guests' traffic to the internet (TCP, UDP, ICMP echo, other protocols,
# fragments, ICMP errors), what comes back from outside (Geneve with the
# External option, in the guest's VNI, to the external address and port),
# unsolicited and stale traffic for the external addresses, and changes of
# the addresses between two frames: ("ext", addresses) sets them through
# xdectl.nat, ("ext_raw", addresses) writes them alone (the datapath finds
# the translations they no longer have by their generation), ("expire",
# None | (protocol, the guest's port)) takes flows out of the flow table as
# if their time was up (tests/model/harness.py).
#
# A case starts with no translation and every SNAT pool's cursor at 0, so a
# pool's k-th SNAT flow of a case gets the range's start + k: the replies
# are made for those ports (and some for others).

G1_EXTERNAL = {"snat": ["198.51.100.10", "2001:db8:5::10"], "snat_start": 1024,
               "snat_end": 2047}      # g1 (sled1 xde0): the lab's SNAT IP, and an IPv6 one
G2_EXTERNAL = {"floating": ["198.51.100.20", "2001:db8:5::20"]}   # g2 (sled2 xde0)
NAT_G1 = {"mac": G1_MAC, "ip": G1_IP, "ip6": G1_IP6, "ext": G1_EXTERNAL, "underlay": U1,
          "internet": ["8.8.8.8", "192.0.2.1", "192.0.2.77", "10.0.0.200", "1.1.1.1"],
          "internet6": ["2001:4860::8888", "2001:db8::1", "2001:db8:dead:beef::1",
                        "fd00:10::8000:0:0:5"]}
NAT_G2 = {"mac": G2_MAC, "ip": G2_IP, "ip6": G2_IP6, "ext": G2_EXTERNAL, "underlay": U2,
          "internet": ["8.8.8.8", "192.0.2.1", "192.0.2.77", "1.1.1.1"],
          "internet6": ["2001:4860::8888", "2001:db8::1"]}
OTHER_EXTERNAL = ["198.51.100.11", "198.51.100.30", "2001:db8:5::11", "2001:db8:5::30"]
ROUTER4, ROUTER6 = "192.0.2.254", "2001:db8:ffff::1"      # where ICMP errors come from


def _fam(a):
    return ipaddress.ip_address(a).version


class NatFlow:
    """One flow of a guest's to the internet (or from it, inbound): its
    guest-side tuple and the external address and port it is expected to
    leave from."""

    def __init__(self, family, proto, gport, rport, remote, ext, ext_port):
        self.family, self.proto, self.gport, self.rport = family, proto, gport, rport
        self.remote, self.ext, self.ext_port = remote, ext, ext_port

    @property
    def echo(self):
        return self.proto in (1, 58)


class NatGen:
    """The steps of one NAT case for a guest (NAT_G1, NAT_G2): frames of
    its flows both ways, the external addresses it has meanwhile, the SNAT
    ports it expects them to get."""

    def __init__(self, r, guest):
        self.r, self.g = r, guest
        self.steps = []
        self.set_ext(guest["ext"], step=False)

    # --- the addresses ---------------------------------------------------------

    def set_ext(self, ext, step=True, raw=False):
        self.ext = ext
        self.next = collections.Counter()       # (family, pool) -> allocations so far
        if step:
            self.steps.append(("ext_raw" if raw else "ext", ext))

    def ext_of(self, family):
        """The external address the guest's flows of a family leave from:
        (kind, address) of the first by preference, or (None, None)."""
        e = self.ext
        fl = [a for a in e.get("floating", ()) if _fam(a) == family]
        if fl:
            return "floating", self.r.choice(fl)      # the flow's hash decides among several
        eph = [a for a in e.get("ephemeral", ()) if _fam(a) == family]
        if eph:
            return "ephemeral", eph[0]
        snat = [a for a in e.get("snat", ()) if _fam(a) == family]
        if snat:
            return "snat", snat[0]
        return None, None

    def external_addrs(self, family=None):
        e = self.ext
        return [a for k in ("snat", "ephemeral", "floating") for a in e.get(k, ())
                if family is None or _fam(a) == family]

    # --- flows ---------------------------------------------------------------------

    def flow(self, family=None, proto=None, remote=None, gport=None, rport=None):
        """A new flow of the guest's to the internet, its external port
        predicted."""
        r = self.r
        family = family or r.choice([4, 4, 6])
        proto = proto or r.choice([6, 17, 17, 1 if family == 4 else 58])
        remote = remote or r.choice(self.g["internet"] if family == 4 else self.g["internet6"])
        gport = gport or r.choice([r.randrange(1024, 65536), r.randrange(1, 65536), 1024, 33434])
        if proto in (1, 58):
            rport = gport
        else:
            rport = rport or r.choice([53, 80, 443, 123, r.randrange(1, 65536)])
        kind, ext = self.ext_of(family)
        if ext is None:           # none of the family: replies go to an address not ours
            ext = next(a for a in OTHER_EXTERNAL if _fam(a) == family)
        ext_port = gport
        if kind == "snat":
            pool = {6: 0, 17: 1}.get(proto, 2)
            n = self.ext["snat_end"] - self.ext["snat_start"] + 1
            ext_port = self.ext["snat_start"] + self.next[family, pool] % n
            self.next[family, pool] += 1
        return NatFlow(family, proto, gport, rport, remote, ext, ext_port)

    def inbound_flow(self, family=None, proto=None, ext=None):
        """A flow someone on the internet starts to one of the guest's
        external addresses (1:1: the port stays)."""
        r = self.r
        family = family or r.choice([4, 4, 6])
        proto = proto or r.choice([6, 17, 17, 1 if family == 4 else 58])
        ext = ext or r.choice(self.external_addrs(family) or
                              [a for a in OTHER_EXTERNAL if _fam(a) == family])
        remote = r.choice(self.g["internet"] if family == 4 else self.g["internet6"])
        gport = r.choice([22, 80, 443, 53, 7000, r.randrange(1, 65536)])
        rport = gport if proto in (1, 58) else r.randrange(1024, 65536)
        return NatFlow(family, proto, gport, rport, remote, ext, gport)

    # --- frames ----------------------------------------------------------------------

    def _l4(self, family, src, dst, proto, sp, dp, flags, icmp_type, payload, udp0):
        r = self.r
        if family == 4:
            if proto == 6:
                return TCP(sport=sp, dport=dp, flags=flags, seq=r.getrandbits(32)) / Raw(payload)
            if proto == 17:
                u = UDP(sport=sp, dport=dp)
                if udp0:
                    u.chksum = 0
                return u / Raw(payload)
            if proto == 1:
                return ICMP(type=icmp_type, id=sp, seq=r.getrandbits(16)) / Raw(payload)
            return Raw(payload)
        if proto == 6:
            return tcp6(r, src, dst, sp, dp, flags, payload)
        if proto == 17:
            u = udp6(src, dst, sp, dp, payload)
            return u[:6] + b"\0\0" + u[8:] if udp0 else u
        if proto == 58:
            return icmp6(src, dst, icmp_type, 0, struct.pack("!HH", sp, r.getrandbits(16)) +
                         payload)
        return payload

    def packet(self, family, src, dst, proto, sp, dp, flags="S", icmp_type=None, payload=None,
               src_mac=None, dst_mac=GW_MAC, frag=None, exts=(), udp0=False, raw_l4=None):
        """An Ethernet frame of one packet (checksums right; frag: (offset
        in 8-byte units, more fragments))."""
        r = self.r
        payload = payload if payload is not None else _payload(r, r.choice([0, 4, 32,
                                                                          r.randrange(0, 600)]))
        if icmp_type is None:
            icmp_type = 8 if family == 4 else 128
        src_mac = src_mac or self.g["mac"]
        if family == 4:
            l4 = raw_l4 if raw_l4 is not None else \
                self._l4(4, src, dst, proto, sp, dp, flags, icmp_type, payload, udp0)
            kw = {}
            if frag is not None:
                kw = dict(frag=frag[0], flags="MF" if frag[1] else 0)
            ip = IP(src=src, dst=dst, proto=proto, tos=r.choice([0, 0, r.getrandbits(8)]),
                    ttl=r.choice([64, 255]), id=r.getrandbits(16), **kw)
            return bytes(Ether(src=src_mac, dst=dst_mac) / ip / l4)
        l4 = raw_l4 if raw_l4 is not None else \
            self._l4(6, src, dst, proto, sp, dp, flags, icmp_type, payload, udp0)
        exts = list(exts)
        if frag is not None:
            exts.append(ext_hdr(r, 44, frag=frag))
        pkt = ip6_packet(src, dst, proto, l4, exts, hlim=r.choice([64, 255]),
                         tc=r.choice([0, r.getrandbits(8)]), fl=r.getrandbits(20))
        return eth6(pkt, src=src_mac, dst=dst_mac)

    def out(self, fl, flags="S", reply=False, **kw):
        """The guest's packet of flow fl (reply: an echo reply, for a flow
        begun inbound)."""
        g = self.g
        src = g["ip"] if fl.family == 4 else g["ip6"]
        t = (0 if fl.family == 4 else 129) if reply else None
        f = self.packet(fl.family, src, fl.remote, fl.proto, fl.gport, fl.rport, flags=flags,
                        icmp_type=t, **kw)
        self.steps.append(("out", f))
        return f

    def from_outside(self, inner, external=True, vni=10):
        """Geneve from boundary services to the guest's sled, with the
        External option."""
        opts = geneve_opt(OXIDE, 0x00) if external else b""
        step = ("in", underlay(self.r, geneve(vni=vni, opts=opts) + inner, dst=self.g["underlay"],
                               src=BSVC6))
        self.steps.append(step)
        return step

    def reply(self, fl, flags="SA", port=None, addr=None, icmp_type=None, external=True, **kw):
        """The remote's packet back to the flow's external address and port
        (port, addr: others)."""
        ext_port = fl.ext_port if port is None else port
        dst = addr or fl.ext
        sp = ext_port if fl.echo else fl.rport
        t = icmp_type if icmp_type is not None else (0 if fl.family == 4 else 129)
        inner = self.packet(fl.family, fl.remote, dst, fl.proto, sp, ext_port, flags=flags,
                            icmp_type=t, src_mac=BSVC_MAC_S, dst_mac=self.g["mac"], **kw)
        return self.from_outside(inner, external)

    def inbound(self, fl, flags="S", icmp_type=None, **kw):
        """The remote's packet starting (or continuing) a flow to the
        guest's external address."""
        t = icmp_type if icmp_type is not None else (8 if fl.family == 4 else 128)
        inner = self.packet(fl.family, fl.remote, fl.ext, fl.proto, fl.rport, fl.gport,
                            flags=flags, icmp_type=t, src_mac=BSVC_MAC_S, dst_mac=self.g["mac"],
                            **kw)
        return self.from_outside(inner)

    def icmp_error(self, fl, port=None, quote_len=None, what=None):
        """An ICMP error from a router on the way, about the flow's packet as
        it left (from the external address and port); what: (type, code,
        the word after the checksum)."""
        r = self.r
        ext_port = fl.ext_port if port is None else port
        sp, dp = (ext_port, ext_port) if fl.echo else (ext_port, fl.rport)
        if fl.family == 4:
            q = self.packet(4, fl.ext, fl.remote, fl.proto, sp, dp, payload=_payload(r, 16))[14:]
            q = q[:quote_len or r.choice([28, 28, 48, len(q)])]
            t, code, rest = what or r.choice([(3, 3, 0), (3, 4, 1400), (11, 0, 0), (12, 0, 0),
                                              (3, 1, 0)])
            body = bytearray(struct.pack("!BBHI", t, code, 0, rest) + q)
            body[2:4] = struct.pack("!H", csum(bytes(body)))
            body = Raw(bytes(body))
            src = ROUTER4 if what else r.choice([ROUTER4, fl.remote])
            inner = bytes(Ether(src=BSVC_MAC_S, dst=self.g["mac"]) /
                          IP(src=src, dst=fl.ext, ttl=64, proto=1) / body)
        else:
            q = self.packet(6, fl.ext, fl.remote, fl.proto, sp, dp, payload=_payload(r, 16))[14:]
            q = q[:quote_len or r.choice([48, 48, 64, len(q)])]
            t, code, rest = what or r.choice([(1, 4, 0), (2, 0, 1280), (3, 0, 0), (4, 0, 6),
                                              (1, 0, 0)])
            src = ROUTER6 if what else r.choice([ROUTER6, fl.remote])
            inner = eth6(ip6_packet(src, fl.ext, 58,
                                    icmp6(src, fl.ext, t, code, struct.pack("!I", rest) + q)),
                         src=BSVC_MAC_S, dst=self.g["mac"])
        return self.from_outside(inner)


def _guest_error(n, fl, what=None):
    """The guest's ICMP error about the flow's packet as it reached it (from
    the remote end to the guest's own address and port)."""
    r = n.r
    g = n.g
    me = g["ip"] if fl.family == 4 else g["ip6"]
    sp, dp = (fl.gport, fl.gport) if fl.echo else (fl.rport, fl.gport)
    q = n.packet(fl.family, fl.remote, me, fl.proto, sp, dp, payload=_payload(r, 8))[14:]
    q = q[:r.choice([28, 48, 64, len(q)]) if fl.family == 4 else r.choice([48, 64, len(q)])]
    if fl.family == 4:
        t, code = what or r.choice([(3, 3), (3, 1), (11, 0), (12, 0)])
        body = bytearray(struct.pack("!BBHI", t, code, 0, 0) + q)
        body[2:4] = struct.pack("!H", csum(bytes(body)))
        f = bytes(Ether(src=g["mac"], dst=GW_MAC) / IP(src=me, dst=fl.remote, proto=1) /
                  Raw(bytes(body)))
    else:
        t, code = what or r.choice([(1, 4), (1, 1), (2, 0), (3, 0), (4, 1)])
        f = eth6(ip6_packet(me, fl.remote, 58, icmp6(me, fl.remote, t, code, bytes(4) + q)),
                 src=g["mac"])
    n.steps.append(("out", f))
    return f


def _nat_out_extras(n, fl):
    """Odd packets of a flow: a fragment, an IPv6 fragment header, extension headers."""
    r = n.r
    c = r.random()
    if c < 0.3:
        n.out(fl, frag=r.choice([(0, 1), (0, 1), (3, 0), (185, 1)]))
    elif c < 0.45 and fl.family == 6:
        n.out(fl, frag=(0, 0))                       # an atomic fragment: a whole packet
    elif c < 0.6 and fl.family == 6:
        n.out(fl, exts=[ext_hdr(r, r.choice([0, 60, 43]))])
    elif c < 0.75 and fl.proto == 17:
        n.out(fl, udp0=True)                         # no UDP checksum
    else:
        n.out(fl, flags=r.choice(["A", "PA", "F", "R"]))


def _nat_odd_out(n):
    """A packet SNAT has no port for: another protocol, an ICMP error or
    other non-echo ICMP, a message whose L4 header is cut short."""
    r = n.r
    family = r.choice([4, 6])
    g = n.g
    src = g["ip"] if family == 4 else g["ip6"]
    dst = r.choice(g["internet"] if family == 4 else g["internet6"])
    c = r.random()
    if c < 0.4:
        f = n.packet(family, src, dst, r.choice([47, 50, 132, 0 if family == 4 else 59]), 0, 0)
    elif c < 0.7:
        t = r.choice([3, 11, 13, 17]) if family == 4 else r.choice([1, 2, 3, 4, 130])
        f = n.packet(family, src, dst, 1 if family == 4 else 58, r.getrandbits(16), 0,
                     icmp_type=t)
    else:
        # the IP length ends inside the L4 header (the frame padded on)
        proto = r.choice([6, 17, 1 if family == 4 else 58])
        f = bytearray(n.packet(family, src, dst, proto, r.randrange(1, 65536), 80, payload=b""))
        keep = r.randrange(0, {6: 20, 17: 8, 1: 8, 58: 8}[proto])
        if family == 4:
            ihl = (f[14] & 0xF) * 4
            struct.pack_into("!H", f, 16, ihl + keep)
            f[24:26] = b"\0\0"
            f[24:26] = struct.pack("!H", csum(bytes(f[14:14 + ihl])))
        else:
            struct.pack_into("!H", f, 18, keep)
        f = bytes(f) + bytes(r.choice([0, 2, 8, 30]))
    n.steps.append(("out", f))


def nat_case(r, kind, guest=None):
    g = guest or NAT_G1
    n = NatGen(r, g)
    if kind == "nat_out":
        flows = [n.flow() for _ in range(r.choice([1, 1, 2, 3, 4]))]
        for fl in flows:
            n.out(fl)
        for _ in range(r.choice([0, 1, 2])):
            fl = r.choice(flows)
            if r.random() < 0.5:
                _nat_out_extras(n, fl)
            else:
                n.out(fl, flags=r.choice(["A", "PA", "S"]))
        if r.random() < 0.5:
            _nat_odd_out(n)
        if r.random() < 0.2:
            r.shuffle(n.steps)
        return n.steps
    if kind == "nat_reply":
        flows = [n.flow() for _ in range(r.choice([1, 1, 2, 3]))]
        for fl in flows:
            n.out(fl)
        for fl in flows:
            c = r.random()
            if c < 0.6:
                n.reply(fl)
            elif c < 0.7:
                n.reply(fl, port=r.choice([fl.ext_port + 1, fl.ext_port - 1, fl.gport,
                                           r.randrange(1, 65536)]))
            elif c < 0.75:
                n.reply(fl, addr=r.choice(n.external_addrs(fl.family) +
                                          [a for a in OTHER_EXTERNAL if _fam(a) == fl.family]))
            elif c < 0.8:
                n.reply(fl, external=False)          # no External option: not NAT's
            elif c < 0.9:
                n.reply(fl, frag=r.choice([(0, 1), (2, 0)]))
            else:
                n.reply(fl, flags=r.choice(["A", "R", "FA"]),
                        icmp_type=r.choice([0, 8, 3]) if fl.family == 4 else
                        r.choice([129, 128, 1]))
            if r.random() < 0.4:
                n.out(fl, flags=r.choice(["A", "PA", "FA"]))
            if r.random() < 0.3:
                n.reply(fl, flags="A")
            if r.random() < 0.1:
                _guest_error(n, fl)
        return n.steps
    if kind == "nat_icmp_error":
        flows = [n.flow(proto=r.choice([6, 17, 17, None])) for _ in range(r.choice([1, 2]))]
        for fl in flows:
            n.out(fl)
        for fl in flows:
            n.icmp_error(fl, port=None if r.random() < 0.8 else fl.ext_port + 1)
            if r.random() < 0.3:
                n.reply(fl)
        return n.steps
    if kind == "nat_unsolicited":
        for _ in range(r.choice([1, 2, 3])):
            family = r.choice([4, 4, 6])
            addrs = n.external_addrs(family) + [a for a in OTHER_EXTERNAL if _fam(a) == family]
            fl = n.inbound_flow(family, ext=r.choice(addrs))
            c = r.random()
            if c < 0.6:
                n.inbound(fl, icmp_type=r.choice([8, 0, 3, 13]) if family == 4 else
                          r.choice([128, 129, 1]))
            elif c < 0.8:
                n.inbound(fl, frag=r.choice([(0, 1), (7, 0)]))
            else:
                n.icmp_error(n.flow(family))
        return n.steps
    if kind == "nat_stale":
        flows = [n.flow() for _ in range(r.choice([1, 2, 3]))]
        for fl in flows:
            n.out(fl)
            if r.random() < 0.5:
                n.reply(fl)
        fl = r.choice(flows)
        n.steps.append(("expire", None if r.random() < 0.5 else (fl.proto, fl.gport)))
        for fl in flows:
            if r.random() < 0.7:
                n.reply(fl, flags=r.choice(["A", "SA", "PA"]))
            if r.random() < 0.4:
                n.out(fl, flags=r.choice(["S", "A"]))
                if r.random() < 0.5:
                    n.reply(fl)
        for _ in range(r.choice([0, 1, 2])):
            fl = n.flow()
            n.out(fl)
            n.reply(fl)
        return n.steps
    if kind == "nat_exhaust":
        start = r.choice([1024, 1, 40000, 65530])
        size = r.choice([1, 2, 3, 4, 4, 5, 6])
        ext = {"snat": list(g["ext"].get("snat", ())) or ["198.51.100.10"],
               "snat_start": start, "snat_end": min(start + size - 1, 65535)}
        if r.random() < 0.3:
            ext["snat"] = [a for a in ext["snat"] if _fam(a) == 4]
        n.set_ext(ext)
        proto = r.choice([6, 17, 1])
        flows = []
        for i in range(size + r.choice([1, 1, 2, 3])):
            fam = 4 if r.random() < 0.8 else 6
            p = proto if r.random() < 0.8 else None
            if p == 1 and fam == 6:
                p = 58
            fl = n.flow(fam, p)
            flows.append(fl)
            n.out(fl)
            if r.random() < 0.3:
                n.reply(fl)
            if r.random() < 0.25:
                gone = r.choice(flows)
                n.steps.append(("expire", (gone.proto, gone.gport)))
        if r.random() < 0.6:
            n.steps.append(("expire", None if r.random() < 0.5 else
                            (flows[0].proto, flows[0].gport)))
        for _ in range(r.choice([1, 2, 3])):
            fl = n.flow(4, proto)
            n.out(fl)
            if r.random() < 0.6:
                n.reply(fl)
        for fl in r.sample(flows, min(len(flows), 2)):
            n.reply(fl)
        return n.steps
    if kind == "nat_change":
        flows = [n.flow() for _ in range(r.choice([1, 2, 3]))]
        for fl in flows:
            n.out(fl)
            if r.random() < 0.5:
                n.reply(fl)
        old = n.ext
        snat = list(old.get("snat", ())) or ["198.51.100.10", "2001:db8:5::10"]
        choices = [
            dict(old),                                                     # the same again
            {**old, "snat": ["198.51.100.11", "2001:db8:5::11"]} if old.get("snat") else
            {"snat": ["198.51.100.11"], "snat_start": 1024, "snat_end": 2047},
            {"snat": snat, "snat_start": 1025, "snat_end": 3000},       # the range moves
            {"snat": snat, "snat_start": 1024, "snat_end": 1024},
            {"ephemeral": ["198.51.100.12", "2001:db8:5::12"]},
            {"snat": snat[:1], "snat_start": 1024, "snat_end": 2047,
             "ephemeral": ["2001:db8:5::12"]},
            {"floating": ["198.51.100.20", "198.51.100.21"]},
            {"floating": list(old.get("floating", ())) + ["198.51.100.31"]},
            {},                                                             # none
        ]
        n.set_ext(r.choice(choices), raw=r.random() < 0.4)
        for fl in flows:
            if r.random() < 0.6:
                n.out(fl, flags=r.choice(["A", "PA"]))
            if r.random() < 0.6:
                n.reply(fl, flags="A")
        for _ in range(r.choice([0, 1, 2])):
            fl = n.flow()
            n.out(fl)
            if r.random() < 0.6:
                n.reply(fl)
        if r.random() < 0.3:
            n.set_ext(old, raw=r.random() < 0.5)
            fl = r.choice(flows)
            n.out(fl, flags="A")
            n.reply(fl, flags="A")
        return n.steps
    if kind in ("nat_floating", "nat_inbound"):
        if kind == "nat_floating":
            ext = r.choice([
                {"floating": ["198.51.100.20"]},
                {"floating": ["198.51.100.20", "198.51.100.21", "198.51.100.22",
                              "2001:db8:5::20", "2001:db8:5::21"]},
                {"ephemeral": ["198.51.100.12", "2001:db8:5::12"]},
                {"floating": ["198.51.100.20", "2001:db8:5::20"],
                 "ephemeral": ["198.51.100.12"], "snat": ["198.51.100.10"],
                 "snat_start": 1024, "snat_end": 2047},
                {"ephemeral": ["198.51.100.12"], "snat": ["198.51.100.10", "2001:db8:5::10"],
                 "snat_start": 5000, "snat_end": 5003},
            ])
            n.set_ext(ext, raw=r.random() < 0.2)
        for _ in range(r.choice([1, 2, 3])):
            if r.random() < 0.6:
                fl = n.inbound_flow()
                n.inbound(fl)
                if r.random() < 0.2:
                    _guest_error(n, fl)
                if r.random() < 0.7:
                    n.out(fl, flags="SA", reply=True)
                if r.random() < 0.5:
                    n.inbound(fl, flags="A")
            else:
                fl = n.flow()
                n.out(fl)
                if r.random() < 0.7:
                    n.reply(fl, addr=fl.ext if r.random() < 0.8 else None)
        if r.random() < 0.3:
            n.steps.append(("expire", None))
            fl = n.inbound_flow()
            n.inbound(fl)
        return n.steps
    raise ValueError(kind)


# --- known datapath bugs ---------------------------------------------------------------

def known_bug(direction, frame):
    """The id of a known datapath bug this input exercises, or None. B1-B17,
    found by these tests, are fixed; keep this hook for the next one."""
    return None


# --- the same frames from another port -----------------------------------------------

def as_port(steps, mac_s=G3["mac"], ip6=G3["ip6"], ip4=None):
    """A case's outbound frames as another guest would send them: g1's MAC,
    IPv6 address and link-local address (and IPv4 address, given ip4)
    replaced by that guest's wherever they occur (checksums are not fixed:
    neither the datapath nor the model checks them). Inbound steps and rule
    changes are left out."""
    subs = [(_mac(G1_MAC), _mac(mac_s)), (a6(G1_IP6), a6(ip6)), (a6(G1_LL), a6(link_local(mac_s)))]
    if ip4:
        subs.append((ipaddress.IPv4Address(G1_IP).packed, ipaddress.IPv4Address(ip4).packed))
    out = []
    for d, f in steps:
        if d != "out":
            continue
        for a, b in subs:
            f = f.replace(a, b)
        out.append((d, f))
    return out
