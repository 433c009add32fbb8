"""The fleet without root or etcd (docs/fleet.md): the fleet file's checks,
the etcd key layout, apply/status/dump against an in-memory etcd, each
sled's share of the fleet (sled_desired), the boundary's NAT table, the etcd
URL parsing, and the agent's systemd unit. The agent against a real etcd
and real roots is tested elsewhere (it needs root)."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomli_w

from netns import XDECTL, one_error_line
from xdectl import agent, apply, etcd, fleet, fw
from xdectl.errors import XdeError

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
EXAMPLE = DEPLOY / "fleet.example.toml"

A, B = "fd00:1::1", "fd00:2::1"      # sled-a's and sled-b's underlay addresses

VPC10 = {"vni": 10, "subnet": "10.0.0.0/24", "subnet6": "fd10::/64",
         "gateway_mac": "a8:40:25:00:00:01", "gateway_ip": "10.0.0.1",
         "boundary_services": "fd00:99::1", "boundary_vni": 99,
         "dns": ["10.0.0.53", "fd10::53"], "domain": "vpc.example"}
VPC20 = {"vni": 20, "subnet": "10.20.0.0/24", "gateway_mac": "a8:40:25:00:00:02",
         "gateway_ip": "10.20.0.1", "boundary_services": "fd00:99::1", "boundary_vni": 99}
VPC30 = dict(VPC20, vni=30, subnet="10.30.0.0/24", gateway_ip="10.30.0.1")


def port(name, sled, vni, mac, **kw):
    return {"name": name, "sled": sled, "vni": vni, "mac": mac, **kw}


# sled-a: a1 (VNI 10, dual stack), a2 (VNI 20); sled-b: b1 (VNI 10), b2 (VNI 30);
# sled-c (never registered in these tests): c1 (VNI 10)
PORTS = [
    port("a1", "sled-a", 10, "a8:40:25:ff:00:01", ip="10.0.0.10", ip6="fd10::10",
         ephemeral_ip="192.0.2.30",
         routes=[{"dest": "192.168.0.0/16", "target": "ip4=10.0.0.11"}],
         firewall=["dir=in action=allow priority=65535 hosts=vni=10"]),
    port("a2", "sled-a", 20, "a8:40:25:ff:00:21", ip="10.20.0.10"),
    port("b1", "sled-b", 10, "A8:40:25:FF:00:02", ip="10.0.0.11", ip6="fd10::11",
         snat_ip=["192.0.2.5", "2001:0DB8::5"], snat_start=1024, snat_end=2047,
         floating_ips=["192.0.2.20"]),
    port("b2", "sled-b", 30, "a8:40:25:ff:00:31", ip="10.30.0.11"),
    port("c1", "sled-c", 10, "a8:40:25:ff:00:03", ip="10.0.0.12", floating_ips=["192.0.2.21"]),
]


def text(vpcs=(VPC10, VPC20, VPC30), ports=PORTS):
    doc = {}
    if vpcs:
        doc["vpc"] = list(vpcs)
    if ports:
        doc["port"] = list(ports)
    return tomli_w.dumps(doc)


def with_port(**changes):
    """The test fleet with port a1 changed (a key None: removed)."""
    p = {k: v for k, v in dict(PORTS[0], **changes).items() if v is not None}
    return text(ports=[p] + PORTS[1:])


def refused(source_text):
    with pytest.raises(XdeError) as exc:
        fleet.parse(source_text)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("FILE"), msg
    return msg


# --- the fleet file ----------------------------------------------------------------------

def test_the_example_file_is_a_fleet():
    f = fleet.load(str(EXAMPLE))
    assert sorted(f.vpcs) == [10, 20]
    assert len(f.ports) >= 3
    sleds = {p["sled"] for p in f.ports.values()}
    assert 2 <= len(sleds) <= 3
    assert any("ip" in p and "ip6" in p for p in f.ports.values()), "no dual-stack port"
    assert any(apply.EXTERNAL_FIELDS & set(p) for p in f.ports.values()), "no external IPs"
    assert any(p.get("routes") for p in f.ports.values()), "no routes"
    assert any(p.get("firewall") for p in f.ports.values()), "no firewall"
    # and it is what this module's parse takes from the text as well
    assert fleet.parse(EXAMPLE.read_text()) == f


def test_the_test_fleet_parses():
    f = fleet.parse(text())
    assert sorted(f.vpcs) == [10, 20, 30] and sorted(f.ports) == ["a1", "a2", "b1", "b2", "c1"]
    assert f.ports["a1"] == PORTS[0]       # kept as written: agents derive the rest


BAD = [
    # unknown keys
    (with_port(colour="red"), "port #1: unknown key colour"),
    (text(vpcs=[dict(VPC10, mtu=1500), VPC20, VPC30]), "vpc #1: unknown key mtu"),
    (text() + '[[v2p]]\nip = "10.0.0.99"\nmac = "a8:40:25:ff:00:99"\n'
     'underlay = "fd00:9::1"\nvni = 10\n', "unknown key v2p"),
    (with_port(underlay_addr="fd00:1::1"), "unknown key underlay_addr"),
    (with_port(vpc_subnet="10.0.0.0/24"), "unknown key vpc_subnet"),
    # required keys
    (with_port(sled=None), "port #1: missing sled"),
    (with_port(mac=None), "port #1: missing mac"),
    (with_port(vni=None), "port #1: missing vni"),
    (with_port(ip=None, ip6=None), "port #1: missing ip (or ip6)"),
    (text(vpcs=[{k: v for k, v in VPC10.items() if k != "gateway_mac"}, VPC20, VPC30]),
     "vpc #1: missing gateway_mac"),
    (text(vpcs=[{k: v for k, v in VPC10.items() if k not in ("subnet", "subnet6")},
                VPC20, VPC30], ports=[]), "vpc #1: missing subnet (or subnet6)"),
    # VNIs
    (text(vpcs=[VPC10, dict(VPC20, vni=16777216), VPC30]), "vpc #2: vni 16777216 is outside"),
    (text(vpcs=[VPC10, dict(VPC20, vni="x"), VPC30]), "vpc #2: vni must be an integer, not 'x'"),
    (text(vpcs=[VPC10, dict(VPC20, vni=20.0), VPC30]), "vpc #2: vni must be an integer"),
    (text(vpcs=[VPC10, dict(VPC20, boundary_vni=True), VPC30]),
     "vpc #2: boundary_vni must be an integer"),
    (text(vpcs=[VPC10, VPC20, VPC30, dict(VPC20, subnet="10.21.0.0/24")]),
     "vpc 20: a second VPC with that VNI"),
    (with_port(vni=40), "port a1: VNI 40 is no [[vpc]] of the file"),
    (with_port(vni="10"), "port a1: VNI '10' is no [[vpc]] of the file"),
    (with_port(vni=10.0), "port a1: VNI 10.0 is no [[vpc]] of the file"),
    (with_port(vni=True), "port a1: VNI True is no [[vpc]] of the file"),
    # addresses and subnets
    (text(ports=[port("x", "sled-a", 20, "a8:40:25:ff:00:99", ip6="fd10::99")]),
     "port x: ip6 given, but VPC 20 has no subnet6"),
    (with_port(ip="10.9.0.10"), "port a1: --ip 10.9.0.10 is not inside --vpc-subnet 10.0.0.0/24"),
    (with_port(ip6="fd11::10"), "port a1: --ip6 fd11::10 is not inside --vpc-subnet6"),
    (text(vpcs=[dict(VPC10, subnet="10.0.0.1/24"), VPC20, VPC30]), "vpc 10: subnet"),
    (text(vpcs=[dict(VPC10, dns="10.0.0.53"), VPC20, VPC30]), "vpc 10: dns must be a list"),
    (with_port(mac="ff:ff:ff:ff:ff:ff"), "port a1: "),
    # across ports
    (text(ports=PORTS + [dict(PORTS[1], sled="sled-b")]), "port a2: a second port of that name"),
    (text(ports=PORTS + [port("x", "sled-c", 10, "a8:40:25:ff:00:01", ip="10.0.0.99")]),
     "port x: MAC a8:40:25:ff:00:01 in VNI 10 is port a1's too"),
    (text(ports=PORTS + [port("x", "sled-c", 10, "a8:40:25:ff:00:99", ip="10.0.0.11")]),
     "port x: address 10.0.0.11 in VNI 10 is port b1's too"),
    (text(ports=PORTS + [port("x", "sled-c", 10, "a8:40:25:ff:00:99", ip6="fd10:0::0:10")]),
     "port x: address fd10::10 in VNI 10 is port a1's too"),
    (text(ports=PORTS + [port("longportname1", "sled-a", 20, "a8:40:25:ff:00:98",
                              ip="10.20.0.98"),
                         port("longportname2", "sled-a", 20, "a8:40:25:ff:00:99",
                              ip="10.20.0.99")]),
     "port longportname2: on sled sled-a the link longportname_dp is port longportname1's too"),
    # a port named as another's datapath end
    (text(ports=PORTS + [port("a2_dp", "sled-a", 20, "a8:40:25:ff:00:99", ip="10.20.0.99")]),
     "port a2_dp: on sled sled-a the link a2_dp is port a2's too"),
    # sled names
    (with_port(sled="sled a"), "port a1: sled 'sled a': 1 to 63 of"),
    (with_port(sled="-a"), "port a1: sled '-a'"),
    (with_port(sled="s" * 64), "port a1: sled 'sss"),
    (with_port(sled=7), "port a1: sled 7"),
    # external addresses, across sleds
    (text(ports=PORTS + [port("x", "sled-a", 20, "a8:40:25:ff:00:99", ip="10.20.0.99",
                              floating_ips=["192.0.2.20"])]),
     "port x: external IP 192.0.2.20 is port b1's: a floating or ephemeral IP belongs to one "
     "port only"),
    (text(ports=PORTS + [port("x", "sled-c", 10, "a8:40:25:ff:00:99", ip="10.0.0.99",
                              ephemeral_ip="192.0.2.5")]),
     "port x: external IP 192.0.2.5 is port b1's"),
    (text(ports=PORTS + [port("x", "sled-c", 10, "a8:40:25:ff:00:99", ip="10.0.0.99",
                              snat_ip="192.0.2.5", snat_start=2047, snat_end=3000)]),
     "port x: SNAT range 2047-3000 of 192.0.2.5 overlaps port b1's 1024-2047"),
    # the same address spelt another way is the same address
    (text(ports=PORTS + [port("x", "sled-a", 10, "a8:40:25:ff:00:99", ip6="fd10::99",
                              snat_ip="2001:db8:0::5", snat_start=1, snat_end=1024)]),
     "port x: SNAT range 1-1024 of 2001:db8::5 overlaps port b1's 1024-2047"),
    (with_port(snat_ip="192.0.2.9"), "port a1: --snat-ip needs --snat-start and --snat-end"),
    # TOML, routes, firewall
    ("[[port]\nname = 1\n", "FILE: "),
    ('vpc = "x"\n', "FILE: vpc and port are arrays of tables"),
    (with_port(firewall=["dir=in action=maybe priority=1"]), "port a1: firewall rule 1: "),
    (with_port(firewall="dir=in action=allow priority=1"), "port a1: firewall must be a list"),
    (with_port(routes=[{"dest": "10.1.0.0/16", "target": "sideways"}]),
     "port a1: target 'sideways' is not one of drop"),
    (with_port(routes=[{"dest": "10.1.0.0/16"}]), "port a1: a route needs dest and target"),
    (with_port(routes=[{"dest": "fd20::/48", "target": "ip4=10.0.0.2"}]), "port a1: "),
]


@pytest.mark.parametrize("bad,words", BAD, ids=[w[:40] for _, w in BAD])
def test_a_bad_fleet_file_is_one_clear_line(bad, words):
    msg = refused(bad)
    assert words in msg, msg
    if words.startswith(("port ", "vpc ")):     # where, then what
        assert msg.startswith("FILE " + words), msg


def test_what_may_repeat_across_vnis_and_sleds():
    # the same MAC and address in two VNIs; ports whose first 12 characters
    # agree on two sleds; one SNAT IP with disjoint ranges on three sleds
    extra = [port("x", "sled-a", 30, "a8:40:25:ff:00:01", ip="10.30.0.10"),
             port("y", "sled-a", 20, "a8:40:25:ff:00:99", ip="10.20.0.11",
                  snat_ip="192.0.2.5", snat_start=2048, snat_end=4095),
             port("longportname1", "sled-a", 30, "a8:40:25:ff:00:98", ip="10.30.0.98"),
             port("longportname2", "sled-b", 30, "a8:40:25:ff:00:99", ip="10.30.0.99")]
    f = fleet.parse(text(ports=PORTS + extra))
    assert {"x", "y", "longportname1", "longportname2"} <= set(f.ports)


def test_the_cli_refuses_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "fleet.toml"
    bad.write_text(with_port(colour="red"))
    # etcd is not reached: the file is refused first
    p = subprocess.run([XDECTL, "fleet", "apply", str(bad), "--etcd", "http://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=60)
    line = one_error_line(p)
    assert f"{bad} port #1: unknown key colour" in line, line
    p = subprocess.run([XDECTL, "fleet", "apply", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, timeout=60)
    assert "cannot read" in one_error_line(p)


def test_an_unreachable_etcd_is_one_line():
    p = subprocess.run([XDECTL, "fleet", "status", "--etcd", "http://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=60)
    assert "etcd unreachable" in one_error_line(p)


def test_the_agent_refuses_bad_options_in_one_line():
    base = [XDECTL, "agent", "--etcd", "http://127.0.0.1:1", "--sled", "sled-a"]
    for extra, words in [([], "--underlay twice"),
                         (["--underlay", "u1", "--underlay-addr", A], "--underlay twice"),
                         (["--underlay", "u1", "--underlay", "u2", "--underlay-addr", "x"],
                          "--underlay-addr 'x' is not an IPv6 address")]:
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert words in one_error_line(p)
    p = subprocess.run([XDECTL, "agent", "--etcd", "nohttp", "--sled", "a", "--boundary"],
                       capture_output=True, text=True, timeout=60)
    assert "etcd URL 'nohttp'" in one_error_line(p)


# --- port_fields: what a port takes from its VPC --------------------------------------

@pytest.mark.parametrize("families,subnets,dns", [
    ({"ip": "10.0.0.10"}, {"vpc_subnet"}, ["10.0.0.53"]),
    ({"ip6": "fd10::10"}, {"vpc_subnet6"}, ["fd10::53"]),
    ({"ip": "10.0.0.10", "ip6": "fd10::10"}, {"vpc_subnet", "vpc_subnet6"},
     ["10.0.0.53", "fd10::53"]),
])
def test_port_fields_takes_the_vpc_settings_of_the_ports_families(families, subnets, dns):
    p = port("p", "sled-a", 10, "a8:40:25:ff:00:01", **families)
    f = fleet.port_fields(p, VPC10, ("u1", "u2"), A)
    assert {"vpc_subnet", "vpc_subnet6"} & set(f) == subnets
    assert f["dns"] == dns and f["domain"] == "vpc.example"
    assert f["underlays"] == ["u1", "u2"] and f["underlay_addr"] == A
    assert (f["gateway_mac"], f["gateway_ip"], f["boundary_services"], f["boundary_vni"]) == \
        ("a8:40:25:00:00:01", "10.0.0.1", "fd00:99::1", 99)
    assert "sled" not in f and "routes" not in f
    spec = apply.port_want(f, p, "p").spec      # and create takes them
    assert spec.dns == dns and spec.underlay_addr == A


def test_port_fields_passes_hostname_and_external_addresses():
    p = port("p", "sled-a", 20, "a8:40:25:ff:00:01", ip="10.20.0.5", hostname="h",
             snat_ip="192.0.2.5", snat_start=1, snat_end=2)
    f = fleet.port_fields(p, VPC20, ("u1", "u2"), A)
    assert (f["hostname"], f["snat_ip"], f["snat_start"], f["snat_end"]) == \
        ("h", "192.0.2.5", 1, 2)
    assert "dns" not in f and "domain" not in f and "vpc_subnet6" not in f


# --- the keys in etcd --------------------------------------------------------------------

def test_to_keys_and_from_keys_round_trip():
    f = fleet.parse(text())
    keys = fleet.to_keys(f)
    assert set(keys) == {f"/xde/fleet/vpc/{v}" for v in (10, 20, 30)} | \
        {f"/xde/fleet/port/{n}" for n in ("a1", "a2", "b1", "b2", "c1")}
    assert json.loads(keys["/xde/fleet/port/a1"]) == PORTS[0]
    keys[fleet.SLED + "sled-a"] = json.dumps({"underlay_addr": A})
    state = fleet.from_keys(keys)
    assert state.vpcs == f.vpcs and state.ports == f.ports and state.sleds == {"sled-a": A}


def test_from_keys_skips_what_fleet_apply_never_writes():
    keys = fleet.to_keys(fleet.parse(text()))
    keys.update({fleet.PORT + "j": "not json", fleet.PORT + "l": "[1]",
                 fleet.PORT + "s": json.dumps(port("s", ["sled-a"], 10, "a8:40:25:ff:00:77")),
                 fleet.PORT + "v": json.dumps(port("v", "sled-a", [10], "a8:40:25:ff:00:78")),
                 fleet.VPC + "40": json.dumps(dict(VPC20, vni=[40])),
                 fleet.VPC + "41": "", fleet.SLED + "x": "7"})
    state = fleet.from_keys(keys)
    assert sorted(state.ports) == ["a1", "a2", "b1", "b2", "c1"]
    assert sorted(state.vpcs) == [10, 20, 30] and state.sleds == {}
    want, problems = fleet.sled_desired(state, "sled-a", ("u1", "u2"), A)
    assert sorted(want.ports) == ["a1", "a2"] and problems == []


# --- one sled's share: sled_desired --------------------------------------------------------

def state_of(ports=PORTS, sleds=None, extra=None):
    keys = fleet.to_keys(fleet.Fleet({v["vni"]: v for v in (VPC10, VPC20, VPC30)},
                                     {p["name"]: p for p in ports}))
    for name, addr in (sleds if sleds is not None else {"sled-a": A, "sled-b": B}).items():
        keys[fleet.SLED + name] = json.dumps({"underlay_addr": addr})
    keys.update(extra or {})
    return fleet.from_keys(keys)


def test_sled_desired_holds_the_sleds_ports_and_the_v2p_of_their_vnis():
    want, problems = fleet.sled_desired(state_of(), "sled-a", ("u1", "u2"), A)
    assert problems == []
    assert sorted(want.ports) == ["a1", "a2"]
    a1 = want.ports["a1"]
    assert (a1.spec.underlay1, a1.spec.underlay2, a1.spec.underlay_addr) == ("u1", "u2", A)
    assert a1.spec.vpc_subnet6 == "fd10::/64" and a1.spec.dns == ["10.0.0.53", "fd10::53"]
    assert a1.routes == {"192.168.0.0/16": "ip4=10.0.0.11"}
    assert a1.firewall == [fw.parse_line(r).text() for r in PORTS[0]["firewall"]]
    assert want.ports["a2"].spec.vni == 20
    # every port of VNIs 10 and 20 on a registered sled; b2 (VNI 30, no port
    # of sled-a's) and c1 (sled-c is not registered) are absent
    assert want.v2p == {
        (10, "10.0.0.10"): ("a8:40:25:ff:00:01", A), (10, "fd10::10"): ("a8:40:25:ff:00:01", A),
        (20, "10.20.0.10"): ("a8:40:25:ff:00:21", A),
        (10, "10.0.0.11"): ("a8:40:25:ff:00:02", B), (10, "fd10::11"): ("a8:40:25:ff:00:02", B),
    }


def test_sled_desired_maps_its_own_ports_to_its_own_address():
    # sled-a not registered yet (or registered with another address): its
    # own ports are at the address it runs with
    for sleds in ({"sled-b": B}, {"sled-a": "fd00:9::9", "sled-b": B}):
        want, _ = fleet.sled_desired(state_of(sleds=sleds), "sled-a", ("u1", "u2"), A)
        assert want.v2p[(10, "10.0.0.10")] == ("a8:40:25:ff:00:01", A)
        assert want.v2p[(10, "10.0.0.11")] == ("a8:40:25:ff:00:02", B)


def test_a_port_on_an_unregistered_sled_waits():
    want, _ = fleet.sled_desired(state_of(sleds={"sled-a": A}), "sled-a", ("u1", "u2"), A)
    assert not any(k[1] in ("10.0.0.11", "fd10::11", "10.0.0.12") for k in want.v2p)
    want, _ = fleet.sled_desired(state_of(sleds={"sled-a": A, "sled-c": "fd00:3::1"}),
                                 "sled-a", ("u1", "u2"), A)
    assert want.v2p[(10, "10.0.0.12")] == ("a8:40:25:ff:00:03", "fd00:3::1")
    # sled-c's own share: its port, although sled-c registered nothing
    want, _ = fleet.sled_desired(state_of(), "sled-c", ("u1", "u2"), "fd00:3::1")
    assert list(want.ports) == ["c1"] and (10, "10.0.0.11") in want.v2p


def test_a_sled_with_no_ports_wants_nothing():
    want, problems = fleet.sled_desired(state_of(), "sled-z", ("u1", "u2"), A)
    assert want.ports == {} and want.v2p == {} and problems == []


def test_a_malformed_stored_port_is_a_problem_not_a_stop():
    bad = {fleet.PORT + "a3": json.dumps({"name": "a3", "sled": "sled-a", "vni": 10,
                                          "ip": "10.0.0.13"}),
           fleet.PORT + "a4": json.dumps(port("a4", "sled-a", 99, "a8:40:25:ff:00:44",
                                              ip="10.0.0.14")),
           fleet.PORT + "a5": json.dumps(port("a5", "sled-a", 10, "a8:40:25:ff:00:45",
                                              ip="10.9.9.9")),
           fleet.PORT + "b9": json.dumps(port("b9", "sled-b", 10, "nomac", ip="10.0.0.19"))}
    want, problems = fleet.sled_desired(state_of(extra=bad), "sled-a", ("u1", "u2"), A)
    assert sorted(want.ports) == ["a1", "a2"]
    assert len(problems) == 3, problems
    assert any(p.startswith("port a3: malformed") and "mac" in p for p in problems), problems
    assert "port a4: VNI 99 has no VPC" in problems
    assert any(p.startswith("port a5: ") and "not inside" in p for p in problems), problems
    # the malformed ports map nothing; the good ones are all there
    addrs = {ip for _, ip in want.v2p}
    assert not addrs & {"10.0.0.13", "10.0.0.14", "10.9.9.9", "10.0.0.19"}
    assert {"10.0.0.10", "10.0.0.11", "10.20.0.10"} <= addrs


def test_sled_desired_memo_is_reused():
    memo = {}
    state = state_of()
    first, _ = fleet.sled_desired(state, "sled-a", ("u1", "u2"), A, memo)
    assert len(memo) == 2
    again, _ = fleet.sled_desired(state, "sled-a", ("u1", "u2"), A, memo)
    assert again.ports["a1"] is first.ports["a1"] and len(memo) == 2


def test_the_agent_owns_the_root():
    """What the kernel holds beyond the sled's share is deleted by the plan."""
    state = state_of()
    want, _ = fleet.sled_desired(state, "sled-a", ("u1", "u2"), A)
    stray = apply.port_want(fleet.port_fields(PORTS[1] | {"name": "stray"}, VPC20,
                                              ("u1", "u2"), A), {}, "stray").spec
    cur = apply.Current({"a1": want.ports["a1"].spec, "stray": stray},
                        {"a1": want.ports["a1"].routes}, {"a1": list(want.ports["a1"].firewall)},
                        {})
    ops = [(a.op, a.target) for a in apply.plan(cur, want)]
    assert ("delete-port", "stray") in ops and ("create-port", "a2") in ops
    assert ("delete-port", "a1") not in ops and ("create-port", "a1") not in ops


