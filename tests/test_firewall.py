"""The stateful firewall and the flow table (docs/design.md,
"Firewall and flow table"), end to end in the session's lab, and the rule
matcher through BPF_PROG_TEST_RUN on the loaded programs.

After every test both sleds go back to the lab as built (xlab.reset): the
default rules (`in allow vni=10`, `in allow icmp`, `in allow icmp6`, all
priority 65535),
OPTE's flow timeouts (60/5/8000/120 s) and an empty flow table, so tests
do not depend on each other's order.

TCP and UDP endpoints live in this process: a socket created while the
thread is inside a guest's namespace (Lab.inside) belongs to that
namespace for good, so the servers below (threads) and the clients see
exactly what arrives, without helper processes. xdectl runs as an operator
runs it, in the sled's namespace through `nsenter --net`.

BPF_PROG_TEST_RUN: tc_port_out is SCHED_CLS and finds its port by
skb->ifindex, so each run passes a struct __sk_buff (UAPI linux/bpf.h,
192 bytes) as ctx_in with `ifindex` (offset 40) set to the port's datapath
end (xde0_dp); the kernel accepts ifindex in ctx_in and resolves it in the
caller's network namespace, hence the runs happen inside the sled's
namespace. A flow-table miss makes the program tail-call tc_fw_eval (or
xdp_fw_eval), which tail-calls the pipeline back: that works in test runs,
and the counters below show the rule walk happened.
"""
import contextlib
import json
import secrets
import select
import socket
import struct
import threading
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

from frames import (G1_IP, G1_MAC, G2_IP, G2_MAC, GW_MAC, OUTSIDE, OXIDE, U1_ADDR, U2_ADDR, VNI,
                    geneve, geneve_opt, underlay_frame)
from lab_fixture import DEFAULT_LINES, DEFAULT_TIMEOUTS, XDECTL, LabT

from progrun import ProgRun
from xdectl import counters
from xdectl import fw as xfw
from xdectl.datapath import Datapath
from xdectl.maps import find_port
from xdelab.lab import G2_PORT

DEFAULT_RULES = [
    {"dir": "in", "priority": 65535, "action": "allow", "hosts": "vni=10", "protocol": "any",
     "ports": "any"},
    {"dir": "in", "priority": 65535, "action": "allow", "hosts": "any", "protocol": "icmp",
     "ports": "any"},
    # the lab's ports are dual-stack
    {"dir": "in", "priority": 65535, "action": "allow", "hosts": "any", "protocol": "icmp6",
     "ports": "any"},
]
EXTERNAL_IP = "198.51.100.7"      # a host outside the VPC (TEST-NET-2)
SERVER_PORTS = (5201, 5202, 5203, 10000, 10500, 11021, 11022)
CONNECT_TIMEOUT = 1.5

TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
XDP_DROP, XDP_REDIRECT = 1, 4


# --- endpoints in the guests ---------------------------------------------------

class Server:
    """TCP listeners in a guest's namespace, served by threads of this
    process. Per connection it counts the bytes received and, whenever a
    chunk ends with '!', answers 'got N' (N: bytes so far)."""

    def __init__(self, lab, host, ports):
        self.host = host
        self.listeners = {}
        with lab.inside(host):
            for p in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", p))
                s.listen(64)
                self.listeners[s] = p
        self.lock = threading.Lock()
        self.totals = {}          # (peer ip, peer port, local port) -> bytes received
        self.log = []             # the same keys, in the order accepted
        self.conns = {}           # same key -> accepted socket
        self.stopping = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while not self.stopping:
            try:
                ready, _, _ = select.select(list(self.listeners), [], [], 0.2)
            except (OSError, ValueError):
                return
            for s in ready:
                try:
                    c, peer = s.accept()
                except OSError:
                    continue
                key = (peer[0], peer[1], self.listeners[s])
                with self.lock:
                    self.totals[key] = 0
                    self.conns[key] = c
                    self.log.append(key)
                threading.Thread(target=self._serve, args=(c, key), daemon=True).start()

    def _serve(self, c, key):
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.totals[key] += len(data)
                    n = self.totals[key]
                if data.endswith(b"!"):
                    c.sendall(b"got %d\n" % n)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                c.close()

    def received(self, peer_port, local_port):
        """Bytes received on the connection from peer_port, None if never accepted."""
        with self.lock:
            for (ip, pp, lp), n in self.totals.items():
                if pp == peer_port and lp == local_port:
                    return n
        return None

    def mark(self):
        with self.lock:
            return len(self.log)

    def accepted(self, local_port, since):
        """Connections accepted on local_port after mark() returned since."""
        with self.lock:
            return [k for k in self.log[since:] if k[2] == local_port]

    def close(self):
        self.stopping = True
        self.thread.join(2)
        for s in self.listeners:
            s.close()
        with self.lock:
            for c in self.conns.values():
                with contextlib.suppress(OSError):
                    c.close()


