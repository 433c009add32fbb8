"""The datapath's fixture table, after Katran's test fixtures: frames
entering one program of the lab's sled1, each with the verdict, the exact
output frame and the counter deltas it must give. tests/test_prog_run.py
runs every case with BPF_PROG_TEST_RUN; bench/prog.py times the same
frames; tests/test_overlay.py sends the Geneve ones over the real wire.

A case's counters are flat `xdectl stats` names: `port` for sled1's xde0,
`root` for the instance's (`stats --global`). A listed counter must move by
exactly that much (0: must not move)."""
import struct
from dataclasses import dataclass, field
from typing import Optional

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from frames import (G1_IP, G1_MAC, G2_IP, G2_IP6, G2_MAC, GENEVE_PORT, GW_IP, GW_MAC, OUTSIDE, OXIDE,
                    U1_ADDR, U2_ADDR, arp_request, g1_frame, geneve, geneve_opt, inner_arp,
                    inner_icmp, inner_udp, mac, underlay_frame)

# return codes (UAPI linux/bpf.h and linux/pkt_cls.h)
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
MARK = b"XDE-CASE-"


@dataclass(frozen=True)
class Case:
    name: str
    prog: str                  # tc_port_out: g1 sent it; xdp_underlay: sled1's u1 received it
    frame: bytes
    verdict: int
    output: Optional[bytes]    # the exact output frame (None: not checked by the table)
    port: dict = field(default_factory=dict)
    root: dict = field(default_factory=dict)


def malformed_cases(marker):
    """(id, Geneve UDP payload, root counter that must count it). Every
    payload that has an inner frame carries `marker` + id in it, so a capture
    in the guest shows whether it got through."""
    def inner(tag):
        return inner_icmp(marker + tag.encode())
    return [
        # UDP payload shorter than the 8-byte Geneve header
        ("truncated", geneve()[:4], "drop_in_malformed_truncated"),
        ("version", geneve(ver=1) + inner("version"), "drop_in_malformed_version"),
        # the header claims 63 words of options; the packet ends after one
        ("options_past_packet", geneve(optlen=63, opts=geneve_opt(OXIDE, 0x00)),
         "drop_in_malformed_options"),
        # an option whose body runs past the options area the header declares
        ("option_body_past_optlen",
         geneve(optlen=1, opts=geneve_opt(0x0102, 0x01, b"\0" * 8)) + inner("option_body_past_optlen"),
         "drop_in_malformed_options"),
        ("unknown_critical_option",
         geneve(opts=geneve_opt(0xFFFF, 0x80)) + inner("unknown_critical_option"),
         "drop_in_malformed_critical_option"),
        ("unknown_oxide_critical_option",
         geneve(opts=geneve_opt(OXIDE, 0x83)) + inner("unknown_oxide_critical_option"),
         "drop_in_malformed_critical_option"),
        ("protocol_ipv4", geneve(proto=0x0800) + inner("protocol_ipv4"), "drop_in_malformed_protocol"),
        ("no_inner_frame", geneve(), "drop_in_malformed_inner"),
        ("arp_inside", geneve() + inner_arp() + marker + b"arp_inside", "drop_in_arp_in_geneve"),
        ("unknown_vni", geneve(vni=11) + inner("unknown_vni"), "drop_in_no_port"),
        ("unknown_mac",
         geneve() + inner_icmp(marker + b"unknown_mac", dst_mac="a8:40:25:ff:00:99"),
         "drop_in_no_port"),
    ]


def valid_cases(marker):
    """(id, Geneve UDP payload) that must be delivered to g1; the inner frame
    is inner_icmp(marker + id)."""
    def inner(tag):
        return inner_icmp(marker + tag.encode())
    return [
        ("plain", geneve() + inner("plain")),
        ("oxide_external", geneve(opts=geneve_opt(OXIDE, 0x00)) + inner("oxide_external")),
        ("oxide_multicast", geneve(opts=geneve_opt(OXIDE, 0x01, b"\0\0\0\0")) + inner("oxide_multicast")),
        ("oxide_mss", geneve(opts=geneve_opt(OXIDE, 0x02, struct.pack("!I", 1400))) + inner("oxide_mss")),
        ("unknown_noncritical_option",
         geneve(opts=geneve_opt(0xFFFF, 0x01, b"\1\2\3\4")) + inner("unknown_noncritical_option")),
        ("external_and_mss",
         geneve(opts=geneve_opt(OXIDE, 0x00) + geneve_opt(OXIDE, 0x02, struct.pack("!I", 1400)))
         + inner("external_and_mss")),
    ]


def delivered(inner):
    """What g1 gets of an inner frame: its source MAC is the gateway's."""
    return inner[:6] + mac(GW_MAC) + inner[12:]


def _arp_reply(tpa):
    return (mac(G1_MAC) + mac(GW_MAC) + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) +
            mac(GW_MAC) + bytes(map(int, tpa.split("."))) +
            mac(G1_MAC) + bytes(map(int, G1_IP.split("."))))