def test_a_sled_holds_at_most_its_roots_ports():
    many = [port(f"p{i}", "sled-a", 20, f"a8:40:25:ee:{i >> 8:02x}:{i & 0xff:02x}",
                 ip6=f"fd20::{i + 1:x}") for i in range(fleet.XDE_MAX_PORTS + 1)]
    vpc = dict(VPC20, subnet6="fd20::/64")
    del vpc["subnet"]
    assert "sled sled-a has 1025 ports; a sled's root holds 1024" in refused(
        text(vpcs=[vpc], ports=many))
    fleet.parse(text(vpcs=[vpc], ports=many[:-1]))       # 1024 fit


def test_a_port_whose_links_are_gone_is_made_again():
    """What a re-read of the root finds gone (a VM's namespace deleted with
    the guest end) is replaced, not taken for matching."""
    want, _ = fleet.sled_desired(state_of(), "sled-a", ("u1", "u2"), A)
    known = agent._as_current(want)
    known.missing = {"a2"}
    ops = [(a.op, a.target, a.detail) for a in apply.plan(known, want)]
    assert ("delete-port", "a2", "replaced: its links are gone") in ops
    assert [o for o in ops if o[0] == "create-port"] == [
        ("create-port", "a2", "10.20.0.10 a8:40:25:ff:00:21 vni 20")]


