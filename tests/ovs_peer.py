"""A foreign Geneve peer for the end-to-end tests: Open vSwitch's userspace
datapath (datapath_type=netdev), run in a namespace of its own.

OvsPeerLab builds, all in namespaces it creates (never the host's):

    xg (guest)  xde0 10.0.0.1 -- sled A -- u1, u2 (veth) -- OVS host -- og (guest)
                port of xde on A's underlays        br-phy: p1, p2 + the tap
                                                    br-int: geneve0 + ob <-> o0 10.0.0.2

On the OVS host, ovsdb-server and ovs-vswitchd run with their own database,
sockets and logs in a temporary directory, as background processes that
close() kills. The OVS host's underlay addresses and tunnel endpoint sit on
br-phy's internal port (a tap) in the kernel: OVS's userspace tunnelling
reads the namespace's routes and addresses to route, source and terminate
the tunnel, and resolves the next hop's MAC itself.

xde drops ARP inside Geneve (peers resolve through its V2P table) and finds
the inbound port by (VNI, inner destination MAC), so the OVS guest has a
fixed MAC, which is what xde's V2P entry for 10.0.0.2 says, and a static
neighbour entry for the xde guest.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from netns import Topology, create_args, sh, veth, xdectl

OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"

VNI = 10
UNDERLAY_MTU = 1600
XDE_GUEST_IP, XDE_GUEST_MAC = "10.0.0.1", "a8:40:25:ff:00:01"
OVS_GUEST_IP, OVS_GUEST_MAC = "10.0.0.2", "a8:40:25:ff:00:02"
SLED_ADDR = "fd00:1::1"          # xde's underlay address (sled A, on lo)
OVS_ADDR = "fd00:2::1"           # the OVS tunnel endpoint (on br-phy)
# underlay link i: A's u{i} has fd10:i::1/64, the OVS host's br-phy fd10:i::2/64
LINKS = (1, 2)


def link_addr(i, side):
    return f"fd10:{i}::{side}"


class Ovs:
    """ovsdb-server and ovs-vswitchd in namespace ns, with their own database,
    sockets and logs in a temporary directory. Only netdev (userspace)
    bridges: the system datapath is disabled, so no kernel module is used."""

    def __init__(self, ns):
        self.ns = ns
        self.dir = Path(tempfile.mkdtemp(prefix="xt-ovs-"))
        self.db = self.dir / "conf.db"
        self.sock = self.dir / "db.sock"
        self.ctl = self.dir / "vswitchd.ctl"
        self.log = self.dir / "vswitchd.log"
        self.env = dict(os.environ, OVS_RUNDIR=str(self.dir), OVS_LOGDIR=str(self.dir),
                        OVS_DBDIR=str(self.dir), OVS_SYSCONFDIR=str(self.dir))
        self.procs = []

    def start(self):
        sh("ovsdb-tool", "create", self.db, OVS_SCHEMA)
        d = self.dir
        self._spawn("ovsdb-server", self.db, f"--remote=punix:{self.sock}",
                    f"--pidfile={d}/ovsdb.pid", f"--unixctl={d}/ovsdb.ctl",
                    f"--log-file={d}/ovsdb.log", "--no-chdir")
        self._wait_for(self.sock, "ovsdb-server")
        self.vsctl("--no-wait", "init")
        self._spawn("ovs-vswitchd", f"unix:{self.sock}", "--disable-system",
                    f"--pidfile={d}/vswitchd.pid", f"--unixctl={self.ctl}",
                    f"--log-file={self.log}", "--no-chdir")
        self._wait_for(self.ctl, "ovs-vswitchd")
        self.vsctl("--timeout=20", "show")   # waits for vswitchd to take the config

    def _spawn(self, *cmd):
        p = subprocess.Popen(["nsenter", f"--net={self.ns.path}", *[str(c) for c in cmd]],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=self.env)
        self.procs.append(p)
        return p

    def _wait_for(self, path, what, timeout=20):
        deadline = time.monotonic() + timeout
        while not path.exists():
            dead = [p for p in self.procs if p.poll() is not None]
            assert not dead, f"{what} exited {dead[0].returncode}\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"{what} made no {path.name}\n{self.log_tail()}"
            time.sleep(0.05)

    def vsctl(self, *args, check=True):
        return self.ns.run("ovs-vsctl", f"--db=unix:{self.sock}", "--timeout=20", *args,
                           check=check, env=self.env)

    def appctl(self, *args, check=True):
        return self.ns.run("ovs-appctl", "-t", self.ctl, *args, check=check, env=self.env)

    def log_tail(self, lines=40):
        out = []
        for name in ("vswitchd.log", "ovsdb.log"):
            f = self.dir / name
            if f.exists():
                text = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- tail of {f} ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self):
        """Kill our own daemons (by process, never by name) and remove the
        directory."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


