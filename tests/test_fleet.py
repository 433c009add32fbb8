"""The fleet end to end: four sleds, each kept by its agent from a real
etcd (a three-member cluster, started by the test in its own data
directories on an address inside the lab's namespaces), the lab's fleet
file applied and changed, agents and etcd members killed.

One fleet lab (xdelab/fleet.py) for the module; tests that change the fleet
apply their own file and leave the module's base file applied again.
"""
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time

import pytest

from lab_fixture import XDECTL
from xdectl import boundary, fleet, overlay, ports
from xdectl.errors import XdeError
from xdelab.fleet import FleetLab, fleet_text, port_table, sled_addr

pytestmark = pytest.mark.usefixtures("privileged")

SLEDS, PORTS = 4, 8          # two ports a sled, one VPC (VNI 100)
CONVERGE = 20                # seconds for every sled to match a change


@pytest.fixture(scope="module")
def flab():
    lab = FleetLab(f"xf{secrets.token_hex(2)}-")
    try:
        lab.up(SLEDS, PORTS, members=3)
        yield lab
    finally:
        lab.down(quiet=True)


def base(lab):
    return fleet_text(PORTS, lab.sleds)


def apply_and_wait(lab, text):
    rev = lab.apply(text)
    lab.wait_converged(rev, CONVERGE)
    return rev


def sled_ports(lab, sled):
    with lab.inside(sled):
        return {p["name"] for p in ports.list_ports(lab.root(sled))}


def v2p(lab, sled):
    with lab.inside(sled):
        return {(e["vni"], e["ip"]): e["underlay"] for e in overlay.dump_v2p(lab.root(sled))}


def links(lab, sled):
    out = subprocess.run(["ip", "-n", lab.ns(sled), "-j", "link"], capture_output=True,
                         text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def expected_v2p(lab, tables):
    """What every sled with a port of VNI 100 holds: each port's addresses
    at its sled's underlay address."""
    return {(t["vni"], t["ip"]): sled_addr(lab.sleds.index(t["sled"]) + 1) for t in tables}


def reach_all(lab, names):
    bad = [(a, b) for a in names for b in names if a != b and not lab.ping(a, b, count=1)]
    assert not bad, f"no answer for {bad}"


def test_every_guest_reaches_every_other(flab):
    names = [f"p{i}" for i in range(PORTS)]
    for sled in flab.sleds:
        assert sled_ports(flab, sled) == {n for i, n in enumerate(names) if i % SLEDS ==
                                          flab.sleds.index(sled)}
        assert v2p(flab, sled) == expected_v2p(flab, [port_table(i, flab.sleds)
                                                      for i in range(PORTS)])
    reach_all(flab, names)


TCP_SERVER = """
import hashlib, socket, sys
s = socket.create_server((sys.argv[1], 5001))
print("ready", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while chunk := c.recv(65536):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""
TCP_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5001), timeout=20)
c.sendall(bytes.fromhex(sys.argv[2]) * (4 << 20 >> 5))
c.shutdown(socket.SHUT_WR)
"""


def test_tcp_between_guests_on_two_sleds(flab):
    """4 MiB over TCP from p0's guest (sled1) to p1's (sled2), byte-exact:
    segments larger than a ping, both ways of a real connection."""
    import hashlib
    dst = flab.desired()["p1"]["ip"]
    src_ns, dst_ns = flab.guest("p0"), flab.guest("p1")
    pattern = secrets.token_bytes(32)
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{dst_ns}", sys.executable, "-c",
                               TCP_SERVER, dst], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        subprocess.run(["nsenter", f"--net=/run/netns/{src_ns}", sys.executable, "-c",
                        TCP_CLIENT, dst, pattern.hex()], check=True, timeout=60)
        got = server.stdout.readline().split()
    finally:
        server.kill()
        server.wait()
    data = pattern * (4 << 20 >> 5)
    assert got == [str(len(data)), hashlib.sha256(data).hexdigest()]


