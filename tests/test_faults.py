"""Fault tests (docs/design.md, "Ports and roots",
"Global options and exit codes" and "How it is proved").

1. xdectl killed with SIGKILL in the middle of `create`, `delete` and
   `set-fw-rules`, then the commands an operator would run next must
   converge. Kill points are of two kinds:
   - random: a seeded delay (XDE_FAULT_SEED, default 6) after the start,
     stratified over the command's measured duration, so every part of the
     command (imports, netlink, map writes) gets a kill; for `create` on a
     fresh root, delays inside the bcc compile as well;
   - events: the test polls the kernel and kills the moment a given step
     became visible (the port's veth appeared, its `ports` entry appeared
     or went, XDP appeared on u1, the first program was pinned). These hit
     the windows between two steps every run, so the test does not depend
     on luck to find a broken window.
   After a kill, the operator's recovery (`create` again; if refused,
   `delete NAME` then `create`; on a root with no other port, `unload
   --force` then `create`) must reach a state where the port is listed and
   everything is consistent; every command on the way must succeed or fail
   with one clear line (no traceback). "Consistent" (`problems()`): every
   listed port has both veth ends and its tc filter; no link other than lo,
   u1, u2 and the listed ports' ends; every map entry keyed by a port
   belongs to a listed port; config.nports equals the number of ports; the
   underlays carry XDP, our tc filter and their sentinel addresses
   exactly while a port exists; a loaded root has all its pins. At the end,
   `unload --force` must leave the namespace as it was before the first
   create (links, XDP, qdiscs, filters, routes of every table) and no root.
2. 200 create/delete cycles (in-process calls of xdectl.ports.create/delete
   inside the namespace, ~0.1 s a cycle; the whole 200 run in the test)
   leave map occupancy, links, pins and the underlays as they were.

Traffic and links stay inside namespaces made here; xdectl runs through
`nsenter --net` (never `ip netns exec`, which hides bpffs).
"""
import contextlib
import os
import random
import re
import signal
import subprocess
import time

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pnetns

from netns import XDECTL, Root, create_args, remove_pins, snapshot, underlay_host, xdectl
from xdectl import fw, overlay, ports
from xdectl.datapath import Datapath, programs
from xdectl.errors import XdeError
from xdectl.maps import addr16, find_port, set_bytes
from xdectl.ports import datapath_end
from xdectl.underlay import sentinel

SEED = int(os.environ.get("XDE_FAULT_SEED", "6"))
UL = ("u1", "u2")
PORT_MAPS = ("ports", "port_index", "v2p", "routes", "routes_sys", "fw_rules", "flows",
             "port_stats", "gw_tmpl")
RULES_A = "dir=in action=allow priority=10 protocol=tcp ports=22\n" \
          "dir=out action=deny priority=20 hosts=subnet=192.0.2.0/24\n"
RULES_B = "dir=in action=allow priority=5 protocol=udp ports=53,123\n" \
          "dir=in action=deny priority=7 hosts=ip=10.0.0.9\n" \
          "dir=out action=allow priority=30 protocol=icmp\n"


# --- helpers ---------------------------------------------------------------------

@contextlib.contextmanager
def inside(ns):
    """This thread in ns's network namespace (as xdectl would be)."""
    pnetns.pushns(ns.name)
    try:
        yield
    finally:
        pnetns.popns()


def port_args(name, i, passthrough=False):
    return create_args(name, mac=f"A8:40:25:ff:01:{i:02x}", ip=f"10.0.0.{10 + i}",
                       passthrough=passthrough)


def port_spec(name, i, passthrough=False):
    """An overlay port is dual stack with gateway settings (its own V2P of
    both families, system routes of both, every reply template)."""
    dual = {} if passthrough else dict(ip6=f"fd10::{100 + i:x}", dns=["10.0.0.53", "fd10::53"],
                                       hostname=f"h{i}", domain="vpc.example")
    return ports.PortSpec(name, "u1", "u2", f"A8:40:25:ff:02:{i:02x}", f"10.0.0.{100 + i}",
                          "A8:40:25:00:00:01", "172.30.0.5", "fd00:99::1", 99, 10, "fd00:1::1",
                          "10.0.0.0/24", passthrough, **dual)


