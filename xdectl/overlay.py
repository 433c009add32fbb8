"""Overlay state: V2P mappings and per-port router tables.

V2P belongs to the instance (it outlives ports, as in OPTE); router
entries belong to a port. `create` installs the port's own mapping and
its system routes; `delete` removes them.
"""
import ipaddress
import sys

from . import validate
from .abi import RT_DROP, RT_IG, RT_IP4, RT_SUB4
from .datapath import Datapath, session
from .errors import XdeError
from .maps import find_port, ip4_be, ip4_str, ip6_str, mac_bytes, mac_str, set_bytes

TARGET_NAMES = {RT_DROP: "drop", RT_IG: "ig", RT_IP4: "ip4", RT_SUB4: "sub4"}
BATCH = 4096


# --- V2P ------------------------------------------------------------------

def _v2p_key(m, vni, ip):
    k = m.Key()
    k.vni = vni
    k.ip = ip4_be(ip)
    return k


def parse_v2p(ip, mac, underlay, vni):
    return (validate.ipv4(ip, "VPC IP"), validate.mac(mac, "VPC MAC"),
            validate.ipv6(underlay, "underlay IP"), validate.vni(vni))


def _v2p_val(m, mac, underlay):
    v = m.Leaf()
    set_bytes(v.mac, mac_bytes(mac))
    set_bytes(v.underlay, ipaddress.IPv6Address(underlay).packed)
    return v


def put_v2p(maps, ip, mac, underlay, vni):
    m = maps["v2p"]
    m.set(_v2p_key(m, vni, ip), _v2p_val(m, mac, underlay))


def set_v2p(root, ip, mac, underlay, vni):
    ip, mac, underlay, vni = parse_v2p(ip, mac, underlay, vni)
    with session(root) as (dp, _):
        put_v2p(_loaded(dp), ip, mac, underlay, vni)


def clear_v2p(root, ip, mac, underlay, vni):
    ip, mac, underlay, vni = parse_v2p(ip, mac, underlay, vni)
    with session(root) as (dp, _):
        m = _loaded(dp)["v2p"]
        k = _v2p_key(m, vni, ip)
        cur = m.get(k)
        if cur is None or mac_str(cur.mac) != mac or ip6_str(cur.underlay) != underlay:
            raise XdeError(f"no V2P mapping {ip} -> {mac} at {underlay} in VNI {vni}")
        m.delete(k)


def dump_v2p(root):
    dp = Datapath(root)
    if not dp.exists():
        return []
    out = [{"vni": k.vni, "ip": ip4_str(k.ip), "mac": mac_str(v.mac),
            "underlay": ip6_str(v.underlay)} for k, v in dp.maps()["v2p"].items()]
    return sorted(out, key=lambda e: (e["vni"], ipaddress.IPv4Address(e["ip"])))


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
        m = _loaded(dp)["v2p"]
        for i in range(0, len(rows), BATCH):
            chunk = rows[i:i + BATCH]
            m.update_batch([(_v2p_key(m, vni, ip), _v2p_val(m, mac, u)) for ip, mac, u, vni in chunk])
    return len(rows)


# --- router ---------------------------------------------------------------

def parse_target(target):
    """`drop`, `ig`, `ip4=ADDR` or `sub4=CIDR` -> (kind, addr, len)."""
    if target == "drop":
        return RT_DROP, "0.0.0.0", 0
    if target == "ig":
        return RT_IG, "0.0.0.0", 0
    kind, _, arg = target.partition("=")
    if kind == "ip4":
        return RT_IP4, validate.ipv4(arg, "ip4 target"), 32
    if kind == "sub4":
        net = validate.cidr4(arg, "sub4 target")
        return RT_SUB4, str(net.network_address), net.prefixlen
    if kind in ("ip6", "sub6"):
        raise XdeError(f"target {target}: IPv6 overlay routes are not supported yet")
    raise XdeError(f"target '{target}' is not one of drop, ig, ip4=ADDR, sub4=CIDR")


def _route_key(m, port, dest):
    k = m.Key()
    k.prefixlen = 32 + dest.prefixlen
    k.port = port
    k.ip = ip4_be(dest.network_address)
    return k


def put_route(maps, port, dest, target, system=False):
    m = maps["routes_sys" if system else "routes"]
    kind, addr, length = parse_target(target)
    v = m.Leaf()
    v.target, v.addr, v.len, v.plen = kind, ip4_be(addr), length, dest.prefixlen
    m.set(_route_key(m, port, dest), v)


def _port(dp, name):
    index, pc = find_port(_loaded(dp), name)
    if index is None:
        raise XdeError(f"no port {name} on {dp.root}")
    return index


def add_router_entry(root, port, dest, target):
    dest = validate.cidr4(dest, "destination")
    parse_target(target)
    with session(root) as (dp, _):
        put_route(dp.maps(), _port(dp, port), dest, target)


def del_router_entry(root, port, dest, target=None):
    dest = validate.cidr4(dest, "destination")
    with session(root) as (dp, _):
        index = _port(dp, port)
        m = dp.maps()["routes"]
        k = _route_key(m, index, dest)
        cur = m.get(k)
        if cur is None or (target is not None and _target_str(cur) != target):
            raise XdeError(f"port {port} has no custom route {dest}"
                           + (f" -> {target}" if target else ""))
        m.delete(k)


def _target_str(v):
    name = TARGET_NAMES.get(v.target, "?")
    if v.target == RT_IP4:
        return f"ip4={ip4_str(v.addr)}"
    if v.target == RT_SUB4:
        return f"sub4={ip4_str(v.addr)}/{v.len}"
    return name


def port_routes(maps, index):
    out = []
    for table, kind in (("routes", "custom"), ("routes_sys", "system")):
        for k, v in maps[table].items():
            if k.port == index:
                out.append({"dest": f"{ip4_str(k.ip)}/{k.prefixlen - 32}",
                            "target": _target_str(v), "kind": kind})
    return sorted(out, key=lambda r: (-int(r["dest"].split("/")[1]), r["kind"] != "custom"))


def dump_router(root, port):
    dp = Datapath(root)
    if not dp.exists():
        raise XdeError(f"no port {port}: nothing is loaded under {root}")
    return port_routes(dp.maps(), _port(dp, port))


def remove_port_routes(maps, index):
    for table in ("routes", "routes_sys"):
        m = maps[table]
        for k in m.keys():
            if k.port == index:
                m.delete(k)


def _loaded(dp):
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