def test_status_and_dump(flab):
    r = subprocess.run(["nsenter", f"--net=/run/netns/{flab.ns('ctl')}", XDECTL, "fleet",
                        "status", "--json", "--etcd", flab.cluster.urls],
                       capture_output=True, text=True, check=True)
    s = json.loads(r.stdout)
    assert s["revision"] > 0
    assert [x["name"] for x in s["sleds"]] == ["bsvc"] + flab.sleds
    for x in s["sleds"]:
        assert x["alive"] and x["revision"] >= s["revision"] and x["error"] is None, x
        # a sled keeps its two ports; the boundary host its NAT entries (none)
        assert (x["mode"], x["ports"]) == (("boundary", 0) if x["name"] == "bsvc"
                                           else ("sled", 2)), x
    dump = subprocess.run(["nsenter", f"--net=/run/netns/{flab.ns('ctl')}", XDECTL, "fleet",
                           "dump", "--etcd", flab.cluster.urls],
                          capture_output=True, text=True, check=True).stdout
    assert fleet.parse(dump).ports == fleet.parse(base(flab)).ports
    # applying the dump changes no key (the marker aside)
    with flab.client() as e:
        _, puts, deletes = fleet.apply_file(e, fleet.parse(dump))
    assert (puts, deletes) == (0, 0)


def test_add_move_delete(flab):
    tables = [port_table(i, flab.sleds) for i in range(PORTS)]
    moved = dict(tables[0], sled="sled3")              # p0: sled1 -> sled3
    added = port_table(PORTS, flab.sleds)              # p8 on sled1
    want = [moved] + tables[2:] + [added]              # p1 (sled2) deleted
    try:
        apply_and_wait(flab, fleet_text(0, flab.sleds, want))
        assert "p0" not in sled_ports(flab, "sled1") and "p0" in sled_ports(flab, "sled3")
        assert "p1" not in sled_ports(flab, "sled2") and "p8" in sled_ports(flab, "sled1")
        # the links went with the ports
        assert not {"p1", "p1_dp"} & links(flab, "sled2")
        assert "p0_dp" not in links(flab, "sled1") and "p0_dp" in links(flab, "sled3")
        for sled in flab.sleds:
            assert v2p(flab, sled) == expected_v2p(flab, want), sled
        reach_all(flab, ["p0", "p8", "p5"])
    finally:
        apply_and_wait(flab, base(flab))
    assert "p0" in sled_ports(flab, "sled1") and "p1" in sled_ports(flab, "sled2")


def test_agent_killed_mid_change_converges_without_orphans(flab):
    tables = [port_table(i, flab.sleds) for i in range(PORTS)]
    # twelve new ports on sled2; its agent is killed while making them
    extra = [dict(port_table(PORTS + k, flab.sleds), sled="sled2") for k in range(12)]
    try:
        rev = flab.apply(fleet_text(0, flab.sleds, tables + extra))
        deadline = time.monotonic() + 10
        while len(sled_ports(flab, "sled2")) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        flab.stop_agent("sled2", signal.SIGKILL)
        made = sled_ports(flab, "sled2")
        assert 2 < len(made) < 14, f"not killed mid-change: {sorted(made)}"
        # while it is dead, change it again: two of its ports go away
        rev = flab.apply(fleet_text(0, flab.sleds, tables[:1] + tables[2:] + extra[2:]))
        with pytest.raises(XdeError):
            flab.wait_converged(rev, 2)
        flab.start_agent("sled2")
        flab.wait_converged(rev, CONVERGE + 10)
        want = {t["name"] for t in tables[:1] + tables[2:] + extra[2:] if t["sled"] == "sled2"}
        assert sled_ports(flab, "sled2") == want
        # no links but the underlays and the ports' ends (a guest end may
        # be in its guest's namespace)
        have = links(flab, "sled2") - {"lo", "u1", "u2"}
        assert not have - {n for p in want for n in (p, f"{p}_dp")}, sorted(have)
        assert {f"{p}_dp" for p in want} <= have
    finally:
        if "sled2" not in flab.agents:
            flab.start_agent("sled2")
        apply_and_wait(flab, base(flab))
    assert sled_ports(flab, "sled2") == {"p1", "p5"}


