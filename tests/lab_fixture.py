"""The overlay lab as a test fixture, and the helpers the overlay, wire and
BPF_PROG_TEST_RUN tests share.

One lab (docs/design.md, "The lab") is built per test session under its own
prefix (`xt<4 hex>-`), so it never touches an operator's lab (`xl-`), and is
always torn down, even when a test or the build fails. Test modules load
this file with `pytest_plugins = ["lab_fixture"]`, which registers the
fixture once for the session: the three modules share one lab.

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
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from xdectl.datapath import Datapath
from xdelab.lab import BSVC_ADDR, GW_IP, GW_MAC, OUTSIDE, SLEDS, SUBNET, VNI, Lab
from xdectl import counters
from xdectl.maps import find_port

REPO = Path(__file__).resolve().parents[1]
XDECTL = str(REPO / ".venv" / "bin" / "xdectl")
PY = sys.executable

S1, S2 = SLEDS["sled1"], SLEDS["sled2"]
G1_IP, G2_IP = S1["guest_ip"], S2["guest_ip"]
G1_MAC, G2_MAC = S1["mac"], S2["mac"]
U1_ADDR, U2_ADDR = S1["addr"], S2["addr"]       # sled underlay addresses
BSVC_VNI = 99
GENEVE_PORT = 6081


class LabT:
    """A built lab plus the operations the tests need."""

    def __init__(self, lab):
        self.lab = lab
        self.prefix = lab.prefix

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


# --- frames --------------------------------------------------------------------

OXIDE = 0x0129


def geneve_opt(cls, typ, body=b""):
    """One Geneve option: class, type (high bit: critical), body (whole words)."""
    assert len(body) % 4 == 0
    return struct.pack("!HBB", cls, typ, len(body) // 4) + body


def geneve(vni=VNI, proto=0x6558, ver=0, opts=b"", optlen=None, flags=0):
    """A Geneve header; optlen (in 4-byte words) defaults to the options given."""
    ol = len(opts) // 4 if optlen is None else optlen
    return (bytes([(ver << 6) | ol, flags]) + proto.to_bytes(2, "big") +
            vni.to_bytes(3, "big") + b"\0" + opts)


def inner_udp(payload, dst_mac=G1_MAC, src_mac=G2_MAC, src=G2_IP, dst=G1_IP,
              sport=40000, dport=40001):
    """An inner frame as sled2 would carry it to g1 (VNI 10)."""
    return bytes(Ether(dst=dst_mac, src=src_mac) / IP(src=src, dst=dst) /
                 UDP(sport=sport, dport=dport) / Raw(payload))


def inner_icmp(payload, dst_mac=G1_MAC, src_mac=G2_MAC, src=G2_IP, dst=G1_IP, ident=0x5844):
    """An inner echo request as sled2 would carry it to g1 (VNI 10). ICMP:
    the default inbound firewall rules let it in whatever its options say."""
    return bytes(Ether(dst=dst_mac, src=src_mac) / IP(src=src, dst=dst) /
                 ICMP(type=8, id=ident, seq=1) / Raw(payload))


def inner_arp(dst_mac=G1_MAC, src_mac=G2_MAC):
    return bytes(Ether(dst=dst_mac, src=src_mac) /
                 ARP(op=1, hwsrc=src_mac, psrc=G2_IP, pdst=G1_IP))


def underlay_frame(payload, dst_mac, src_mac, src=U2_ADDR, dst=U1_ADDR, sport=50000,
                   dport=GENEVE_PORT, tc=0, fl=0):
    """Outer Ethernet/IPv6/UDP around a (Geneve) payload."""
    return bytes(Ether(dst=dst_mac, src=src_mac) /
                 IPv6(src=src, dst=dst, hlim=128, tc=tc, fl=fl) /
                 UDP(sport=sport, dport=dport) / Raw(payload))


def malformed_cases(marker):
    """(id, Geneve UDP payload, global counter that must count it). Every
    payload that has an inner frame carries `marker` + id in it, so a capture
    in the guest shows whether it got through."""
    def inner(tag):
        return inner_icmp(marker + tag.encode())
    return [
        # UDP payload shorter than the 8-byte Geneve header
        ("truncated", geneve()[:4], "drop_in_malformed_truncated"),
        ("version", geneve(ver=1) + inner("version"), "drop_in_malformed_version"),
        # the header claims 63 words of options; the packet ends after one
        ("options_past_packet", geneve(optlen=63, opts=geneve_opt(OXIDE, 0x00)),
         "drop_in_malformed_options"),
        # an option whose body runs past the options area the header declares
        ("option_body_past_optlen",
         geneve(optlen=1, opts=geneve_opt(0x0102, 0x01, b"\0" * 8)) + inner("option_body_past_optlen"),
         "drop_in_malformed_options"),
        ("unknown_critical_option",
         geneve(opts=geneve_opt(0xFFFF, 0x80)) + inner("unknown_critical_option"),
         "drop_in_malformed_critical_option"),
        ("unknown_oxide_critical_option",
         geneve(opts=geneve_opt(OXIDE, 0x83)) + inner("unknown_oxide_critical_option"),
         "drop_in_malformed_critical_option"),
        ("protocol_ipv4", geneve(proto=0x0800) + inner("protocol_ipv4"), "drop_in_malformed_protocol"),
        ("no_inner_frame", geneve(), "drop_in_malformed_inner"),
        ("arp_inside", geneve() + inner_arp() + marker + b"arp_inside", "drop_in_arp_in_geneve"),
        ("unknown_vni", geneve(vni=11) + inner("unknown_vni"), "drop_in_no_port"),
        ("unknown_mac",
         geneve() + inner_icmp(marker + b"unknown_mac", dst_mac="a8:40:25:ff:00:99"),
         "drop_in_no_port"),
    ]


def valid_cases(marker):
    """(id, Geneve UDP payload) that must be delivered to g1."""
    def inner(tag):
        return inner_icmp(marker + tag.encode())
    return [
        ("plain", geneve() + inner("plain")),
        ("oxide_external", geneve(opts=geneve_opt(OXIDE, 0x00)) + inner("oxide_external")),
        ("oxide_multicast", geneve(opts=geneve_opt(OXIDE, 0x01, b"\0\0\0\0")) + inner("oxide_multicast")),
        ("oxide_mss", geneve(opts=geneve_opt(OXIDE, 0x02, struct.pack("!I", 1400))) + inner("oxide_mss")),
        ("unknown_noncritical_option",
         geneve(opts=geneve_opt(0xFFFF, 0x01, b"\1\2\3\4")) + inner("unknown_noncritical_option")),
        ("external_and_mss",
         geneve(opts=geneve_opt(OXIDE, 0x00) + geneve_opt(OXIDE, 0x02, struct.pack("!I", 1400)))
         + inner("external_and_mss")),
    ]


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
        # the lab answers before any test starts (next hops resolved first:
        # see test_new_flows_delivered_while_next_hops_unresolved for why)
        t.resolve_underlay_neighbours()
        for host, addr in (("g1", G2_IP), ("g2", G1_IP)):
            deadline = time.monotonic() + 10
            while not t.ping(host, addr, count=1)[0]:
                assert time.monotonic() < deadline, f"lab: {host} cannot reach {addr}"
        yield t
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            lab.down(quiet=True)
        assert not any(os.path.exists(f"/run/netns/{n}") for n in lab.namespaces)


__all__ = ["xlab", "geneve", "geneve_opt", "inner_udp", "inner_icmp", "inner_arp", "underlay_frame",
           "malformed_cases", "valid_cases", "OXIDE", "LabT", "wait_ready", "XDECTL", "PY", "G1_IP", "G2_IP", "G1_MAC",
           "G2_MAC", "U1_ADDR", "U2_ADDR", "GW_IP", "GW_MAC", "OUTSIDE", "BSVC_ADDR",
           "BSVC_VNI", "VNI", "SUBNET", "GENEVE_PORT"]