class FwLab(LabT):
    """The module's lab, with the firewall's commands and observations."""

    def __init__(self, lab):
        super().__init__(lab)
        self.servers = {}

    def xd(self, sled, *args, input=None, check=True):
        return self.run(sled, XDECTL, "--root", self.lab.root(sled), *args, input=input,
                        check=check)

    def xd_json(self, sled, *args):
        return json.loads(self.xd(sled, *args, "--json").stdout)

    def rules(self, sled):
        return self.xd_json(sled, "dump-fw", "xde0")

    def set_rules(self, sled, lines):
        p = self.xd(sled, "set-fw-rules", "xde0", input="".join(l + "\n" for l in lines))
        return p.stdout

    def rule_id(self, sled, **match):
        found = [r["id"] for r in self.rules(sled) if all(r[k] == v for k, v in match.items())]
        assert len(found) == 1, (match, self.rules(sled))
        return found[0]

    def hits(self, sled):
        return {r["id"]: r["hits"] for r in self.rules(sled)}

    def flows(self, sled):
        return self.xd_json(sled, "dump-flows", "xde0")

    def flow(self, sled, proto, src, sport, dst, dport):
        """The flow-table entries (both directions) of one connection, keyed by
        direction as seen from the port."""
        out = {}
        for f in self.flows(sled):
            if f["proto"] != proto:
                continue
            if (f["src"], f["sport"], f["dst"], f["dport"]) in ((src, sport, dst, dport),
                                                                (dst, dport, src, sport)):
                out[f["dir"]] = f
        return out

    def stats(self, sled):
        """xde0's counters, summed over CPUs (the maps, read in-process; the
        descriptors closed through Datapath.close)."""
        with self.lab.inside(sled):
            dp = Datapath(self.lab.root(sled))
            try:
                maps = dp.maps()
                index, _ = find_port(maps, "xde0")
                return counters.port_counts(maps, index).flat()
            finally:
                dp.close()


    # --- sockets in the guests ---

    def tcp(self, host, sport=0):
        with self.lab.inside(host):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sport:
            s.bind(("0.0.0.0", sport))
        return s

    def connect(self, host, dst, port, sport=0, timeout=CONNECT_TIMEOUT):
        s = self.tcp(host, sport)
        s.settimeout(timeout)
        try:
            s.connect((dst, port))
        except BaseException:
            s.close()
            raise
        return s

    def refused(self, host, dst, port, sport=0):
        """True when a connection attempt times out (its SYN dropped) and the
        server in the other guest accepted nothing on that port meanwhile."""
        server = self.servers[{G1_IP: "g1", G2_IP: "g2"}[dst]]
        mark = server.mark()
        try:
            s = self.connect(host, dst, port, sport)
        except TimeoutError:
            time.sleep(0.1)
            got = server.accepted(port, mark)
            assert not got, f"the connection timed out, yet the server accepted {got}"
            return True
        s.close()
        return False

    def udp(self, host, port=0):
        with self.lab.inside(host):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        return s


def exchange(s, n=20000, timeout=3):
    """Send n bytes (the last one '!') and return the server's count."""
    s.settimeout(timeout)
    s.sendall(b"x" * (n - 1) + b"!")
    reply = b""
    while not reply.endswith(b"\n"):
        d = s.recv(100)
        if not d:
            break
        reply += d
    assert reply.startswith(b"got "), reply
    return int(reply[4:])


def graceful_close(s, timeout=3):
    """FIN, wait for the server's FIN, close."""
    s.settimeout(timeout)
    s.shutdown(socket.SHUT_WR)
    while s.recv(4096):
        pass
    s.close()


def abort(s):
    """Close with a RST (SO_LINGER 0): nothing lingers in the guest."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def delta(after, before):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def wait_for(pred, timeout=3.0, step=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


# --- the lab ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def t(xlab):
    """The session's lab, with a TCP server in each guest."""
    xlab.reset()
    fl = FwLab.of(xlab)
    try:
        fl.servers = {g: Server(fl.lab, g, SERVER_PORTS) for g in ("g1", "g2")}
        yield fl
    finally:
        for s in fl.servers.values():
            s.close()
        xlab.reset()


@pytest.fixture(autouse=True)
def restored(t):
    """Every test ends with the lab as built: default rules and timeouts,
    no flows, underlay next hops resolved (an unresolved one is tested
    elsewhere, not in this module)."""
    yield
    t.reset()


def strip(rules):
    return [{k: v for k, v in r.items() if k not in ("id", "hits")} for r in rules]


# --- defaults ----------------------------------------------------------------------

def test_create_installs_the_default_vpc_rules(t):
    """`create` installs exactly OPTE's default VPC rules (the lab adds one
    to g2's port, for its service on its floating IP), and what the restore
    puts back is the same."""
    g2_rule = {"dir": "in", "priority": 100, "action": "allow", "hosts": "any",
               "protocol": "tcp", "ports": str(G2_PORT)}    # xdelab.lab.G2_RULE
    for sled in ("sled1", "sled2"):
        want = [g2_rule] + DEFAULT_RULES if sled == "sled2" else DEFAULT_RULES
        assert strip(t.rules(sled)) == want
        assert t.xd_json(sled, "set-flow-timeouts") == DEFAULT_TIMEOUTS


# --- a guest outside the VPC is denied by default ------------------------------------

def _external_syn(sport, external=True, vni=VNI, dport=5201):
    inner = bytes(Ether(dst=G2_MAC, src=GW_MAC) / IP(src=EXTERNAL_IP, dst=G2_IP) /
                  TCP(sport=sport, dport=dport, flags="S", seq=1000) / Raw(b"xf-ext"))
    opts = geneve_opt(OXIDE, 0x00) if external else b""
    return geneve(vni=vni, opts=opts) + inner