def test_what_a_reconcile_leaves_needs_no_change():
    """The agent plans the next change against what its last complete
    reconcile left (agent._as_current): that must be the wanted state
    itself, with nothing left to do, and a change then plans only itself."""
    want, _ = fleet.sled_desired(state_of(), "sled-a", ("u1", "u2"), A)
    known = agent._as_current(want)
    assert apply.plan(known, want) == []
    moved = [dict(p, sled="sled-a") if p["name"] == "b1" else p for p in PORTS]
    later, _ = fleet.sled_desired(state_of(ports=moved), "sled-a", ("u1", "u2"), A)
    ops = [(a.op, a.target) for a in apply.plan(known, later)]
    assert ("create-port", "b1") in ops
    assert not [o for o in ops if o[0] == "delete-port" or o[1] in ("a1", "a2")]


# --- the boundary's NAT table ------------------------------------------------------------

def test_nat_table_holds_the_external_addresses_of_registered_sleds_ports():
    assert agent.nat_table(state_of()) == {
        "192.0.2.5:1024-2047": (B, 10, "a8:40:25:ff:00:02"),
        "[2001:db8::5]:1024-2047": (B, 10, "a8:40:25:ff:00:02"),
        "192.0.2.20": (B, 10, "a8:40:25:ff:00:02"),
        "192.0.2.30": (A, 10, "a8:40:25:ff:00:01"),
        # c1's 192.0.2.21: sled-c is not registered
    }
    table = agent.nat_table(state_of(sleds={"sled-a": A, "sled-c": "fd00:3::1"}))
    assert table["192.0.2.21"] == ("fd00:3::1", 10, "a8:40:25:ff:00:03")
    assert not any(k.startswith(("192.0.2.5", "[2001")) for k in table)


