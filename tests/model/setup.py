"""Extra state the differential tests put on a lab's sled1 so that every
branch of the router, overlay, firewall and NAT is reachable: local V2P
entries with no port, custom routes of every target kind, firewall rules of
both directions and families with every filter, external addresses of both
families for xde0. uninstall() takes it away."""
from xdectl import fw, nat, overlay
from xdectl.datapath import session
from xdectl.errors import XdeError

from .gen import G1_EXTERNAL, G2_EXTERNAL

EXTRA_V2P = [  # (ip, mac, underlay, vni)
    ("10.0.0.3", "a8:40:25:ff:00:03", "fd00:1::1", 10),      # on this host, no such port
    ("10.0.0.4", "a8:40:25:ff:00:04", "fd00:2::1", 10),      # on sled2, no such port there
    ("10.0.0.9", "a8:40:25:ff:00:09", "fd00:2::1", 11),      # other VNI: not ours
    ("fd00:10::33", "a8:40:25:ff:00:33", "fd00:1::1", 10),   # IPv6: on this host, no such port
    ("fd00:10::44", "a8:40:25:ff:00:44", "fd00:2::1", 10),   # on sled2, no such port there
    ("fd00:10::99", "a8:40:25:ff:00:99", "fd00:2::1", 11),   # other VNI
    ("fd00:11::5", "a8:40:25:ff:00:05", "fd00:2::1", 10),    # behind the sub6 route below
]
EXTRA_ROUTES = [  # (dest, target)
    ("198.51.100.0/24", "drop"),
    ("203.0.113.0/24", "ip4=10.0.0.2"),
    ("203.0.114.0/24", "ip4=10.0.0.77"),                      # next hop without V2P
    ("10.1.0.0/16", "sub4=10.1.0.0/16"),
    ("10.0.0.128/25", "ig"),                                  # custom beats the system /24
    ("192.0.2.128/25", "drop"),
    ("2001:db8:dead::/48", "drop"),
    ("2001:db8:1::/48", "ip6=fd00:10::2"),
    ("2001:db8:2::/48", "ip6=fd00:10::77"),                  # next hop without V2P
    ("fd00:11::/64", "sub6=fd00:11::/64"),
    ("fd00:10:0:0:8000::/65", "ig"),                         # custom beats the system /64
    ("2001:db8:dead:beef::/64", "ig"),                       # longer than the drop /48
]


EXTRA_RULES = [  # set-fw-rules lines, added to xde0's own: both families, every filter
    "dir=out action=deny priority=100 hosts=ip=fd00:10::44 protocol=udp",
    "dir=out action=deny priority=110 hosts=subnet=2001:db8:1::/48 protocol=tcp ports=22,80",
    "dir=out action=deny priority=120 hosts=subnet=fd00:11::/64 protocol=icmp6:128",
    "dir=out action=deny priority=130 hosts=subnet=10.0.0.4/31 protocol=udp",
    "dir=out action=deny priority=140 hosts=ip=203.0.113.5 protocol=icmp:8",
    "dir=out action=deny priority=150 protocol=tcp ports=25",
    "dir=out action=deny priority=160 hosts=vni=10 protocol=udp ports=9",
    "dir=in action=deny priority=40 hosts=ip=fd00:10::2 protocol=udp ports=53",
    "dir=in action=allow priority=50 hosts=subnet=2001:db8::/32 protocol=tcp ports=80,443",
    "dir=in action=allow priority=60 hosts=subnet=192.0.2.0/24 protocol=udp",
    "dir=in action=deny priority=70 protocol=icmp6:128,1",
    "dir=in action=deny priority=80 hosts=subnet=10.0.0.2/32 protocol=tcp ports=7",
]
# xde0's external addresses: g1's SNAT IP as the lab gives it, and an IPv6
# one beside it (the range is both families'); and sled2's xde0's (g2): the
# lab's floating IP, and an IPv6 one. tests/model/gen.py's NAT traffic is
# made for them.
EXTERNAL, EXTERNAL_G2 = G1_EXTERNAL, G2_EXTERNAL
_added = []
_saved_external = {}          # (sled, port) -> its external addresses before install


def external_ips(ext):
    """xde.nat_cfg_of's form -> xdectl.nat.ExternalIPs."""
    return nat.ExternalIPs(tuple(ext.get("snat", ())), ext.get("snat_start"),
                           ext.get("snat_end"), tuple(ext.get("ephemeral", ())),
                           tuple(ext.get("floating", ())))


def give_external(lab, sled, port, ext):
    """Set a port's external addresses (xdectl.nat), remembering what it had
    for take_external()."""
    root = lab.root(sled)
    with lab.inside(sled):
        if (sled, port) not in _saved_external:
            with session(root) as (dp, _):
                index, _ = dp.port(port)
                _saved_external[sled, port] = nat.read(dp.maps(), index)
        nat.set_external_ips(root, port, external_ips(ext))


