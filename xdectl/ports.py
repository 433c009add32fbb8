"""Port lifecycle: create, delete, list, and removing a whole instance.

A port is a veth pair: the guest-facing end carries the port's name and
MAC; the datapath end (NAME_dp) gets the TC program. Its configuration is
a `ports` map entry keyed by the datapath end's ifindex, so `list` reads
the kernel, never a file.
"""
import ipaddress
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

from . import abi, counters, fw, gateway, nat, overlay, underlay, validate
from .abi import (ENCAP_LEN as ENCAP_OVERHEAD, PORT_F_IP4, PORT_F_IP6, PORT_F_PASSTHROUGH,
                  VNI_PASSTHROUGH)
from .datapath import Datapath, session, tc_name
from .errors import Teardown, XdeError
from .maps import (addr16, addr_str, find_port, ip4_be, ip4_str, ip6_str, mac_bytes, mac_str,
                   port_ips, set_bytes)
from .netdev import Netdev, sysctl

DEFAULT_SUBNET_LEN = 24
DEFAULT_SUBNET6_LEN = 64


@dataclass
class PortSpec:
    name: str
    underlay1: str
    underlay2: str
    mac: str
    ip: str | None          # one of ip and ip6 at least
    gw_mac: str
    gw_ip: str
    bsvc_addr: str
    bsvc_vni: int
    vni: int
    underlay_addr: str
    vpc_subnet: str | None = None
    passthrough: bool = False
    ip6: str | None = None
    vpc_subnet6: str | None = None
    # what the gateway tells the guest (DHCPv4, DHCPv6)
    dns: list = field(default_factory=list)
    hostname: str | None = None
    domain: str | None = None
    # the addresses its internet traffic leaves from (xdectl/nat.py)
    external: nat.ExternalIPs = field(default_factory=nat.ExternalIPs)

    def addrs(self):
        """The port's addresses: IPv4, IPv6 or both."""
        return [a for a in (self.ip, self.ip6) if a]

    def validated(self):
        """A normalised copy, or XdeError naming the first bad field."""
        name = validate.ifname(self.name, "port name")
        if self.ip is None and self.ip6 is None:
            raise XdeError("a port needs --ip, --ip6 or both")
        if self.passthrough:
            _check_passthrough(self)
        ip, subnet = _family(self.ip, self.vpc_subnet, 4)
        ip6, subnet6 = _family(self.ip6, self.vpc_subnet6, 6)
        dns, hostname, domain = check_gateway(ip, ip6, self.dns, self.hostname, self.domain)
        external = self.external.validated(tuple(v for v, a in ((4, ip), (6, ip6)) if a))
        return PortSpec(
            name=name,
            underlay1=validate.ifname(self.underlay1, "underlay device"),
            underlay2=validate.ifname(self.underlay2, "underlay device"),
            mac=validate.mac(self.mac, "--mac"),
            ip=ip,
            gw_mac=validate.mac(self.gw_mac, "--gateway-mac"),
            gw_ip=validate.ipv4(self.gw_ip, "--gateway-ip"),
            bsvc_addr=validate.ipv6(self.bsvc_addr, "--boundary-services"),
            bsvc_vni=validate.vni(self.bsvc_vni, "--boundary-vni"),
            vni=validate.vni(self.vni, "--vni"),
            underlay_addr=validate.ipv6(self.underlay_addr, "--underlay-addr"),
            vpc_subnet=subnet,
            passthrough=self.passthrough,
            ip6=ip6,
            vpc_subnet6=subnet6,
            dns=dns,
            hostname=hostname,
            domain=domain,
            external=external,
        )


# per family: the options, how to check them, the default subnet length
_FAMILY = {4: ("--ip", "--vpc-subnet", validate.ipv4, validate.cidr4, DEFAULT_SUBNET_LEN),
           6: ("--ip6", "--vpc-subnet6", validate.guest_ip6, validate.cidr6, DEFAULT_SUBNET6_LEN)}


