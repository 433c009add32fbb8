"""A reference model of the xde datapath, written from the specification,
docs/design.md ("The datapath", "The gateway", "Firewall and flow table",
"Counters and drop reasons"), not from the C in bpf/.

Given one instance's state (underlay address, ports and their firewall
epochs, V2P, routes, firewall rules, flows, the gateway's reply templates)
and a frame arriving either from a port's guest ("out", the TC program on
the port's datapath end) or from an underlay NIC ("in", the XDP program),
`outbound()` / `inbound()` return a Result: the verdict, the counter
deltas by name, and the output frame where it is determined; the flow
table changes as the datapath's must.

Where docs/design.md is silent the model follows the spec's intent (what an
operator of a production overlay would expect); each such decision is
marked "SPEC-SILENT" with the reasoning, so a disagreement with the
datapath can be judged.

Addresses of both families are kept as the datapath's tables key them
(docs/design.md, "Addresses"): 16 bytes, IPv4 mapped into ::ffff:0:0/96.
"""
import ipaddress
import struct
from dataclasses import dataclass, field

# Program return codes (UAPI).
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4

GENEVE_PORT = 6081
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6, ETH_P_TEB = 0x0800, 0x0806, 0x86DD, 0x6558
OXIDE_CLASS = 0x0129
OXIDE_TYPES = {0x00: 0, 0x01: 1, 0x02: 1}   # known option type -> body length in words
BSVC_MAC = bytes.fromhex("a84025777777")
HOP_LIMIT = 128
ENCAP_LEN = 14 + 40 + 8 + 8
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
EXT_HEADERS = (0, 43, 44, 60)   # hop-by-hop, routing, fragment, destination options
EXT_MAX = 4
VNI_EXTERNAL = None           # a frame from outside the VPC matches no vni= filter
V4_MAPPED = bytes(10) + b"\xff\xff"
BCAST4 = b"\xff" * 4
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_NODES_MAC = bytes.fromhex("333300000001")
ALL_DHCP6 = bytes.fromhex("ff020000000000000000000000010002")
ZERO16 = bytes(16)
ICMP6_QUOTE = 128             # what a Packet Too Big quotes of the packet

# the gateway's reply templates, per port and kind (docs/design.md, "The gateway")
GW_DHCP4, GW_RA, GW_NA, GW_DHCP6, GW_DHCP6_STATUS = 0, 1, 2, 3, 4
DHCP4_COOKIE = bytes((99, 130, 83, 99))
DHCP4_OPTS_MAX = 64
DHCP6_OPTS_MAX = 16
DHCP6_CLIENT_ID_MAX = 132     # a Client Identifier option the gateway echoes, header included


def mac_bytes_of(s):
    return bytes.fromhex(s.replace(":", ""))


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def a16(addr):
    """4 (IPv4) or 16 bytes -> the 16-byte form."""
    return V4_MAPPED + addr if len(addr) == 4 else addr


def link_scoped(a):
    """fe80::/10, any multicast (ff00::/8), the unspecified or the loopback
    address (::/127): never leaves the port's link."""
    return (a[0] == 0xFE and a[1] & 0xC0 == 0x80) or a[0] == 0xFF or a[:15] == ZERO16[:15] and \
        a[15] <= 1


