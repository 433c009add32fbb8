"""`xdectl apply FILE` (docs/design.md, "Reload, apply and trace"): the
running state made to match a TOML file, idempotently. Runs in a namespace of
its own with two veth underlays (tests/netns.py: names `xt<hex>`, roots
`/sys/fs/bpf/xt-<hex>`), removed at the end; xdectl runs there through
`nsenter --net`.

Also here: the systemd units that run `apply` at boot and the exporter.
"""
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from netns import Root, one_error_line, underlay_host, xdectl, xdectl_json
from xdectl import apply as apply_mod
from xdectl import nat
from xdectl.errors import XdeError
from xdectl.nat import ExternalIPs

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"

DEFAULTS = """
[defaults]
underlays = ["u1", "u2"]
underlay_addr = "fd00:1::1"
gateway_mac = "A8:40:25:00:00:01"
gateway_ip = "172.30.0.5"
boundary_services = "fd00:99::1"
boundary_vni = 99
vni = 10
"""

FILE_A = DEFAULTS + """
[[port]]
name = "xde0"
mac = "a8:40:25:ff:00:01"
ip = "10.0.0.1"
routes = [
  { dest = "192.168.10.0/24", target = "ip4=10.0.0.2" },
  { dest = "198.51.100.0/24", target = "drop" },
]
firewall = [
  "dir=in action=allow priority=65535 hosts=vni=10",
  "dir=in action=allow priority=100 protocol=tcp ports=443,22",
  "dir=out action=deny priority=10 hosts=subnet=203.0.113.7/32",
]

[[port]]
name = "xde1"
mac = "a8:40:25:ff:00:11"
ip = "10.0.0.11"

[[v2p]]
ip = "10.0.0.2"
mac = "a8:40:25:ff:00:02"
underlay = "fd00:2::1"
vni = 10

[[v2p]]
ip = "10.0.0.3"
mac = "a8:40:25:ff:00:03"
underlay = "fd00:3::1"
vni = 10
"""

# From A: xde0 keeps its fields (one route changed, one removed, one added;
# its firewall no longer managed), xde1 is gone, xde2 is new; one V2P
# mapping changes, one goes, one comes.
FILE_B = DEFAULTS + """
[[port]]
name = "xde0"
mac = "a8:40:25:ff:00:01"
ip = "10.0.0.1"
routes = [
  { dest = "198.51.100.0/24", target = "ig" },
  { dest = "203.0.113.0/24", target = "sub4=10.0.0.0/24" },
]

[[port]]
name = "xde2"
mac = "a8:40:25:ff:00:22"
ip = "10.0.0.22"
firewall = []

[[v2p]]
ip = "10.0.0.2"
mac = "a8:40:25:ff:00:02"
underlay = "fd00:20::1"
vni = 10

[[v2p]]
ip = "10.0.0.4"
mac = "a8:40:25:ff:00:04"
underlay = "fd00:4::1"
vni = 10
"""

PLAN_A_TO_B = [
    "- delete-port xde1 (not in the file)",
    "+ create-port xde2 (10.0.0.22 a8:40:25:ff:00:22 vni 10)",
    "+ set-v2p 10.0.0.2 vni 10 (a8:40:25:ff:00:02 at fd00:20::1, was a8:40:25:ff:00:02 at fd00:2::1)",
    "- clear-v2p 10.0.0.3 vni 10 (a8:40:25:ff:00:03 at fd00:3::1)",
    "+ set-v2p 10.0.0.4 vni 10 (a8:40:25:ff:00:04 at fd00:4::1)",
    "- del-route xde0 192.168.10.0/24 (was ip4=10.0.0.2)",
    "+ add-route xde0 198.51.100.0/24 (ig, was drop)",
    "+ add-route xde0 203.0.113.0/24 (sub4=10.0.0.0/24)",
    "~ set-fw xde2 (0 rules)",
]


def _host():
    hv, far = underlay_host("ap")
    root = Root(hv)
    try:
        yield hv, root
    finally:
        root.cleanup()
        hv.delete()
        far.delete()
    assert not root.path.exists()


@pytest.fixture
def host(privileged):
    yield from _host()


@pytest.fixture(scope="module")
def loaded(privileged, tmp_path_factory):
    """A host with FILE_A applied, for tests that must change nothing."""
    for hv, root in _host():
        apply(hv, root, tmp_path_factory.mktemp("loaded"), FILE_A)
        yield hv, root, state(hv, root)


def apply(hv, root, tmp_path, text, *opts, check=True, name="xde.toml"):
    f = tmp_path / name
    f.write_text(text)
    return xdectl(hv, root, "apply", *opts, str(f), check=check)


def lines(p):
    return p.stdout.strip().splitlines()


def state(hv, root):
    """Everything apply manages, plus the ports' link indexes (a port that
    was recreated gets a new one)."""
    ports = xdectl_json(hv, root, "list") if root.exists() else []
    links = {l["ifname"]: l["ifindex"] for l in json.loads(hv.ip("-j", "link", "show").stdout)}
    out = {"ports": ports, "v2p": xdectl_json(hv, root, "dump-v2p") if root.exists() else [],
           "links": {p["name"]: (links.get(p["name"]), links.get(p["name"][:12] + "_dp"))
                     for p in ports}}
    for p in ports:
        out[f"routes {p['name']}"] = xdectl_json(hv, root, "dump-router", p["name"])
        out[f"fw {p['name']}"] = [{k: v for k, v in r.items() if k != "hits"}
                                  for r in xdectl_json(hv, root, "dump-fw", p["name"])]
    return out


def v2p_set(st):
    return {(e["vni"], e["ip"], e["mac"], e["underlay"]) for e in st["v2p"]}


def custom_routes(st, port):
    return {(r["dest"], r["target"]) for r in st[f"routes {port}"] if r["kind"] == "custom"}


