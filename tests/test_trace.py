"""`xdectl trace` (docs/design.md, "Reload, apply and trace"): one frame
through the loaded programs with BPF_PROG_TEST_RUN -- the verdict, the
counters it moved and the output frame -- and the same frame through the live
datapath, which must agree.

The tests use the session's lab (docs/design.md, "The lab"), reset to
its built state before and after; xdectl runs in sled1's namespace through
`nsenter --net` (never `ip netns exec`, which hides bpffs).
"""
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from frames import (G1_IP, G1_IP6, G1_MAC, G2_IP, G2_IP6, G2_MAC, GW_IP, GW_MAC, U1_ADDR, U2_ADDR,
                    VNI, geneve, underlay_frame)
from lab_fixture import XDECTL, LabT

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


class TraceLab(LabT):
    """The session's lab, with trace's helpers for sled1's port xde0."""

    def xd(self, *args, check=True, host="sled1"):
        """xdectl on sled1's root, run in host's namespace."""
        return self.run(host, XDECTL, "--root", self.lab.root("sled1"), *args, check=check,
                        timeout=120)

    def trace(self, direction, frame, *extra):
        """`xdectl trace xde0 --dir D FRAME` as text."""
        return self.xd("trace", "xde0", "--dir", direction, frame, *extra).stdout

    def trace_json(self, direction, frame, *extra):
        return json.loads(self.xd("trace", "xde0", "--dir", direction, frame, *extra,
                                  "--json").stdout)

    def stats(self):
        return self.cli_stats("sled1")

    @contextlib.contextmanager
    def packet_socket(self, host, dev):
        """An AF_PACKET socket on dev in host's namespace (sees every frame)."""
        with self.lab.inside(host):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.bind((dev, 0))
            s.settimeout(0.2)
            yield s
        finally:
            s.close()


