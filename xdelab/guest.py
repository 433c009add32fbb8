"""A lab guest configures itself, as a VM would: ISC dhclient asks the
virtual gateway for its IPv4 address (DHCPv4) and its IPv6 address
(DHCPv6), and the guest kernel's own router discovery takes the IPv6
default route from the gateway's router advertisement.

Every command runs in the guest's namespace through `nsenter --net` (as
the lab's other commands). dhclient runs with the lab's own script and
configuration (xdelab/dhclient-script, xdelab/dhclient.conf), and keeps
its pid, lease and log files in a directory the caller owns (the lab's
state directory), named `dhclient-GUEST-4.*` and `dhclient-GUEST-6.*`:
it never touches the machine's resolv.conf or its lease files.
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from pyroute2 import netns

from xdectl.errors import XdeError
from xdectl.netdev import sysctl

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "dhclient-script"
CONF = HERE / "dhclient.conf"
APPARMOR_PROFILES = Path("/sys/kernel/security/apparmor/profiles")


def _nsenter(ns):
    return ["nsenter", f"--net=/run/netns/{ns}"]


def _ip_json(ns, *args):
    p = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise XdeError(f"ip -n {ns} {' '.join(args)}: {p.stderr.strip()}")
    return json.loads(p.stdout or "[]")


def files(statedir, guest, family):
    """The pid, lease and log files of a guest's dhclient of one family."""
    base = Path(statedir) / f"dhclient-{guest}-{family}"
    return {k: base.with_suffix(f".{k}") for k in ("pid", "leases", "log")}


def _check_apparmor():
    """An enforced AppArmor profile for dhclient (Ubuntu's) lets it run only
    the distribution's script and write only its own files: say so rather
    than fail obscurely."""
    try:
        text = APPARMOR_PROFILES.read_text()
    except OSError:
        return
    for line in text.splitlines():
        if "dhclient" in line and line.endswith("(enforce)") and "/" in line.split()[0]:
            raise XdeError(f"AppArmor confines dhclient ({line.split()[0]}): the lab's guests run "
                           f"it with a script of their own; put the profile in complain mode "
                           f"(aa-complain /etc/apparmor.d/sbin.dhclient) to use the lab")


def prepare(ns, ifname):
    """The guest's interface up, as a host (not a router) that takes its
    IPv6 default route from router advertisements. (The sysctls are
    written from inside the namespace, by this process: a minimal machine
    has no sysctl command.)"""
    netns.pushns(ns)
    try:
        for key, value in (("all/forwarding", 0), (f"{ifname}/forwarding", 0),
                           (f"{ifname}/accept_ra", 1), (f"{ifname}/accept_ra_defrtr", 1),
                           (f"{ifname}/accept_ra_mtu", 1)):
            sysctl(f"net/ipv6/conf/{key}", value)
    finally:
        netns.popns()
    subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up"], check=True, timeout=10)


def link_local_ready(ns, ifname):
    """Has the interface a link-local address past duplicate detection?
    (dhclient -6 cannot bind to its client port before.)"""
    for a in _ip_json(ns, "-6", "addr", "show", "dev", ifname, "scope", "link"):
        for info in a.get("addr_info", []):   # (ip -j lists a filtered-out address as {})
            if info.get("local", "").startswith("fe80:") and not info.get("tentative") \
                    and not info.get("dadfailed"):
                return True
    return False


def start(ns, guest, ifname, family, statedir):
    """Start dhclient -4 or -6 (in the foreground of its own session, so
    that its log is kept) on ifname in the guest's namespace; returns the
    process. Its pid file is written at once."""
    _check_apparmor()
    f = files(statedir, guest, family)
    for path in (f["pid"], f["log"]):
        path.unlink(missing_ok=True)
    with open(f["log"], "w") as log:
        proc = subprocess.Popen(
            [*_nsenter(ns), "dhclient", f"-{family}", "-d", "-v", "-cf", str(CONF),
             "-sf", str(SCRIPT), "-pf", str(f["pid"]), "-lf", str(f["leases"]), ifname],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    f["pid"].write_text(f"{proc.pid}\n")
    return proc


def _is_dhclient(pid, pidfile):
    """Is pid (still) the dhclient that owns pidfile (not a zombie, not a
    process that reused the number)?"""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and any(c.endswith(b"dhclient") for c in cmd) and \
        str(pidfile).encode() in cmd


def stop(statedir, guest=None, family=None, keep_leases=False):
    """Stop the dhclients started in statedir (of one guest, of one family,
    or all) and remove their files (keep_leases: all but the lease files,
    which a dhclient started again then reuses, as after a reboot). A pid
    file whose process is gone, or is not that dhclient, is only removed."""
    pattern = f"dhclient-{guest or '*'}-{family or '*'}.*"
    stems = sorted({p.with_suffix("") for p in Path(statedir).glob(pattern)})
    for stem in stems:
        pidfile = stem.with_suffix(".pid")
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid and _is_dhclient(pid, pidfile):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 3
            while _is_dhclient(pid, pidfile) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_dhclient(pid, pidfile):
                os.kill(pid, signal.SIGKILL)
        for suffix in (".pid", ".log") if keep_leases else (".pid", ".leases", ".log"):
            stem.with_suffix(suffix).unlink(missing_ok=True)


def state(ns, ifname):
    """What the guest has on ifname: {"ip4": ["A/LEN", ...], "ip6": [global
    "A/LEN" past duplicate detection], "route4": {dst: gateway or "link"},
    "route6_default": [gateways]}."""
    addrs = _ip_json(ns, "addr", "show", "dev", ifname)
    ip4, ip6 = [], []
    for a in addrs:
        for info in a.get("addr_info", []):
            if "local" not in info:
                continue
            text = f"{info['local']}/{info['prefixlen']}"
            if info["family"] == "inet":
                ip4.append(text)
            elif info.get("scope") == "global" and not info.get("tentative"):
                ip6.append(text)
    route4 = {}
    for r in _ip_json(ns, "-4", "route", "show", "dev", ifname):
        route4[r["dst"]] = r.get("gateway", "link")
    route6 = [r.get("gateway") for r in _ip_json(ns, "-6", "route", "show", "default",
                                                  "dev", ifname)]
    return {"ip4": ip4, "ip6": ip6, "route4": route4, "route6_default": route6}


def missing(st, ip4=None, ip6=None, gw_ip=None, gw_ll=None):
    """What a guest that should have ip4 (DHCPv4) and ip6 (DHCPv6) lacks,
    as phrases; empty when it is configured."""
    out = []
    if ip4:
        if f"{ip4}/32" not in st["ip4"]:
            out.append(f"no DHCPv4 address {ip4}/32")
        if st["route4"].get("default") != gw_ip:
            out.append(f"no IPv4 default route via {gw_ip}")
    if ip6:
        if f"{ip6}/128" not in st["ip6"]:
            out.append(f"no DHCPv6 address {ip6}/128")
        if gw_ll not in st["route6_default"]:
            out.append(f"no IPv6 default route via {gw_ll} (router advertisement)")
    return out


def log_tail(statedir, guest, family, lines=5):
    try:
        text = files(statedir, guest, family)["log"].read_text()
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])
