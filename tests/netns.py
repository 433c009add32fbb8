"""Helpers for end-to-end tests: network namespaces, xdectl runs, roots.

Everything a test makes lives in network namespaces it creates (names start
with "xt") and in bpffs roots under /sys/fs/bpf whose names start with "xt-".
Nothing here touches the host namespace's links: `ip` is always given
`-n NS`, and xdectl always runs through `nsenter --net` (not `ip netns exec`,
which remounts /sys and would hide bpffs).

Every Netns and Root registers itself, so the session fixture in conftest.py
can remove whatever a failed test left behind.
"""
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BPFFS = Path("/sys/fs/bpf")


def _find_xdectl():
    local = REPO / ".venv" / "bin" / "xdectl"
    if local.exists():
        return str(local)
    found = shutil.which("xdectl")
    if not found:
        raise RuntimeError("xdectl not found: run 'make setup' first")
    return found


XDECTL = _find_xdectl()

# The seed's port (docs/glossary.md, "The seed"), as `xdectl create` options.
SEED = {
    "mac": "A8:40:25:ff:00:01",
    "ip": "10.0.0.1",
    "gateway-mac": "A8:40:25:00:00:01",
    "gateway-ip": "172.30.0.5",
    "boundary-services": "fd00:99::1",
    "boundary-vni": "99",
    "vni": "10",
    "underlay-addr": "fd00:1::1",
}


def short_id(n=6):
    return uuid.uuid4().hex[:n]


def sh(*cmd, check=True, timeout=60, input=None, env=None):
    """Run a command (list of str); returns the CompletedProcess."""
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       input=input, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(cmd)}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def create_args(name, underlays=("u1", "u2"), passthrough=False, **over):
    """`xdectl create` arguments for the seed's port (docs/glossary.md,
    "The seed"), with overrides.

    Keys use '_' for '-' (gateway_mac=...). A value of None drops the option,
    a list repeats it (dns=[...]); `underlays` gives the --underlay options
    in order."""
    opts = dict(SEED)
    for k, v in over.items():
        opts[k.replace("_", "-")] = v
    args = ["create", name]
    for u in underlays:
        args += ["--underlay", u]
    for k, v in opts.items():
        for one in v if isinstance(v, list) else [] if v is None else [v]:
            args += [f"--{k}", str(one)]
    if passthrough:
        args.append("--passthrough")
    return args


def positional_args(name, u1="u1", u2="u2", passthrough=True, **over):
    """The seed's positional form (docs/glossary.md, "The seed"): xde-create
    [--passthrough] NAME U1 U2 MAC IP GW_MAC GW_IP BSVC_ADDR BSVC_VNI VPC_VNI
    SRC_UNDERLAY_ADDR."""
    o = dict(SEED)
    for k, v in over.items():
        o[k.replace("_", "-")] = v
    args = ["xde-create"] + (["--passthrough"] if passthrough else [])
    return args + [name, u1, u2, o["mac"], o["ip"], o["gateway-mac"], o["gateway-ip"],
                   o["boundary-services"], o["boundary-vni"], o["vni"], o["underlay-addr"]]