def test_nat_table_skips_a_malformed_stored_port():
    bad = {fleet.PORT + "m1": json.dumps(port("m1", "sled-a", 20, "a8:40:25:ff:00:51",
                                              ip="10.20.0.51", floating_ips=["bogus"])),
           fleet.PORT + "m2": json.dumps(port("m2", "sled-a", 20, "a8:40:25:ff:00:52",
                                              ip="10.20.0.52", snat_ip="192.0.2.52")),
           fleet.PORT + "m3": json.dumps(port("m3", "sled-a", 20, "nomac", ip="10.20.0.53",
                                              floating_ips=["192.0.2.53"]))}
    table = agent.nat_table(state_of(extra=bad))
    assert table == agent.nat_table(state_of())


# --- apply, dump and status against an in-memory etcd ----------------------------------------

class FakeEtcd:
    """What fleet.apply_file, dump and status use of xdectl.etcd.Etcd, in
    memory, with etcd's revisions: the store starts at revision 1; a
    transaction that writes something makes one new revision, the mod
    revision of every key it puts; a key that is absent compares as mod
    revision 0; a failed compare changes nothing."""

    def __init__(self):
        self.rev = 1
        self.kv = {}          # key -> (value, mod_revision)
        self.txns = []        # (compare, puts, deletes) of each txn tried

    def range(self, prefix):
        end = etcd.prefix_end(prefix)
        return self.rev, {k: v for k, v in self.kv.items() if prefix <= k < end}

    def get(self, key):
        return self.kv.get(key, (None, 0))

    def txn(self, compare, puts=(), deletes=(), lease=None):
        self.txns.append((list(compare), list(puts), list(deletes)))
        keys = [k for k, _ in puts] + list(deletes)
        assert len(keys) == len(set(keys)), "etcd refuses a key twice in one transaction"
        if any(self.kv.get(k, (None, 0))[1] != rev for k, rev in compare):
            return False, self.rev
        if puts or any(k in self.kv for k in deletes):
            self.rev += 1
        for k, v in puts:
            self.kv[k] = (v, self.rev)
        for k in deletes:
            self.kv.pop(k, None)
        return True, self.rev

    def put(self, key, value, lease=None):
        return self.txn([], [(key, value)])[1]


