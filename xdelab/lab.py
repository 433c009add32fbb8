"""The namespace lab (docs/design.md, "The lab"): an Oxide rack at small
scale.

    g1 ─ sled1 ─u1─ sw1 ─u1─ sled2 ─ g2        sw1, sw2: IPv6 routers
               └u2─ sw2 ─u2┘      └─ g3        bsvc: boundary services,
                    sw1, sw2 ─ bsvc ─ext─ inet       linked to both switches

Each sled has its own xde root and ECMP routes to the other sled's (and
the boundary's) underlay address through both switches. Guests g1 and g2
talk in VPC VNI 10, over IPv4 and IPv6; off-VPC traffic goes to boundary
services in VNI 99, from the guest's external address: g1's SNAT IP (with
a port range), g2's floating IP. bsvc runs the boundary datapath in a root
of its own (xdectl/boundary.py) and routes what it decapsulates to inet,
the internet, which routes the guests' external prefix back to it. g3 is
alone in another VPC (VNI 11, IPv6 only), at an address of VNI 10's IPv6
subnet that VNI 10 does not use: what shows that VPCs are isolated.
Guests have no static addresses: each runs ISC dhclient for DHCPv4 and
DHCPv6 and takes its IPv6 default route from router advertisements, all
answered by the port's virtual gateway (xdelab/guest.py).
"""
import ipaddress
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, netns

from xdectl import boundary, fw, gateway, nat, overlay, ports
from xdectl.errors import Teardown, XdeError
from xdectl.netdev import sysctl

from . import guest as guests

DEFAULT_PREFIX = "xl-"
UNDERLAY_MTU = 1600           # guest 1500 + encapsulation, under the XDP-on-veth cap
VNI, BSVC_VNI = 10, 99
BSVC_ADDR = "fd00:99::1"
# The internet: inet, on bsvc's external link. The guests' external
# addresses come from a prefix of their own, which inet routes to bsvc.
OUTSIDE = "203.0.113.1"       # inet: beyond the VPC, through boundary services
BSVC_EXT_IP = "203.0.113.254"  # bsvc on the external link (203.0.113.0/24)
EXTERNAL_NET = "198.51.100.0/24"
OUTSIDE6, BSVC_EXT_IP6 = "2001:db8:113::1", "2001:db8:113::fe"   # the same link, IPv6 (/64)
EXTERNAL_NET6 = "2001:db8:51::/64"
WHOAMI_PORT = 80              # inet's server: answers with the address a connection came from
G2_PORT = 7000                # what g2 serves on its floating IP (lab ping starts it)
# ... and the firewall rule g2's port gets for it beside create's defaults
G2_RULE = f"dir=in action=allow priority=100 protocol=tcp ports={G2_PORT}"
G2_FLOATING, G2_FLOATING6 = "198.51.100.20", "2001:db8:51::20"
GW_MAC, GW_IP = "a8:40:25:00:00:01", "172.30.0.5"
GW_LL = gateway.gateway_ll(GW_MAC)   # the gateway's IPv6 address: fe80::aa40:25ff:fe00:1
SUBNET, SUBNET6 = "10.0.0.0/24", "fd00:10::/64"
SLEDS = {
    "sled1": {"n": 1, "addr": "fd00:1::1", "guest": "g1", "guest_ip": "10.0.0.1",
              "guest_ip6": "fd00:10::1", "mac": "a8:40:25:ff:00:01"},
    "sled2": {"n": 2, "addr": "fd00:2::1", "guest": "g2", "guest_ip": "10.0.0.2",
              "guest_ip6": "fd00:10::2", "mac": "a8:40:25:ff:00:02"},
}
OTHER_VNI = 11
# Every guest: its sled, its port (the interface's name in the guest too),
# VNI, MAC and addresses (None: that family is off).
GUESTS = {s["guest"]: {"sled": sled, "port": "xde0", "vni": VNI, "mac": s["mac"],
                       "ip": s["guest_ip"], "ip6": s["guest_ip6"]} for sled, s in SLEDS.items()}