def _csum_update(old_ck, old_word, new_word):
    """A checksum updated for one changed 16-bit word (RFC 1624, eqn. 3)."""
    s = (~old_ck & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# --- state -----------------------------------------------------------------------

@dataclass
class Port:
    ifindex: int
    name: str
    mac: bytes
    gw_mac: bytes
    ip: bytes | None          # 4 bytes; None: the port has no IPv4 address
    gw_ip: bytes
    vni: int
    bsvc_vni: int
    bsvc_addr: bytes          # 16 bytes
    subnet: ipaddress.IPv4Network | None
    mtu: int
    passthrough: bool = False
    ip6: bytes | None = None  # 16 bytes; None: no IPv6 address
    subnet6: ipaddress.IPv6Network | None = None
    gw_ip6: bytes = ZERO16    # the gateway's link-local address (EUI-64 of gw_mac)
    templates: dict = field(default_factory=dict)   # GW_* kind -> frame
    fw_epoch: int = 0         # bumped by every change to the port's rules
    nat: "NatCfg | None" = None   # its external addresses (None: no nat_cfg entry)


@dataclass
class Route:
    dest: ipaddress.IPv4Network | ipaddress.IPv6Network
    target: str               # drop | ig | ip4 | sub4 | ip6 | sub6
    addr: bytes = ZERO16      # ip4/ip6: next hop (16-byte form)
    length: int = 0
    system: bool = False


@dataclass
class FwRule:
    id: int
    priority: int
    action: str               # allow | deny
    proto: int = 0            # 0 any, IPPROTO_*, 0xfe arp
    host: bytes = ZERO16      # 16-byte form
    host_mask: bytes = ZERO16
    vni: int = 0
    vni_mask: int = 0
    icmp: int = 0
    icmp_mask: int = 0
    ports: list = field(default_factory=list)


@dataclass
class Instance:
    underlay_addr: bytes
    ports: dict = field(default_factory=dict)     # ifindex -> Port
    v2p: dict = field(default_factory=dict)       # (vni, 16-byte ip) -> (mac, underlay)
    routes: dict = field(default_factory=dict)    # ifindex -> [Route] (both families)
    rules: dict = field(default_factory=dict)     # (ifindex, 'in'|'out') -> [FwRule]
    flows: dict = field(default_factory=dict)     # (ifindex, dir, proto, src, dst, sport, dport) -> Flow
    hash_seed: int | None = None                  # keys the flow hash; None: not predicted
    nat_flows: dict = field(default_factory=dict) # flow key (as flows) -> NatVal
    snat_ports: dict = field(default_factory=dict)  # (ifindex, family, pool, ext port) -> SnatOwner

    def port_by(self, vni, mac):
        for p in self.ports.values():
            if not p.passthrough and p.vni == vni and p.mac == mac:
                return p
        return None


@dataclass
class Result:
    """What the datapath must do with one frame.

    verdict: 'drop', 'pass' (to the host stack, frame untouched),
    'hairpin' (a gateway reply back to the guest), 'underlay' (Geneve out
    through the kernel FIB), 'port' (delivered into a port: `port`).
    out: the expected output frame (None: not determined). For 'underlay',
    `encap` holds the inner frame and outer fields; the outer MACs come
    from the kernel and are checked against the resolved next hops only.
    """
    verdict: str
    retval: int
    counters: dict = field(default_factory=dict)
    out: bytes | None = None
    port: int | None = None
    encap: dict | None = None
    reason: str = ""

    def count(self, where, name, n=1):
        k = (where, name)
        self.counters[k] = self.counters.get(k, 0) + n


# --- parsing ---------------------------------------------------------------------

@dataclass
class Pkt:
    """A packet of either family as the firewall, the flow table and the
    router see it: 16-byte addresses, the L4 protocol (past IPv6 extension
    headers) and the L4 fields, all zero when the L4 header is not in the
    packet (a later fragment, or cut short)."""
    family: int
    src: bytes
    dst: bytes
    proto: int
    sport: int = 0            # ICMP/ICMPv6 echo: the identifier, in both
    dport: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    tcp_flags: int = 0
    has_l4: bool = False      # the L4 header was in the packet
    fragment: bool = False    # a piece of a datagram (an offset, or more to come)
    l4off: int = 0            # the L4 header's offset from the IP header (0: an IPv4 later fragment)


@dataclass
class Ip4:
    ihl: int
    tos: int
    total: int
    ident: int
    flags: int
    frag: int
    ttl: int
    proto: int
    src: bytes
    dst: bytes
    l4: bytes                 # the IP payload (within total length)

    @property
    def fragmented(self):
        return bool(self.flags & 1) or self.frag != 0

    @property
    def df(self):
        return bool(self.flags & 2)

    def pkt(self):
        p = Pkt(4, a16(self.src), a16(self.dst), self.proto, fragment=self.fragmented)
        if not self.frag:
            p.l4off = self.ihl
            _l4_fields(p, self.l4)
        return p


def parse_ip4(b):
    """An IPv4 header and payload from b (the bytes after Ethernet), or None
    when it is not a well-formed IPv4 packet."""
    if len(b) < 20 or b[0] >> 4 != 4:
        return None
    ihl = (b[0] & 0xF) * 4
    total = struct.unpack_from("!H", b, 2)[0]
    if ihl < 20 or len(b) < ihl or total < ihl or total > len(b):
        return None
    fl = struct.unpack_from("!H", b, 6)[0]
    return Ip4(ihl, b[1], total, struct.unpack_from("!H", b, 4)[0], fl >> 13, fl & 0x1FFF,
               b[8], b[9], b[12:16], b[16:20], b[ihl:total])


@dataclass
class Ip6:
    tc: int                   # traffic class
    plen: int
    hlim: int
    src: bytes
    dst: bytes
    proto: int                # after the extension headers
    l4off: int                # from the start of the IPv6 header
    frag_offset: int | None   # None: no fragment header
    frag_more: bool
    packet: bytes             # the whole packet (40 + payload length)

    @property
    def total(self):
        return 40 + self.plen

    @property
    def fragmented(self):
        """Part of a fragmented datagram (an atomic fragment, offset 0 and
        no more to come, is a whole one: RFC 8200 4.5)."""
        return self.frag_offset is not None and (self.frag_offset != 0 or self.frag_more)

    @property
    def l4(self):
        return b"" if self.frag_offset else self.packet[self.l4off:]

    def pkt(self):
        p = Pkt(6, self.src, self.dst, self.proto, fragment=self.fragmented, l4off=self.l4off)
        if not self.frag_offset:
            _l4_fields(p, self.l4)
        return p


def parse_ip6(b):
    """An IPv6 header, its extension headers and payload from b (the bytes
    after Ethernet), or None when malformed (docs/design.md, drop reason
    `malformed_ipv6`): no whole header, version not 6, a payload length
    past the frame, an IPv4-mapped source or destination, an extension
    header cut short by the packet's end, or more than four extension
    headers."""
    if len(b) < 40 or b[0] >> 4 != 6:
        return None
    plen = struct.unpack_from("!H", b, 4)[0]
    total = 40 + plen
    if total > len(b):
        return None
    # IPv4-mapped addresses never appear on the wire (RFC 4291 2.5.5.2); the
    # tables keep IPv4 addresses there, where they would pass for IPv4 ones
    if b[8:20] == V4_MAPPED or b[24:36] == V4_MAPPED:
        return None
    pkt = b[:total]
    # SPEC-SILENT: "the packet" is what the payload length says: bytes
    # after it (Ethernet padding) are not the packet's, so an extension
    # header or an L4 header found only there is not in the packet
    nh, off, n = b[6], 40, 0
    frag_offset, frag_more = None, False
    while nh in EXT_HEADERS:
        if n == EXT_MAX:
            return None
        n += 1
        if off + 8 > total:
            return None
        h = pkt[off:off + 8]
        hlen = 8 if nh == 44 else (h[1] + 1) * 8
        if off + hlen > total:
            return None
        if nh == 44:
            fo = struct.unpack_from("!H", h, 2)[0]
            # SPEC-SILENT: a second fragment header (malformed per RFC
            # 8200, never sent by a stack) counts by the last one
            frag_offset, frag_more = fo & 0xFFF8, bool(fo & 1)
        nh = h[0]
        off += hlen
    return Ip6((struct.unpack_from("!I", b, 0)[0] >> 20) & 0xFF, plen, b[7], b[8:24], b[24:40],
               nh, off, frag_offset, frag_more, pkt)


def _l4_fields(p, l4):
    """Ports, TCP flags, ICMP(v6) type and code from the L4 bytes, when the
    L4 header is whole in the packet."""
    if p.proto in (IPPROTO_TCP, IPPROTO_UDP):
        need = 20 if p.proto == IPPROTO_TCP else 8
        if len(l4) < need:
            return
        p.sport, p.dport = struct.unpack_from("!HH", l4)
        p.tcp_flags = l4[13] if p.proto == IPPROTO_TCP else 0
        p.has_l4 = True
    elif p.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if len(l4) < 8:
            return
        p.icmp_type, p.icmp_code = l4[0], l4[1]
        echo = (0, 8) if p.proto == IPPROTO_ICMP else (128, 129)
        if l4[0] in echo:
            p.sport = p.dport = struct.unpack_from("!H", l4, 4)[0]
        p.has_l4 = True


def is_ndp(p):
    return p.proto == IPPROTO_ICMPV6 and p.has_l4 and 133 <= p.icmp_type <= 137


# --- flow hash (docs/design.md, "Wire format") -----------------------------------

def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def flow_hash(p, seed):
    """MurmurHash3 (x86, 32-bit) of the ten 32-bit words of the parsed
    5-tuple, keyed by the instance's seed. The words are as the host holds
    them in memory (little-endian on x86 and arm64): the 16-byte source
    and destination four words each, then the ports (source in the upper
    half), then the protocol."""
    w = [int.from_bytes(p.src[i:i + 4], "little") for i in range(0, 16, 4)]
    w += [int.from_bytes(p.dst[i:i + 4], "little") for i in range(0, 16, 4)]
    sw = lambda v: ((v & 0xFF) << 8) | (v >> 8)     # noqa: E731 (a __be16 read as u16)
    w += [(sw(p.sport) << 16) | sw(p.dport), p.proto]
    h = seed & 0xFFFFFFFF
    for k in w:
        k = (k * 0xCC9E2D51) & 0xFFFFFFFF
        k = (_rotl(k, 15) * 0x1B873593) & 0xFFFFFFFF
        h = (_rotl(h ^ k, 13) * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= 40
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


# --- firewall (docs/design.md, "Firewall and flow table") ------------------------

TCPF_FIN, TCPF_SYN, TCPF_RST, TCPF_ACK = 0x01, 0x02, 0x04, 0x10
TCP_NONE, TCP_SYN_SENT, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_CLOSED = range(5)
DIRS = ("out", "in")


@dataclass
class Flow:
    """One direction's entry of an allowed flow: the verdict cached, the
    port's epoch it was reached in, the direction and VNI the flow's first
    packet was judged in, the rule that allowed it (0: the default), the
    packets and bytes that went this way, and the TCP state both entries
    share."""
    epoch: int
    origin: str
    vni: int | None
    rule: int
    packets: int = 0
    bytes: int = 0
    state: int = TCP_NONE
    fin: int = 0              # a bit per direction (out 1, in 2) that sent a FIN


def _rule_matches(r, p, remote, vni):
    if r.proto == 0xFE:                       # arp: never an IP packet
        return False
    if r.proto and r.proto != p.proto:
        return False
    hm = int.from_bytes(r.host_mask, "big")
    if hm and int.from_bytes(remote, "big") & hm != int.from_bytes(r.host, "big") & hm:
        return False
    if r.vni_mask and (vni is VNI_EXTERNAL or vni != r.vni):
        return False
    if r.icmp_mask:
        if p.proto not in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            return False
        if ((p.icmp_type << 8) | p.icmp_code) & r.icmp_mask != r.icmp & r.icmp_mask:
            return False
    if r.ports:
        # the port list names the local service: the destination port of
        # the packet (OPTE's `ports`); port 0 is never a real port
        if p.proto not in (IPPROTO_TCP, IPPROTO_UDP) or p.dport == 0 or p.dport not in r.ports:
            return False
    return True


def _rules_verdict(inst, port, direction, p, vni):
    """(allowed, rule id) of the port's rules of one direction: the first
    match decides; none: outbound allow, inbound deny (rule 0)."""
    remote = p.dst if direction == "out" else p.src
    for r in inst.rules.get((port.ifindex, direction), []):
        if _rule_matches(r, p, remote, vni):
            return r.action == "allow", r.id
    return direction == "out", 0


def _flow_key(port, direction, p):
    return (port.ifindex, direction, p.proto, p.src, p.dst, p.sport, p.dport)


def _reverse_key(key):
    ifindex, direction, proto, src, dst, sport, dport = key
    return (ifindex, "in" if direction == "out" else "out", proto, dst, src, dport, sport)


def _turned(p):
    """p as its flow's other direction carries it: addresses and ports
    swapped, its ICMP type and TCP flags its own."""
    return Pkt(p.family, p.dst, p.src, p.proto, p.dport, p.sport, p.icmp_type, p.icmp_code,
               p.tcp_flags, p.has_l4)


def _bare_syn(p):
    return p.proto == IPPROTO_TCP and p.tcp_flags & (TCPF_SYN | TCPF_ACK) == TCPF_SYN


def _tcp_track(f, direction, flags):
    """TCP state from a packet's flags (docs/design.md): RST closes, a FIN
    each way closes (one way: FIN_WAIT), an ACK from the side that did not
    open the flow establishes it."""
    if flags & TCPF_RST:
        f.state = TCP_CLOSED
    elif flags & TCPF_FIN:
        f.fin |= 1 << DIRS.index(direction)
        f.state = TCP_CLOSED if f.fin == 3 else TCP_FIN_WAIT
    elif f.state == TCP_SYN_SENT and direction != f.origin and flags & TCPF_ACK:
        f.state = TCP_ESTABLISHED


def firewall(inst, res, port, direction, p, vni, length):
    """True when the packet may pass (docs/design.md, "Firewall and flow
    table"). Counts flow hits/misses, re-evaluations and the verdict; an
    entry's packets and bytes (length: the frame as the guest sends or
    receives it). The flow table is keyed by (port, direction, protocol,
    addresses, ports or ICMP id)."""
    P = port.ifindex
    key = _flow_key(port, direction, p)
    f = inst.flows.get(key)
    # a new connection on the 4-tuple of a closed one starts afresh
    if f is not None and p.proto == IPPROTO_TCP and f.state == TCP_CLOSED and _bare_syn(p):
        f = None
    if f is not None:
        ok = True
        reeval = f.epoch != port.fw_epoch
        if reeval:
            # the rules changed: the flow is judged again, once, by the
            # rules of the direction it started in, in the VNI it was
            # first judged in
            res.count(P, "flow_reevaluated")
            q = p if f.origin == direction else _turned(p)
            ok, rule = _rules_verdict(inst, port, f.origin, q, f.vni)
        rkey = _reverse_key(key)
        r = inst.flows.get(rkey)
        if ok:
            res.count(P, "flow_hits")
            f.packets += 1
            f.bytes += length
            if reeval:
                # refreshed: both entries of the flow take the new epoch
                # and name the rule that allows it now
                f.epoch, f.rule = port.fw_epoch, rule
            if p.proto == IPPROTO_TCP:
                _tcp_track(f, direction, p.tcp_flags)
            if r is not None:
                r.epoch, r.rule, r.state, r.fin = f.epoch, f.rule, f.state, f.fin
            return True
        # now denied: both entries go, and the packet is judged as new
        inst.flows.pop(key, None)
        inst.flows.pop(rkey, None)
    res.count(P, "flow_misses")
    allowed, rule = _rules_verdict(inst, port, direction, p, vni)
    res.count(P, "fw_allowed" if allowed else "fw_denied")
    if allowed:
        # stateful: an entry for this direction and one for the reply's
        f = Flow(port.fw_epoch, direction, vni, rule, 1, length)
        if p.proto == IPPROTO_TCP:
            f.state = TCP_SYN_SENT if _bare_syn(p) else TCP_ESTABLISHED
            _tcp_track(f, direction, p.tcp_flags)
        inst.flows[key] = f
        inst.flows[_reverse_key(key)] = Flow(f.epoch, f.origin, f.vni, f.rule, 0, 0, f.state,
                                             f.fin)
    return allowed


# --- the gateway (docs/design.md, "The gateway") ---------------------------------

def _drop(res, port, reason, why=""):
    res.verdict, res.retval, res.reason = "drop", TC_ACT_SHOT, why or reason
    res.count(port.ifindex, f"drop_out_{reason}")
    return res


def _hairpin(res, port, out, counter):
    res.verdict, res.retval, res.out = "hairpin", TC_ACT_REDIRECT, out
    if counter:
        res.count(port.ifindex, counter)
    return res


def _arp_reply(frame, port, tpa):
    sha, spa = frame[22:28], frame[28:32]
    reply = (sha + port.gw_mac + struct.pack("!H", ETH_P_ARP) +
             struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 2) +
             port.gw_mac + tpa + sha + spa)
    return reply + frame[len(reply):]


def _echo_reply(frame, ip, port):
    out = bytearray(frame)
    out[0:6], out[6:12] = frame[6:12], port.gw_mac
    ipo = 14
    # in place: the addresses swapped leave the header's sum, and so its
    # checksum, as they were
    out[ipo + 12:ipo + 16], out[ipo + 16:ipo + 20] = ip.dst, ip.src
    icmp = ipo + ip.ihl
    out[icmp] = 0
    # the checksum updated for the changed word (RFC 1624, eqn. 3): a valid
    # request gives a valid reply
    old = struct.unpack_from("!H", frame, icmp + 2)[0]
    m, m2 = struct.unpack_from("!H", frame, icmp)[0], struct.unpack_from("!H", out, icmp)[0]
    out[icmp + 2:icmp + 4] = struct.pack("!H", _csum_update(old, m, m2))
    return bytes(out)


def _echo6_reply(frame, ip6, port):
    """The echo reply made of an echo request to the gateway's link-local
    address: addresses swapped (the pseudo-header sum is unchanged), the
    guest's MAC from the gateway's, type 129, the checksum updated."""
    out = bytearray(frame)
    out[0:6], out[6:12] = port.mac, port.gw_mac
    out[22:38], out[38:54] = ip6.dst, ip6.src
    icmp = 14 + ip6.l4off
    out[icmp] = 129
    old = struct.unpack_from("!H", frame, icmp + 2)[0]
    m, m2 = struct.unpack_from("!H", frame, icmp)[0], struct.unpack_from("!H", out, icmp)[0]
    out[icmp + 2:icmp + 4] = struct.pack("!H", _csum_update(old, m, m2))
    return bytes(out)


def _frag_needed(frame, ip, port):
    """ICMP 3/4 from the gateway to the guest with the port MTU, quoting the
    IP header and the first 8 bytes of its payload."""
    quote = frame[14:14 + ip.ihl + 8]
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, port.mtu) + quote
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, IPPROTO_ICMP, 0,
                      port.gw_ip, port.ip)
    return port.mac + port.gw_mac + struct.pack("!H", ETH_P_IP), hdr, icmp