class RacingEtcd(FakeEtcd):
    """Another writer changes a key between each of the first `races`
    reads and the transaction that follows it."""

    def __init__(self, races, key=fleet.APPLIED):
        super().__init__()
        self.races, self.key = races, key

    def range(self, prefix):
        out = super().range(prefix)
        if self.races:
            self.races -= 1
            self.put(self.key, '{"other": "writer"}')
        return out


def test_the_fake_etcd_keeps_etcds_revisions():
    e = FakeEtcd()
    assert e.txn([("/k", 0)], [("/k", "1")]) == (True, 2)
    assert e.txn([("/k", 0)], [("/k", "2")]) == (False, 2)
    assert e.txn([], [], ["/none"]) == (True, 2)
    assert e.get("/k") == ("1", 2) and e.get("/none") == (None, 0)
    assert e.range("/")[0] == 2


def test_apply_writes_the_fleet_in_one_transaction():
    e = FakeEtcd()
    f = fleet.parse(text())
    revision, puts, deletes = fleet.apply_file(e, f)
    assert (revision, puts, deletes) == (2, 8, 0) and len(e.txns) == 1
    compare, written, _ = e.txns[0]
    assert compare == [(fleet.APPLIED, 0)]
    assert len(written) == len(f.ports) + len(f.vpcs) + 1      # + the applied marker
    marker = json.loads(e.get(fleet.APPLIED)[0])
    assert marker == {"ports": 5, "vpcs": 3, "id": marker["id"]} and len(marker["id"]) == 16
    assert {k: v for k, (v, _) in e.range(fleet.FLEET)[1].items() if k != fleet.APPLIED} == \
        fleet.to_keys(f)
    # the same again: only the marker is written, at a new revision
    assert fleet.apply_file(e, f) == (3, 0, 0)
    assert e.get(fleet.APPLIED)[1] == 3 and e.get(fleet.PORT + "a1")[1] == 2
    assert e.txns[1][0] == [(fleet.APPLIED, 2)]


def test_apply_puts_only_what_changed_and_deletes_what_went():
    e = FakeEtcd()
    fleet.apply_file(e, fleet.parse(text()))
    # what agents and reports write is not the file's to remove
    e.put(fleet.SLED + "sled-a", json.dumps({"underlay_addr": A}))
    e.put(fleet.STATUS + "sled-a", json.dumps({"revision": 2}))
    e.put(fleet.SLED + "sled-old", json.dumps({"underlay_addr": "fd00:9::1"}))
    before = dict(e.kv)
    changed = [dict(PORTS[0], hostname="web"), PORTS[1], PORTS[2],
               port("d1", "sled-b", 10, "a8:40:25:ff:00:41", ip="10.0.0.41")]
    revision, puts, deletes = fleet.apply_file(e, fleet.parse(text(vpcs=[VPC10, VPC20],
                                                                   ports=changed)))
    assert (puts, deletes) == (2, 3)            # a1, d1; b2, c1, VPC 30
    _, written, gone = e.txns[-1]
    assert sorted(k for k, _ in written) == [fleet.APPLIED, fleet.PORT + "a1", fleet.PORT + "d1"]
    assert gone == [fleet.PORT + "b2", fleet.PORT + "c1", fleet.VPC + "30"]
    for key in (fleet.PORT + "b2", fleet.PORT + "c1", fleet.VPC + "30"):
        assert e.get(key) == (None, 0)
    for key in (fleet.SLED + "sled-a", fleet.SLED + "sled-old", fleet.STATUS + "sled-a",
                fleet.PORT + "a2", fleet.PORT + "b1", fleet.VPC + "10"):
        assert e.kv[key] == before[key], key
    assert e.get(fleet.PORT + "a1")[1] == revision
    assert json.loads(e.get(fleet.PORT + "a1")[0])["hostname"] == "web"


def test_apply_of_an_empty_fleet_deletes_every_port_and_vpc():
    e = FakeEtcd()
    fleet.apply_file(e, fleet.parse(text()))
    e.put(fleet.SLED + "sled-a", json.dumps({"underlay_addr": A}))
    assert fleet.apply_file(e, fleet.parse(""))[1:] == (0, 8)
    assert sorted(e.range(fleet.FLEET)[1]) == [fleet.APPLIED, fleet.SLED + "sled-a"]


def test_apply_tries_again_when_another_apply_came_between():
    e = RacingEtcd(races=1)
    f = fleet.parse(text())
    revision, puts, _ = fleet.apply_file(e, f)
    assert len(e.txns) == 3                               # the racer's, ours twice
    assert e.txns[1][0] == [(fleet.APPLIED, 0)]          # read before the racer wrote
    assert e.txns[2][0] == [(fleet.APPLIED, 2)]
    assert revision == e.rev == 3 and puts == 8
    assert json.loads(e.get(fleet.APPLIED)[0])["ports"] == 5


class LosingEtcd(FakeEtcd):
    """The answers of the first `losses` transactions are lost (a timeout):
    each is made at once ("now"), made only after the next read ("late",
    still in flight when the apply looks), or not at all ("never")."""

    def __init__(self, losses, made):
        super().__init__()
        self.losses, self.made, self.in_flight = losses, made, None
        self.down_after_loss, self.lost, self.reads = False, False, []

    def range(self, prefix):
        self.reads.append(prefix)
        if self.down_after_loss and self.lost:
            raise etcd.Unavailable("etcd unreachable (http://127.0.0.1:1: connection refused)")
        out = super().range(prefix)
        if self.in_flight:
            super().txn(*self.in_flight)
            self.in_flight = None
        return out

    def txn(self, compare, puts=(), deletes=(), lease=None):
        if not self.losses:
            return super().txn(compare, puts, deletes)
        self.losses -= 1
        self.lost = True
        if self.made == "now":
            super().txn(compare, puts, deletes)
        elif self.made == "late":
            self.in_flight = (compare, puts, deletes)
        raise etcd.Unavailable("etcd unreachable (http://127.0.0.1:1: timed out)")


