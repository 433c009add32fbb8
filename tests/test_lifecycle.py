"""Port lifecycle end to end, in namespaces: create refusals that leave
nothing behind, list, delete, unload, reuse of the pinned programs."""
import ctypes as ct
import json
import os
from dataclasses import dataclass

import pytest

from netns import (Root, create_args, one_error_line, positional_args, snapshot, timed_xdectl,
                   underlay_host, xdectl, xdectl_json)

UNDERLAYS = ("u1", "u2", "u3")


# --- create refusals ---------------------------------------------------------

@dataclass
class Bad:
    id: str
    args: list
    expect: str          # must appear in the error line (case-insensitive)
    loaded_only: bool = False
    also_loaded: bool = False   # run on the loaded root too (a sample of each kind)


def bad(id, expect, name="xv0", underlays=("u1", "u2"), loaded_only=False, also_loaded=False,
        passthrough=True, **over):
    return Bad(id, create_args(name, underlays=underlays, passthrough=passthrough, **over), expect,
               loaded_only, also_loaded)


def bad6(id, expect, also_loaded=False, **over):
    """An overlay port with IPv6 (and the seed's IPv4 unless over drops it)."""
    return bad(id, expect, passthrough=False, also_loaded=also_loaded,
               **{"ip6": "fd10::1", **over})


