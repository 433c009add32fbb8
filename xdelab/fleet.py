"""The fleet lab: N sleds and M ports kept by agents from one etcd.

    sled1 ─u1─ sw1 ─u1─ sled2 ...  sledN        sw1, sw2: IPv6 routers
          └u2─ sw2 ─u2┘                         ctl: etcd, on the underlay
             sw1, sw2 ─ ctl, bsvc               bsvc: boundary services

Every sled runs `xdectl agent` in its namespace with a root of its own;
bsvc runs boundary services and an agent in boundary mode, which keeps
its NAT table; ctl runs etcd (one member, or a cluster of several on its
address). The
lab writes a fleet file of M ports spread over the sleds (VPCs of up to
100 ports, one VNI each) and applies it; the agents do the rest. A port's
guest end stays in its sled's namespace until `lab ping` takes it into a
guest namespace of its own (as whoever runs a VM would), with its address.
"""
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, netns

from xdectl import fleet
from xdectl.errors import Teardown, XdeError
from xdectl.etcd import Etcd
from xdectl.netdev import sysctl

from . import etcd as etcd_server
from .lab import DEFAULT_PREFIX, SWITCHES, UNDERLAY_MTU, Hosts, unload_root

CTL_ADDR = "fd00:ee::1"
PORTS_PER_VPC = 100
GW_MAC, GW_IP, BSVC_ADDR, BSVC_VNI = "a8:40:25:00:00:01", "172.30.0.5", "fd00:99::1", 99


def sled_addr(n):
    return f"fd00:{n:x}::1"


def vpc_prefix(vpc):
    """The first three octets of VPC vpc's /24: 10.0.0, 10.0.1, ... 10.1.0."""
    return f"10.{vpc >> 8}.{vpc & 0xff}"


def port_table(i, sleds):
    """Port i of the lab's fleet: VPC i // 100 (VNI 100 + that), on sled
    i mod the number of sleds."""
    vpc, k = divmod(i, PORTS_PER_VPC)
    return {"name": f"p{i}", "sled": sleds[i % len(sleds)], "vni": 100 + vpc,
            "mac": f"a8:40:{vpc >> 8:02x}:{vpc & 0xff:02x}:{k >> 8:02x}:{k & 0xff:02x}",
            "ip": f"{vpc_prefix(vpc)}.{k + 1}"}


def vpc_table(vpc):
    return {"vni": 100 + vpc, "subnet": f"{vpc_prefix(vpc)}.0/24", "gateway_ip": GW_IP,
            "gateway_mac": GW_MAC, "boundary_services": BSVC_ADDR, "boundary_vni": BSVC_VNI}


def fleet_text(n_ports, sleds, extra=()):
    """A fleet file of n_ports (and the tables of extra ports)."""
    import tomli_w
    tables = [port_table(i, sleds) for i in range(n_ports)] + list(extra)
    vnis = sorted({p["vni"] for p in tables} or {100})
    return tomli_w.dumps({"vpc": [vpc_table(v - 100) for v in vnis], "port": tables})


