"""The namespace lab (DESIGN.md section 7): an Oxide rack at small scale.

    g1 ─ sled1 ─u1─ sw1 ─u1─ sled2 ─ g2        sw1, sw2: IPv6 routers
               └u2─ sw2 ─u2┘                   bsvc: boundary services,
                    sw1, sw2 ─ bsvc                  linked to both switches

Each sled has its own xde root and ECMP routes to the other sled's (and
the boundary's) underlay address through both switches. Guests talk in
VPC VNI 10; off-VPC traffic goes to boundary services in VNI 99.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, netns

from . import overlay, ports
from .errors import XdeError
from .netdev import sysctl

PREFIX = "xl-"
STATE = Path("/run/xde-lab")
ROOTS = "/sys/fs/bpf/xde-lab-"
UNDERLAY_MTU = 1600           # guest 1500 + encapsulation, under the XDP-on-veth cap
VNI, BSVC_VNI = 10, 99
BSVC_ADDR = "fd00:99::1"
OUTSIDE = "192.0.2.1"         # an address beyond the VPC, answered by boundary services
GW_MAC, GW_IP = "a8:40:25:00:00:01", "172.30.0.5"
SUBNET = "10.0.0.0/24"
SLEDS = {
    "sled1": {"n": 1, "addr": "fd00:1::1", "guest_ip": "10.0.0.1", "mac": "a8:40:25:ff:00:01"},
    "sled2": {"n": 2, "addr": "fd00:2::1", "guest_ip": "10.0.0.2", "mac": "a8:40:25:ff:00:02"},
}
SWITCHES = ("sw1", "sw2")
NAMESPACES = [PREFIX + n for n in ("sw1", "sw2", "sled1", "sled2", "g1", "g2", "bsvc")]


def ns(name):
    return PREFIX + name


@contextmanager
def inside(name):
    """Run the block in namespace `name` (this process, like xdectl would)."""
    netns.pushns(ns(name))
    try:
        yield
    finally:
        netns.popns()


def _link_pair(a_ns, a_name, b_ns, b_name, mtu):
    """A veth between two namespaces, both ends up."""
    with IPRoute() as ipr:
        ipr.link("add", ifname="xltmp0", kind="veth", peer={"ifname": "xltmp1"})
        for tmp, ns_name in (("xltmp0", a_ns), ("xltmp1", b_ns)):
            ipr.link("set", index=ipr.link_lookup(ifname=tmp)[0], net_ns_fd=ns(ns_name))
    for ns_name, tmp, final in ((a_ns, "xltmp0", a_name), (b_ns, "xltmp1", b_name)):
        with inside(ns_name), IPRoute() as ipr:
            i = ipr.link_lookup(ifname=tmp)[0]
            ipr.link("set", index=i, ifname=final, mtu=mtu, state="up")


def _addr6(ns_name, ifname, addr, plen):
    with inside(ns_name), IPRoute() as ipr:
        i = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=i, address=addr, prefixlen=plen, family=socket.AF_INET6,
                 IFA_F_NODAD=True)


def _lo_up(ns_name):
    with inside(ns_name), IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _p2p(sled_n, sw_i):
    """Link subnet between sled n (or 99: bsvc) and switch i."""
    return f"fd10:{sled_n}:{sw_i}::"


def is_up():
    return all(os.path.exists(f"/run/netns/{n}") for n in NAMESPACES)


def up():
    if is_up():
        print("lab: already up")
        return
    down(quiet=True)
    STATE.mkdir(parents=True, exist_ok=True)
    for n in NAMESPACES:
        netns.create(n)
    for n in NAMESPACES:
        _lo_up(n[len(PREFIX):])
    for sw in SWITCHES:
        with inside(sw):
            sysctl("net/ipv6/conf/all/forwarding", 1)

    hosts = [(name, s["n"], s["addr"]) for name, s in SLEDS.items()] + [("bsvc", 99, BSVC_ADDR)]
    for host, n, addr in hosts:
        for i, sw in enumerate(SWITCHES, 1):
            net = _p2p(n, i)
            _link_pair(host, f"u{i}", sw, f"{host[:5]}", UNDERLAY_MTU)
            _addr6(host, f"u{i}", net + "1", 64)
            _addr6(sw, host[:5], net + "2", 64)
        _addr6(host, "lo", addr, 128)
        with inside(host), IPRoute() as ipr:
            # ECMP to every other host's underlay address through both switches
            for other, m, oaddr in hosts:
                if other == host:
                    continue
                ipr.route("add", family=socket.AF_INET6, dst=f"{oaddr}/128",
                          multipath=[{"gateway": _p2p(n, i) + "2",
                                      "oif": ipr.link_lookup(ifname=f"u{i}")[0]}
                                     for i in (1, 2)])
        for i, sw in enumerate(SWITCHES, 1):
            with inside(sw), IPRoute() as ipr:
                ipr.route("add", family=socket.AF_INET6, dst=f"{addr}/128",
                          gateway=_p2p(n, i) + "1")

    for name, s in SLEDS.items():
        guest = f"g{s['n']}"
        with inside(name):
            sysctl("net/ipv6/fib_multipath_hash_policy", 1)
            ports.create(ROOTS + name, ports.PortSpec(
                "xde0", "u1", "u2", s["mac"], s["guest_ip"], GW_MAC, GW_IP, BSVC_ADDR,
                BSVC_VNI, VNI, s["addr"], SUBNET))
            for other in SLEDS.values():
                if other is not s:
                    overlay.set_v2p(ROOTS + name, other["guest_ip"], other["mac"], other["addr"], VNI)
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="xde0")[0], net_ns_fd=ns(guest))
        with inside(guest), IPRoute() as ipr:
            i = ipr.link_lookup(ifname="xde0")[0]
            ipr.addr("add", index=i, address=s["guest_ip"], prefixlen=24)
            ipr.link("set", index=i, state="up")
            ipr.route("add", dst=f"{GW_IP}/32", oif=i, scope=253)  # scope link
            ipr.route("add", dst="0.0.0.0/0", gateway=GW_IP, oif=i)

    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns('bsvc')}", sys.executable, "-m",
                             "xdectl.bsvc", BSVC_ADDR, str(VNI)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    (STATE / "bsvc.pid").write_text(str(proc.pid))
    print("lab: up (sleds sled1, sled2; guests g1 10.0.0.1, g2 10.0.0.2; "
          f"boundary services {BSVC_ADDR})")


def down(quiet=False):
    pidfile = STATE / "bsvc.pid"
    if pidfile.exists():
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
        pidfile.unlink()
    for name in SLEDS:
        if os.path.exists(f"/run/netns/{ns(name)}"):
            with inside(name):
                try:
                    ports.unload(ROOTS + name, force=True)
                except XdeError as e:
                    print(f"lab: {e}", file=sys.stderr)
        elif Path(ROOTS + name).exists():
            ports.unload(ROOTS + name, force=True)
    removed = 0
    for n in NAMESPACES:
        if os.path.exists(f"/run/netns/{n}"):
            netns.remove(n)
            removed += 1
    if not quiet:
        print(f"lab: down ({removed} namespaces removed)")


def _ping(guest, addr, count=3):
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns(guest)}", "ping", "-c", str(count),
                        "-i", "0.2", "-W", "1", "-q", addr], capture_output=True, text=True)
    return r.returncode == 0, r.stdout.strip().splitlines()[-2:] if r.stdout else []


def ping():
    if not is_up():
        raise XdeError("the lab is not up: run 'xdectl lab up'")
    checks = [("g1", "10.0.0.2", "guest g1 -> guest g2 (across sleds)"),
              ("g2", "10.0.0.1", "guest g2 -> guest g1 (across sleds)"),
              ("g1", GW_IP, "guest g1 -> gateway"),
              ("g2", GW_IP, "guest g2 -> gateway"),
              ("g1", OUTSIDE, "guest g1 -> outside (boundary services)"),
              ("g2", OUTSIDE, "guest g2 -> outside (boundary services)")]
    ok_all = True
    for guest, addr, what in checks:
        ok, summary = _ping(guest, addr)
        ok_all &= ok
        print(f"  {'ok  ' if ok else 'FAIL'} {what}: {summary[0] if summary else ''}")
    for name in SLEDS:
        with inside(name):
            st = ports.port_stats(ROOTS + name).get("xde0", {})
        shown = {k: v for k, v in st.items() if v}
        print(f"  {name} xde0 counters: {json.dumps(shown)}")
    if not ok_all:
        raise XdeError("lab: some checks failed")


def status():
    if not is_up():
        print("lab: down")
        return
    print("lab: up")
    for name in SLEDS:
        with inside(name):
            for p in ports.list_ports(ROOTS + name):
                print(f"  {name}: {p['name']} {p['mode']} {p['ip']} vni {p['vni']} {p['state']}")
