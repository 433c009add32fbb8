"""The gateway's replies as frame templates (bpf/gw_reply.h is the contract).

The virtual gateway answers a guest's DHCPv4, router solicitations,
neighbour solicitations for the gateway and DHCPv6 in the datapath. All of a
reply that depends only on the port is known when the port is made, so this
module builds each reply once, as a whole Ethernet frame: source MAC the
gateway's, checksum fields zero, every field the datapath fills in from the
request (transaction ids, message types, flags, the destination address) at
the GW_OFF_* offsets. The datapath copies the template, patches those fields,
appends what it must echo (the DHCPv6 client identifier) and computes the
lengths it grew and every checksum.

What a guest is told (DNS servers, host name, domain) lives nowhere but in
these templates: settings() reads it back from them.
"""
import ipaddress
import re
import struct
from types import SimpleNamespace

from . import abi
from .errors import XdeError

LEASE_S = 86400          # DHCPv4 lease, as OPTE gives it (no T1/T2)
RA_LIFETIME_S = 9000     # router lifetime, the largest RFC 4861 allows
RA_CUR_HOP_LIMIT = 64
RA_FLAG_MANAGED = 0x80   # M=1 (addresses from DHCPv6), O=0
NA_FLAGS = 0xE0          # R|S|O; the datapath clears S for a solicitation from ::
INFINITE = 0xFFFFFFFF    # DHCPv6 lifetimes, T1 and T2
MAX_DNS = 3              # DNS servers per address family
BOOTP_MIN = 300          # RFC 1542: a BOOTP message is at least 300 bytes
DHCP_MAGIC = bytes((99, 130, 83, 99))

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPPROTO_UDP, IPPROTO_ICMPV6 = 17, 58
ETH_LEN, IP4_LEN, IP6_LEN, UDP_LEN = 14, 20, 40, 8
BOOTP_FIXED = 236        # op .. file, before the magic cookie
DHCP4_OPTS = ETH_LEN + IP4_LEN + UDP_LEN + BOOTP_FIXED + 4
DHCP6_MSG = ETH_LEN + IP6_LEN + UDP_LEN
DHCP6_OPTS = DHCP6_MSG + 4

# DHCPv4 options
O4_PAD, O4_MASK, O4_ROUTER, O4_DNS, O4_HOSTNAME, O4_DOMAIN = 0, 1, 3, 6, 12, 15
O4_LEASE, O4_TYPE, O4_SERVER_ID, O4_ROUTES, O4_END = 51, 53, 54, 121, 255
# DHCPv6 options
O6_SERVERID, O6_IA_NA, O6_IAADDR, O6_STATUS = 2, 3, 5, 13
O6_DNS, O6_DOMAINS = 23, 24
DHCP6_REPLY = 7
DUID_LL, HWTYPE_ETHER = 3, 1
STATUS_SUCCESS = 0
# ICMPv6
ND_RA, ND_NA = 134, 136
ND_OPT_SLLA, ND_OPT_TLLA, ND_OPT_MTU = 1, 2, 5

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DUMMY = dict(mac="02:00:00:00:00:01", gw_mac="02:00:00:00:00:02", ip="192.0.2.2",
              gw_ip="192.0.2.1", ip6="2001:db8::2", mtu=1500)


def _mac(s):
    octets = bytes(int(x, 16) for x in s.split(":"))
    if len(octets) != 6:
        raise XdeError(f"MAC {s!r} is not six octets")
    return octets


def gateway_ll(gw_mac):
    """The gateway's IPv6 address: the EUI-64 link-local address of its MAC
    (U/L bit flipped, ff:fe in the middle)."""
    m = _mac(gw_mac)
    iid = bytes((m[0] ^ 0x02,)) + m[1:3] + b"\xff\xfe" + m[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))


# --- headers (checksums zero: the datapath computes them) -------------------

def _eth(dst, src, proto):
    return _mac(dst) + _mac(src) + struct.pack("!H", proto)


def _ip4(src, dst, payload_len):
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, IP4_LEN + payload_len, 0, 0, 64, IPPROTO_UDP,
                       0, ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)


def _ip6(src, nexthdr, payload_len):
    """Destination :: (the datapath writes the requester's)."""
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, nexthdr, 255,
                       ipaddress.IPv6Address(src).packed, bytes(16))


def _udp(sport, dport, payload_len):
    return struct.pack("!HHHH", sport, dport, UDP_LEN + payload_len, 0)