def _send_geneve_from_sw1(t, payload):
    """A Geneve UDP payload from sw1's stack to sled2's underlay address."""
    with t.lab.inside("sw1"):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.sendto(payload, (U2_ADDR, 6081))
    finally:
        s.close()


def test_external_guest_denied_by_default_vpc_guest_allowed(t, tmp_path):
    """A TCP SYN from 198.51.100.7 to g2:5201 in VNI 10, marked with the
    Oxide External option (class 0x0129, type 0: from outside the VPC), is
    dropped by sled2's default rules (it belongs to no VNI, so `vni=10`
    does not match, and it is not ICMP): drop_in_firewall and fw_denied count
    it and nothing reaches g2. The same frame without the option is from
    VNI 10 and the default `vni=10` rule lets it in."""
    pcap = tmp_path / "g2.pcap"
    vni_rule = t.rule_id("sled2", hosts="vni=10")
    with t.capture("g2", "xde0", pcap, f"tcp and host {EXTERNAL_IP}"):
        before = t.stats("sled2")
        _send_geneve_from_sw1(t, _external_syn(41001, external=True))
        assert wait_for(lambda: t.stats("sled2")["drop_in_firewall"] > before["drop_in_firewall"]), \
            delta(t.stats("sled2"), before)
        time.sleep(0.3)
        mid = t.stats("sled2")
        d = delta(mid, before)
        assert d.get("drop_in_firewall") == 1 and d.get("fw_denied") == 1, d
        assert not d.get("rx_packets") and not d.get("decap"), d
        assert not t.flow("sled2", "tcp", EXTERNAL_IP, 41001, G2_IP, 5201), "a denied flow was cached"

        _send_geneve_from_sw1(t, _external_syn(41002, external=False))
        assert wait_for(lambda: t.stats("sled2")["decap"] > mid["decap"]), delta(t.stats("sled2"), mid)
        d2 = delta(t.stats("sled2"), mid)
        assert d2.get("fw_allowed") == 1 and not d2.get("drop_in_firewall"), d2
    seen = [p for p in rdpcap(str(pcap)) if TCP in p and p[IP].dst == G2_IP]
    assert [p[TCP].sport for p in seen] == [41002], \
        f"g2 must see only the VPC frame's SYN: {[p.summary() for p in seen]}"
    f = t.flow("sled2", "tcp", EXTERNAL_IP, 41002, G2_IP, 5201)
    assert f["in"]["rule"] == vni_rule, f


def test_external_icmp_allowed_by_default_icmp_rule(t):
    """The other default rule: ICMP from outside the VPC is let in."""
    icmp_rule = t.rule_id("sled2", protocol="icmp")
    inner = bytes(Ether(dst=G2_MAC, src=GW_MAC) / IP(src=EXTERNAL_IP, dst=G2_IP) /
                  ICMP(type=8, id=0x7871, seq=1) / Raw(b"xf-ext-icmp"))
    before = t.stats("sled2")
    _send_geneve_from_sw1(t, geneve(opts=geneve_opt(OXIDE, 0x00)) + inner)
    assert wait_for(lambda: t.stats("sled2")["decap"] > before["decap"]), \
        delta(t.stats("sled2"), before)
    f = t.flow("sled2", "icmp", EXTERNAL_IP, 0x7871, G2_IP, 0x7871)
    assert f["in"]["rule"] == icmp_rule, f


# --- replies to the guest's own flows --------------------------------------------

def test_replies_to_flows_the_guest_opened_are_allowed(t):
    """With no inbound rule at all on sled1 (inbound default: deny), g1
    still gets the replies of what it opened: ping to boundary services
    (192.0.2.1) and TCP to g2; g2 opening a connection to g1 is refused."""
    t.set_rules("sled1", [])
    assert t.rules("sled1") == []
    t.must_ping("g1", OUTSIDE, count=3)
    f = t.flows("sled1")
    icmp = [x for x in f if x["proto"] == "icmp" and OUTSIDE in (x["src"], x["dst"])]
    assert {x["dir"] for x in icmp} == {"in", "out"} and all(x["rule"] == 0 for x in icmp), f
    assert next(x for x in icmp if x["dir"] == "in")["packets"] == 3, icmp

    s = t.connect("g1", G2_IP, 5201)
    try:
        assert exchange(s, 30000) == 30000
    finally:
        graceful_close(s)
    before = t.stats("sled1")
    assert t.refused("g2", G1_IP, 5201)
    assert t.stats("sled1")["drop_in_firewall"] > before["drop_in_firewall"]
    ok, _ = t.ping("g2", G1_IP, count=1)
    assert not ok, "sled1 has no inbound rule: g2's ping must not get in"


def test_tcp_flow_states_on_both_sleds(t):
    """g2 -> g1:5201 under the default rules: while the connection is open
    both sleds show both directions of it ESTABLISHED; after FIN both ways
    they show CLOSED."""
    s = t.connect("g2", G1_IP, 5201)
    sport = s.getsockname()[1]
    try:
        assert exchange(s, 5000) == 5000
        for sled in ("sled1", "sled2"):
            f = t.flow(sled, "tcp", G2_IP, sport, G1_IP, 5201)
            assert set(f) == {"in", "out"}, (sled, t.flows(sled))
            assert {x["state"] for x in f.values()} == {"ESTABLISHED"}, (sled, f)
        assert t.flow("sled1", "tcp", G2_IP, sport, G1_IP, 5201)["in"]["rule"] == \
            t.rule_id("sled1", hosts="vni=10")
    finally:
        graceful_close(s)
    time.sleep(0.3)
    for sled in ("sled1", "sled2"):
        f = t.flow(sled, "tcp", G2_IP, sport, G1_IP, 5201)
        assert {x["state"] for x in f.values()} == {"CLOSED"}, (sled, f)


