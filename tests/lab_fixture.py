"""The overlay lab as a test fixture, and the helpers the overlay, wire and
BPF_PROG_TEST_RUN tests share.

One lab (docs/design.md, "The lab") is built per test session under its own
prefix (`xt<4 hex>-`), so it never touches an operator's lab (`xl-`), and is
always torn down, even when a test or the build fails. tests/conftest.py
loads this file as a plugin, which registers the fixture once for the
session: every module that needs the lab shares it.
A module that changes the sleds' state (rules, routes, V2P, timeouts,
flows) calls `xlab.reset()` before and after it, which puts back the
state the lab was built with, without rebuilding anything.

Commands run in the lab's namespaces through `nsenter --net` (Lab.run), never
`ip netns exec` (which remounts /sys and hides bpffs). In-process work
(reading maps, BPF_PROG_TEST_RUN, raw sockets) enters a namespace with
Lab.inside().
"""
import contextlib
import io
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from frames import G1_IP, G1_IP6, G1_MAC, G2_IP, G2_IP6, GW_MAC
from xdectl import counters, fw, overlay
from xdectl.datapath import Datapath
from xdectl.maps import find_port
from xdelab.lab import SLEDS, Lab

REPO = Path(__file__).resolve().parents[1]
XDECTL = str(REPO / ".venv" / "bin" / "xdectl")
PY = sys.executable
HELPERS = REPO / "tests" / "helpers"        # small servers and senders run in the guests
# what create gives an IPv4 port: its firewall rules and the root's flow
# timeouts (the lab's dual-stack ports also allow ICMPv6 in: DEFAULT_LINES6)
DEFAULT_LINES = ["dir=in action=allow priority=65535 hosts=vni=10",
                 "dir=in action=allow priority=65535 protocol=icmp"]
DEFAULT_LINES6 = ["dir=in action=allow priority=65535 protocol=icmp6"]
DEFAULT_TIMEOUTS = {"idle": 60, "tcp_handshake": 5, "tcp_established": 8000, "tcp_closed": 120}


