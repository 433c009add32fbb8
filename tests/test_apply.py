"""`xdectl apply FILE` (docs/design.md, "Reload, apply and trace"): the
running state made to match a TOML file, idempotently. Runs in a namespace of
its own with two veth underlays (tests/netns.py: names `xt<hex>`, roots
`/sys/fs/bpf/xt-<hex>`), removed at the end; xdectl runs there through
`nsenter --net`.

Also here: the systemd units that run `apply` at boot and the exporter.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from netns import Root, one_error_line, underlay_host, xdectl, xdectl_json
from xdectl import apply as apply_mod
from xdectl.errors import XdeError

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
                                         "198.51.100.0/24": "drop"}
    assert len(want.ports["xde0"].firewall) == 4 and want.ports["xde1"].firewall is None
    assert (10, "10.0.0.2") in want.v2p and (10, "10.0.0.1") in want.v2p  # xde0's own
    for key in ("[defaults]", "[[port]]", "[[v2p]]", "routes", "firewall"):
        assert key in apply_mod.__doc__


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