def test_apply_whose_answer_was_lost_finds_it_made():
    e = LosingEtcd(losses=1, made="now")
    assert fleet.apply_file(e, fleet.parse(text())) == (2, 8, 0)
    assert len(e.txns) == 1                   # found made: not sent again

    e = LosingEtcd(losses=1, made="late")     # read before it landed: sent again, which fails
    assert fleet.apply_file(e, fleet.parse(text())) == (2, 8, 0)
    assert len(e.txns) == 2 and e.rev == 2    # the second's compare failed: written once

    e = LosingEtcd(losses=1, made="never")
    assert fleet.apply_file(e, fleet.parse(text())) == (2, 8, 0)
    assert len(e.txns) == 1                   # the lost one never reached the fake's store


def test_apply_never_answered_says_it_may_still_be_made():
    e = LosingEtcd(losses=3, made="never")
    with pytest.raises(XdeError) as exc:
        fleet.apply_file(e, fleet.parse(text()))
    assert str(exc.value) == ("etcd unreachable (http://127.0.0.1:1: timed out); the apply may "
                              "have been made: `xdectl fleet status` shows the last applied "
                              "revision, and applying the file again is safe")
    assert fleet.PORT + "a1" not in e.kv and len(e.reads) == 4     # each try's, and a last look


def test_apply_whose_answer_was_lost_and_etcd_then_went_says_it_may_be_made():
    e = LosingEtcd(losses=1, made="now")
    e.down_after_loss = True
    with pytest.raises(XdeError, match=r"etcd unreachable \(http://127.0.0.1:1: connection "
                                       r"refused\); the apply may have been made"):
        fleet.apply_file(e, fleet.parse(text()))


def test_apply_gives_up_after_three_races():
    e = RacingEtcd(races=3)
    with pytest.raises(XdeError, match="changed while it was being applied, 3 times"):
        fleet.apply_file(e, fleet.parse(text()))
    assert fleet.PORT + "a1" not in e.kv


def test_apply_compares_on_the_marker_alone():
    # an agent registering between the read and the write is no race
    e = RacingEtcd(races=1, key=fleet.SLED + "sled-a")
    fleet.apply_file(e, fleet.parse(text()))
    assert len(e.txns) == 2 and e.get(fleet.PORT + "a1")[0] is not None


def test_dump_is_a_fleet_file_of_what_was_applied():
    e = FakeEtcd()
    for source in (text(), EXAMPLE.read_text()):
        f = fleet.parse(source)
        fleet.apply_file(e, f)
        e.put(fleet.SLED + "sled-a", json.dumps({"underlay_addr": A}))
        dumped = fleet.dump(e)
        assert "underlay_addr" not in dumped and "applied" not in dumped
        assert fleet.parse(dumped) == f
        assert fleet.apply_file(e, fleet.parse(dumped))[1:] == (0, 0)


def test_dump_orders_vpcs_by_vni():
    e = FakeEtcd()
    vpcs = [dict(VPC20, vni=vni, subnet=f"10.{n}.0.0/24", gateway_ip=f"10.{n}.0.1")
            for n, vni in enumerate((100, 9, 20), 1)]
    fleet.apply_file(e, fleet.parse(text(vpcs=vpcs, ports=[])))
    assert [int(m) for m in re.findall(r"^vni = (\d+)$", fleet.dump(e), re.M)] == [9, 20, 100]


def test_dump_of_nothing_is_an_empty_fleet():
    assert fleet.parse(fleet.dump(FakeEtcd())) == fleet.Fleet({}, {})


def test_status_per_sled():
    e = FakeEtcd()
    assert fleet.status(e) == {"revision": 0, "applied": 0, "sleds": []}
    revision, _, _ = fleet.apply_file(e, fleet.parse(text()))
    e.put(fleet.SLED + "sled-a", json.dumps({"underlay_addr": A}))
    e.put(fleet.SLED + "sled-b", json.dumps({"underlay_addr": B}))
    e.put(fleet.STATUS + "sled-a", json.dumps({"revision": revision, "ports": 2, "error": None,
                                               "mode": "sled", "resyncs": 1}))
    e.put(fleet.STATUS + "bsvc", json.dumps({"revision": revision, "ports": 4,
                                             "error": "set-nat x: y", "mode": "boundary",
                                             "resyncs": 0}))
    s = fleet.status(e)
    # the fleet's revision is its last change: sled-b's registration; the
    # agents' reports are not the fleet's
    assert s["applied"] == revision
    assert s["revision"] == e.get(fleet.SLED + "sled-b")[1] > revision
    rows = {r["name"]: r for r in s["sleds"]}
    assert list(rows) == ["bsvc", "sled-a", "sled-b", "sled-c"]
    assert rows["sled-a"] == {"name": "sled-a", "alive": True, "registered": True,
                              "underlay_addr": A, "revision": revision, "ports": 2,
                              "desired_ports": 2, "error": None, "mode": "sled", "resyncs": 1}
    assert rows["sled-b"]["alive"] is False and rows["sled-b"]["registered"] is True
    assert rows["sled-b"]["desired_ports"] == 2 and rows["sled-b"]["revision"] is None
    assert rows["sled-c"]["registered"] is False and rows["sled-c"]["underlay_addr"] is None
    assert rows["sled-c"]["desired_ports"] == 1
    assert rows["bsvc"]["mode"] == "boundary" and rows["bsvc"]["alive"] is True
    assert rows["bsvc"]["error"] == "set-nat x: y" and rows["bsvc"]["desired_ports"] == 0
    # an apply is the fleet's last change, whatever agents reported since
    e.put(fleet.STATUS + "sled-a", json.dumps({"revision": revision}))
    again = fleet.apply_file(e, fleet.parse(text()))[0]
    assert fleet.status(e)["revision"] == fleet.status(e)["applied"] == again


# --- etcd URLs and key ranges ------------------------------------------------------------------

def test_parse_urls():
    assert etcd.parse_urls("http://127.0.0.1:2379") == [("http", "127.0.0.1", 2379)]
    assert etcd.parse_urls("http://a:1, https://b,http://[fd00::1]:2381/") == [
        ("http", "a", 1), ("https", "b", 2379), ("http", "fd00::1", 2381)]


@pytest.mark.parametrize("bad", ["", "127.0.0.1:2379", "ftp://a:1", "http://a:99999",
                                 "http://a:port", "http://a:1/v3", "http://", "http://a:1,,"])
def test_parse_urls_refuses(bad):
    with pytest.raises(XdeError) as exc:
        etcd.parse_urls(bad)
    assert str(exc.value).startswith("etcd URL ") and "\n" not in str(exc.value)


