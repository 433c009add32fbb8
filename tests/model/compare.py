"""Comparing one model Result with what the real program did."""
import struct

from frames import geneve

from .xde import csum


def _check_encap(res, out, next_hops):
    """Mismatch kinds of an encapsulated frame against the model's fields."""
    e = res.encap
    inner = e["inner"]
    bad = []
    if len(out) != len(inner) + 70:
        return [f"encap_len {len(out)} != {len(inner) + 70}"]
    if out[:12] not in next_hops and out[:12] != bytes(12):
        bad.append("encap_outer_macs")
    if out[12:14] != b"\x86\xdd":
        bad.append("encap_ethertype")
    w = struct.unpack_from("!I", out, 14)[0]
    ver, tc, label = w >> 28, (w >> 20) & 0xFF, w & 0xFFFFF
    plen, nh, hlim = struct.unpack_from("!HBB", out, 18)
    if ver != 6:
        bad.append("encap_ip6_version")
    if tc != e["tc"]:
        bad.append(f"encap_traffic_class {tc:#x} != {e['tc']:#x}")
    if (plen, nh, hlim) != (len(inner) + 16, 17, 128):
        bad.append(f"encap_ip6_fields {(plen, nh, hlim)}")
    if out[22:38] != e["src"] or out[38:54] != e["dst"]:
        bad.append("encap_ip6_addrs")
    sport, dport, ulen, uck = struct.unpack_from("!HHHH", out, 54)
    if not 49152 <= sport <= 65535:
        bad.append(f"encap_sport_range {sport}")
    # the flow hash, where the model knows the instance's seed: exact
    if "label" in e:
        if label != e["label"]:
            bad.append(f"encap_flow_label {label:#x} != {e['label']:#x}")
        if sport != e["sport"]:
            bad.append(f"encap_sport {sport:#x} != {e['sport']:#x}")
    elif label == 0:
        bad.append("encap_flow_label_zero")
    if (dport, ulen) != (6081, len(inner) + 16):
        bad.append(f"encap_udp_fields {(dport, ulen)}")
    if uck != 0:
        # a checksum, where given, must be right (pseudo-header + UDP)
        pseudo = out[22:54] + struct.pack("!IxxxB", ulen, 17)
        if csum(pseudo + out[54:]) not in (0, 0xFFFF) and csum(pseudo + out[54:]) != 0:
            bad.append("encap_udp_checksum")
    want_g = geneve(e["vni"])
    if out[62:70] != want_g:
        bad.append(f"encap_geneve {out[62:70].hex()} != {want_g.hex()}")
    if out[70:] != inner:
        bad.append("encap_inner")
    return bad


def _check_frag_needed(res, out):
    eth, hdr, icmp = res.encap["frag_needed"]
    bad = []
    if out[:14] != eth:
        bad.append("fragneeded_eth")
    ip = out[14:]
    if len(ip) < 20 or ip[0] != 0x45:
        return bad + ["fragneeded_ip_header"]
    tot = struct.unpack_from("!H", ip, 2)[0]
    if tot != len(hdr) + len(icmp) or len(out) != 14 + tot:
        bad.append(f"fragneeded_len {tot} {len(out)}")
    if ip[9] != 1 or ip[12:20] != hdr[12:20]:
        bad.append("fragneeded_ip_fields")
    if csum(ip[:20]) != 0:
        bad.append("fragneeded_ip_checksum")
    got = ip[20:tot]
    if got[:2] != icmp[:2] or got[4:] != icmp[4:]:
        bad.append("fragneeded_icmp")
    if csum(got) != 0:
        bad.append("fragneeded_icmp_checksum")
    return bad


ROUTE_CACHE = ("route_cache_hits", "route_cache_misses")


def _route_cache_as_encap(delta, bad):
    """The route cache is the datapath's own business (hit or miss depends
    on what ran in the last 100 ms), so the model does not count it; every
    encapsulated packet must have gone through it exactly once, though."""
    rest = {k: v for k, v in delta.items() if k[1] not in ROUTE_CACHE}
    for port in {k[0] for k in delta}:
        looked = sum(delta.get((port, c), 0) for c in ROUTE_CACHE)
        if looked != delta.get((port, "encap"), 0):
            bad.append(f"route cache lookups {looked} != encap {delta.get((port, 'encap'), 0)} "
                       f"on port {port}")
    return rest


