"""Running the real programs of one lab sled on frames (BPF_PROG_TEST_RUN),
with the counter deltas and the sled's state read from its pinned maps,
for the differential tests (tests/test_differential.py, bench/fuzz.py).

Everything happens inside the sled's network namespace (Lab.inside): the
TC program finds its port by skb->ifindex, which the kernel looks up in
the caller's namespace.
"""
import ipaddress

from progrun import ProgRun
from xdectl import abi, counters, fw, libbpf
from xdectl.datapath import Datapath, session

from .xde import V4_MAPPED, FwRule, Instance, NatCfg, NatIps, Port, Route, set_external


def _ip4(be):
    return int(be).to_bytes(4, "little")


def _be16(v):
    """A __be16 field as read (host order, little-endian) -> its value."""
    return int.from_bytes(int(v).to_bytes(2, "little"), "big")


def _net(raw16, bits):
    """The network of a 16-byte address and its prefix length in the
    16-byte space: IPv4 when the address is mapped and the prefix covers
    the mapping."""
    if raw16[:12] == V4_MAPPED and bits >= 96:
        return ipaddress.IPv4Network((raw16[12:], bits - 96))
    return ipaddress.IPv6Network((raw16, bits))


def _key(k):
    """A flow_key as the model keys flows (and NAT's entries)."""
    return (k.port, DIRS[k.dir], k.proto, bytes(k.src)[:16], bytes(k.dst)[:16], _be16(k.sport),
            _be16(k.dport))


TARGETS = {1: "drop", 2: "ig", 3: "ip4", 4: "sub4", 5: "ip6", 6: "sub6"}
PORT_F_PASSTHROUGH, PORT_F_IP4, PORT_F_IP6 = 1, 2, 4
DIRS = {abi.DIR_OUT: "out", abi.DIR_IN: "in"}
ROUTE_KEY_BITS = 64


