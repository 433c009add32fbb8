"""Overlay state: V2P mappings and per-port router tables.

V2P belongs to the instance (it outlives ports, as in OPTE); router
entries belong to a port. `create` installs the port's own mapping and
its system routes; `delete` removes them.
"""
import ipaddress
import sys

from . import validate
from .abi import ROUTE_KEY_BITS, RT_DROP, RT_IG, RT_IP4, RT_IP6, RT_SUB4, RT_SUB6
from .datapath import Datapath, session
from .errors import XdeError
from .maps import (addr16, addr_order, addr_str, ip6_str, mac_bytes, mac_str,
                   mapped_prefixlen, set_bytes)

TARGET_NAMES = {RT_DROP: "drop", RT_IG: "ig", RT_IP4: "ip4", RT_SUB4: "sub4", RT_IP6: "ip6",
                RT_SUB6: "sub6"}
TARGET_FAMILY = {RT_IP4: 4, RT_SUB4: 4, RT_IP6: 6, RT_SUB6: 6}   # drop and ig: either
BATCH = 4096


# --- V2P ------------------------------------------------------------------

def v2p_key(m, vni, ip):
    """The V2P key of (VNI, VPC address of either family)."""
    k = m.Key()
    k.vni = vni
    set_bytes(k.ip, addr16(ip))
    return k


def parse_v2p(ip, mac, underlay, vni):
    return (validate.overlay_ip(ip, "VPC IP"), validate.mac(mac, "VPC MAC"),
            validate.ipv6(underlay, "underlay IP"), validate.vni(vni))


def _v2p_val(m, mac, underlay):
    v = m.Leaf()
    set_bytes(v.mac, mac_bytes(mac))
    set_bytes(v.underlay, ipaddress.IPv6Address(underlay).packed)
    return v


def put_v2p(maps, ip, mac, underlay, vni):
    m = maps["v2p"]
    m.set(v2p_key(m, vni, ip), _v2p_val(m, mac, underlay))


def set_v2p(root, ip, mac, underlay, vni):
    ip, mac, underlay, vni = parse_v2p(ip, mac, underlay, vni)
    with session(root) as (dp, _):
        put_v2p(loaded(dp), ip, mac, underlay, vni)


def remove_v2p(maps, ip, mac, underlay, vni):
    """Remove a mapping, which must be exactly this one."""
    m = maps["v2p"]
    k = v2p_key(m, vni, ip)
    cur = m.get(k)
    if cur is None or mac_str(cur.mac) != mac or ip6_str(cur.underlay) != underlay:
        raise XdeError(f"no V2P mapping {ip} -> {mac} at {underlay} in VNI {vni}")
    m.delete(k)


def clear_v2p(root, ip, mac, underlay, vni):
    ip, mac, underlay, vni = parse_v2p(ip, mac, underlay, vni)
    with session(root) as (dp, _):
        remove_v2p(loaded(dp), ip, mac, underlay, vni)


def dump_v2p(root):
    dp = Datapath(root)
    if not dp.exists():
        return []
    out = [{"vni": k.vni, "ip": addr_str(k.ip), "mac": mac_str(v.mac),
            "underlay": ip6_str(v.underlay)} for k, v in dp.maps()["v2p"].items()]
    return sorted(out, key=lambda e: (e["vni"], addr_order(e["ip"])))