BAD = [
    bad("mac-short", "A8:40:25:ff:00", mac="A8:40:25:ff:00", also_loaded=True),
    bad("mac-nonhex", "A8:40:25:ff:00:zz", mac="A8:40:25:ff:00:zz"),
    bad("mac-dashes", "A8-40-25-ff-00-01", mac="A8-40-25-ff-00-01"),
    bad("mac-multicast", "01:00:5e:00:00:01", mac="01:00:5e:00:00:01", also_loaded=True),
    bad("mac-broadcast", "ff:ff:ff:ff:ff:ff", mac="ff:ff:ff:ff:ff:ff"),
    bad("mac-zero", "00:00:00:00:00:00", mac="00:00:00:00:00:00", also_loaded=True),
    bad("gwmac-multicast", "A9:40:25:00:00:01", gateway_mac="A9:40:25:00:00:01"),
    bad("gwmac-zero", "00:00:00:00:00:00", gateway_mac="00:00:00:00:00:00"),
    bad("ip-bad", "10.0.0.256", ip="10.0.0.256", also_loaded=True),
    bad("ip-is-v6", "fd00::1", ip="fd00::1"),
    bad("gwip-bad", "172.30.0", gateway_ip="172.30.0"),
    bad("bsvc-bad", "fd00:99::zz", boundary_services="fd00:99::zz", also_loaded=True),
    bad("bsvc-is-v4", "10.9.9.9", boundary_services="10.9.9.9"),
    bad("uladdr-bad", "fd00:::1", underlay_addr="fd00:::1", also_loaded=True),
    bad("uladdr-is-v4", "10.1.1.1", underlay_addr="10.1.1.1"),
    bad("vni-too-big", "16777216", vni="16777216", also_loaded=True),
    bad("vni-negative", "-1", vni="-1"),
    bad("vni-not-number", "ten", vni="ten"),
    bad("bvni-too-big", "16777216", boundary_vni="16777216"),
    bad("bvni-negative", "-1", boundary_vni="-1"),
    bad("underlay1-missing", "nosuch0", underlays=("nosuch0", "u2"), also_loaded=True),
    bad("underlay2-missing", "nosuch1", underlays=("u1", "nosuch1")),
    bad("underlays-same", "u1", underlays=("u1", "u1"), also_loaded=True),
    bad("one-underlay", "underlay", underlays=("u1",)),
    bad("three-underlays", "underlay", underlays=("u1", "u2", "u3")),
    bad("name-slash", "bad/name", name="bad/name", also_loaded=True),
    bad("name-too-long", "abcdefghijklmnop", name="abcdefghijklmnop"),
    bad("name-space", "bad name", name="bad name"),
    bad("name-empty", "name", name=""),
    bad("name-trailing-newline", "name", name="xv0\n"),
    bad("name-in-use", "taken0", name="taken0", also_loaded=True),
    bad("name-is-underlay", "u3", name="u3"),
    bad("ip-outside-subnet", "10.0.1.1", ip="10.0.1.1", vpc_subnet="10.0.0.0/24", also_loaded=True),
    # Only meaningful on a root that already has a port (p0 on u1,u2, fd00:1::1).
    bad("other-underlay-pair", "u3", underlays=("u1", "u3"), loaded_only=True),
    bad("other-underlay-pair2", "u3", underlays=("u3", "u2"), loaded_only=True),
    bad("other-underlay-addr", "fd00:1::2", underlay_addr="fd00:1::2", loaded_only=True),
    bad("name-is-existing-port", "p0", name="p0", loaded_only=True),
    bad("mac-of-existing-port", "a8:40:25:ff:00:01", loaded_only=True),
    # IPv6 and what the gateway tells the guest
    bad6("no-ip-at-all", "--ip, --ip6", ip=None, ip6=None),
    bad6("ip6-link-local", "fe80::1", ip6="fe80::1", also_loaded=True),
    bad6("ip6-mapped", "::ffff:10.0.0.1", ip6="::ffff:10.0.0.1"),
    bad6("ip6-multicast", "ff02::1", ip6="ff02::1"),
    bad6("ip6-is-v4", "10.0.0.1", ip6="10.0.0.1"),
    bad6("ip6-outside-subnet6", "fd10::1", vpc_subnet6="fd20::/64", also_loaded=True),
    bad6("subnet6-host-bits", "fd10::1/64", vpc_subnet6="fd10::1/64"),
    bad6("subnet6-without-ip6", "needs --ip6", ip6=None, vpc_subnet6="fd10::/64"),
    bad6("subnet-without-ip", "needs --ip", ip=None, vpc_subnet="10.0.0.0/24"),
    bad6("dns-bad", "10.0.0.300", dns=["10.0.0.300"]),
    bad6("dns-v4-without-ip", "no --ip", ip=None, dns=["10.0.0.53"], also_loaded=True),
    bad6("dns-too-many", "at most 3", dns=["fd10::1", "fd10::2", "fd10::3", "fd10::4"]),
    bad6("dns-twice", "twice", dns=["10.0.0.53", "10.0.0.53"]),
    bad6("hostname-two-labels", "web.one", hostname="web.one"),
    bad6("hostname-without-ip", "only DHCPv4", ip=None, hostname="web1"),
    bad6("domain-bad", "bad_domain.example", domain="bad_domain.example"),
    bad6("domain-too-long-to-fit", "512", hostname="h" * 63, domain=".".join(["d" * 60] * 4)),
    bad("passthrough-ip6", "passthrough", ip6="fd10::1"),
    bad("passthrough-dns", "passthrough", dns=["10.0.0.53"]),
]
FRESH = [b for b in BAD if not b.loaded_only]
LOADED = [b for b in BAD if b.loaded_only or b.also_loaded]


@pytest.fixture(scope="module")
def clean_host(privileged):
    """Underlays u1..u3 and a link named taken0 (a veth), no root on them."""
    hv, far = underlay_host("v", UNDERLAYS, extra=("taken0",))
    yield hv
    hv.delete()
    far.delete()


@pytest.fixture(scope="module")
def loaded(privileged):
    """A root with one passthrough port p0 (the seed's values,
    docs/glossary.md, "The seed") on u1, u2."""
    hv, far = underlay_host("l", UNDERLAYS, extra=("taken0",))
    root = Root(hv)
    try:
        xdectl(hv, root, *create_args("p0", passthrough=True))
        ports = root.ports()
        assert [p["name"] for p in ports] == ["p0"]
        yield hv, root, ports
    finally:
        root.cleanup()
        hv.delete()
        far.delete()