class LabT:
    """A built lab plus the operations the tests need."""

    def __init__(self, lab):
        self.lab = lab
        self.prefix = lab.prefix
        self.baseline = {}      # sled -> (V2P rows, custom routes) as built
        self.built_rules = {}   # sled -> xde0's firewall rules as built (set-fw-rules lines)

    @classmethod
    def of(cls, other):
        """The same lab, seen through a subclass's helpers."""
        t = cls(other.lab)
        t.baseline = other.baseline
        t.built_rules = other.built_rules
        return t

    # --- state ---------------------------------------------------------------

    def _state(self, sled):
        root = self.lab.root(sled)
        with self.lab.inside(sled):
            v2p = overlay.dump_v2p(root)
            routes = [r for r in overlay.dump_router(root, "xde0") if r["kind"] == "custom"]
        return v2p, routes

    def record_baseline(self):
        self.baseline = {sled: self._state(sled) for sled in SLEDS}
        self.built_rules = {}
        for sled in SLEDS:
            with self.lab.inside(sled):
                rules = fw.dump_rules(self.lab.root(sled), "xde0")
            self.built_rules[sled] = [
                f"dir={r['dir']} action={r['action']} priority={r['priority']} "
                f"hosts={r['hosts']} protocol={r['protocol']} ports={r['ports']}" for r in rules]

    def reset(self):
        """Back to the state the lab was built with: xde0's firewall rules
        as created, the default flow timeouts, no flows, the V2P entries and
        routes it had, next hops resolved. In-process, through xdectl's
        modules."""
        for sled, (v2p, routes) in self.baseline.items():
            root = self.lab.root(sled)
            now_v2p, now_routes = self._state(sled)
            with self.lab.inside(sled):
                fw.set_rules(root, "xde0", self.built_rules[sled])
                fw.set_timeouts(root, **DEFAULT_TIMEOUTS)
                fw.clear_flows(root, "xde0")
                for r in now_routes:
                    if r not in routes:
                        overlay.del_router_entry(root, "xde0", r["dest"])
                for r in routes:
                    if r not in now_routes:
                        overlay.add_router_entry(root, "xde0", r["dest"], r["target"])
                for r in now_v2p:
                    if r not in v2p:
                        overlay.clear_v2p(root, r["ip"], r["mac"], r["underlay"], r["vni"])
                for r in v2p:
                    if r not in now_v2p:
                        overlay.set_v2p(root, r["ip"], r["mac"], r["underlay"], r["vni"])
        self.resolve_underlay_neighbours()

    # --- running things ----------------------------------------------------

    def ns(self, host):
        return self.lab.ns(host)

    def run(self, host, *cmd, check=True, timeout=60, input=None):
        cmd = [str(c) for c in cmd]
        p = self.lab.run(host, *cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"[{host}] {' '.join(cmd)} exited {p.returncode}\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def ip(self, host, *args, check=True):
        """`ip -n NS ...` (ip itself switches namespace; no remount)."""
        cmd = ["ip", "-n", self.ns(host), *[str(a) for a in args]]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr}")
        return p

    def popen(self, host, *cmd, **kw):
        """A background process in host's namespace (stdout, stderr piped)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns(host)}",
                                 *[str(c) for c in cmd]], text=True, **kw)

    def python(self, host, code, *args, check=True, timeout=60, input=None):
        return self.run(host, PY, "-c", code, *args, check=check, timeout=timeout, input=input)

    def helper(self, host, name, *args, **kw):
        """Run tests/helpers/NAME in host's namespace, to the end."""
        return self.run(host, PY, HELPERS / name, *args, **kw)

    def start_helper(self, host, name, *args):
        """Start tests/helpers/NAME in host's namespace (a server: it prints
        "ready" once listening)."""
        p = self.popen(host, PY, HELPERS / name, *args)
        wait_ready(p, what=f"{name} in {host}")
        return p

    def xdectl(self, sled, *args, check=True):
        return self.run(sled, XDECTL, "--root", self.lab.root(sled), *args, check=check)

    def xdectl_json(self, sled, *args):
        return json.loads(self.xdectl(sled, *args, "--json").stdout)

    def ping(self, host, addr, count=3, extra=(), interval="0.2"):
        """(ok, ping output)."""
        p = self.run(host, "ping", "-c", count, "-i", interval, "-W", "1", *extra, addr,
                     check=False, timeout=30)
        return p.returncode == 0, p.stdout + p.stderr

    def must_ping(self, host, addr, count=3, extra=()):
        ok, out = self.ping(host, addr, count, extra)
        assert ok, f"ping {addr} from {host} failed:\n{out}"
        assert f"{count} received" in out, out
        return out

    # --- observing -----------------------------------------------------------

    @contextlib.contextmanager
    def maps(self, sled):
        """The sled root's pinned maps, opened in-process; closed afterwards."""
        with self.lab.inside(sled):
            maps = Datapath(self.lab.root(sled)).maps()
        try:
            yield maps
        finally:
            for m in maps.values():
                m.close()

    def port_stats(self, sled, port="xde0"):
        """The port's counters, summed over CPUs (read in-process, as xdectl does)."""
        with self.maps(sled) as maps:
            index, _ = find_port(maps, port)
            assert index is not None, f"no port {port} on {sled}"
            return counters.port_counts(maps, index).flat()

    def cli_stats(self, sled, port="xde0"):
        """The port's counters through `xdectl stats PORT --json`."""
        return self.xdectl_json(sled, "stats", port)[port]

    def global_stats(self, sled):
        """The instance's global counters (global_stats, a per-CPU array)."""
        with self.maps(sled) as maps:
            return counters.global_counts(maps).flat()

    def link(self, host, dev):
        return json.loads(self.ip(host, "-s", "-j", "link", "show", "dev", dev).stdout)[0]

    def tx_packets(self, host, dev):
        return self.link(host, dev)["stats64"]["tx"]["packets"]

    def rx_packets(self, host, dev):
        return self.link(host, dev)["stats64"]["rx"]["packets"]

    def mac(self, host, dev):
        return self.link(host, dev)["address"]

    def ifindex(self, host, dev):
        return self.link(host, dev)["ifindex"]

    # --- sending and capturing ------------------------------------------------

    def send_frames(self, host, dev, frames, gap=0.0):
        """Send raw Ethernet frames (bytes) out of dev in host's namespace."""
        with self.lab.inside(host):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind((dev, 0))
            for f in frames:
                s.send(bytes(f))
                if gap:
                    time.sleep(gap)
        finally:
            s.close()

    @contextlib.contextmanager
    def capture(self, host, dev, path, bpf_filter=""):
        """tcpdump -w path on dev in host's namespace while the block runs."""
        cmd = ["tcpdump", "-i", dev, "-n", "-U", "--immediate-mode", "-Z", "root",
               "-s", "0", "-w", str(path)]
        if bpf_filter:
            cmd.append(bpf_filter)
        p = self.popen(host, *cmd, stdout=subprocess.DEVNULL)
        try:
            _wait_line(p.stderr, "listening on", 10, f"tcpdump on {host}/{dev}")
            yield path
            time.sleep(0.4)
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def udp_frames(self, sports, dst_ip, dport, count=1, src_mac=G1_MAC, src_ip=G1_IP,
                   tag=b"flow"):
        """Guest frames of UDP flows (one per source port), with correct
        checksums: what a guest whose NIC does not offload checksums sends."""
        return [bytes(Ether(src=src_mac, dst=GW_MAC) / IP(src=src_ip, dst=dst_ip) /
                      UDP(sport=sp, dport=dport) / Raw(tag + b" %d %d" % (sp, k)))
                for k in range(count) for sp in sports]

    def end_frames(self, dst_ip, dport, src_mac=G1_MAC, src_ip=G1_IP):
        return [bytes(Ether(src=src_mac, dst=GW_MAC) / IP(src=src_ip, dst=dst_ip) /
                      UDP(sport=39999, dport=dport) / Raw(b"END"))] * 3

    def nstat(self, host, *names):
        """Absolute kernel SNMP counters of host (e.g. TcpInCsumErrors)."""
        out = self.run(host, "nstat", "-az", "--json", *names).stdout
        return json.loads(out)["kernel"]

    def wait_guests_reach_each_other(self, timeout=15):
        for host, addr in (("g1", G2_IP), ("g2", G1_IP), ("g1", G2_IP6), ("g2", G1_IP6)):
            deadline = time.monotonic() + timeout
            while not self.ping(host, addr, count=1)[0]:
                assert time.monotonic() < deadline, f"lab: {host} cannot reach {addr}"

    def resolve_underlay_neighbours(self, sleds=("sled1", "sled2")):
        """Resolve each sled's next hops (both switches) from the host stack.
        The datapath needs them resolved to use bpf_redirect; tests that are
        not about next-hop resolution call this so they test what they mean."""
        for sled in sleds:
            n = SLEDS[sled]["n"]
            for i in (1, 2):
                # a link that just came up may take a moment (DAD, NDP)
                self.run(sled, "ping", "-6", "-c", "1", "-w", "5", f"fd10:{n}:{i}::2")


