"""Dual-stack guests that configure themselves, end to end in the session's
lab (docs/design.md, "The lab"): real clients against the virtual gateway
the datapath answers for.

- ISC dhclient -4 and -6 in each guest got the port's addresses and routes
  (as built, and again from nothing, and again from kept leases, as after a
  reboot), and the gateway's reply counters show it; a unicast DHCPv4
  renewal goes unanswered, the broadcast rebinding is answered; a guest
  that gets nothing is named with what it lacks;
- rdisc6 sees the router advertisement as specified; the guest kernel's own
  router and neighbour discovery took the default route and resolved the
  gateway;
- ping and TCP over IPv6 between sleds and on one sled; the VNI 11 guest
  (g3) cannot be reached from VNI 10 nor reach it, and the drop is counted
  where it happens;
- spoofed IPv6 sources and NDP the gateway does not answer are dropped and
  counted;
- tshark decodes every gateway reply (DHCP, DHCPv6, router and neighbour
  advertisements, echo replies) without a malformed packet or a bad
  checksum.

Every test leaves the lab as built: a guest whose clients it restarts is
configured again by them, V2P and rules go back through xlab.reset(), and
the extra port and namespace of the same-sled tests are removed by their
fixture.
"""
import json
import re
import subprocess
import time
from datetime import datetime, timezone

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA,
                                ICMPv6ND_Redirect, ICMPv6ND_RS, ICMPv6NDOptSrcLLAddr, IPv6)
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

from frames import BSVC_ADDR, G1_MAC, GW_IP, GW_LL, GW_MAC, U1_ADDR, U2_ADDR
from lab_fixture import XDECTL
from xdectl.errors import XdeError
from xdelab import guest as guests
from xdelab.lab import GUESTS, OTHER_VNI, SUBNET, SUBNET6, VNI

G1, G2, G3 = GUESTS["g1"], GUESTS["g2"], GUESTS["g3"]
SCRIPT = guests.SCRIPT
INFINITE = 4294967295
LEASE_S, RA_LIFETIME_S = 86400, 9000
# option 121 as the gateway sends it: the gateway on-link, the default via it
ROUTES_121 = [32, *map(int, GW_IP.split(".")), 0, 0, 0, 0, 0, *map(int, GW_IP.split("."))]
GW_DUID = "0:3:0:1:" + ":".join(f"{int(b, 16):x}" for b in GW_MAC.split(":"))  # DUID-LL


def stats(t, guest):
    """A guest's port counters (guest: a name in GUESTS, or a config)."""
    g = GUESTS[guest] if isinstance(guest, str) else guest
    return t.port_stats(g["sled"], g["port"])


def delta(after, before, *keys):
    return {k: after[k] - before[k] for k in keys}


def port_config(t, g):
    ports = {p["name"]: p for p in t.xdectl_json(g["sled"], "list")}
    return ports[g["port"]]


def addrs(t, guest, dev):
    """{family: [addr_info]} of dev in guest (global IPv6 only)."""
    out = {"inet": [], "inet6": []}
    for link in json.loads(t.ip(guest, "-j", "addr", "show", "dev", dev).stdout):
        for a in link.get("addr_info", []):
            if "local" in a and (a["family"] == "inet" or a.get("scope") == "global"):
                out[a["family"]].append(a)
    return out


def routes(t, guest, dev, family):
    return json.loads(t.ip(guest, "-j", f"-{family}", "route", "show", "dev", dev).stdout)


def lease(t, guest, family):
    return guests.files(t.lab.state, guest, family)["leases"].read_text()


def configured(t, guest, g):
    return guests.missing(guests.state(t.ns(guest), g["port"]), g["ip"], g["ip6"],
                          GW_IP, GW_LL) == []


def ensure_configured(t, guest, g):
    """Put a guest back as built: its clients running and its addresses
    and routes there (started again if a test stopped them)."""
    running = {f for f in (4, 6) if guests.files(t.lab.state, guest, f)["pid"].exists()}
    want = {f for f, a in ((4, g["ip"]), (6, g["ip6"])) if a}
    if running != want or not configured(t, guest, g):
        t.lab.stop_dhcp(guest)
        t.lab.configure_guests({guest: g})


# --- as built ---------------------------------------------------------------------