# --- rules that allow and deny ports ---------------------------------------------------

PORT_5201 = "dir=in action=allow priority=10 protocol=tcp ports=5201"
ICMP_ONLY = "dir=in action=allow priority=65535 protocol=icmp"


def test_inbound_port_allowed_by_rule_and_other_port_not(t):
    """sled2 admits only ICMP and TCP 5201: g1 -> g2:5201 carries data,
    g1 -> g2:5202 (g2 listens there too) times out and is counted."""
    t.set_rules("sled2", [PORT_5201, ICMP_ONLY])
    rid = t.rule_id("sled2", ports="5201")
    s = t.connect("g1", G2_IP, 5201)
    try:
        assert exchange(s, 50000) == 50000
    finally:
        graceful_close(s)
    before = t.stats("sled2")
    assert t.refused("g1", G2_IP, 5202), "5202 is not allowed inbound on sled2"
    d = delta(t.stats("sled2"), before)
    assert d.get("drop_in_firewall", 0) >= 1 and d.get("fw_denied", 0) >= 1, d
    assert t.hits("sled2")[rid] == 1
    t.must_ping("g1", G2_IP, count=2)


def test_rule_hit_counts(t):
    """dump-fw counts, per rule, the flows whose first packet it decided:
    two connections to 5201 -> 2 on the 5201 rule; a 3-packet ping (one
    flow) -> 1 on the ICMP rule; a rule nothing matched stays at 0."""
    t.set_rules("sled2", [PORT_5201, "dir=in action=allow priority=20 protocol=udp ports=5300",
                          ICMP_ONLY])
    tcp_r = t.rule_id("sled2", ports="5201")
    udp_r = t.rule_id("sled2", ports="5300")
    icmp_r = t.rule_id("sled2", protocol="icmp")
    assert set(t.hits("sled2").values()) == {0}
    for _ in range(2):
        s = t.connect("g1", G2_IP, 5201)
        exchange(s, 1000)
        graceful_close(s)
    t.must_ping("g1", G2_IP, count=3)
    assert t.hits("sled2") == {tcp_r: 2, udp_r: 0, icmp_r: 1}


def test_priority_lower_first_deny_beats_allow(t):
    """A deny at priority 5 beats the allow at 10 for TCP 5201; with the
    deny at 20 instead, the allow wins."""
    t.set_rules("sled2", ["dir=in action=deny priority=5 protocol=tcp ports=5201",
                          PORT_5201, ICMP_ONLY])
    deny = t.rule_id("sled2", action="deny")
    allow = t.rule_id("sled2", ports="5201", action="allow")
    assert t.refused("g1", G2_IP, 5201)
    h = t.hits("sled2")
    assert h[deny] >= 1 and h[allow] == 0, h

    t.set_rules("sled2", ["dir=in action=deny priority=20 protocol=tcp ports=5201",
                          PORT_5201, ICMP_ONLY])
    s = t.connect("g1", G2_IP, 5201)
    try:
        assert exchange(s, 2000) == 2000
    finally:
        graceful_close(s)


# --- set-fw-rules is all or nothing ------------------------------------------------------

@pytest.mark.parametrize("bad,line_no", [
    ("dir=in action=maybe priority=1", 2),
    ("dir=in action=deny priority=1 protocol=tcp ports=0", 2),
    ("dir=in action=deny priority=70000", 3),
    ("dir=in action=deny priority=1 colour=blue", 2),
    ("dir=sideways action=deny priority=1", 2),
])
def test_set_fw_rules_bad_line_changes_nothing(t, bad, line_no):
    """A bad line: exit 2, one line on stderr naming the line, no
    traceback, rules, hit counts and the epoch (a cached flow stays fresh)
    unchanged."""
    t.must_ping("g1", G2_IP, count=1)
    before = t.rules("sled2")
    good = "dir=in action=allow priority=1 protocol=udp ports=53"
    lines = [good] * (line_no - 1) + [bad, good]
    p = t.xd("sled2", "set-fw-rules", "xde0", input="".join(l + "\n" for l in lines), check=False)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and f"line {line_no}" in err[0], p.stderr
    assert "Traceback" not in p.stderr
    assert t.rules("sled2") == before
    assert not any(f["stale"] for f in t.flows("sled2")), "the epoch moved"


# --- removing a rule cuts a flow it allowed ---------------------------------------------

