"""What xdectl writes into the maps and reads back, for both address
families, against the key and value layouts of bpf/ (tests/cmaps.py builds
them from the C declarations): V2P keys, route keys and values, firewall
rules, a port's settings, and the state an overlay port is created with and
deleted without. No root needed."""
import ipaddress

import pytest
from cmaps import fake_maps

from xdectl import abi, fw, gateway, overlay, ports
from xdectl.errors import XdeError
from xdectl.maps import V4_MAPPED, addr16, addr_str, port_ips

PORT = 7


def mapped(v4):
    return V4_MAPPED + ipaddress.IPv4Address(v4).packed


def v6(a):
    return ipaddress.IPv6Address(a).packed


# --- addresses -------------------------------------------------------------

@pytest.mark.parametrize("addr,raw", [
    ("10.0.0.1", mapped("10.0.0.1")), ("0.0.0.0", mapped("0.0.0.0")),
    ("fd10::1", v6("fd10::1")), ("::", bytes(16)), ("2001:db8::ffff:1", v6("2001:db8::ffff:1")),
])
def test_addresses_round_trip(addr, raw):
    assert addr16(addr) == raw and addr_str(raw) == addr


# --- V2P -----------------------------------------------------------------------

@pytest.mark.parametrize("ip,raw", [("10.0.0.2", mapped("10.0.0.2")), ("fd10::2", v6("fd10::2"))])
def test_v2p_key_of_either_family(ip, raw):
    maps = fake_maps("v2p")
    overlay.put_v2p(maps, ip, "a8:40:25:ff:00:02", "fd00:2::1", 10)
    [(k, v)] = maps["v2p"].items()
    assert k.vni == 10 and bytes(k.ip) == raw and addr_str(k.ip) == ip
    assert bytes(v.mac) == bytes.fromhex("a84025ff0002") and bytes(v.underlay) == v6("fd00:2::1")
    assert maps["v2p"].get(overlay.v2p_key(maps["v2p"], 10, ip)) is not None


def test_v2p_families_do_not_collide():
    maps = fake_maps("v2p")
    for ip in ("10.0.0.2", "fd10::2", "::a00:2"):    # the last: 10.0.0.2's bytes, unmapped
        overlay.put_v2p(maps, ip, "a8:40:25:ff:00:02", "fd00:2::1", 10)
    assert sorted(addr_str(k.ip) for k in maps["v2p"].keys()) == \
        sorted(["10.0.0.2", "fd10::2", "::a00:2"])


# --- routes --------------------------------------------------------------------

ROUTES = [
    # dest, target, key prefixlen, key family, value target, value addr, len, plen
    ("10.0.0.0/24", "sub4=10.0.0.0/24", 64 + 96 + 24, 4, abi.RT_SUB4, mapped("10.0.0.0"), 24, 24),
    ("0.0.0.0/0", "ig", 64 + 96, 4, abi.RT_IG, bytes(16), 0, 0),
    ("192.168.1.7/32", "ip4=10.0.0.9", 64 + 128, 4, abi.RT_IP4, mapped("10.0.0.9"), 32, 32),
    ("fd10::/64", "sub6=fd10::/64", 64 + 64, 6, abi.RT_SUB6, v6("fd10::"), 64, 64),
    ("::/0", "ig", 64, 6, abi.RT_IG, bytes(16), 0, 0),
    ("fd20::/48", "ip6=fd10::9", 64 + 48, 6, abi.RT_IP6, v6("fd10::9"), 128, 48),
    ("fd20::5/128", "drop", 64 + 128, 6, abi.RT_DROP, bytes(16), 0, 128),
]


@pytest.mark.parametrize("dest,target,plen_key,family,kind,addr,length,plen", ROUTES,
                         ids=[r[0] for r in ROUTES])
def test_route_key_and_value(dest, target, plen_key, family, kind, addr, length, plen):
    maps = fake_maps("routes", "routes_sys")
    overlay.put_route(maps, PORT, dest, target)
    [(k, v)] = maps["routes"].items()
    net = ipaddress.ip_network(dest)
    assert (k.prefixlen, k.port, k.family) == (plen_key, PORT, family)
    assert bytes(k.ip) == addr16(net.network_address)
    assert (v.target, bytes(v.addr), v.len, v.plen) == (kind, addr, length, plen)
    assert overlay.port_routes(maps, PORT) == [{"dest": dest, "target": target, "kind": "custom"}]