# --- what the operator gives -----------------------------------------------

def _families(dns):
    """(IPv4 servers, IPv6 servers) as ipaddress objects, each in the given
    order."""
    addrs = [ipaddress.ip_address(a) for a in dns or ()]
    return [a for a in addrs if a.version == 4], [a for a in addrs if a.version == 6]


def _domain(domain):
    """The domain without a trailing dot, or None."""
    if domain is None:
        return None
    return domain[:-1] if domain.endswith(".") else domain


def _dns_wire(name):
    out = b""
    for label in name.split("."):
        out += bytes((len(label),)) + label.encode("ascii")
    return out + b"\0"


# --- the templates ---------------------------------------------------------

def _dhcp4_options(g, dns4, hostname, domain):
    gw = ipaddress.IPv4Address(g.gw_ip).packed
    routes = (bytes((32,)) + gw + bytes(4)      # the gateway itself, on-link
              + bytes((0,)) + gw)               # default route via the gateway
    opts = [
        (O4_TYPE, b"\0"),                       # first: GW_OFF_DHCP4_TYPE
        (O4_SERVER_ID, gw),
        (O4_LEASE, struct.pack("!I", LEASE_S)),
        (O4_MASK, bytes((255,)) * 4),
        (O4_ROUTER, gw),
        (O4_ROUTES, routes),
    ]
    if dns4:
        opts.append((O4_DNS, b"".join(a.packed for a in dns4)))
    if hostname:
        opts.append((O4_HOSTNAME, hostname.encode("ascii")))
    if domain:
        opts.append((O4_DOMAIN, domain.encode("ascii")))
    return b"".join(bytes((code, len(v))) + v for code, v in opts) + bytes((O4_END,))


def _dhcp4(g, dns4, hostname, domain):
    ip, gw_ip = ipaddress.IPv4Address(g.ip).packed, ipaddress.IPv4Address(g.gw_ip).packed
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 2, 1, 6, 0, 0, 0, 0,
                        bytes(4), ip, gw_ip, bytes(4), _mac(g.mac), b"", b"")
    bootp += DHCP_MAGIC + _dhcp4_options(g, dns4, hostname, domain)
    bootp += bytes(max(0, BOOTP_MIN - len(bootp)))
    udp = _udp(67, 68, len(bootp))
    return (_eth(g.mac, g.gw_mac, ETH_P_IP) + _ip4(g.gw_ip, g.ip, len(udp) + len(bootp))
            + udp + bootp)


def _icmp6(g, icmp):
    return _eth(g.mac, g.gw_mac, ETH_P_IPV6) + _ip6(gateway_ll(g.gw_mac), IPPROTO_ICMPV6,
                                                    len(icmp)) + icmp


def _ra(g):
    icmp = struct.pack("!BBHBBHII", ND_RA, 0, 0, RA_CUR_HOP_LIMIT, RA_FLAG_MANAGED,
                       RA_LIFETIME_S, 0, 0)
    icmp += bytes((ND_OPT_SLLA, 1)) + _mac(g.gw_mac)
    icmp += struct.pack("!BBHI", ND_OPT_MTU, 1, 0, g.mtu)
    return _icmp6(g, icmp)


def _na(g):
    icmp = struct.pack("!BBHB3x16s", ND_NA, 0, 0, NA_FLAGS,
                       ipaddress.IPv6Address(gateway_ll(g.gw_mac)).packed)
    icmp += bytes((ND_OPT_TLLA, 1)) + _mac(g.gw_mac)
    return _icmp6(g, icmp)


def _opt6(code, value):
    return struct.pack("!HH", code, len(value)) + value


def _dhcp6_frame(g, msg):
    udp = _udp(547, 546, len(msg))
    return (_eth(g.mac, g.gw_mac, ETH_P_IPV6)
            + _ip6(gateway_ll(g.gw_mac), IPPROTO_UDP, len(udp) + len(msg)) + udp + msg)


def _server_id(g):
    return _opt6(O6_SERVERID, struct.pack("!HH", DUID_LL, HWTYPE_ETHER) + _mac(g.gw_mac))