def _family(ip, subnet, version):
    """(address, VPC subnet) of one family, normalised; (None, None) when the
    port has no address of that family."""
    ip_opt, subnet_opt, check_ip, check_net, default_len = _FAMILY[version]
    if ip is None:
        if subnet:
            raise XdeError(f"{subnet_opt} {subnet} needs {ip_opt}")
        return None, None
    ip = check_ip(ip, ip_opt)
    net = (check_net(subnet, subnet_opt) if subnet else
           ipaddress.ip_network(f"{ip}/{default_len}", strict=False))
    if ipaddress.ip_address(ip) not in net:
        raise XdeError(f"{ip_opt} {ip} is not inside {subnet_opt} {net}")
    return ip, str(net)


def _check_passthrough(spec):
    """A passthrough port is the seed's: an IPv4 label, no gateway, no pipeline."""
    given = [opt for opt, v in (("--ip6", spec.ip6), ("--vpc-subnet6", spec.vpc_subnet6),
                                ("--dns", spec.dns), ("--hostname", spec.hostname),
                                ("--domain", spec.domain),
                                ("external IPs", spec.external)) if v]
    if given:
        raise XdeError(f"a passthrough port bypasses the gateway and the pipeline: "
                       f"{given[0]} is for overlay ports")
    if spec.ip is None:
        raise XdeError("a passthrough port needs --ip")


def check_gateway(ip, ip6, dns, hostname, domain):
    """What the gateway tells the guest, normalised (gateway.check), for a
    port with these addresses: DHCPv4 carries the IPv4 servers and the host
    name, DHCPv6 the IPv6 servers; the domain goes in both. Only the replies
    of the port's families must fit their templates."""
    families = tuple(v for v, a in ((4, ip), (6, ip6)) if a)
    dns, hostname, domain = gateway.check(dns, hostname, domain, families)
    for server in dns:
        version = ipaddress.ip_address(server).version
        if (ip, ip6)[version == 6] is None:
            raise XdeError(f"--dns {server}: only DHCPv{version} would carry it, and the port "
                           f"has no {_FAMILY[version][0]}")
    if hostname is not None and ip is None:
        raise XdeError(f"--hostname {hostname}: only DHCPv4 carries a host name, and the port "
                       f"has no --ip")
    return dns, hostname, domain


def datapath_end(name):
    return f"{name[:12]}_dp"


class Undo:
    """Steps to roll back, run in reverse if create fails half-way."""

    def __init__(self):
        self.steps = []

    def add(self, fn, *args):
        self.steps.append((fn, args))

    def run(self):
        for fn, args in reversed(self.steps):
            try:
                fn(*args)
            except Exception:  # best effort: keep undoing the rest
                pass


def _config(maps):
    m = maps["config"]
    return m, m.get(m.Key(0))


def _port_key(maps, vni, mac):
    k = maps["port_index"].Key()
    k.vni = vni
    set_bytes(k.mac, mac_bytes(mac))
    return k


def _check_links(nd, spec):
    u1, u2 = nd.index(spec.underlay1), nd.index(spec.underlay2)
    missing = [n for n, i in ((spec.underlay1, u1), (spec.underlay2, u2)) if i is None]
    if missing:
        raise XdeError(f"underlay device {missing[0]} not found in this network namespace")
    if u1 == u2:
        raise XdeError(f"both underlays are the same device ({spec.underlay1})")
    for n in (spec.name, datapath_end(spec.name)):
        if nd.index(n) is not None:
            raise XdeError(f"interface {n} already exists")
    return u1, u2