def _pseudo6(src, dst, length, nh):
    return src + dst + struct.pack("!IxxxB", length, nh)


def _packet_too_big(frame, ip6, port):
    """ICMPv6 Packet Too Big from the gateway's link-local address to the
    guest, with the port MTU, quoting the first 128 bytes of the packet."""
    quote = frame[14:14 + ICMP6_QUOTE]
    icmp = struct.pack("!BBHI", 2, 0, 0, port.mtu) + quote
    ck = csum(_pseudo6(port.gw_ip6, ip6.src, len(icmp), IPPROTO_ICMPV6) + icmp)
    icmp = icmp[:2] + struct.pack("!H", ck) + icmp[4:]
    hdr = struct.pack("!IHBB", 6 << 28, len(icmp), IPPROTO_ICMPV6, 255) + port.gw_ip6 + ip6.src
    return port.mac + port.gw_mac + struct.pack("!H", ETH_P_IPV6) + hdr + icmp


def _send4(f):
    """An IPv4/UDP reply with its lengths and checksums (UDP: 0 is 0xffff)."""
    f[16:18] = struct.pack("!H", len(f) - 14)
    f[24:26] = b"\0\0"
    f[24:26] = struct.pack("!H", csum(bytes(f[14:34])))
    ulen = len(f) - 34
    f[38:40] = struct.pack("!H", ulen)
    f[40:42] = b"\0\0"
    ck = csum(bytes(f[26:34]) + struct.pack("!BBH", 0, IPPROTO_UDP, ulen) + bytes(f[34:]))
    f[40:42] = struct.pack("!H", ck or 0xFFFF)
    return bytes(f)


def _send6(f, nh):
    """An IPv6 reply carrying UDP or ICMPv6, lengths and checksum filled."""
    plen = len(f) - 54
    f[18:20] = struct.pack("!H", plen)
    ck_at = 54 + (6 if nh == IPPROTO_UDP else 2)
    if nh == IPPROTO_UDP:
        f[58:60] = struct.pack("!H", plen)
    f[ck_at:ck_at + 2] = b"\0\0"
    ck = csum(_pseudo6(bytes(f[22:38]), bytes(f[38:54]), plen, nh) + bytes(f[54:]))
    if nh == IPPROTO_UDP and ck == 0:
        ck = 0xFFFF
    f[ck_at:ck_at + 2] = struct.pack("!H", ck)
    return bytes(f)


def _dhcp4_type(opts):
    """The DHCP message type (option 53) of the options area, 0 when there
    is none: pad (0) skipped, end (255) stops, at most 64 options read, each
    inside the message."""
    off = 0
    # SPEC-SILENT: a pad counts as one of the 64 options read (it is an
    # option, RFC 2132 3.1); an option 53 whose length is not 1 carries
    # no message type
    for _ in range(DHCP4_OPTS_MAX):
        if off >= len(opts):
            return 0
        code = opts[off]
        if code == 255:
            return 0
        if code == 0:
            off += 1
            continue
        if off + 2 > len(opts) or off + 2 + opts[off + 1] > len(opts):
            return 0
        if code == 53:
            return opts[off + 2] if opts[off + 1] == 1 else 0
        off += 2 + opts[off + 1]
    return 0


def _dhcp4_type_at(tmpl):
    """Where the template's message type (option 53's value) is."""
    base = 14 + 20 + 8 + 240
    off = 0
    opts = tmpl[base:]
    while off + 2 < len(opts) and opts[off] != 255:
        if opts[off] == 0:
            off += 1
            continue
        if opts[off] == 53:
            return base + off + 2
        off += 2 + opts[off + 1]
    raise ValueError("DHCPv4 template without a message type")


