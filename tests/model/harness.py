"""Running the real programs of one lab sled on frames (BPF_PROG_TEST_RUN),
with the counter deltas and the sled's state read from its pinned maps,
for the differential tests (tests/test_differential.py, bench/fuzz.py).

Everything happens inside the sled's network namespace (Lab.inside): the
TC program finds its port by skb->ifindex, which the kernel looks up in
the caller's namespace.
"""
import ipaddress

from progrun import ProgRun
from xdectl import counters, libbpf
from xdectl.datapath import Datapath

from .xde import V4_MAPPED, FwRule, Instance, Port, Route


def _ip4(be):
    return int(be).to_bytes(4, "little")


def _net(raw16, bits):
    """The network of a 16-byte address and its prefix length in the
    16-byte space: IPv4 when the address is mapped and the prefix covers
    the mapping."""
    if raw16[:12] == V4_MAPPED and bits >= 96:
        return ipaddress.IPv4Network((raw16[12:], bits - 96))
    return ipaddress.IPv6Network((raw16, bits))


TARGETS = {1: "drop", 2: "ig", 3: "ip4", 4: "sub4", 5: "ip6", 6: "sub6"}
PORT_F_PASSTHROUGH, PORT_F_IP4, PORT_F_IP6 = 1, 2, 4
ROUTE_KEY_BITS = 64


class SledRunner:
    """One sled of a lab: its programs, maps, and a Model Instance read from them."""

    def __init__(self, lab, sled="sled1"):
        self.lab = lab
        self.sled = sled
        self.root = lab.root(sled)
        self.progs = ProgRun(lab, sled)
        with lab.inside(sled):
            self.dp = Datapath(self.root)
            self.maps = self.dp.maps()

    def close(self):
        self.dp.close()

    # --- state ------------------------------------------------------------

    def instance(self):
        """The model's view of this sled, read from the pinned maps."""
        m = self.maps
        cfg = m["config"].get(m["config"].Key(0))
        inst = Instance(underlay_addr=bytes(cfg.underlay_addr)[:16], hash_seed=cfg.hash_seed)
        for k, pc in m["ports"].items():
            has4, has6 = bool(pc.flags & PORT_F_IP4), bool(pc.flags & PORT_F_IP6)
            inst.ports[k.value] = Port(
                ifindex=k.value, name=pc.name.decode(), mac=bytes(pc.mac)[:6],
                gw_mac=bytes(pc.gw_mac)[:6], ip=_ip4(pc.ip) if has4 else None,
                gw_ip=_ip4(pc.gw_ip), vni=pc.vni, bsvc_vni=pc.bsvc_vni,
                bsvc_addr=bytes(pc.bsvc_addr)[:16],
                subnet=ipaddress.IPv4Network((_ip4(pc.subnet), pc.subnet_len)) if has4 else None,
                mtu=pc.mtu, passthrough=bool(pc.flags & PORT_F_PASSTHROUGH),
                ip6=bytes(pc.ip6)[:16] if has6 else None,
                subnet6=ipaddress.IPv6Network((bytes(pc.subnet6)[:16], pc.subnet6_len))
                if has6 else None,
                gw_ip6=bytes(pc.gw_ip6)[:16])
        for k, v in m["gw_tmpl"].items():
            if k.port in inst.ports:
                inst.ports[k.port].templates[k.kind] = bytes(v.frame)[:v.len]
        for k, v in m["v2p"].items():
            inst.v2p[(k.vni, bytes(k.ip)[:16])] = (bytes(v.mac)[:6], bytes(v.underlay)[:16])
        for table, system in (("routes", False), ("routes_sys", True)):
            for k, v in m[table].items():
                net = _net(bytes(k.ip)[:16], k.prefixlen - ROUTE_KEY_BITS)
                assert net.version == k.family, (net, k.family)
                inst.routes.setdefault(k.port, []).append(
                    Route(net, TARGETS[v.target], bytes(v.addr)[:16], v.len, system))
        for k, v in m["fw_rules"].items():
            d = "in" if k.dir == 1 else "out"
            for i in range(v.count):
                r = v.r[i]
                inst.rules.setdefault((k.port, d), []).append(FwRule(
                    id=r.id, priority=r.priority, action="allow" if r.action == 1 else "deny",
                    proto=r.proto, host=bytes(r.host)[:16], host_mask=bytes(r.host_mask)[:16],
                    vni=r.vni, vni_mask=r.vni_mask, icmp=r.icmp, icmp_mask=r.icmp_mask,
                    ports=list(r.ports[:r.nports])))
        return inst

    def clear_flows(self):
        f = self.maps["flows"]
        for k in f.keys():
            f.delete(k)

    def counters(self, ports):
        """{('g', name): n, (ifindex, name): n}: the flat counter names of
        xdectl stats."""
        out = {("g", k): v for k, v in counters.global_counts(self.maps).flat().items()}
        for ifi in ports:
            c = counters.port_counts(self.maps, ifi)
            if c:
                out.update({(ifi, k): v for k, v in c.flat().items()})
        return out

    # --- running --------------------------------------------------------------

    def run(self, direction, frame, ifindex=None, ports=()):
        """(retval, output bytes, counter deltas) of one frame.
        direction 'out': tc_port_out on ifindex; 'in': xdp_underlay."""
        before = self.counters(ports)
        prog = "tc_port_out" if direction == "out" else "xdp_underlay"
        try:
            rc, out, _ = self.progs.run(prog, frame, ifindex)
        except libbpf.BpfError as e:
            if e.errno != 22:
                raise
            # the kernel refuses to build a test skb from it (too short
            # for its Ethernet or IP header): the program never sees it
            return None, None, {}
        after = self.counters(ports)
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        return rc, out, delta


def next_hops(lab, sled="sled1"):
    """The (dst, src) outer MAC pairs of the sled's resolved underlay next hops."""
    import json
    import subprocess
    sw = {"u1": "sw1", "u2": "sw2"}
    out = set()
    for dev, s in sw.items():
        def mac(host, d):
            p = subprocess.run(["ip", "-n", lab.ns(host), "-j", "link", "show", "dev", d],
                               capture_output=True, text=True, check=True)
            return bytes.fromhex(json.loads(p.stdout)[0]["address"].replace(":", ""))
        out.add(mac(s, sled) + mac(sled, dev))
    return out


def run_case(runner, inst, steps, hops, port, seen=None):
    """Run the steps of one case on the datapath and the model from an empty
    flow table; a list of (step index, mismatch kinds) that disagreed.
    seen (a Counter), if given, counts the counters the model moved: what
    the case covered.

    The programs stay attached while we test-run them, so the lab's own
    traffic (neighbour discovery on the underlay, reaching the real XDP
    hook) can move a counter between our two reads: a case that disagrees
    is run once more, and only a disagreement seen twice is reported."""
    bad = _run_case(runner, inst, steps, hops, port, seen)
    return bad and _run_case(runner, inst, steps, hops, port)


def _run_case(runner, inst, steps, hops, port, seen=None):
    from . import xde
    from .compare import compare
    runner.clear_flows()
    inst.flows.clear()
    bad = []
    for i, (direction, frame) in enumerate(steps):
        rc, out, delta = runner.run(direction, frame, port, ports=list(inst.ports))
        if rc is None:
            continue        # the kernel would not build a test packet from it
        res = xde.outbound(inst, port, frame) if direction == "out" else xde.inbound(inst, frame)
        m = compare(res, frame, rc, out, delta, hops)
        if seen is not None:
            seen.update(name for (_, name), n in res.counters.items() if n)
        if m:
            bad.append((i, m, res))
    return bad