class Netns:
    """A network namespace made for a test; delete() removes it."""

    live = []  # every namespace not yet deleted, for the session safety net

    def __init__(self, tag=""):
        self.name = f"xt{short_id()}{tag}"
        sh("ip", "netns", "add", self.name)
        Netns.live.append(self)
        self.ip("link", "set", "lo", "up")

    def __repr__(self):
        return f"Netns({self.name})"

    @property
    def path(self):
        return f"/run/netns/{self.name}"

    def exists(self):
        return os.path.exists(self.path)

    def run(self, *cmd, check=True, timeout=60, input=None, env=None):
        """Run cmd inside this namespace (network namespace only)."""
        return sh("nsenter", f"--net={self.path}", *cmd, check=check,
                  timeout=timeout, input=input, env=env)

    def popen(self, *cmd, **kw):
        """cmd in the background inside this namespace (output discarded
        unless kw says otherwise); the caller kills and waits for it."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(["nsenter", f"--net={self.path}", *map(str, cmd)], **kw)

    def ip(self, *args, check=True):
        return sh("ip", "-n", self.name, *args, check=check)

    def tc(self, *args, check=True):
        return sh("tc", "-n", self.name, *args, check=check)

    def delete(self):
        if self in Netns.live:
            Netns.live.remove(self)
        if self.exists():
            sh("ip", "netns", "del", self.name, check=False)

    # --- observation ---------------------------------------------------

    def links(self):
        """Sorted names of the namespace's links."""
        out = self.ip("-o", "link", "show").stdout
        names = []
        for line in out.splitlines():
            m = re.match(r"^\d+:\s+([^:@\s]+)", line)
            if m:
                names.append(m.group(1))
        return sorted(names)

    def has_link(self, name):
        return name in self.links()

    def link_details(self, dev):
        return self.ip("-d", "link", "show", "dev", dev).stdout

    def xdp_prog_id(self, dev):
        """id of the XDP program on dev, or None."""
        m = re.search(r"prog/xdp id (\d+)", self.link_details(dev))
        return int(m.group(1)) if m else None

    def tc_filters(self, dev, direction="ingress"):
        return self.tc("filter", "show", "dev", dev, direction, check=False).stdout.strip()

    def tc_prog_ids(self, dev, direction="ingress"):
        return [int(x) for x in re.findall(r"\bid (\d+)", self.tc_filters(dev, direction))]

    def qdiscs(self, dev):
        return self.tc("qdisc", "show", "dev", dev, check=False).stdout.strip()

    def routes(self):
        """Routes of every table, both families, that the kernel did not make
        itself (link-local and local routes come and go with addresses)."""
        out = []
        for fam in ("-4", "-6"):
            text = self.ip(fam, "route", "show", "table", "all").stdout
            out += [l for l in text.splitlines() if "proto kernel" not in l]
        return sorted(out)

    def stats(self, dev):
        """(rx_packets, tx_packets) of dev."""
        d = json.loads(self.ip("-s", "-j", "link", "show", "dev", dev).stdout)[0]["stats64"]
        return d["rx"]["packets"], d["tx"]["packets"]

    def operstate(self, dev):
        return json.loads(self.ip("-j", "link", "show", "dev", dev).stdout)[0]["operstate"]