def compare(res, frame, rc, out, delta, next_hops=()):
    """Mismatch kinds (strings, empty when the program agrees with the model)."""
    bad = []
    if rc != res.retval:
        bad.append(f"retval {rc} != model {res.retval} ({res.verdict} {res.reason})")
    want = {k: v for k, v in res.counters.items() if v}
    delta = _route_cache_as_encap(delta, bad)
    if delta != want:
        keys = sorted(set(delta) | set(want), key=str)
        diff = {f"{k[0]}:{k[1]}": (delta.get(k, 0), want.get(k, 0))
                for k in keys if delta.get(k, 0) != want.get(k, 0)}
        bad.append(f"counters (datapath, model) {diff}")
    if rc == res.retval and res.verdict != "drop":
        if res.verdict == "pass":
            if out != frame:
                bad.append("pass_modified")
        elif res.encap and "frag_needed" in res.encap:
            bad += _check_frag_needed(res, out)
        elif res.encap:
            bad += _check_encap(res, out, next_hops)
        elif res.out is not None and out != res.out:
            at = next((i for i, (a, b) in enumerate(zip(out, res.out)) if a != b),
                      min(len(out), len(res.out)))
            bad.append(f"output {res.verdict} (length {len(out)} vs {len(res.out)}, first "
                       f"difference at byte {at})")
    return bad


def compare_flows(model, datapath, ports):
    """Mismatch kinds of the datapath's flow table (harness.SledRunner.flows)
    against the model's, on the model's ports: the same entries, each of
    the same epoch, first direction, VNI, rule, packets, bytes and TCP
    state."""
    want = {k: (f.epoch, f.origin, f.vni, f.rule, f.packets, f.bytes, f.state)
            for k, f in model.items() if k[0] in ports}
    got = {k: v for k, v in datapath.items() if k[0] in ports}
    if got == want:
        return []
    fields = ("epoch", "origin", "vni", "rule", "packets", "bytes", "state")

    def name(k):
        return f"{k[1]} proto {k[2]} {k[3].hex()} -> {k[4].hex()} ports {k[5]},{k[6]}"
    bad = []
    for k in sorted(set(got) | set(want), key=str):
        if k not in got:
            bad.append(f"flow missing in the datapath: {name(k)}")
        elif k not in want:
            bad.append(f"flow the model has not: {name(k)} {dict(zip(fields, got[k]))}")
        elif got[k] != want[k]:
            diff = {f: (a, b) for f, a, b in zip(fields, got[k], want[k]) if a != b}
            bad.append(f"flow {name(k)} (datapath, model) {diff}")
    return bad


KINDS = {1: "snat", 2: "ephemeral", 3: "floating"}


def compare_nat(inst, state):
    """Mismatch kinds of the datapath's NAT state (harness.SledRunner.
    nat_state) against the model's, on the model's ports: the translations
    (both entries of each flow: address, port, kind, generation), the SNAT
    ports' owners (stamp, flow) and each port's generation and cursors."""
    flows, owners, cfg = state
    ports = set(inst.ports)
    bad = []

    def name(k):
        return f"{k[1]} proto {k[2]} {k[3].hex()} -> {k[4].hex()} ports {k[5]},{k[6]}"
    want = {k: (v.addr, v.port, v.kind, v.gen) for k, v in inst.nat_flows.items() if k[0] in ports}
    got = {k: v for k, v in flows.items() if k[0] in ports}
    for k in sorted(set(got) | set(want), key=str):
        if k not in got:
            bad.append(f"nat entry missing in the datapath: {name(k)}")
        elif k not in want:
            g = got[k]
            bad.append(f"nat entry the model has not: {name(k)} -> {g[0].hex()}:{g[1]} "
                       f"{KINDS.get(g[2], g[2])} gen {g[3]}")
        elif got[k] != want[k]:
            bad.append(f"nat entry {name(k)} (datapath, model) {got[k]} {want[k]}")
    want = {k: (o.stamp, o.flow) for k, o in inst.snat_ports.items() if k[0] in ports}
    got = {k: v for k, v in owners.items() if k[0] in ports}
    for k in sorted(set(got) | set(want), key=str):
        if got.get(k) != want.get(k):
            g, w = got.get(k), want.get(k)
            bad.append(f"snat port {k[1:]} owner (datapath, model) "
                       f"{g and (g[0], name(g[1]))} {w and (w[0], name(w[1]))}")
    for ifindex, p in inst.ports.items():
        if p.passthrough:
            continue
        have = cfg.get(ifindex)
        mine = (p.nat.gen, {v: f.cursor for v, f in p.nat.fam.items()}) if p.nat else None
        if have != mine:
            bad.append(f"nat_cfg of port {ifindex} (generation, cursors) (datapath, model) "
                       f"{have} {mine}")
    return bad