def test_etcd_gone_datapath_keeps_forwarding_then_agents_catch_up(flab):
    flab.cluster.stop()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            reports = [flab.report(s) for s in flab.sleds]
            if all(r.get("etcd", "ok") != "ok" for r in reports):
                break
            time.sleep(0.1)
        assert all(r["etcd"].startswith("etcd ") and r["etcd"] != "ok" for r in reports), reports
        reach_all(flab, ["p0", "p1", "p2"])        # as last programmed
    finally:
        flab.cluster.start()
    tables = [port_table(i, flab.sleds) for i in range(PORTS)]
    extra = port_table(PORTS + 20, flab.sleds)
    try:
        apply_and_wait(flab, fleet_text(0, flab.sleds, tables + [extra]))
        assert extra["name"] in sled_ports(flab, extra["sled"])
        assert all(flab.report(s)["etcd"] == "ok" for s in flab.sleds)
    finally:
        apply_and_wait(flab, base(flab))


def test_compacted_revision_forces_whole_resync(flab):
    before = flab.report("sled1")["resyncs"]
    # sled1 and etcd cut off from each other, both ways, and the agent's open
    # connections (its watch, its pooled ones) ended: an established socket
    # keeps the route it had, a new route does not stop it
    blocks = [["ip", "-n", flab.ns("sled1"), "-6", "route", "add", "prohibit", "fd00:ee::1/128"],
              ["ip", "-n", flab.ns("ctl"), "-6", "route", "add", "prohibit", "fd00:1::1/128"]]
    for block in blocks:
        subprocess.run(block, check=True)
    tables = [port_table(i, flab.sleds) for i in range(PORTS)]
    extra = dict(port_table(PORTS + 30, flab.sleds), sled="sled1")
    try:
        flab.run("sled1", "ss", "-K", "-t", "dst", "[fd00:ee::1]", check=True,
                 capture_output=True)
        deadline = time.monotonic() + 15
        while flab.report("sled1").get("etcd") == "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flab.report("sled1")["etcd"] != "ok"
        flab.apply(fleet_text(0, flab.sleds, tables + [extra]))
        rev = flab.apply(fleet_text(0, flab.sleds, tables + [dict(extra, ip="10.0.0.99")]))
        with flab.client() as e:
            e.compact(rev)
    finally:
        for block in blocks:
            block[5] = "del"
            subprocess.run(block, check=True)
    flab.wait_converged(rev, CONVERGE)
    log = flab.agent_files("sled1")["log"].read_text()[-1500:]
    assert flab.report("sled1")["resyncs"] > before, log
    assert extra["name"] in sled_ports(flab, "sled1")
    assert v2p(flab, "sled2")[(100, "10.0.0.99")] == sled_addr(1)
    apply_and_wait(flab, base(flab))
    assert extra["name"] not in sled_ports(flab, "sled1")


def test_a_member_killed_the_fleet_keeps_converging(flab):
    # the member sled1's agent is talking to: it has to move to another
    used = flab.report("sled1")["endpoint"]
    m = next(m for m in flab.cluster.members if m.client_url == used)
    m.signal(signal.SIGKILL)
    tables = [port_table(i, flab.sleds) for i in range(PORTS)]
    extra = port_table(PORTS + 40, flab.sleds)
    try:
        apply_and_wait(flab, fleet_text(0, flab.sleds, tables + [extra]))
        for sled in flab.sleds:
            assert (100, extra["ip"]) in v2p(flab, sled)
        assert flab.report("sled1")["endpoint"] != used
    finally:
        m.start()
        flab.cluster.wait_ready()
    apply_and_wait(flab, base(flab))


