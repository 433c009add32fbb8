"""Boundary services (docs/design.md, "Boundary services"): set-nat's input
(unit), the boundary's own counters and drop reasons (unit, from the
sources), and its datapath in namespaces of its own, apart from any sled:

    peer ─b1─┬─u1─ bsvc ─ext─── inet     peer: the sleds' side of the underlay,
             └b2─u2─┘                    a Geneve endpoint in place of xde

`peer` holds a sled's underlay address and, for the TCP test, a userspace
Geneve endpoint behind a TAP (tests/helpers/geneve_tap.py; VNI 10 from the
boundary, VNI 99 toward it), so traffic crosses the boundary both ways
without any sled's NAT. Frames
are also crafted (scapy) and sent on the underlay, and the programs run on
frames with BPF_PROG_TEST_RUN. The last test takes the boundary down and
unloads the root."""
import json
import os
import re
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

from frames import GENEVE_PORT, OXIDE, geneve, geneve_opt
from netns import Topology, create_args, one_error_line, veth, xdectl, xdectl_json
from xdectl import boundary, libbpf
from xdectl.errors import XdeError

REPO = Path(__file__).resolve().parents[1]
BPF = REPO / "bpf"
PY = sys.executable
HELPERS = REPO / "tests" / "helpers"

BSVC_ADDR, PEER_ADDR = "fd00:99::1", "fd00:1::1"
BSVC_MAC = "a8:40:25:77:77:77"
G1_MAC, G2_MAC = "a8:40:25:ff:00:01", "a8:40:25:ff:00:02"
INET, INET6 = "203.0.113.1", "2001:db8:203::1"
EXT_IP, EXT_IP6 = "203.0.113.254", "2001:db8:203::fe"
SNAT, FLOATING, FLOATING6 = "198.51.100.10", "198.51.100.20", "2001:db8:198::20"
UNDERLAY_MTU = 1600
XDP_PASS, XDP_DROP = 2, 1
TC_ACT_OK, TC_ACT_REDIRECT = 0, 7


# --- unit: set-nat's input ------------------------------------------------------

@pytest.mark.parametrize("text, addr, start, end", [
    ("198.51.100.10", "198.51.100.10", None, None),
    ("198.51.100.10:1024-2047", "198.51.100.10", 1024, 2047),
    ("198.51.100.10:80", "198.51.100.10", 80, 80),
    ("2001:db8::20", "2001:db8::20", None, None),
    ("[2001:DB8::20]", "2001:db8::20", None, None),
    ("[2001:db8::20]:1-65535", "2001:db8::20", 1, 65535),
])
def test_targets(text, addr, start, end):
    t = boundary.parse_target(text)
    assert (t.addr, t.start, t.end) == (addr, start, end)
    assert boundary.parse_target(str(t)) == t


@pytest.mark.parametrize("text, says", [
    ("", "required"),
    ("198.51.100.300", "not an IPv4 or IPv6 address"),
    ("198.51.100.10:2047-1024", "above its end"),
    ("198.51.100.10:0-10", "outside 1..65535"),
    ("198.51.100.10:1-65536", "outside 1..65535"),
    ("198.51.100.10:a-b", "not START-END"),
    ("198.51.100.10:", "not START-END"),
    ("198.51.100.10:1-2-3", "not START-END"),
    ("2001:db8::20:1024-2047", "in brackets"),
    ("[198.51.100.10]:1-2", "brackets are for IPv6"),
    ("[2001:db8::20", "expected [IPV6]"),
    ("[2001:db8::20]1-2", "expected [IPV6]"),
    ("224.0.0.1", "not a unicast address"),
    ("255.255.255.255", "not a unicast address"),
    ("0.0.0.0", "not a unicast address"),
    ("fe80::1", "not a unicast address"),
    ("::ffff:198.51.100.10", "write an IPv4-mapped address as IPv4"),
])
def test_bad_targets(text, says):
    with pytest.raises(XdeError) as e:
        boundary.parse_target(text)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("args, says", [
    (("198.51.100.10", "10.0.0.1", "10", G1_MAC), "not an IPv6 address"),
    (("198.51.100.10", "fe80::1", "10", G1_MAC), "unicast IPv6"),
    (("198.51.100.10", "ff02::1", "10", G1_MAC), "unicast IPv6"),
    (("198.51.100.10", PEER_ADDR, "16777216", G1_MAC), "outside 0..16777215"),
    (("198.51.100.10", PEER_ADDR, "ten", G1_MAC), "not a number"),
    (("198.51.100.10", PEER_ADDR, "10", "ff:ff:ff:ff:ff:ff"), "unicast MAC"),
    (("198.51.100.10", PEER_ADDR, "10", "a8:40:25"), "not a MAC address"),
])
def test_bad_entries(args, says):
    with pytest.raises(XdeError) as e:
        boundary.nat_entry(*args)
    assert says in str(e.value), str(e.value)


def test_set_nat_bad_input_is_one_line():
    """From the command line: exit 2, one line, before any root is touched."""
    root = "/sys/fs/bpf/xt-bsvc-never-made"
    for args in (["198.51.100.10:9-1", PEER_ADDR, "10", G1_MAC],
                 ["198.51.100.10", "nope", "10", G1_MAC]):
        p = subprocess.run([str(REPO / ".venv" / "bin" / "xdectl"), "--root", root, "boundary",
                            "set-nat", *args], capture_output=True, text=True, timeout=60)
        one_error_line(p)
    assert not Path(root).exists()