ECHO = g1_frame(ICMP(type=8, id=0x4242, seq=7) / Raw(b"are you there"), dst=GW_IP)
ECHO_REPLY = bytes(Ether(dst=G1_MAC, src=GW_MAC) /
                   IP(src=GW_IP, dst=G1_IP, id=0x1234, ttl=Ether(ECHO)[IP].ttl) /
                   ICMP(type=0, id=0x4242, seq=7) / Raw(b"are you there"))
DECAP_INNER = bytes(Ether(dst=G1_MAC, src=G2_MAC) / IP(src=G2_IP, dst=G1_IP) /
                    ICMP(type=0, id=9) / Raw(b"decap me"))


def _tc_cases():
    out = []
    for name, tpa in (("gw_arp_gateway", GW_IP), ("gw_arp_proxy_g2", G2_IP),
                      ("gw_arp_proxy_subnet", "10.0.0.200")):
        # the gateway's MAC for the gateway, and (proxy ARP) the VPC subnet
        out.append(Case(name, "tc_port_out", arp_request(tpa), TC_ACT_REDIRECT, _arp_reply(tpa),
                        port={"arp_replies": 1}))
    for name, tpa in (("gw_arp_own_address", G1_IP), ("gw_arp_outside", OUTSIDE)):
        out.append(Case(name, "tc_port_out", arp_request(tpa), TC_ACT_SHOT, None,
                        port={"drop_out_arp": 1, "arp_replies": 0}))
    # echo to the gateway: the reply in place, checksums valid, back to g1
    out.append(Case("gw_echo", "tc_port_out", ECHO, TC_ACT_REDIRECT, ECHO_REPLY,
                    port={"icmp_replies": 1}))
    for name, frame, counter in (
            ("spoofed_mac", g1_frame(ICMP(), src_mac="a8:40:25:ff:00:66"), "drop_out_spoof"),
            ("spoofed_ip", g1_frame(ICMP(), src="10.0.0.66"), "drop_out_spoof"),
            ("no_v2p", g1_frame(ICMP(), dst="10.0.0.77"), "drop_out_no_v2p"),
            ("spoofed_ip6", bytes(Ether(src=G1_MAC, dst=GW_MAC) /
                                  IPv6(src="fd00:10::66", dst=G2_IP6) / ICMPv6EchoRequest()),
             "drop_out_spoof"),
            # link-scoped IPv6 that is not for the gateway never leaves the link
            ("ipv6_link_local", bytes(Ether(src=G1_MAC, dst=GW_MAC) /
                                      IPv6(src="fe80::1", dst="ff02::2") / ICMPv6EchoRequest()),
             "drop_out_link_local"),
            ("vlan", bytes(Ether(src=G1_MAC, dst=GW_MAC) / Dot1Q(vlan=5) / IP(src=G1_IP, dst=G2_IP) /
                           ICMP()), "drop_out_unsupported")):
        out.append(Case(name, "tc_port_out", frame, TC_ACT_SHOT, None,
                        port={counter: 1, "encap": 0}))
    return out


def _xdp_cases():
    out = [Case("decap", "xdp_underlay",
                underlay_frame(geneve() + DECAP_INNER, tc=0xB8, fl=0x12345), XDP_REDIRECT,
                delivered(DECAP_INNER), port={"decap": 1, "rx_packets": 1})]
    for name, payload in valid_cases(MARK):
        # options (Oxide External/Multicast/MSS, unknown non-critical) are skipped
        out.append(Case(f"decap_{name}", "xdp_underlay", underlay_frame(payload), XDP_REDIRECT,
                        delivered(inner_icmp(MARK + name.encode())),
                        port={"decap": 1, "rx_packets": 1}))
    for name, payload, counter in malformed_cases(MARK):
        out.append(Case(f"malformed_{name}", "xdp_underlay", underlay_frame(payload), XDP_DROP,
                        None, port={"rx_packets": 0}, root={counter: 1}))
    # not Geneve for us: to the host, unchanged
    e = dict(dst="02:00:00:00:01:01", src="02:00:00:00:01:02")
    for name, frame in (
            ("icmpv6_to_us", bytes(Ether(**e) / IPv6(src=U2_ADDR, dst=U1_ADDR) /
                                   ICMPv6EchoRequest(data=b"ping"))),
            ("udp_6082_to_us", underlay_frame(geneve() + inner_udp(b"x"), dport=6082)),
            ("geneve_to_other_address", underlay_frame(geneve() + inner_udp(b"x"), dst="fd00:1::2")),
            ("ipv4", bytes(Ether(**e) / IP(src="192.0.2.9", dst="192.0.2.10") /
                           UDP(dport=GENEVE_PORT) / Raw(geneve()))),
            ("arp_broadcast", bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=e["src"]) /
                                    ARP(psrc="192.0.2.9", pdst="192.0.2.10"))),
            ("ethernet_header_only", bytes(Ether(**e, type=0x86DD))[:14])):
        out.append(Case(f"pass_{name}", "xdp_underlay", frame, XDP_PASS, frame,
                        root={"passed_to_host": 1}))
    return out


CASES = _tc_cases() + _xdp_cases()
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