def test_removing_rule_cuts_established_flow(t):
    """A long-lived g1 -> g2:5201 connection, allowed inbound on sled2 only
    by the 5201 rule. Once the rule is removed (epoch bump), g1's next
    data is judged again by the rules, denied, and never reaches g2's
    server; drop_in_firewall and flow_reevaluated count it."""
    t.set_rules("sled2", [PORT_5201, ICMP_ONLY])
    rid = t.rule_id("sled2", ports="5201")
    s = t.connect("g1", G2_IP, 5201)
    sport = s.getsockname()[1]
    try:
        assert exchange(s, 1000) == 1000
        time.sleep(0.5)         # every ACK of that exchange delivered
        f = t.flow("sled2", "tcp", G1_IP, sport, G2_IP, 5201)
        assert f["in"]["rule"] == rid and f["in"]["state"] == "ESTABLISHED", f
        before = t.stats("sled2")
        t.xd("sled2", "rm-fw-rule", "xde0", str(rid), "--dir", "in")
        assert rid not in t.hits("sled2")
        s.sendall(b"y" * 1000)      # g1 speaks first after the change
        time.sleep(2.0)
        assert t.servers["g2"].received(sport, 5201) == 1000, \
            "data sent after the rule was removed reached the server"
        d = delta(t.stats("sled2"), before)
        assert d.get("drop_in_firewall", 0) >= 1, d
        assert d.get("flow_reevaluated", 0) >= 1, d
        assert not d.get("rx_packets"), d
        assert not t.flow("sled2", "tcp", G1_IP, sport, G2_IP, 5201), "the cut flow is still cached"
    finally:
        abort(s)


# --- 1,024 rules per direction --------------------------------------------------------

def _many_rules(n_in_deny, n_out=0):
    lines = [f"dir=in action=deny priority={i + 1} protocol=tcp ports={10000 + i}"
             for i in range(n_in_deny)]
    lines += [f"dir=out action=deny priority={i + 1} protocol=udp ports={20000 + i}"
              for i in range(n_out)]
    return lines


def test_1024_rules_per_direction_load_and_work(t):
    """1,024 inbound rules (1,022 denies of TCP 10000..11021 at priorities
    1..1022, then the two defaults) and 1,024 outbound rules (denies of UDP
    20000..21023) on sled2: loaded, listed, and enforced at both ends of
    each range, while an unaffected port (reached after walking every
    rule) still works. (1,024 denies plus the two defaults would be 1,026
    inbound rules: more than the 1,024 per direction the datapath holds,
    docs/design.md, "Firewall and flow table"; see the next test.)"""
    lines = _many_rules(1022, 1024) + DEFAULT_LINES
    out = t.set_rules("sled2", lines)
    assert "2048 rules set" in out, out
    rules = t.rules("sled2")
    assert len(rules) == 2048
    assert sum(r["dir"] == "in" for r in rules) == 1024
    assert [r["ports"] for r in rules if r["dir"] == "in"][:1022] == \
        [str(10000 + i) for i in range(1022)]

    # allowed: past every deny, by the vni=10 default at the end of the list
    s = t.connect("g1", G2_IP, 5201)
    try:
        assert exchange(s, 20000) == 20000
    finally:
        graceful_close(s)
    s = t.connect("g1", G2_IP, 11022)      # first port after the denied range
    abort(s)
    before = t.stats("sled2")
    for port in (10000, 10500, 11021):
        assert t.refused("g1", G2_IP, port), port
    assert t.stats("sled2")["fw_denied"] - before["fw_denied"] >= 3
    h = {r["ports"]: r["hits"] for r in t.rules("sled2") if r["dir"] == "in"}
    assert h["10000"] >= 1 and h["10500"] >= 1 and h["11021"] >= 1

    # outbound: g2 -> g1 UDP, the last deny of the range and the next port
    rx = {p: t.udp("g1", p) for p in (21023, 21024, 20000)}
    tx = t.udp("g2")
    try:
        for sock in rx.values():
            sock.settimeout(1.0)
        for p in rx:
            tx.sendto(b"xf-%d" % p, (G1_IP, p))
        assert rx[21024].recv(100) == b"xf-21024"
        for p in (21023, 20000):
            with pytest.raises((TimeoutError, socket.timeout)):
                rx[p].recv(100)
    finally:
        tx.close()
        for sock in rx.values():
            sock.close()


def test_1025_inbound_rules_refused_with_one_line(t):
    """One rule more than a direction holds: exit 2, one line, nothing changed."""
    before = t.rules("sled2")
    lines = _many_rules(1025)
    p = t.xd("sled2", "set-fw-rules", "xde0", input="\n".join(lines) + "\n", check=False)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "1024" in p.stderr, p.stderr
    assert t.rules("sled2") == before


def test_refused_rule_set_changes_neither_direction(t):
    """set-fw-rules replaces all of a port's rules atomically: when the
    inbound half is refused (1,025 rules), the outbound half of the same
    input must not be installed either."""
    before = t.rules("sled2")
    lines = ["dir=out action=deny priority=7 protocol=udp ports=9"] + _many_rules(1025)
    p = t.xd("sled2", "set-fw-rules", "xde0", input="\n".join(lines) + "\n", check=False)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert t.rules("sled2") == before, \
        "a refused set-fw-rules changed the port's rules (the outbound direction was written)"


# --- TCP state and expiry -----------------------------------------------------------