def test_overlaps():
    t = boundary.parse_target
    have = [t("198.51.100.10:1024-2047"), t("198.51.100.10:2048-3071"), t("198.51.100.20"),
            t("[2001:db8::20]:1-100")]
    assert boundary.conflict(have, t("198.51.100.10:3072-4095")) is None
    assert boundary.conflict(have, t("198.51.100.10:1024-2047")) is None   # itself: a change
    assert boundary.conflict(have, t("198.51.100.10:2000-2100")) == have[0]
    assert boundary.conflict(have, t("198.51.100.10:2047-2048")) == have[0]
    assert boundary.conflict(have, t("198.51.100.10")) == have[0]          # whole vs ranges
    assert boundary.conflict(have, t("198.51.100.20:1-2")) == have[2]      # range vs whole
    assert boundary.conflict(have, t("198.51.100.21:1-2")) is None
    assert boundary.conflict(have, t("[2001:db8::20]:100-200")) == have[3]
    assert boundary.conflict(have, t("2001:db8::21")) is None


@pytest.mark.parametrize("start, end", [(1, 65535), (1024, 2047), (80, 80), (3, 17),
                                        (1000, 1999), (65535, 65535), (32768, 49151)])
def test_port_prefixes_tile_the_range(start, end):
    ports = []
    for first, bits in boundary.port_prefixes(start, end):
        size = 1 << (16 - bits)
        assert first % size == 0, (first, bits)          # an aligned prefix
        ports += range(first, first + size)
    assert ports == list(range(start, end + 1))
    assert len(boundary.port_prefixes(start, end)) <= 30


# --- unit: the boundary's counters, from the sources ---------------------------