def receive(s, match, timeout=5):
    """The first incoming frame on s for which match(frame) is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] != PACKET_OUTGOING and match(data):
            return data
    raise AssertionError("the frame never arrived")


def wait_delta(get, before, key, want, timeout=5):
    """Poll get() until counter key rose by want; returns the final delta."""
    deadline = time.monotonic() + timeout
    while True:
        d = get().get(key, 0) - before.get(key, 0)
        if d >= want or time.monotonic() > deadline:
            return d
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tl(xlab):
    """The session's lab as built (next hops resolved, so encapsulated
    output has real MACs)."""
    xlab.reset()
    yield TraceLab.of(xlab)
    xlab.reset()


def scapy_expr(text):
    return text.replace("\n", "").strip()


SPOOF = scapy_expr(f"""Ether(src='{G1_MAC}', dst='{GW_MAC}')/IP(src='10.0.0.99', dst='{G2_IP}')
                       /UDP(sport=4000, dport=4001)/Raw(b'spoofed')""")


def test_spoofed_source_is_shot_like_the_live_datapath(tl):
    before = tl.stats()
    out = tl.trace("out", SPOOF)
    assert "TC_ACT_SHOT" in out, out
    assert "drop_out_spoof +1" in out, out
    assert "encap" not in out.split("output")[0], out
    after_trace = tl.stats()
    assert after_trace["drop_out_spoof"] - before["drop_out_spoof"] == 1
    assert after_trace["encap"] == before["encap"]

    # the same frame, sent by the guest for real
    frame = bytes(Ether(src=G1_MAC, dst=GW_MAC) / IP(src="10.0.0.99", dst=G2_IP) /
                  UDP(sport=4000, dport=4001) / Raw(b"spoofed"))
    with tl.packet_socket("g1", "xde0") as s:
        s.send(frame)
    assert wait_delta(tl.stats, after_trace, "drop_out_spoof", 1) == 1
    live = tl.stats()
    assert live["encap"] == after_trace["encap"]


def test_json_reports_verdict_counters_and_unchanged_output(tl):
    r = tl.trace_json("out", SPOOF)
    assert r["verdict"] == "TC_ACT_SHOT" and r["retval"] == 2
    assert r["program"] == "tc_port_out"
    assert r["counters"]["xde0"]["drop_out_spoof"] == 1
    assert r["counters"]["xde0"]["tx_packets"] == 1
    assert not r["output_changed"] and r["output"] == r["input"]


def test_hex_frame_is_the_same_as_the_scapy_expression(tl):
    frame = bytes(Ether(src=G1_MAC, dst=GW_MAC) / IP(src="10.0.0.99", dst=G2_IP) /
                  UDP(sport=4000, dport=4001) / Raw(b"spoofed"))
    r = tl.trace_json("out", frame.hex())
    assert r["input"] == frame.hex() == tl.trace_json("out", SPOOF)["input"]
    assert r["verdict"] == "TC_ACT_SHOT"
    spaced = " ".join(frame[i:i + 4].hex() for i in range(0, len(frame), 4))
    assert tl.trace_json("out", spaced)["input"] == frame.hex()


def test_gateway_arp_reply_is_the_live_one(tl):
    expr = (f"Ether(src='{G1_MAC}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{G1_MAC}', "
            f"psrc='{G1_IP}', pdst='{GW_IP}')")
    text = tl.trace("out", expr)
    assert "TC_ACT_REDIRECT" in text and "arp_replies +1" in text, text
    assert "back to the guest" in text, text
    r = tl.trace_json("out", expr)
    assert r["verdict"] == "TC_ACT_REDIRECT" and r["retval"] == 7
    out = Ether(bytes.fromhex(r["output"]))
    assert out.src == GW_MAC and out.dst == G1_MAC
    assert out[ARP].op == 2 and out[ARP].hwsrc == GW_MAC and out[ARP].psrc == GW_IP
    assert out[ARP].hwdst == G1_MAC and out[ARP].pdst == G1_IP
    assert "ARP is at a8:40:25:00:00:01 says 172.30.0.5" in r["output_summary"]

    # the guest asks for real: the reply it gets is the traced output, byte for byte
    request = bytes(Ether(src=G1_MAC, dst="ff:ff:ff:ff:ff:ff") /
                    ARP(op=1, hwsrc=G1_MAC, psrc=G1_IP, pdst=GW_IP))
    before = tl.stats()
    with tl.packet_socket("g1", "xde0") as s:
        s.send(request)
        reply = receive(s, lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02")
    assert reply == bytes.fromhex(r["output"])
    assert tl.stats()["arp_replies"] > before["arp_replies"]


def test_no_v2p_is_shot_and_counted(tl):
    r = tl.trace_json("out", f"Ether(src='{G1_MAC}',dst='{GW_MAC}')/IP(src='{G1_IP}',"
                             f"dst='10.0.0.77')/ICMP()")
    assert r["verdict"] == "TC_ACT_SHOT"
    assert r["counters"]["xde0"].get("drop_out_no_v2p") == 1
    assert "encap" not in r["counters"]["xde0"]


def test_outbound_encapsulation_decoded(tl):
    # resolve sled1's next hops through both switches: the flow may hash to
    # either, and the trace names the NIC only once the FIB has its MAC
    for sw in (1, 2):
        tl.run("sled1", "ping", "-6", "-c", "1", "-w", "5", f"fd10:1:{sw}::2")
    r = tl.trace_json("out", f"Ether(src='{G1_MAC}',dst='{GW_MAC}')/IP(src='{G1_IP}',"
                             f"dst='{G2_IP}')/UDP(sport=45353,dport=45354)/Raw(b'over')")
    assert r["verdict"] == "TC_ACT_REDIRECT"
    assert r["counters"]["xde0"]["encap"] == 1
    out = Ether(bytes.fromhex(r["output"]))
    assert out[IPv6].src == U1_ADDR and out[IPv6].dst == U2_ADDR
    assert out[UDP].dport == 6081
    assert "GENEVE" in r["output_summary"] and f"{G1_IP}:45353 > {G2_IP}:45354" in r["output_summary"]
    assert any("underlay via u" in n for n in r["notes"]), r["notes"]


def test_firewall_deny_names_the_rule(tl):
    rid = tl.xd("add-fw-rule", "xde0", "--dir", "out", "--action", "deny", "--priority", "5",
                    "--hosts", f"ip={G2_IP}", "--protocol", "udp", "--ports", "7777").stdout.strip()
    try:
        text = tl.trace("out", f"Ether(src='{G1_MAC}',dst='{GW_MAC}')/IP(src='{G1_IP}',"
                               f"dst='{G2_IP}')/UDP(sport=7000,dport=7777)")
        assert "TC_ACT_SHOT" in text and "drop_out_firewall +1" in text, text
        assert f"firewall rule {rid} (dir=out action=deny" in text and "hits +1" in text, text
    finally:
        tl.xd("rm-fw-rule", "xde0", rid, "--dir", "out")


def test_ipv6_frames_traced(tl):
    """An IPv6 flow from g1 to g2 is encapsulated (its inner addresses in
    the summary), and an icmp6 rule for g2's IPv6 address denies an echo
    request by name."""
    for sw in (1, 2):
        tl.run("sled1", "ping", "-6", "-c", "1", "-w", "5", f"fd10:1:{sw}::2")
    r = tl.trace_json("out", f"Ether(src='{G1_MAC}',dst='{GW_MAC}')/IPv6(src='{G1_IP6}',"
                             f"dst='{G2_IP6}')/UDP(sport=45355,dport=45356)/Raw(b'six')")
    assert r["verdict"] == "TC_ACT_REDIRECT" and r["counters"]["xde0"]["encap"] == 1, r
    out = Ether(bytes.fromhex(r["output"]))
    assert out[IPv6].src == U1_ADDR and out[IPv6].dst == U2_ADDR and out[UDP].dport == 6081
    assert f"{G1_IP6}" in r["output_summary"] and f"{G2_IP6}" in r["output_summary"], r
    rid = tl.xd("add-fw-rule", "xde0", "--dir", "out", "--action", "deny", "--priority", "5",
                "--hosts", f"ip={G2_IP6}", "--protocol", "icmp6:128").stdout.strip()
    try:
        text = tl.trace("out", f"Ether(src='{G1_MAC}',dst='{GW_MAC}')/IPv6(src='{G1_IP6}',"
                               f"dst='{G2_IP6}')/ICMPv6EchoRequest(id=9)")
        assert "TC_ACT_SHOT" in text and "drop_out_firewall +1" in text, text
        assert f"firewall rule {rid} (dir=out action=deny" in text, text
    finally:
        tl.xd("rm-fw-rule", "xde0", rid, "--dir", "out")


def inbound_inner(payload):
    return bytes(Ether(src=G2_MAC, dst=G1_MAC) / IP(src=G2_IP, dst=G1_IP, id=7) /
                 ICMP(type=8, id=0x5a5a, seq=1) / Raw(payload))


def test_inbound_geneve_redirected_with_the_inner_frame(tl):
    inner = inbound_inner(b"trace in")
    r = tl.trace_json("in", inner.hex())
    assert r["program"] == "xdp_underlay"
    assert r["verdict"] == "XDP_REDIRECT" and r["retval"] == 4
    assert any(f"Geneve VNI {VNI} from {U2_ADDR} to {U1_ADDR}" in n for n in r["notes"]), r["notes"]
    assert any("into port xde0" in n for n in r["notes"]), r["notes"]
    assert not any("without ingress_ifindex" in n for n in r["notes"]), r["notes"]
    c = r["counters"]["xde0"]
    assert c["decap"] == 1 and c["rx_packets"] == 1
    # decapsulated, the source MAC replaced by the gateway's
    assert bytes.fromhex(r["output"]) == inner[:6] + bytes.fromhex(GW_MAC.replace(":", "")) + inner[12:]
    text = tl.trace("in", inner.hex())
    assert "XDP_REDIRECT" in text and "decap +1" in text, text


def test_nat_is_traced_both_ways(tl):
    """g1's UDP to the internet leaves from its SNAT IP and a port of its
    range; the reply to that address and port reaches g1's own."""
    from xdelab.lab import GUESTS
    snat = GUESTS["g1"]["external"].snat_ips[0]
    r = tl.trace_json("out", f"Ether(src='{G1_MAC}',dst='{GW_MAC}')/IP(src='{G1_IP}',"
                             f"dst='198.18.0.7')/UDP(sport=45355,dport=53)/Raw(b'nat')")
    assert r["verdict"] == "TC_ACT_REDIRECT" and r["counters"]["xde0"]["nat_out"] == 1, r
    note = [n for n in r["notes"] if n.startswith("NAT")]
    m = re.fullmatch(rf"NAT \(outbound\): src {G1_IP}:45355 -> {snat}:(\d+)", note[0] if note else "")
    assert m and 1024 <= int(m.group(1)) <= 2047, r["notes"]
    reply = bytes(Ether(src="a8:40:25:77:77:77", dst=G1_MAC) / IP(src="198.18.0.7", dst=snat) /
                  UDP(sport=53, dport=int(m.group(1))) / Raw(b"back"))
    r = tl.trace_json("in", reply.hex(), "--external")
    assert r["verdict"] == "XDP_REDIRECT", r
    assert f"NAT (inbound): dst {snat}:{m.group(1)} -> {G1_IP}:45355" in r["notes"], r["notes"]