def clear_line(p, what):
    """A command that ran to its end: exit 0, or one clear line on stderr."""
    assert "Traceback" not in p.stderr + p.stdout, f"{what}: traceback\n{p.stderr}"
    if p.returncode != 0:
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1, f"{what}: exit {p.returncode} without one clear line: {p.stderr!r}"
        return lines[0]
    return None


def sentinels(ns):
    """The underlays' sentinel addresses (xdectl's, under fd78:6465:7864::/64)."""
    out = ns.ip("-6", "-o", "addr", "show", check=False).stdout
    return sorted(re.findall(r"\b(fd78:6465:7864::[0-9a-f:]+)/128", out))


def occupancy(ns, root):
    """Entries of the maps keyed by ports or filled by create, or None."""
    with inside(ns):
        dp = Datapath(root.path)
        if not dp.exists():
            return None
        try:
            maps = dp.maps()
            return {n: len(maps[n].keys()) for n in PORT_MAPS}
        finally:
            dp.close()


def problems(ns, root):
    """Everything that is inconsistent between the maps, `list` and the
    kernel's links, filters, XDP, routes and pins (empty list: consistent)."""
    out = []
    links = set(ns.links())
    live = sentinels(ns)
    with inside(ns):
        dp = Datapath(root.path)
        listed, maps, cfg = [], None, None
        if not dp.exists():
            if root.exists():
                out.append(f"root {root} left without an instance: {sorted(root.pins())}")
        else:
            try:
                listed = ports.list_ports(root.path)
                maps = dp.maps()
            except XdeError as e:
                return [f"root unreadable: {e}"]
            cfg = maps["config"].get(maps["config"].Key(0))
            pins = root.pins()
            missing = [f"progs/{p}" for p in programs() if f"progs/{p}" not in pins]
            if missing:
                out.append(f"loaded root lacks pins {missing}")
        names = {p["name"] for p in listed}
        ends = {datapath_end(n) for n in names}
        for p in listed:
            for l in (p["name"], datapath_end(p["name"])):
                if l not in links:
                    out.append(f"port {p['name']} is listed but link {l} is missing")
            if datapath_end(p["name"]) in links and \
                    "tc_port_out" not in ns.tc_filters(datapath_end(p["name"])):
                out.append(f"port {p['name']}: no tc_port_out filter on its datapath end")
        orphans = sorted(links - {"lo", *UL} - names - ends)
        if orphans:
            out.append(f"links without a port in list: {orphans}")
        if maps is not None:
            idx = {k.value for k in maps["ports"].keys()}
            if len(maps["port_index"].keys()) != len(idx) or \
                    {v.value for _, v in maps["port_index"].items()} - idx:
                out.append(f"port_index {[v.value for _, v in maps['port_index'].items()]} "
                           f"!= ports {sorted(idx)}")
            if {k.value for k in maps["port_stats"].keys()} != idx:
                out.append("port_stats keys differ from ports keys")
            for name in ("routes", "routes_sys", "fw_rules", "flows", "gw_tmpl"):
                stray = {k.port for k in maps[name].keys()} - idx
                if stray:
                    out.append(f"{name} has entries of ports that are gone: {sorted(stray)}")
            if cfg.nports != len(listed):
                out.append(f"config.nports={cfg.nports} but list has {len(listed)} ports")
            dp.close()
        for u in UL:
            xdp, filt = ns.xdp_prog_id(u), ns.tc_filters(u)
            if listed and (not xdp or "tc_underlay_in" not in filt):
                out.append(f"ports exist but {u} has xdp={xdp} filters={filt!r}")
            if not listed and (xdp or filt or "clsact" in ns.qdiscs(u)):
                out.append(f"no port listed but {u} still has xdp={xdp} filters={filt!r} "
                           f"qdiscs={ns.qdiscs(u)!r}")
        if listed:
            for u in UL:
                idx_u = int(re.match(r"^(\d+):", ns.ip("-o", "link", "show", "dev", u).stdout).group(1))
                if sentinel(idx_u) not in live:
                    out.append(f"sentinel address of {u} missing (have {live})")
        elif live:
            out.append(f"no port listed but sentinel addresses {live} remain")
    return out