def _dhcp6(g, dns6, domain):
    iaaddr = _opt6(O6_IAADDR, ipaddress.IPv6Address(g.ip6).packed
                   + struct.pack("!II", INFINITE, INFINITE))
    msg = bytes(4)                              # type, transaction id: GW_OFF_DHCP6_TYPE
    msg += _server_id(g)                        # first: GW_OFF_DHCP6_IAID follows it
    msg += _opt6(O6_IA_NA, struct.pack("!III", 0, INFINITE, INFINITE) + iaaddr)
    if dns6:
        msg += _opt6(O6_DNS, b"".join(a.packed for a in dns6))
    if domain:
        msg += _opt6(O6_DOMAINS, _dns_wire(domain))
    return _dhcp6_frame(g, msg)


def _dhcp6_status(g):
    msg = bytes((DHCP6_REPLY, 0, 0, 0)) + _server_id(g)
    msg += _opt6(O6_STATUS, struct.pack("!H", STATUS_SUCCESS))
    return _dhcp6_frame(g, msg)


def _build(g):
    dns4, dns6 = _families(getattr(g, "dns", None))
    hostname = getattr(g, "hostname", None) or None
    domain = _domain(getattr(g, "domain", None)) or None
    out = {}
    if g.ip:
        out[abi.GW_DHCP4] = _dhcp4(g, dns4, hostname, domain)
    if getattr(g, "ip6", None):
        out[abi.GW_RA] = _ra(g)
        out[abi.GW_NA] = _na(g)
        out[abi.GW_DHCP6] = _dhcp6(g, dns6, domain)
        out[abi.GW_DHCP6_STATUS] = _dhcp6_status(g)
    return out


_KIND_NAMES = {abi.GW_DHCP4: "DHCPv4 reply", abi.GW_RA: "router advertisement",
               abi.GW_NA: "neighbour advertisement", abi.GW_DHCP6: "DHCPv6 reply",
               abi.GW_DHCP6_STATUS: "DHCPv6 reply to Confirm"}


def _fit(tmpls):
    for kind, frame in tmpls.items():
        if len(frame) > abi.GW_TMPL_MAX:
            raise XdeError(
                f"--dns/--hostname/--domain make the gateway's {_KIND_NAMES[kind]} {len(frame)} "
                f"bytes, more than the {abi.GW_TMPL_MAX} the datapath holds: use a shorter "
                f"domain or host name, or fewer DNS servers")


def templates(g):
    """{enum gw_reply kind: frame} for a port. g has mac, gw_mac, ip, gw_ip,
    ip6, mtu, dns, hostname, domain. DHCPv4 only with an IPv4 address; RA,
    NA and the DHCPv6 replies only with an IPv6 address. XdeError (one line)
    if the operator's settings are refused (see check())."""
    families = tuple(v for v, a in ((4, g.ip), (6, getattr(g, "ip6", None))) if a)
    check(getattr(g, "dns", None), getattr(g, "hostname", None), getattr(g, "domain", None),
          families)
    out = _build(g)
    _fit(out)
    return out


# --- reading back ----------------------------------------------------------

def _malformed(what):
    return XdeError(f"gateway template ({what}) is malformed; rewrite it with set-gateway")


def _dhcp4_read(frame):
    opts, i = {}, DHCP4_OPTS
    while True:
        if i >= len(frame):
            raise _malformed("DHCPv4: no end option")
        code = frame[i]
        if code == O4_END:
            return opts
        if code == O4_PAD:
            i += 1
            continue
        if i + 2 > len(frame) or i + 2 + frame[i + 1] > len(frame):
            raise _malformed(f"DHCPv4 option {code}")
        opts[code] = bytes(frame[i + 2:i + 2 + frame[i + 1]])
        i += 2 + frame[i + 1]


def _dhcp6_read(frame):
    if len(frame) < DHCP6_OPTS:
        raise _malformed("DHCPv6: shorter than its headers")
    end = DHCP6_MSG + struct.unpack_from("!H", frame, ETH_LEN + IP6_LEN + 4)[0] - UDP_LEN
    if end > len(frame):
        raise _malformed("DHCPv6 length")
    opts, i = {}, DHCP6_OPTS
    while i < end:
        if i + 4 > end:
            raise _malformed("DHCPv6 option header")
        code, n = struct.unpack_from("!HH", frame, i)
        if i + 4 + n > end:
            raise _malformed(f"DHCPv6 option {code}")
        opts[code] = bytes(frame[i + 4:i + 4 + n])
        i += 4 + n
    return opts