def test_port_routes_order_and_other_ports():
    maps = fake_maps("routes", "routes_sys")
    for dest, target, *_ in ROUTES:
        overlay.put_route(maps, PORT, dest, target, system=True)
    overlay.put_route(maps, PORT, "fd10::/64", "drop")
    overlay.put_route(maps, PORT + 1, "10.9.0.0/16", "drop")
    got = [(r["dest"], r["target"], r["kind"]) for r in overlay.port_routes(maps, PORT)]
    assert got == [
        ("192.168.1.7/32", "ip4=10.0.0.9", "system"), ("10.0.0.0/24", "sub4=10.0.0.0/24", "system"),
        ("0.0.0.0/0", "ig", "system"),
        ("fd20::5/128", "drop", "system"), ("fd10::/64", "drop", "custom"),
        ("fd10::/64", "sub6=fd10::/64", "system"), ("fd20::/48", "ip6=fd10::9", "system"),
        ("::/0", "ig", "system"),
    ]
    overlay.remove_port_routes(maps, PORT)
    assert [r["dest"] for r in overlay.port_routes(maps, PORT + 1)] == ["10.9.0.0/16"]
    assert not maps["routes_sys"].keys()


@pytest.mark.parametrize("target,canon", [("sub6=FD10:0::/64", "sub6=fd10::/64"),
                                          ("ip6=fd10:0:0::9", "ip6=fd10::9"), ("ig", "ig")])
def test_targets_read_back_as_canonicalised(target, canon):
    maps = fake_maps("routes", "routes_sys")
    overlay.put_route(maps, PORT, "fd20::/48", target)
    assert overlay.canon_target(target) == canon
    assert overlay.port_routes(maps, PORT)[0]["target"] == canon


# --- firewall rules -------------------------------------------------------------

RULES = [
    "dir=in action=allow priority=1 hosts=ip=10.0.0.5 protocol=tcp ports=22,80",
    "dir=in action=allow priority=2 hosts=subnet=10.0.0.0/24 protocol=icmp:8 ports=any",
    "dir=in action=allow priority=3 hosts=subnet=0.0.0.0/0 protocol=udp ports=53",
    "dir=in action=allow priority=4 hosts=ip=fd10::5 protocol=icmp6:128,0 ports=any",
    "dir=in action=deny priority=5 hosts=subnet=fd10::/64 protocol=icmp6 ports=any",
    "dir=in action=allow priority=6 hosts=subnet=2001:db8::/32 protocol=any ports=any",
    "dir=in action=allow priority=7 hosts=vni=10 protocol=any ports=any",
    "dir=out action=deny priority=8 hosts=any protocol=arp ports=any",
]


@pytest.mark.parametrize("line", RULES)
def test_rule_round_trip(line):
    rule = fw.parse_line(line)
    leaf = fake_maps("fw_rules")["fw_rules"].Leaf().r[0]
    fw._encode(rule, leaf)
    assert fw._decode(rule.direction, leaf).text() == line


@pytest.mark.parametrize("hosts,host,mask_bits", [
    ("ip=10.0.0.5", mapped("10.0.0.5"), 128),
    ("subnet=10.0.0.0/24", mapped("10.0.0.0"), 96 + 24),
    ("subnet=0.0.0.0/0", mapped("0.0.0.0"), 96),
    ("ip=fd10::5", v6("fd10::5"), 128),
    ("subnet=fd10::/64", v6("fd10::"), 64),
    ("any", bytes(16), 0),
    ("vni=10", bytes(16), 0),
])
def test_rule_host_and_mask(hosts, host, mask_bits):
    leaf = fake_maps("fw_rules")["fw_rules"].Leaf().r[0]
    fw._encode(fw.parse_rule("in", "allow", 1, hosts), leaf)
    mask = ((1 << 128) - (1 << (128 - mask_bits))).to_bytes(16, "big")
    assert (bytes(leaf.host), bytes(leaf.host_mask)) == (host, mask)


@pytest.mark.parametrize("protocol,proto,icmp,icmp_mask", [
    ("icmp6", 58, 0, 0), ("icmp6:135", 58, 135 << 8, 0xFF00), ("icmp6:1,4", 58, 1 << 8 | 4, 0xFFFF),
    ("icmp:3,4", 1, 3 << 8 | 4, 0xFFFF), ("tcp", 6, 0, 0),
])
def test_rule_protocol(protocol, proto, icmp, icmp_mask):
    leaf = fake_maps("fw_rules")["fw_rules"].Leaf().r[0]
    fw._encode(fw.parse_rule("in", "allow", 1, "any", protocol), leaf)
    assert (leaf.proto, leaf.icmp, leaf.icmp_mask) == (proto, icmp, icmp_mask)


def test_rule_set_round_trip_through_the_map():
    maps = fake_maps("fw_rules", "fw_hits", "ports")
    fw.write_rules(maps, PORT, [fw.parse_line(line) for line in RULES])
    assert sorted(r.text() for r in fw.read_rules(maps, PORT)) == sorted(RULES)