def _dhcp4(res, port, ip):
    """DHCPv4 to the gateway's server: a broadcast DISCOVER gets an OFFER, a
    broadcast REQUEST an ACK, both the port's lease; the rest is dropped."""
    if port.ip is None or ip.dst != BCAST4 or ip.fragmented:
        return _drop(res, port, "dhcp4", "dhcp4 not a broadcast whole datagram")
    # SPEC-SILENT: the IP total length bounds the message; the UDP length
    # field is not consulted
    bootp = ip.l4[8:]
    if len(bootp) < 240:
        return _drop(res, port, "dhcp4", "dhcp4 short")
    sport = struct.unpack_from("!H", ip.l4)[0]
    if sport != 68 or bootp[0] != 1 or bootp[1] != 1 or bootp[2] != 6 or \
            bootp[236:240] != DHCP4_COOKIE:
        return _drop(res, port, "dhcp4", "dhcp4 header")
    if bootp[28:34] != port.mac:
        return _drop(res, port, "spoof", "dhcp4 chaddr")
    mtype = _dhcp4_type(bootp[240:])
    if mtype not in (1, 3):
        return _drop(res, port, "dhcp4", f"dhcp4 type {mtype}")
    tmpl = port.templates.get(GW_DHCP4)
    if tmpl is None:
        return _drop(res, port, "dhcp4", "dhcp4 no template")
    f = bytearray(tmpl)
    rb = 14 + 20 + 8                            # the reply's BOOTP
    f[rb + 4:rb + 8] = bootp[4:8]               # xid
    f[rb + 10:rb + 12] = bootp[10:12]           # flags
    f[_dhcp4_type_at(tmpl)] = 2 if mtype == 1 else 5
    if bootp[10] & 0x80:                        # the client asks for a broadcast reply
        f[0:6] = b"\xff" * 6
        f[30:34] = BCAST4
    return _hairpin(res, port, _send4(f), "dhcp4_replies")


def _ndp_answer(port, kind, src):
    f = bytearray(port.templates[kind])
    if src != ZERO16:
        f[38:54] = src
    else:
        # from the unspecified address: to all nodes (RFC 4861 6.2.6,
        # 7.2.4), and an NA that answers no one in particular is not
        # solicited
        f[38:54] = ALL_NODES
        f[0:6] = ALL_NODES_MAC
        if kind == GW_NA:
            f[58] &= ~0x40
    return _send6(f, IPPROTO_ICMPV6)


def _dhcp6_iaid_at(tmpl):
    """Where the IAID of the template's IA_NA is."""
    off, end = 14 + 40 + 8 + 4, len(tmpl)
    while off + 4 <= end:
        code, ln = struct.unpack_from("!HH", tmpl, off)
        if code == 3:
            return off + 4
        off += 4 + ln
    raise ValueError("DHCPv6 template without an IA_NA")


def _dhcp6(res, port, ip6, p):
    """DHCPv6 to the gateway's server: Solicit -> Advertise (or Reply with
    Rapid Commit), Request naming this server -> Reply, Confirm naming no
    server -> Reply (status Success); the rest is dropped."""
    if port.ip6 is None or p.sport != 546 or ip6.dst != ALL_DHCP6:
        return _drop(res, port, "dhcp6", "dhcp6 not to all servers from 546")
    # SPEC-SILENT: as for DHCPv4, only a whole datagram is a message the
    # server reads (a fragment's options may be in another fragment)
    if ip6.fragmented:
        return _drop(res, port, "dhcp6", "dhcp6 fragment")
    msg = ip6.l4[8:]
    if len(msg) < 4:
        return _drop(res, port, "dhcp6", "dhcp6 short")
    client = iaid = None
    servers, rapid = [], False
    off = 4
    for _ in range(DHCP6_OPTS_MAX):
        if off + 4 > len(msg):
            break
        code, ln = struct.unpack_from("!HH", msg, off)
        if off + 4 + ln > len(msg):
            break
        body = msg[off + 4:off + 4 + ln]
        if code == 1 and client is None:
            client = msg[off:off + 4 + ln]
        elif code == 2:
            servers.append(body)
        elif code == 3 and ln >= 12 and iaid is None:
            iaid = body[:4]
        elif code == 14:
            rapid = True
        off += 4 + ln
    mtype = msg[0]
    mine = b"\x00\x03\x00\x01" + port.gw_mac     # DUID-LL of the gateway MAC
    if mtype == 1 and not servers:
        kind, reply = GW_DHCP6, (7 if rapid else 2)
    # SPEC-SILENT: a Request is this server's when the Server Identifier it
    # carries is ours; one naming two servers names no one for sure (RFC
    # 8415 21.3 allows one), so it is not answered
    elif mtype == 3 and servers and all(s == mine for s in servers):
        kind, reply, rapid = GW_DHCP6, 7, False
    # a Confirm carrying a Server Identifier is discarded (RFC 8415 16.5)
    elif mtype == 4 and not servers:
        kind, reply, rapid = GW_DHCP6_STATUS, 7, False
    else:
        return _drop(res, port, "dhcp6", f"dhcp6 type {mtype}")
    if client is None or len(client) > DHCP6_CLIENT_ID_MAX:
        return _drop(res, port, "dhcp6", "dhcp6 client id")
    tmpl = port.templates.get(kind)
    if tmpl is None:
        return _drop(res, port, "dhcp6", "dhcp6 no template")
    f = bytearray(tmpl)
    f[62] = reply
    f[63:66] = msg[1:4]                         # transaction id
    if kind == GW_DHCP6:
        at = _dhcp6_iaid_at(tmpl)
        f[at:at + 4] = iaid or bytes(4)
    f[38:54] = ip6.src
    f += client
    if rapid:
        f += b"\x00\x0e\x00\x00"
    return _hairpin(res, port, _send6(f, IPPROTO_UDP), "dhcp6_replies")


def _gateway6(res, port, frame, ip6, p):
    """Link-scoped IPv6 and neighbour discovery from the guest: what the
    gateway answers, else a drop by reason."""
    if p.proto == IPPROTO_ICMPV6 and p.has_l4 and not ip6.fragmented and \
            p.icmp_type == 128 and ip6.dst == port.gw_ip6:
        # a port without IPv6 has no IPv6 gateway to answer
        if p.icmp_code != 0 or port.ip6 is None:
            return _drop(res, port, "link_local", "echo6 code or no IPv6")
        # SPEC-SILENT: the guest's source is its own link-local address,
        # which the port does not record: no anti-spoofing here (the
        # source MAC was checked)
        return _hairpin(res, port, _echo6_reply(frame, ip6, port), "icmp_replies")
    if p.proto == IPPROTO_ICMPV6:
        if not is_ndp(p):
            return _drop(res, port, "link_local", "icmp6 not ndp")
        # RFC 6980 5: neighbour discovery in a packet with a fragment
        # header (an atomic fragment too) is ignored, never answered
        if port.ip6 is None or ip6.hlim != 255 or p.icmp_code != 0 or \
                ip6.frag_offset is not None:
            return _drop(res, port, "ndp", "ndp invalid")
        if p.icmp_type == 133:
            if GW_RA not in port.templates:
                return _drop(res, port, "ndp", "no RA template")
            return _hairpin(res, port, _ndp_answer(port, GW_RA, ip6.src), "ndp_replies")
        if p.icmp_type == 135:
            target = ip6.l4[8:24]
            if len(target) < 16 or target != port.gw_ip6 or GW_NA not in port.templates:
                return _drop(res, port, "ndp", "ns not for the gateway")
            return _hairpin(res, port, _ndp_answer(port, GW_NA, ip6.src), "ndp_replies")
        return _drop(res, port, "ndp", f"ndp type {p.icmp_type}")
    if p.proto == IPPROTO_UDP and p.has_l4 and p.dport == 547:
        return _dhcp6(res, port, ip6, p)
    return _drop(res, port, "link_local", "link-scoped")


# --- NAT (bpf/nat.h: SNAT, ephemeral and floating IPs) ---------------------------
#
# Between the router and the overlay. What a port's router sends to the
# internet gateway leaves from one of the port's external addresses, per
# family and in this order of preference: a floating IP (chosen by the
# flow's hash), the ephemeral IP, or the SNAT IP with a port of its range
# (one pool per protocol: TCP, UDP, ICMP echo with the identifier as the
# port). What comes back from outside the VPC (Geneve with the External
# option) to an address that is not the guest's own reaches the guest's:
# a reply of a translated flow, an ICMP error about one, or (ephemeral and
# floating IPs, 1:1 NAT) the start of a flow of its own.
#
# docs/design.md ("NAT"), and bpf/nat.h where the document says less than
# the tests must know (the ICMP errors, the checksums' zero, what a packet
# without its L4 header is). Every translated flow has two entries in
# nat_flows, keyed like the flow table (out: the guest's tuple -> the
# external address and port; in: the tuple replies carry -> the guest's);
# an entry made under older addresses (nat_cfg.gen) is checked again and
# forgotten when they no longer have its external address (and port). A
# SNAT port belongs to the flow it was given to (snat_ports) until an
# allocation probing it finds that flow gone from the flow table.
#
# Checksums are mended incrementally (RFC 1624) as the kernel's helpers do
# (TC) and as nat.h does itself (XDP, and ICMP errors both ways): the
# one's-complement sum is the same, and its representation of zero is the
# helpers' (a sum the kernel keeps in 32 bits never folds to 0: the result
# is 0x0000, not 0xffff). UDP: a checksum of 0 (none, IPv4) stays 0, and a
# result of 0 is sent as 0xffff (RFC 768). ICMPv4 has no pseudo-header:
# the address alone leaves its checksum as it is.