def _names(wire):
    """The names of a DNS wire-format list (no compression)."""
    names, labels, i = [], [], 0
    while i < len(wire):
        n = wire[i]
        if n == 0:
            names.append(".".join(labels))
            labels = []
        elif n > 63 or i + 1 + n > len(wire):
            raise _malformed("DHCPv6 domain list")
        else:
            labels.append(_text(wire[i + 1:i + 1 + n], "DHCPv6 domain list"))
        i += 1 + n
    if labels:
        raise _malformed("DHCPv6 domain list")
    return names


def _addrs(raw, size):
    if len(raw) % size:
        raise _malformed("DNS servers")
    return [str(ipaddress.ip_address(raw[i:i + size])) for i in range(0, len(raw), size)]


def _text(raw, what):
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise _malformed(what) from None


def settings(tmpls):
    """What the guest is told, read back from a port's templates:
    {"dns": [IPv4 servers..., IPv6 servers...], "hostname": str|None,
    "domain": str|None}. IPv4 servers and the host name come from the
    DHCPv4 reply, IPv6 servers from the DHCPv6 one, the domain from either.
    XdeError (one line) for a template that cannot be read."""
    dns4, dns6, hostname, domain = [], [], None, None
    if abi.GW_DHCP4 in tmpls:
        o = _dhcp4_read(bytes(tmpls[abi.GW_DHCP4]))
        dns4 = _addrs(o.get(O4_DNS, b""), 4)
        hostname = _text(o[O4_HOSTNAME], "DHCPv4 host name") if O4_HOSTNAME in o else None
        domain = _text(o[O4_DOMAIN], "DHCPv4 domain") if O4_DOMAIN in o else None
    if abi.GW_DHCP6 in tmpls:
        o = _dhcp6_read(bytes(tmpls[abi.GW_DHCP6]))
        dns6 = _addrs(o.get(O6_DNS, b""), 16)
        if domain is None and O6_DOMAINS in o:
            domain = (_names(o[O6_DOMAINS]) or [None])[0]
    return {"dns": dns4 + dns6, "hostname": hostname, "domain": domain}


# --- validation ------------------------------------------------------------

def check(dns, hostname, domain, families=(4, 6)):
    """Checks what the operator wants the guest told; XdeError with one line
    naming the first thing refused. Returns the normalised (dns, hostname,
    domain): servers as ipaddress spells them, IPv4 ones first (the order
    settings() reads them back in), the domain without a trailing dot.

    families are the address families of the port (4, 6 or both): the
    replies of those must fit a template (GW_TMPL_MAX). Which family may
    carry which setting is the caller's (ports.check_gateway)."""
    dns = list(dns or ())
    seen = []
    for a in dns:
        try:
            addr = ipaddress.ip_address(a)
        except ValueError:
            raise XdeError(f"DNS server {a!r} is not an IPv4 or IPv6 address") from None
        if getattr(addr, "scope_id", None):
            raise XdeError(f"DNS server {a!r} has a scope: the guest's link is the only one")
        if addr.is_unspecified or addr.is_multicast or \
                (addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255")):
            raise XdeError(f"DNS server {a!r} is not a unicast address")
        if addr in seen:
            raise XdeError(f"DNS server {a!r} is given twice")
        seen.append(addr)
    dns4, dns6 = _families(seen)
    for fam, addrs in (("IPv4", dns4), ("IPv6", dns6)):
        if len(addrs) > MAX_DNS:
            raise XdeError(f"at most {MAX_DNS} {fam} DNS servers, not {len(addrs)}: "
                           + ", ".join(map(str, addrs)))
    if hostname is not None and (not isinstance(hostname, str) or not _LABEL.fullmatch(hostname)):
        raise XdeError(f"host name {hostname!r} is not one DNS label (1-63 letters, digits "
                       "or '-', not starting or ending with '-')")
    if domain is not None:
        name = _domain(domain) if isinstance(domain, str) else None
        if not name or not all(_LABEL.fullmatch(label) for label in name.split(".")):
            raise XdeError(f"domain {domain!r} is not a domain name (dot-separated labels of "
                           "1-63 letters, digits or '-', not starting or ending with '-')")
        if len(name) > 253:
            raise XdeError(f"domain {domain!r} is {len(name)} characters, more than 253")
        domain = name
    norm = ([str(a) for a in dns4 + dns6], hostname, domain)
    port = dict(_DUMMY, ip=_DUMMY["ip"] if 4 in families else None,
                ip6=_DUMMY["ip6"] if 6 in families else None)
    _fit(_build(SimpleNamespace(**port, dns=norm[0], hostname=hostname, domain=domain)))
    return norm