def listed(ns, root):
    with inside(ns):
        return {p["name"] for p in ports.list_ports(root.path)}


class Killer:
    """Runs one xdectl command in a namespace and SIGKILLs it at a point."""

    def __init__(self, ns, root):
        self.ns, self.root = ns, root

    def run(self, args, delay=None, until=None, stdin=None, timeout=60):
        """Kill after `delay` s, or when until() (polled inside the
        namespace) turns true. Returns (killed, seconds, stderr)."""
        p = subprocess.Popen(["nsenter", f"--net={self.ns.path}", XDECTL, "--root",
                              str(self.root), *args],
                             stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        if stdin:
            p.stdin.write(stdin)
            p.stdin.close()
            p.stdin = None
        if until is None:
            try:
                p.wait(delay)
            except subprocess.TimeoutExpired:
                pass
        else:
            with inside(self.ns):
                while p.poll() is None and not until() and time.monotonic() - t0 < timeout:
                    pass
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=timeout)
        return killed, time.monotonic() - t0, err

    def timed(self, args, stdin=None):
        t = time.monotonic()
        p = self.ns.run(XDECTL, "--root", str(self.root), *args, check=False, input=stdin)
        assert p.returncode == 0, f"xdectl {args}: {p.stderr}"
        return time.monotonic() - t


def stratified(rng, n, lo, hi):
    """n delays, one uniformly random in each of n equal slices of [lo, hi]."""
    w = (hi - lo) / n
    return [lo + w * i + rng.uniform(0, w) for i in range(n)]


def link_appears(name):
    ipr = IPRoute()   # opened inside the namespace (Killer.run polls there)
    return lambda: bool(ipr.link_lookup(ifname=name))


def xdp_appears(dev):
    ipr = IPRoute()
    index = ipr.link_lookup(ifname=dev)[0]

    def cond():
        xdp = ipr.get_links(index)[0].get_attr("IFLA_XDP")
        return bool(xdp and xdp.get_attr("IFLA_XDP_PROG_ID"))
    return cond


def port_entry(root, name, present):
    """True once the port's `ports` map entry is present (or gone)."""
    dp = Datapath(root.path)
    maps = dp.maps()
    return lambda: (find_port(maps, name)[0] is not None) == present


def first_prog_pin(root):
    progs = root.path / "progs"
    return lambda: progs.exists() and any(True for _ in progs.iterdir())


# --- convergence -----------------------------------------------------------------------

def recover_create(ns, root, name, args, may_unload, where=""):
    """The operator's recovery after a create died; returns the commands
    needed. Fails if a command is unclear or the port cannot be made."""
    steps = [("create", args), ("delete", ["delete", name]), ("create", args)]
    if may_unload:
        steps += [("unload", ["unload", "--force"]), ("create", args)]
    log = []
    for what, a in steps:
        p = xdectl(ns, root, *a, check=False)
        line = clear_line(p, f"xdectl {' '.join(a[:2])}")
        log.append(f"{what}: {'ok' if p.returncode == 0 else line}")
        if what == "create" and p.returncode == 0:
            return log
    raise AssertionError(f"create did not converge after a kill ({where}); commands and answers:\n  "
                         + "\n  ".join(log) + "\nstate: " + "; ".join(problems(ns, root)))