GUESTS["g3"] = {"sled": "sled2", "port": "xde3", "vni": OTHER_VNI, "mac": "a8:40:25:ff:11:03",
                "ip": None, "ip6": "fd00:10::3"}
# Where each guest's internet traffic leaves from: g1 shares its SNAT IP
# (ports 1024-2047 are its), g2 has a floating IP; g3 has none.
GUESTS["g1"]["external"] = nat.ExternalIPs(snat_ips=("198.51.100.10", "2001:db8:51::10"),
                                           snat_start=1024, snat_end=2047)
GUESTS["g2"]["external"] = nat.ExternalIPs(floating_ips=(G2_FLOATING, G2_FLOATING6))
GUESTS["g3"]["external"] = nat.ExternalIPs()
SWITCHES = ("sw1", "sw2")
HOSTS = ("sw1", "sw2", "sled1", "sled2", "g1", "g2", "g3", "bsvc", "inet")
ROOTS = (*SLEDS, "bsvc")      # the hosts with an xde root
GUEST_TIMEOUT = 30            # seconds for every guest to configure itself


def nat_entries():
    """(guest, EXT_IP[:START-END], (sled, VNI, MAC)) for every external
    address of the lab's guests: what bsvc's NAT table holds."""
    out = []
    for g, c in GUESTS.items():
        ext, owner = c["external"], (c["sled"], c["vni"], c["mac"])
        for ip in ext.snat_ips:
            out.append((g, str(boundary.NatTarget(ip, ext.snat_start, ext.snat_end)), owner))
        for ip in ext.ephemeral_ips + ext.floating_ips:
            out.append((g, ip, owner))
    return out


# What a TCP client in the lab prints: the line a whoami server answers
# with, or the error.
TCP_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as c:
        print(c.makefile().readline().strip() or "no answer")
except OSError as e:
    print(f"error: {e}")