def test_keepalive_goes_to_the_endpoint_that_answers():
    from etcd3gw.exceptions import ConnectionFailedError
    e = etcd.Etcd("http://127.0.0.1:1,http://127.0.0.1:2")
    asked = []

    def down(url, json=None, **kw):
        asked.append(("down", url, json))
        raise ConnectionFailedError("Connection refused")

    def up(url, json=None, **kw):
        asked.append(("up", url, json))
        return {"header": {"revision": "7"}, "result": {"ID": str(json["ID"]), "TTL": "5"}}

    e.clients[0].post, e.clients[1].post = down, up
    assert e.keepalive(42) == 5 and e.current == 1
    assert [a[0] for a in asked] == ["down", "up"]
    assert asked[1][1].endswith("/v3/lease/keepalive") and asked[1][2] == {"ID": 42}
    assert e.keepalive(42) == 5 and [a[0] for a in asked[2:]] == ["up"]
    # an expired lease: etcd leaves the TTL out
    e.clients[1].post = lambda url, json=None, **kw: {"result": {"ID": "42"}}
    assert e.keepalive(42) == -1
    e.clients[1].post = down
    with pytest.raises(etcd.Unavailable, match="etcd unreachable"):
        e.keepalive(42)


def test_etcd_errors_say_why():
    """etcd3gw raises with the response's text (or the connection error's)
    as detail_text and the HTTP reason as the argument."""
    from etcd3gw.exceptions import ConnectionFailedError, Etcd3Exception
    e = etcd.Etcd("http://127.0.0.1:1,http://127.0.0.1:2")
    body = json.dumps({"error": "etcdserver: too many operations in txn request", "code": 3,
                       "message": "etcdserver: too many operations in txn request"})

    def refused(url, json=None, **kw):
        raise ConnectionFailedError("HTTPConnectionPool(host='127.0.0.1', port=1): Max retries "
                                    "exceeded ([Errno 111] Connection refused)")

    def bad_request(url, json=None, **kw):
        raise Etcd3Exception(body, "Bad Request")

    e.clients[0].post, e.clients[1].post = refused, bad_request
    with pytest.raises(XdeError) as exc:
        e.txn([], [("/k", "v")] * 200)
    assert str(exc.value) == "etcd: etcdserver: too many operations in txn request"
    e.clients[1].post = refused
    with pytest.raises(etcd.Unavailable) as exc:
        e.get("/k")
    assert str(exc.value) == ("etcd unreachable (http://127.0.0.1:1: connection refused; "
                              "http://127.0.0.1:2: connection refused)")


class _Stream:
    """A watch response as requests gives it: lines, then the end (or an
    exception, as a read timeout arrives)."""

    status_code, text = 200, ""

    def __init__(self, messages, end=None):
        self.lines = [json.dumps(m).encode() for m in messages]
        self.end = end
        self.closed = False

    def iter_lines(self, chunk_size=None):
        yield from self.lines
        if self.end:
            raise self.end

    def close(self):
        self.closed = True


def _b64(s):
    import base64
    return base64.b64encode(s.encode()).decode()


def _watching(messages, end=None):
    e = etcd.Etcd("http://127.0.0.1:1")
    stream = _Stream(messages, end)
    asked = []

    def post(url, json=None, **kw):
        asked.append(json)
        return stream
    e.clients[0].session.post = post
    return e, stream, asked


def test_watch_yields_each_transactions_events():
    import requests
    put = {"kv": {"key": _b64("/xde/fleet/port/a"), "value": _b64("{}"), "mod_revision": "8"}}
    put2 = {"kv": {"key": _b64("/xde/fleet/applied"), "value": _b64("1"), "mod_revision": "8"}}
    gone = {"type": "DELETE", "kv": {"key": _b64("/xde/fleet/port/b"), "mod_revision": "9"}}
    e, stream, asked = _watching(
        [{"result": {"created": True, "header": {"revision": "7"}}},
         {"result": {"events": [put, put2]}}, {"result": {"events": [gone]}}],
        end=requests.exceptions.ConnectionError("Read timed out."))
    got = list(e.watch(fleet.FLEET, 8, idle=1))
    assert got == [(8, [("/xde/fleet/port/a", "{}"), ("/xde/fleet/applied", "1")]),
                   (9, [("/xde/fleet/port/b", None)])]
    assert asked[0]["create_request"]["start_revision"] == 8 and stream.closed
    assert asked[0]["create_request"]["range_end"] == _b64(etcd.prefix_end(fleet.FLEET))


def test_watch_says_when_its_start_was_compacted_or_etcd_went():
    e, _, _ = _watching([{"result": {"created": True}},
                         {"result": {"compact_revision": "50", "canceled": True}}])
    with pytest.raises(etcd.Compacted, match="revision 8 has been compacted"):
        list(e.watch(fleet.FLEET, 8))
    e, _, _ = _watching([{"result": {"created": True}}])           # the stream just ends
    with pytest.raises(etcd.Unavailable, match="closed the watch"):
        list(e.watch(fleet.FLEET, 8))


def test_a_quiet_watch_etcd_never_confirmed_is_an_outage():
    import requests
    quiet = requests.exceptions.ConnectionError("Read timed out.")
    e, _, _ = _watching([{"result": {"created": True}}], end=quiet)
    assert list(e.watch(fleet.FLEET, 8, idle=1)) == []              # idle: the caller's turn
    e, _, _ = _watching([], end=quiet)                              # e.g. a dead connection
    with pytest.raises(etcd.Unavailable, match="watch ended"):
        list(e.watch(fleet.FLEET, 8, idle=1))


def test_tls_files_are_checked_before_etcd_is_asked(tmp_path):
    import requests
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "c.key"))
    for f in (ca, cert, key):
        f.write_text("x")
    https = "https://10.0.0.1:2379,https://10.0.0.2:2379"
    assert etcd.check_tls(https) is None
    assert etcd.check_tls(https, str(ca)) == etcd.Tls(str(ca))
    assert etcd.check_tls(https, None, str(cert), str(key)) == etcd.Tls(None, str(cert), str(key))
    for args, why in (
            ((str(ca), str(cert), None), "give the client certificate and its key together"),
            ((None, None, str(key)), "give the client certificate and its key together"),
            ((str(tmp_path / "none.pem"),), f"CA {tmp_path}/none.pem: No such file"),
            ((str(ca), str(tmp_path), str(key)), f"client certificate {tmp_path}: Is a directory")):
        with pytest.raises(XdeError) as exc:
            etcd.check_tls(https, *args)
        assert str(exc.value).startswith("etcd TLS") and why in str(exc.value), exc.value
    with pytest.raises(XdeError, match=r"TLS files given, but http://10.0.0.3:2379 is not "
                                       r"https://: they would not be used"):
        etcd.check_tls(https + ",http://10.0.0.3:2379", str(ca))
    # every request verifies with the CA (given with the request: requests prefers
    # REQUESTS_CA_BUNDLE to a session's own) and shows the client certificate
    e = etcd.Etcd(https, tls=etcd.Tls(str(ca), str(cert), str(key)))
    asked = []

    def post(url, **kw):
        asked.append(kw)
        raise requests.ConnectionError("refused")
    for c in e.clients:
        assert c.session.cert == (str(cert), str(key))
        c.session.post = post
    with pytest.raises(etcd.Unavailable):
        e.range("/x/")
    with pytest.raises(etcd.Unavailable):
        list(e.watch("/x/", 1))
    assert len(asked) == 3 and all(kw["verify"] == str(ca) for kw in asked)