def fw_texts(st, port):
    return sorted(f"{r['dir']} {r['action']} {r['priority']} {r['hosts']} {r['protocol']} {r['ports']}"
                  for r in st[f"fw {port}"])


def test_apply_creates_then_second_apply_is_a_no_op(host, tmp_path):
    hv, root = host
    plan = apply(hv, root, tmp_path, FILE_A, "--dry-run")
    assert not root.exists(), "a dry run must not load anything"
    assert lines(plan)[-1] == "7 changes planned (dry run: nothing changed)"

    first = apply(hv, root, tmp_path, FILE_A)
    assert lines(first)[:-1] == lines(plan)[:-1]
    assert lines(first)[-1] == "7 changes applied"
    st = state(hv, root)
    assert [p["name"] for p in st["ports"]] == ["xde0", "xde1"]
    assert v2p_set(st) == {(10, "10.0.0.1", "a8:40:25:ff:00:01", "fd00:1::1"),
                           (10, "10.0.0.11", "a8:40:25:ff:00:11", "fd00:1::1"),
                           (10, "10.0.0.2", "a8:40:25:ff:00:02", "fd00:2::1"),
                           (10, "10.0.0.3", "a8:40:25:ff:00:03", "fd00:3::1")}
    assert custom_routes(st, "xde0") == {("192.168.10.0/24", "ip4=10.0.0.2"),
                                         ("198.51.100.0/24", "drop")}
    assert custom_routes(st, "xde1") == set()
    assert fw_texts(st, "xde0") == sorted(["in allow 65535 vni=10 any any",
                                           "in allow 100 any tcp 22,443",
                                           "out deny 10 ip=203.0.113.7 any any"])
    # no firewall key: create's default rules stay
    assert fw_texts(st, "xde1") == sorted(["in allow 65535 vni=10 any any",
                                           "in allow 65535 any icmp any"])

    second = apply(hv, root, tmp_path, FILE_A)
    assert lines(second) == ["no changes"]
    assert state(hv, root) == st
    assert lines(apply(hv, root, tmp_path, FILE_A, "--dry-run")) == ["no changes"]
    j = json.loads(apply(hv, root, tmp_path, FILE_A, "--json").stdout)
    assert j == {"dry_run": False, "actions": []}
    assert state(hv, root) == st


def test_changed_file_makes_exactly_the_changes(host, tmp_path):
    hv, root = host
    apply(hv, root, tmp_path, FILE_A)
    before = state(hv, root)

    plan = apply(hv, root, tmp_path, FILE_B, "--dry-run")
    assert lines(plan)[:-1] == PLAN_A_TO_B
    assert state(hv, root) == before, "--dry-run changed something"

    done = apply(hv, root, tmp_path, FILE_B)
    assert lines(done) == PLAN_A_TO_B + [f"{len(PLAN_A_TO_B)} changes applied"]
    after = state(hv, root)
    assert [p["name"] for p in after["ports"]] == ["xde0", "xde2"]
    # xde0 was changed in place, never recreated
    assert after["links"]["xde0"] == before["links"]["xde0"]
    assert after["ports"][0] == before["ports"][0]
    assert not hv.has_link("xde1") and not hv.has_link("xde1_dp")
    assert v2p_set(after) == {(10, "10.0.0.1", "a8:40:25:ff:00:01", "fd00:1::1"),
                              (10, "10.0.0.22", "a8:40:25:ff:00:22", "fd00:1::1"),
                              (10, "10.0.0.2", "a8:40:25:ff:00:02", "fd00:20::1"),
                              (10, "10.0.0.4", "a8:40:25:ff:00:04", "fd00:4::1")}
    assert custom_routes(after, "xde0") == {("198.51.100.0/24", "ig"),
                                            ("203.0.113.0/24", "sub4=10.0.0.0/24")}
    # the system routes create made are untouched
    assert [r for r in after["routes xde0"] if r["kind"] == "system"] == \
        [r for r in before["routes xde0"] if r["kind"] == "system"]
    # xde0's firewall is no longer managed: as A left it, ids included
    assert after["fw xde0"] == before["fw xde0"]
    assert after["fw xde2"] == []

    assert lines(apply(hv, root, tmp_path, FILE_B)) == ["no changes"]
    assert state(hv, root) == after


def test_changed_port_is_replaced_and_its_own_mapping_follows(host, tmp_path):
    hv, root = host
    apply(hv, root, tmp_path, FILE_A)
    before = state(hv, root)
    changed = FILE_A.replace('ip = "10.0.0.11"', 'ip = "10.0.0.12"')
    p = apply(hv, root, tmp_path, changed)
    assert lines(p) == ["- delete-port xde1 (replaced: ip 10.0.0.11 -> 10.0.0.12)",
                        "+ create-port xde1 (10.0.0.12 a8:40:25:ff:00:11 vni 10)",
                        "2 changes applied"]
    after = state(hv, root)
    assert after["links"]["xde1"] != before["links"]["xde1"]
    assert after["links"]["xde0"] == before["links"]["xde0"]
    assert v2p_set(after) == (v2p_set(before) - {(10, "10.0.0.11", "a8:40:25:ff:00:11", "fd00:1::1")}
                              | {(10, "10.0.0.12", "a8:40:25:ff:00:11", "fd00:1::1")})
    assert lines(apply(hv, root, tmp_path, changed)) == ["no changes"]

    # the instance's underlay address: every port is replaced, deletions first
    moved = changed.replace('underlay_addr = "fd00:1::1"', 'underlay_addr = "fd00:1::5"')
    p = apply(hv, root, tmp_path, moved)
    assert [l.split(" (")[0] for l in lines(p)] == [
        "- delete-port xde0", "- delete-port xde1", "+ create-port xde0", "+ create-port xde1",
        "+ add-route xde0 192.168.10.0/24", "+ add-route xde0 198.51.100.0/24", "~ set-fw xde0",
        "7 changes applied"]
    assert {p["underlay_addr"] for p in xdectl_json(hv, root, "list")} == {"fd00:1::5"}
    assert lines(apply(hv, root, tmp_path, moved)) == ["no changes"]