def _check_instance(maps, spec, u1, u2, nd):
    _, cfg = _config(maps)
    bsvc = maps["bsvc_cfg"].get(maps["bsvc_cfg"].Key(0))
    if bsvc is not None and bsvc.up:
        raise XdeError("this root runs boundary services: ports belong on a sled's root")
    if cfg.u1:
        if (cfg.u1, cfg.u2) != (u1, u2):
            raise XdeError(f"this root's ports use underlays {nd.name(cfg.u1)} and {nd.name(cfg.u2)}; "
                           f"a port here cannot use {spec.underlay1} and {spec.underlay2}")
        have = ip6_str(cfg.underlay_addr)
        if have != spec.underlay_addr:
            raise XdeError(f"this root's underlay address is {have}; "
                           f"--underlay-addr {spec.underlay_addr} differs")
    if find_port(maps, spec.name)[0] is not None:
        raise XdeError(f"port {spec.name} already exists on this root")
    vni = VNI_PASSTHROUGH if spec.passthrough else spec.vni
    if maps["port_index"].get(_port_key(maps, vni, spec.mac)) is not None:
        raise XdeError(f"MAC {spec.mac} is already used by another port"
                       + ("" if spec.passthrough else f" in VNI {spec.vni}"))
    nat.check_shared(maps, None, spec.external)
    if spec.passthrough and _free_passthru_slot(maps) is None:
        raise XdeError("this root already has the maximum number of passthrough ports")


def _free_passthru_slot(maps):
    m = maps["passthru"]
    for i in range(m.max_entries):
        v = m.get(m.Key(i))
        if v is not None and v.value == 0:
            return i
    return None


def create(root, spec):
    spec = spec.validated()
    with session(root) as (dp, nd):
        if dp.exists() and dp.interrupted():
            dp.remove()  # a first load that was killed: nothing attached yet
        fresh = not dp.exists()
        if not fresh:
            _remove_orphans(nd, dp.maps())
        u1, u2 = _check_links(nd, spec)
        if not fresh:
            _check_instance(dp.maps(), spec, u1, u2, nd)
        undo = Undo()
        try:
            if fresh:
                dp.load()
                undo.add(dp.remove)
            _create(dp, nd, spec, u1, u2, undo)
        except BaseException:
            undo.run()
            raise


def _create(dp, nd, spec, u1, u2, undo):
    maps = dp.maps()
    cfg_map, cfg = _config(maps)
    peer = datapath_end(spec.name)
    mtu = _port_mtu(nd, u1, u2, spec.passthrough, bool(spec.ip6))
    # The datapath end takes any size, so that a guest that raised its MTU
    # past the port's reaches the program and gets ICMP, not a silent drop.
    # Note the port as pending first: if this create is killed, the next
    # command on the root finds its links by that name and removes them.
    cfg.pending = spec.name.encode()
    cfg_map.set(cfg_map.Key(0), cfg)
    nd.create_veth(spec.name, peer, spec.mac, mtu, DATAPATH_END_MTU)
    dp_index = nd.index(peer)
    undo.add(nd.delete, dp_index)
    nd.enable_gro(spec.name)
    # bpf_fib_lookup from the port's TC hook needs forwarding on its device
    sysctl(f"net/ipv6/conf/{peer}/forwarding", 1)

    pc = port_cfg(maps["ports"].Leaf(), spec, dp_index, mtu)

    key = maps["ports"].Key(dp_index)
    maps["port_stats"].set(key, maps["port_stats"].Leaf())
    undo.add(maps["port_stats"].delete, key)
    maps["ports"].set(key, pc)
    undo.add(maps["ports"].delete, key)
    pk = _port_key(maps, VNI_PASSTHROUGH if spec.passthrough else spec.vni, spec.mac)
    maps["port_index"].set(pk, maps["port_index"].Leaf(dp_index))
    undo.add(maps["port_index"].delete, pk)
    if spec.passthrough:
        slot = _free_passthru_slot(maps)
        _set_passthru(maps, slot, dp_index)
        undo.add(_set_passthru, maps, slot, 0)
    else:
        _overlay_state(maps, dp_index, pc, spec, undo)

    if not cfg.u1:
        cfg.sw_csum = underlay.attach(dp, nd, u1, u2, undo)
        cfg.u1, cfg.u2 = u1, u2
        set_bytes(cfg.underlay_addr, ipaddress.IPv6Address(spec.underlay_addr).packed)
        if not cfg.ttl_idle:  # the instance's first port: OPTE's flow timeouts
            for name, value in fw.DEFAULT_TIMEOUTS.items():
                setattr(cfg, f"ttl_{name}", value)
        if not cfg.hash_seed:  # keys the flows' ECMP hash; random, as the kernel's
            cfg.hash_seed = int.from_bytes(os.urandom(4), "little") or 1
    cfg.nports = len(maps["ports"].keys())
    cfg_map.set(cfg_map.Key(0), cfg)

    fd = dp.prog_fd("tc_port_out")
    try:
        nd.attach_tc_ingress(dp_index, fd, tc_name("tc_port_out", dp.root))
    finally:
        os.close(fd)  # the filter holds the program now
    nd.up(dp_index)
    nd.up(nd.index(spec.name))
    cfg.pending = b""
    cfg_map.set(cfg_map.Key(0), cfg)