def test_external_option_meets_the_inbound_firewall(tl):
    """UDP from the VPC is allowed in by create's default rules (hosts
    vni=10); with Oxide's External option (traffic from outside the VPC,
    which belongs to no VNI) it is not, and the trace says so."""
    inner = bytes(Ether(src=G2_MAC, dst=G1_MAC) / IP(src=G2_IP, dst=G1_IP) /
                  UDP(sport=41000, dport=41001) / Raw(b"ext"))
    r = tl.trace_json("in", inner.hex(), "--external")
    assert any("option External" in n for n in r["notes"]), r["notes"]
    assert r["verdict"] == "XDP_DROP"
    assert r["counters"]["xde0"].get("drop_in_firewall") == 1
    text = tl.trace("in", inner.hex(), "--hexdump")
    assert "XDP_REDIRECT" in text and "decap +1" in text, text
    assert re.search(r"^0000  ", text, re.M), text


def underlay(inner, dst_mac, ver=0):
    return underlay_frame(geneve(ver=ver) + inner, dst_mac, "02:00:00:00:00:99")


def test_full_underlay_frame_is_run_as_given_and_matches_the_wire(tl):
    u1_mac = tl.link("sled1", "u1")["address"]
    inner = inbound_inner(b"trace wire " + secrets.token_hex(4).encode())
    frame = underlay(inner, u1_mac)
    r = tl.trace_json("in", frame.hex())
    assert r["verdict"] == "XDP_REDIRECT"
    assert r["input"] == frame.hex(), "an underlay frame must not be encapsulated again"
    assert any("underlay frame" in n for n in r["notes"]), r["notes"]

    # the same frame on the wire: sw1 sends it to sled1's u1, g1 receives
    # exactly the traced output
    before = tl.stats()
    with tl.packet_socket("g1", "xde0") as g1, tl.packet_socket("sw1", "sled1") as sw:
        sw.send(frame)
        got = receive(g1, lambda f: inner[-20:] in f)
    assert got == bytes.fromhex(r["output"])
    assert wait_delta(tl.stats, before, "decap", 1) == 1