def test_dual_stack_and_gateway_settings_in_place(host, tmp_path):
    """A dual-stack and an IPv6-only port from a file; then new DNS servers
    and domain: rewritten in place (same links, same everything else)."""
    hv, root = host
    assert lines(apply(hv, root, tmp_path, FILE_D))[-1] == "8 changes applied"
    st = state(hv, root)
    p0 = st["ports"][0]
    assert (p0["ip6"], p0["vpc_subnet6"], p0["dns"], p0["hostname"], p0["domain"]) == \
        ("fd10::1", "fd10::/64", ["10.0.0.53", "fd10::53"], "web1", "vpc.example")
    assert (st["ports"][1]["ip"], st["ports"][1]["ip6"]) == (None, "fd10::6")
    assert [e["ip"] for e in st["v2p"]] == ["10.0.0.1", "10.0.0.2", "fd10::1", "fd10::2",
                                            "fd10::6"]
    assert custom_routes(st, "xde0") == {("fd20::/48", "ip6=fd10::2"),
                                         ("fd30::/48", "sub6=fd30::/48"),
                                         ("192.168.10.0/24", "ip4=10.0.0.2")}
    assert fw_texts(st, "xde6") == sorted(["in allow 65535 vni=10 any any",
                                           "in allow 65535 any icmp6 any"])
    assert lines(apply(hv, root, tmp_path, FILE_D)) == ["no changes"]

    changed = FILE_D.replace('dns = ["fd10::53", "10.0.0.53"]', 'dns = ["fd10::54"]').replace(
        'domain = "vpc.example."', 'domain = "other.example"')
    assert lines(apply(hv, root, tmp_path, changed)) == [
        "~ set-gateway xde0 (dns 10.0.0.53,fd10::53 -> fd10::54, domain vpc.example -> "
        "other.example)", "1 changes applied"]
    after = state(hv, root)
    assert (after["ports"][0]["dns"], after["ports"][0]["domain"]) == (["fd10::54"],
                                                                       "other.example")
    after["ports"][0].update(dns=p0["dns"], domain=p0["domain"])
    assert after == st, "more changed than the gateway's settings"
    assert lines(apply(hv, root, tmp_path, changed)) == ["no changes"]


def test_ports_not_in_the_file_are_deleted(host, tmp_path):
    hv, root = host
    apply(hv, root, tmp_path, FILE_A)
    p = apply(hv, root, tmp_path, "")
    assert lines(p) == ["- delete-port xde0 (not in the file)",
                        "- delete-port xde1 (not in the file)",
                        "- clear-v2p 10.0.0.2 vni 10 (a8:40:25:ff:00:02 at fd00:2::1)",
                        "- clear-v2p 10.0.0.3 vni 10 (a8:40:25:ff:00:03 at fd00:3::1)",
                        "4 changes applied"]
    assert xdectl_json(hv, root, "list") == [] and xdectl_json(hv, root, "dump-v2p") == []
    assert not hv.has_link("xde0") and hv.xdp_prog_id("u1") is None
    assert lines(apply(hv, root, tmp_path, "")) == ["no changes"]


@pytest.mark.parametrize("bad,words", [
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip = "10.0.0.9"\ncolour = "red"\n',
     "unknown key colour"),
    ('[[port]]\nname = "x"\nmac = "ff:ff:ff:ff:ff:ff"\nip = "10.0.0.9"\n', "multicast"),
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\n', "missing ip"),
    ('[[port]]\nname = "xde0"\nmac = "a8:40:25:ff:00:09"\nip = "10.0.0.9"\n'
     'routes = [{ dest = "10.1.0.0/16", target = "sideways" }]\n', "is not one of drop"),
    ('[[port]]\nname = "xde0"\nmac = "a8:40:25:ff:00:09"\nip = "10.0.0.9"\n'
     'firewall = ["dir=in action=maybe priority=1"]\n', "firewall rule 1"),
    ('[[v2p]]\nip = "10.0.0.1"\nmac = "a8:40:25:ff:00:99"\nunderlay = "fd00:9::1"\nvni = 10\n',
     "contradicts port xde0"),
    ("[[port]\n", "xde.toml"),
])
def test_a_bad_file_changes_nothing(loaded, tmp_path, bad, words):
    hv, root, before = loaded
    text = bad if "[defaults]" in bad or bad.startswith("[[port]\n") else DEFAULTS + bad
    if "contradicts" in words:
        text = FILE_A + bad
    p = apply(hv, root, tmp_path, text, check=False)
    line = one_error_line(p)
    assert words in line, line
    assert state(hv, root) == before


def test_missing_file_is_one_line(loaded, tmp_path):
    hv, root, _ = loaded
    p = xdectl(hv, root, "apply", str(tmp_path / "nope.toml"), check=False)
    assert "cannot read" in one_error_line(p)


# --- the shipped files ---------------------------------------------------------