def test_a_member_without_quorum_is_left_for_another(flab):
    """A member cut off from the others (here: they are frozen) still answers
    but, without a leader, hears of no change: the agent's watch through it
    must end (etcd's require-leader) rather than wait on it for ever."""
    used = flab.report("sled1")["endpoint"]
    others = [m for m in flab.cluster.members if m.client_url != used]
    log = flab.agent_files("sled1")["log"]
    seen = len(log.read_text())
    # the watch's own words: one endpoint, the one it used (the lease
    # keeper's errors name every endpoint it tried)
    left = re.compile(r"etcd (watch ended|unreachable) \(" + re.escape(used) + r": [^;)]*no leader\)")
    for m in others:
        m.freeze()
    try:
        deadline = time.monotonic() + 20
        while not left.search(log.read_text()[seen:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left.search(log.read_text()[seen:]), log.read_text()[seen:][-2000:]
    finally:
        for m in others:
            m.freeze(False)
        flab.cluster.wait_ready()            # a leader again
    tables = [port_table(i, flab.sleds) for i in range(PORTS)]
    extra = port_table(PORTS + 50, flab.sleds)
    try:
        apply_and_wait(flab, fleet_text(0, flab.sleds, tables + [extra]))
        assert (100, extra["ip"]) in v2p(flab, "sled1")
    finally:
        apply_and_wait(flab, base(flab))


def nat(lab):
    with lab.inside("bsvc"):
        return {e["external"]: (e["sled"], e["vni"], e["mac"])
                for e in boundary.dump_nat(lab.root("bsvc"))}


def test_the_boundary_nat_table_follows_the_ports_external_addresses(flab):
    tables = [port_table(i, flab.sleds) for i in range(PORTS)]
    assert nat(flab) == {}
    floating = dict(tables[2], floating_ips=["198.51.100.20"])          # p2 on sled3
    snat = dict(tables[3], snat_ip=["198.51.100.10", "2001:db8:51::10"],  # p3 on sled4
                snat_start=1024, snat_end=2047, ip6="fd00:10::4")
    vpc6 = "subnet6 = \"fd00:10::/64\"\n"
    try:
        text = fleet_text(0, flab.sleds, tables[:2] + [floating, snat] + tables[4:])
        apply_and_wait(flab, text.replace("[[vpc]]\n", "[[vpc]]\n" + vpc6))
        assert nat(flab) == {
            "198.51.100.20": (sled_addr(3), 100, tables[2]["mac"]),
            "198.51.100.10:1024-2047": (sled_addr(4), 100, tables[3]["mac"]),
            "[2001:db8:51::10]:1024-2047": (sled_addr(4), 100, tables[3]["mac"])}
        # the floating IP's port moves: the boundary sends it to the new sled
        text = fleet_text(0, flab.sleds, tables[:2] + [dict(floating, sled="sled1")] + tables[3:])
        apply_and_wait(flab, text)
        assert nat(flab) == {"198.51.100.20": (sled_addr(1), 100, tables[2]["mac"])}
    finally:
        apply_and_wait(flab, base(flab))
    assert nat(flab) == {}


# each edit of the module's fleet file (whose last port, p7, is 10.0.0.8)
# and what the one line refusing it says
BAD = [
    (lambda t: t.replace("vni = 100\nsubnet", "vni = 100\nsubnett"), "unknown key subnett"),
    (lambda t: t.replace('ip = "10.0.0.8"', 'ip = "10.0.1.8"'), "is not inside"),
    (lambda t: t.replace('ip = "10.0.0.8"', 'ip = "10.0.0.1"'), "address 10.0.0.1 in VNI 100"),
    (lambda t: t.replace('mac = "a8:40:00:00:00:07", ', ""), "port #8: missing mac"),
    (lambda t: t.replace("[[vpc]]", "[[vpc", 1), "bad.toml: "),
]


@pytest.mark.parametrize("edit,why", BAD)
def test_bad_fleet_file_is_refused_whole(flab, tmp_path, edit, why):
    text = base(flab)
    assert 'ip = "10.0.0.8"' in text
    path = tmp_path / "bad.toml"
    path.write_text(edit(text))
    with flab.client() as e:
        before = e.range(fleet.FLEET)[1]
    r = subprocess.run(["nsenter", f"--net=/run/netns/{flab.ns('ctl')}", XDECTL, "fleet",
                        "apply", str(path), "--etcd", flab.cluster.urls],
                       capture_output=True, text=True)
    assert r.returncode == 2, r
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("xdectl: ") and why in r.stderr, r.stderr
    with flab.client() as e:
        assert e.range(fleet.FLEET)[1] == before


def test_zz_down_leaves_nothing(flab):
    flab.down(quiet=True)
    left = [n for n in os.listdir("/run/netns") if n.startswith(flab.prefix)]
    assert not left
    assert not [r for r in os.listdir("/sys/fs/bpf") if r.startswith(f"xde-lab-{flab.prefix}")]
    assert not flab.state.exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert flab.cluster.dir.as_posix() not in ps and f"--root /sys/fs/bpf/xde-lab-{flab.prefix}" \
        not in ps