def hard_reset(ns, root):
    """Remove whatever a failed test left (only our namespace and root)."""
    xdectl(ns, root, "unload", "--force", check=False)
    for l in ns.links():
        if l not in ("lo", *UL):
            ns.ip("link", "del", l, check=False)
    for u in UL:
        ns.ip("link", "set", u, "xdp", "off", check=False)
        ns.tc("qdisc", "del", "dev", u, "clsact", check=False)
    for u in UL:
        ns.ip("-6", "addr", "flush", "dev", u, "to", "fd78:6465:7864::/64", check=False)
    remove_pins(root.path)


@pytest.fixture(scope="module")
def kill_host(privileged):
    """Underlays u1, u2 and a root loaded once (cold create, then delete);
    the state before any create is recorded for the final check."""
    hv, far = underlay_host("k")
    root = Root(hv)
    before = snapshot(hv, None, UL)
    try:
        xdectl(hv, root, *port_args("w0", 0))
        xdectl(hv, root, "delete", "w0")
        yield hv, root, before
    finally:
        root.cleanup()
        hv.delete()
        far.delete()


@pytest.fixture
def killed(kill_host):
    """The shared host with no ports; after the test, no ports again, and
    everything reset by hand if the test left the root stuck."""
    hv, root, before = kill_host
    if problems(hv, root):
        hard_reset(hv, root)
    yield hv, root, before
    for name in listed(hv, root) if root.exists() else ():
        xdectl(hv, root, "delete", name, check=False)
    if problems(hv, root):
        hard_reset(hv, root)


def final_cleanup_is_clean(ns, root, before):
    p = xdectl(ns, root, "unload", "--force", check=False)
    clear_line(p, "unload --force")
    assert p.returncode == 0, f"unload --force failed: {p.stderr}"
    assert not root.exists(), f"pins left: {root.pins()}"
    after = snapshot(ns, None, UL)
    assert after == before, f"unload --force left state behind:\nbefore {before}\nafter  {after}"
    assert sentinels(ns) == []


# --- 1. SIGKILL ---------------------------------------------------------------------------

def test_kill_cold_create_during_compile_and_pinning(privileged):
    """A create on a fresh root killed while its programs are built (a
    random delay within the first 70% of a cold create timed on this
    machine: bcc's compile, or the stored compile's load) and
    the moment the first program is pinned (maps pinned, meta still empty,
    programs incomplete): create again must work, or a one-line refusal
    the operator can act on, and unload --force must leave nothing."""
    hv, far = underlay_host("c")
    root = Root(hv)
    rng = random.Random(SEED)
    log = []
    try:
        before = snapshot(hv, None, UL)
        k = Killer(hv, root)
        # how long a cold create takes on this machine; the compile is most of it
        cold = k.timed(port_args("c0", 1))
        final_cleanup_is_clean(hv, root, before)
        for how in ("compile", "first-pin"):
            if how == "compile":
                killed_, t, _ = k.run(port_args("c0", 1), delay=rng.uniform(0.2, 0.7) * cold)
            else:
                killed_, t, _ = k.run(port_args("c0", 1), until=first_prog_pin(root))
            assert killed_, f"create finished in {t:.1f}s before the {how} kill"
            left = sorted(root.pins() or {})
            steps = recover_create(hv, root, "c0", port_args("c0", 1), may_unload=True)
            log.append(f"{how} kill at {t:.2f}s left pins {left}; recovery: {steps}")
            assert listed(hv, root) == {"c0"}
            assert problems(hv, root) == []
            final_cleanup_is_clean(hv, root, before)
        print("\n".join(log))
    finally:
        root.cleanup()
        hv.delete()
        far.delete()


