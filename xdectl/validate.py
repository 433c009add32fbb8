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


def ipv4(value, what="IPv4 address"):
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise XdeError(f"{what} {value!r} is not an IPv4 address") from None


def ipv6(value, what="IPv6 address"):
    try:
        return str(ipaddress.IPv6Address(value))
    except ValueError:
        raise XdeError(f"{what} {value!r} is not an IPv6 address") from None


def cidr4(value, what="subnet"):
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise XdeError(f"{what} {value!r} is not an IPv4 CIDR: {e}") from None


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