def test_tcp_close_then_closed_entry_expires(t):
    """With --tcp-closed 2 --idle 2: after FIN both ways the flow is CLOSED;
    ~3 s later the entry has expired, so a new connection with the same
    4-tuple is judged by the rules again (flow_misses rises) and tracked
    afresh (ESTABLISHED)."""
    for sled in ("sled1", "sled2"):
        got = t.xd_json(sled, "set-flow-timeouts", "--tcp-closed", "2", "--idle", "2")
        assert got == dict(DEFAULT_TIMEOUTS, tcp_closed=2, idle=2)
    sport = 45000 + secrets.randbelow(1000)
    s = t.connect("g1", G2_IP, 5201, sport=sport)
    assert exchange(s, 3000) == 3000
    graceful_close(s)
    time.sleep(0.3)
    for sled in ("sled1", "sled2"):
        f = t.flow(sled, "tcp", G1_IP, sport, G2_IP, 5201)
        assert {x["state"] for x in f.values()} == {"CLOSED"} and len(f) == 2, (sled, f)
    time.sleep(3)
    f = t.flow("sled2", "tcp", G1_IP, sport, G2_IP, 5201)
    assert all(x["idle_s"] >= 2 for x in f.values()), f
    before = t.stats("sled2")
    s = t.connect("g1", G2_IP, 5201, sport=sport)
    try:
        assert exchange(s, 3000) == 3000
        d = delta(t.stats("sled2"), before)
        assert d.get("flow_misses", 0) >= 1 and d.get("fw_allowed", 0) >= 1, d
        f = t.flow("sled2", "tcp", G1_IP, sport, G2_IP, 5201)
        assert f["in"]["state"] == "ESTABLISHED" and f["in"]["age_s"] < 2, f
    finally:
        abort(s)


def test_new_connection_on_closed_flow_is_tracked_afresh(t):
    """A connection that reuses a CLOSED flow's 4-tuple before the entry
    expires is a new connection: its flow must be tracked as such
    (ESTABLISHED, with the established timeout), not stay CLOSED. Seen
    from g1's side with inbound rules that admit nothing but ICMP, the
    difference matters: sled1 lets g2's data back in only while the flow
    lives, and a CLOSED entry (tcp_closed 2 s here) dies after 2 s idle."""
    t.set_rules("sled1", [ICMP_ONLY])
    t.xd("sled1", "set-flow-timeouts", "--tcp-closed", "2")
    with t.lab.inside("g2"):
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", 5301))
    lst.listen(4)
    lst.settimeout(3)
    sport = 46000 + secrets.randbelow(1000)
    conns = []
    try:
        c1 = t.connect("g1", G2_IP, 5301, sport=sport)
        a1, _ = lst.accept()
        conns += [c1, a1]
        c1.sendall(b"first")
        a1.settimeout(3)
        assert a1.recv(100) == b"first"
        c1.shutdown(socket.SHUT_WR)
        assert a1.recv(100) == b""
        a1.close()
        c1.settimeout(3)
        assert c1.recv(100) == b""
        c1.close()
        time.sleep(0.3)
        f = t.flow("sled1", "tcp", G1_IP, sport, G2_IP, 5301)
        assert {x["state"] for x in f.values()} == {"CLOSED"}, f

        # the same 4-tuple again, well within the 2 s the CLOSED entry lives
        c2 = t.connect("g1", G2_IP, 5301, sport=sport)
        a2, _ = lst.accept()
        conns += [c2, a2]
        c2.sendall(b"second")
        a2.settimeout(3)
        assert a2.recv(100) == b"second"
        time.sleep(0.3)
        f = t.flow("sled1", "tcp", G1_IP, sport, G2_IP, 5301)
        states = {x["state"] for x in f.values()}
        # idle past the closed timeout, then the server speaks first
        time.sleep(3)
        a2.sendall(b"late reply")
        c2.settimeout(3)
        try:
            late = c2.recv(100)
        except TimeoutError:
            late = None
        assert (states, late) == ({"ESTABLISHED"}, b"late reply"), (
            f"the reused 4-tuple's flow is tracked as {states}, not as a new connection "
            f"({f}); the server's data after 3 s idle "
            f"{'arrived' if late else 'was dropped (the CLOSED entry had timed out)'}")
    finally:
        for c in conns:
            abort(c)
        lst.close()


# --- BPF_PROG_TEST_RUN on the loaded programs -----------------------------------------

class Prog:
    """Runs a sled's pinned programs on frames, inside the sled's namespace."""

    def __init__(self, t, sled):
        self.t, self.sled = t, sled
        self.root = t.lab.root(sled)
        self.dp_ifindex = t.ifindex(sled, "xde0_dp")

    def run(self, prog, frame):
        return ProgRun(self.t.lab, self.sled).run(prog, frame, self.dp_ifindex)[0]

    def tc(self, frame):
        return self.run("tc_port_out", frame)

    def xdp(self, frame):
        return self.run("xdp_underlay", frame)

    def set_rules(self, lines):
        """Rules through xdectl's own module, in-process (many per test)."""
        with self.t.lab.inside(self.sled):
            xfw.set_rules(self.root, "xde0", lines)
            xfw.clear_flows(self.root, "xde0")

    def rules(self):
        with self.t.lab.inside(self.sled):
            return xfw.dump_rules(self.root, "xde0")


def g1_out(l4, dst=G2_IP):
    return bytes(Ether(src=G1_MAC, dst=GW_MAC) / IP(src=G1_IP, dst=dst) / l4)