def test_example_file_is_valid_and_documented():
    want = apply_mod.load(str(DEPLOY / "xde.example.toml"))
    assert set(want.ports) == {"xde0", "xde1"}
    assert want.ports["xde0"].routes == {"192.168.10.0/24": "ip4=10.0.0.2",
                                         "198.51.100.0/24": "drop", "fd20::/48": "ip6=fd10::2"}
    assert len(want.ports["xde0"].firewall) == 6 and want.ports["xde1"].firewall is None
    s = want.ports["xde0"].spec
    assert (s.ip6, s.vpc_subnet6, s.dns, s.hostname, s.domain) == \
        ("fd10::1", "fd10::/64", ["10.0.0.53", "fd10::53"], "web1", "vpc.example")
    # xde0's own mappings, both families, and the others'
    assert {(10, "10.0.0.1"), (10, "fd10::1"), (10, "10.0.0.2"), (10, "fd10::2")} <= set(want.v2p)
    assert s.external == ExternalIPs(("192.0.2.5", "2001:db8:5::5"), 1024, 2047)
    assert want.ports["xde1"].spec.external == ExternalIPs(ephemeral_ips=("192.0.2.11",))
    for key in ("[defaults]", "[[port]]", "[[v2p]]", "routes", "firewall", "ip6", "vpc_subnet6",
                "dns", "hostname", "domain", "snat_ip", "snat_start", "snat_end", "ephemeral_ip",
                "floating_ips"):
        assert key in apply_mod.__doc__
        assert key in (DEPLOY / "xde.example.toml").read_text()


def test_plan_is_computed_from_state_alone():
    """plan() is a pure function of (running state, file)."""
    want = apply_mod.parse(FILE_A)
    cur = apply_mod.Current({}, {}, {}, {})
    actions = apply_mod.plan(cur, want)
    assert [a.op for a in actions] == ["create-port", "create-port", "set-v2p", "set-v2p",
                                       "add-route", "add-route", "set-fw"]
    with pytest.raises(XdeError, match="share one underlay pair"):
        apply_mod.parse(FILE_A.replace('name = "xde1"', 'name = "xde1"\nunderlays = ["u3", "u4"]'))


def _units(tmp_path):
    """The units with ExecStart's xdectl pointed at this checkout's, which
    systemd-analyze needs to find (the units name /usr/local/bin/xdectl)."""
    xdectl_bin = REPO / ".venv" / "bin" / "xdectl"
    out = []
    for name in ("xde-apply.service", "xde-metrics.service"):
        text = (DEPLOY / name).read_text()
        assert "/usr/local/bin/xdectl" in text
        (tmp_path / name).write_text(text.replace("/usr/local/bin/xdectl", str(xdectl_bin)))
        out.append(tmp_path / name)
    return out


def test_systemd_units_verify(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze is not installed"
    units = _units(tmp_path)
    p = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True,
                       text=True, timeout=60)
    # verify exits 0 on warnings such as unknown keys: no output at all is the pass
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), \
        p.stdout + p.stderr


def test_systemd_verify_can_fail(tmp_path):
    units = _units(tmp_path)
    units[0].write_text(units[0].read_text().replace("ExecStart=", "ExecStrat="))
    p = subprocess.run(["systemd-analyze", "verify", str(units[0])], capture_output=True,
                       text=True, timeout=60)
    assert "ExecStrat" in p.stdout + p.stderr


def test_units_run_the_right_commands():
    a = (DEPLOY / "xde-apply.service").read_text()
    assert re.search(r"^Type=oneshot$", a, re.M)
    assert re.search(r"^ExecStart=/usr/local/bin/xdectl apply /etc/xde/xde.toml$", a, re.M)
    assert "mount -t bpf bpf /sys/fs/bpf" in a and re.search(r"^ExecStartPre=", a, re.M)
    assert re.search(r"^WantedBy=multi-user.target$", a, re.M)
    m = (DEPLOY / "xde-metrics.service").read_text()
    assert re.search(r"^ExecStart=/usr/local/bin/xdectl metrics --listen \S+$", m, re.M)
    assert re.search(r"^After=.*xde-apply.service", m, re.M)
    assert re.search(r"^Restart=on-failure$", m, re.M)


# --- dual stack and the gateway's settings (no root: parse and plan) -------------------

FILE_D = DEFAULTS + """
[[port]]
name = "xde0"
mac = "a8:40:25:ff:00:01"
ip = "10.0.0.1"
ip6 = "fd10::1"
dns = ["fd10::53", "10.0.0.53"]
hostname = "web1"
domain = "vpc.example."
routes = [
  { dest = "fd20::/48", target = "ip6=fd10::2" },
  { dest = "FD30:0::/48", target = "sub6=FD30::/48" },
  { dest = "192.168.10.0/24", target = "ip4=10.0.0.2" },
]
firewall = [
  "dir=in action=allow priority=65535 protocol=icmp6",
  "dir=in action=allow priority=10 hosts=subnet=fd20::/48 protocol=tcp ports=22",
  "dir=out action=deny priority=10 hosts=subnet=fd20::5/128",
]

[[port]]
name = "xde6"
mac = "a8:40:25:ff:00:06"
ip6 = "fd10::6"

[[v2p]]
ip = "fd10::2"
mac = "a8:40:25:ff:00:02"
underlay = "fd00:2::1"
vni = 10

[[v2p]]
ip = "10.0.0.2"
mac = "a8:40:25:ff:00:02"
underlay = "fd00:2::1"
vni = 10
"""


def applied(want):
    """The running state right after `want` was applied (what current() reads)."""
    return apply_mod.Current(
        {n: w.spec for n, w in want.ports.items()},
        {n: dict(w.routes) for n, w in want.ports.items()},
        {n: sorted(w.firewall or []) for n, w in want.ports.items()}, dict(want.v2p))


def test_dual_stack_file_parsed_and_normalised():
    want = apply_mod.parse(FILE_D)
    s = want.ports["xde0"].spec
    assert (s.ip, s.ip6, s.vpc_subnet6, s.dns, s.hostname, s.domain) == \
        ("10.0.0.1", "fd10::1", "fd10::/64", ["10.0.0.53", "fd10::53"], "web1", "vpc.example")
    assert want.ports["xde0"].routes == {"fd20::/48": "ip6=fd10::2", "fd30::/48": "sub6=fd30::/48",
                                         "192.168.10.0/24": "ip4=10.0.0.2"}
    assert want.ports["xde0"].firewall[2] == \
        "dir=out action=deny priority=10 hosts=ip=fd20::5 protocol=any ports=any"
    s6 = want.ports["xde6"].spec
    assert (s6.ip, s6.vpc_subnet, s6.ip6, s6.vpc_subnet6) == (None, None, "fd10::6", "fd10::/64")
    own = ("a8:40:25:ff:00:01", "fd00:1::1")
    assert want.v2p[(10, "10.0.0.1")] == own and want.v2p[(10, "fd10::1")] == own
    assert want.v2p[(10, "fd10::6")] == ("a8:40:25:ff:00:06", "fd00:1::1")


