"""A reference model of the xde datapath, written from the specification,
docs/design.md ("The datapath", "Firewall and flow table",
"Counters and drop reasons"), not from the C in bpf/.

Given one instance's state (underlay address, ports, V2P, routes, firewall
rules, flows) and a frame arriving either from a port's guest ("out", the
TC program on the port's datapath end) or from an underlay NIC ("in", the
XDP program), `outbound()` / `inbound()` return a Result: the verdict, the
counter deltas by name, and the output frame where it is determined.

Where docs/design.md is silent the model follows the spec's intent (what an
operator of a production overlay would expect); each such decision is
marked "SPEC-SILENT" with the reasoning, so a disagreement with the
datapath can be judged.
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
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
VNI_EXTERNAL = None           # a frame from outside the VPC matches no vni= filter


def mac_bytes_of(s):
    return bytes.fromhex(s.replace(":", ""))


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
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
    ip: bytes                 # 4 bytes
    gw_ip: bytes
    vni: int
    bsvc_vni: int
    bsvc_addr: bytes          # 16 bytes
    subnet: ipaddress.IPv4Network
    mtu: int
    passthrough: bool = False


@dataclass
class Route:
    dest: ipaddress.IPv4Network
    target: str               # drop | ig | ip4 | sub4
    addr: bytes = b"\0" * 4   # ip4: next hop
    length: int = 0
    system: bool = False


@dataclass
class FwRule:
    id: int
    priority: int
    action: str               # allow | deny
    proto: int = 0            # 0 any, IPPROTO_*, 0xfe arp
    host: bytes = b"\0" * 4
    host_mask: bytes = b"\0" * 4
    vni: int = 0
    vni_mask: int = 0
    icmp: int = 0
    icmp_mask: int = 0
    ports: list = field(default_factory=list)


@dataclass
class Instance:
    underlay_addr: bytes
    ports: dict = field(default_factory=dict)     # ifindex -> Port
    v2p: dict = field(default_factory=dict)       # (vni, ip4 bytes) -> (mac, underlay)
    routes: dict = field(default_factory=dict)    # ifindex -> [Route]
    rules: dict = field(default_factory=dict)     # (ifindex, 'in'|'out') -> [FwRule]
    flows: dict = field(default_factory=dict)     # (ifindex, dir, proto, src, dst, sport, dport) -> verdict

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
    `encap` holds the inner frame and outer fields; the outer MACs, flow
    label and UDP source port come from the kernel and are checked for
    range and consistency only.
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


# --- parsing helpers -------------------------------------------------------------

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


def l4_tuple(ip):
    """(sport, dport, icmp type, icmp code, tcp flags) of a packet, what the
    firewall and flow table see; None when the L4 header is not there."""
    if ip.frag:
        return None
    p = ip.l4
    if ip.proto in (IPPROTO_TCP, IPPROTO_UDP):
        need = 20 if ip.proto == IPPROTO_TCP else 8
        if len(p) < need:
            return None
        sport, dport = struct.unpack_from("!HH", p)
        flags = p[13] if ip.proto == IPPROTO_TCP else 0
        return sport, dport, 0, 0, flags
    if ip.proto == IPPROTO_ICMP:
        if len(p) < 8:
            return None
        ident = struct.unpack_from("!H", p, 4)[0] if p[0] in (0, 8) else 0
        return ident, ident if p[0] in (0, 8) else 0, p[0], p[1], 0
    return 0, 0, 0, 0, 0


# --- firewall (docs/design.md, "Firewall and flow table") ------------------------

def _rule_matches(r, ip, t, remote, vni):
    if r.proto == 0xFE:                       # arp: never an IPv4 packet
        return False
    if r.proto and r.proto != ip.proto:
        return False
    hm = int.from_bytes(r.host_mask, "big")
    if hm and int.from_bytes(remote, "big") & hm != int.from_bytes(r.host, "big") & hm:
        return False
    if r.vni_mask and (vni is VNI_EXTERNAL or vni != r.vni):
        return False
    if r.icmp_mask:
        if ip.proto != IPPROTO_ICMP:
            return False
        if ((t[2] << 8) | t[3]) & r.icmp_mask != r.icmp & r.icmp_mask:
            return False
    if r.ports:
        # the port list names the local service: the destination port of
        # the packet (OPTE's `ports`); port 0 is never a real port
        if ip.proto not in (IPPROTO_TCP, IPPROTO_UDP) or t[1] == 0 or t[1] not in r.ports:
            return False
    return True


def firewall(inst, res, port, direction, ip, vni):
    """True when the packet may pass (docs/design.md,
    "Firewall and flow table"). Counts flow hits/misses and the verdict. The
    flow table is keyed by (port, direction, protocol, addresses, ports or
    ICMP id)."""
    t = l4_tuple(ip) or (0, 0, 0, 0, 0)
    key = (port.ifindex, direction, ip.proto, ip.src, ip.dst, t[0], t[1])
    hit = inst.flows.get(key)
    if hit is not None:
        res.count(port.ifindex, "flow_hits")
        return hit
    res.count(port.ifindex, "flow_misses")
    remote = ip.dst if direction == "out" else ip.src
    verdict = None
    for r in inst.rules.get((port.ifindex, direction), []):
        if _rule_matches(r, ip, t, remote, vni):
            verdict = r.action == "allow"
            break
    if verdict is None:
        verdict = direction == "out"          # default: out stateful allow, in deny
    res.count(port.ifindex, "fw_allowed" if verdict else "fw_denied")
    if verdict:
        # stateful: this direction and the reply's
        inst.flows[key] = True
        rdir = "in" if direction == "out" else "out"
        inst.flows[(port.ifindex, rdir, ip.proto, ip.dst, ip.src, t[1], t[0])] = True
    return verdict


# --- outbound (docs/design.md, "Outbound pipeline": guest -> world) --------------

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
    out[ipo + 12:ipo + 16], out[ipo + 16:ipo + 20] = ip.dst, ip.src
    out[ipo + 10:ipo + 12] = b"\0\0"
    out[ipo + 10:ipo + 12] = struct.pack("!H", csum(bytes(out[ipo:ipo + ip.ihl])))
    icmp = ipo + ip.ihl
    out[icmp] = 0
    # the checksum updated for the changed word (RFC 1624, eqn. 3): a valid
    # request gives a valid reply
    old = struct.unpack_from("!H", frame, icmp + 2)[0]
    m, m2 = struct.unpack_from("!H", frame, icmp)[0], struct.unpack_from("!H", out, icmp)[0]
    s = (~old & 0xFFFF) + (~m & 0xFFFF) + m2
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    out[icmp + 2:icmp + 4] = struct.pack("!H", ~s & 0xFFFF)
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


def route_lookup(inst, port, dst):
    """Longest prefix first; a custom entry beats a system one of the same length."""
    best = None
    a = ipaddress.IPv4Address(dst)
    for r in inst.routes.get(port.ifindex, []):
        if a in r.dest:
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
        res.reason = "runt"
        res.count(P, "drop_out_malformed_inner")
        return res
    etype = struct.unpack_from("!H", frame, 12)[0]
    # 3. anti-spoofing of the source MAC applies to every frame the guest
    # sends, whatever it carries (an operator expects a foreign source MAC
    # never to be answered or forwarded)
    if frame[6:12] != port.mac:
        res.reason = "spoof mac"
        res.count(P, "drop_out_spoof")
        return res

    # 4. gateway: ARP
    if etype == ETH_P_ARP:
        a = frame[14:42]
        ok = (len(a) == 28 and a[0:6] == struct.pack("!HHBB", 1, ETH_P_IP, 6, 4)
              and struct.unpack_from("!H", a, 6)[0] == 1)
        # the sender fields are the guest's own, as OPTE's gateway requires
        if ok and (a[8:14] != port.mac or a[14:18] != port.ip):
            res.reason = "spoof arp"
            res.count(P, "drop_out_spoof")
            return res
        if ok:
            tpa = a[24:28]
            # SPEC-SILENT: the guest's own address is not the gateway's to
            # answer (duplicate address detection must see silence)
            if tpa == port.gw_ip or (ipaddress.IPv4Address(tpa) in port.subnet and tpa != port.ip):
                res.verdict, res.retval = "hairpin", TC_ACT_REDIRECT
                res.out = _arp_reply(frame, port, tpa)
                res.count(P, "arp_replies")
                return res
        res.reason = "arp"
        res.count(P, "drop_out_arp")
        return res
    if etype != ETH_P_IP:
        # IPv4 only (the IPv6 overlay comes later); VLAN tags are not ours
        res.reason = f"ethertype {etype:#x}"
        res.count(P, "drop_out_unsupported")
        return res
    ip = parse_ip4(frame[14:])
    if ip is None:
        res.reason = "bad ipv4"
        res.count(P, "drop_out_malformed_ipv4")
        return res
    # 6. gateway: echo to the gateway IP (only a whole datagram carries an
    # ICMP header the gateway can answer: a fragment is not an echo request)
    if ip.dst == port.gw_ip and ip.proto == IPPROTO_ICMP and not ip.fragmented \
            and len(ip.l4) >= 8 and ip.l4[0] == 8 and ip.l4[1] == 0:
        # 5. anti-spoofing applies to what the gateway answers, too
        if ip.src != port.ip:
            res.reason = "spoof"
            res.count(P, "drop_out_spoof")
            return res
        res.verdict, res.retval = "hairpin", TC_ACT_REDIRECT
        res.out = _echo_reply(frame, ip, port)
        res.count(P, "icmp_replies")
        return res
    # 5. anti-spoofing
    if ip.src != port.ip:
        res.reason = "spoof"
        res.count(P, "drop_out_spoof")
        return res
    # 7. firewall
    if not firewall(inst, res, port, "out", ip, port.vni):
        res.reason = "firewall"
        res.count(P, "drop_out_firewall")
        return res
    # 8. MTU (checked before routing, so the guest learns it whatever the
    # destination): larger than the port MTU is dropped (counted), and with
    # DF the guest gets "fragmentation needed" back, never a silent drop
    if ip.total > port.mtu:
        res.reason = "mtu"
        res.count(P, "drop_out_mtu")
        if ip.df:
            eth, hdr, icmp = _frag_needed(frame, ip, port)
            res.verdict, res.retval = "hairpin", TC_ACT_REDIRECT
            res.encap = {"frag_needed": (eth, hdr, icmp)}
            res.count(P, "mtu_icmp_sent")
        return res
    # 9. router
    r = route_lookup(inst, port, ip.dst)
    if r is None:
        res.reason = "no route"
        res.count(P, "drop_out_no_route")
        return res
    if r.target == "drop":
        res.reason = "router drop"
        res.count(P, "drop_out_router")
        return res
    if r.target == "ig":
        vni, inner_mac, dst6 = port.bsvc_vni, BSVC_MAC, port.bsvc_addr
    else:
        look = ip.dst if r.target == "sub4" else r.addr
        m = inst.v2p.get((port.vni, look))
        if m is None:
            res.reason = "no v2p"
            res.count(P, "drop_out_no_v2p")
            return res
        vni, (inner_mac, dst6) = port.vni, m
    inner = inner_mac + frame[6:]
    # same host (docs/design.md, "Same-host delivery"): straight into the
    # local port, as if decapsulated
    if dst6 == inst.underlay_addr:
        target = inst.port_by(vni, inner_mac)
        if target is None:
            res.reason = "no local port"
            res.count(P, "drop_out_no_port_local")
            return res
        # nothing is encapsulated: no encap/decap counted
        return _deliver(inst, res, target, inner, ip, vni, tc=True)
    res.verdict, res.retval = "underlay", TC_ACT_REDIRECT
    res.count(P, "encap")
    res.encap = {"inner": inner, "vni": vni, "dst": dst6, "src": inst.underlay_addr,
                 "tc": ip.tos}
    return res


# --- inbound (docs/design.md, "Inbound pipeline": world -> guest) ----------------

def _deliver(inst, res, port, inner, ip, vni, tc=False):
    """Inbound steps 6 and 7: firewall, then the inner frame, with the gateway
    MAC as its source, into the port."""
    P = port.ifindex
    if ip is not None and not firewall(inst, res, port, "in", ip, vni):
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


def inbound(inst, frame):
    frame = bytes(frame)
    res = Result("pass", XDP_PASS)
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
    P = port.ifindex
    # 5. the inner frame must be IPv4
    ip = parse_ip4(inner[14:]) if ietype == ETH_P_IP else None
    if ip is None:
        res.verdict, res.retval, res.reason = "drop", XDP_DROP, "inner not IPv4"
        res.count(P, "drop_in_malformed_ipv4" if ietype == ETH_P_IP else "drop_in_unsupported")
        return res
    # 6. firewall (External: from outside the VPC, matches no vni= filter),
    # then 7. delivery
    return _deliver(inst, res, port, inner, ip, VNI_EXTERNAL if external else vni)