def test_prog_run_outbound_deny_rule(t):
    """tc_port_out on sled1 with `out deny tcp 80`: a frame from g1 to
    g2:80 is TC_ACT_SHOT, to g2:81 it is encapsulated (TC_ACT_REDIRECT).
    The deny is stateless: a second run walks the rules again (one more
    hit, one more miss). After the rule is removed, port 80 passes."""
    t.set_rules("sled1", DEFAULT_LINES + ["dir=out action=deny priority=10 protocol=tcp ports=80"])
    rid = t.rule_id("sled1", dir="out")
    p = Prog(t, "sled1")
    syn80 = g1_out(TCP(sport=33000, dport=80, flags="S"))
    syn81 = g1_out(TCP(sport=33000, dport=81, flags="S"))
    before = t.stats("sled1")
    assert p.tc(syn80) == TC_ACT_SHOT
    d = delta(t.stats("sled1"), before)
    assert d.get("drop_out_firewall") == 1 and d.get("fw_denied") == 1 and d.get("flow_misses") == 1, d
    assert t.hits("sled1")[rid] == 1
    assert p.tc(syn80) == TC_ACT_SHOT
    assert t.hits("sled1")[rid] == 2, "a deny must not be cached"
    mid = t.stats("sled1")
    assert p.tc(syn81) == TC_ACT_REDIRECT
    d = delta(t.stats("sled1"), mid)
    assert d.get("encap") == 1 and d.get("fw_allowed") == 1, d
    assert t.flow("sled1", "tcp", G1_IP, 33000, G2_IP, 81)["out"]["state"] == "SYN_SENT"
    t.xd("sled1", "rm-fw-rule", "xde0", str(rid), "--dir", "out")
    assert p.tc(syn80) == TC_ACT_REDIRECT


def _inbound(sled, l4, src=G2_IP, vni=VNI, external=False):
    """A Geneve frame on sled1's underlay for g1, from `src`."""
    assert sled == "sled1"
    inner = bytes(Ether(dst=G1_MAC, src=G2_MAC) / IP(src=src, dst=G1_IP) / l4)
    opts = geneve_opt(OXIDE, 0x00) if external else b""
    return underlay_frame(geneve(vni=vni, opts=opts) + inner, dst_mac="02:00:00:00:01:01",
                          src_mac="02:00:00:00:01:02", src=U2_ADDR, dst=U1_ADDR)


_TCP = TCP(sport=34000, dport=22, flags="S")
MATCHER_CASES = [
    # (id, rule filters, frame arguments, whether the rule matches)
    ("any", "", {"l4": _TCP, "external": True}, True),
    ("ip_match", "hosts=ip=10.0.0.2", {"l4": _TCP}, True),
    ("ip_other", "hosts=ip=10.0.0.2", {"l4": _TCP, "src": "10.0.0.3"}, False),
    ("subnet_in", "hosts=subnet=10.0.0.0/30", {"l4": _TCP, "src": "10.0.0.3"}, True),
    ("subnet_out", "hosts=subnet=10.0.0.0/30", {"l4": _TCP, "src": "10.0.0.4"}, False),
    ("vni_match", "hosts=vni=10", {"l4": _TCP}, True),
    ("vni_external", "hosts=vni=10", {"l4": _TCP, "external": True}, False),
    ("vni_other", "hosts=vni=11", {"l4": _TCP}, False),
    ("tcp_listed_port", "protocol=tcp ports=22,80,443", {"l4": TCP(dport=80, flags="S")}, True),
    ("tcp_unlisted_port", "protocol=tcp ports=22,80,443", {"l4": TCP(dport=81, flags="S")}, False),
    ("tcp_rule_udp_frame", "protocol=tcp ports=80", {"l4": UDP(dport=80)}, False),
    ("eight_ports_last", "protocol=udp ports=1,2,3,4,5,6,7,8", {"l4": UDP(dport=8)}, True),
    ("any_proto_port_udp", "ports=443", {"l4": UDP(dport=443)}, True),
    ("any_proto_port_tcp", "ports=443", {"l4": TCP(dport=443, flags="S")}, True),
    ("any_proto_port_icmp", "ports=443", {"l4": ICMP(type=8, id=443)}, False),
    ("udp_any_port", "protocol=udp", {"l4": UDP(dport=9999)}, True),
    ("udp_rule_tcp_frame", "protocol=udp", {"l4": _TCP}, False),
    ("icmp_type", "protocol=icmp:8", {"l4": ICMP(type=8, id=7)}, True),
    ("icmp_type_other", "protocol=icmp:8", {"l4": ICMP(type=13, id=7)}, False),
    ("icmp_type_code", "protocol=icmp:3,4", {"l4": ICMP(type=3, code=4)}, True),
    ("icmp_type_code_other", "protocol=icmp:3,4", {"l4": ICMP(type=3, code=1)}, False),
    # a later fragment has no ports (the parser reads 0) and 0 is never a
    # port of a rule: a port list cannot match it, nor a TCP port 0
    ("later_fragment_port_rule", "protocol=tcp ports=22",
     {"l4": Raw(b"\0" * 24)}, False),
    ("later_fragment_proto_rule", "protocol=tcp", {"l4": Raw(b"\0" * 24)}, True),
    ("tcp_port_zero", "protocol=tcp ports=22", {"l4": TCP(dport=0, flags="S")}, False),
    ("arp_never_matches_ip", "protocol=arp", {"l4": _TCP}, False),
    ("all_filters", "hosts=subnet=10.0.0.0/24 protocol=udp ports=53", {"l4": UDP(dport=53)}, True),
    ("all_filters_host_off", "hosts=subnet=10.0.0.0/24 protocol=udp ports=53",
     {"l4": UDP(dport=53), "src": "10.1.0.2"}, False),
]


