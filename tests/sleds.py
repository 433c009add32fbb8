"""Two sleds joined back to back by two veth pairs, with no switch between
them: the plainest underlay, where every checksum and every link event is
the product's own business. Each sled has an xde root with one port whose
guest end lives in a guest namespace of its own.

    ga ─ xde0 ─ A ─u1────u1─ B ─ xde0 ─ gb
                  └u2────u2┘

A: fd00:1::1, B: fd00:2::1 (underlay addresses on lo), link i is
fd10:i::/64 (A ::1, B ::2); each sled reaches the other through both links
(ECMP, hashing the outer UDP ports). Guests 10.0.0.1 (ga) and 10.0.0.2 (gb)
in VNI 10.
"""
import json
import re
import subprocess

from netns import Topology, create_args, ping, xdectl

UNDERLAY_MTU = 1600
GUESTS = {"A": ("10.0.0.1", "a8:40:25:ff:00:01", "fd00:1::1"),
          "B": ("10.0.0.2", "a8:40:25:ff:00:02", "fd00:2::1")}


class BackToBack(Topology):
    def build(self):
        self.a, self.b = self.netns("a"), self.netns("b")
        self.ga, self.gb = self.netns("ga"), self.netns("gb")
        for i in (1, 2):
            self.a.ip("link", "add", f"u{i}", "type", "veth", "peer", "name", f"u{i}",
                      "netns", self.b.name)
            for n, sled in enumerate((self.a, self.b), 1):
                sled.ip("link", "set", f"u{i}", "mtu", UNDERLAY_MTU, "up")
                sled.ip("addr", "add", f"fd10:{i}::{n}/64", "dev", f"u{i}", "nodad")
        for sled, me, other, n in ((self.a, "A", "B", 2), (self.b, "B", "A", 1)):
            sled.ip("addr", "add", f"{GUESTS[me][2]}/128", "dev", "lo")
            sled.ip("route", "add", f"{GUESTS[other][2]}/128",
                    "nexthop", "via", f"fd10:1::{n}", "dev", "u1",
                    "nexthop", "via", f"fd10:2::{n}", "dev", "u2")
            sled.run("sysctl", "-qw", "net.ipv6.fib_multipath_hash_policy=1")
        self.root_a = self._port(self.a, "A", "B", self.ga)
        self.root_b = self._port(self.b, "B", "A", self.gb)

    def _port(self, sled, me, other, guest):
        ip, mac, addr = GUESTS[me]
        root = self.new_root(sled)
        xdectl(sled, root, *create_args("xde0", mac=mac, ip=ip, underlay_addr=addr,
                                        vpc_subnet="10.0.0.0/24"))
        oip, omac, oaddr = GUESTS[other]
        xdectl(sled, root, "set-v2p", oip, omac, oaddr, "10")
        sled.ip("link", "set", "xde0", "netns", guest.name)
        guest.ip("addr", "add", f"{ip}/24", "dev", "xde0")
        guest.ip("link", "set", "xde0", "up")
        return root

    def resolve(self):
        """Both sleds know each other's next hops on both links."""
        for sled, n in ((self.a, 2), (self.b, 1)):
            for i in (1, 2):
                ping(sled, f"fd10:{i}::{n}", count=1, interval="0.2")


def snmp(ns, proto):
    """{counter: value} of one protocol line pair of the namespace's
    /proc/net/snmp (Tcp, Udp, ...)."""
    lines = [l.split() for l in ns.run("cat", "/proc/net/snmp").stdout.splitlines()
             if l.startswith(proto + ":")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def iperf3(server_ns, client_ns, addr, *args, seconds=2, port=5201):
    """One iperf3 run, server in server_ns; returns (client's JSON, the
    server namespace's checksum errors during the run for TCP and UDP)."""
    before = {p: snmp(server_ns, p)["InCsumErrors"] for p in ("Tcp", "Udp")}
    server = server_ns.popen("iperf3", "-s", "-1", "-p", str(port))
    try:
        client = None
        for _ in range(20):   # until the server listens
            client = client_ns.run("iperf3", "-c", addr, "-p", str(port), "-t", str(seconds),
                                   "--json", "--connect-timeout", "2000", *args,
                                   check=False, timeout=seconds + 30)
            if "Connection refused" not in client.stdout:
                break
        out = json.loads(client.stdout)
    finally:
        server.kill()
        server.wait()
    errors = {p: snmp(server_ns, p)["InCsumErrors"] - before[p] for p in ("Tcp", "Udp")}
    assert "error" not in out, f"iperf3 to {addr}: {out['error']} (checksum errors {errors})"
    return out, errors


class PingSeries:
    """FLOWS ping series at once from one namespace, each its own ICMP id and
    so its own ECMP hash: some ride each underlay link. lost() gives, per
    series, the send times of the requests that got no answer."""

    def __init__(self, ns, addr, flows, interval, seconds):
        self.interval, self.count = interval, int(seconds / interval)
        self.procs = [ns.popen("ping", "-D", "-n", "-c", self.count, "-i", interval, "-W", "1",
                               addr, stdout=subprocess.PIPE, text=True) for _ in range(flows)]

    def lost(self, timeout=60):
        out = []
        for p in self.procs:
            text = p.communicate(timeout=timeout)[0]
            # the send time of each answered request: reply time - rtt
            sent = {int(seq): float(t) - float(rtt) / 1000 for t, seq, rtt in re.findall(
                r"^\[(\d+\.\d+)\].*icmp_seq=(\d+).*time=([\d.]+)", text, re.M)}
            assert sent, f"no reply at all:\n{text}"
            first = min(sent)
            t0 = sent[first] - (first - 1) * self.interval
            # ping keeps its schedule: a lost request went out between its
            # answered neighbours, at the interval after the earlier one
            times = []
            for seq in range(1, self.count + 1):
                if seq not in sent:
                    before = [q for q in sent if q < seq]
                    base = max(before) if before else None
                    times.append(sent[base] + (seq - base) * self.interval if base
                                 else t0 + (seq - 1) * self.interval)
            out.append(times)
        return out