NAT_MAX_FLOATING = 16
NAT_PROBES, NAT_RECLAIM_PROBES = 64, 4
NAT_SNAT, NAT_EPHEMERAL, NAT_FLOATING = 1, 2, 3
POOL_TCP, POOL_UDP, POOL_ICMP = 0, 1, 2
L4_CSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2, IPPROTO_ICMPV6: 2}
NAT_PASSES_MAX = 8            # a frame NAT sends round the XDP pipeline more often: dropped


@dataclass
class NatIps:
    """One family's external addresses (16-byte form)."""
    snat: bytes = ZERO16
    snat_start: int = 0       # the SNAT range; 0: no SNAT IP
    snat_end: int = 0
    ephemeral: bytes | None = None
    floating: list = field(default_factory=list)
    cursor: list = field(default_factory=lambda: [0, 0, 0, 0])   # per pool: the next to probe


@dataclass
class NatCfg:
    gen: int                  # bumped by every change of the addresses
    fam: dict                 # 4 | 6 -> NatIps


@dataclass
class NatVal:
    addr: bytes               # out: the external address; in: the guest's
    port: int                 # out: the external port; in: the guest's (1:1: unchanged)
    kind: int
    gen: int                  # the nat_cfg.gen it was last found valid in


@dataclass
class SnatOwner:
    stamp: int                # bumped by whoever takes the port over
    flow: tuple               # the owning flow's out key


def nat_cfg_of(ext, gen):
    """A NatCfg of external addresses given as {"snat": [addresses],
    "snat_start", "snat_end", "ephemeral": [...], "floating": [...]} (at
    most one SNAT and one ephemeral address per family; the range is both
    SNAT addresses'), the cursors at 0."""
    def fam_of(a):
        return ipaddress.ip_address(a).version

    def b16(a):
        return a16(ipaddress.ip_address(a).packed)
    cfg = NatCfg(gen, {4: NatIps(), 6: NatIps()})
    for v, f in cfg.fam.items():
        snat = [a for a in ext.get("snat", ()) if fam_of(a) == v]
        if snat:
            f.snat, f.snat_start, f.snat_end = b16(snat[0]), ext["snat_start"], ext["snat_end"]
        eph = [a for a in ext.get("ephemeral", ()) if fam_of(a) == v]
        if eph:
            f.ephemeral = b16(eph[0])
        f.floating = [b16(a) for a in ext.get("floating", ()) if fam_of(a) == v]
    return cfg


def is_echo(p):
    """An ICMP(v6) echo request or reply. SPEC-SILENT: as the datapath
    parses it, an ICMPv4 packet whose header is not in it has type 0, an
    echo reply (identifier 0): SNAT gives it an ICMP port, and the
    identifier is written where the header would be."""
    if p.proto == IPPROTO_ICMP:
        return p.icmp_type in (0, 8)
    return p.proto == IPPROTO_ICMPV6 and p.icmp_type in (128, 129)


def _icmp_error(p):
    if p.proto == IPPROTO_ICMP:
        return p.icmp_type in (3, 11, 12)
    return p.proto == IPPROTO_ICMPV6 and 1 <= p.icmp_type <= 4


def _nat_pool(p):
    if p.proto == IPPROTO_TCP:
        return POOL_TCP
    if p.proto == IPPROTO_UDP:
        return POOL_UDP
    return POOL_ICMP if is_echo(p) else None


def _nat_has(f, kind, ext, ext_port):
    """Do the family's addresses f still have ext (and ext_port, SNAT)?"""
    if kind == NAT_FLOATING:
        return ext in f.floating
    if kind == NAT_EPHEMERAL:
        return f.ephemeral is not None and f.ephemeral == ext
    return bool(f.snat_start) and f.snat == ext and f.snat_start <= ext_port <= f.snat_end


def _nat_in_key(out, ext, ext_port, echo):
    """The in entry's key (what replies carry) of the flow whose out key is
    `out`, leaving from ext:ext_port (an echo's identifier is both ports)."""
    ifindex, _, proto, src, dst, sport, dport = out
    return (ifindex, "in", proto, dst, ext, ext_port if echo else dport, ext_port)


def _nat_out_key(in_, guest, guest_port, echo):
    ifindex, _, proto, src, dst, sport, dport = in_
    return (ifindex, "out", proto, guest, src, guest_port, guest_port if echo else sport)


def _nat_whole(p):
    """nat.h nat_whole: not a fragment, and a transport header NAT would
    rewrite is whole."""
    return not p.fragment and (p.has_l4 or p.proto not in (IPPROTO_TCP, IPPROTO_UDP,
                                                            IPPROTO_ICMP, IPPROTO_ICMPV6))


def _snat_release(inst, port, p, ext_port, out):
    """nat.h snat_release: the port back to its pool if `out` owns it."""
    pool = {IPPROTO_TCP: POOL_TCP, IPPROTO_UDP: POOL_UDP}.get(p.proto, POOL_ICMP)
    k = (port.ifindex, p.family, pool, ext_port)
    o = inst.snat_ports.get(k)
    if o is not None and o.flow == out:
        del inst.snat_ports[k]


def _nat_forget(inst, out, v, echo):
    inst.nat_flows.pop(_nat_in_key(out, v.addr, v.port, echo), None)
    inst.nat_flows.pop(out, None)


def _nat_put(inst, out, ext, ext_port, guest, guest_port, kind, gen, echo):
    inst.nat_flows[out] = NatVal(ext, ext_port, kind, gen)
    inst.nat_flows[_nat_in_key(out, ext, ext_port, echo)] = NatVal(guest, guest_port, kind, gen)


def _snat_alloc(inst, port, f, family, pool, out):
    """(external port, reclaimed) for the flow `out`: from the pool's
    cursor, the first of NAT_PROBES ports no flow owns, else the first of
    NAT_RECLAIM_PROBES whose owner has left the flow table (its translation
    goes with it); (0, False): none."""
    start, n = f.snat_start, f.snat_end - f.snat_start + 1
    cursor = f.cursor[pool]
    off = 0
    for i in range(min(n, NAT_PROBES)):
        off = (cursor + i) % n
        k = (port.ifindex, family, pool, start + off)
        if k not in inst.snat_ports:
            inst.snat_ports[k] = SnatOwner(0, out)
            break
    else:
        for i in range(min(n, NAT_RECLAIM_PROBES)):
            off = (cursor + i) % n
            o = inst.snat_ports.get((port.ifindex, family, pool, start + off))
            # SPEC-SILENT: the model has no clock; a flow in the flow table
            # is within its timeout (a case takes far less than any)
            # alive while either direction's entry is (nat.h snat_owner_alive)
            if o is not None and o.flow not in inst.flows and \
                    _reverse_key(o.flow) not in inst.flows:
                o.stamp += 2          # odd while written, even again
                old = inst.nat_flows.get(o.flow)
                if old is not None:
                    _nat_forget(inst, o.flow, old, o.flow[2] in (IPPROTO_ICMP, IPPROTO_ICMPV6))
                o.flow = out
                f.cursor[pool] = (off + 1) & 0xFFFF
                return start + off, True
        return 0, False
    f.cursor[pool] = (off + 1) & 0xFFFF
    return start + off, False


def _l4_port_off(p, out):
    if p.proto in (IPPROTO_TCP, IPPROTO_UDP):
        return 0 if out else 2
    return 4 if is_echo(p) else None


def _fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum_terms(changes):
    """The one's-complement sum of what changed: (old, new) byte strings of
    even length, each as it sits in the checksummed data."""
    s = 0
    for old, new in changes:
        s += sum(~w & 0xFFFF for w in struct.unpack(f"!{len(old) // 2}H", old))
        s += sum(struct.unpack(f"!{len(new) // 2}H", new))
    return s


def _word(v):
    """A 16-bit field as a 32-bit word of the helpers' (its upper half 0)."""
    return struct.pack("!H", v) + b"\0\0"


def _helper_csum(f, at, changes, mangled_0):
    """bpf_l3_csum_replace / bpf_l4_csum_replace on the checksum at `at`;
    False when the helper fails (past the frame)."""
    if at & 1 or at + 2 > len(f):
        return False
    ck = struct.unpack_from("!H", f, at)[0]
    if mangled_0 and ck == 0:
        return True
    # the kernel complements the old checksum in 32 bits: the sum is never 0
    v = ~_fold((~ck & 0xFFFF) + 0xFFFF + _csum_terms(changes)) & 0xFFFF
    struct.pack_into("!H", f, at, 0xFFFF if mangled_0 and v == 0 else v)
    return True


def _mend(f, at, changes, udp):
    """nat.h csum_mend: the checksum at `at` updated for `changes`."""
    ck = struct.unpack_from("!H", f, at)[0]
    if udp and ck == 0:
        return
    v = ~_fold((~ck & 0xFFFF) + _csum_terms(changes)) & 0xFFFF
    struct.pack_into("!H", f, at, 0xFFFF if udp and v == 0 else v)