"""


def _of_family(addrs, version):
    return next(a for a in addrs if ipaddress.ip_address(a).version == version)


def _p2p(host_n, sw_i):
    """Link subnet between host n (sled number, 99 for bsvc) and switch i."""
    return f"fd10:{host_n}:{sw_i}::"


def unload_root(ns, root):
    """Unload a host's root inside its namespace ns. A namespace that is
    gone or stale took its links with it: only the pins are left to remove."""
    if not Path(root).exists():
        return
    try:
        netns.pushns(ns)
    except OSError:
        ports.unpin(root)
        return
    try:
        ports.unload(root, force=True)
    finally:
        netns.popns()
    if Path(root).exists():
        raise XdeError(f"it holds what xdectl did not make: {', '.join(os.listdir(root))}")


class Hosts:
    """What every lab has: its hosts' namespaces, roots and state carry
    `prefix`, so tests build their own beside an operator's (`xl-` by
    default)."""

    def __init__(self, prefix=DEFAULT_PREFIX):
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,9}", prefix):
            raise XdeError(f"lab prefix {prefix!r}: 1 to 10 of a-z, 0-9, '-', starting with a letter")
        self.prefix = prefix
        self.state = Path(f"/run/xde-lab/{prefix.rstrip('-')}")

    def ns(self, host):
        return self.prefix + host

    def root(self, sled):
        return f"/sys/fs/bpf/xde-lab-{self.prefix}{sled}"

    @contextmanager
    def inside(self, host):
        """Run the block in host's namespace (this process, as xdectl would)."""
        netns.pushns(self.ns(host))
        try:
            yield
        finally:
            netns.popns()

    def run(self, host, *cmd, **kw):
        """Run a command in host's namespace (nsenter keeps bpffs visible)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns(host)}", *cmd], **kw)

    def make_hosts(self, hosts):
        """A namespace each, loopback up; the switches forward IPv6."""
        for h in hosts:
            netns.create(self.ns(h))
            with self.inside(h), IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for sw in SWITCHES:
            with self.inside(sw):
                sysctl("net/ipv6/conf/all/forwarding", 1)


class Lab(Hosts):
    """The two-sled lab."""

    def __init__(self, prefix=DEFAULT_PREFIX):
        super().__init__(prefix)
        self.namespaces = [prefix + h for h in HOSTS]
        self._dhclients = {}      # (guest, family) -> Popen, reaped when stopped
        self._servers = []        # Popen of inet's server, reaped when stopped

    def is_up(self):
        return all(os.path.exists(f"/run/netns/{n}") for n in self.namespaces)

    # --- building -------------------------------------------------------

    def _link_pair(self, a, a_name, b, b_name, mtu):
        """A veth between two hosts' namespaces, both ends up."""
        tmp = (f"{self.prefix}t0"[-15:], f"{self.prefix}t1"[-15:])
        with IPRoute() as ipr:
            ipr.link("add", ifname=tmp[0], kind="veth", peer={"ifname": tmp[1]})
            for t, host in zip(tmp, (a, b)):
                ipr.link("set", index=ipr.link_lookup(ifname=t)[0], net_ns_fd=self.ns(host))
        for host, t, final in ((a, tmp[0], a_name), (b, tmp[1], b_name)):
            with self.inside(host), IPRoute() as ipr:
                i = ipr.link_lookup(ifname=t)[0]
                ipr.link("set", index=i, ifname=final, mtu=mtu, state="up")

    def _addr6(self, host, ifname, addr, plen):
        with self.inside(host), IPRoute() as ipr:
            # a link that flaps keeps its address, as a configured NIC would
            # (xdectl sets it on the sleds' underlays itself)
            if ifname != "lo" and host not in SLEDS:
                sysctl(f"net/ipv6/conf/{ifname}/keep_addr_on_down", 1)
            i = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=i, address=addr, prefixlen=plen, family=socket.AF_INET6,
                     IFA_F_NODAD=True)

    def up(self):
        if self.is_up():
            print("lab: already up")
            return
        self.down(quiet=True)
        try:
            self._build()
        except BaseException:
            # half a lab would pass for one ("already up") next time
            self.down(quiet=True)
            raise
        named = ", ".join(f"{g} {' '.join(a for a in (c['ip'], c['ip6']) if a)}"
                          + (f" (VNI {c['vni']})" if c["vni"] != VNI else "")
                          for g, c in GUESTS.items())
        external = "; ".join(f"{g} {t}" for g, t, _ in nat_entries())
        print(f"lab: up (sleds sled1, sled2; guests {named}, addresses by DHCP; "
              f"boundary services {BSVC_ADDR}; internet {OUTSIDE}, external {external})")

    def _build(self):
        self.state.mkdir(parents=True, exist_ok=True)
        self.make_hosts(HOSTS)
        self._underlay()
        self._internet()
        # boundary services compile their root while the sleds compile theirs
        bsvc = self._start_boundary()
        try:
            for sled, s in SLEDS.items():
                self._sled(sled, s)
        finally:
            _, err = bsvc.communicate()
        if bsvc.returncode:
            raise XdeError(f"lab: boundary services did not come up: "
                           f"{(err.strip().splitlines() or ['?'])[-1]}")
        for _, target, (sled, vni, mac) in nat_entries():
            boundary.set_nat(self.root("bsvc"), target, SLEDS[sled]["addr"], vni, mac)
        self._start_whoami()
        self.configure_guests(GUESTS)

    def _internet(self):
        """bsvc's external link to inet, the internet host. inet routes the
        guests' external prefix to bsvc; bsvc routes everything else to inet
        and ends the external prefix (unreachable: what has no NAT entry).
        What boundary services need of bsvc's kernel: forwarding, and no
        reverse-path filtering on the underlays (docs/design.md, "Boundary
        services")."""
        self._link_pair("bsvc", "ext", "inet", "bsvc", 1500)
        self._addr6("inet", "bsvc", OUTSIDE6, 64)
        self._addr6("bsvc", "ext", BSVC_EXT_IP6, 64)
        with self.inside("inet"), IPRoute() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="bsvc")[0], address=OUTSIDE,
                     prefixlen=24)
            ipr.route("add", dst=EXTERNAL_NET, gateway=BSVC_EXT_IP)
            ipr.route("add", family=socket.AF_INET6, dst=EXTERNAL_NET6, gateway=BSVC_EXT_IP6)
        with self.inside("bsvc"), IPRoute() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="ext")[0], address=BSVC_EXT_IP,
                     prefixlen=24)
            ipr.route("add", dst="0.0.0.0/0", gateway=OUTSIDE)
            ipr.route("add", dst=EXTERNAL_NET, type="unreachable")
            ipr.route("add", family=socket.AF_INET6, dst="::/0", gateway=OUTSIDE6)
            ipr.route("add", family=socket.AF_INET6, dst=EXTERNAL_NET6, type="unreachable")
            for path in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
                sysctl(path, 1)
            sysctl("net/ipv4/conf/all/rp_filter", 0)

    def _start_boundary(self):
        """`xdectl boundary up` on bsvc, in the background: a process of its
        own, so that its compile runs beside the sleds'."""
        return subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns('bsvc')}", sys.executable, "-c",
             "from xdectl.cli import run; run()", "--root", self.root("bsvc"), "boundary", "up",
             "--underlay", "u1", "--underlay", "u2", "--underlay-addr", BSVC_ADDR,
             "--external", "ext", "--vni", str(BSVC_VNI)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def _start_whoami(self, timeout=10):
        """inet's server, its output in the state directory."""
        log = self.state / "inet.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns('inet')}",
                                     sys.executable, "-m", "xdelab.whoami", "::",
                                     str(WHOAMI_PORT)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._servers.append(proc)
        (self.state / "inet.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while "ready" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise XdeError(f"lab: the internet host's server did not start: "
                               f"{log.read_text().strip()[-200:]}")
            time.sleep(0.05)

    def _underlay(self):
        """Each host links to both switches; ECMP routes to every other host."""
        hosts = [(name, s["n"], s["addr"]) for name, s in SLEDS.items()] + [("bsvc", 99, BSVC_ADDR)]
        for host, n, addr in hosts:
            for i, sw in enumerate(SWITCHES, 1):
                self._link_pair(host, f"u{i}", sw, host, UNDERLAY_MTU)
                self._addr6(host, f"u{i}", _p2p(n, i) + "1", 64)
                self._addr6(sw, host, _p2p(n, i) + "2", 64)
            self._addr6(host, "lo", addr, 128)
            with self.inside(host), IPRoute() as ipr:
                # hash on the outer UDP ports too: xde varies them by flow
                sysctl("net/ipv6/fib_multipath_hash_policy", 1)
                for other, _, oaddr in hosts:
                    if other != host:
                        ipr.route("add", family=socket.AF_INET6, dst=f"{oaddr}/128",
                                  multipath=[{"gateway": _p2p(n, i) + "2",
                                              "oif": ipr.link_lookup(ifname=f"u{i}")[0]}
                                             for i in (1, 2)])
            for i, sw in enumerate(SWITCHES, 1):
                with self.inside(sw), IPRoute() as ipr:
                    ipr.route("add", family=socket.AF_INET6, dst=f"{addr}/128",
                              gateway=_p2p(n, i) + "1")

    def _sled(self, sled, s):
        """The sled's ports (dual-stack in VNI 10, and g3's), V2P for the
        guests of the same VNI elsewhere, and each port's guest end in its
        guest's namespace, unconfigured: the guest asks for its addresses."""
        root = self.root(sled)
        for g, c in GUESTS.items():
            if c["sled"] != sled:
                continue
            with self.inside(sled):
                ports.create(root, ports.PortSpec(
                    c["port"], "u1", "u2", c["mac"], c["ip"], GW_MAC, GW_IP, BSVC_ADDR,
                    BSVC_VNI, c["vni"], s["addr"], SUBNET if c["ip"] else None,
                    ip6=c["ip6"], vpc_subnet6=SUBNET6 if c["ip6"] else None,
                    external=c["external"]))
                if g == "g2":   # its service on the floating IP, open to the internet
                    fw.add_rule(root, c["port"], fw.parse_line(G2_RULE))
                for o in GUESTS.values():
                    if o["sled"] != sled and o["vni"] == c["vni"]:
                        for addr in (o["ip"], o["ip6"]):
                            if addr:
                                overlay.set_v2p(root, addr, o["mac"],
                                                SLEDS[o["sled"]]["addr"], c["vni"])
                with IPRoute() as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname=c["port"])[0],
                             net_ns_fd=self.ns(g))
            guests.prepare(self.ns(g), c["port"])

    # --- the guests' own configuration (xdelab/guest.py) -----------------

    def start_dhcp(self, guest, family, ifname):
        """Start the dhclient of one family on ifname in a guest's namespace,
        in place of one running there (also of a guest the lab did not make,
        e.g. a test's: its files live in the lab's state directory all the
        same, so that `down` stops it)."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.stop_dhcp(guest, family, keep_leases=True)
        self._dhclients[guest, family] = guests.start(self.ns(guest), guest, ifname, family,
                                                      self.state)

    def stop_dhcp(self, guest=None, family=None, keep_leases=False):
        """Stop dhclients (a guest's, of one family, or all) and remove their
        files (but the leases with keep_leases). Addresses they configured
        stay."""
        if self.state.exists():
            guests.stop(self.state, guest, family, keep_leases)
        for (g, f), proc in list(self._dhclients.items()):
            if guest in (None, g) and family in (None, f):
                if proc.poll() is None:   # still running: its pid file was lost
                    proc.kill()
                proc.wait()
                del self._dhclients[g, f]

    def configure_guests(self, which, timeout=GUEST_TIMEOUT):
        """Start dhclient -4 and -6 in each guest of which ({guest: config}
        as GUESTS, the namespace named as the lab names them) for the
        families it has (-6 once the interface's link-local address has
        passed duplicate detection), and wait until each has its addresses
        and both default routes. XdeError names what did not arrive."""
        pending6 = []
        for g, c in which.items():
            if c["ip"]:
                self.start_dhcp(g, 4, c["port"])
            if c["ip6"]:
                pending6.append(g)
        deadline = time.monotonic() + timeout
        while True:
            for g in list(pending6):
                if guests.link_local_ready(self.ns(g), which[g]["port"]):
                    self.start_dhcp(g, 6, which[g]["port"])
                    pending6.remove(g)
            lacking = {}
            for g, c in which.items():
                miss = guests.missing(guests.state(self.ns(g), c["port"]), c["ip"], c["ip6"],
                                      GW_IP, GW_LL)
                if g in pending6:
                    miss.append("no link-local address past duplicate detection "
                                "(dhclient -6 not started)")
                if miss:
                    lacking[g] = miss
            if not lacking:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        why = []
        for g, miss in lacking.items():
            logs = "; ".join(f"dhclient -{f}: {guests.log_tail(self.state, g, f, 3)}"
                             for f in (4, 6) if which[g]["ip" if f == 4 else "ip6"])
            why.append(f"{g}: {', '.join(miss)} [{logs}]")
        raise XdeError(f"lab: guests not configured after {timeout} s: " + "; ".join(why))

    # --- tearing down ---------------------------------------------------

    def down(self, quiet=False):
        """Remove everything the lab made; a broken piece is reported (one
        line each) and does not stop the rest."""
        td = Teardown()
        td.step("stop the internet host's server", self._stop_servers)
        td.step("stop the guests' DHCP clients", self.stop_dhcp)
        for host in ROOTS:
            td.step(f"unload {self.root(host)}", self._unload, host)
        for n in self.namespaces:
            if os.path.lexists(f"/run/netns/{n}"):
                td.step(f"remove namespace {n}", netns.remove, n)
        if self.state.exists():
            td.step(f"remove {self.state}", self.state.rmdir)
        if not quiet:
            left = [n for n in self.namespaces if os.path.lexists(f"/run/netns/{n}")]
            print(f"lab: down ({len(left)} namespaces left)" if left else "lab: down")
        td.done()

    def _stop_servers(self):
        """Stop inet's server (its process group, by the pid lab up noted:
        also one another command started) and remove its files."""
        pidfile = self.state / "inet.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
            pidfile.unlink()
        for proc in self._servers:
            proc.wait(10)
        self._servers = []
        (self.state / "inet.log").unlink(missing_ok=True)

    def _unload(self, host):
        unload_root(self.ns(host), self.root(host))

    # --- checking -------------------------------------------------------

    def ping(self, guest, addr, count=3):
        """(exit code, ping's summary line): 0 all answered, 1 none or some."""
        r = self.run(guest, "ping", "-c", str(count), "-i", "0.2", "-W", "1", "-q", addr,
                     capture_output=True, text=True)
        summary = [ln for ln in r.stdout.splitlines() if "packets transmitted" in ln]
        return r.returncode, (summary[0] if summary else r.stderr.strip())

    def check(self):
        if not self.is_up():
            raise XdeError("the lab is not up: run 'xdectl lab up'")
        g1, g2, g3 = GUESTS["g1"], GUESTS["g2"], GUESTS["g3"]
        reach = [("g1", g2["ip"], "guest g1 -> guest g2 (across sleds)"),
                 ("g2", g1["ip"], "guest g2 -> guest g1 (across sleds)"),
                 ("g1", g2["ip6"], "guest g1 -> guest g2 (across sleds, IPv6)"),
                 ("g2", g1["ip6"], "guest g2 -> guest g1 (across sleds, IPv6)"),
                 ("g1", GW_IP, "guest g1 -> gateway"),
                 ("g2", GW_IP, "guest g2 -> gateway"),
                 ("g1", f"{GW_LL}%{g1['port']}", "guest g1 -> gateway (IPv6 link-local)"),
                 ("g2", f"{GW_LL}%{g2['port']}", "guest g2 -> gateway (IPv6 link-local)"),
                 ("g3", f"{GW_LL}%{g3['port']}", "guest g3 -> gateway (IPv6 link-local)"),
                 ("g1", OUTSIDE, "guest g1 -> internet (its SNAT IP)"),
                 ("g2", OUTSIDE, "guest g2 -> internet (its floating IP)"),
                 ("inet", G2_FLOATING, "internet -> guest g2's floating IP"),
                 ("g1", OUTSIDE6, "guest g1 -> internet (its SNAT IP, IPv6)"),
                 ("g2", OUTSIDE6, "guest g2 -> internet (its floating IP, IPv6)"),
                 ("inet", G2_FLOATING6, "internet -> guest g2's floating IP (IPv6)")]
        # ok when the requests went out and nothing came back (exit code 1)
        isolated = [("g1", g3["ip6"], f"guest g1 (VNI {VNI}) cannot reach g3 (VNI {OTHER_VNI})"),
                    ("g3", g1["ip6"], f"guest g3 (VNI {OTHER_VNI}) cannot reach g1 (VNI {VNI})")]
        failed = 0
        for (guest, addr, what), want in [(c, 0) for c in reach] + [(c, 1) for c in isolated]:
            rc, summary = self.ping(guest, addr, count=3 if want == 0 else 2)
            ok = rc == want
            failed += not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {what}: {summary}")
        tcp = self.check_tcp()
        for ok, what, detail in tcp:
            failed += not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {what}: {detail}")
        for g, c in GUESTS.items():
            with self.inside(c["sled"]):
                st = ports.port_stats(self.root(c["sled"])).get(c["port"], {})
            print(f"  {c['sled']} {c['port']} ({g}) counters: "
                  f"{json.dumps({k: v for k, v in st.items() if v})}")
        with self.inside("bsvc"):
            st = boundary.stats(self.root("bsvc"))
        print(f"  bsvc boundary services counters: {json.dumps({k: v for k, v in st.items() if v})}")
        if failed:
            raise XdeError(f"lab: {failed} of {len(reach) + len(isolated) + len(tcp)} "
                           f"checks failed")

    def tcp(self, host, addr, port):
        """What a whoami server at addr:port answers host's connection with
        (the address and port it came from), or "error: ..."."""
        r = self.run(host, sys.executable, "-c", TCP_CLIENT, addr, str(port),
                     capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or r.stderr.strip()

    def check_tcp(self):
        """[(ok, what, detail)]: TCP to the internet from g1 and g2, which
        inet sees come from their external addresses (g1's from a port of
        its SNAT range), and from the internet to a server in g2 on its
        floating IP (started for the one connection); IPv4 and IPv6."""
        out = []
        for version, outside in ((4, OUTSIDE), (6, OUTSIDE6)):
            for g in ("g1", "g2"):
                ext = GUESTS[g]["external"]
                got = self.tcp(g, outside, WHOAMI_PORT)
                addr, _, port = got.partition(" ")
                if ext.snat_ips:
                    snat = _of_family(ext.snat_ips, version)
                    want = f"{snat}, port {ext.snat_start}-{ext.snat_end}"
                    ok = addr == snat and port.isdigit() and \
                        ext.snat_start <= int(port) <= ext.snat_end
                else:
                    want = _of_family(ext.floating_ips, version)
                    ok = addr == want
                out.append((ok, f"guest {g} -> internet TCP (IPv{version}), seen from {want}",
                            f"inet saw {got}"))
            floating = _of_family(GUESTS["g2"]["external"].floating_ips, version)
            got = self._tcp_to_g2(floating)
            out.append((got.partition(" ")[0] == outside,
                        f"internet -> guest g2's floating IP {floating}, TCP port {G2_PORT}",
                        f"g2 saw {got}"))
        return out

    def _tcp_to_g2(self, addr):
        """What a server in g2, up for one connection, saw of inet's
        connection to addr (its address and port), or "error: ..."."""
        server = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns('g2')}", sys.executable,
                                   "-m", "xdelab.whoami", "::", str(G2_PORT), "--once"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, bufsize=0)
        try:
            ready = select.select([server.stdout], [], [], 10)[0] and server.stdout.readline()
            return self.tcp("inet", addr, G2_PORT) if ready else "error: no server in g2"
        finally:
            server.kill()
            server.wait()

    def status(self):
        if not self.is_up():
            print("lab: down")
            return
        print("lab: up")
        for sled in SLEDS:
            with self.inside(sled):
                for p in ports.list_ports(self.root(sled)):
                    addrs = " ".join(a for a in (p["ip"], p.get("ip6")) if a)
                    print(f"  {sled}: {p['name']} {p['mode']} {addrs} vni {p['vni']} {p['state']}")
        with self.inside("bsvc"):
            b = boundary.show(self.root("bsvc"))
            entries = boundary.dump_nat(self.root("bsvc"))
        print(f"  bsvc: boundary services {'up' if b['up'] else 'down'}" +
              "".join(f"; {e['external']} -> {e['sled']} vni {e['vni']} {e['mac']}"
                      for e in entries))