def _code(path):
    text = re.sub(r"/\*.*?\*/", " ", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _x_list(name):
    m = re.search(r"#define " + name + r"\(X\)((?:[^\n]*\\\n)*[^\n]*)", _code(BPF / "boundary.h"))
    assert m, name
    return re.findall(r"X\((\w+)\)", m.group(1))


REASONS = _x_list("BSVC_DROP_REASONS")
BOUNDARY_FILES = [BPF / "boundary.h", BPF / "xdp_boundary.c", BPF / "tc_boundary.c"]


def test_every_boundary_drop_names_its_reason():
    """The boundary drops only through bsvc_xdp_drop() and bsvc_tc_drop(),
    with a reason of its own list; every reason is used."""
    calls, used = 0, set()
    for f in BOUNDARY_FILES:
        code = _code(f)
        for args in re.findall(r"\breturn bsvc_(?:xdp|tc)_drop\(([^;]*?)\);", code):
            calls += 1
            if f.name == "xdp_boundary.c" and args == "bsvc_geneve_reason(rc)":
                continue      # geneve.h's reason, mapped into the boundary's list
            assert args.startswith("BSVC_DROP_") and args[10:] in REASONS, f"{f.name}: {args}"
            used.add(args[10:])
        used |= set(re.findall(r"return BSVC_DROP_(\w+);", code))
    assert calls >= 10
    assert used == set(REASONS), set(REASONS) - used


def test_the_design_doc_lists_the_boundary_reasons_in_order():
    text = (REPO / "docs" / "design.md").read_text()
    section = text[text.index("\n## Boundary services\n"):]
    section = section[:section.index("\n## ", 3)]
    assert re.findall(r"^\| `(\w+)` \|", section, re.M) == REASONS


def test_key_bits_match_the_source():
    m = re.search(r"#define BSVC_KEY_BITS (\d+)", (BPF / "boundary.h").read_text())
    assert int(m.group(1)) == boundary.ADDR_BITS + 16


# --- the topology ------------------------------------------------------------------

class BoundaryNet(Topology):
    """bsvc (the boundary, its root), peer (the sleds' side), inet."""

    def build(self):
        self.bsvc, self.peer, self.inet = self.netns("b"), self.netns("p"), self.netns("i")
        self.root = self.new_root(self.bsvc)
        for i in (1, 2):
            veth(self.bsvc, f"u{i}", self.peer, f"b{i}")
            for ns, dev, a in ((self.bsvc, f"u{i}", f"fd10:99:{i}::1"),
                               (self.peer, f"b{i}", f"fd10:99:{i}::2")):
                ns.ip("link", "set", dev, "mtu", UNDERLAY_MTU)
                ns.ip("addr", "add", f"{a}/64", "dev", dev, "nodad")
        veth(self.bsvc, "ext", self.inet, "bsvc")
        self.bsvc.ip("addr", "add", BSVC_ADDR + "/128", "dev", "lo")
        self.peer.ip("addr", "add", PEER_ADDR + "/128", "dev", "lo")
        self.bsvc.ip("-6", "route", "add", PEER_ADDR, "nexthop", "via", "fd10:99:1::2", "dev", "u1",
                     "nexthop", "via", "fd10:99:2::2", "dev", "u2")
        self.peer.ip("-6", "route", "add", BSVC_ADDR, "via", "fd10:99:1::1", "dev", "b1")
        self.bsvc.ip("addr", "add", EXT_IP + "/24", "dev", "ext")
        self.bsvc.ip("addr", "add", EXT_IP6 + "/64", "dev", "ext", "nodad")
        self.inet.ip("addr", "add", INET + "/24", "dev", "bsvc")
        self.inet.ip("addr", "add", INET6 + "/64", "dev", "bsvc", "nodad")
        self.inet.ip("route", "add", "198.51.100.0/24", "via", EXT_IP)
        self.inet.ip("-6", "route", "add", "2001:db8:198::/64", "via", EXT_IP6)
        # the boundary's way out
        self.bsvc.ip("route", "add", "default", "via", INET)
        self.bsvc.ip("-6", "route", "add", "default", "via", INET6)
        # the external prefixes end here: without a NAT entry, unreachable
        self.bsvc.ip("route", "add", "unreachable", "198.51.100.0/24")
        self.bsvc.ip("-6", "route", "add", "unreachable", "2001:db8:198::/64")
        for path, value in (("net/ipv4/ip_forward", 1), ("net/ipv6/conf/all/forwarding", 1),
                            ("net/ipv4/conf/all/rp_filter", 0)):
            self.bsvc.run("sh", "-c", f"echo {value} > /proc/sys/{path}")
        # what a sled's xdectl does on its veth underlays (xdectl/underlay.py)
        for dev in ("b1", "b2"):
            self.peer.run("ethtool", "-K", dev, "tx-checksum-ip-generic", "off")

    def xdectl(self, *args, check=True):
        return xdectl(self.bsvc, self.root, *args, check=check)

    def json(self, *args):
        return xdectl_json(self.bsvc, self.root, *args)

    def up(self):
        self.xdectl("boundary", "up", "--underlay", "u1", "--underlay", "u2",
                    "--underlay-addr", BSVC_ADDR, "--external", "ext")

    def stats(self):
        return self.json("boundary", "stats")

    def mac(self, ns, dev):
        return json.loads(ns.ip("-j", "link", "show", "dev", dev).stdout)[0]["address"]

    def send(self, frames, dev="b1"):
        """Raw frames out of the peer's dev (toward the boundary's u1 or u2)."""
        code = ("import socket, sys\n"
                "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
                "s.bind((sys.argv[1], 0))\n"
                "for line in sys.stdin.read().split():\n"
                "    s.send(bytes.fromhex(line))\n")
        self.peer.run(PY, "-c", code, dev, input="\n".join(bytes(f).hex() for f in frames))


def underlay_frame(net, inner, vni=99, opts=b"", dev="b1", **gnv):
    """Geneve from the peer to the boundary's underlay address."""
    dst = net.mac(net.bsvc, "u" + dev[1])
    src = net.mac(net.peer, dev)
    return bytes(Ether(dst=dst, src=src) / IPv6(src=PEER_ADDR, dst=BSVC_ADDR, hlim=128) /
                 UDP(sport=51000, dport=GENEVE_PORT, chksum=0) /
                 Raw(geneve(vni=vni, opts=opts, **gnv) + bytes(inner)))


def inner4(payload, src=FLOATING, dst=INET, dport=9999):
    return bytes(Ether(src=G2_MAC, dst=BSVC_MAC) / IP(src=src, dst=dst, ttl=64) /
                 UDP(sport=40000, dport=dport) / Raw(payload))


def inner6(payload, src=FLOATING6, dst=INET6, dport=9999):
    return bytes(Ether(src=G2_MAC, dst=BSVC_MAC) / IPv6(src=src, dst=dst, hlim=64) /
                 UDP(sport=40000, dport=dport) / Raw(payload))


# a UDP receiver in inet: prints "ADDR PAYLOAD" per datagram
RECEIVER = """
import select, socket, sys
socks = []
for fam, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((addr, 9999))
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(65535)
        print(peer[0], data.decode(errors="replace"), flush=True)
"""


@pytest.fixture(scope="module")
def net(privileged):
    n = BoundaryNet()
    try:
        n.up()
        yield n
    finally:
        n.close()


def test_up_attaches_and_shows(net):
    shown = net.json("boundary", "show")
    assert shown == {"up": True, "vni": 99, "underlay_addr": BSVC_ADDR,
                     "underlays": ["u1", "u2"], "external": "ext", "nat_entries": 0}
    ids = {p.name: _prog_id(p) for p in (net.root.path / "progs").iterdir()}
    for dev in ("u1", "u2"):
        assert net.bsvc.xdp_prog_id(dev) == ids["xdp_boundary"]
        feats = net.bsvc.run("ethtool", "-k", dev).stdout
        assert "tx-checksum-ip-generic: off" in feats
        assert _sysctl(net.bsvc, f"net/ipv6/conf/{dev}/accept_dad") == "0"
        assert _sysctl(net.bsvc, f"net/ipv4/conf/{dev}/rp_filter") == "0"
    assert net.bsvc.tc_prog_ids("ext") == [ids["tc_boundary"]]
    assert f"tc_boundary@{net.root}" in net.bsvc.tc_filters("ext")
    # a second up is refused, naming what is up
    line = one_error_line(net.xdectl("boundary", "up", "--underlay", "u1", "--underlay-addr",
                                     BSVC_ADDR, "--external", "ext", check=False))
    assert "already up" in line and "u1, u2" in line


def _prog_id(path):
    fd = libbpf.obj_get(path)
    try:
        return libbpf.prog_id(fd)
    finally:
        os.close(fd)


def test_nat_table(net):
    """set-nat, dump-nat and clear-nat; an overlap is refused in one line
    and changes nothing; the same target again changes whose it is."""
    net.xdectl("boundary", "set-nat", f"{SNAT}:1024-2047", PEER_ADDR, "10", G1_MAC)
    net.xdectl("boundary", "set-nat", f"{SNAT}:2048-3071", PEER_ADDR, "10", G2_MAC)
    net.xdectl("boundary", "set-nat", FLOATING, PEER_ADDR, "10", G1_MAC)
    net.xdectl("boundary", "set-nat", FLOATING, PEER_ADDR, "10", G2_MAC)     # moved to g2
    net.xdectl("boundary", "set-nat", FLOATING6, PEER_ADDR, "10", G2_MAC)
    before = net.json("boundary", "dump-nat")
    assert [(e["external"], e["mac"]) for e in before] == [
        (f"{SNAT}:1024-2047", G1_MAC), (f"{SNAT}:2048-3071", G2_MAC), (FLOATING, G2_MAC),
        (FLOATING6, G2_MAC)]
    assert before[0] == {"external": f"{SNAT}:1024-2047", "address": SNAT, "start": 1024,
                         "end": 2047, "sled": PEER_ADDR, "vni": 10, "mac": G1_MAC}
    for target, clash in ((f"{SNAT}:2000-2100", f"{SNAT}:1024-2047"), (SNAT, f"{SNAT}:1024-2047"),
                          (f"{FLOATING}:80", FLOATING), (f"[{FLOATING6}]:1-10", FLOATING6)):
        line = one_error_line(net.xdectl("boundary", "set-nat", target, PEER_ADDR, "10", G1_MAC,
                                         check=False))
        assert f"overlaps {clash} ->" in line and f"clear-nat {clash}" in line, line
    line = one_error_line(net.xdectl("boundary", "clear-nat", f"{SNAT}:1024-2000", check=False))
    assert "no NAT entry" in line and f"{SNAT}:1024-2047" in line
    assert net.json("boundary", "dump-nat") == before
    table = net.xdectl("boundary", "dump-nat").stdout
    assert f"{SNAT}:1024-2047" in table and G1_MAC in table
    # a range that is not one prefix, and its removal, leave no key behind
    net.xdectl("boundary", "set-nat", f"{SNAT}:3-17", PEER_ADDR, "10", G1_MAC)
    assert len(net.json("boundary", "dump-nat")) == 5
    net.xdectl("boundary", "clear-nat", f"{SNAT}:3-17")
    assert net.json("boundary", "dump-nat") == before
    assert net.json("boundary", "stats")["nat_entries"] == 4


SYNC_NAT = """
import json, sys
from xdectl import boundary
want = {k: tuple(v) for k, v in json.loads(sys.stdin.read()).items()}
print(json.dumps(boundary.sync_nat(sys.argv[1], want)))
"""


def _sync_nat(net, want):
    """boundary.sync_nat in the boundary's namespace: (changes, errors)."""
    p = net.bsvc.run(PY, "-c", SYNC_NAT, str(net.root), input=json.dumps(want))
    assert p.returncode == 0, p.stderr
    return tuple(json.loads(p.stdout))


def test_sync_nat_makes_the_table_whole(net):
    """What the boundary agent keeps: the table made equal to a wanted one
    in one pass, what goes cleared before what comes (a range shrunk in
    place), each failure alone."""
    before = net.json("boundary", "dump-nat")
    owners = {e["external"]: (e["sled"], e["vni"], e["mac"]) for e in before}
    assert owners and _sync_nat(net, owners) == (0, [])          # as it is: nothing to do
    want = {k: v for k, v in owners.items() if k != FLOATING6}
    want[FLOATING] = (PEER_ADDR, 10, G1_MAC)                     # another owner
    want[f"{SNAT}:1024-1535"] = want.pop(f"{SNAT}:1024-2047")    # overlaps what it replaces
    want["203.0.113.9"] = (PEER_ADDR, 11, G2_MAC)                # new
    want[f"{SNAT}:3000-3100"] = (PEER_ADDR, 10, G1_MAC)          # overlaps :2048-3071
    want["300.1.1.1"] = (PEER_ADDR, 10, G1_MAC)                  # not an address
    changes, errors = _sync_nat(net, want)
    assert changes == 6 and len(errors) == 2, errors       # 2 cleared, 4 set (1 refused)
    assert errors[0].startswith("set-nat 300.1.1.1: external address '300.1.1.1'")
    assert errors[1].startswith(f"set-nat {SNAT}:3000-3100: {SNAT}:3000-3100 overlaps "
                                f"{SNAT}:2048-3071 ->")
    got = {e["external"]: (e["sled"], e["vni"], e["mac"]) for e in net.json("boundary", "dump-nat")}
    assert got == {k: v for k, v in want.items() if k not in ("300.1.1.1", f"{SNAT}:3000-3100")}
    assert _sync_nat(net, owners) == (5, [])                    # and back
    assert net.json("boundary", "dump-nat") == before
    assert net.json("boundary", "stats")["nat_entries"] == len(before)


def test_decap_hands_the_packet_to_the_kernel(net):
    """Geneve in VNI 99 for the boundary: the inner packet, IPv4 and IPv6,
    leaves toward inet routed by the kernel, its source kept."""
    rx = net.inet.popen(PY, "-c", RECEIVER, INET, INET6, stdout=subprocess.PIPE, bufsize=0)
    try:
        _wait(rx, "ready")
        before = net.stats()
        net.send([underlay_frame(net, inner4(b"decap-v4")),
                  underlay_frame(net, inner4(b"decap-opt"), opts=geneve_opt(OXIDE, 0x02, b"\0" * 4))])
        net.send([underlay_frame(net, inner6(b"decap-v6"), dev="b2")], dev="b2")
        got = {_wait(rx, "decap") for _ in range(3)}     # in any order: two links
        assert got == {f"{FLOATING} decap-v4", f"{FLOATING6} decap-v6", f"{FLOATING} decap-opt"}
        after = net.stats()
        assert after["decap"] - before["decap"] == 3
    finally:
        rx.kill()
        rx.wait()


def test_drops_by_reason(net):
    """Geneve in another VNI, malformed Geneve, inner frames that are not
    IP, and packets the host would not route out of the external link (to
    the underlay, a sled, the boundary host itself: a guest's way in) are
    dropped, each counted by its reason; nothing reaches inet."""
    cases = [
        (underlay_frame(net, inner4(b"x"), vni=98), "drop_wrong_vni"),
        (underlay_frame(net, inner4(b"x"), vni=10), "drop_wrong_vni"),
        (underlay_frame(net, inner4(b"x"), ver=1), "drop_malformed_version"),
        (underlay_frame(net, inner4(b"x"), proto=0x0800), "drop_malformed_protocol"),
        (underlay_frame(net, inner4(b"x"), opts=geneve_opt(0xFFFF, 0x80)),
         "drop_malformed_critical_option"),
        (underlay_frame(net, b""), "drop_malformed_inner"),
        (underlay_frame(net, Ether(src=G2_MAC, dst=BSVC_MAC) / ARP(pdst=INET)), "drop_not_ip"),
        (underlay_frame(net, inner4(b"x")[:14] + b"\x43" + inner4(b"x")[15:]),
         "drop_malformed_ipv4"),
        (underlay_frame(net, inner6(b"x")[:18] + b"\xff\xff" + inner6(b"x")[20:]),
         "drop_malformed_ipv6"),
        (underlay_frame(net, inner6(b"x", dst=PEER_ADDR)), "drop_not_external"),
        (underlay_frame(net, inner6(b"x", dst="fd10:99:2::2")), "drop_not_external"),
        (underlay_frame(net, inner4(b"x", dst=EXT_IP)), "drop_not_external"),
        (underlay_frame(net, inner6(b"x", dst=BSVC_ADDR)), "drop_not_external"),
    ]
    before = net.stats()
    net.send([f for f, _ in cases])
    want = {}
    for _, reason in cases:
        want[reason] = want.get(reason, 0) + 1
    deadline = time.monotonic() + 5
    while True:
        after = net.stats()
        got = {r: after[r] - before[r] for r in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got == want
    assert after["decap"] == before["decap"]


def test_outside_never_reaches_the_underlay(net):
    """A host on the external link that routes the underlay's addresses
    through the boundary gets nowhere: dropped, to_underlay."""
    net.inet.ip("-6", "route", "replace", PEER_ADDR, "via", EXT_IP6)
    try:
        before = net.stats()
        ok = net.inet.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", PEER_ADDR,
                          check=False)
        assert ok.returncode != 0, ok.stdout
        assert net.stats()["drop_to_underlay"] - before["drop_to_underlay"] == 2
    finally:
        net.inet.ip("-6", "route", "del", PEER_ADDR)


def test_host_traffic_passes(net):
    """The underlays and the external link keep working for the host."""
    before = net.stats()
    net.peer.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", BSVC_ADDR)
    net.inet.run("ping", "-c", "2", "-i", "0.2", "-W", "1", EXT_IP)
    net.inet.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", EXT_IP6)
    after = net.stats()
    assert after["underlay_passed"] - before["underlay_passed"] >= 2
    assert after["external_passed"] - before["external_passed"] >= 4
    assert after["encap"] == before["encap"]


def _capture(ns, devs, path, seconds_after=0.5):
    """tcpdump on each of devs in ns; returns the stop function."""
    procs = []
    for dev in devs:
        p = ns.popen("tcpdump", "-i", dev, "-n", "-U", "--immediate-mode", "-Z", "root", "-s", "0",
                     "-w", f"{path}-{dev}.pcap", "udp port 6081", stderr=subprocess.PIPE, bufsize=0)
        _wait(p, "listening on", stream="stderr")
        procs.append(p)

    def stop():
        time.sleep(seconds_after)
        frames = []
        for dev, p in zip(devs, procs):
            p.send_signal(2)
            p.wait(10)
            frames += [bytes(f) for f in rdpcap(f"{path}-{dev}.pcap")]
        return frames
    return stop


def test_encap_on_the_wire(net, tmp_path):
    """From inet to a NAT'd address: Geneve to the owner's sled, in its VNI,
    with one option, External, and the guest's MAC inside. A port outside
    every range, and an address with no entry, pass to the host."""
    stop = _capture(net.peer, ("b1", "b2"), tmp_path / "encap")
    before = net.stats()
    send = ("import socket, sys\n"
            "for fam, addr, port in ((socket.AF_INET, sys.argv[1], 1500), "
            "(socket.AF_INET, sys.argv[2], 53), (socket.AF_INET6, sys.argv[3], 443), "
            "(socket.AF_INET, sys.argv[1], 4000), (socket.AF_INET, '198.51.100.99', 53)):\n"
            "    s = socket.socket(fam, socket.SOCK_DGRAM)\n"
            "    s.sendto(b'to-%d' % port, (addr, port))\n")
    net.inet.run(PY, "-c", send, SNAT, FLOATING, FLOATING6)
    frames = stop()
    after = net.stats()
    assert after["encap"] - before["encap"] == 3
    assert after["external_passed"] - before["external_passed"] >= 2
    seen = {}
    for f in frames:
        e = Ether(f)
        ip6, udp = e[IPv6], e[UDP]
        payload = bytes(udp.payload)
        assert (ip6.src, ip6.dst, ip6.hlim, ip6.nh) == (BSVC_ADDR, PEER_ADDR, 128, 17)
        assert udp.dport == GENEVE_PORT and udp.sport >= 49152
        assert struct.unpack("!H", bytes(e[UDP])[6:8])[0] == 0         # checksum 0
        assert payload[:2] == b"\x01\x00" and payload[2:4] == b"\x65\x58"   # 1 word of options
        assert int.from_bytes(payload[4:7], "big") == 10 and payload[7] == 0
        assert payload[8:12] == struct.pack("!HBB", OXIDE, 0x00, 0)      # External, no body
        inner = Ether(payload[12:])
        assert inner.src == BSVC_MAC
        seen[bytes(inner.lastlayer()).decode()] = (inner.dst, inner.payload.src, inner.payload.dst)
    assert seen == {"to-1500": (G1_MAC, INET, SNAT), "to-53": (G2_MAC, INET, FLOATING),
                    "to-443": (G2_MAC, INET6, FLOATING6)}


def _tc_run(net, frame):
    ifindex = json.loads(net.bsvc.ip("-j", "link", "show", "dev", "ext").stdout)[0]["ifindex"]
    return _run(net, "tc_boundary", frame, libbpf.skb_ctx(ifindex))


def _run(net, prog, frame, ctx=None):
    from pyroute2 import netns
    netns.pushns(net.bsvc.name)
    try:
        fd = libbpf.obj_get(net.root.path / "progs" / prog)
        try:
            rc, out, _ = libbpf.test_run(fd, bytes(frame), ctx=ctx)
        finally:
            os.close(fd)
    finally:
        netns.popns()
    return rc, out


def test_the_port_of_what_comes_from_outside(net):
    """BPF_PROG_TEST_RUN on tc_boundary: which packets are the guest's. An
    echo reply by its identifier, an ICMP error by the port (or echo
    identifier) of the packet it quotes, in both families."""
    eth = Ether(dst=net.mac(net.bsvc, "ext"), src=net.mac(net.inet, "bsvc"))

    def quoted4(sport):
        return IP(src=SNAT, dst=INET) / UDP(sport=sport, dport=53)
    cases = [
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=0, id=1500), G1_MAC),
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=0, id=2500), G2_MAC),
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=0, id=5000), None),
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=8, id=1500), G1_MAC),
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=3, code=3) / quoted4(1600), G1_MAC),
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=11) / quoted4(3000), G2_MAC),
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=3, code=4) / quoted4(9000), None),
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=3, code=1) /
         IP(src=SNAT, dst=INET) / ICMP(type=8, id=2000), G1_MAC),
        (eth / IP(src=INET, dst=SNAT) / ICMP(type=3) / Raw(bytes(quoted4(1600))[:22]), None),  # cut
        (eth / IP(src=INET, dst=FLOATING) / ICMP(type=13), G2_MAC),     # any, to a whole address
        (eth / IP(src=INET, dst=FLOATING, frag=10) / Raw(b"x" * 16), G2_MAC),
        (eth / IP(src=INET, dst=SNAT, frag=10) / Raw(b"x" * 16), None),  # no port: no range
        (eth / IPv6(src=INET6, dst=FLOATING6) / ICMPv6EchoReply(id=7), G2_MAC),
        (eth / IPv6(src=INET6, dst=FLOATING6) / ICMPv6DestUnreach() /
         IPv6(src=FLOATING6, dst=INET6) / UDP(sport=1, dport=2), G2_MAC),
        (eth / IPv6(src=INET6, dst="2001:db8:198::21") / UDP(dport=53), None),
        (Ether(dst="02:00:00:00:00:99", src=eth.src) / IP(src=INET, dst=FLOATING) / UDP(dport=53),
         None),                                                     # for another host
        (eth / ARP(pdst=EXT_IP), None),
    ]
    for pkt, dmac in cases:
        rc, out = _tc_run(net, bytes(pkt))
        if dmac is None:
            assert (rc, out) == (TC_ACT_OK, bytes(pkt)), pkt.summary()
        else:
            assert rc == TC_ACT_REDIRECT, pkt.summary()
            assert out[74:80] == bytes.fromhex(dmac.replace(":", "")), pkt.summary()
            assert out[74 + 14:] == bytes(pkt)[14:], pkt.summary()    # the packet unchanged