def load_v2p(root, stream):
    """Bulk set-v2p: one `VPC_IP VPC_MAC UNDERLAY_IP VNI` a line ('#' comments).
    Every line is checked before any is written: a bad line changes nothing."""
    rows = []
    for n, line in enumerate(stream, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 4:
            raise XdeError(f"line {n}: expected 'VPC_IP VPC_MAC UNDERLAY_IP VNI', got {line!r}")
        try:
            rows.append(parse_v2p(*parts))
        except XdeError as e:
            raise XdeError(f"line {n}: {e}") from None
    with session(root) as (dp, _):
        m = loaded(dp)["v2p"]
        for i in range(0, len(rows), BATCH):
            chunk = rows[i:i + BATCH]
            m.update_batch([(v2p_key(m, vni, ip), _v2p_val(m, mac, u)) for ip, mac, u, vni in chunk])
    return len(rows)


# --- router ---------------------------------------------------------------

def parse_target(target):
    """`drop`, `ig`, `ip4=ADDR`, `sub4=CIDR`, `ip6=ADDR` or `sub6=CIDR` ->
    (kind, address or None, prefix length)."""
    if target in ("drop", "ig"):
        return (RT_DROP if target == "drop" else RT_IG), None, 0
    kind, _, arg = target.partition("=")
    if kind == "ip4":
        return RT_IP4, validate.ipv4(arg, "ip4 target"), 32
    if kind == "ip6":
        return RT_IP6, validate.guest_ip6(arg, "ip6 target"), 128
    if kind == "sub4":
        net = validate.cidr4(arg, "sub4 target")
        return RT_SUB4, str(net.network_address), net.prefixlen
    if kind == "sub6":
        net = validate.overlay_net(str(validate.cidr6(arg, "sub6 target")), "sub6 target")
        return RT_SUB6, str(net.network_address), net.prefixlen
    raise XdeError(f"target '{target}' is not one of drop, ig, ip4=ADDR, sub4=CIDR, ip6=ADDR, "
                   f"sub6=CIDR")


def parse_route(dest, target):
    """A route's destination (IPv4 or IPv6 CIDR) and target, checked
    together: ip4/sub4 serve IPv4 destinations, ip6/sub6 IPv6 ones."""
    dest = validate.overlay_net(dest, "destination")
    kind, addr, length = parse_target(target)
    family = TARGET_FAMILY.get(kind, dest.version)
    if family != dest.version:
        raise XdeError(f"target {target} is IPv{family}, destination {dest} is IPv{dest.version}")
    return dest, (kind, addr, length)


def route_key(m, port, dest):
    """The LPM key of a destination prefix in the port's table of its family."""
    k = m.Key()
    k.prefixlen = ROUTE_KEY_BITS + mapped_prefixlen(dest)
    k.port = port
    k.family = dest.version
    set_bytes(k.ip, addr16(dest.network_address))
    return k


def route_dest(k):
    """The destination prefix a route key stands for, as text."""
    plen = k.prefixlen - ROUTE_KEY_BITS - (96 if k.family == 4 else 0)
    return f"{addr_str(k.ip)}/{plen}"


def route_val(m, dest, target):
    """The route value of a parsed target (parse_target)."""
    kind, addr, length = target
    v = m.Leaf()
    v.target, v.len, v.plen = kind, length, dest.prefixlen
    if addr is not None:
        set_bytes(v.addr, addr16(addr))
    return v


def put_route(maps, port, dest, target, system=False):
    m = maps["routes_sys" if system else "routes"]
    dest, parsed = parse_route(str(dest), target)
    m.set(route_key(m, port, dest), route_val(m, dest, parsed))


def _port(dp, name):
    return dp.port(name)[0]


def add_router_entry(root, port, dest, target):
    parse_route(dest, target)
    with session(root) as (dp, _):
        index = _port(dp, port)
        put_route(dp.maps(), index, dest, target)


def del_router_entry(root, port, dest, target=None):
    dest = validate.overlay_net(dest, "destination")
    target = None if target is None else canon_target(target)
    with session(root) as (dp, _):
        index = _port(dp, port)
        m = dp.maps()["routes"]
        k = route_key(m, index, dest)
        cur = m.get(k)
        if cur is None or (target is not None and target_str(cur) != target):
            raise XdeError(f"port {port} has no custom route {dest}"
                           + (f" -> {target}" if target else ""))
        m.delete(k)


def _target_text(kind, addr, length):
    name = TARGET_NAMES.get(kind, "?")
    if kind in (RT_IP4, RT_IP6):
        return f"{name}={addr}"
    if kind in (RT_SUB4, RT_SUB6):
        return f"{name}={addr}/{length}"
    return name


def canon_target(target):
    """A target as dump-router prints it (sub6=FD00::/64 -> sub6=fd00::/64)."""
    return _target_text(*parse_target(target))


def target_str(v):
    """A route value's target, as dump-router prints it."""
    return _target_text(v.target, addr_str(v.addr), v.len)


def port_routes(maps, index):
    """The port's routes: IPv4 first, then IPv6, each longest prefix first
    and, at equal length, custom before system (the one that wins)."""
    out = []
    for table, kind in (("routes", "custom"), ("routes_sys", "system")):
        for k, v in maps[table].items():
            if k.port == index:
                out.append({"dest": route_dest(k), "target": target_str(v), "kind": kind})

    def order(r):
        net = ipaddress.ip_network(r["dest"])
        return net.version, -net.prefixlen, r["kind"] != "custom", int(net.network_address)
    return sorted(out, key=order)


def dump_router(root, port):
    dp = Datapath(root)
    index = _port(dp, port)
    return port_routes(dp.maps(), index)


def remove_port_routes(maps, index):
    for table in ("routes", "routes_sys"):
        m = maps[table]
        for k in m.keys():
            if k.port == index:
                m.delete(k)


def loaded(dp):
    if not dp.exists():
        raise XdeError(f"nothing is loaded under {dp.root}: create a port first")
    return dp.maps()


def read_lines(path):
    if path in (None, "-"):
        return sys.stdin.readlines()
    try:
        with open(path) as f:
            return f.readlines()
    except OSError as e:
        raise XdeError(f"cannot read {path}: {e.strerror}") from None
