"""Frame generators for the differential tests: one case is a short list of
(direction, frame) steps run in order on an empty flow table, drawn from a
seeded random.Random, so that a case is reproducible from (kind, seed).

Also `known_bug()`: the datapath bugs the differential tests found (see
tests/test_differential.py), so the generative test can leave those inputs
to their own strict-xfail tests and bench/fuzz.py can count them apart.
"""
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
from frames import G1_IP, G1_MAC, G2_IP, G2_MAC, GW_IP, GW_MAC, OXIDE
from frames import U1_ADDR as U1
from frames import U2_ADDR as U2
from frames import geneve, geneve_opt

# sled1 of the lab (xdelab/lab.py) plus tests/model/setup.py's extra state
MTU = 1500
DESTS = ["10.0.0.2", "10.0.0.4", "10.0.0.3", "10.0.0.77", "10.0.0.200", "10.0.0.255",
         "192.0.2.1", "192.0.2.200", "198.51.100.7", "203.0.113.5", "203.0.114.5",
         "10.1.2.3", "10.0.0.9", "8.8.8.8", "224.0.0.1", "255.255.255.255", GW_IP]
OTHER_MACS = ["a8:40:25:ff:00:66", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01",
              "a8:40:25:ff:00:02", "00:00:00:00:00:00"]

OUT_KINDS = ["arp", "gw_echo", "ipv4", "ipv4", "ipv4", "ipv4_big", "ipv4_frag", "spoof",
             "ipv6", "vlan", "ethertype", "random_after_eth", "malformed_ipv4"]
IN_KINDS = ["geneve", "geneve", "geneve", "geneve_options", "geneve_options", "truncated",
            "bad_lengths", "bad_header", "inner_odd", "not_geneve", "random", "random_udp",
            "trailing"]
SEQ_KINDS = ["reply_in", "reply_external", "repeat_out", "in_then_out"]
KINDS = [("out", k) for k in OUT_KINDS] + [("in", k) for k in IN_KINDS] + \
    [("seq", k) for k in SEQ_KINDS]


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


def _l4(r, proto, n):
    if proto == 17:
        return UDP(sport=r.randrange(1, 65536), dport=r.randrange(1, 65536)) / Raw(_payload(r, n))
    if proto == 6:
        return TCP(sport=r.randrange(1, 65536), dport=r.randrange(1, 65536),
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
    if kind == "ipv6":
        f = Ether(src=r.choice([G1_MAC, G1_MAC, OTHER_MACS[0]]), dst=GW_MAC) / \
            IPv6(src="fe80::1", dst=r.choice(["ff02::2", "fd00::1"])) / ICMPv6EchoRequest(
                data=_payload(r, r.randrange(0, 64)))
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
        et = r.choice([0x0800, 0x0806])
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
    raise ValueError(kind)


def case(kind_dir, kind, seed):
    r = random.Random(f"{kind_dir}/{kind}/{seed}")
    if kind_dir == "out":
        return outbound(r, kind)
    if kind_dir == "in":
        return inbound(r, kind)
    return sequence(r, kind)


# --- known datapath bugs ---------------------------------------------------------------

def _ip4_hdr_bad(b):
    if len(b) < 20:
        return False
    ihl = (b[0] & 0xF) * 4
    total = struct.unpack_from("!H", b, 2)[0]
    return b[0] >> 4 != 4 or ihl < 20 or len(b) < ihl or total < ihl or total > len(b)


def known_bug(direction, frame):
    """The id of a known datapath bug this input exercises, or None. B1-B6,
    found by these tests, are fixed; keep this hook for the next one."""
    return None