def _rewrite_out(f, p, addr, port):
    """Source address and port of the guest's frame f (a bytearray) to
    addr:port, with its checksums, as tc_nat does it through the kernel's
    helpers; the drop reason when a helper fails."""
    l4 = 14 + p.l4off
    at = L4_CSUM_AT.get(p.proto)
    poff = _l4_port_off(p, True)
    udp = p.proto == IPPROTO_UDP
    if p.family == 6:
        f[22:38] = addr
        if at is not None and not _helper_csum(f, l4 + at, [(p.src, addr)], udp):
            return "csum_failed"
    else:
        f[26:30] = addr[12:]
        _helper_csum(f, 24, [(p.src[12:], addr[12:])], False)
        if at is not None and p.proto != IPPROTO_ICMP and \
                not _helper_csum(f, l4 + at, [(p.src[12:], addr[12:])], udp):
            return "csum_failed"
    if poff is not None and port != p.sport:
        if l4 + poff + 2 > len(f):
            return "store_failed"
        struct.pack_into("!H", f, l4 + poff, port)
        if not _helper_csum(f, l4 + at, [(_word(p.sport), _word(port))], udp):
            return "csum_failed"
    return None


def _rewrite_in(f, p, addr, port):
    """Destination address and port of the inner frame f (a bytearray) to
    the guest's addr:port, with its checksums (nat.h nat_rewrite_xdp)."""
    l4 = 14 + (p.l4off & 0x3FFF)
    udp = p.proto == IPPROTO_UDP
    c = pf = None
    if p.proto == IPPROTO_TCP:
        if l4 + 20 > len(f):
            return "malformed_inner"
        c, pf = l4 + 16, l4 + 2
    elif udp:
        if l4 + 8 > len(f):
            return "malformed_inner"
        c, pf = l4 + 6, l4 + 2
    elif p.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if l4 + 8 > len(f):
            return "malformed_inner"
        c = l4 + 2
        pf = l4 + 4 if is_echo(p) else None
    if p.family == 6:
        changes = [(p.dst, addr)]
        f[38:54] = addr
    else:
        changes = [(p.dst[12:], addr[12:])]
        _mend(f, 24, changes, False)
        f[30:34] = addr[12:]
        if p.proto == IPPROTO_ICMP:
            changes = []      # no pseudo-header
    if pf is not None and port != p.dport:
        changes.append((_word(p.dport), _word(port)))
        struct.pack_into("!H", f, pf, port)
    if c is not None:
        _mend(f, c, changes, udp)
    return None


def _nat_out(inst, res, port, frame, p):
    """tc_nat (and tc_snat) on a frame the router sends to the internet
    gateway: (drop reason or None, the frame translated, its packet)."""
    nc = port.nat
    if nc is None:
        return "no_external_ip", frame, p
    if not _nat_whole(p):
        return "nat_untranslatable", frame, p
    if _icmp_error(p):
        # an error about a packet of a translated flow
        b = bytearray(frame)
        why, addr = _nat_error(inst, res, port, nc, b, p, "out")
        if why:
            return why, frame, p
        return None, bytes(b), Pkt(**{**p.__dict__, "src": addr})
    f = nc.fam[p.family]
    echo = is_echo(p)
    out = _flow_key(port, "out", p)
    v = inst.nat_flows.get(out)
    if v is not None and v.gen != nc.gen:
        if not _nat_has(f, v.kind, v.addr, v.port):
            if v.kind == NAT_SNAT:
                _snat_release(inst, port, p, v.port, out)
            _nat_forget(inst, out, v, echo)
            v = None
        else:
            v.gen = nc.gen
    if v is None:
        if f.floating:
            # SPEC-SILENT: without the instance's hash seed the choice among
            # several floating IPs is not predicted (the first is taken)
            i = flow_hash(p, inst.hash_seed) % len(f.floating) if inst.hash_seed is not None \
                else 0
            _nat_put(inst, out, f.floating[i], p.sport, p.src, p.sport, NAT_FLOATING, nc.gen,
                     echo)
        elif f.ephemeral is not None:
            _nat_put(inst, out, f.ephemeral, p.sport, p.src, p.sport, NAT_EPHEMERAL, nc.gen,
                     echo)
        elif not f.snat_start:
            return "no_external_ip", frame, p
        else:
            pool = _nat_pool(p)
            if pool is None:
                return "nat_untranslatable", frame, p
            # tc_snat: a port of the pool, then tc_nat again
            ext, reclaimed = _snat_alloc(inst, port, f, p.family, pool, out)
            if not ext:
                return "nat_exhausted", frame, p
            res.count(port.ifindex, "snat_allocated")
            if reclaimed:
                res.count(port.ifindex, "snat_reclaimed")
            _nat_put(inst, out, f.snat, ext, p.src, p.sport, NAT_SNAT, nc.gen,
                     pool == POOL_ICMP)
        v = inst.nat_flows[out]
    b = bytearray(frame)
    why = _rewrite_out(b, p, v.addr, v.port)
    if why:
        return why, frame, p
    q = Pkt(**{**p.__dict__, "src": v.addr})
    if _l4_port_off(p, True) is not None:
        q.sport = v.port
        if echo:
            q.dport = v.port
    res.count(port.ifindex, "nat_out")
    return None, bytes(b), q


def _nat_error(inst, res, port, nc, f, p, direction):
    """An ICMP error about a translated flow (f: the frame, a bytearray,
    translated in place). In: a router's, quoting the packet as it left
    (from the external address and port): the guest gets it addressed to
    itself, quoting its own address and port. Out: the guest's, quoting a
    packet that reached it translated: the error leaves from the external
    address, quoting it and the external port. Either way the quote, read
    from its far end, keys the flow's entry of that direction. Checksums
    mended: the outer IPv4 header's, the quoted IPv4 header's, the ICMP
    message's (ICMPv6: its pseudo-header too); the quoted transport
    checksum is left as it is. (the drop reason or None, the new address)"""
    inward = direction == "in"
    l4 = 14 + (p.l4off & 0x3FFF)
    if l4 + 8 > len(f):
        return "no_nat", None
    q = l4 + 8                # the quoted packet
    v6 = p.family == 6
    if v6:
        if q + 40 > len(f):
            return "no_nat", None
        proto, src, dst = f[q + 6], bytes(f[q + 24:q + 40]), bytes(f[q + 8:q + 24])
        qaddr = slice(q + 8, q + 24) if inward else slice(q + 24, q + 40)
        qcheck, ql4 = None, q + 40
    else:
        if q + 20 > len(f) or f[q] & 0xF != 5:
            return "no_nat", None
        proto, src, dst = f[q + 9], a16(bytes(f[q + 16:q + 20])), a16(bytes(f[q + 12:q + 16]))
        qaddr = slice(q + 12, q + 16) if inward else slice(q + 16, q + 20)
        qcheck, ql4 = q + 10, q + 20
    if ql4 + 8 > len(f):
        return "no_nat", None
    echo = proto in (IPPROTO_ICMP, IPPROTO_ICMPV6)
    qport = ql4 + 4 if echo else ql4 + (0 if inward else 2)
    ports = struct.unpack_from("!HHHH", f, ql4)
    sport, dport = (ports[2], ports[2]) if echo else (ports[1], ports[0])
    key = (port.ifindex, direction, proto, src, dst, sport, dport)
    v = inst.nat_flows.get(key)
    if v is None:
        return "no_nat", None
    # the in entry holds the guest's end, the out entry the external one
    if v.gen != nc.gen and not _nat_has(nc.fam[p.family], v.kind, dst if inward else v.addr,
                                        dport if inward else v.port):
        return "no_nat", None
    new = v.addr if v6 else v.addr[12:]
    changes = [(bytes(f[qaddr]), new)]
    if qcheck is not None:
        old = bytes(f[qcheck:qcheck + 2])
        _mend(f, qcheck, changes, False)
        changes.append((old + b"\0\0", bytes(f[qcheck:qcheck + 2]) + b"\0\0"))
    changes.append((_word(struct.unpack_from("!H", f, qport)[0]), _word(v.port)))
    struct.pack_into("!H", f, qport, v.port)
    f[qaddr] = new
    outer = (slice(38, 54) if inward else slice(22, 38)) if v6 else \
        (slice(30, 34) if inward else slice(26, 30))
    if v6:
        changes.append((bytes(f[outer]), new))
    else:
        _mend(f, 24, [(bytes(f[outer]), new)], False)
    f[outer] = new
    _mend(f, l4 + 2, changes, False)
    res.count(port.ifindex, "nat_in" if inward else "nat_out")
    return None, v.addr