def test_dual_stack_plan_from_nothing_and_no_changes_after():
    want = apply_mod.parse(FILE_D)
    lines = [a.line() for a in apply_mod.plan(apply_mod.Current({}, {}, {}, {}), want)]
    assert lines == [
        "+ create-port xde0 (10.0.0.1 fd10::1 a8:40:25:ff:00:01 vni 10)",
        "+ create-port xde6 (fd10::6 a8:40:25:ff:00:06 vni 10)",
        "+ set-v2p 10.0.0.2 vni 10 (a8:40:25:ff:00:02 at fd00:2::1)",
        "+ set-v2p fd10::2 vni 10 (a8:40:25:ff:00:02 at fd00:2::1)",
        "+ add-route xde0 192.168.10.0/24 (ip4=10.0.0.2)",
        "+ add-route xde0 fd20::/48 (ip6=fd10::2)",
        "+ add-route xde0 fd30::/48 (sub6=fd30::/48)",
        "~ set-fw xde0 (3 rules)",
    ]
    assert apply_mod.plan(applied(want), want) == []


XDE0_AGAIN = [   # a replaced xde0 gets its routes and rules again
    "+ add-route xde0 192.168.10.0/24 (ip4=10.0.0.2)",
    "+ add-route xde0 fd20::/48 (ip6=fd10::2)",
    "+ add-route xde0 fd30::/48 (sub6=fd30::/48)",
    "~ set-fw xde0 (3 rules)",
]


@pytest.mark.parametrize("old,new,expect", [
    ('dns = ["fd10::53", "10.0.0.53"]', 'dns = ["10.0.0.54"]',
     ["~ set-gateway xde0 (dns 10.0.0.53,fd10::53 -> 10.0.0.54)"]),
    ('hostname = "web1"\n', "", ["~ set-gateway xde0 (hostname web1 -> none)"]),
    ('domain = "vpc.example."', 'domain = "other.example"',
     ["~ set-gateway xde0 (domain vpc.example -> other.example)"]),
    ('ip6 = "fd10::1"', 'ip6 = "fd10::7"',
     ["- delete-port xde0 (replaced: ip6 fd10::1 -> fd10::7)",
      "+ create-port xde0 (10.0.0.1 fd10::7 a8:40:25:ff:00:01 vni 10)"] + XDE0_AGAIN),
    ('ip = "10.0.0.1"\n', "",
     ["- delete-port xde0 (replaced: ip 10.0.0.1 -> none, vpc_subnet 10.0.0.0/24 -> none)",
      "+ create-port xde0 (fd10::1 a8:40:25:ff:00:01 vni 10)"] + XDE0_AGAIN),
    ('ip6 = "fd10::6"', 'ip6 = "fd10::6"\nvpc_subnet6 = "fd10::/48"',
     ["- delete-port xde6 (replaced: vpc_subnet6 fd10::/64 -> fd10::/48)",
      "+ create-port xde6 (fd10::6 a8:40:25:ff:00:06 vni 10)"]),
])
def test_gateway_settings_change_in_place_addresses_replace(old, new, expect):
    """FILE_D applied, then FILE_D with one change: what the gateway tells
    the guest changes in place, an address or a subnet replaces the port
    (whose own mappings follow it, with no V2P action)."""
    assert old in FILE_D
    text = FILE_D.replace(old, new, 1)
    if old.startswith("ip ="):    # an IPv6-only port: no IPv4 to reach 192.168.10.0/24
        text = text.replace('  { dest = "192.168.10.0/24", target = "ip4=10.0.0.2" },\n', "")
        text = text.replace('dns = ["fd10::53", "10.0.0.53"]\nhostname = "web1"\n', 'dns = ["fd10::53"]\n')
        expect = [l for l in expect if "192.168" not in l]
    got = [a.line() for a in apply_mod.plan(applied(apply_mod.parse(FILE_D)),
                                            apply_mod.parse(text))]
    assert got == expect


def test_unreadable_gateway_templates_are_rewritten():
    """list shows a port whose templates it cannot read with dns, hostname
    and domain None: apply rewrites them in place, nothing else."""
    want = apply_mod.parse(FILE_D)
    cur = applied(want)
    cur.ports["xde0"] = dataclasses.replace(cur.ports["xde0"], dns=None, hostname=None,
                                            domain=None)
    assert [a.line() for a in apply_mod.plan(cur, want)] == \
        ["~ set-gateway xde0 (templates unreadable, rewritten)"]