def test_tls_errors_say_why_in_a_few_words():
    from etcd3gw.exceptions import ConnectionFailedError
    text = ("HTTPSConnectionPool(host='10.0.0.1', port=2379): Max retries exceeded with url: "
            "/v3/kv/range (Caused by SSLError(SSLCertVerificationError(1, '[SSL: "
            "CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
            "certificate (_ssl.c:1032)')))")
    assert etcd._reason(ConnectionFailedError(text)) == \
        "TLS: certificate verify failed: unable to get local issuer certificate"
    text = ("HTTPSConnectionPool(host='127.0.0.1', port=2379): Max retries exceeded with url: "
            "/v3/kv/range (Caused by SSLError(SSLEOFError(8, 'EOF occurred in violation of "
            "protocol (_ssl.c:2393)')))")
    assert etcd._reason(ConnectionFailedError(text)) == \
        "TLS: etcd ended the handshake (does it trust this client's certificate?)"
    text = text.replace("SSLEOFError(8, 'EOF occurred in violation of protocol",
                        "SSLError(1, '[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")
    assert etcd._reason(ConnectionFailedError(text)).startswith("TLS: etcd ended the handshake")


NO_LEADER = {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader",
             "http_status": "Service Unavailable"}


def test_a_member_without_a_leader_is_left_for_the_next():
    """Every call asks for a member with a leader; one without refuses a
    new watch (503), ends a running one, and refuses unary calls: each time
    the next member is tried."""
    e = etcd.Etcd("http://127.0.0.1:1,http://127.0.0.1:2")
    assert all(c.session.headers["Grpc-Metadata-hasleader"] == "true" for c in e.clients)
    refused = _Stream([])
    refused.status_code, refused.text = 503, json.dumps({"error": NO_LEADER})
    e.clients[0].session.post = lambda url, json=None, **kw: refused
    with pytest.raises(etcd.Unavailable) as exc:
        list(e.watch(fleet.FLEET, 8))
    assert str(exc.value) == "etcd unreachable (http://127.0.0.1:1: etcdserver: no leader)"
    assert e.current == 1 and refused.closed

    e, _, _ = _watching([{"result": {"created": True}}, {"error": NO_LEADER}])
    with pytest.raises(etcd.Unavailable, match=r"watch ended \(http://127.0.0.1:1: "
                                               r"etcdserver: no leader\)"):
        list(e.watch(fleet.FLEET, 8))

    from etcd3gw.exceptions import ConnectionFailedError
    e = etcd.Etcd("http://127.0.0.1:1,http://127.0.0.1:2")

    body = json.dumps(NO_LEADER)

    def leaderless(url, json=None, **kw):
        raise ConnectionFailedError(body, "Service Unavailable")
    e.clients[0].post = leaderless
    e.clients[1].post = lambda url, json=None, **kw: {"header": {"revision": "3"}}
    assert e.range("/xde/fleet/") == (3, {}) and e.current == 1
    e.clients[1].post = leaderless
    with pytest.raises(etcd.Unavailable) as exc:
        e.range("/xde/fleet/")
    assert str(exc.value) == ("etcd unreachable (http://127.0.0.1:2: etcdserver: no leader; "
                              "http://127.0.0.1:1: etcdserver: no leader)")


def test_prefix_end():
    assert etcd.prefix_end("/xde/") == "/xde0"
    assert etcd.prefix_end("/xde/fleet/port/") == "/xde/fleet/port0"
    assert etcd.prefix_end("a") == "b"
    end = etcd.prefix_end(fleet.FLEET)
    inside = [fleet.FLEET, fleet.APPLIED, fleet.PORT + "\U0010ffff", fleet.SLED + "z"]
    outside = ["/xde/fleet", "/xde/fleet0", fleet.STATUS + "a", "/xde/fleez"]
    assert all(fleet.FLEET <= k < end for k in inside)
    assert not any(fleet.FLEET <= k < end for k in outside)


# --- the agent's systemd unit -----------------------------------------------------------------

def _unit(tmp_path, text=None):
    """xde-agent.service with ExecStart's xdectl pointed at this checkout's,
    which systemd-analyze needs to find."""
    text = text or (DEPLOY / "xde-agent.service").read_text()
    assert "/usr/local/bin/xdectl" in text
    path = tmp_path / "xde-agent.service"
    path.write_text(text.replace("/usr/local/bin/xdectl", str(REPO / ".venv" / "bin" / "xdectl")))
    return path


def _verify(path):
    assert shutil.which("systemd-analyze"), "systemd-analyze is not installed"
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_the_agent_unit_verifies(tmp_path):
    p = _verify(_unit(tmp_path))
    # verify exits 0 on warnings such as unknown keys: no output at all is the pass
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), \
        p.stdout + p.stderr


def test_the_agent_unit_verify_can_fail(tmp_path):
    text = (DEPLOY / "xde-agent.service").read_text().replace("Restart=", "Restrat=")
    p = _verify(_unit(tmp_path, text))
    assert "Restrat" in p.stdout + p.stderr


def test_the_agent_unit_runs_the_agent():
    u = (DEPLOY / "xde-agent.service").read_text()
    start = re.search(r"^ExecStart=(/usr/local/bin/xdectl agent .*)$", u, re.M)
    assert start, u
    args = start.group(1).split()
    for option, var in (("--sled", "${XDE_SLED}"), ("--underlay-addr", "${XDE_UNDERLAY_ADDR}")):
        assert args[args.index(option) + 1] == var
    assert [args[i + 1] for i, a in enumerate(args) if a == "--underlay"] == \
        ["${XDE_UNDERLAY1}", "${XDE_UNDERLAY2}"]
    assert re.search(r"^EnvironmentFile=/etc/xde/agent.env$", u, re.M)
    assert re.search(r"^Restart=always$", u, re.M)
    assert re.search(r"^RestartSec=[1-5]s?$", u, re.M)
    assert re.search(r"^Wants=.*network-online.target", u, re.M)
    assert re.search(r"^After=.*network-online.target.*sys-fs-bpf.mount", u, re.M)
    assert "mount -t bpf bpf /sys/fs/bpf" in u and re.search(r"^ExecStartPre=", u, re.M)
    assert re.search(r"^WantedBy=multi-user.target$", u, re.M)
    # every variable the unit uses is in the install comment's agent.env,
    # and XDE_ETCD (which xdectl reads itself) too
    comment = "\n".join(line for line in u.splitlines() if line.startswith("#"))
    for var in set(re.findall(r"\$\{?(XDE_\w+)", start.group(1))) | {"XDE_ETCD"}:
        assert re.search(rf"^#\s+{var}=", comment, re.M), var