class SledRunner:
    """One sled of a lab: its programs, maps, and a Model Instance read from them."""

    def __init__(self, lab, sled="sled1"):
        self.lab = lab
        self.sled = sled
        self.root = lab.root(sled)
        self.progs = ProgRun(lab, sled)
        self.saved_rules = {}   # ifindex -> its rules before a case changed them
        self.saved_external = {}  # ifindex -> its external addresses before a case changed them
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
                gw_ip6=bytes(pc.gw_ip6)[:16], fw_epoch=pc.fw_epoch)
        self.read_templates(inst)
        for k, v in m["v2p"].items():
            inst.v2p[(k.vni, bytes(k.ip)[:16])] = (bytes(v.mac)[:6], bytes(v.underlay)[:16])
        for table, system in (("routes", False), ("routes_sys", True)):
            for k, v in m[table].items():
                net = _net(bytes(k.ip)[:16], k.prefixlen - ROUTE_KEY_BITS)
                assert net.version == k.family, (net, k.family)
                inst.routes.setdefault(k.port, []).append(
                    Route(net, TARGETS[v.target], bytes(v.addr)[:16], v.len, system))
        self.read_rules(inst)
        self.read_nat(inst)
        return inst

    def read_templates(self, inst):
        """The gateway's reply templates into the model's ports."""
        for p in inst.ports.values():
            p.templates.clear()
        for k, v in self.maps["gw_tmpl"].items():
            if k.port in inst.ports:
                inst.ports[k.port].templates[k.kind] = bytes(v.frame)[:v.len]

    def read_rules(self, inst):
        """The ports' firewall rules and epochs into the model."""
        inst.rules.clear()
        for k, v in self.maps["fw_rules"].items():
            d = DIRS[k.dir]
            for i in range(v.count):
                r = v.r[i]
                inst.rules.setdefault((k.port, d), []).append(FwRule(
                    id=r.id, priority=r.priority, action="allow" if r.action == 1 else "deny",
                    proto=r.proto, host=bytes(r.host)[:16], host_mask=bytes(r.host_mask)[:16],
                    vni=r.vni, vni_mask=r.vni_mask, icmp=r.icmp, icmp_mask=r.icmp_mask,
                    ports=list(r.ports[:r.nports])))
        for k, pc in self.maps["ports"].items():
            if k.value in inst.ports:
                inst.ports[k.value].fw_epoch = pc.fw_epoch

    def change_rules(self, inst, ifindex, lines):
        """Add `lines` (set-fw-rules lines) to the port's rules, each through
        `xdectl add-fw-rule` (the other rules keep their ids); no lines: the
        same rules written again, only the epoch moves. The model follows;
        restore_rules() puts the rules back as they were before the case,
        ids and all."""
        name = inst.ports[ifindex].name
        with self.lab.inside(self.sled):
            if ifindex not in self.saved_rules:
                self.saved_rules[ifindex] = fw.read_rules(self.maps, ifindex)
            if not lines:
                self._write_rules(ifindex, fw.read_rules(self.maps, ifindex))
            for line in lines:
                fw.add_rule(self.root, name, fw.parse_line(line))
        self.read_rules(inst)

    def _write_rules(self, ifindex, rules):
        with session(self.root) as (dp, _):
            fw.write_rules(dp.maps(), ifindex, rules)

    def restore_rules(self, inst):
        with self.lab.inside(self.sled):
            for ifindex, rules in self.saved_rules.items():
                self._write_rules(ifindex, rules)
        self.saved_rules.clear()
        self.read_rules(inst)

    # --- NAT (bpf/nat.h) ----------------------------------------------------------

    def read_nat(self, inst):
        """The ports' external addresses (nat_cfg: both families, the
        generation, the pools' cursors) into the model."""
        for p in inst.ports.values():
            p.nat = None
        for k, v in self.maps["nat_cfg"].items():
            if k.value not in inst.ports:
                continue
            fam = {}
            for i, family in enumerate((4, 6)):
                f = v.fam[i]
                fam[family] = NatIps(
                    snat=bytes(f.snat)[:16], snat_start=f.snat_start, snat_end=f.snat_end,
                    ephemeral=bytes(f.ephemeral)[:16] if f.has_ephemeral else None,
                    floating=[bytes(f.floating[j])[:16] for j in range(f.nfloating)],
                    cursor=list(f.cursor))
            inst.ports[k.value].nat = NatCfg(v.gen, fam)

    def nat_state(self):
        """(nat_flows, snat_ports, {ifindex: (gen, cursors)}) as the model
        keeps them (compare.compare_nat)."""
        flows = {}
        for k, v in self.maps["nat_flows"].items():
            flows[_key(k)] = (bytes(v.addr)[:16], _be16(v.port), v.kind, v.gen)
        owners = {}
        for k, v in self.maps["snat_ports"].items():
            owners[(k.port, k.family, k.pool, _be16(k.ext_port))] = (v.stamp, _key(v.flow))
        cfg = {k.value: (v.gen, {4: list(v.fam[0].cursor), 6: list(v.fam[1].cursor)})
               for k, v in self.maps["nat_cfg"].items()}
        return flows, owners, cfg

    def clear_nat(self, inst):
        """No translations, no SNAT port owned, every pool's cursor at 0 (so
        that a case's first SNAT flow of a pool gets the range's first
        port); the model follows."""
        for name in ("nat_flows", "snat_ports"):
            m = self.maps[name]
            for k in m.keys():
                m.delete(k)
        m = self.maps["nat_cfg"]
        for k, v in list(m.items()):
            if any(c for f in v.fam for c in f.cursor):
                for f in v.fam:
                    for i in range(len(f.cursor)):
                        f.cursor[i] = 0
                m.set(k, v)
        inst.nat_flows.clear()
        inst.snat_ports.clear()
        self.read_nat(inst)

    def set_external(self, inst, ifindex, ext, raw=False):
        """Give the port the external addresses ext (xde.nat_cfg_of's form)
        through xdectl.nat: set_external_ips (the translations they no
        longer have dropped, with their flows), or raw: nat_cfg written
        alone (the datapath finds the stale ones by their generation). The
        model follows; restore_external() puts back what the port had
        before the case."""
        from xdectl import nat
        e = nat.ExternalIPs(tuple(ext.get("snat", ())), ext.get("snat_start"),
                            ext.get("snat_end"), tuple(ext.get("ephemeral", ())),
                            tuple(ext.get("floating", ())))
        name = inst.ports[ifindex].name
        with self.lab.inside(self.sled):
            if ifindex not in self.saved_external:
                self.saved_external[ifindex] = nat.read(self.maps, ifindex)
            if raw:
                nat.write(self.maps, ifindex, e.validated())
            else:
                nat.set_external_ips(self.root, name, e)
        set_external(inst, ifindex, ext, raw)

    def restore_external(self, inst):
        from xdectl import nat
        with self.lab.inside(self.sled):
            for ifindex, ext in self.saved_external.items():
                nat.set_external_ips(self.root, inst.ports[ifindex].name, ext)
        self.saved_external.clear()
        self.read_nat(inst)

    def expire(self, inst, match):
        """The flows `match` (a predicate on model keys) leave the flow
        table, as if their time was up; the model follows."""
        f = self.maps["flows"]
        for k in f.keys():
            if match(_key(k)):
                f.delete(k)
        for k in [k for k in inst.flows if match(k)]:
            del inst.flows[k]

    def flows(self):
        """The flow table as the model keeps it: {key: (epoch, origin, vni,
        rule, packets, bytes, state)}."""
        out = {}
        for k, v in self.maps["flows"].items():
            key = _key(k)
            # a VNI is 24 bits: anything larger is no VNI (External)
            out[key] = (v.epoch, DIRS[v.origin], v.vni if v.vni <= 0xFFFFFF else None, v.rule,
                        v.packets, v.bytes, v.state)
        return out

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