def _nat_in(inst, res, port, f, p):
    """xdp_nat on an inner frame from outside the VPC to an address that is
    not the guest's own (f: a bytearray, translated in place); the drop
    reason, or None."""
    nc = port.nat
    if nc is None:
        return "no_nat"
    if not _nat_whole(p):
        return "nat_untranslatable"
    if _icmp_error(p):       # about the flow it quotes, not one of its own
        return _nat_error(inst, res, port, nc, f, p, "in")[0]
    fam = nc.fam[p.family]
    echo = is_echo(p)
    in_ = _flow_key(port, "in", p)
    v = inst.nat_flows.get(in_)
    if v is not None and v.gen != nc.gen:
        if not _nat_has(fam, v.kind, p.dst, p.dport):
            out = _nat_out_key(in_, v.addr, v.port, echo)
            if v.kind == NAT_SNAT:
                _snat_release(inst, port, p, p.dport, out)
            inst.nat_flows.pop(out, None)
            inst.nat_flows.pop(in_, None)
            v = None
        else:
            v.gen = nc.gen
    if v is not None:
        guest, guest_port = v.addr, v.port
    else:
        # a new flow, to the ephemeral or a floating IP
        kind = NAT_FLOATING if p.dst in fam.floating else \
            NAT_EPHEMERAL if fam.ephemeral is not None and fam.ephemeral == p.dst else 0
        if not kind:
            return "no_nat"
        guest, guest_port = (port.ip6 if p.family == 6 else a16(port.ip)), p.dport
        out = _nat_out_key(in_, guest, guest_port, echo)
        if out in inst.nat_flows:     # the guest's tuple leaves from another address
            return "no_nat"
        _nat_put(inst, out, p.dst, p.dport, guest, guest_port, kind, nc.gen, echo)
    why = _rewrite_in(f, p, guest, guest_port)
    if why:
        return why
    res.count(port.ifindex, "nat_in")
    return None


def _own_address(port, p):
    if p.family == 4:
        return port.ip is not None and p.dst == a16(port.ip)
    return port.ip6 is not None and p.dst == port.ip6


def set_external(inst, ifindex, ext, raw=False):
    """A port's external addresses replaced (xdectl set-external-ips): a new
    generation, the cursors at 0, and the translations the new addresses no
    longer have dropped with their flows (both directions) and SNAT ports.
    raw: the addresses written alone (nothing dropped): the datapath finds
    the stale translations by their generation."""
    port = inst.ports[ifindex]
    port.nat = nat_cfg_of(ext, ((port.nat.gen if port.nat else 0) + 1) & 0xFFFFFFFF)
    if raw:
        return
    gone = []
    for k, v in list(inst.nat_flows.items()):
        if k[0] != ifindex:
            continue
        addr, eport = (v.addr, v.port) if k[1] == "out" else (k[4], k[6])
        if _nat_has(port.nat.fam[4 if addr[:12] == V4_MAPPED else 6], v.kind, addr, eport):
            continue
        del inst.nat_flows[k]
        if k[1] == "out":
            gone.append(k)
    for k in gone:
        inst.flows.pop(k, None)
        inst.flows.pop(_reverse_key(k), None)
    for sk, o in list(inst.snat_ports.items()):
        if sk[0] == ifindex and o.flow in gone:
            del inst.snat_ports[sk]


# --- outbound (docs/design.md, "Outbound pipeline": guest -> world) --------------

def route_lookup(inst, port, p):
    """Longest prefix first in the table of the packet's family; a custom
    entry beats a system one of the same length."""
    best = None
    a = ipaddress.IPv4Address(p.dst[12:]) if p.family == 4 else ipaddress.IPv6Address(p.dst)
    for r in inst.routes.get(port.ifindex, []):
        if r.dest.version == p.family and a in r.dest:
            rank = (r.dest.prefixlen, not r.system)
            if best is None or rank > best[0]:
                best = (rank, r)
    return best[1] if best else None


def outbound(inst, ifindex, frame):
    frame = bytes(frame)
    port = inst.ports.get(ifindex)
    if port is None:
        res = Result("drop", TC_ACT_SHOT, reason="not a port")
        res.count("g", "drop_out_unknown_port")
        return res
    P = port.ifindex
    # SPEC-SILENT: tx_* count what the guest transmits into the port, every
    # frame the program sees on the port (as a NIC counts what it is given).
    res = Result("drop", TC_ACT_SHOT)
    res.count(P, "tx_packets")
    res.count(P, "tx_bytes", len(frame))
    if port.passthrough:
        res.verdict, res.retval, res.out = "underlay", TC_ACT_REDIRECT, frame
        res.count(P, "passthrough_out")
        return res
    if len(frame) < 14:
        return _drop(res, port, "malformed_inner", "runt")
    etype = struct.unpack_from("!H", frame, 12)[0]
    # 3. anti-spoofing of the source MAC applies to every frame the guest
    # sends, whatever it carries (an operator expects a foreign source MAC
    # never to be answered or forwarded)
    if frame[6:12] != port.mac:
        return _drop(res, port, "spoof", "spoof mac")
    if etype == ETH_P_ARP:
        return _out_arp(res, port, frame)
    if etype == ETH_P_IP:
        return _out4(inst, res, port, frame)
    if etype == ETH_P_IPV6:
        return _out6(inst, res, port, frame)
    # VLAN tags and the rest are not ours
    return _drop(res, port, "unsupported", f"ethertype {etype:#x}")


def _out_arp(res, port, frame):
    a = frame[14:42]
    ok = (len(a) == 28 and a[0:6] == struct.pack("!HHBB", 1, ETH_P_IP, 6, 4)
          and struct.unpack_from("!H", a, 6)[0] == 1)
    # the sender fields are the guest's own, as OPTE's gateway requires
    # SPEC-SILENT: a port without IPv4 has no address an ARP sender could
    # rightly claim, and no IPv4 gateway to answer for
    if ok and (a[8:14] != port.mac or port.ip is None or a[14:18] != port.ip):
        return _drop(res, port, "spoof", "spoof arp")
    if ok:
        tpa = a[24:28]
        # SPEC-SILENT: the guest's own address is not the gateway's to
        # answer (duplicate address detection must see silence)
        if tpa == port.gw_ip or (ipaddress.IPv4Address(tpa) in port.subnet and tpa != port.ip):
            return _hairpin(res, port, _arp_reply(frame, port, tpa), "arp_replies")
    return _drop(res, port, "arp")


def _out4(inst, res, port, frame):
    ip = parse_ip4(frame[14:])
    if ip is None:
        return _drop(res, port, "malformed_ipv4", "bad ipv4")
    p = ip.pkt()
    # the gateway's DHCPv4 server, before anti-spoofing: a client asking
    # for an address has none yet
    if ip.proto == IPPROTO_UDP and p.has_l4 and p.dport == 67 and ip.dst in (BCAST4, port.gw_ip):
        return _dhcp4(res, port, ip)
    # anti-spoofing, part 2
    if port.ip is None or ip.src != port.ip:
        return _drop(res, port, "spoof", "spoof")
    # gateway echo to the gateway IP (only a whole datagram carries an ICMP
    # header the gateway can answer: a fragment is not an echo request)
    if ip.dst == port.gw_ip and ip.proto == IPPROTO_ICMP and not ip.fragmented \
            and len(ip.l4) >= 8 and ip.l4[0] == 8 and ip.l4[1] == 0:
        return _hairpin(res, port, _echo_reply(frame, ip, port), "icmp_replies")
    # firewall
    if not firewall(inst, res, port, "out", p, port.vni, len(frame)):
        return _drop(res, port, "firewall")
    # MTU (checked before routing, so the guest learns it whatever the
    # destination): larger than the port MTU is dropped (counted), and with
    # DF the guest gets "fragmentation needed" back, never a silent drop
    if ip.total > port.mtu:
        res.reason = "mtu"
        res.count(port.ifindex, "drop_out_mtu")
        if ip.df:
            eth, hdr, icmp = _frag_needed(frame, ip, port)
            res.verdict, res.retval = "hairpin", TC_ACT_REDIRECT
            res.encap = {"frag_needed": (eth, hdr, icmp)}
            res.count(port.ifindex, "mtu_icmp_sent")
        return res
    return _route_out(inst, res, port, frame, p, ip.tos)


def _out6(inst, res, port, frame):
    ip6 = parse_ip6(frame[14:])
    if ip6 is None:
        return _drop(res, port, "malformed_ipv6", "bad ipv6")
    p = ip6.pkt()
    # link-local, multicast and neighbour discovery stay on the port's link:
    # the gateway answers what it serves and drops the rest
    if link_scoped(ip6.src) or link_scoped(ip6.dst) or is_ndp(p):
        return _gateway6(res, port, frame, ip6, p)
    if port.ip6 is None or ip6.src != port.ip6:
        return _drop(res, port, "spoof", "spoof6")
    if not firewall(inst, res, port, "out", p, port.vni, len(frame)):
        return _drop(res, port, "firewall")
    # MTU: IPv6 is never fragmented on the way, so too big is always
    # answered with Packet Too Big (RFC 8201), unless the packet is too
    # short to quote 128 bytes of
    if ip6.total > port.mtu:
        res.reason = "mtu"
        res.count(port.ifindex, "drop_out_mtu")
        if ip6.total >= ICMP6_QUOTE:
            res.verdict, res.retval = "hairpin", TC_ACT_REDIRECT
            res.out = _packet_too_big(frame, ip6, port)
            res.count(port.ifindex, "mtu_icmp_sent")
        return res
    return _route_out(inst, res, port, frame, p, ip6.tc)


