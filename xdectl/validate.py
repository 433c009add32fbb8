"""Parsing and validation of user input. Each function returns the
normalised value or raises XdeError with one line naming what is wrong."""
import ipaddress
import re

from .errors import XdeError

_MAC = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}")
# Linux interface names: 1..15 bytes, no '/', ':', whitespace; not . or ..
_IFNAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}")


def mac(value, what="MAC"):
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        raise XdeError(f"{what} {value!r} is not a MAC address (expected six hex octets like A8:40:25:ff:00:01)")
    octets = [int(x, 16) for x in value.split(":")]
    if octets[0] & 1:
        raise XdeError(f"{what} {value!r} is a multicast/broadcast address; a port needs a unicast MAC")
    if not any(octets):
        raise XdeError(f"{what} {value!r} is all zeros")
    return ":".join(f"{o:02x}" for o in octets)


def _address(parse, family, value, what):
    try:
        return str(parse(value))
    except ValueError:
        raise XdeError(f"{what} {value!r} is not an {family} address") from None


def _network(parse, family, value, what):
    try:
        return parse(value, strict=True)
    except ValueError as e:
        raise XdeError(f"{what} {value!r} is not an {family} CIDR: {e}") from None


def ipv4(value, what="IPv4 address"):
    return _address(ipaddress.IPv4Address, "IPv4", value, what)


def ipv6(value, what="IPv6 address"):
    return _address(ipaddress.IPv6Address, "IPv6", value, what)


def ip_any(value, what="address"):
    """An IPv4 or IPv6 address, normalised."""
    return _address(ipaddress.ip_address, "IPv4 or IPv6", value, what)


def cidr4(value, what="subnet"):
    return _network(ipaddress.IPv4Network, "IPv4", value, what)


def cidr6(value, what="subnet"):
    return _network(ipaddress.IPv6Network, "IPv6", value, what)


def cidr_any(value, what="subnet"):
    """An IPv4 or IPv6 CIDR (host bits must be zero)."""
    return _network(ipaddress.ip_network, "IPv4 or IPv6", value, what)


# IPv4 lives here in the datapath's 16-byte addresses (bpf/pkt.h): an IPv6
# address or prefix inside it would stand for IPv4 ones.
V4_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")


def overlay_ip(value, what="address"):
    """A VPC address of either family. IPv6 ones are global or unique-local
    unicast: link-local and multicast never leave the port's link, and
    ::ffff:0:0/96 stands for IPv4."""
    a = ipaddress.ip_address(ip_any(value, what))
    if a.version == 4:
        return str(a)
    if a.scope_id:
        raise XdeError(f"{what} {value!r} has a scope (%{a.scope_id}); VPC addresses have none")
    if a in V4_MAPPED_NET:
        raise XdeError(f"{what} {value!r} is an IPv4-mapped IPv6 address; "
                       f"write the IPv4 address {a.ipv4_mapped}")
    kind = ("multicast" if a.is_multicast else "link-local" if a.is_link_local else
            "loopback" if a.is_loopback else "unspecified" if a.is_unspecified else None)
    if kind:
        raise XdeError(f"{what} {value!r} is {kind}; a VPC address is global or unique-local "
                       f"unicast")
    return str(a)


def guest_ip6(value, what="--ip6"):
    ipv6(value, what)
    return overlay_ip(value, what)


def overlay_net(value, what="subnet"):
    """A VPC prefix of either family, not inside ::ffff:0:0/96."""
    net = cidr_any(value, what)
    if net.version == 6 and net.subnet_of(V4_MAPPED_NET):
        raise XdeError(f"{what} {value!r} is inside ::ffff:0:0/96, the IPv4-mapped "
                       f"addresses; write the IPv4 prefix")
    return net


def vni(value, what="VNI"):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise XdeError(f"{what} {value!r} is not a number") from None
    if not 0 <= n <= 0xFFFFFF:
        raise XdeError(f"{what} {n} is outside 0..16777215 (24 bits)")
    return n


def ifname(value, what="interface name"):
    if not isinstance(value, str) or not _IFNAME.fullmatch(value) or value in (".", ".."):
        raise XdeError(f"{what} {value!r} is not a valid interface name "
                       f"(1-15 characters of letters, digits, '_', '-', '.')")
    return value