def _wait_line(stream, text, timeout, what):
    deadline = time.monotonic() + timeout
    seen = ""
    poller = select.poll()
    poller.register(stream, select.POLLIN | select.POLLHUP)
    while time.monotonic() < deadline:
        if poller.poll(200):
            line = stream.readline()
            seen += line
            if text in line:
                return
            if not line:
                break
    raise AssertionError(f"{what}: never printed {text!r}; output: {seen!r}")


def wait_ready(proc, timeout=10, what="server"):
    """Wait for a helper server to print 'ready'."""
    _wait_line(proc.stdout, "ready", timeout, what)


@pytest.fixture(scope="session")
def xlab(privileged):
    """One overlay lab for the session, under a prefix of its own; always
    torn down. Fails (never skips) when it cannot be built."""
    lab = Lab(f"xt{secrets.token_hex(2)}-")
    assert not lab.is_up()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            lab.up()
        t = LabT(lab)
        t.record_baseline()
        # the lab answers before any test starts (next hops resolved first:
        # see test_new_flows_delivered_while_next_hops_unresolved for why)
        t.resolve_underlay_neighbours()
        t.wait_guests_reach_each_other()
        yield t
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            lab.down(quiet=True)
        assert not any(os.path.exists(f"/run/netns/{n}") for n in lab.namespaces)


__all__ = ["xlab", "LabT", "wait_ready", "XDECTL", "PY", "HELPERS", "DEFAULT_LINES",
           "DEFAULT_LINES6", "DEFAULT_TIMEOUTS"]