class OvsPeerLab(Topology):
    """Sled A (xde, port xde0 moved into guest namespace xg) back to back with
    an OVS userspace host (guest namespace og behind br-int). close() tears
    everything down, whatever state construction got to."""

    root = ovs = None

    def build(self):
        try:
            self._build()
        except AssertionError as e:
            tail = self.ovs.log_tail() if self.ovs is not None else ""
            if tail and "--- tail of" not in str(e):
                raise AssertionError(f"{e}\n{tail}") from e
            raise

    def _build(self):
        self.sled, self.host = self.netns("a"), self.netns("o")
        self.xg, self.og = self.netns("xg"), self.netns("og")

        # the underlay: two veths, sled A's u{i} to the OVS host's p{i}
        for i in LINKS:
            veth(self.sled, f"u{i}", self.host, f"p{i}", up=False)
            for ns, dev in ((self.sled, f"u{i}"), (self.host, f"p{i}")):
                ns.ip("link", "set", dev, "mtu", UNDERLAY_MTU, "up")
            self.sled.ip("addr", "add", f"{link_addr(i, 1)}/64", "dev", f"u{i}", "nodad")
        self.sled.ip("addr", "add", f"{SLED_ADDR}/128", "dev", "lo")
        self.sled.ip("route", "add", f"{OVS_ADDR}/128",
                     *[w for i in LINKS for w in
                       ("nexthop", "via", link_addr(i, 2), "dev", f"u{i}")])

        # the xde port, its guest behind it
        self.root = self.new_root(self.sled)
        self.root.xdectl(*create_args("xde0", mac=XDE_GUEST_MAC, ip=XDE_GUEST_IP,
                                      vni=VNI, underlay_addr=SLED_ADDR,
                                      vpc_subnet="10.0.0.0/24"))
        self.root.xdectl("set-v2p", OVS_GUEST_IP, OVS_GUEST_MAC, OVS_ADDR, VNI)
        self.sled.ip("link", "set", "xde0", "netns", self.xg.name)
        self.xg.ip("addr", "add", f"{XDE_GUEST_IP}/24", "dev", "xde0")
        self.xg.ip("link", "set", "xde0", "up")

        # the OVS host
        self.ovs = Ovs(self.host)
        self.ovs.start()
        v = self.ovs.vsctl
        v("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev")
        for i in LINKS:
            v("add-port", "br-phy", f"p{i}")
        self.host.ip("link", "set", "br-phy", "up")
        for i in LINKS:
            self.host.ip("addr", "add", f"{link_addr(i, 2)}/64", "dev", "br-phy", "nodad")
        self.host.ip("addr", "add", f"{OVS_ADDR}/128", "dev", "br-phy", "nodad")
        # OVS 3.1 takes the tunnel's outer source from the br-phy address on
        # the next hop's subnet (fd10:1::2), not from options:local_ip nor
        # the route's "src": xde accepts Geneve from any outer source.
        self.host.ip("route", "add", f"{SLED_ADDR}/128", "via", link_addr(1, 1), "dev", "br-phy")

        veth(self.og, "o0", self.host, "ob", up=False)
        self.og.ip("link", "set", "o0", "address", OVS_GUEST_MAC, "up")
        self.host.ip("link", "set", "ob", "up")
        # OVS reads the guest's frames from a packet socket and does not
        # finish checksums the veth left to be done: the usual setting for a
        # veth port of the userspace datapath (what OVS's own tests do).
        self.og.run("ethtool", "-K", "o0", "tx", "off")
        self.og.ip("addr", "add", f"{OVS_GUEST_IP}/24", "dev", "o0")
        self.og.ip("neigh", "replace", XDE_GUEST_IP, "lladdr", XDE_GUEST_MAC,
                   "dev", "o0", "nud", "permanent")
        v("add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=netdev")
        v("add-port", "br-int", "ob")
        v("add-port", "br-int", "geneve0", "--", "set", "interface", "geneve0", "type=geneve",
          f"options:remote_ip={SLED_ADDR}", f"options:local_ip={OVS_ADDR}",
          f"options:key={VNI}")
        self._wait_tunnel_route()
        self._warm_up()

    def _wait_tunnel_route(self, timeout=10):
        """OVS learns the namespace's routes over netlink, asynchronously."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.ovs.appctl("ovs/route/lookup", SLED_ADDR, check=False).stdout
            if "dev br-phy" in out:
                return
            if time.monotonic() > deadline:
                routes = self.ovs.appctl("ovs/route/show", check=False).stdout
                raise AssertionError(f"OVS has no route to {SLED_ADDR}:\n{out}\n{routes}")
            time.sleep(0.1)

    def _warm_up(self, timeout=10):
        """The first packet OVS tunnels to a next hop it has not resolved yet
        is dropped while OVS sends its own neighbour solicitation (it keeps
        its own neighbour cache, tnl/neigh/show, fed by what it snoops on
        br-phy). One answered ping from the OVS guest means both sides have
        resolved everything, so the tests count every packet."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.og.run("ping", "-c", "1", "-W", "1", XDE_GUEST_IP, check=False)
            if p.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no ping from the OVS guest got through in {timeout} s:\n"
                                     f"{p.stdout}{p.stderr}\n{self.diagnostics()}")

    def diagnostics(self):
        """What to print when traffic fails: OVS's view and its log."""
        parts = []
        if self.ovs is not None:
            for cmd in (("tnl/neigh/show",), ("tnl/ports/show",), ("ovs/route/lookup", SLED_ADDR),
                        ("dpctl/dump-flows",)):
                p = self.ovs.appctl(*cmd, check=False)
                parts.append(f"--- ovs-appctl {' '.join(cmd)} ---\n{p.stdout}{p.stderr}")
            parts.append(self.ovs.log_tail())
        if self.root is not None and self.sled.exists():
            p = xdectl(self.sled, self.root.path, "stats", check=False)
            parts.append(f"--- xdectl stats ---\n{p.stdout}{p.stderr}")
        return "\n".join(parts)

    def close(self):
        # OVS first (it holds the host's links), then roots and namespaces
        if self.ovs is not None:
            self.ovs.stop()
            self.ovs = None
        super().close()