def test_malformed_geneve_dropped_with_its_global_reason(tl):
    u1_mac = tl.link("sled1", "u1")["address"]
    r = tl.trace_json("in", underlay(inbound_inner(b"v1"), u1_mac, ver=1).hex())
    assert r["verdict"] == "XDP_DROP"
    assert r["counters"]["global"] == {"drop_in_malformed_version": 1}
    assert "xde0" not in r["counters"]


def test_not_for_us_passes_to_the_host(tl):
    """IPv6 to the host's underlay address but not Geneve: an underlay frame
    (run as given), which XDP passes to the host stack untouched."""
    frame = bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") /
                  IPv6(src=U2_ADDR, dst=U1_ADDR) / UDP(sport=1, dport=53) / Raw(b"dns"))
    r = tl.trace_json("in", frame.hex())
    assert r["input"] == frame.hex()
    assert r["verdict"] == "XDP_PASS"
    assert r["counters"]["global"] == {"passed_to_host": 1}
    assert not r["output_changed"]


def test_as_is_runs_any_frame_unencapsulated(tl):
    """An IPv4 frame on the underlay, not for a passthrough port: --as-is
    runs it as the NIC would receive it (passed to the host); without it,
    the frame is taken for an inner frame and encapsulated."""
    frame = bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") /
                  IP(src="192.0.2.9", dst="192.0.2.10") / UDP(sport=1, dport=2))
    r = tl.trace_json("in", frame.hex(), "--as-is")
    assert r["input"] == frame.hex() and r["verdict"] == "XDP_PASS"
    wrapped = tl.trace_json("in", frame.hex())
    assert len(bytes.fromhex(wrapped["input"])) == len(frame) + 70
    assert wrapped["verdict"] == "XDP_DROP"
    assert wrapped["counters"]["global"] == {"drop_in_no_port": 1}


def test_errors_are_one_line(tl):
    for args, words in ((("trace", "xde0", "--dir", "out", "notaframe("), "neither hex nor"),
                        (("trace", "nope", "--dir", "out", "00" * 20), "no port nope"),
                        (("trace", "xde0", "--dir", "up", "00" * 20), "is not in or out"),
                        (("trace", "xde0", "--dir", "out", "0011"), "shorter than an Ethernet")):
        p = tl.xd(*args, check=False)
        assert p.returncode == 2, (args, p.returncode, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_trace_outside_the_ports_namespace_is_refused(tl):
    """The ctx's ifindex is the port's in sled1's namespace; from another
    namespace the run would hit another device, so trace refuses."""
    p = tl.xd("trace", "xde0", "--dir", "out", SPOOF, check=False, host="sw1")
    assert p.returncode == 2 and "not in this network namespace" in p.stderr, p.stderr


def test_help_says_the_run_is_real(tl):
    p = subprocess.run([XDECTL, "trace", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="200"))
    assert p.returncode == 0
    assert "counters" in p.stdout and "flow table" in p.stdout