@pytest.mark.parametrize("extra,words", [
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\n', "missing ip (or ip6)"),
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip6 = "fe80::9"\n', "link-local"),
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip6 = 9\n', "ip6 must be a string"),
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip = "10.0.0.9"\ndns = "10.0.0.53"\n',
     "dns must be a list"),
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip6 = "fd10::9"\nhostname = "h"\n',
     "only DHCPv4"),
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip6 = "fd10::9"\n'
     'routes = [{ dest = "fd20::/48", target = "ip4=10.0.0.2" }]\n', "is IPv4, destination"),
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip6 = "fd10::9"\n'
     'firewall = ["dir=in action=allow priority=1 hosts=subnet=::/0"]\n', "firewall rule 1"),
    ('[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip6 = "fd10::9"\n[[v2p]]\nip = "fd10::9"\n'
     'mac = "a8:40:25:ff:00:99"\nunderlay = "fd00:9::1"\nvni = 10\n', "contradicts port x"),
    ('[[v2p]]\nip = "::ffff:10.0.0.9"\nmac = "a8:40:25:ff:00:99"\nunderlay = "fd00:9::1"\n'
     'vni = 10\n', "IPv4-mapped"),
])
def test_a_bad_dual_stack_file_is_one_line(extra, words):
    with pytest.raises(XdeError) as exc:
        apply_mod.parse(DEFAULTS + extra)
    assert words in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_hostname_and_ip6_are_per_port():
    for key in ('hostname = "h"', 'ip6 = "fd10::9"'):
        with pytest.raises(XdeError, match="unknown key"):
            apply_mod.parse(DEFAULTS.replace("[defaults]", "[defaults]\n" + key))
    want = apply_mod.parse(DEFAULTS.replace("[defaults]", '[defaults]\ndns = ["10.0.0.53"]') +
                           '[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\nip = "10.0.0.9"\n')
    assert want.ports["x"].spec.dns == ["10.0.0.53"]


# --- external addresses (no root: parse, plan, read-back) -------------------------

EXTERNAL = """snat_ip = ["2001:DB8:5::5", "192.0.2.5"]
snat_start = 1024
snat_end = 2047
floating_ips = ["192.0.2.7"]
"""
FILE_N = FILE_D.replace('domain = "vpc.example."\n', 'domain = "vpc.example."\n' + EXTERNAL, 1) \
    .replace('ip6 = "fd10::6"\n', 'ip6 = "fd10::6"\nephemeral_ip = "2001:db8:6::6"\n', 1)
XDE0_EXTERNAL = ExternalIPs(("192.0.2.5", "2001:db8:5::5"), 1024, 2047, (), ("192.0.2.7",))


def test_external_addresses_parsed_and_normalised():
    """Addresses normalised and kept as the datapath keeps them: IPv4's
    first (what current() reads back)."""
    want = apply_mod.parse(FILE_N)
    assert want.ports["xde0"].spec.external == XDE0_EXTERNAL
    assert want.ports["xde6"].spec.external == ExternalIPs(ephemeral_ips=("2001:db8:6::6",))
    # a port without them has none
    assert not apply_mod.parse(FILE_D).ports["xde0"].spec.external
    # one address may be a list of one
    one = FILE_N.replace('ephemeral_ip = "2001:db8:6::6"', 'ephemeral_ip = ["2001:db8:6::6"]')
    assert apply_mod.parse(one).ports["xde6"].spec.external == \
        want.ports["xde6"].spec.external


def test_external_addresses_come_with_the_port():
    """A new port gets its external addresses from create (no action of
    their own); applied, the file plans nothing, whatever the order of
    its addresses."""
    want = apply_mod.parse(FILE_N)
    lines = [a.line() for a in apply_mod.plan(apply_mod.Current({}, {}, {}, {}), want)]
    assert lines[:2] == ["+ create-port xde0 (10.0.0.1 fd10::1 a8:40:25:ff:00:01 vni 10)",
                         "+ create-port xde6 (fd10::6 a8:40:25:ff:00:06 vni 10)"]
    assert not [l for l in lines if "external" in l]
    assert apply_mod.plan(applied(want), want) == []
    swapped = FILE_N.replace('["2001:DB8:5::5", "192.0.2.5"]', '["192.0.2.5", "2001:db8:5::5"]')
    assert apply_mod.plan(applied(want), apply_mod.parse(swapped)) == []


@pytest.mark.parametrize("old,new,expect", [
    ("snat_end = 2047", "snat_end = 4095",
     ["~ set-external-ips xde0 (snat_range 1024-2047 -> 1024-4095)"]),
    ('floating_ips = ["192.0.2.7"]\n', "",
     ["~ set-external-ips xde0 (floating_ips 192.0.2.7 -> none)"]),
    (EXTERNAL, "",
     ["~ set-external-ips xde0 (snat_ip 192.0.2.5,2001:db8:5::5 -> none, snat_range 1024-2047 "
      "-> none, floating_ips 192.0.2.7 -> none)"]),
    ('floating_ips = ["192.0.2.7"]', 'floating_ips = ["192.0.2.7", "2001:db8:7::7", "192.0.2.8"]',
     ["~ set-external-ips xde0 (floating_ips 192.0.2.7 -> 192.0.2.7,192.0.2.8,2001:db8:7::7)"]),
    ('ephemeral_ip = "2001:db8:6::6"', 'floating_ips = ["2001:db8:6::6"]',
     ["~ set-external-ips xde6 (ephemeral_ip 2001:db8:6::6 -> none, floating_ips none -> "
      "2001:db8:6::6)"]),
    ('domain = "vpc.example."\nsnat_ip = ["2001:DB8:5::5", "192.0.2.5"]',
     'domain = "other.example"\nsnat_ip = ["2001:DB8:5::9", "192.0.2.5"]',
     ["~ set-external-ips xde0 (snat_ip 192.0.2.5,2001:db8:5::5 -> 192.0.2.5,2001:db8:5::9)",
      "~ set-gateway xde0 (domain vpc.example -> other.example)"]),
    # replaced anyway: create gives the new port its new addresses
    ('ip6 = "fd10::1"\ndns', 'ip6 = "fd10::7"\ndns',
     ["- delete-port xde0 (replaced: ip6 fd10::1 -> fd10::7)",
      "+ create-port xde0 (10.0.0.1 fd10::7 a8:40:25:ff:00:01 vni 10)"] + XDE0_AGAIN),
])
def test_external_addresses_change_in_place(old, new, expect):
    assert old in FILE_N
    have = applied(apply_mod.parse(FILE_N))
    want = apply_mod.parse(FILE_N.replace(old, new, 1))
    actions = apply_mod.plan(have, want)
    assert [a.line() for a in actions] == expect
    # then nothing more to do
    assert apply_mod.plan(applied(want), want) == []