@pytest.mark.parametrize("ip4,ip6,protocols", [
    (True, False, ["any", "icmp"]), (False, True, ["any", "icmp6"]),
    (True, True, ["any", "icmp", "icmp6"]),
])
def test_default_rules_follow_the_families(ip4, ip6, protocols):
    rules = fw.default_rules(10, ip4, ip6)
    assert [r.protocol for r in rules] == protocols
    assert rules[0].hosts == "vni=10"
    assert {(r.direction, r.action, r.priority) for r in rules} == {("in", "allow", 65535)}


# --- a port's settings and the state it is created with ---------------------------

def spec(**over):
    s = ports.PortSpec("xde0", "u1", "u2", "a8:40:25:ff:00:01", "10.0.0.1", "a8:40:25:00:00:01",
                       "172.30.0.5", "fd00:99::1", 99, 10, "fd00:1::1", None, False,
                       ip6="fd10::1", dns=["10.0.0.53", "fd10::53"], hostname="web1",
                       domain="vpc.example")
    for k, v in over.items():
        setattr(s, k, v)
    return s.validated()


OVERLAY_MAPS = ("ports", "config", "v2p", "routes", "routes_sys", "fw_rules", "fw_hits", "flows",
                "gw_tmpl", "nat_cfg", "nat_flows", "snat_ports")


class NoUndo:
    def add(self, *step):
        pass


def overlay_port(s, root_underlay=None, undo=None):
    """maps holding the overlay state of port s; the config map's underlay
    address is root_underlay (default: s's)."""
    maps = fake_maps(*OVERLAY_MAPS)
    cfg = maps["config"].Leaf()
    cfg.underlay_addr[:] = list(v6(root_underlay or s.underlay_addr))
    maps["config"].set(maps["config"].Key(0), cfg)
    pc = ports.port_cfg(maps["ports"].Leaf(), s, PORT, 1500)
    maps["ports"].set(maps["ports"].Key(PORT), pc)
    ports._overlay_state(maps, PORT, pc, s, undo or NoUndo())
    return maps, pc


def test_port_cfg_of_a_dual_stack_port():
    pc = ports.port_cfg(fake_maps("ports")["ports"].Leaf(), spec(), PORT, 1430)
    assert pc.flags == abi.PORT_F_IP4 | abi.PORT_F_IP6
    assert port_ips(pc) == ("10.0.0.1", "fd10::1")
    assert bytes(pc.ip6) == v6("fd10::1") and bytes(pc.subnet6) == v6("fd10::")
    assert pc.subnet6_len == 64 and pc.subnet_len == 24
    assert addr_str(pc.gw_ip6) == "fe80::aa40:25ff:fe00:1" == gateway.gateway_ll("a8:40:25:00:00:01")
    assert (pc.mtu, pc.name, pc.peer) == (1430, b"xde0", b"xde0_dp")


def test_port_cfg_of_single_family_ports():
    pc = ports.port_cfg(fake_maps("ports")["ports"].Leaf(), spec(ip=None, dns=["fd10::53"],
                                                                  hostname=None), PORT, 1500)
    assert pc.flags == abi.PORT_F_IP6 and (pc.ip, pc.subnet, pc.subnet_len) == (0, 0, 0)
    assert port_ips(pc) == (None, "fd10::1") and pc.gw_ip != 0     # the gateway IPv4 stays
    pc = ports.port_cfg(fake_maps("ports")["ports"].Leaf(), spec(ip6=None, dns=[], passthrough=True,
                                                                  hostname=None, domain=None),
                        PORT, 1500)
    assert pc.flags == abi.PORT_F_IP4 | abi.PORT_F_PASSTHROUGH and bytes(pc.ip6) == bytes(16)


@pytest.mark.parametrize("over,v2p,routes,protocols,kinds", [
    ({}, ["10.0.0.1", "fd10::1"],
     [("10.0.0.0/24", "sub4=10.0.0.0/24"), ("0.0.0.0/0", "ig"), ("fd10::/64", "sub6=fd10::/64"),
      ("::/0", "ig")], ["any", "icmp", "icmp6"],
     [abi.GW_DHCP4, abi.GW_RA, abi.GW_NA, abi.GW_DHCP6, abi.GW_DHCP6_STATUS]),
    (dict(ip6=None, dns=["10.0.0.53"]), ["10.0.0.1"],
     [("10.0.0.0/24", "sub4=10.0.0.0/24"), ("0.0.0.0/0", "ig")], ["any", "icmp"], [abi.GW_DHCP4]),
    (dict(ip=None, dns=["fd10::53"], hostname=None, vpc_subnet6="fd10::/48"), ["fd10::1"],
     [("fd10::/48", "sub6=fd10::/48"), ("::/0", "ig")], ["any", "icmp6"],
     [abi.GW_RA, abi.GW_NA, abi.GW_DHCP6, abi.GW_DHCP6_STATUS]),
], ids=["dual", "ipv4", "ipv6"])
def test_overlay_state_made_and_removed(over, v2p, routes, protocols, kinds):
    s = spec(**over)
    maps, pc = overlay_port(s)
    assert sorted(addr_str(k.ip) for k in maps["v2p"].keys()) == sorted(v2p)
    assert {k.vni for k in maps["v2p"].keys()} == {10}
    assert [(r["dest"], r["target"]) for r in overlay.port_routes(maps, PORT)] == routes
    assert not maps["routes"].keys()                  # system routes only
    assert [r.protocol for r in fw.read_rules(maps, PORT)] == protocols
    assert sorted(k.kind for k in maps["gw_tmpl"].keys()) == kinds
    for k, v in maps["gw_tmpl"].items():
        assert k.port == PORT and 0 < v.len <= abi.GW_TMPL_MAX
    assert ports.gateway_settings(maps, PORT) == {"dns": s.dns, "hostname": s.hostname,
                                                   "domain": s.domain}

    ports._remove_overlay_state(maps, PORT, pc)
    # fw_hits is an array: its counters stay, as they do in the kernel
    left = {n: len(maps[n].keys()) for n in OVERLAY_MAPS if n not in ("ports", "config", "fw_hits")}
    assert left == {n: 0 for n in left}


