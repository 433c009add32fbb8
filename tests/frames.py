"""The frames the tests and benches build, in one place: guest frames as g1
sends them, Geneve (header, options) as a peer sled sends it, and the
encapsulation docs/design.md ("Wire format") prescribes. Addresses are the
lab's (xdelab.lab)."""
import ipaddress
import struct

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from xdelab import lab

BSVC_ADDR, GW_IP, GW_MAC, OUTSIDE, SUBNET, VNI = (lab.BSVC_ADDR, lab.GW_IP, lab.GW_MAC, lab.OUTSIDE,
                                                  lab.SUBNET, lab.VNI)
SUBNET6, GW_LL = lab.SUBNET6, lab.GW_LL         # the gateway's IPv6: its EUI-64 link-local
S1, S2 = lab.SLEDS["sled1"], lab.SLEDS["sled2"]
G1_IP, G2_IP = S1["guest_ip"], S2["guest_ip"]
G1_IP6, G2_IP6 = S1["guest_ip6"], S2["guest_ip6"]
G3 = lab.GUESTS["g3"]                           # IPv6 only, VNI 11, on sled2
G1_MAC, G2_MAC = S1["mac"], S2["mac"]
U1_ADDR, U2_ADDR = S1["addr"], S2["addr"]       # sled underlay addresses
BSVC_VNI = 99
BSVC_MAC = "a8:40:25:77:77:77"
GENEVE_PORT = 6081
OXIDE = 0x0129                                  # Oxide's Geneve option class


def mac(s):
    return bytes.fromhex(s.replace(":", ""))


def ip6(a):
    return ipaddress.IPv6Address(a).packed


def link_local(mac_s):
    """The EUI-64 link-local address of a MAC (RFC 4291 2.5.1 and appendix
    A: the U/L bit flipped, ff:fe in the middle), as a guest's kernel makes
    its own. Written here, not taken from xdectl, so that the model's
    generators (tests/model/gen.py) stay free of product code."""
    m = mac(mac_s)
    iid = bytes((m[0] ^ 0x02,)) + m[1:3] + b"\xff\xfe" + m[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))


G1_LL = link_local(G1_MAC)                      # g1's own link-local address


# --- from the guest ------------------------------------------------------------

def g1_frame(l4, dst=G2_IP, tos=0, src_mac=G1_MAC, src=G1_IP, **ip):
    """An IPv4 frame g1 sends through its gateway."""
    return bytes(Ether(src=src_mac, dst=GW_MAC) / IP(src=src, dst=dst, tos=tos, id=0x1234, **ip) / l4)


def arp_request(tpa, spa=G1_IP, sha=G1_MAC):
    """g1 asking who has tpa."""
    return bytes(Ether(src=sha, dst="ff:ff:ff:ff:ff:ff") /
                 ARP(op=1, hwsrc=sha, psrc=spa, hwdst="00:00:00:00:00:00", pdst=tpa))


# --- Geneve from a peer --------------------------------------------------------

def geneve_opt(cls, typ, body=b""):
    """One Geneve option: class, type (high bit: critical), body (whole words)."""
    assert len(body) % 4 == 0
    return struct.pack("!HBB", cls, typ, len(body) // 4) + body


def geneve(vni=VNI, proto=0x6558, ver=0, opts=b"", optlen=None, flags=0, rsvd=0):
    """A Geneve header; optlen (in 4-byte words) defaults to the options given."""
    ol = len(opts) // 4 if optlen is None else optlen
    return (bytes([(ver << 6) | ol, flags]) + proto.to_bytes(2, "big") +
            vni.to_bytes(3, "big") + bytes([rsvd]) + opts)


def inner_udp(payload, dst_mac=G1_MAC, src_mac=G2_MAC, src=G2_IP, dst=G1_IP,
              sport=40000, dport=40001):
    """An inner frame as sled2 would carry it to g1 (VNI 10)."""
    return bytes(Ether(dst=dst_mac, src=src_mac) / IP(src=src, dst=dst) /
                 UDP(sport=sport, dport=dport) / Raw(payload))


def inner_icmp(payload, dst_mac=G1_MAC, src_mac=G2_MAC, src=G2_IP, dst=G1_IP, ident=0x5844):
    """An inner echo request as sled2 would carry it to g1 (VNI 10). ICMP:
    the default inbound firewall rules let it in whatever its options say."""
    return bytes(Ether(dst=dst_mac, src=src_mac) / IP(src=src, dst=dst) /
                 ICMP(type=8, id=ident, seq=1) / Raw(payload))


def inner_arp(dst_mac=G1_MAC, src_mac=G2_MAC):
    return bytes(Ether(dst=dst_mac, src=src_mac) /
                 ARP(op=1, hwsrc=src_mac, psrc=G2_IP, pdst=G1_IP))


def underlay_frame(payload, dst_mac="02:00:00:00:01:01", src_mac="02:00:00:00:01:02",
                   src=U2_ADDR, dst=U1_ADDR, sport=50000, dport=GENEVE_PORT, tc=0, fl=0,
                   hlim=128, chksum=None):
    """Outer Ethernet/IPv6/UDP around a (Geneve) payload, sled2 to sled1."""
    udp = UDP(sport=sport, dport=dport) if chksum is None else \
        UDP(sport=sport, dport=dport, chksum=chksum)
    return bytes(Ether(dst=dst_mac, src=src_mac) /
                 IPv6(src=src, dst=dst, hlim=hlim, tc=tc, fl=fl) / udp / Raw(payload))


# --- what the datapath makes ---------------------------------------------------

def encapsulated(frame, outer_macs, label, sport, dst6, vni, inner_dmac, tos):
    """The bytes the wire format prescribes around `frame` sent from sled1:
    outer Ethernet (outer_macs: destination then source), IPv6 (traffic
    class = inner TOS, flow label, hop limit 128), UDP to 6081 with checksum
    0, Geneve (no options), and the frame with its destination MAC
    replaced."""
    n = len(frame)
    ip6hdr = struct.pack("!IHBB", (6 << 28) | (tos << 20) | label, n + 16, 17, 128) + \
        ip6(U1_ADDR) + ip6(dst6)
    udp = struct.pack("!HHHH", sport, GENEVE_PORT, n + 16, 0)
    return outer_macs + b"\x86\xdd" + ip6hdr + udp + geneve(vni) + mac(inner_dmac) + frame[6:]


def split_encap(out):
    """(flow label, UDP source port) of an encapsulated frame."""
    return struct.unpack("!I", out[14:18])[0] & 0xFFFFF, struct.unpack("!H", out[54:56])[0]
