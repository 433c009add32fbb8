"""The namespace lab (docs/design.md, "The lab"): an Oxide rack at small
scale.

    g1 ─ sled1 ─u1─ sw1 ─u1─ sled2 ─ g2        sw1, sw2: IPv6 routers
               └u2─ sw2 ─u2┘                   bsvc: boundary services,
                    sw1, sw2 ─ bsvc                  linked to both switches

Each sled has its own xde root and ECMP routes to the other sled's (and
the boundary's) underlay address through both switches. Guests talk in
VPC VNI 10; off-VPC traffic goes to boundary services in VNI 99.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, netns

from xdectl import overlay, ports
from xdectl.errors import Teardown, XdeError
from xdectl.netdev import sysctl

DEFAULT_PREFIX = "xl-"
UNDERLAY_MTU = 1600           # guest 1500 + encapsulation, under the XDP-on-veth cap
VNI, BSVC_VNI = 10, 99
BSVC_ADDR = "fd00:99::1"
OUTSIDE = "192.0.2.1"         # an address beyond the VPC, answered by boundary services
GW_MAC, GW_IP = "a8:40:25:00:00:01", "172.30.0.5"
SUBNET = "10.0.0.0/24"
SLEDS = {
    "sled1": {"n": 1, "addr": "fd00:1::1", "guest": "g1", "guest_ip": "10.0.0.1", "mac": "a8:40:25:ff:00:01"},
    "sled2": {"n": 2, "addr": "fd00:2::1", "guest": "g2", "guest_ip": "10.0.0.2", "mac": "a8:40:25:ff:00:02"},
}
SWITCHES = ("sw1", "sw2")
HOSTS = ("sw1", "sw2", "sled1", "sled2", "g1", "g2", "bsvc")


def _p2p(host_n, sw_i):
    """Link subnet between host n (sled number, 99 for bsvc) and switch i."""
    return f"fd10:{host_n}:{sw_i}::"


class Lab:
    """One lab. Its namespaces, roots and state carry `prefix`, so tests
    build their own beside an operator's (`xl-` by default)."""

    def __init__(self, prefix=DEFAULT_PREFIX):
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,9}", prefix):
            raise XdeError(f"lab prefix {prefix!r}: 1 to 10 of a-z, 0-9, '-', starting with a letter")
        self.prefix = prefix
        self.namespaces = [prefix + h for h in HOSTS]
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
        self.state.mkdir(parents=True, exist_ok=True)
        for n in self.namespaces:
            netns.create(n)
        for h in HOSTS:
            with self.inside(h), IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for sw in SWITCHES:
            with self.inside(sw):
                sysctl("net/ipv6/conf/all/forwarding", 1)
        self._underlay()
        for sled, s in SLEDS.items():
            self._sled(sled, s)
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns('bsvc')}", sys.executable,
                                 "-m", "xdelab.bsvc", BSVC_ADDR, str(VNI)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        (self.state / "bsvc.pid").write_text(str(proc.pid))
        print(f"lab: up (sleds sled1, sled2; guests g1 10.0.0.1, g2 10.0.0.2; "
              f"boundary services {BSVC_ADDR})")

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
        """The sled's port, V2P for the other guests, and its guest namespace."""
        with self.inside(sled):
            ports.create(self.root(sled), ports.PortSpec(
                "xde0", "u1", "u2", s["mac"], s["guest_ip"], GW_MAC, GW_IP, BSVC_ADDR,
                BSVC_VNI, VNI, s["addr"], SUBNET))
            for other in SLEDS.values():
                if other is not s:
                    overlay.set_v2p(self.root(sled), other["guest_ip"], other["mac"],
                                    other["addr"], VNI)
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="xde0")[0],
                         net_ns_fd=self.ns(s["guest"]))
        with self.inside(s["guest"]), IPRoute() as ipr:
            i = ipr.link_lookup(ifname="xde0")[0]
            ipr.addr("add", index=i, address=s["guest_ip"], prefixlen=24)
            ipr.link("set", index=i, state="up")
            ipr.route("add", dst=f"{GW_IP}/32", oif=i, scope=253)  # scope link
            ipr.route("add", dst="0.0.0.0/0", gateway=GW_IP, oif=i)

    # --- tearing down ---------------------------------------------------

    def down(self, quiet=False):
        """Remove everything the lab made; a broken piece is reported (one
        line each) and does not stop the rest."""
        td = Teardown()
        td.step("stop the boundary services responder", self._stop_bsvc)
        for sled in SLEDS:
            td.step(f"unload {self.root(sled)}", self._unload, sled)
        for n in self.namespaces:
            if os.path.lexists(f"/run/netns/{n}"):
                td.step(f"remove namespace {n}", netns.remove, n)
        if self.state.exists():
            td.step(f"remove {self.state}", self.state.rmdir)
        if not quiet:
            left = [n for n in self.namespaces if os.path.lexists(f"/run/netns/{n}")]
            print(f"lab: down ({len(left)} namespaces left)" if left else "lab: down")
        td.done()

    def _stop_bsvc(self):
        pidfile = self.state / "bsvc.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
            pidfile.unlink()

    def _unload(self, sled):
        """Unload a sled's root inside its namespace. A namespace that is gone
        or stale took its links with it: only the pins are left to remove."""
        root = self.root(sled)
        if not Path(root).exists():
            return
        try:
            netns.pushns(self.ns(sled))
        except OSError:
            ports.unpin(root)
            return
        try:
            ports.unload(root, force=True)
        finally:
            netns.popns()
        if Path(root).exists():
            raise XdeError(f"it holds what xdectl did not make: {', '.join(os.listdir(root))}")

    # --- checking -------------------------------------------------------

    def ping(self, guest, addr, count=3):
        r = self.run(guest, "ping", "-c", str(count), "-i", "0.2", "-W", "1", "-q", addr,
                     capture_output=True, text=True)
        lines = r.stdout.strip().splitlines()
        return r.returncode == 0, (lines[-2] if len(lines) >= 2 else "")

    def check(self):
        if not self.is_up():
            raise XdeError("the lab is not up: run 'xdectl lab up'")
        checks = [("g1", "10.0.0.2", "guest g1 -> guest g2 (across sleds)"),
                  ("g2", "10.0.0.1", "guest g2 -> guest g1 (across sleds)"),
                  ("g1", GW_IP, "guest g1 -> gateway"),
                  ("g2", GW_IP, "guest g2 -> gateway"),
                  ("g1", OUTSIDE, "guest g1 -> outside (boundary services)"),
                  ("g2", OUTSIDE, "guest g2 -> outside (boundary services)")]
        failed = 0
        for guest, addr, what in checks:
            ok, summary = self.ping(guest, addr)
            failed += not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {what}: {summary}")
        for sled in SLEDS:
            with self.inside(sled):
                st = ports.port_stats(self.root(sled)).get("xde0", {})
            print(f"  {sled} xde0 counters: {json.dumps({k: v for k, v in st.items() if v})}")
        if failed:
            raise XdeError(f"lab: {failed} of {len(checks)} checks failed")

    def status(self):
        if not self.is_up():
            print("lab: down")
            return
        print("lab: up")
        for sled in SLEDS:
            with self.inside(sled):
                for p in ports.list_ports(self.root(sled)):
                    print(f"  {sled}: {p['name']} {p['mode']} {p['ip']} vni {p['vni']} {p['state']}")