def port_cfg(pc, spec, index, mtu):
    """Fill the port_cfg pc for a validated spec; returns it."""
    pc.ifindex = index
    pc.flags = ((PORT_F_PASSTHROUGH if spec.passthrough else 0) |
                (PORT_F_IP4 if spec.ip else 0) | (PORT_F_IP6 if spec.ip6 else 0))
    pc.vni = spec.vni
    pc.bsvc_vni = spec.bsvc_vni
    set_bytes(pc.mac, mac_bytes(spec.mac))
    set_bytes(pc.gw_mac, mac_bytes(spec.gw_mac))
    pc.gw_ip = ip4_be(spec.gw_ip)
    set_bytes(pc.gw_ip6, addr16(gateway.gateway_ll(spec.gw_mac)))
    if spec.ip:
        subnet = ipaddress.IPv4Network(spec.vpc_subnet)
        pc.ip = ip4_be(spec.ip)
        pc.subnet = ip4_be(subnet.network_address)
        pc.subnet_len = subnet.prefixlen
    if spec.ip6:
        subnet6 = ipaddress.IPv6Network(spec.vpc_subnet6)
        set_bytes(pc.ip6, addr16(spec.ip6))
        set_bytes(pc.subnet6, addr16(subnet6.network_address))
        pc.subnet6_len = subnet6.prefixlen
    set_bytes(pc.bsvc_addr, ipaddress.IPv6Address(spec.bsvc_addr).packed)
    pc.mtu = mtu
    pc.name = spec.name.encode()
    pc.peer = datapath_end(spec.name).encode()
    return pc


def _overlay_state(maps, index, pc, spec, undo):
    """What an overlay port starts with, as OPTE makes it: its own V2P
    mappings, the system routes of each family, the default firewall rules,
    the gateway's replies and its external addresses."""
    # The mappings carry the spec's underlay address: on a root whose ports
    # are all gone, the config map may still hold an older one until
    # underlay.attach writes this one.
    undo.add(_remove_overlay_state, maps, index, pc, spec.underlay_addr)
    for ip in spec.addrs():
        overlay.put_v2p(maps, ip, spec.mac, spec.underlay_addr, spec.vni)
    for subnet, sub, default in ((spec.vpc_subnet, "sub4", "0.0.0.0/0"),
                                 (spec.vpc_subnet6, "sub6", "::/0")):
        if subnet:
            overlay.put_route(maps, index, subnet, f"{sub}={subnet}", system=True)
            overlay.put_route(maps, index, default, "ig", system=True)
    fw.write_rules(maps, index, fw.default_rules(spec.vni, bool(spec.ip), bool(spec.ip6)))
    _write_gateway(maps, index, pc, spec.dns, spec.hostname, spec.domain)
    nat.write(maps, index, spec.external)


def _remove_overlay_state(maps, index, pc, underlay_addr=None):
    """Undo _overlay_state (own V2P mappings only if unchanged since: those
    at underlay_addr, by default the root's)."""
    _clear_own_v2p(maps, pc, underlay_addr)
    overlay.remove_port_routes(maps, index)
    fw.remove_port_state(maps, index)
    _remove_gateway(maps, index)
    nat.remove_port_state(maps, index)


# --- the gateway's replies (bpf/gw_reply.h, xdectl/gateway.py) ----------------

GW_KINDS = (abi.GW_DHCP4, abi.GW_RA, abi.GW_NA, abi.GW_DHCP6, abi.GW_DHCP6_STATUS)


def _tmpl_key(m, index, kind):
    k = m.Key()
    k.port, k.kind = index, kind
    return k