def test_kill_create(killed):
    """Warm create (the root is loaded) killed at random points and right
    after each step, with and without another port on the root."""
    hv, root, before = killed
    rng = random.Random(SEED + 1)
    k = Killer(hv, root)
    t_create = k.timed(port_args("t0", 2))
    k.timed(["delete", "t0"])
    points = [("delay", d) for d in stratified(rng, 6, 0.0, t_create)]
    points += [("veth", None), ("ports-entry", None), ("xdp-u1", None)]
    log = []
    for i, (how, delay) in enumerate(points):
        other = how != "xdp-u1" and i % 2 == 0
        if other:
            xdectl(hv, root, *port_args("b0", 9))
        with inside(hv):
            until = {"delay": None, "veth": link_appears(datapath_end("p0")),
                     "ports-entry": port_entry(root, "p0", True),
                     "xdp-u1": xdp_appears("u1")}[how]
        killed_, t, _ = k.run(port_args("p0", 3), delay=delay, until=until)
        steps = recover_create(hv, root, "p0", port_args("p0", 3), may_unload=not other,
                               where=f"{how} kill at {t:.3f}s, killed={killed_}, other port={other}")
        log.append(f"{how} {t:.3f}s killed={killed_} other={other}: {steps}")
        assert listed(hv, root) == ({"p0", "b0"} if other else {"p0"}), log[-1]
        assert problems(hv, root) == [], log[-1]
        xdectl(hv, root, "delete", "p0")
        if other:
            xdectl(hv, root, "delete", "b0")
        assert problems(hv, root) == [], log[-1]
    print("\n".join(log))
    final_cleanup_is_clean(hv, root, before)


def test_kill_delete(killed):
    """delete killed at random points and right after its steps; `delete`
    again must finish the job (or say the port is gone, with nothing of it
    left), and the root must stay consistent."""
    hv, root, before = killed
    rng = random.Random(SEED + 2)
    k = Killer(hv, root)
    xdectl(hv, root, *port_args("d0", 4))
    t_delete = k.timed(["delete", "d0"])
    points = [("delay", d) for d in stratified(rng, 6, 0.0, t_delete)]
    points += [("ports-entry-gone", None), ("link-gone", None)]
    log = []
    for i, (how, delay) in enumerate(points):
        other = i % 2 == 1
        if other:
            xdectl(hv, root, *port_args("b0", 9))
        xdectl(hv, root, *port_args("d0", 4))
        with inside(hv):
            until = {"delay": None, "ports-entry-gone": port_entry(root, "d0", False),
                     "link-gone": (lambda c: lambda: not c())(link_appears(datapath_end("d0")))}[how]
        killed_, t, _ = k.run(["delete", "d0"], delay=delay, until=until)
        p = xdectl(hv, root, "delete", "d0", check=False)
        line = clear_line(p, "delete after a kill")
        log.append(f"{how} {t:.3f}s killed={killed_} other={other}: delete again -> "
                   f"{'ok' if p.returncode == 0 else line}")
        state = problems(hv, root)
        assert "d0" not in listed(hv, root) and not hv.has_link("d0") and \
            not hv.has_link("d0_dp") and state == [], \
            f"delete did not converge after a kill: {log[-1]}\nstate: {state}"
        # the root still works: the port can be made again
        xdectl(hv, root, *port_args("d0", 4))
        xdectl(hv, root, "delete", "d0")
        if other:
            xdectl(hv, root, "delete", "b0")
        assert problems(hv, root) == [], log[-1]
    print("\n".join(log))
    final_cleanup_is_clean(hv, root, before)


def _rules(ns, root, name):
    with inside(ns):
        dp = Datapath(root.path)
        try:
            maps = dp.maps()
            index, _ = find_port(maps, name)
            m = maps["ports"]
            return ([r.text() for r in fw.read_rules(maps, index)], m.get(m.Key(index)).fw_epoch)
        finally:
            dp.close()


def _texts(lines):
    return [r.text() for r in sorted((fw.parse_line(l) for l in lines.splitlines()),
                                     key=lambda r: (r.direction != "out", r.priority))]