def assert_clean_underlays(ns, devs):
    for d in devs:
        assert ns.xdp_prog_id(d) is None, f"XDP left on {d}:\n{ns.link_details(d)}"
        assert ns.tc_filters(d, "ingress") == "", f"tc filter left on {d}"
        assert "clsact" not in ns.qdiscs(d), f"clsact left on {d}"


@pytest.mark.parametrize("case", FRESH, ids=[b.id for b in FRESH])
def test_create_refused_on_fresh_root(clean_host, case):
    hv = clean_host
    root = Root(hv)
    try:
        before = snapshot(hv, root, UNDERLAYS)
        assert before["root"] is None
        p = xdectl(hv, root, *case.args, check=False)
        line = one_error_line(p)
        assert case.expect.strip().lower() in line.lower(), line
        assert snapshot(hv, root, UNDERLAYS) == before
        assert not root.exists(), f"{root} was left behind"
        assert_clean_underlays(hv, UNDERLAYS)
    finally:
        root.cleanup()


@pytest.mark.parametrize("case", LOADED, ids=[b.id for b in LOADED])
def test_create_refused_on_loaded_root(loaded, case):
    hv, root, ports = loaded
    before = snapshot(hv, root, UNDERLAYS)
    p = xdectl(hv, root, *case.args, check=False)
    line = one_error_line(p)
    assert case.expect.strip().lower() in line.lower(), line
    assert snapshot(hv, root, UNDERLAYS) == before
    assert root.ports() == ports


def test_failure_after_load_rolls_back(loaded):
    """A second root on underlays that already carry another root's XDP
    program: create compiles and loads, then fails half-way. Everything it
    made (veth pair, pins, root directory) must go."""
    hv, root, ports = loaded
    other = Root(hv)
    try:
        before = snapshot(hv, other, UNDERLAYS)
        before_loaded = root.pins()
        p = xdectl(hv, other, *create_args("xv1", mac="A8:40:25:ff:00:09", passthrough=True),
                   check=False)
        line = one_error_line(p)
        assert "xdp" in line.lower(), line
        assert snapshot(hv, other, UNDERLAYS) == before
        assert not other.exists()
        assert root.pins() == before_loaded
        assert root.ports() == ports
    finally:
        other.cleanup()


def test_root_from_environment(loaded):
    hv, root, ports = loaded
    p = xdectl(hv, None, "list", "--json", env={"XDE_ROOT": str(root)})
    assert json.loads(p.stdout) == ports


def test_delete_unknown_port(loaded, clean_host):
    hv, root, ports = loaded
    before = root.pins()
    line = one_error_line(xdectl(hv, root, "delete", "nosuch0", check=False))
    assert "nosuch0" in line
    assert root.pins() == before and root.ports() == ports
    # On a root with nothing loaded: refused too, and no root is made.
    absent = Root(clean_host)
    line = one_error_line(xdectl(clean_host, absent, "delete", "nosuch0", check=False))
    assert "nosuch0" in line
    assert not absent.exists()


def test_commands_on_absent_root_make_nothing(clean_host):
    absent = Root(clean_host)
    p = xdectl(clean_host, absent, "list", "--json")
    assert json.loads(p.stdout) == []
    p = xdectl(clean_host, absent, "unload", check=False)
    assert p.returncode == 0, p.stderr
    assert not absent.exists()


# --- list, delete, unload, warm create -------------------------------------------

@pytest.fixture
def host(privileged):
    """A fresh host namespace with underlays u1, u2 and a fresh root (not
    yet created: the first xdectl create loads it). Removed afterwards."""
    hv, far = underlay_host()
    root = Root(hv)
    yield hv, root
    root.cleanup()
    hv.delete()
    far.delete()


OVERLAY = dict(mac="02:00:00:00:00:0A", ip="10.1.2.3", vpc_subnet="10.1.0.0/16",
               gateway_mac="02:00:00:00:00:01", gateway_ip="10.1.0.1", vni="4242")