def _write_gateway(maps, index, pc, dns, hostname, domain):
    """The port's reply templates, for what its guest is to be told; a kind
    the port has no use for is removed. All are built before any is
    written, and if a write fails the previous ones are put back: the
    port never answers with a mix of old and new replies."""
    ip, ip6 = port_ips(pc)
    tmpls = gateway.templates(SimpleNamespace(
        mac=mac_str(pc.mac), gw_mac=mac_str(pc.gw_mac), ip=ip, gw_ip=ip4_str(pc.gw_ip), ip6=ip6,
        mtu=pc.mtu, dns=dns, hostname=hostname, domain=domain))
    m = maps["gw_tmpl"]
    before = {kind: m.get(_tmpl_key(m, index, kind)) for kind in GW_KINDS}
    try:
        for kind in GW_KINDS:
            if kind not in tmpls:
                m.delete(_tmpl_key(m, index, kind))
                continue
            v = m.Leaf()
            v.len = len(tmpls[kind])
            set_bytes(v.frame, tmpls[kind])
            m.set(_tmpl_key(m, index, kind), v)
    except BaseException:
        _put_templates(m, index, before)
        raise


def _put_templates(m, index, frames):
    """Put back {kind: gw_tmpl value or None (no template)}; best effort,
    every kind tried."""
    for kind, v in frames.items():
        try:
            if v is None:
                m.delete(_tmpl_key(m, index, kind))
            else:
                m.set(_tmpl_key(m, index, kind), v)
        except Exception:  # noqa: BLE001 - keep restoring the other kinds
            pass


def _remove_gateway(maps, index):
    m = maps["gw_tmpl"]
    for kind in GW_KINDS:
        m.delete(_tmpl_key(m, index, kind))


def gateway_settings(maps, index):
    """{dns, hostname, domain} the port's gateway tells its guest, read back
    from its templates (none for a passthrough port); XdeError if one of
    them cannot be read."""
    m = maps["gw_tmpl"]
    tmpls = {}
    for kind in GW_KINDS:
        v = m.get(_tmpl_key(m, index, kind))
        if v is not None:
            tmpls[kind] = bytes(v.frame[:v.len])
    return gateway.settings(tmpls)


def set_gateway(root, name, dns, hostname, domain):
    """Change what the gateway of port NAME tells its guest, in place: the
    guest learns it at its next DHCP exchange."""
    with session(root) as (dp, _):
        index, pc = dp.port(name)
        if pc.flags & PORT_F_PASSTHROUGH:
            raise XdeError(f"port {name} is a passthrough port: it has no gateway")
        ip, ip6 = port_ips(pc)
        _write_gateway(dp.maps(), index, pc, *check_gateway(ip, ip6, dns, hostname, domain))


MAX_PORT_MTU = 1500
DATAPATH_END_MTU = 65535


def _port_mtu(nd, u1, u2, passthrough, ipv6=False):
    """Passthrough frames leave unchanged: the underlays' MTU. Overlay frames
    grow by the encapsulation, which must fit the underlay's MTU; a guest
    gets 1500 where the underlay allows it (docs/design.md, "MTU"), and an
    IPv6 guest at least IPv6's 1280 (it ignores a smaller MTU option)."""
    underlay = min(nd.ipr.get_links(u)[0].get_attr("IFLA_MTU") for u in (u1, u2))
    if passthrough:
        return underlay
    mtu = min(MAX_PORT_MTU, underlay - ENCAP_OVERHEAD)
    least = 1280 if ipv6 else 576
    if mtu < least:
        raise XdeError(f"underlay MTU {underlay} leaves the port only {mtu} bytes after "
                       f"the {ENCAP_OVERHEAD}-byte encapsulation, under the {least} "
                       f"{'IPv6' if ipv6 else 'IPv4'} needs; raise the underlay MTU")
    return mtu