def test_external_changes_run_before_creations(monkeypatch):
    """A SNAT range one port gives up is free for a port created in the
    same run: the in-place change goes first. Executing calls
    nat.set_external_ips with the port's new addresses."""
    have = applied(apply_mod.parse(FILE_N))
    moved = FILE_N.replace("snat_start = 1024\nsnat_end = 2047", "snat_start = 2048\nsnat_end = 4095")
    new_port = ('[[port]]\nname = "xde7"\nmac = "a8:40:25:ff:00:07"\nip = "10.0.0.7"\n'
                'snat_ip = "192.0.2.5"\nsnat_start = 1024\nsnat_end = 2047\n')
    want = apply_mod.parse(moved + new_port)
    actions = apply_mod.plan(have, want)
    assert [a.line() for a in actions] == [
        "~ set-external-ips xde0 (snat_range 1024-2047 -> 2048-4095)",
        "+ create-port xde7 (10.0.0.7 a8:40:25:ff:00:07 vni 10)"]
    calls = []
    monkeypatch.setattr(nat, "set_external_ips", lambda *a: calls.append(("set", *a)) or 0)
    monkeypatch.setattr("xdectl.ports.create", lambda *a: calls.append(("create", a[1].name)))
    assert [error for _, error in apply_mod.execute_all("/nowhere", actions)] == [None, None]
    assert calls == [("set", "/nowhere", "xde0", dataclasses.replace(XDE0_EXTERNAL, snat_start=2048,
                                                                    snat_end=4095)),
                     ("create", "xde7")]
    # the file alone: ports sharing a SNAT IP need disjoint ranges
    with pytest.raises(XdeError, match="overlaps port xde0's 1024-2047"):
        apply_mod.parse(FILE_N + new_port)
    # ... and a floating IP is one port's alone
    same_floating = ('[[port]]\nname = "xde7"\nmac = "a8:40:25:ff:00:07"\nip = "10.0.0.7"\n'
                     'floating_ips = ["192.0.2.7"]\n')
    with pytest.raises(XdeError, match="port xde7: external IP 192.0.2.7 is port xde0's"):
        apply_mod.parse(FILE_N + same_floating)


def test_external_addresses_read_back():
    """current() reads a port's external addresses from list's "external",
    which nat.read decodes from the port's nat_cfg entry: what the file
    asked for, so a second apply plans nothing."""
    from cmaps import fake_maps
    want = apply_mod.parse(FILE_N)
    m = fake_maps("nat_cfg")["nat_cfg"]
    listed = {"name": "xde0", "underlays": ["u1", "u2"], "mac": "a8:40:25:ff:00:01",
              "ip": "10.0.0.1", "ip6": "fd10::1", "gateway_mac": "a8:40:25:00:00:01",
              "gateway_ip": "172.30.0.5", "boundary_services": "fd00:99::1", "boundary_vni": 99,
              "vni": 10, "underlay_addr": "fd00:1::1", "vpc_subnet": "10.0.0.0/24",
              "vpc_subnet6": "fd10::/64", "mode": "overlay", "dns": ["10.0.0.53", "fd10::53"],
              "hostname": "web1", "domain": "vpc.example",
              "external": nat.decode(nat.encode(m.Leaf(), XDE0_EXTERNAL, 1)).as_dict()}
    spec = apply_mod._spec_of(listed)
    assert spec == want.ports["xde0"].spec
    # a port list shows without the key (an older xdectl's) has none
    del listed["external"]
    assert apply_mod._spec_of(listed).external == ExternalIPs()


@pytest.mark.parametrize("extra,words", [
    ('snat_ip = 5\n', "snat_ip must be an address or a list of addresses"),
    ('ephemeral_ip = [5]\n', "ephemeral_ip must be an address or a list of addresses"),
    ('floating_ips = "192.0.2.7"\n', "floating_ips must be a list of addresses"),
    ('snat_ip = "192.0.2.5"\nsnat_start = "1024"\nsnat_end = 2047\n',
     "snat_start must be a port number"),
    ('snat_ip = "192.0.2.5"\nsnat_start = 1024\nsnat_end = true\n',
     "snat_end must be a port number"),
    ('snat_ip = "192.0.2.5"\n', "--snat-ip needs --snat-start and --snat-end"),
    ('snat_start = 1024\nsnat_end = 2047\n', "need --snat-ip"),
    ('snat_ip = "192.0.2.5"\nsnat_start = 2048\nsnat_end = 1024\n', "is above --snat-end"),
    ('snat_ip = "192.0.2.5"\nsnat_start = 0\nsnat_end = 1024\n', "outside 1..65535"),
    ('snat_ip = ["192.0.2.5", "192.0.2.6"]\nsnat_start = 1\nsnat_end = 2\n',
     "one IPv4 address per port"),
    ('ephemeral_ip = "2001:db8::6"\n', "no IPv6 address to translate"),
    ('ephemeral_ip = "192.0.2.5"\nfloating_ips = ["192.0.2.5"]\n', "given twice"),
    ('floating_ips = ["224.0.0.7"]\n', "not a unicast address"),
    ('floating_ips = ["::ffff:192.0.2.7"]\n', "IPv4-mapped"),
    ('floating_ips = ["192.0.2.300"]\n', "is not an IPv4 or IPv6 address"),
    ('floating_ips = [' + ", ".join(f'"192.0.2.{i}"' for i in range(1, 18)) + ']\n',
     "at most 16"),
    ('passthrough = true\nephemeral_ip = "192.0.2.5"\n', "for overlay ports"),
])
def test_a_bad_external_address_is_one_line(extra, words):
    with pytest.raises(XdeError) as exc:
        apply_mod.parse(DEFAULTS + '[[port]]\nname = "x"\nmac = "a8:40:25:ff:00:09"\n'
                        'ip = "10.0.0.9"\n' + extra)
    msg = str(exc.value)
    assert words in msg and "\n" not in msg and msg.startswith("FILE port x: "), msg