def expiring(ifindex, which):
    """The predicate of an ("expire", which) step: the port's flows (None),
    or those of one flow, (protocol, the guest's port)."""
    if which is None:
        return lambda k: k[0] == ifindex
    proto, gport = which
    return lambda k: k[0] == ifindex and k[2] == proto and \
        (k[5] if k[1] == "out" else k[6]) == gport


def run_case(runner, inst, steps, hops, port, seen=None, log=None):
    """Run the steps of one case on the datapath and the model from an empty
    flow table (and no NAT translations, SNAT ports or cursors); a list of
    (step index, mismatch kinds) that disagreed.
    A step is (direction, frame), or ("fw", set-fw-rules lines): the port's
    rules changed between two frames (SledRunner.change_rules), put back
    when the case ends; ("ext", addresses) or ("ext_raw", addresses): the
    port's external addresses changed (SledRunner.set_external), put back
    when the case ends; ("expire", which): flows leave the flow table
    (expiring()). seen (a Counter), if given, counts the counters the
    model moved: what the case covered. log (a list), if given, gets the
    (step index, model Result, counter deltas, flow table, the program's
    output frame) of each frame the datapath ran, of the last run of the
    case.

    The programs stay attached while we test-run them, so the lab's own
    traffic (neighbour discovery on the underlay, reaching the real XDP
    hook) can move a counter between our two reads: a case that disagrees
    is run once more, and only a disagreement seen twice is reported."""
    bad = _run_case(runner, inst, steps, hops, port, seen, log)
    return bad and _run_case(runner, inst, steps, hops, port, log=log)


def _run_case(runner, inst, steps, hops, port, seen=None, log=None):
    from . import xde
    from .compare import compare, compare_flows, compare_nat
    runner.clear_flows()
    inst.flows.clear()
    runner.clear_nat(inst)
    bad = []
    if log is not None:
        log.clear()
    try:
        for i, (direction, frame) in enumerate(steps):
            if direction == "fw":
                # a change to the port's rules between two frames
                runner.change_rules(inst, port, frame)
                continue
            if direction in ("ext", "ext_raw"):
                runner.set_external(inst, port, frame, raw=direction == "ext_raw")
                continue
            if direction == "expire":
                runner.expire(inst, expiring(port, frame))
                continue
            rc, out, delta = runner.run(direction, frame, port, ports=list(inst.ports))
            if rc is None:
                continue        # the kernel would not build a test packet from it
            res = (xde.outbound(inst, port, frame) if direction == "out"
                   else xde.inbound(inst, frame))
            m = compare(res, frame, rc, out, delta, hops)
            flows = runner.flows()
            m += compare_flows(inst.flows, flows, set(inst.ports))
            m += compare_nat(inst, runner.nat_state())
            if log is not None:
                log.append((i, res, delta, flows, out))
            if seen is not None:
                seen.update(name for (_, name), n in res.counters.items() if n)
            if m:
                bad.append((i, m, res))
    finally:
        if runner.saved_rules:
            runner.restore_rules(inst)
        if runner.saved_external:
            runner.restore_external(inst)
    return bad