@pytest.fixture(scope="module")
def reused_host(privileged):
    """Underlays u1, u2 and a root that tests share (so that it compiles once);
    see `shared`."""
    hv, far = underlay_host("r")
    root = Root(hv)
    yield hv, root
    root.cleanup()
    hv.delete()
    far.delete()


@pytest.fixture
def shared(reused_host):
    """The shared root, with no ports (it may or may not be loaded yet).
    Ports a test leaves are deleted after it."""
    hv, root = reused_host
    assert root.ports() == []
    yield hv, root
    for p in root.ports():
        xdectl(hv, root, "delete", p["name"], check=False)


def test_list_shows_ports_from_kernel(shared):
    hv, root = shared
    xdectl(hv, root, *create_args("p0", **OVERLAY))
    # the seed's form (docs/glossary.md, "The seed")
    xdectl(hv, root, *positional_args("p1", passthrough=True))
    ports = root.ports()
    want = [
        dict(name="p0", mode="overlay", mac="02:00:00:00:00:0a", ip="10.1.2.3", vni=4242,
             underlays=["u1", "u2"], state="up"),
        dict(name="p1", mode="passthrough", mac="a8:40:25:ff:00:01", ip="10.0.0.1", vni=10,
             underlays=["u1", "u2"], state="up"),
    ]
    assert [{k: p.get(k) for k in want[0]} for p in ports] == want

    table = xdectl(hv, root, "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "MODE", "MAC", "IP", "IP6", "VNI", "UNDERLAYS", "STATE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert sorted(rows) == ["p0", "p1"]
    for w in want:
        assert rows[w["name"]] == [w["name"], w["mode"], w["mac"], w["ip"], "-", str(w["vni"]),
                                   "u1,u2", w["state"]]

    # State is read from the kernel: the guest end going down shows.
    hv.ip("link", "set", "p0", "down")
    assert {p["name"]: p["state"] for p in root.ports()} == {"p0": "down", "p1": "up"}
    hv.ip("link", "set", "p0", "up")
    assert {p["name"]: p["state"] for p in root.ports()} == {"p0": "up", "p1": "up"}

    xdectl(hv, root, "xde-delete", "p1")
    assert [p["name"] for p in root.ports()] == ["p0"]
    assert not hv.has_link("p1") and not hv.has_link("p1_dp")


DUAL = dict(OVERLAY, ip6="fd10::1:5", dns=["fd10::53", "10.1.0.53"], hostname="web1",
            domain="vpc.example")


def _own_state(hv, root, port):
    """The V2P mappings, routes and rules of the root and port, and the
    root's gateway templates per port."""
    from xdectl.datapath import Datapath
    dp = Datapath(root.path)
    try:
        tmpls = sorted((k.port, k.kind) for k in dp.maps()["gw_tmpl"].keys())
    finally:
        dp.close()
    return {"v2p": xdectl_json(hv, root, "dump-v2p"),
            "routes": xdectl_json(hv, root, "dump-router", port) if port else None,
            "fw": [(r["protocol"], r["hosts"]) for r in xdectl_json(hv, root, "dump-fw", port)]
            if port else None, "templates": tmpls}


def test_dual_stack_port_made_listed_and_removed(shared):
    """create --ip6 --dns --hostname --domain: list shows it all; the port's
    own V2P mappings (both families), its system routes (both families),
    the default rules (ICMP and ICMPv6) and five gateway templates exist
    while it does, and none of them after delete. Then an IPv6-only port."""
    hv, root = shared
    xdectl(hv, root, *create_args("p0", **DUAL))
    [p] = root.ports()
    assert {k: p[k] for k in ("ip", "ip6", "vpc_subnet", "vpc_subnet6", "dns", "hostname",
                              "domain")} == \
        dict(ip="10.1.2.3", ip6="fd10::1:5", vpc_subnet="10.1.0.0/16", vpc_subnet6="fd10::/64",
             dns=["10.1.0.53", "fd10::53"], hostname="web1", domain="vpc.example")
    row = xdectl(hv, root, "list").stdout.splitlines()[1].split()
    assert row[3:5] == ["10.1.2.3", "fd10::1:5"]
    st = _own_state(hv, root, "p0")
    assert [(e["vni"], e["ip"], e["mac"], e["underlay"]) for e in st["v2p"]] == [
        (4242, "10.1.2.3", "02:00:00:00:00:0a", "fd00:1::1"),
        (4242, "fd10::1:5", "02:00:00:00:00:0a", "fd00:1::1")]
    assert [(r["dest"], r["target"], r["kind"]) for r in st["routes"]] == [
        ("10.1.0.0/16", "sub4=10.1.0.0/16", "system"), ("0.0.0.0/0", "ig", "system"),
        ("fd10::/64", "sub6=fd10::/64", "system"), ("::/0", "ig", "system")]
    assert st["fw"] == [("any", "vni=4242"), ("icmp", "any"), ("icmp6", "any")]
    assert len(st["templates"]) == 5 and len({port for port, _ in st["templates"]}) == 1

    xdectl(hv, root, "delete", "p0")
    assert _own_state(hv, root, None) == {"v2p": [], "routes": None, "fw": None, "templates": []}

    xdectl(hv, root, *create_args("p6", **dict(DUAL, ip=None, vpc_subnet=None, hostname=None,
                                                dns=["fd10::53"])))
    [p] = root.ports()
    assert (p["ip"], p["vpc_subnet"], p["ip6"], p["dns"]) == (None, None, "fd10::1:5",
                                                               ["fd10::53"])
    st = _own_state(hv, root, "p6")
    assert [e["ip"] for e in st["v2p"]] == ["fd10::1:5"]
    assert [r["dest"] for r in st["routes"]] == ["fd10::/64", "::/0"]
    assert st["fw"] == [("any", "vni=4242"), ("icmp6", "any")]
    assert len(st["templates"]) == 4                  # no DHCPv4
    xdectl(hv, root, "delete", "p6")
    assert _own_state(hv, root, None)["templates"] == []


def _templates(root):
    """{(port index, kind): frame} of the root's gateway templates."""
    from xdectl.datapath import Datapath
    dp = Datapath(root.path)
    try:
        return {(k.port, k.kind): bytes(v.frame[:v.len]) for k, v in dp.maps()["gw_tmpl"].items()}
    finally:
        dp.close()


def _told(root):
    """{port: (dns, hostname, domain, gateway_error)} as list --json shows them."""
    return {p["name"]: (p["dns"], p["hostname"], p["domain"], p["gateway_error"])
            for p in root.ports()}


def _links_and_pins(hv, root):
    """snapshot() but the routes: the guest ends stay in hv, whose kernel
    takes the gateway's router advertisement whenever it solicits one."""
    snap = snapshot(hv, root, ["u1", "u2"])
    del snap["routes"]
    return snap


LONG_DOMAIN = ".".join(["d" * 60] * 4)     # 243 characters: a 571-byte DHCPv4 reply

SET_GATEWAY_BAD = [
    ("p0", ["--dns", "10.1.0.300"], "10.1.0.300"),
    ("p0", ["--dns", "fd10::53", "--dns", "fd10::53"], "twice"),
    ("p0", ["--dns", "fd10::1", "--dns", "fd10::2", "--dns", "fd10::3", "--dns", "fd10::4"],
     "at most 3"),
    ("p0", ["--hostname", "web.one"], "web.one"),
    ("p0", ["--domain", "bad_domain.example"], "bad_domain.example"),
    ("p0", ["--domain", LONG_DOMAIN], "571 bytes"),
    ("p6", ["--dns", "10.1.0.53"], "no --ip"),
    ("p6", ["--hostname", "web6"], "only DHCPv4"),
    ("pt", ["--dns", "10.1.0.53"], "passthrough"),
    ("nosuch0", [], "no port nosuch0"),
]


def test_set_gateway_changes_what_a_live_port_tells_its_guest(shared):
    """set-gateway replaces a port's DNS servers, host name and domain (no
    option: clears them), read back by list --json, in place: the port's
    other settings, links and the other ports' templates stay. Bad input is
    one line and changes nothing; so is a template list cannot read, and
    set-gateway repairs it."""
    hv, root = shared
    xdectl(hv, root, *create_args("p0", **DUAL))
    xdectl(hv, root, *create_args("p6", **dict(DUAL, mac="02:00:00:00:00:0B", ip=None,
                                                vpc_subnet=None, ip6="fd10::1:6", hostname=None,
                                                dns=["fd10::53"])))
    xdectl(hv, root, *create_args("pt", mac="A8:40:25:ff:00:0c", passthrough=True))
    ports = {p["name"]: p for p in root.ports()}
    before = _links_and_pins(hv, root)

    xdectl(hv, root, "set-gateway", "p0", "--dns", "fd10::54", "--dns", "10.1.0.54",
           "--domain", "other.example.")
    want = dict(_told(root), p0=(["10.1.0.54", "fd10::54"], None, "other.example", None))
    assert _told(root) == want
    for p in root.ports():     # nothing else about any port changed
        assert {k: v for k, v in p.items() if k not in ("dns", "hostname", "domain")} == \
            {k: v for k, v in ports[p["name"]].items() if k not in ("dns", "hostname", "domain")}
    assert _links_and_pins(hv, root) == before
    xdectl(hv, root, "set-gateway", "p0", "--hostname", "web2")
    assert _told(root)["p0"] == ([], "web2", None, None)
    xdectl(hv, root, "set-gateway", "p0")
    assert _told(root)["p0"] == ([], None, None, None)
    # an IPv6-only port takes a domain only a DHCPv4 reply could not hold
    xdectl(hv, root, "set-gateway", "p6", "--domain", LONG_DOMAIN)
    assert _told(root)["p6"] == ([], None, LONG_DOMAIN, None)

    told, tmpls = _told(root), _templates(root)
    for port, args, words in SET_GATEWAY_BAD:
        line = one_error_line(xdectl(hv, root, "set-gateway", port, *args, check=False))
        assert words.lower() in line.lower(), (port, args, line)
        assert _told(root) == told and _templates(root) == tmpls, (port, args)
    assert _links_and_pins(hv, root) == before

    # A template list cannot read: that port's settings show as null with
    # the reason, the others as usual; set-gateway writes it anew.
    from xdectl import abi
    from xdectl.datapath import Datapath
    [p0] = {i for i, kind in tmpls if kind == abi.GW_DHCP4}    # the one port with IPv4
    dp = Datapath(root.path)
    try:
        m = dp.maps()["gw_tmpl"]
        k = m.Key()
        k.port, k.kind = p0, abi.GW_DHCP6
        v = m.get(k)
        v.len = 20
        m.set(k, v)
    finally:
        dp.close()
    got = {p["name"]: p for p in xdectl_json(hv, root, "list")}
    assert (got["p0"]["dns"], got["p0"]["hostname"], got["p0"]["domain"]) == (None, None, None)
    assert "malformed" in got["p0"]["gateway_error"]
    assert _told(root)["p6"] == told["p6"] and got["pt"]["gateway_error"] is None
    p = xdectl(hv, root, "list")
    assert [line.split()[0] for line in p.stdout.splitlines()[1:]] == ["p0", "p6", "pt"]
    assert p.stderr.count("\n") == 1 and "p0" in p.stderr and "malformed" in p.stderr
    xdectl(hv, root, "set-gateway", "p0", "--dns", "10.1.0.53")
    assert _told(root)["p0"] == (["10.1.0.53"], None, None, None)


def test_set_gateway_on_an_absent_root_makes_nothing(clean_host):
    absent = Root(clean_host)
    line = one_error_line(xdectl(clean_host, absent, "set-gateway", "p0", "--dns", "10.0.0.53",
                                 check=False))
    assert "p0" in line and "nothing is loaded" in line
    assert not absent.exists()


def test_ipv6_port_needs_an_mtu_of_1280(shared):
    """An underlay that leaves a port under IPv6's minimum MTU takes an IPv4
    port but refuses an IPv6 one, in one line, leaving nothing behind."""
    hv, root = shared
    for u in ("u1", "u2"):
        hv.ip("link", "set", u, "mtu", "1340")     # 1340 - 70 = 1270 for the guest
    try:
        before = snapshot(hv, root, ["u1", "u2"])
        p = xdectl(hv, root, *create_args("xm6", passthrough=False, **{"ip6": "fd10::1"}),
                   check=False)
        assert "1280" in one_error_line(p)
        assert snapshot(hv, root, ["u1", "u2"]) == before
        xdectl(hv, root, *create_args("xm4", passthrough=False))
        assert [p["mtu"] for p in root.ports()] == [1270]
    finally:
        for u in ("u1", "u2"):
            hv.ip("link", "set", u, "mtu", "1500")


def test_failed_create_on_an_emptied_root_removes_its_own_v2p(shared):
    """A root whose last port is gone keeps that port's underlay address in
    its config until the next port attaches the underlays. A create with
    another address that fails at that step (the underlays carry another
    root's XDP program) must still take back the V2P mappings it added."""
    hv, root = shared
    xdectl(hv, root, *create_args("p0", **OVERLAY))
    xdectl(hv, root, "delete", "p0")
    assert xdectl_json(hv, root, "dump-v2p") == []
    other = Root(hv)
    try:
        xdectl(hv, other, *create_args("q0", passthrough=True))
        before = snapshot(hv, root, ["u1", "u2"])
        p = xdectl(hv, root, *create_args("p1", **dict(OVERLAY, ip6="fd10::1:5",
                                                       underlay_addr="fd00:1::2")), check=False)
        assert "xdp" in one_error_line(p).lower()
        assert xdectl_json(hv, root, "dump-v2p") == []
        assert _own_state(hv, root, None)["templates"] == []
        assert root.ports() == [] and snapshot(hv, root, ["u1", "u2"]) == before
    finally:
        other.cleanup()


def test_delete_last_port_detaches_underlays(shared):
    hv, root = shared
    before = snapshot(hv, None, ("u1", "u2"))
    xdectl(hv, root, *create_args("p0", passthrough=True))
    xdectl(hv, root, *create_args("p1", **OVERLAY))
    for u in ("u1", "u2"):
        assert hv.xdp_prog_id(u) is not None, f"no XDP on {u}"
        assert hv.tc_filters(u, "ingress"), f"no tc filter on {u}"

    xdectl(hv, root, "delete", "p0")
    assert not hv.has_link("p0") and not hv.has_link("p0_dp")
    for u in ("u1", "u2"):    # p1 still uses the underlays
        assert hv.xdp_prog_id(u) is not None
        assert hv.tc_filters(u, "ingress")

    xdectl(hv, root, "delete", "p1")
    for u in ("u1", "u2"):
        assert "xdp" not in hv.link_details(u), hv.link_details(u)
        assert hv.tc_filters(u, "ingress") == ""
    assert_clean_underlays(hv, ("u1", "u2"))
    assert snapshot(hv, None, ("u1", "u2")) == before
    # The instance (its maps) outlives its last port, until unload.
    assert root.exists() and root.ports() == []
    p = xdectl(hv, root, "unload")
    assert p.returncode == 0
    assert not root.exists()


def test_warm_create_reuses_pinned_programs(host):
    hv, root = host
    _, cold = timed_xdectl(hv, root, *create_args("p0", passthrough=True))
    pins = root.pins()
    xdp = {u: hv.xdp_prog_id(u) for u in ("u1", "u2")}
    port_prog = hv.tc_prog_ids("p0_dp")
    assert all(xdp.values()) and port_prog

    _, warm = timed_xdectl(hv, root, *create_args("p1", **OVERLAY))
    assert root.pins() == pins, "the second create re-pinned the datapath"
    assert hv.tc_prog_ids("p1_dp") == port_prog, "the ports run different programs"
    assert {u: hv.xdp_prog_id(u) for u in ("u1", "u2")} == xdp

    xdectl(hv, root, "delete", "p1")
    _, warm2 = timed_xdectl(hv, root, *create_args("p1", **OVERLAY))
    assert root.pins() == pins
    assert hv.tc_prog_ids("p1_dp") == port_prog
    assert {u: hv.xdp_prog_id(u) for u in ("u1", "u2")} == xdp
    print(f"create: cold {cold:.2f}s, warm {warm:.2f}s, {warm2:.2f}s")
    assert max(warm, warm2) < cold / 2, f"warm create {warm:.2f}s vs cold {cold:.2f}s: recompiled?"


def test_unload_refuses_with_ports_and_force_removes_everything(host):
    hv, root = host
    before = snapshot(hv, None, ("u1", "u2"))
    xdectl(hv, root, *create_args("p0", passthrough=True))
    xdectl(hv, root, *create_args("p1", **OVERLAY))
    ports, pins = root.ports(), root.pins()

    line = one_error_line(xdectl(hv, root, "unload", check=False))
    assert "p0" in line and "p1" in line, line
    assert root.pins() == pins and root.ports() == ports
    assert hv.xdp_prog_id("u1") is not None

    xdectl(hv, root, "unload", "--force")
    assert not root.exists(), f"{root} still exists: {root.pins()}"
    for name in ("p0", "p0_dp", "p1", "p1_dp"):
        assert not hv.has_link(name), name
    assert_clean_underlays(hv, ("u1", "u2"))
    assert snapshot(hv, None, ("u1", "u2")) == before


def _edit_meta(root, **fields):
    """Make the pinned instance look built by another xdectl."""
    from xdectl import libbpf
    fd = libbpf.obj_get(root.path / "maps" / "meta")
    try:
        buf = ct.create_string_buffer(libbpf.map_value_size(fd))
        key = ct.c_uint32(0)
        libbpf.lookup(fd, key, buf)
        meta = json.loads(buf.value.decode())
        meta.update(fields)
        text = json.dumps(meta).encode()
        ct.memmove(buf, text + b"\0", len(text) + 1)
        libbpf.update(fd, key, buf)
    finally:
        os.close(fd)


def test_other_sources_same_layout_reload_takes_over(host):
    """Sources that differ only in what does not define the maps (comments,
    helpers, programs): commands point at reload, and reload loads them."""
    hv, root = host
    xdectl(hv, root, *create_args("p0", passthrough=True))
    _edit_meta(root, sources="0" * 16)
    line = one_error_line(xdectl(hv, root, "list", check=False))
    assert "other bpf/ sources" in line and "reload" in line, line
    p = xdectl(hv, root, "reload", check=False)
    assert p.returncode == 0, p.stderr
    assert [r["name"] for r in json.loads(xdectl(hv, root, "list", "--json").stdout)] == ["p0"]
    xdectl(hv, root, "delete", "p0")


def test_unload_force_removes_instance_of_other_layout(host):
    """After an upgrade changes the map layout, xdectl refuses the old pins,
    reload refuses too and says why, and both tell the user to run
    `unload --force`: that command must work."""
    hv, root = host
    before = snapshot(hv, None, ("u1", "u2"))
    xdectl(hv, root, *create_args("p0", passthrough=True))
    _edit_meta(root, sources="0" * 16, layout="0" * 16)
    line = one_error_line(xdectl(hv, root, "list", check=False))
    assert "unload --force" in line, line
    line = one_error_line(xdectl(hv, root, "reload", check=False))
    assert "map layout 0000000000000000" in line and "unload --force" in line, line
    assert not list((root.path / "progs").glob("new_*")), "reload left new programs pinned"

    p = xdectl(hv, root, "unload", "--force", check=False)
    assert p.returncode == 0, f"unload --force refused: {p.stderr}"
    assert not root.exists()
    assert not hv.has_link("p0") and not hv.has_link("p0_dp")
    assert_clean_underlays(hv, ("u1", "u2"))
    assert snapshot(hv, None, ("u1", "u2")) == before