def test_decap_bytes(net):
    """BPF_PROG_TEST_RUN on xdp_boundary: the inner packet, behind the outer
    frame's MACs, padding after the datagram cut."""
    inner = inner4(b"exact")
    frame = underlay_frame(net, inner)
    rc, out = _run(net, "xdp_boundary", frame + b"\0" * 6)
    assert rc == XDP_PASS
    assert out == frame[:12] + inner[12:]
    rc, out = _run(net, "xdp_boundary", underlay_frame(net, inner, vni=7))
    assert rc == XDP_DROP


SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 80))
s.listen(1)
print("ready", flush=True)
c, peer = s.accept()
data = b""
while len(data) < int(sys.argv[2]):
    chunk = c.recv(1 << 16)
    if not chunk:
        break
    data += chunk
c.sendall(data[::-1])
c.shutdown(socket.SHUT_WR)
print(peer[0], len(data), flush=True)
"""

CLIENT = """
import socket, sys
n = int(sys.argv[2])
data = bytes(i * 7 % 251 for i in range(n))
c = socket.create_connection((sys.argv[1], 80), timeout=20)
c.sendall(data)
back = b""
while True:
    chunk = c.recv(1 << 16)
    if not chunk:
        break
    back += chunk
print("ok" if back == data[::-1] else f"bad {len(back)}")
"""


def test_tcp_both_ways_through_a_userspace_peer(net):
    """A megabyte each way between inet and the floating IP, behind a
    userspace Geneve endpoint on the peer (tests/helpers/geneve_tap.py: a
    TAP, VNI 10 in, VNI 99 out). From outside, TCP arrives as GSO and
    checksum-partial skbs and is encapsulated by tc_boundary; back, it is
    decapsulated by xdp_boundary and routed by the boundary's kernel. The
    peer's kernel checks every checksum: the TAP offloads nothing."""
    p = net.peer
    relay = p.popen(PY, HELPERS / "geneve_tap.py", PEER_ADDR, BSVC_ADDR, 10, 99, "gst",
                    stdout=subprocess.PIPE, bufsize=0)
    try:
        _wait(relay, "ready")
        p.run("sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/gst/disable_ipv6")
        p.ip("link", "set", "gst", "address", G2_MAC, "mtu", 1500, "up")
        p.ip("addr", "add", FLOATING + "/32", "dev", "gst")
        p.ip("route", "add", "203.0.113.0/24", "dev", "gst", "src", FLOATING)
        p.ip("neigh", "add", INET, "lladdr", BSVC_MAC, "dev", "gst")
        net.xdectl("boundary", "set-nat", FLOATING, PEER_ADDR, "10", G2_MAC)
        size = 1 << 20
        server = p.popen(PY, "-c", SERVER, FLOATING, size, stdout=subprocess.PIPE, bufsize=0)
        try:
            _wait(server, "ready")
            before = net.stats()
            out = net.inet.run(PY, "-c", CLIENT, FLOATING, size, timeout=60).stdout.strip()
            assert out == "ok"
            assert _wait(server, " ") == f"{INET} {size}"
        finally:
            server.kill()
            server.wait()
        after = net.stats()
        assert after["encap_bytes"] - before["encap_bytes"] > size
        assert after["decap_bytes"] - before["decap_bytes"] > size
        drops = {k: after[k] - before[k] for k in after if k.startswith("drop_")}
        assert not any(drops.values()), drops
    finally:
        relay.kill()
        relay.wait()