def test_own_v2p_changed_since_create_is_kept():
    s = spec()
    maps, pc = overlay_port(s)
    overlay.put_v2p(maps, "fd10::1", "a8:40:25:ff:00:99", "fd00:1::1", 10)
    ports._remove_overlay_state(maps, PORT, pc)
    assert [addr_str(k.ip) for k in maps["v2p"].keys()] == ["fd10::1"]


def test_rollback_removes_own_v2p_whatever_underlay_address_the_root_holds():
    """A create that fails after the port's overlay state is written, on a
    root whose ports are all gone: the config map still holds the underlay
    address of the root's earlier ports (the new one is written later, at
    underlay.attach), yet the rollback removes the port's own mappings."""
    undo = ports.Undo()
    maps, pc = overlay_port(spec(), root_underlay="fd00:1::9", undo=undo)
    assert {bytes(v.underlay) for _, v in maps["v2p"].items()} == {v6("fd00:1::1")}
    undo.run()
    left = {n: len(maps[n].keys()) for n in OVERLAY_MAPS if n not in ("ports", "config", "fw_hits")}
    assert left == {n: 0 for n in left}


def test_gateway_settings_rewritten_in_place():
    maps, pc = overlay_port(spec())
    before = dict(maps["gw_tmpl"].data)
    ports._write_gateway(maps, PORT, pc, ["10.0.0.54"], None, "other.example")
    assert ports.gateway_settings(maps, PORT) == {"dns": ["10.0.0.54"], "hostname": None,
                                                   "domain": "other.example"}
    assert set(maps["gw_tmpl"].data) == set(before)   # the same kinds, new frames
    assert maps["gw_tmpl"].data != before


def test_a_failed_rewrite_puts_back_every_previous_reply(monkeypatch):
    """All templates are built first; a write that fails part-way puts the
    previous frames back: no mix of old and new replies."""
    maps, pc = overlay_port(spec())
    m = maps["gw_tmpl"]
    before, real, writes = dict(m.data), m.set, []

    def failing_set(key, value, flags=0):
        writes.append(key)
        if len(writes) == 3:           # the DHCPv4 reply and the RA are written by then
            raise OSError(12, "Cannot allocate memory")
        real(key, value, flags)
    monkeypatch.setattr(m, "set", failing_set)
    with pytest.raises(OSError):
        ports._write_gateway(maps, PORT, pc, ["10.0.0.54"], None, "other.example")
    assert m.data == before
    # a refused setting writes nothing at all
    writes.clear()
    with pytest.raises(XdeError):
        ports._write_gateway(maps, PORT, pc, [], None, "d" * 64)
    assert writes == [] and m.data == before


def test_unreadable_templates_are_reported_not_raised():
    """One port's malformed template must not stop list (or apply) for the
    whole root: its settings read as None, with the reason."""
    maps, pc = overlay_port(spec())
    assert ports._readable_gateway(maps, PORT) == {
        "dns": ["10.0.0.53", "fd10::53"], "hostname": "web1", "domain": "vpc.example",
        "gateway_error": None}
    m = maps["gw_tmpl"]
    k = ports._tmpl_key(m, PORT, abi.GW_DHCP6)
    v = m.get(k)
    v.len = 20
    m.set(k, v)
    got = ports._readable_gateway(maps, PORT)
    assert (got["dns"], got["hostname"], got["domain"]) == (None, None, None)
    assert "malformed" in got["gateway_error"] and "\n" not in got["gateway_error"]


def test_passthrough_port_reads_no_gateway_settings():
    maps = fake_maps("gw_tmpl")
    assert ports.gateway_settings(maps, PORT) == {"dns": [], "hostname": None, "domain": None}
