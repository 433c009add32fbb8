"""NAT end to end, in the session lab: guests reach the internet host (inet,
behind the boundary services datapath) from their external addresses, the
internet reaches a floating IP, SNAT pools run dry and fill again, and
external addresses change under traffic. Every check is made by real
clients (ping, TCP) and by what the internet host saw."""
import re
import threading
import time

import pytest

from xdectl import boundary, fw, nat, ports
from xdelab.lab import (G2_FLOATING, G2_FLOATING6, GUESTS, OUTSIDE, OUTSIDE6, SLEDS, WHOAMI_PORT,
                        nat_entries)

# per family: the internet host, g1's SNAT IP, g2's floating IP
FAMILY = {4: (OUTSIDE, GUESTS["g1"]["external"].snat_ips[0], G2_FLOATING),
          6: (OUTSIDE6, GUESTS["g1"]["external"].snat_ips[1], G2_FLOATING6)}
SNAT_IP = FAMILY[4][1]
families = pytest.mark.parametrize("version", (4, 6))


@pytest.fixture(autouse=True)
def lab(xlab):
    """The lab as built before and after each test: external addresses,
    boundary NAT table, rules, timeouts, flows."""
    xlab.reset()
    yield xlab
    for g in ("g1", "g2"):
        set_external(xlab, g, GUESTS[g]["external"])
    bsvc = xlab.lab.root("bsvc")
    with xlab.lab.inside("bsvc"):
        want = {t for _, t, _ in nat_entries()}
        for e in boundary.dump_nat(bsvc):
            if e["external"] not in want:
                boundary.clear_nat(bsvc, e["external"])
    xlab.reset()


def set_external(xlab, guest, ext):
    c = GUESTS[guest]
    with xlab.lab.inside(c["sled"]):
        return nat.set_external_ips(xlab.lab.root(c["sled"]), c["port"], ext)


def boundary_entry(xlab, target, guest):
    """bsvc's NAT table sends target (EXT_IP[:START-END]) to guest."""
    c = GUESTS[guest]
    with xlab.lab.inside("bsvc"):
        boundary.set_nat(xlab.lab.root("bsvc"), target, SLEDS[c["sled"]]["addr"], c["vni"],
                         c["mac"])


def stats(xlab, guest):
    c = GUESTS[guest]
    with xlab.lab.inside(c["sled"]):
        return ports.port_stats(xlab.lab.root(c["sled"]))[c["port"]]


def seen(xlab, guest, outside=OUTSIDE):
    """(address, port) inet's whoami server saw guest's TCP connection come
    from, or raises with what the client got."""
    got = xlab.lab.tcp(guest, outside, WHOAMI_PORT)
    m = re.fullmatch(r"(\S+) (\d+)", got)
    assert m, f"TCP from {guest} to the internet: {got}"
    return m.group(1), int(m.group(2))