def _route_out(inst, res, port, frame, p, tos):
    """Router, V2P and the overlay (or same-host delivery)."""
    P = port.ifindex
    r = route_lookup(inst, port, p)
    if r is None:
        return _drop(res, port, "no_route", "no route")
    if r.target == "drop":
        return _drop(res, port, "router", "router drop")
    if r.target == "ig":
        # NAT (tc_nat): the frame leaves from the port's external address
        why, frame, p = _nat_out(inst, res, port, frame, p)
        if why:
            return _drop(res, port, why, f"nat: {why}")
        vni, inner_mac, dst6 = port.bsvc_vni, BSVC_MAC, port.bsvc_addr
    else:
        look = p.dst if r.target in ("sub4", "sub6") else r.addr
        m = inst.v2p.get((port.vni, look))
        if m is None:
            return _drop(res, port, "no_v2p", "no v2p")
        vni, (inner_mac, dst6) = port.vni, m
    inner = inner_mac + frame[6:]
    # same host (docs/design.md, "Same-host delivery"): straight into the
    # local port, as if decapsulated
    if dst6 == inst.underlay_addr:
        target = inst.port_by(vni, inner_mac)
        if target is None:
            return _drop(res, port, "no_port_local", "no local port")
        # as if it came off the wire: a family the port does not have is
        # not its guest's
        if not _has_family(target, p.family):
            res.verdict, res.retval, res.reason = "drop", TC_ACT_SHOT, "family"
            res.count(target.ifindex, "drop_in_unsupported")
            return res
        # nothing is encapsulated: no encap/decap counted
        return _deliver(inst, res, target, inner, p, vni, tc=True)
    res.verdict, res.retval = "underlay", TC_ACT_REDIRECT
    res.count(P, "encap")
    res.encap = {"inner": inner, "vni": vni, "dst": dst6, "src": inst.underlay_addr,
                 "tc": tos}
    if inst.hash_seed is not None:
        h = flow_hash(p, inst.hash_seed)
        res.encap["label"] = h & 0xFFFFF or 1        # never 0: "unlabelled"
        res.encap["sport"] = 0xC000 | ((h >> 16) & 0x3FFF)
    return res


# --- inbound (docs/design.md, "Inbound pipeline": world -> guest) ----------------

def _has_family(port, family):
    return (port.ip if family == 4 else port.ip6) is not None


def _deliver(inst, res, port, inner, p, vni, tc=False):
    """Inbound steps 6 and 7: firewall, then the inner frame, with the gateway
    MAC as its source, into the port."""
    P = port.ifindex
    if p is not None and not firewall(inst, res, port, "in", p, vni, len(inner)):
        res.verdict, res.retval = "drop", TC_ACT_SHOT if tc else XDP_DROP
        res.reason = "firewall"
        res.count(P, "drop_in_firewall")
        return res
    out = inner[:6] + port.gw_mac + inner[12:]
    res.verdict, res.port, res.out = "port", P, out
    res.retval = TC_ACT_REDIRECT if tc else XDP_REDIRECT
    if not tc:
        res.count(P, "decap")
    res.count(P, "rx_packets")
    res.count(P, "rx_bytes", len(out))
    return res


def _pass(res):
    res.verdict, res.retval = "pass", XDP_PASS
    res.count("g", "passed_to_host")
    return res


def _malformed(res, kind):
    res.verdict, res.retval, res.reason = "drop", XDP_DROP, kind
    res.count("g", kind)
    return res


def _drop_in(res, port, reason, why=""):
    res.verdict, res.retval, res.reason = "drop", XDP_DROP, why or reason
    res.count(port.ifindex, f"drop_in_{reason}")
    return res


def inbound(inst, frame, res=None, passes=0):
    """passes: how often NAT sent the frame round the pipeline already."""
    frame = bytes(frame)
    res = res or Result("pass", XDP_PASS)
    # 1. not Geneve for us: pass, untouched
    if len(frame) < 14 + 40 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IPV6:
        return _pass(res)
    ip6 = frame[14:54]
    if ip6[0] >> 4 != 6 or ip6[6] != IPPROTO_UDP or ip6[24:40] != inst.underlay_addr:
        return _pass(res)
    if len(frame) < 54 + 8 or struct.unpack_from("!H", frame, 56)[0] != GENEVE_PORT:
        return _pass(res)
    # 2. Geneve for us from here: malformed is a drop, counted by kind
    plen = struct.unpack_from("!H", ip6, 4)[0]
    if 54 + plen > len(frame):
        return _malformed(res, "drop_in_malformed_truncated")
    ulen = struct.unpack_from("!H", frame, 58)[0]
    if ulen < 8 or ulen > plen:
        return _malformed(res, "drop_in_malformed_truncated")
    end = 54 + ulen
    g = frame[62:end]
    if len(g) < 8:
        return _malformed(res, "drop_in_malformed_truncated")
    if g[0] >> 6 != 0:
        return _malformed(res, "drop_in_malformed_version")
    # SPEC-SILENT: a frame wrong in several ways is counted by the first
    # check it fails, in this order: version, protocol, options
    if struct.unpack_from("!H", g, 2)[0] != ETH_P_TEB:
        return _malformed(res, "drop_in_malformed_protocol")
    optlen = (g[0] & 0x3F) * 4
    # the options, in order: each must lie inside both the options area the
    # header declares and the packet ("option length past the packet")
    area = min(8 + optlen, len(g))
    off, external = 8, False
    while off < 8 + optlen:
        if off + 4 > area:
            return _malformed(res, "drop_in_malformed_options")
        cls, typ, ln = struct.unpack_from("!HBB", g, off)
        body = (ln & 0x1F) * 4
        if off + 4 + body > area:
            return _malformed(res, "drop_in_malformed_options")
        known = cls == OXIDE_CLASS and (typ & 0x7F) in OXIDE_TYPES
        if not known and typ & 0x80:
            return _malformed(res, "drop_in_malformed_critical_option")
        if known and (typ & 0x7F) == 0x00:
            external = True
        off += 4 + body
    vni = int.from_bytes(g[4:7], "big")
    inner = g[8 + optlen:]
    if len(inner) < 14:
        return _malformed(res, "drop_in_malformed_inner")
    ietype = struct.unpack_from("!H", inner, 12)[0]
    # 3. ARP never crosses the overlay; 4. port by (VNI, inner destination MAC)
    if ietype == ETH_P_ARP:
        res.verdict, res.retval = "drop", XDP_DROP
        res.count("g", "drop_in_arp_in_geneve")
        return res
    port = inst.port_by(vni, inner[:6])
    if port is None:
        res.verdict, res.retval = "drop", XDP_DROP
        res.count("g", "drop_in_no_port")
        return res
    # 5. the inner frame must be IPv4 or IPv6, of a family the port has
    if ietype not in (ETH_P_IP, ETH_P_IPV6) or not _has_family(port, 4 if ietype == ETH_P_IP
                                                                 else 6):
        return _drop_in(res, port, "unsupported", "inner not IP, or not the port's family")
    if ietype == ETH_P_IP:
        ip = parse_ip4(inner[14:])
        if ip is None:
            return _drop_in(res, port, "malformed_ipv4", "inner not IPv4")
        p = ip.pkt()
    elif ietype == ETH_P_IPV6:
        ip6 = parse_ip6(inner[14:])
        if ip6 is None:
            return _drop_in(res, port, "malformed_ipv6", "inner not IPv6")
        p = ip6.pkt()
        # neighbour discovery and link-scoped traffic never cross the
        # gateway: the guest's link ends at it
        if is_ndp(p):
            return _drop_in(res, port, "ndp", "ndp from the overlay")
        if link_scoped(ip6.src) or link_scoped(ip6.dst):
            return _drop_in(res, port, "link_local", "link-scoped from the overlay")
    # from outside the VPC to an address that is not the guest's own: NAT
    # gives the guest's (xdp_nat), then the pipeline runs again from the start
    if external and not _own_address(port, p):
        f = bytearray(inner)
        why = _nat_in(inst, res, port, f, p)
        if why:
            return _drop_in(res, port, why, f"nat: {why}")
        if passes + 1 >= NAT_PASSES_MAX:
            return _drop_in(res, port, "tail_call", "nat: round and round")
        return inbound(inst, frame[:62 + 8 + optlen] + bytes(f), res, passes + 1)
    # 6. firewall (External: from outside the VPC, matches no vni= filter),
    # then 7. delivery
    return _deliver(inst, res, port, inner, p, VNI_EXTERNAL if external else vni)