def test_kill_set_fw_rules(killed):
    """set-fw-rules killed at random points: afterwards the port has either
    the old or the new rule set, whole (both directions from one set); the
    command run again sets it and bumps the epoch."""
    hv, root, before = killed
    rng = random.Random(SEED + 3)
    k = Killer(hv, root)
    xdectl(hv, root, *port_args("f0", 5))
    t_set = k.timed(["set-fw-rules", "f0"], stdin=RULES_A)
    sets = {RULES_A: _texts(RULES_A), RULES_B: _texts(RULES_B)}
    cur = RULES_A
    log = []
    for delay in stratified(rng, 8, 0.0, t_set):
        new = RULES_B if cur == RULES_A else RULES_A
        _, epoch0 = _rules(hv, root, "f0")
        killed_, t, _ = k.run(["set-fw-rules", "f0"], delay=delay, stdin=new)
        got, epoch1 = _rules(hv, root, "f0")
        log.append(f"{t:.3f}s killed={killed_}: {'new' if got == sets[new] else 'old' if got == sets[cur] else 'MIXED'}"
                   f" epoch {epoch0}->{epoch1}")
        assert got in (sets[cur], sets[new]), f"a killed set-fw-rules left a mixed rule set: {got}"
        if got == sets[new] and not killed_:
            assert epoch1 > epoch0
        p = hv.run(XDECTL, "--root", str(root), "set-fw-rules", "f0", input=new, check=False)
        assert clear_line(p, "set-fw-rules after a kill") is None, p.stderr
        got, epoch2 = _rules(hv, root, "f0")
        assert got == sets[new] and epoch2 > epoch0, log[-1]
        assert problems(hv, root) == []
        cur = new
    print("\n".join(log))
    xdectl(hv, root, "delete", "f0")
    final_cleanup_is_clean(hv, root, before)


# --- 2. create/delete cycles --------------------------------------------------------------

CYCLES = int(os.environ.get("XDE_FAULT_CYCLES", "200"))


def _fake_flow(maps, index, n):
    m = maps["flows"]
    k = m.Key()
    k.port, k.dir, k.proto, k.sport, k.dport = index, 0, 17, 1000 + n, 53
    set_bytes(k.src, addr16("10.0.0.10"))
    set_bytes(k.dst, addr16("10.0.0.20"))
    m.set(k, m.Leaf())


def test_create_delete_cycles_leave_nothing(killed):
    """CYCLES (200) cycles: create an overlay port (every 4th cycle also a
    passthrough one), give it rules, a custom route, a V2P entry of its own
    mapping and a flow, delete it. Each cycle attaches and detaches the
    underlays (the root has no other port). Every 50 cycles and at the end:
    map occupancy, links, pins (inodes) and the underlays' XDP, qdiscs,
    filters and routes are as before the first cycle."""
    hv, root, before = killed
    if occupancy(hv, root) is None:     # an earlier failure reset the root: load it
        xdectl(hv, root, *port_args("w0", 0))
        xdectl(hv, root, "delete", "w0")
    start = (occupancy(hv, root), snapshot(hv, root, UL))
    assert start[0] is not None
    t0 = time.monotonic()
    with inside(hv):
        for n in range(1, CYCLES + 1):
            ports.create(str(root), port_spec("cy0", n % 100))
            if n % 4 == 0:
                ports.create(str(root), port_spec("cy1", 150, passthrough=True))
            fw.set_rules(str(root), "cy0", RULES_A.splitlines())
            overlay.add_router_entry(str(root), "cy0", "198.51.100.0/24", "drop")
            overlay.add_router_entry(str(root), "cy0", "fd20::/48", "drop")
            dp = Datapath(root.path)
            try:
                maps = dp.maps()
                _fake_flow(maps, find_port(maps, "cy0")[0], n)
            finally:
                dp.close()
            ports.delete(str(root), "cy0")
            if n % 4 == 0:
                ports.delete(str(root), "cy1")
            if n % 50 == 0 or n == CYCLES:
                pnetns.popns()
                try:
                    now = (occupancy(hv, root), snapshot(hv, root, UL))
                    assert now == start, f"after {n} cycles:\nstart {start}\nnow   {now}"
                finally:
                    pnetns.pushns(hv.name)
    print(f"{CYCLES} cycles in {time.monotonic() - t0:.1f}s; occupancy {start[0]}")
    assert problems(hv, root) == []
    final_cleanup_is_clean(hv, root, before)