def _set_passthru(maps, slot, value):
    """Passthrough ports are kept packed at the start of the array: the
    broadcast clone loop stops at the first empty slot."""
    m = maps["passthru"]
    m.set(m.Key(slot), m.Leaf(value))
    if value == 0:
        vals = [m.get(m.Key(i)).value for i in range(m.max_entries)]
        packed = [v for v in vals if v] + [0] * vals.count(0)
        for i, v in enumerate(packed):
            if v != vals[i]:
                m.set(m.Key(i), m.Leaf(v))


def delete(root, name):
    with session(root) as (dp, nd):
        if dp.exists():
            _remove_orphans(nd, dp.maps())
        index, pc = dp.port(name)
        _delete(dp.maps(), nd, index, pc)


def _delete(maps, nd, index, pc):
    """Links first, then map entries: a port in the map always has its links,
    and a kill half-way leaves a port that `delete` can finish."""
    nd.delete(index)  # removes both veth ends, wherever the guest end lives now
    key = maps["ports"].Key(index)
    passthrough = pc.flags & PORT_F_PASSTHROUGH
    maps["port_index"].delete(_port_key(maps, VNI_PASSTHROUGH if passthrough else pc.vni,
                                        mac_str(pc.mac)))
    if passthrough:
        m = maps["passthru"]
        for i in range(m.max_entries):
            if m.get(m.Key(i)).value == index:
                _set_passthru(maps, i, 0)
                break
    else:
        _remove_overlay_state(maps, index, pc)
    maps["port_stats"].delete(key)
    maps["ports"].delete(key)
    _release_underlays_if_unused(maps, nd)


def _release_underlays_if_unused(maps, nd):
    """The underlays stay attached exactly while the root has ports."""
    cfg_map, cfg = _config(maps)
    cfg.nports = len(maps["ports"].keys())
    if cfg.nports == 0 and cfg.u1:
        underlay.detach_pair(nd, cfg.u1, cfg.u2, cfg.sw_csum)
        cfg.u1 = cfg.u2 = cfg.sw_csum = 0
    cfg_map.set(cfg_map.Key(0), cfg)


def _remove_orphans(nd, maps):
    """The links of a create that was killed before its port entry was
    written (it noted the port's name as pending first)."""
    cfg_map, cfg = _config(maps)
    name = cfg.pending.decode()
    if name:
        index, _ = find_port(maps, name)
        link = nd.index(datapath_end(name))
        if index is None and link is not None:
            nd.delete(link)
        cfg.pending = b""
        cfg_map.set(cfg_map.Key(0), cfg)
    _release_underlays_if_unused(maps, nd)


def _clear_own_v2p(maps, pc, underlay_addr=None):
    """Remove the mappings create added (to the port's MAC at underlay_addr,
    by default the root's underlay address), unless they have been changed
    since."""
    m = maps["v2p"]
    if underlay_addr is None:
        underlay = bytes(_config(maps)[1].underlay_addr)
    else:
        underlay = ipaddress.IPv6Address(underlay_addr).packed
    for ip in port_ips(pc):
        if ip is None:
            continue
        k = overlay.v2p_key(m, pc.vni, ip)
        cur = m.get(k)
        if cur is not None and bytes(cur.mac) == bytes(pc.mac) and \
                bytes(cur.underlay) == underlay:
            m.delete(k)


def list_ports(root):
    dp = Datapath(root)
    if not dp.exists():
        return []
    maps = dp.maps()
    _, cfg = _config(maps)
    nd = Netdev()
    try:
        out = []
        underlays = [nd.name(cfg.u1), nd.name(cfg.u2)]
        states = nd.operstates()      # one dump, not a request a port
        for k, pc in sorted(maps["ports"].items(), key=lambda kv: kv[1].name):
            ip, ip6 = port_ips(pc)
            out.append({
                "name": pc.name.decode(),
                "mode": "passthrough" if pc.flags & PORT_F_PASSTHROUGH else "overlay",
                "mac": mac_str(pc.mac),
                "ip": ip,
                "ip6": ip6,
                "vni": pc.vni,
                "gateway_mac": mac_str(pc.gw_mac),
                "gateway_ip": ip4_str(pc.gw_ip),
                "vpc_subnet": f"{ip4_str(pc.subnet)}/{pc.subnet_len}" if ip else None,
                "vpc_subnet6": f"{addr_str(pc.subnet6)}/{pc.subnet6_len}" if ip6 else None,
                **_readable_gateway(maps, k.value),
                "external": nat.read(maps, k.value).as_dict(),
                "boundary_services": ip6_str(pc.bsvc_addr),
                "boundary_vni": pc.bsvc_vni,
                "underlay_addr": ip6_str(cfg.underlay_addr),
                "underlays": underlays,
                "mtu": pc.mtu,
                "state": _state(states.get(k.value)),
            })
        return out
    finally:
        nd.close()