def _later_fragment(l4_raw, src=G2_IP):
    inner = bytes(Ether(dst=G1_MAC, src=G2_MAC) / IP(src=src, dst=G1_IP, proto=6, frag=100) / l4_raw)
    return underlay_frame(geneve() + inner, dst_mac="02:00:00:00:01:01",
                          src_mac="02:00:00:00:01:02", src=U2_ADDR, dst=U1_ADDR)


@pytest.fixture(scope="module")
def prog1(t):
    return Prog(t, "sled1")


@pytest.mark.parametrize("action", ["allow", "deny"])
@pytest.mark.parametrize("case,filters,frame,matches", MATCHER_CASES,
                         ids=[c[0] for c in MATCHER_CASES])
def test_prog_run_inbound_rule_matcher(t, prog1, action, case, filters, frame, matches):
    """xdp_underlay on sled1 with one inbound rule (allow: alone, so no match
    means the default deny; deny: followed by an allow-all at priority 100,
    so no match means allowed): XDP_REDIRECT into g1 or XDP_DROP as the
    rule's filters say, and the rule's hit count says whether it matched."""
    rule = f"dir=in action={action} priority=10 {filters}".strip()
    lines = [rule] + (["dir=in action=allow priority=100"] if action == "deny" else [])
    prog1.set_rules(lines)
    rid = next(r["id"] for r in prog1.rules() if r["priority"] == 10)
    if case.startswith("later_fragment"):
        f = _later_fragment(frame["l4"])
    else:
        f = _inbound("sled1", **frame)
    rc = prog1.xdp(f)
    allowed = matches == (action == "allow")
    assert rc == (XDP_REDIRECT if allowed else XDP_DROP), (rule, rc)
    hits = {r["id"]: r["hits"] for r in prog1.rules()}
    assert hits[rid] == (1 if matches else 0), hits


def test_prog_run_first_match_wins_by_priority(t, prog1):
    """Two rules that both match: the lower priority number decides, whatever
    the order of the input lines; equal priorities keep the input order."""
    frame = _inbound("sled1", TCP(sport=34100, dport=22, flags="S"))
    prog1.set_rules(["dir=in action=allow priority=9 protocol=tcp",
                     "dir=in action=deny priority=8 hosts=vni=10"])
    assert prog1.xdp(frame) == XDP_DROP
    prog1.set_rules(["dir=in action=allow priority=7 protocol=tcp",
                     "dir=in action=deny priority=8 hosts=vni=10"])
    assert prog1.xdp(frame) == XDP_REDIRECT
    prog1.set_rules(["dir=in action=deny priority=8 protocol=tcp",
                     "dir=in action=allow priority=8 hosts=vni=10"])
    assert prog1.xdp(frame) == XDP_DROP


def test_prog_run_rule_change_cuts_external_flow_whoever_speaks_first(t):
    """An inbound TCP flow from outside the VPC (External option), allowed on
    sled2 by a port rule, is cut when the rules change to the defaults plus
    an outbound deny of that host: neither the guest's next packet (judged
    again as a flow that came from outside: no rule admits it, and the
    outbound deny refuses it as a new flow) nor the remote's may pass.
    The re-evaluation must judge the flow with the VNI it came from (none:
    External), not the port's VNI, or `vni=10` readmits it."""
    p = Prog(t, "sled2")

    def inb(flags):
        inner = bytes(Ether(dst=G2_MAC, src=GW_MAC) / IP(src=EXTERNAL_IP, dst=G2_IP) /
                      TCP(sport=40100, dport=5201, flags=flags))
        return underlay_frame(geneve(opts=geneve_opt(OXIDE, 0x00)) + inner,
                              dst_mac="02:00:00:00:02:01", src_mac="02:00:00:00:02:02",
                              src="fd10:2:1::2", dst=U2_ADDR)

    def outb(flags):
        return bytes(Ether(src=G2_MAC, dst=GW_MAC) / IP(src=G2_IP, dst=EXTERNAL_IP) /
                     TCP(sport=5201, dport=40100, flags=flags))

    t.set_rules("sled2", [PORT_5201, ICMP_ONLY])
    assert p.xdp(inb("S")) == XDP_REDIRECT
    assert p.tc(outb("SA")) == TC_ACT_REDIRECT
    assert p.xdp(inb("A")) == XDP_REDIRECT
    f = t.flow("sled2", "tcp", EXTERNAL_IP, 40100, G2_IP, 5201)
    assert f["in"]["state"] == "ESTABLISHED", f

    t.set_rules("sled2", DEFAULT_LINES +
                [f"dir=out action=deny priority=10 hosts=ip={EXTERNAL_IP}"])
    out_rc = p.tc(outb("PA"))      # the guest speaks first after the change
    in_rc = p.xdp(inb("PA"))
    after = t.flow("sled2", "tcp", EXTERNAL_IP, 40100, G2_IP, 5201)
    assert (out_rc, in_rc) == (TC_ACT_SHOT, XDP_DROP), \
        f"the external flow survived the rule change: tc {out_rc}, xdp {in_rc}; flows {after}"