@pytest.mark.parametrize("guest", ["g1", "g2", "g3"])
def test_guest_configured_itself_from_the_gateway(xlab, guest):
    """Each guest has exactly what its port says, from its own clients:
    the port's IPv4 address as a /32 for as long as the 86,400 s lease
    runs, option 121's
    routes (the gateway on-link, the default via it), the port's IPv6
    address as a /128 for ever, and the IPv6 default route via the
    gateway's link-local address from the router advertisement (router
    lifetime 9,000 s). g3's port has no IPv4: no address, no route."""
    g = GUESTS[guest]
    port = port_config(xlab, g)
    assert (port["ip"], port["ip6"], port["vni"]) == (g["ip"], g["ip6"], g["vni"]), port
    a = addrs(xlab, guest, g["port"])
    if g["ip"]:
        assert [(x["local"], x["prefixlen"]) for x in a["inet"]] == [(g["ip"], 32)], a
        # the address lives as long as the lease: until its expiry time
        text = lease(xlab, guest, 4)
        expire = re.findall(r"^\s*expire \d (\S+ \S+);", text, re.M)   # the last lease's
        assert expire, text
        left = (datetime.strptime(expire[-1], "%Y/%m/%d %H:%M:%S").replace(tzinfo=timezone.utc)
                - datetime.now(timezone.utc)).total_seconds()
        assert 0 < a["inet"][0]["valid_life_time"] <= LEASE_S, a
        assert abs(a["inet"][0]["valid_life_time"] - left) <= 5, (a, text)
        r4 = {(r["dst"], r.get("gateway"), r.get("scope")) for r in routes(xlab, guest, g["port"], 4)}
        assert r4 == {(GW_IP, None, "link"), ("default", GW_IP, None)}, r4
        for line in (f"fixed-address {g['ip']};", "option subnet-mask 255.255.255.255;",
                     f"option routers {GW_IP};", f"option dhcp-lease-time {LEASE_S};",
                     f"option dhcp-server-identifier {GW_IP};",
                     f"option rfc3442-classless-static-routes {','.join(map(str, ROUTES_121))};"):
            assert line in text, text
        # nothing configured, nothing offered
        assert "domain-name-servers" not in text and "host-name" not in text, text
    else:
        assert a["inet"] == [] and routes(xlab, guest, g["port"], 4) == []
        assert not guests.files(xlab.lab.state, guest, 4)["pid"].exists()
    assert [(x["local"], x["prefixlen"]) for x in a["inet6"]] == [(g["ip6"], 128)], a
    assert a["inet6"][0]["valid_life_time"] == INFINITE, a
    assert a["inet6"][0]["preferred_life_time"] == INFINITE, a
    text = lease(xlab, guest, 6)
    assert f"iaaddr {g['ip6']} {{" in text and f"max-life {INFINITE};" in text, text
    assert f"option dhcp6.server-id {GW_DUID};" in text, text
    assert "dhcp6.name-servers" not in text, text
    default6 = [r for r in routes(xlab, guest, g["port"], 6) if r["dst"] == "default"]
    assert [(r["gateway"], r["protocol"]) for r in default6] == [(GW_LL, "ra")], default6
    assert 0 < default6[0]["expires"] <= RA_LIFETIME_S, default6
    # the replies were counted (the counters keep what other modules sent
    # the port too: test_dhclient_from_nothing checks the exact deltas)
    st = stats(xlab, guest)
    assert st["dhcp6_replies"] >= 2 and st["dhcp4_replies"] >= (2 if g["ip"] else 0), st