def veth(ns_a, name_a, ns_b, name_b, up=True):
    """A veth pair: name_a in ns_a, name_b in ns_b (never in the host)."""
    ns_a.ip("link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b.name)
    if up:
        ns_a.ip("link", "set", name_a, "up")
        ns_b.ip("link", "set", name_b, "up")

def underlay_host(tag="h", underlays=("u1", "u2"), extra=()):
    """A host namespace with veth underlays whose peers (n1, n2, ...) sit in
    a second namespace; returns (host, far side)."""
    hv, far = Netns(tag), Netns(tag + "f")
    try:
        for i, u in enumerate(underlays, 1):
            veth(hv, u, far, f"n{i}")
        for name in extra:   # plain links that only take a name (no dummy module here)
            hv.ip("link", "add", name, "type", "veth", "peer", "name", f"{name[:12]}_p")
    except BaseException:
        hv.delete()
        far.delete()
        raise
    return hv, far


def xdectl(ns, root, *args, check=True, timeout=120, env=None):
    """Run xdectl in namespace ns on root (None: no --root option).

    Returns the CompletedProcess; with check=True a non-zero exit fails the
    test with xdectl's output."""
    root_opt = ["--root", str(root)] if root is not None else []
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    p = ns.run(XDECTL, *root_opt, *args, check=False, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"xdectl {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def xdectl_json(ns, root, *args):
    return json.loads(xdectl(ns, root, *args, "--json").stdout)


def timed_xdectl(ns, root, *args, **kw):
    t = time.monotonic()
    p = xdectl(ns, root, *args, **kw)
    return p, time.monotonic() - t


def one_error_line(p):
    """Assert a refused command: exit 2, exactly one non-empty stderr line,
    no traceback. Returns that line."""
    assert p.returncode == 2, f"exit {p.returncode}, expected 2\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), \
        f"expected exactly one non-empty stderr line, got {lines!r}"
    return lines[0]


class Root:
    """A bpffs root for one datapath instance, used from namespace ns (the
    namespace of its underlays: unload must run there)."""

    live = []

    def __init__(self, ns):
        self.ns = ns
        self.path = BPFFS / f"xt-{short_id(8)}"
        Root.live.append(self)

    def __str__(self):
        return str(self.path)

    def exists(self):
        return self.path.exists()

    def pins(self):
        """{relative path: inode} of everything under the root, or None."""
        if not self.path.exists():
            return None
        out = {}
        for p in sorted(self.path.rglob("*")):
            out[str(p.relative_to(self.path))] = p.stat().st_ino
        return out

    def xdectl(self, *args, **kw):
        return xdectl(self.ns, self.path, *args, **kw)

    def ports(self):
        return xdectl_json(self.ns, self.path, "list")

    def stats(self, port):
        return xdectl_json(self.ns, self.path, "stats", port)[port]

    def cleanup(self):
        """unload --force in the root's namespace, then remove any pins that
        are left (e.g. when unload itself failed)."""
        if self in Root.live:
            Root.live.remove(self)
        if not self.path.exists():
            return
        if self.ns is not None and self.ns.exists():
            xdectl(self.ns, self.path, "unload", "--force", check=False)
        remove_pins(self.path)


def remove_pins(path):
    """Remove a test root by hand: unpin files, remove directories. Only ever
    for our own roots (/sys/fs/bpf/xt-*)."""
    path = Path(path)
    assert path.parent == BPFFS and path.name.startswith("xt-"), path
    if not path.exists():
        return
    for p in sorted(path.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir():
            p.rmdir()
        else:
            p.unlink()
    path.rmdir()


def snapshot(ns, root, devs):
    """What a refused command must leave unchanged."""
    return {
        "links": ns.links(),
        "xdp": {d: ns.xdp_prog_id(d) for d in devs},
        "qdiscs": {d: ns.qdiscs(d) for d in devs},
        "filters": {d: (ns.tc_filters(d, "ingress"), ns.tc_filters(d, "egress")) for d in devs},
        "routes": ns.routes(),
        "root": root.pins() if root is not None else None,
    }


def ping(ns, addr, count=3, check=True, interval="0.2", **kw):
    p = ns.run("ping", "-c", str(count), "-W", "1", "-i", interval, addr, check=False, **kw)
    if check:
        assert p.returncode == 0, f"ping {addr} from {ns.name} failed:\n{p.stdout}{p.stderr}"
    return p


class Topology:
    """Namespaces and roots made together and removed together: close()
    unloads the roots from their namespaces, then deletes the namespaces,
    whatever state the building got to. Subclasses build in build()."""

    def __init__(self):
        self.namespaces, self.roots = [], []
        try:
            self.build()
        except BaseException:
            self.close()
            raise

    def build(self):
        raise NotImplementedError

    def netns(self, tag):
        ns = Netns(tag)
        self.namespaces.append(ns)
        return ns

    def new_root(self, ns):
        root = Root(ns)
        self.roots.append(root)
        return root

    def close(self):
        for root in self.roots:
            root.cleanup()
        for ns in reversed(self.namespaces):
            ns.delete()
        self.roots, self.namespaces = [], []


class PassthroughLab(Topology):
    """The seed's scenario (docs/glossary.md, "The seed"): HV (the host, where
    xdectl runs) has underlays u1 and u2 whose peers n1 and n2 are ports of
    bridge br0 in NET; PEER hangs off the same bridge (pb <-> p0) with
    10.0.0.2/24. The peer is reachable through either underlay."""

    PEER_IP = "10.0.0.2"

    def build(self):
        self.hv = self.netns("h")
        self.net = self.netns("n")
        self.peer = self.netns("p")
        self.net.ip("link", "add", "br0", "type", "bridge")
        veth(self.hv, "u1", self.net, "n1")
        veth(self.hv, "u2", self.net, "n2")
        veth(self.net, "pb", self.peer, "p0")
        for port in ("n1", "n2", "pb"):
            self.net.ip("link", "set", port, "master", "br0")
        self.net.ip("link", "set", "br0", "up")
        self.peer.ip("addr", "add", f"{self.PEER_IP}/24", "dev", "p0")
        self.root = self.new_root(self.hv)

    def guest(self, tag="g"):
        """A new namespace for a guest end; deleted with the lab."""
        return self.netns(tag)

    def move_to_guest(self, port, guest, cidr):
        self.hv.ip("link", "set", port, "netns", guest.name)
        guest.ip("addr", "add", cidr, "dev", port)
        guest.ip("link", "set", port, "up")