@families
def test_two_guests_share_one_snat_ip(lab, version):
    """g1 (sled1, ports 1024-2047) and g2 (sled2, ports 2048-3071) share one
    SNAT IP; connections from both at once each arrive from it, with a
    source port of their own guest's range."""
    outside, snat_ip, _ = FAMILY[version]
    set_external(lab, "g2", nat.ExternalIPs((snat_ip,), 2048, 3071))
    boundary_entry(lab, f"[{snat_ip}]:2048-3071" if version == 6 else f"{snat_ip}:2048-3071",
                   "g2")
    got = {}

    def connect(g, i):
        got[g, i] = seen(lab, g, outside)
    threads = [threading.Thread(target=connect, args=(g, i)) for g in ("g1", "g2")
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 6, got
    for (g, _), (addr, port) in got.items():
        lo, hi = (1024, 2047) if g == "g1" else (2048, 3071)
        assert addr == snat_ip and lo <= port <= hi, (g, addr, port)
    assert len({p for _, p in got.values()}) == 6, f"a port given twice: {got}"


@families
def test_ping_through_snat(lab, version):
    outside, snat_ip, _ = FAMILY[version]
    before = stats(lab, "g1")
    lab.must_ping("g1", outside, count=3)
    after = stats(lab, "g1")
    assert after["snat_allocated"] == before["snat_allocated"] + 1   # one flow: one echo id
    assert after["nat_out"] - before["nat_out"] == 3
    assert after["nat_in"] - before["nat_in"] == 3
    with lab.lab.inside("sled1"):
        flows = fw.dump_flows(lab.lab.root("sled1"), "xde0")
    icmp = [f for f in flows if f["proto"].startswith("icmp") and outside in (f["src"], f["dst"])]
    assert len(icmp) == 2 and all(f["nat"] and f["nat"]["kind"] == "snat" for f in icmp), icmp
    ext, port = icmp[0]["nat"]["external"].rsplit(":", 1)
    assert ext == snat_ip and 1024 <= int(port) <= 2047


def test_internet_reaches_the_floating_ip(lab):
    """ping and TCP from the internet to g2's floating IPs (IPv4, IPv6);
    g2's server sees the internet host's own address; g2's connections
    out leave from them."""
    for version in (4, 6):
        lab.must_ping("inet", FAMILY[version][2], count=3)
        assert seen(lab, "g2", FAMILY[version][0])[0] == FAMILY[version][2]
    results = lab.lab.check_tcp()
    inbound = [r for r in results if "internet ->" in r[1]]
    assert len(inbound) == 2 and all(ok for ok, _, _ in inbound), results


def test_no_external_ip_is_a_counted_drop(lab):
    set_external(lab, "g1", nat.ExternalIPs())
    before = stats(lab, "g1")["drop_out_no_external_ip"]
    ok, out = lab.ping("g1", OUTSIDE, count=2)
    assert not ok and "0 received" in out, out
    assert stats(lab, "g1")["drop_out_no_external_ip"] - before == 2


def test_pool_exhaustion_and_ports_coming_back(lab):
    """A range of 4 ports: 4 connections (closed, so their flows hold the
    ports until the flow table lets them go), the 5th is dropped, counted.
    Once the closed flows expire, the ports are taken back."""
    set_external(lab, "g1", nat.ExternalIPs((SNAT_IP,), 1024, 1027))
    got = [seen(lab, "g1") for _ in range(4)]
    assert sorted(p for _, p in got) == [1024, 1025, 1026, 1027], got
    before = stats(lab, "g1")
    fifth = lab.lab.tcp("g1", OUTSIDE, WHOAMI_PORT)
    assert fifth.startswith("error"), fifth
    after = stats(lab, "g1")
    assert after["drop_out_nat_exhausted"] > before["drop_out_nat_exhausted"], after
    with lab.lab.inside("sled1"):
        fw.set_timeouts(lab.lab.root("sled1"), tcp_closed=1)
    time.sleep(2.5)
    addr, port = seen(lab, "g1")
    assert addr == SNAT_IP and 1024 <= port <= 1027
    assert stats(lab, "g1")["snat_reclaimed"] > after["snat_reclaimed"]


def test_set_external_ips_under_traffic(lab):
    """g2 pings the internet while its floating IP is replaced: the flow's
    old translation is dropped, the next packets leave from the new
    address, and the ping goes on."""
    new = "198.51.100.21"
    boundary_entry(lab, new, "g2")
    ping = lab.popen("g2", "ping", "-c", "30", "-i", "0.1", "-W", "1", OUTSIDE)
    time.sleep(1.0)
    dropped = set_external(lab, "g2", nat.ExternalIPs(floating_ips=(new,)))
    out, _ = ping.communicate(timeout=30)
    assert dropped >= 1, "the ping's translation should have been dropped"
    m = re.search(r"(\d+) received", out)
    assert m and int(m.group(1)) >= 27, out
    assert seen(lab, "g2")[0] == new


# A UDP client that reports what comes back: a datagram, the port
# unreachable error its kernel matched to the socket, or nothing.
UDP_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
try:
    s.send(b"x")
    s.recv(100)
    print("answer")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(f"error: {e}")
"""


@families
def test_icmp_errors_through_snat(lab, version):
    """A port unreachable from the internet, about a datagram g1 sent
    through its SNAT IP, reaches g1's socket: the error, and the packet it
    quotes, carry g1's own address and port again."""
    before = stats(lab, "g1")["nat_in"]
    got = lab.python("g1", UDP_PROBE, FAMILY[version][0], "9").stdout.strip()
    assert got == "refused", got
    assert stats(lab, "g1")["nat_in"] > before


@families
def test_icmp_errors_from_a_floating_ip(lab, version):
    """g2's port unreachable, about a datagram the internet sent to its
    floating IP, reaches the internet host's socket: sent from the floating
    IP, quoting it."""
    c = GUESTS["g2"]
    with lab.lab.inside(c["sled"]):
        rules = [r for r in lab.built_rules[c["sled"]]] + \
            ["dir=in action=allow priority=100 protocol=udp ports=9"]
        fw.set_rules(lab.lab.root(c["sled"]), c["port"], rules)
    got = lab.python("inet", UDP_PROBE, FAMILY[version][2], "9").stdout.strip()
    assert got == "refused", got