class FleetLab(Hosts):
    def __init__(self, prefix=DEFAULT_PREFIX):
        super().__init__(prefix)
        self.meta_file = self.state / "fleet.json"
        meta = json.loads(self.meta_file.read_text()) if self.meta_file.exists() else {}
        self.sleds = meta.get("sleds", [])
        self.members = meta.get("members", 1)
        self.cluster = etcd_server.Cluster(self.ns("ctl"), CTL_ADDR, self.state / "etcd",
                                           self.members)
        self.agents = {}          # sled -> Popen (of this process)

    @staticmethod
    def is_fleet(prefix):
        return Path(f"/run/xde-lab/{prefix.rstrip('-')}/fleet.json").exists()

    @property
    def hosts(self):
        return [*SWITCHES, "ctl", "bsvc", *self.sleds]

    @property
    def agent_hosts(self):
        """Where an agent runs: every sled, and bsvc in boundary mode."""
        return [*self.sleds, "bsvc"]

    @contextmanager
    def client(self):
        with self.inside("ctl"):
            e = Etcd(self.cluster.urls)
            try:
                yield e
            finally:
                e.close()

    # --- building -------------------------------------------------------

    def up(self, n_sleds, n_ports, members=1, timeout=None):
        if n_sleds < 1 or n_sleds > 64:
            raise XdeError("--sleds: 1 to 64")
        if n_ports < 0 or n_ports > 100000:
            raise XdeError("--ports: 0 to 100000")
        if self.meta_file.exists() or os.path.exists(f"/run/netns/{self.ns('sw1')}"):
            raise XdeError(f"a lab with prefix {self.prefix} is up: 'xdectl lab down' first")
        self.sleds = [f"sled{n}" for n in range(1, n_sleds + 1)]
        self.members = members
        self.cluster = etcd_server.Cluster(self.ns("ctl"), CTL_ADDR, self.state / "etcd", members)
        try:
            self._build()
            revision = self.apply(fleet_text(n_ports, self.sleds))
            self.wait_converged(revision, timeout or 60 + n_ports * 0.2)
        except BaseException:
            self.down(quiet=True)
            raise
        print(f"lab: up ({n_sleds} sleds, {n_ports} ports, etcd {self.cluster.urls} in "
              f"{self.ns('ctl')}; fleet revision {revision} matched on every sled)")

    def _build(self):
        self.state.mkdir(parents=True, exist_ok=True)
        self.meta_file.write_text(json.dumps({"sleds": self.sleds, "members": self.members}))
        self.make_hosts(self.hosts)
        self._underlay()
        self.cluster.start()
        # before the agents: on a machine's first run it compiles the
        # programs the sleds' roots then load from the store
        self._boundary()
        for host in self.agent_hosts:
            self.start_agent(host)

    def _boundary(self):
        """bsvc: boundary services up, with an external link that leads
        nowhere (a veth whose peer stays in bsvc: the fleet lab has no
        internet); its agent keeps the NAT table."""
        from xdectl import boundary
        with self.inside("bsvc"), IPRoute() as ipr:
            ipr.link("add", ifname="ext", kind="veth", peer={"ifname": "ext-end"})
            for name in ("ext", "ext-end"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
            for path in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
                sysctl(path, 1)
            sysctl("net/ipv4/conf/all/rp_filter", 0)
            boundary.up(self.root("bsvc"), ["u1", "u2"], BSVC_ADDR, "ext", BSVC_VNI)

    def _link(self, host, sw, i, n):
        tmp = (f"{self.prefix}t0"[-15:], f"{self.prefix}t1"[-15:])
        with IPRoute() as ipr:
            ipr.link("add", ifname=tmp[0], kind="veth", peer={"ifname": tmp[1]})
            for t, h in zip(tmp, (host, sw)):
                ipr.link("set", index=ipr.link_lookup(ifname=t)[0], net_ns_fd=self.ns(h))
        for h, t, final, addr in ((host, tmp[0], f"u{i}", f"fd10:{n:x}:{i}::1"),
                                  (sw, tmp[1], host, f"fd10:{n:x}:{i}::2")):
            with self.inside(h), IPRoute() as ipr:
                if h == sw:
                    sysctl(f"net/ipv6/conf/{t}/keep_addr_on_down", 1)
                idx = ipr.link_lookup(ifname=t)[0]
                ipr.link("set", index=idx, ifname=final, mtu=UNDERLAY_MTU, state="up")
                ipr.addr("add", index=idx, address=addr, prefixlen=64,
                         family=socket.AF_INET6, IFA_F_NODAD=True)

    def _underlay(self):
        """Each host to both switches; ECMP to the whole underlay prefix."""
        hosts = [(s, n, sled_addr(n)) for n, s in enumerate(self.sleds, 1)] + \
                [("ctl", 0xee, CTL_ADDR), ("bsvc", 0x99, BSVC_ADDR)]
        for host, n, addr in hosts:
            for i, sw in enumerate(SWITCHES, 1):
                self._link(host, sw, i, n)
            with self.inside(host), IPRoute() as ipr:
                ipr.addr("add", index=1, address=addr, prefixlen=128, family=socket.AF_INET6)
                sysctl("net/ipv6/fib_multipath_hash_policy", 1)
            # from the host's own address, which the other hosts route back
            # (pyroute2 refuses a multipath route with a source: ip does it)
            subprocess.run(["ip", "-n", self.ns(host), "-6", "route", "add", "fd00::/16",
                            "src", addr, "nexthop", "via", f"fd10:{n:x}:1::2", "dev", "u1",
                            "nexthop", "via", f"fd10:{n:x}:2::2", "dev", "u2"],
                           check=True, capture_output=True)
            for i, sw in enumerate(SWITCHES, 1):
                with self.inside(sw), IPRoute() as ipr:
                    ipr.route("add", family=socket.AF_INET6, dst=f"{addr}/128",
                              gateway=f"fd10:{n:x}:{i}::1")

    # --- agents ---------------------------------------------------------

    def agent_files(self, sled):
        return {k: self.state / f"agent-{sled}.{k}" for k in ("log", "report", "pid")}

    def start_agent(self, sled):
        f = self.agent_files(sled)
        where = (["--boundary"] if sled == "bsvc" else
                 ["--underlay", "u1", "--underlay", "u2",
                  "--underlay-addr", sled_addr(self.sleds.index(sled) + 1)])
        with open(f["log"], "a") as log:
            p = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.ns(sled)}", sys.executable, "-c",
                 "from xdectl.cli import run; run()", "--root", self.root(sled), "agent",
                 "--etcd", self.cluster.urls, "--sled", sled, *where, "--ttl", "3",
                 "--report", str(f["report"])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.agents[sled] = p
        f["pid"].write_text(str(p.pid))
        return p

    def stop_agent(self, sled, sig=signal.SIGTERM):
        f = self.agent_files(sled)
        p = self.agents.pop(sled, None)
        pid = p.pid if p else int(f["pid"].read_text()) if f["pid"].exists() else None
        if pid is None:
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        if p:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                p.wait()
        else:
            _wait_gone(pid)
        f["pid"].unlink(missing_ok=True)

    def report(self, sled):
        """The agent's own report (its --report file), or {}."""
        try:
            return json.loads(self.agent_files(sled)["report"].read_text())
        except (OSError, ValueError):
            return {}

    # --- the fleet ------------------------------------------------------

    def apply(self, text):
        """Apply a fleet file's text; returns the revision."""
        path = self.state / "fleet.toml"
        path.write_text(text)
        with self.client() as e:
            revision, _, _ = fleet.apply_file(e, fleet.load(str(path)))
        return revision

    def status(self):
        with self.client() as e:
            return fleet.status(e)

    def converged(self, revision):
        """Every agent alive, with no error, at revision or later and at the
        fleet's last change (a sled registering changes the others' V2P)."""
        s = self.status()
        revision = max(revision, s["revision"])
        rows = {r["name"]: r for r in s["sleds"]}
        return all(h in rows and rows[h]["alive"] and not rows[h]["error"]
                   and (rows[h]["revision"] or 0) >= revision for h in self.agent_hosts)

    def wait_converged(self, revision, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.converged(revision):
                    return time.monotonic()
            except XdeError:
                pass      # etcd in an election
            if time.monotonic() > deadline:
                lines = [f"{r['name']}: alive {r['alive']}, revision {r['revision']}, "
                         f"error {r['error']}" for r in self.status()["sleds"]]
                raise XdeError(f"lab: the sleds did not reach revision {revision} in "
                               f"{timeout:.0f} s: " + "; ".join(lines))
            time.sleep(0.05)

    def desired(self):
        """The ports of the fleet file the lab applied last: name -> table
        (the lab's own copy, readable while etcd is away)."""
        return fleet.load(str(self.state / "fleet.toml")).ports

    # --- guests ---------------------------------------------------------

    def guest(self, port):
        """Take a port's guest end into a namespace of its own, addressed
        (idempotent); returns the namespace's name."""
        p = self.desired()[port]
        g = self.ns(f"g-{port}")
        if not os.path.exists(f"/run/netns/{g}"):
            netns.create(g)
        with self.inside(f"g-{port}"), IPRoute() as ipr:
            here = ipr.link_lookup(ifname=port)
        if not here:
            with self.inside(p["sled"]), IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=port)
                if not idx:
                    raise XdeError(f"port {port} has no guest end on {p['sled']}")
                ipr.link("set", index=idx[0], net_ns_fd=g)
            net = ipaddress.ip_network(f"{p['ip']}/24", strict=False)
            with self.inside(f"g-{port}"), IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=port)[0]
                ipr.addr("add", index=idx, address=p["ip"], prefixlen=net.prefixlen)
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return g

    def ping(self, src, dst, count=2):
        """Whether port src's guest gets answers from port dst's (both taken
        into guest namespaces first)."""
        g = self.guest(src)
        self.guest(dst)
        r = subprocess.run(["nsenter", f"--net=/run/netns/{g}", "ping", "-c", str(count),
                            "-i", "0.2", "-W", "1", "-q", self.desired()[dst]["ip"]],
                           capture_output=True, text=True)
        return r.returncode == 0

    def check(self, samples=8, seed=None):
        """Ping sampled pairs of ports in one VPC on different sleds."""
        want = self.desired()
        rnd = random.Random(seed)
        by_vni = {}
        for name, p in want.items():
            by_vni.setdefault(p["vni"], []).append(name)
        pairs = [(a, b) for names in by_vni.values() for a in names for b in names
                 if want[a]["sled"] != want[b]["sled"]]
        if not pairs:
            raise XdeError("lab: no two ports of one VPC on different sleds to ping")
        failed = 0
        for a, b in rnd.sample(pairs, min(samples, len(pairs))):
            ok = self.ping(a, b)
            failed += not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {a} ({want[a]['sled']}) -> {b} "
                  f"{want[b]['ip']} ({want[b]['sled']})")
        print(f"lab: {min(samples, len(pairs)) - failed} of {min(samples, len(pairs))} "
              f"sampled pairs answered")
        if failed:
            raise XdeError(f"lab: {failed} sampled pairs did not answer")

    def print_status(self):
        s = self.status()
        print(f"lab: up ({len(self.sleds)} sleds, etcd {self.cluster.urls}); "
              f"fleet revision {s['revision']}")
        for r in s["sleds"]:
            print(f"  {r['name']}: alive {'yes' if r['alive'] else 'no'}, revision "
                  f"{r['revision']}, ports {r['ports']}/{r['desired_ports']}"
                  + (f", error {r['error']}" if r["error"] else ""))

    # --- down -----------------------------------------------------------

    def down(self, quiet=False):
        td = Teardown()
        for sled in self.agent_hosts:
            td.step(f"stop the agent of {sled}", self.stop_agent, sled)
        td.step("stop etcd", self._stop_etcd)
        for sled in self.agent_hosts:
            td.step(f"unload {self.root(sled)}", unload_root, self.ns(sled), self.root(sled))
        for n in sorted(os.listdir("/run/netns") if os.path.isdir("/run/netns") else []):
            if n.startswith(self.prefix) and self._ours(n):
                td.step(f"remove namespace {n}", netns.remove, n)
        if self.state.exists():
            td.step(f"remove {self.state}", subprocess.run, ["rm", "-rf", str(self.state)])
        if not quiet:
            print("lab: down")
        td.done()

    def _ours(self, name):
        rest = name[len(self.prefix):]
        return rest in self.hosts or rest.startswith("g-")

    def _stop_etcd(self):
        self.cluster.stop()
        etcd_server.kill_recorded(self.state / "etcd")


def _wait_gone(pid, timeout=15):
    """Until process pid (one another command started) has exited; killed
    if it takes longer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