def _readable_gateway(maps, index):
    """gateway_settings, or for templates that cannot be read every setting
    None and gateway_error saying why: one such port must not stop `list`
    or `apply` for the whole root (set-gateway rewrites them)."""
    try:
        return {**gateway_settings(maps, index), "gateway_error": None}
    except XdeError as e:
        return {"dns": None, "hostname": None, "domain": None, "gateway_error": str(e)}


def _state(state):
    """The datapath end's operstate -> the port's: it has carrier while the
    guest end is up."""
    return "missing" if state is None else "up" if state == "UP" else "down"


def port_stats(root, name=None):
    dp = Datapath(root)
    if not dp.exists():
        return {}
    maps = dp.maps()
    flows = counters.flows_per_port(maps)
    out = {}
    for k, pc in maps["ports"].items():
        pname = pc.name.decode()
        if name and pname != name:
            continue
        c = counters.port_counts(maps, k.value)
        out[pname] = c.flat() if c else {}
        out[pname]["flow_entries"] = flows.get(k.value, 0)
    if name and name not in out:
        raise XdeError(f"no port {name} on {root}")
    return out


def global_stats(root):
    dp = Datapath(root)
    if not dp.exists():
        return {}
    maps = dp.maps()
    return {**counters.global_counts(maps).flat(),
            "route_cache_entries": counters.route_cache_entries(maps)}


def _sweep(dp, nd):
    """Find what the instance attached by its programs' ids and filter names,
    without its maps, and remove it: for unload --force of a layout this
    xdectl cannot read, or after a killed command."""
    ids = dp.prog_ids()
    for index, _ in nd.links():
        if nd.xdp_prog_id(index) in ids:
            underlay.detach(nd, index)
        elif tc_name("tc_port_out", dp.root) in nd.tc_ingress_names(index):
            nd.delete(index)      # a port's datapath end: the port goes with it


def unload(root, force=False):
    with session(root) as (dp, nd):
        if not dp.exists():
            return False
        if dp.interrupted():
            dp.remove()
            return True
        if force:
            _force_unload(dp, nd)
            return True
        maps = dp.maps()
        ports = list(maps["ports"].items())
        if ports:
            names = ", ".join(pc.name.decode() for _, pc in ports)
            raise XdeError(f"ports exist on {root} ({names}); delete them or use --force")
        _remove_orphans(nd, maps)
        from . import boundary
        boundary.detach(dp, nd)
        _sweep(dp, nd)
        dp.remove()
        return True


def _force_unload(dp, nd):
    """Delete the ports, detach, unpin: every step is tried whatever the others
    did; what could not be removed is reported, and a second run finishes."""
    td = Teardown()
    maps = td.step(f"read the maps under {dp.root}", dp.maps) if dp.layout_matches() else None
    if maps is not None:
        for k, pc in td.step("read the ports map", lambda: list(maps["ports"].items())) or []:
            td.step(f"delete port {pc.name.decode()}", _delete, maps, nd, k.value, pc)
        td.step("remove a half-created port", _remove_orphans, nd, maps)
    from . import boundary
    td.step("detach boundary services", boundary.detach, dp, nd)
    td.step("detach the programs", _sweep, dp, nd)
    td.step(f"remove the pins under {dp.root}", dp.remove)
    td.done()


def unpin(root):
    """Remove a root's pins without touching any link: for a root whose
    network namespace is gone (its links went with it)."""
    dp = Datapath(root)
    dp.lock()
    try:
        dp.remove()
    finally:
        dp.release()