def test_dhclient_script_passes_shellcheck():
    p = subprocess.run(["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("env,want", [
    ({"reason": "BOUND", "new_ip_address": "10.0.0.1", "new_subnet_mask": "255.255.255.255",
      "new_dhcp_lease_time": "86400", "new_routers": "172.30.0.5",
      "new_rfc3442_classless_static_routes": "32 172 30 0 5 0 0 0 0 0 172 30 0 5"},
     ["-4 addr replace 10.0.0.1/32 dev eth9 valid_lft 86400 preferred_lft 86400",
      "-4 route replace 172.30.0.5/32 dev eth9 scope link",
      "-4 route replace 0.0.0.0/0 via 172.30.0.5 dev eth9"]),
    ({"reason": "REBOOT", "new_ip_address": "10.0.0.1", "new_subnet_mask": "255.255.255.0",
      "new_dhcp_lease_time": "600",
      "new_rfc3442_classless_static_routes": "24 192 168 7 10 0 0 9 0 10 0 0 9"},
     ["-4 addr replace 10.0.0.1/24 dev eth9 valid_lft 600 preferred_lft 600",
      "-4 route replace 192.168.7.0/24 via 10.0.0.9 dev eth9",
      "-4 route replace 0.0.0.0/0 via 10.0.0.9 dev eth9"]),
    ({"reason": "BOUND", "new_ip_address": "10.0.0.1", "new_subnet_mask": "255.255.255.255",
      "new_dhcp_lease_time": "86400", "new_routers": "172.30.0.5 172.30.0.6"},
     ["-4 addr replace 10.0.0.1/32 dev eth9 valid_lft 86400 preferred_lft 86400",
      "-4 route replace 172.30.0.5 dev eth9 scope link",
      "-4 route replace default via 172.30.0.5 dev eth9"]),
    ({"reason": "BOUND6", "new_ip6_address": "fd00:10::1", "new_ip6_prefixlen": "128",
      "new_max_life": "4294967295", "new_preferred_life": "4294967295"},
     ["-6 addr replace fd00:10::1/128 dev eth9 valid_lft forever preferred_lft forever"]),
    ({"reason": "STOP6", "old_ip6_address": "fd00:10::1"},
     ["-6 addr del fd00:10::1/128 dev eth9"]),
], ids=["option121", "option121-subnet", "routers-only", "bound6", "stop6"])
def test_dhclient_script_commands(tmp_path, env, want):
    """The lab's dhclient script turns a lease into these ip commands (run
    against an `ip` that only records them)."""
    log = tmp_path / "ip.log"
    fake = tmp_path / "ip"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    p = subprocess.run([str(SCRIPT)], env={"PATH": str(tmp_path), "interface": "eth9", **env},
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    assert log.read_text().splitlines() == want


def test_configure_names_what_did_not_arrive(xlab):
    """When a guest is not configured in time, the lab says which guest
    lacks what, with the end of its client's log. Here g3, whose port has
    no IPv4, runs dhclient -4 anyway: the gateway answers none of it and
    counts each DISCOVER as a dhcp4 drop."""
    before = stats(xlab, "g3")
    try:
        with pytest.raises(XdeError) as e:
            xlab.lab.configure_guests({"g3": {**G3, "ip": "10.0.0.3", "ip6": None}}, timeout=4)
    finally:
        xlab.lab.stop_dhcp("g3", 4)
    msg = str(e.value)
    assert msg.startswith("lab: guests not configured after 4 s: g3: no DHCPv4 address "
                          f"10.0.0.3/32, no IPv4 default route via {GW_IP} [dhclient -4: "), msg
    assert "DHCPDISCOVER on xde3 to 255.255.255.255 port 67" in msg, msg
    after = stats(xlab, "g3")
    assert after["drop_out_dhcp4"] - before["drop_out_dhcp4"] >= 2, (before, after)
    assert after["dhcp4_replies"] == before["dhcp4_replies"] == 0
    assert configured(xlab, "g3", G3)
    assert guests.files(xlab.lab.state, "g3", 6)["pid"].exists()


def test_dhcp4_renewal_unanswered_rebinding_answered(xlab, tmp_path):
    """What keeps a lease past its renewal time: the gateway does not answer
    a renewal (a REQUEST unicast to it: dropped as dhcp4), and answers the
    rebinding a client broadcasts next with an ACK of the port's address."""
    def request(dst_mac, dst_ip, xid):
        return bytes(Ether(src=G1_MAC, dst=dst_mac) / IP(src=G1["ip"], dst=dst_ip) /
                     UDP(sport=68, dport=67) /
                     BOOTP(op=1, xid=xid, ciaddr=G1["ip"], chaddr=bytes.fromhex(
                         G1_MAC.replace(":", "")) + bytes(10)) /
                     DHCP(options=[("message-type", "request"), "end"]))
    pcap = tmp_path / "rebind.pcap"
    before = stats(xlab, "g1")
    with xlab.capture("g1", "xde0", pcap, "udp port 68"):
        xlab.send_frames("g1", "xde0", [request(GW_MAC, GW_IP, 0x1111)])
        time.sleep(0.2)
        mid = stats(xlab, "g1")
        xlab.send_frames("g1", "xde0", [request("ff:ff:ff:ff:ff:ff", "255.255.255.255", 0x2222)])
    after = stats(xlab, "g1")
    keys = ("drop_out_dhcp4", "dhcp4_replies", "drop_out_spoof")
    assert delta(mid, before, *keys) == {"drop_out_dhcp4": 1, "dhcp4_replies": 0,
                                         "drop_out_spoof": 0}
    assert delta(after, mid, *keys) == {"drop_out_dhcp4": 0, "dhcp4_replies": 1,
                                        "drop_out_spoof": 0}
    replies = [p for p in rdpcap(str(pcap)) if p.haslayer(BOOTP) and p[BOOTP].op == 2]
    assert [p[BOOTP].xid for p in replies] == [0x2222], replies
    opts = dict(o for o in replies[0][DHCP].options if isinstance(o, tuple))
    assert opts["message-type"] == 5 and replies[0][BOOTP].yiaddr == G1["ip"], opts
    assert opts["lease_time"] == LEASE_S and opts["server_id"] == GW_IP, opts


# --- g1 again from nothing, under a capture -------------------------------------

@pytest.fixture(scope="module")
def redone(xlab, tmp_path_factory):
    """g1's clients stopped, its leases and addresses removed, then started
    again while g1's interface is captured; meanwhile rdisc6 solicits an
    advertisement (with g1's IPv6 default route deleted first: the
    guest's kernel must take it back from that advertisement), g1's
    neighbours are flushed and it pings the gateway (IPv4 and IPv6).
    Afterwards g1 is as built."""
    pcap = tmp_path_factory.mktemp("dualstack") / "g1.pcap"
    out = {"pcap": pcap}
    try:
        xlab.lab.stop_dhcp("g1")
        xlab.ip("g1", "-4", "addr", "flush", "dev", "xde0")
        xlab.ip("g1", "-4", "route", "flush", "dev", "xde0")
        xlab.ip("g1", "-6", "addr", "flush", "dev", "xde0", "scope", "global")
        xlab.ip("g1", "neigh", "flush", "dev", "xde0")
        assert not configured(xlab, "g1", G1)
        out["before"] = stats(xlab, "g1")
        with xlab.capture("g1", "xde0", pcap):
            t0 = time.monotonic()
            xlab.lab.configure_guests({"g1": G1})
            out["took"] = time.monotonic() - t0
            out["after_dhcp"] = stats(xlab, "g1")
            xlab.ip("g1", "-6", "route", "del", "default", "via", GW_LL, "dev", "xde0")
            out["route6_gone"] = guests.state(xlab.ns("g1"), "xde0")["route6_default"]
            out["rdisc6"] = xlab.run("g1", "rdisc6", "-1", "-w", "1000", "xde0", check=False)
            out["route6_back"] = guests.state(xlab.ns("g1"), "xde0")["route6_default"]
            xlab.ip("g1", "neigh", "flush", "dev", "xde0")
            out["after_rdisc6"] = stats(xlab, "g1")
            out["ping6"] = xlab.ping("g1", f"{GW_LL}%xde0", count=2)
            out["ping4"] = xlab.ping("g1", GW_IP, count=2)
            out["neigh6"] = xlab.ip("g1", "-6", "neigh", "show", GW_LL, "dev", "xde0").stdout
        out["after"] = stats(xlab, "g1")
        out["log4"] = (xlab.lab.state / "dhclient-g1-4.log").read_text()
        out["log6"] = (xlab.lab.state / "dhclient-g1-6.log").read_text()
        yield out
    finally:
        ensure_configured(xlab, "g1", G1)


def test_dhclient_from_nothing(redone):
    """With no lease and no address, dhclient -4 goes through DISCOVER,
    OFFER, REQUEST, ACK and dhclient -6 through Solicit, Advertise,
    Request, Reply: the gateway answers each once (its reply counters rise
    by two per family, nothing it is sent is dropped), and g1 has its
    addresses and routes again."""
    d = delta(redone["after_dhcp"], redone["before"], "dhcp4_replies", "dhcp6_replies",
              "drop_out_dhcp4", "drop_out_dhcp6")
    assert d == {"dhcp4_replies": 2, "dhcp6_replies": 2, "drop_out_dhcp4": 0,
                 "drop_out_dhcp6": 0}, d
    log4, log6 = redone["log4"], redone["log6"]
    assert f"DHCPOFFER of {G1['ip']} from {GW_IP}" in log4, log4
    assert f"DHCPACK of {G1['ip']} from {GW_IP}" in log4, log4
    assert f"RCV: Advertise message on xde0 from {GW_LL}" in log6, log6
    assert f"RCV: Reply message on xde0 from {GW_LL}" in log6, log6
    assert f"IAADDR {G1['ip6']}" in log6, log6
    print(f"g1 configured itself in {redone['took']:.1f} s")


def test_rdisc6_sees_the_advertisement_as_specified(xlab, redone):
    """The router advertisement: managed (M) set, other-config (O) clear,
    router lifetime 9,000 s, the port's MTU, the gateway's MAC, no prefix
    (addresses come from DHCPv6), from the gateway's link-local address.
    The guest kernel took its default route back from it."""
    p = redone["rdisc6"]
    assert p.returncode == 0, p.stdout + p.stderr
    text = p.stdout
    fields = dict((k.strip(), v.strip()) for k, v in
                  (line.split(":", 1) for line in text.splitlines() if ":" in line
                   and not line.startswith(("Soliciting", " from"))))
    mtu = port_config(xlab, G1)["mtu"]
    assert fields["Stateful address conf."] == "Yes", text
    assert fields["Stateful other conf."] == "No", text
    assert re.match(rf"{RA_LIFETIME_S} \(0x{RA_LIFETIME_S:08x}\) seconds$",
                    fields["Router lifetime"]), text
    assert re.match(rf"{mtu} bytes \(valid\)$", fields["MTU"]), text
    assert fields["Source link-layer address"].lower() == GW_MAC, text
    assert "Prefix" not in text, text
    assert f" from {GW_LL}" in text, text
    assert redone["route6_gone"] == [] and redone["route6_back"] == [GW_LL], redone
    assert redone["after_rdisc6"]["ndp_replies"] > redone["after_dhcp"]["ndp_replies"]


def test_guest_kernel_resolved_the_gateway(redone):
    """After a flush, g1's own neighbour discovery resolves the gateway's
    link-local address to the gateway's MAC (a router), answered by the
    datapath; echo to it works."""
    ok, out = redone["ping6"]
    assert ok, out
    assert redone["ping4"][0], redone["ping4"][1]
    neigh = redone["neigh6"].lower()
    assert f"lladdr {GW_MAC} router" in neigh, neigh
    assert re.search(r"\b(reachable|stale|delay|probe)\b", neigh), neigh
    assert redone["after"]["ndp_replies"] > redone["after_rdisc6"]["ndp_replies"]
    assert redone["after"]["icmp_replies"] - redone["after_rdisc6"]["icmp_replies"] == 4


TSHARK_PREFS = ["-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
                "-o", "tcp.check_checksum:TRUE"]


def tshark(pcap, *args):
    p = subprocess.run(["tshark", "-n", "-r", str(pcap), *TSHARK_PREFS, *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_gateway_replies_decode_cleanly(redone):
    """Every frame the gateway sent g1 during the redo, decoded by tshark
    with checksum validation on: OFFER, ACK, Advertise, Reply, router and
    neighbour advertisements, echo replies; no malformed packet, no bad
    checksum, no error, and each checksum was checked and found good."""
    pcap = redone["pcap"]
    flt = f"eth.src == {GW_MAC}"
    rows = tshark(pcap, "-Y", flt, "-T", "fields", "-e", "_ws.col.Protocol",
                  "-e", "_ws.col.Info").splitlines()
    info = "\n".join(rows)
    kinds = {
        "DHCP Offer": r"^DHCP\tDHCP Offer",
        "DHCP ACK": r"^DHCP\tDHCP ACK",
        "DHCPv6 Advertise": r"^DHCPv6\tAdvertise",
        "DHCPv6 Reply": r"^DHCPv6\tReply",
        "router advertisement": r"^ICMPv6\tRouter Advertisement from " + GW_MAC,
        "neighbour advertisement": r"^ICMPv6\tNeighbor Advertisement " + GW_LL + r" \(rtr",
        "echo reply (IPv6)": r"^ICMPv6\tEcho \(ping\) reply",
        "echo reply (IPv4)": r"^ICMP\tEcho \(ping\) reply",
    }
    for what, rx in kinds.items():
        assert re.search(rx, info, re.M), f"no {what} among the gateway's frames:\n{info}"
    assert len(re.findall(r"^DHCP\t", info, re.M)) == 2, info
    assert len(re.findall(r"^DHCPv6\t", info, re.M)) == 2, info
    full = tshark(pcap, "-V", "-Y", flt)
    frames = full.count("\nFrame ") + full.startswith("Frame ")
    assert frames == len(rows) >= 10, (frames, len(rows))
    for bad in ("Malformed", "[Checksum Status: Bad]", "Severity level: Error",
                "[Expert Info (Error"):
        assert bad not in full, f"{bad!r} in:\n{full}"
    # the checks ran, once per checksum: every IPv4 header, and every UDP
    # (both families), ICMPv6 and ICMP checksum
    n_ip4 = len(re.findall(r"^(DHCP|ICMP)\t", info, re.M))
    n_l4 = len(re.findall(r"^(DHCP|DHCPv6|ICMPv6|ICMP)\t", info, re.M))
    assert full.count("[Header checksum status: Good]") == n_ip4 >= 3, info
    assert full.count("[Checksum Status: Good]") == n_l4 >= 9, info


def test_dhclient_again_with_its_leases(xlab):
    """Started again with the leases it had (as after a reboot), dhclient -4
    asks for its address (INIT-REBOOT: REQUEST, ACK) and dhclient -6
    confirms it (Confirm, Reply with status Success): one reply each, and
    g2 keeps its addresses."""
    try:
        xlab.lab.stop_dhcp("g2", keep_leases=True)
        before = stats(xlab, "g2")
        xlab.lab.configure_guests({"g2": G2})
        deadline = time.monotonic() + 10
        logs = {}
        while time.monotonic() < deadline:
            logs = {f: guests.files(xlab.lab.state, "g2", f)["log"].read_text() for f in (4, 6)}
            if "bound to" in logs[4] and "Bound to lease" in logs[6]:
                break
            time.sleep(0.2)
        after = stats(xlab, "g2")
        assert f"DHCPREQUEST for {G2['ip']}" in logs[4] and "DHCPDISCOVER" not in logs[4], logs
        assert f"DHCPACK of {G2['ip']} from {GW_IP}" in logs[4], logs
        assert "Confirm" in logs[6] and "message status code Success" in logs[6], logs
        assert "Solicit" not in logs[6], logs
        d = delta(after, before, "dhcp4_replies", "dhcp6_replies", "drop_out_dhcp4",
                  "drop_out_dhcp6")
        assert d == {"dhcp4_replies": 1, "dhcp6_replies": 1, "drop_out_dhcp4": 0,
                     "drop_out_dhcp6": 0}, d
        assert configured(xlab, "g2", G2)
    finally:
        ensure_configured(xlab, "g2", G2)


# --- traffic over IPv6 ---------------------------------------------------------------

@pytest.mark.parametrize("src,dst", [("g1", "g2"), ("g2", "g1")])
def test_ping6_across_sleds(xlab, src, dst):
    a0, b0 = stats(xlab, src), stats(xlab, dst)
    xlab.must_ping(src, GUESTS[dst]["ip6"], count=5)
    a1, b1 = stats(xlab, src), stats(xlab, dst)
    assert a1["encap"] - a0["encap"] >= 5 and a1["decap"] - a0["decap"] >= 5, (a0, a1)
    assert b1["encap"] - b0["encap"] >= 5 and b1["decap"] - b0["decap"] >= 5, (b0, b1)


def tcp_transfer(t, src, dst_host, dst_ip, size, port=5061):
    """size random bytes from src to dst_ip over one TCP connection:
    (bytes the sink read, sent == received (SHA-256 and length))."""
    server = t.start_helper(dst_host, "tcp_sink.py", dst_ip, port)
    try:
        client = t.helper(src, "tcp_send.py", dst_ip, port, size, timeout=60, check=False)
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    sent, got = client.stdout.split(), out.split()
    assert sent and got, f"client: {client.stderr[-300:]!r}; server: {err[-300:]!r}"
    return int(got[1]), sent == got


@pytest.mark.parametrize("src,dst", [("g1", "g2"), ("g2", "g1")])
def test_tcp6_across_sleds(xlab, src, dst):
    """4 MB over one TCP connection over IPv6, from one sled to the other:
    every byte arrives, unchanged, and it was encapsulated."""
    xlab.resolve_underlay_neighbours()
    size = 4 << 20
    a0 = stats(xlab, src)
    n, same = tcp_transfer(xlab, src, dst, GUESTS[dst]["ip6"], size)
    assert n == size and same, (n, same)
    a1 = stats(xlab, src)
    # (segmentation offload: a counted packet may carry up to 64 KB)
    assert a1["encap"] > a0["encap"] and a1["tx_bytes"] - a0["tx_bytes"] >= size, (a0, a1)


G4 = {"sled": "sled1", "port": "xde4", "vni": VNI, "mac": "a8:40:25:ff:00:04", "ip": "10.0.0.4",
      "ip6": "fd00:10::4"}


@pytest.fixture(scope="module")
def g4(xlab):
    """A second VNI 10 port on sled1 (xde4; 10.0.0.4, fd00:10::4) with its
    guest g4, which configures itself like the lab's; removed afterwards
    (the lab has one VNI 10 port per sled)."""
    ns = xlab.ns("g4")
    try:
        xlab.xdectl("sled1", "create", "xde4", "--underlay", "u1", "--underlay", "u2",
                    "--mac", G4["mac"], "--ip", G4["ip"], "--ip6", G4["ip6"],
                    "--gateway-mac", GW_MAC, "--gateway-ip", GW_IP,
                    "--boundary-services", BSVC_ADDR, "--boundary-vni", "99",
                    "--vni", str(VNI), "--underlay-addr", U1_ADDR, "--vpc-subnet", SUBNET,
                    "--vpc-subnet6", SUBNET6)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        xlab.ip("g4", "link", "set", "lo", "up")
        xlab.ip("sled1", "link", "set", "xde4", "netns", ns)
        guests.prepare(ns, "xde4")
        xlab.lab.configure_guests({"g4": G4})
        yield G4
    finally:
        xlab.lab.stop_dhcp("g4")
        xlab.xdectl("sled1", "delete", "xde4", check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    assert [p["name"] for p in xlab.xdectl_json("sled1", "list")] == ["xde0"]


def test_same_sled_ipv6(xlab, g4):
    """g1 and g4 share sled1: ping -6 both ways and 2 MB of TCP over IPv6
    go straight from port to port (delivered, nothing encapsulated)."""
    a0, c0 = stats(xlab, "g1"), stats(xlab, G4)
    xlab.must_ping("g1", G4["ip6"], count=3)
    xlab.must_ping("g4", G1["ip6"], count=3)
    size = 2 << 20
    n, same = tcp_transfer(xlab, "g1", "g4", G4["ip6"], size, port=5062)
    assert n == size and same, (n, same)
    a1, c1 = stats(xlab, "g1"), stats(xlab, G4)
    assert a1["encap"] == a0["encap"] and c1["encap"] == c0["encap"], (a0, a1, c0, c1)
    assert c1["rx_bytes"] - c0["rx_bytes"] >= size, (c0, c1)
    assert a1["rx_packets"] - a0["rx_packets"] >= 6


# --- isolation, spoofing, NDP ----------------------------------------------------------

def test_other_vpc_unreachable_over_ipv6(xlab):
    """g3 (VNI 11) holds fd00:10::3, an address in VNI 10's subnet that VNI
    10 does not use. g1 cannot reach it (no V2P in VNI 10: dropped on
    sled1 as no_v2p), g3 cannot reach g1 (the same on sled2). Even a V2P
    entry on sled1 that wrongly sends fd00:10::3 to g3's MAC in VNI 10
    gets nowhere: sled2 finds no VNI 10 port with that MAC and drops the
    frames as no_port. Meanwhile g3 is alive: it reaches its gateway."""
    n = 3
    xlab.reset()
    try:
        xlab.must_ping("g3", f"{GW_LL}%{G3['port']}", count=2)
        a0, g0 = stats(xlab, "g1"), stats(xlab, "g3")
        ok, out = xlab.ping("g1", G3["ip6"], count=n)
        assert not ok and f"{n} packets transmitted, 0 received" in out, out
        a1, g1_ = stats(xlab, "g1"), stats(xlab, "g3")
        assert a1["drop_out_no_v2p"] - a0["drop_out_no_v2p"] == n
        assert a1["encap"] == a0["encap"] and g1_["rx_packets"] == g0["rx_packets"]

        ok, out = xlab.ping("g3", G1["ip6"], count=n)
        assert not ok and f"{n} packets transmitted, 0 received" in out, out
        g2_ = stats(xlab, "g3")
        assert g2_["drop_out_no_v2p"] - g1_["drop_out_no_v2p"] == n
        assert g2_["encap"] == g1_["encap"]
        assert stats(xlab, "g1")["rx_packets"] == a1["rx_packets"]

        xlab.xdectl("sled1", "set-v2p", G3["ip6"], G3["mac"], U2_ADDR, str(VNI))
        xlab.resolve_underlay_neighbours()
        a0, g0, s0 = stats(xlab, "g1"), stats(xlab, "g3"), xlab.global_stats("sled2")
        ok, out = xlab.ping("g1", G3["ip6"], count=n)
        assert not ok, out
        time.sleep(0.2)
        a1, g1_, s1 = stats(xlab, "g1"), stats(xlab, "g3"), xlab.global_stats("sled2")
        assert a1["encap"] - a0["encap"] == n
        assert s1["drop_in_no_port"] - s0["drop_in_no_port"] == n
        assert g1_["rx_packets"] == g0["rx_packets"]
    finally:
        xlab.reset()
    assert {"vni": VNI, "ip": G3["ip6"], "mac": G3["mac"], "underlay": U2_ADDR} not in \
        xlab.xdectl_json("sled1", "dump-v2p")


def g1_ll(t):
    for link in json.loads(t.ip("g1", "-j", "-6", "addr", "show", "dev", "xde0", "scope",
                                "link").stdout):
        for a in link.get("addr_info", []):
            if a.get("local", "").startswith("fe80:"):
                return a["local"]
    raise AssertionError("g1 has no link-local address")


@pytest.mark.parametrize("kind", ["other_address", "peer_address", "other_vpc_address",
                                  "source_mac"])
def test_spoofed_ipv6_source_dropped_and_counted(xlab, kind):
    """IPv6 frames from g1 with a source address that is not its port's
    (made up, its peer's, the other VPC's), or another source MAC: each
    dropped as spoof (as `xdectl stats` shows), none encapsulated or
    delivered."""
    n = 5
    src = {"other_address": "fd00:10::66", "peer_address": G2["ip6"],
           "other_vpc_address": G3["ip6"]}.get(kind, G1["ip6"])
    mac = "a8:40:25:ff:00:66" if kind == "source_mac" else G1_MAC
    frames = [bytes(Ether(src=mac, dst=GW_MAC) / IPv6(src=src, dst=G2["ip6"]) /
                    UDP(sport=41000 + i, dport=9) / Raw(b"spoof6")) for i in range(n)]
    before, g2_0 = xlab.cli_stats("sled1"), stats(xlab, "g2")
    xlab.send_frames("g1", "xde0", frames, gap=0.01)
    time.sleep(0.3)
    after, g2_1 = xlab.cli_stats("sled1"), stats(xlab, "g2")
    assert after["drop_out_spoof"] - before["drop_out_spoof"] == n
    assert after["encap"] == before["encap"]
    assert g2_1["rx_packets"] == g2_0["rx_packets"]


def test_unanswered_ndp_and_link_local_dropped_and_counted(xlab, tmp_path):
    """Neighbour discovery the gateway does not answer, sent from g1 (an RA,
    an NS for another address, an NS for the gateway with a hop limit
    other than 255, an unsolicited NA, a redirect, an RS with a non-zero
    code) is dropped as ndp; other link-local traffic (UDP to all nodes,
    echo to another link-local address) as link_local. The gateway answers
    none of it and nothing is encapsulated.

    g1's own kernel may send into its port in the same window (router
    solicitations, MLD reports, duplicate address detection): everything
    g1 sends is captured meanwhile, and a window in which it sent anything
    but our frames is tried again, so that the counts are exactly ours."""
    ll = g1_ll(xlab)
    e = Ether(src=G1_MAC, dst="33:33:00:00:00:01")
    mac_opt = ICMPv6NDOptSrcLLAddr(lladdr=G1_MAC)
    ndp = [
        e / IPv6(src=ll, dst="ff02::1", hlim=255) / ICMPv6ND_RA(routerlifetime=1800) / mac_opt,
        Ether(src=G1_MAC, dst="33:33:ff:00:00:02") /
        IPv6(src=ll, dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt=G2["ip6"]) / mac_opt,
        Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=ll, dst=GW_LL, hlim=64) /
        ICMPv6ND_NS(tgt=GW_LL) / mac_opt,
        e / IPv6(src=ll, dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt=ll, R=0, S=0, O=1),
        Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=ll, dst=GW_LL, hlim=255) /
        ICMPv6ND_Redirect(tgt=ll, dst=G2["ip6"]),
        Ether(src=G1_MAC, dst="33:33:00:00:00:02") / IPv6(src=ll, dst="ff02::2", hlim=255) /
        ICMPv6ND_RS(code=1),
    ]
    link_local = [
        e / IPv6(src=ll, dst="ff02::1") / UDP(sport=5000, dport=9) / Raw(b"ll"),
        Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=ll, dst="fe80::1234") /
        ICMPv6EchoRequest(id=7, seq=1),
    ]
    ours = [bytes(f) for f in ndp + link_local]
    keys = ("drop_out_ndp", "drop_out_link_local", "encap", "drop_out_spoof")
    for attempt in range(5):
        pcap = tmp_path / f"g1-{attempt}.pcap"
        with xlab.capture("g1", "xde0", pcap, f"ether src {G1_MAC}"):
            before = stats(xlab, "g1")
            xlab.send_frames("g1", "xde0", ours, gap=0.01)
            time.sleep(0.3)
            after = stats(xlab, "g1")
        sent = [bytes(p) for p in rdpcap(str(pcap))]
        assert all(f in sent for f in ours), "the capture missed frames we sent"
        others = [f for f in sent if f not in ours]
        if not others:
            break
    else:
        pytest.fail(f"g1's kernel sent frames of its own in each of 5 windows: {others[:3]}")
    d = delta(after, before, *keys)
    assert d == {"drop_out_ndp": len(ndp), "drop_out_link_local": len(link_local), "encap": 0,
                 "drop_out_spoof": 0}, d


# --- the lab's own check -----------------------------------------------------------------

def test_lab_ping_shows_both_families_and_isolation(xlab):
    """`xdectl lab ping` on the session's lab: every check ok, the IPv6
    ones and the isolation between VNIs among them."""
    p = subprocess.run([XDECTL, "lab", "--prefix", xlab.prefix, "ping"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    oks = [ln for ln in p.stdout.splitlines() if ln.startswith("  ok ")]
    assert not [ln for ln in p.stdout.splitlines() if "FAIL" in ln], p.stdout
    assert len(oks) == 23, p.stdout        # 17 pings, 6 TCP connections
    assert f"cannot reach g3 (VNI {OTHER_VNI})" in p.stdout, p.stdout
    assert "guest g1 -> guest g2 (across sleds, IPv6)" in p.stdout, p.stdout
    assert "guest g1 -> internet TCP (IPv6), seen from 2001:db8:51::10" in p.stdout, p.stdout