def test_metrics(net):
    text = net.xdectl("metrics", "--once").stdout
    assert "# HELP xde_boundary_packets_total " in text
    assert re.search(r'^xde_boundary_packets_total\{dir="decap"\} [1-9]', text, re.M)
    assert re.search(r'^xde_boundary_drops_total\{reason="wrong_vni"\} [1-9]', text, re.M)
    assert re.search(r"^xde_boundary_up 1", text, re.M)
    assert re.search(r"^xde_boundary_nat_entries [1-9]", text, re.M)


def test_reload_swaps_the_boundary_programs(net):
    """reload: the boundary's XDP and filter run the newly loaded programs,
    and what comes from outside is still encapsulated."""
    old = {p.name: _prog_id(p) for p in (net.root.path / "progs").iterdir()}
    net.xdectl("reload")
    new = {p.name: _prog_id(p) for p in (net.root.path / "progs").iterdir()}
    assert new["xdp_boundary"] != old["xdp_boundary"]
    for dev in ("u1", "u2"):
        assert net.bsvc.xdp_prog_id(dev) == new["xdp_boundary"]
    assert net.bsvc.tc_prog_ids("ext") == [new["tc_boundary"]]
    before = net.stats()
    net.inet.run(PY, "-c", "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                 ".sendto(b'x', (sys.argv[1], 1500))", SNAT)
    assert net.stats()["encap"] == before["encap"] + 1


def test_down_and_unload_leave_nothing(net):
    """Last: down detaches everything and clears the state; up again works
    on the loaded root; unload (no --force) takes a boundary down too."""
    b = net.bsvc
    net.xdectl("boundary", "down")
    for dev in ("u1", "u2"):
        assert b.xdp_prog_id(dev) is None
        assert "tx-checksum-ip-generic: on" in b.run("ethtool", "-k", dev).stdout
        for path in (f"net/ipv6/conf/{dev}/accept_dad", f"net/ipv4/conf/{dev}/rp_filter"):
            assert _sysctl(b, path) == _sysctl(b, path.replace(dev, "default"))
    assert b.tc_filters("ext") == "" and "clsact" not in b.qdiscs("ext")
    assert net.json("boundary", "show") == {"up": False}
    assert net.json("boundary", "dump-nat") == []
    assert not any(net.stats().values())
    p = net.xdectl("boundary", "down")
    assert "not up" in p.stderr and p.returncode == 0
    line = one_error_line(net.xdectl("boundary", "set-nat", SNAT, PEER_ADDR, "10", G1_MAC,
                                     check=False))
    assert "not up" in line
    # refused with nothing changed: forwarding off, a missing device
    b.run("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
    line = one_error_line(net.xdectl("boundary", "up", "--underlay", "u1", "--underlay-addr",
                                     BSVC_ADDR, "--external", "ext", check=False))
    assert "net.ipv4.ip_forward=1" in line
    b.run("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    line = one_error_line(net.xdectl("boundary", "up", "--underlay", "u9", "--underlay-addr",
                                     BSVC_ADDR, "--external", "ext", check=False))
    assert "u9 not found" in line
    assert b.xdp_prog_id("u1") is None and b.tc_filters("ext") == ""
    # a root is a sled's or a boundary's
    net.xdectl(*create_args("xde0", underlay_addr=PEER_ADDR))
    line = one_error_line(net.xdectl("boundary", "up", "--underlay", "u2", "--underlay-addr",
                                     BSVC_ADDR, "--external", "ext", check=False))
    assert "holds ports (xde0)" in line
    net.xdectl("delete", "xde0")
    # up again (one underlay), then unload
    net.xdectl("boundary", "up", "--underlay", "u2", "--underlay-addr", BSVC_ADDR,
               "--external", "ext")
    assert b.xdp_prog_id("u2") is not None and b.xdp_prog_id("u1") is None
    net.xdectl("unload")
    assert b.xdp_prog_id("u2") is None and b.tc_filters("ext") == ""
    assert "tx-checksum-ip-generic: on" in b.run("ethtool", "-k", "u2").stdout
    assert not net.root.exists()


def _sysctl(ns, path):
    return ns.run("cat", f"/proc/sys/{path}").stdout.strip()


def test_the_labs_boundary(xlab):
    """The lab's bsvc runs boundary services with the guests' entries, and
    the internet host answers through its link (no sled's NAT needed)."""
    from xdelab import lab
    entries = [(e["external"], e["sled"], e["vni"], e["mac"])
               for e in xlab.xdectl_json("bsvc", "boundary", "dump-nat")]
    assert sorted(entries) == sorted((t, lab.SLEDS[s]["addr"], v, m)
                                     for _, t, (s, v, m) in lab.nat_entries())
    assert {e[0] for e in entries} == {"198.51.100.10:1024-2047", "[2001:db8:51::10]:1024-2047",
                                       lab.G2_FLOATING, lab.G2_FLOATING6}
    shown = xlab.xdectl_json("bsvc", "boundary", "show")
    assert shown["up"] and shown["underlays"] == ["u1", "u2"] and shown["external"] == "ext"
    xlab.must_ping("bsvc", lab.OUTSIDE, count=2)
    assert xlab.lab.tcp("bsvc", lab.OUTSIDE, lab.WHOAMI_PORT).startswith(lab.BSVC_EXT_IP + " ")
    # a boundary's root takes no port (it would take over the NICs' XDP)
    p = xlab.xdectl("bsvc", "create", "xde9", "--underlay", "u1", "--underlay", "u2",
                    "--mac", "a8:40:25:ff:00:09", "--ip", "10.0.0.9", "--gateway-mac", lab.GW_MAC,
                    "--gateway-ip", lab.GW_IP, "--boundary-services", lab.BSVC_ADDR,
                    "--boundary-vni", "99", "--vni", "10", "--underlay-addr", lab.BSVC_ADDR,
                    check=False)
    assert p.returncode == 2 and "runs boundary services" in p.stderr, p.stderr
    assert xlab.xdectl_json("bsvc", "list") == []


def _wait(proc, text, timeout=10, stream="stdout"):
    """The next line of proc's stream (unbuffered: bufsize=0) containing text."""
    s = getattr(proc, stream)
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        if select.select([s], [], [], 0.2)[0]:
            line = s.readline().decode(errors="replace")
            if not line:
                break
            seen += line
            if text in line:
                return line.strip()
    raise AssertionError(f"never saw {text!r}: {seen!r}")