def take_external(lab, sled, port):
    """Put back what give_external() found (nothing, once gone)."""
    ext = _saved_external.pop((sled, port), None)
    if ext is None:
        return
    with lab.inside(sled):
        try:
            nat.set_external_ips(lab.root(sled), port, ext)
        except XdeError:
            pass


def _quiet(lab, guest="g1"):
    """Stop the guest's DHCP clients (its addresses stay): their renewals
    and solicitations would reach the real TC hook between a test run's
    counter reads."""
    try:
        lab.stop_dhcp(guest, keep_leases=True)
    except TypeError:
        lab.stop_dhcp(guest)


def _resume(lab, guest="g1"):
    from xdelab.lab import GUESTS
    lab.configure_guests({guest: GUESTS[guest]})


def install(lab, sled="sled1"):
    _quiet(lab)
    root = lab.root(sled)
    with lab.inside(sled):
        for ip, mac, ul, vni in EXTRA_V2P:
            overlay.set_v2p(root, ip, mac, ul, vni)
        for dest, target in EXTRA_ROUTES:
            overlay.add_router_entry(root, "xde0", dest, target)
        for line in EXTRA_RULES:
            rule = fw.parse_line(line)
            _added.append((rule.direction, fw.add_rule(root, "xde0", rule)))
    give_external(lab, sled, "xde0", EXTERNAL)


def uninstall(lab, sled="sled1"):
    """Take the extra state away (what is gone already is no error)."""
    root = lab.root(sled)
    with lab.inside(sled):
        undo = [(fw.rm_rule, (root, "xde0", *r)) for r in _added]
        undo += [(overlay.del_router_entry, (root, "xde0", dest)) for dest, _ in EXTRA_ROUTES]
        undo += [(overlay.clear_v2p, (root, *m)) for m in EXTRA_V2P]
        _added.clear()
        for fn, args in undo:
            try:
                fn(*args)
            except XdeError:
                pass
    take_external(lab, sled, "xde0")
    _resume(lab)


def offline_instance():
    """A model Instance of sled1 as the lab builds it (xde0 dual-stack, its
    system routes, V2P and default rules, the gateway's templates as
    xdectl makes them), without a lab: for checking the model itself."""
    import ipaddress
    from types import SimpleNamespace

    from frames import (BSVC_ADDR, G1_IP, G1_IP6, G1_MAC, G2_IP, G2_IP6, G2_MAC, GW_IP, GW_LL,
                        GW_MAC, SUBNET, SUBNET6, U1_ADDR, U2_ADDR, mac)
    from xdectl import gateway

    from .xde import FwRule, Instance, Port, Route, a16, nat_cfg_of

    def a(s):
        return ipaddress.ip_address(s).packed

    tmpl = gateway.templates(SimpleNamespace(mac=G1_MAC, gw_mac=GW_MAC, ip=G1_IP, gw_ip=GW_IP,
                                             ip6=G1_IP6, mtu=1500, dns=[], hostname=None,
                                             domain=None))
    ifindex = 2
    inst = Instance(underlay_addr=a(U1_ADDR), hash_seed=0x5EED)
    inst.ports[ifindex] = Port(
        ifindex=ifindex, name="xde0", mac=mac(G1_MAC), gw_mac=mac(GW_MAC), ip=a(G1_IP),
        gw_ip=a(GW_IP), vni=10, bsvc_vni=99, bsvc_addr=a(BSVC_ADDR),
        subnet=ipaddress.IPv4Network(SUBNET), mtu=1500, ip6=a(G1_IP6),
        subnet6=ipaddress.IPv6Network(SUBNET6), gw_ip6=a(GW_LL), templates=tmpl,
        nat=nat_cfg_of(EXTERNAL, 1))
    inst.routes[ifindex] = [Route(ipaddress.ip_network(d), t, system=True) for d, t in (
        (SUBNET, "sub4"), ("0.0.0.0/0", "ig"), (SUBNET6, "sub6"), ("::/0", "ig"))]
    for ip, m, ul in ((G2_IP, G2_MAC, U2_ADDR), (G2_IP6, G2_MAC, U2_ADDR),
                      (G1_IP, G1_MAC, U1_ADDR), (G1_IP6, G1_MAC, U1_ADDR)):
        inst.v2p[(10, a16(a(ip)))] = (mac(m), a(ul))
    inst.rules[(ifindex, "in")] = [FwRule(1, 65535, "allow", vni=10, vni_mask=0xFFFFFFFF),
                                   FwRule(2, 65535, "allow", proto=1),
                                   FwRule(3, 65535, "allow", proto=58)]
    return inst