def test_external_addresses_are_per_port():
    for key in ('snat_ip = "192.0.2.5"', "snat_start = 1", 'ephemeral_ip = "192.0.2.5"',
                'floating_ips = ["192.0.2.5"]'):
        with pytest.raises(XdeError, match="unknown key"):
            apply_mod.parse(DEFAULTS.replace("[defaults]", "[defaults]\n" + key))


def test_external_addresses_change_in_place_live(host, tmp_path):
    """Applied for real: a change of external addresses alone is made in
    place (same links, same everything else) and read back."""
    hv, root = host
    apply(hv, root, tmp_path, FILE_N)
    st = state(hv, root)
    assert st["ports"][0]["external"] == {"snat_ips": ["192.0.2.5", "2001:db8:5::5"],
                                          "snat_start": 1024, "snat_end": 2047,
                                          "ephemeral_ips": [], "floating_ips": ["192.0.2.7"]}
    assert st["ports"][1]["external"]["ephemeral_ips"] == ["2001:db8:6::6"]
    assert lines(apply(hv, root, tmp_path, FILE_N)) == ["no changes"]

    changed = FILE_N.replace("snat_end = 2047", "snat_end = 4095").replace(
        'floating_ips = ["192.0.2.7"]\n', "")
    assert lines(apply(hv, root, tmp_path, changed, "--dry-run"))[:-1] == \
        ["~ set-external-ips xde0 (snat_range 1024-2047 -> 1024-4095, floating_ips 192.0.2.7 "
         "-> none)"]
    assert state(hv, root) == st, "--dry-run changed something"
    assert lines(apply(hv, root, tmp_path, changed))[-1] == "1 changes applied"
    after = state(hv, root)
    assert after["ports"][0]["external"] == dict(st["ports"][0]["external"], snat_end=4095,
                                                 floating_ips=[])
    after["ports"][0]["external"] = st["ports"][0]["external"]
    assert after == st, "more changed than the external addresses"
    assert lines(apply(hv, root, tmp_path, changed)) == ["no changes"]

    # a bad value: one line, nothing changed
    p = apply(hv, root, tmp_path, changed.replace("snat_end = 4095", "snat_end = 70000"),
              check=False)
    assert "outside 1..65535" in one_error_line(p)
    assert lines(apply(hv, root, tmp_path, changed)) == ["no changes"]


def test_execute_all_opens_the_root_once_per_run_of_v2p_changes(monkeypatch):
    """V2P changes in a row share one locked, opened root; another change
    between them ends the run; a V2P change that fails fails alone, and a
    root that does not open fails each change of the run."""
    from contextlib import contextmanager

    from xdectl import overlay
    opened, closed, made = [], [], []

    @contextmanager
    def session(root):
        opened.append(root)
        try:
            yield "dp", None
        finally:
            closed.append(root)

    def remove(maps, ip, mac, underlay, vni):
        if ip == "10.0.0.9":
            raise XdeError(f"no V2P mapping {ip} -> {mac} at {underlay} in VNI {vni}")
        made.append(("clear", ip, vni))

    monkeypatch.setattr("xdectl.datapath.session", session)
    monkeypatch.setattr(overlay, "loaded", lambda dp: {"dp": dp})
    monkeypatch.setattr(overlay, "put_v2p", lambda maps, ip, mac, u, vni: made.append(
        ("set", ip, mac, vni, maps["dp"])))
    monkeypatch.setattr(overlay, "remove_v2p", remove)
    monkeypatch.setattr(apply_mod, "_execute", lambda root, a: made.append(("other", a.op)))

    def v2p(op, ip):
        return apply_mod.Action(op, ip, args=(ip, "A8:40:25:00:00:01", "fd00:2::1", "10"))
    actions = [v2p("set-v2p", "10.0.0.2"), v2p("clear-v2p", "10.0.0.9"),
               v2p("set-v2p", "10.0.0.3"), apply_mod.Action("set-fw", "xde0"),
               v2p("set-v2p", "10.0.0.4"), v2p("set-v2p", "10.0.0.300")]
    errors = [str(e) if e else None for _, e in apply_mod.execute_all("/r", actions)]
    assert opened == ["/r", "/r"] and closed == opened
    assert errors == [None, "no V2P mapping 10.0.0.9 -> a8:40:25:00:00:01 at fd00:2::1 in VNI 10",
                      None, None, None, errors[5]] and "10.0.0.300" in errors[5]
    # arguments checked and made canonical, as set-v2p does them
    assert made == [("set", "10.0.0.2", "a8:40:25:00:00:01", 10, "dp"),
                    ("set", "10.0.0.3", "a8:40:25:00:00:01", 10, "dp"), ("other", "set-fw"),
                    ("set", "10.0.0.4", "a8:40:25:00:00:01", 10, "dp")]

    # a caller that stops mid-run and closes the generator unlocks the root
    from contextlib import closing
    with closing(apply_mod.execute_all("/r", actions)) as making:
        next(making)
        assert len(closed) == 2 < len(opened)
    assert closed == opened

    @contextmanager
    def unopenable(root):
        raise XdeError("nothing is loaded under /r: create a port first")
        yield
    monkeypatch.setattr("xdectl.datapath.session", unopenable)
    got = [(a.target, str(e)) for a, e in apply_mod.execute_all("/r", actions[:3])]
    assert got == [(ip, "nothing is loaded under /r: create a port first")
                   for ip in ("10.0.0.2", "10.0.0.9", "10.0.0.3")]
