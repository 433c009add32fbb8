"""ns per packet of the datapath programs via BPF_PROG_TEST_RUN
(docs/design.md, "How it is proved").

    .venv/bin/python bench/prog.py [--repeat 200000] [--samples 3000] [--rounds 5]
                                   [--out bench/results/prog.json]

Builds a lab of its own (`xdelab.lab.Lab`, prefix `xp<3 hex>-`, always torn
down) and runs sled1's pinned programs on crafted frames, inside sled1's
namespace (tc_port_out finds its port by the ctx's ifindex: a struct
__sk_buff with ifindex = xde0_dp, resolved in the caller's namespace). The
baseline is an EMPTY program of the same type (`return XDP_PASS` /
`return TC_ACT_OK`), compiled with bcc in the same run and timed the same
way on the same frame and ctx, alternating with the measured path.

Two ways of timing, and where each is sound:

  repeat   one BPF_PROG_TEST_RUN with repeat=R; the kernel reports the mean
           ns per run. The kernel runs every iteration on the same skb /
           xdp_buff, so a path that changes the frame (encap, decap, the
           gateway's replies) would be timed on its own output from the
           second iteration on (docs/design.md, "Kernel constraints").
           Used only for paths that leave the frame as it is: the inbound
           first packet that the default deny drops after walking every
           rule, and the outbound flow-table hit that ends in a `drop`
           route. The counters are checked after each measurement: R rule
           walks (fw_denied += R) or R flow hits and no miss.
  single   the median over S separate runs with repeat=1: a fresh frame
           every run, so sound for every path, but each figure carries the
           kernel's timer overhead (a few tens of ns), the same for the empty
           program. Used for encap, decap (the inbound flow hit), the
           gateway's ARP and echo replies, and for comparison on the
           repeat-timed paths.

Paths, with N = 0, 16, 256, 1024 rules that do not match the frame:
  first_in   xdp_underlay, Geneve UDP for g1; N inbound rules, none matches,
             so the default deny decides after walking all N (two tail calls:
             to xdp_fw_eval and back). Denies are not cached: every run is a
             first packet.
  hit_out    tc_port_out, g1 -> 203.0.113.9 UDP, a cached outbound flow, N
             outbound rules; the route for 203.0.113.0/24 is `drop`, so the
             frame is dropped after the firewall, unchanged.
  hit_in     xdp_underlay, Geneve UDP g2 -> g1 answering a flow g1 opened
             (cached), N inbound rules; decapsulated and redirected (single).
  first_out  tc_port_out, g1 -> 203.0.113.9 UDP, a new flow every run (one
             frame per run, distinct source ports: single timing only), N
             outbound rules walked, the default allow creates both entries,
             then the drop route.
  hit_out6   hit_out for an IPv6 flow (g1 -> 2001:db8::9, a drop route), N = 0.
and with the default rules: encap (tc_port_out, g1 -> g2 UDP, cached
flow, Geneve-encapsulated, TC_ACT_REDIRECT), encap6 (the same over IPv6),
decap (= hit_in at N=0 with the default rules), encap_nat and decap_nat
(the same for a flow g1 opened to the internet through its SNAT IP: NAT
on both sides, each by tail call), gateway ARP reply and gateway echo
reply (tc_port_out).
Goals (docs/design.md, "How it is proved"): the hit path flat in N; every
path within 3x the empty program.
"""
import argparse
import statistics
import time

import common  # noqa: F401  (first: the checkout's xdectl, the tests' frames)
from cases import BY_NAME, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_REDIRECT
from common import REPO, Programs, write_result
from frames import (BSVC_ADDR, BSVC_MAC, G1_IP6, G1_MAC, G2_IP, G2_IP6, GW_MAC, OXIDE, g1_frame,
                    geneve, geneve_opt, inner_udp, underlay_frame)
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from xdectl import fw, overlay
from xdelab.lab import GUESTS, VNI

RULE_COUNTS = (0, 16, 256, 1024)
DROP_NET = "203.0.113.0/24"
DROP_NET6 = "2001:db8::/32"
NAT_PEER = "198.18.0.1"           # on the internet (the default route, `ig`)
SNAT_IP = GUESTS["g1"]["external"].snat_ips[0]
PAYLOAD = b"b" * 64


# --- frames ------------------------------------------------------------------------

def from_g2(sport, dport):
    """g2's UDP to g1 in Geneve, as sw1 delivers it to sled1."""
    return underlay_frame(geneve() + inner_udp(PAYLOAD, sport=sport, dport=dport), chksum=0)


def from_g1(l4, dst):
    return g1_frame(l4 / Raw(PAYLOAD), dst=dst)


def from_g1_6(l4, dst):
    return Ether(src=G1_MAC, dst=GW_MAC) / IPv6(src=G1_IP6, dst=dst) / l4 / Raw(PAYLOAD)


# --- the bench ---------------------------------------------------------------------

class Bench:
    def __init__(self, lab, repeat, samples, rounds):
        self.lab, self.repeat, self.samples, self.rounds = lab, repeat, samples, rounds
        self.root = lab.root("sled1")
        self.progs = Programs(lab)
        self.rows = []

    def close(self):
        self.progs.close()

    # map access, in-process, inside sled1
    def rules(self, lines):
        with self.lab.inside("sled1"):
            fw.set_rules(self.root, "xde0", lines)
            fw.clear_flows(self.root, "xde0")

    def stats(self):
        return self.progs.stats()

    def snat_port(self, peer):
        """The external port of g1's flow to peer."""
        with self.lab.inside("sled1"):
            flows = fw.dump_flows(self.root, "xde0")
        nat = [f["nat"] for f in flows if f["dir"] == "out" and f["dst"] == peer and f["nat"]]
        assert nat, f"no translation for g1's flow to {peer}: {flows}"
        return int(nat[0]["external"].rsplit(":", 1)[1])

    def run(self, prog, frame, repeat=1):
        return self.progs.run_in(prog, frame, repeat)

    def time_repeat(self, prog, frame):
        rc, _, ns = self.run(prog, frame, self.repeat)
        return rc, ns

    def time_single(self, prog, frame):
        """Median of `samples` runs with repeat=1; frame may be a list of
        frames, one per run (a new flow each run)."""
        frames = frame if isinstance(frame, list) else [frame] * self.samples
        rcs, durs = set(), []
        with self.lab.inside("sled1"):
            for f in frames:
                rc, _, ns = self.progs.run(prog, f)
                rcs.add(rc)
                durs.append(ns)
        return rcs, statistics.median(durs)

    def measure(self, path, prog, frame, rules, method, expect_rc, check=None, prime=None, note=""):
        """Alternate the program and the empty one `rounds` times; medians."""
        empty = Programs.empty_of(prog)
        ours, base = [], []
        checks = []
        for _ in range(self.rounds):
            if prime:
                prime()
            before = self.stats()
            if method == "repeat":
                rc, ns = self.time_repeat(prog, frame)
                rcs = {rc}
            else:
                rcs, ns = self.time_single(prog, frame)
            after = self.stats()
            n = self.repeat if method == "repeat" else self.samples
            assert rcs == {expect_rc}, f"{path}: return codes {rcs}, expected {expect_rc}"
            if check:
                checks.append(check({k: after[k] - before[k] for k in after}, n))
            ours.append(ns)
            _, bns = (self.time_repeat(empty, frame) if method == "repeat"
                      else self.time_single(empty, frame[0] if isinstance(frame, list) else frame))
            base.append(bns)
        row = {"path": path, "prog": prog, "rules": rules, "method": method,
               "ns": statistics.median(ours), "empty_ns": statistics.median(base),
               "ns_all": ours, "empty_all": base, "rc": expect_rc, "note": note}
        row["ratio"] = row["ns"] / row["empty_ns"] if row["empty_ns"] else None
        row["net_ns"] = row["ns"] - row["empty_ns"]
        if checks:
            row["checks"] = checks[-1]
        self.rows.append(row)
        print(f"  {path:10} {prog:13} N={rules!s:>5} {method:7} {row['ns']:8.1f} ns  "
              f"empty {row['empty_ns']:6.1f} ns  x{row['ratio']:.2f}", flush=True)
        return row


def nonmatching(direction, n):
    """n rules that do not match the bench's UDP frames (TCP port lists)."""
    return [f"dir={direction} action=deny priority={i + 1} protocol=tcp ports={10000 + i}"
            for i in range(n)]


def walks(n_rules):
    def check(d, n):
        assert d["fw_denied"] == n and d["flow_misses"] == n and d["flow_hits"] == 0, \
            f"expected {n} rule walks: {d}"
        return {"fw_denied": d["fw_denied"], "flow_misses": d["flow_misses"]}
    return check


def hits(d, n):
    assert d["flow_hits"] == n and d["flow_misses"] == 0, f"expected {n} flow hits, no miss: {d}"
    return {"flow_hits": d["flow_hits"], "flow_misses": d["flow_misses"]}


def bench_all(b):
    # first packet: the inbound default deny after N rules, every run
    inbound_udp = from_g2(40000, 40001)
    for n in RULE_COUNTS:
        b.rules(nonmatching("in", n))
        for method in ("repeat", "single"):
            b.measure("first_in", "xdp_underlay", inbound_udp, n, method, XDP_DROP,
                      check=walks(n), note="default deny after N rules; not cached")

    # flow hit, outbound, ending in a drop route (frame unchanged: repeat is sound)
    with b.lab.inside("sled1"):
        overlay.add_router_entry(b.root, "xde0", DROP_NET, "drop")
        overlay.add_router_entry(b.root, "xde0", DROP_NET6, "drop")

    # first packet allowed, outbound: a new flow every run (one frame per run,
    # distinct source ports), N rules walked, the default allow creates both
    # entries, then the drop route
    new_flows = [from_g1(UDP(sport=1024 + i, dport=40003), "203.0.113.9")
                 for i in range(b.samples)]

    def allowed_walks(d, n):
        assert d["flow_misses"] == n and d["fw_allowed"] == n and d["flow_hits"] == 0, \
            f"expected {n} new flows: {d}"
        return {"flow_misses": d["flow_misses"], "fw_allowed": d["fw_allowed"]}
    for n in RULE_COUNTS:
        b.rules(nonmatching("out", n) + DEFAULT_IN)
        b.measure("first_out", "tc_port_out", new_flows, n, "single", TC_ACT_SHOT,
                  check=allowed_walks,
                  prime=lambda n=n: b.rules(nonmatching("out", n) + DEFAULT_IN),
                  note="new flow every run: N rules, default allow, 2 entries created, route drop")
    out_drop = from_g1(UDP(sport=40002, dport=40003), "203.0.113.9")
    for n in RULE_COUNTS:
        b.rules(nonmatching("out", n) + DEFAULT_IN)
        rc, _, _ = b.run("tc_port_out", out_drop)          # first packet: creates the flow
        assert rc == TC_ACT_SHOT, rc
        for method in ("repeat", "single"):
            b.measure("hit_out", "tc_port_out", out_drop, n, method, TC_ACT_SHOT, check=hits,
                      note="cached outbound flow, then route drop (frame unchanged)")
    # the same for an IPv6 flow, beside IPv4's at no rules
    out_drop6 = from_g1_6(UDP(sport=40002, dport=40003), "2001:db8::9")
    b.rules(DEFAULT_IN)
    rc, _, _ = b.run("tc_port_out", out_drop6)
    assert rc == TC_ACT_SHOT, rc
    for method in ("repeat", "single"):
        b.measure("hit_out6", "tc_port_out", out_drop6, 0, method, TC_ACT_SHOT, check=hits,
                  note="cached outbound IPv6 flow, then route drop (frame unchanged)")

    # flow hit, inbound: g2's reply to a flow g1 opened, decapsulated (single only)
    g1_open = from_g1(UDP(sport=40001, dport=40000), G2_IP)
    for n in RULE_COUNTS:
        b.rules(nonmatching("in", n))

        def prime():
            rc, _, _ = b.run("tc_port_out", g1_open)
            assert rc == TC_ACT_REDIRECT, rc
        prime()
        b.measure("hit_in", "xdp_underlay", inbound_udp, n, "single", XDP_REDIRECT, check=hits,
                  prime=prime, note="reply to a flow g1 opened; decap + redirect")

    # the default rules from here on
    b.rules(DEFAULT_IN)
    b.run("tc_port_out", g1_open)
    encap = from_g1(UDP(sport=40001, dport=40000), G2_IP)
    b.measure("encap", "tc_port_out", encap, 2, "single", TC_ACT_REDIRECT, check=hits,
              note="cached flow g1 -> g2, Geneve encap, fib lookup, redirect")
    b.measure("decap", "xdp_underlay", inbound_udp, 2, "single", XDP_REDIRECT, check=hits,
              note="cached flow g2 -> g1, decap, redirect")
    encap6 = from_g1_6(UDP(sport=40001, dport=40000), G2_IP6)
    b.run("tc_port_out", encap6)
    b.measure("encap6", "tc_port_out", encap6, 2, "single", TC_ACT_REDIRECT, check=hits,
              note="cached IPv6 flow g1 -> g2, Geneve encap, fib lookup, redirect")
    # NAT: a flow g1 opened to the internet through its SNAT IP (a drop-free
    # destination: the route to DROP_NET is `drop`), and the reply to it
    nat_out = from_g1(UDP(sport=40007, dport=40008), NAT_PEER)
    rc, _, _ = b.run("tc_port_out", nat_out)            # first packet: a SNAT port
    assert rc == TC_ACT_REDIRECT, rc
    ext_port = b.snat_port(NAT_PEER)
    b.measure("encap_nat", "tc_port_out", nat_out, 2, "single", TC_ACT_REDIRECT, check=hits,
              note="cached flow g1 -> internet: NAT (tc_nat, by tail call), encap toward "
                   "boundary services")
    reply = underlay_frame(geneve(opts=geneve_opt(OXIDE, 0)) + bytes(
        Ether(dst=G1_MAC, src=BSVC_MAC) / IP(src=NAT_PEER, dst=SNAT_IP) /
        UDP(sport=40008, dport=ext_port) / Raw(PAYLOAD)), src=BSVC_ADDR, chksum=0)
    b.measure("decap_nat", "xdp_underlay", reply, 2, "single", XDP_REDIRECT, check=hits,
              note="the internet's reply to g1's SNAT IP: NAT (xdp_nat, by tail call, "
                   "then the pipeline again), decap")
    # the gateway's replies: frames and verdicts from the fixture table
    for path, case in (("gw_arp", BY_NAME["gw_arp_gateway"]), ("gw_echo", BY_NAME["gw_echo"])):
        b.measure(path, case.prog, case.frame, 2, "single", case.verdict,
                  note=f"tests/cases.py {case.name}: the gateway's reply, hairpinned")


DEFAULT_IN = [r.text() for r in fw.default_rules(VNI)]


def table(rows):
    lines = ["| path | program | rules | timing | ns/pkt | empty ns | ratio | net ns |",
             "| ---- | ------- | ----- | ------ | ------ | -------- | ----- | ------ |"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['prog']} | {r['rules']} | {r['method']} | "
                     f"{r['ns']:.1f} | {r['empty_ns']:.1f} | {r['ratio']:.2f} | {r['net_ns']:.1f} |")
    return "\n".join(lines)


def plot(rows, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for path, method, style in (("first_in", "repeat", "o-"), ("hit_out", "repeat", "s-"),
                                ("hit_in", "single", "^-"), ("first_in", "single", "o:"),
                                ("hit_out", "single", "s:"), ("first_out", "single", "d:")):
        pts = [(r["rules"], r["ns"]) for r in rows if r["path"] == path and r["method"] == method]
        if pts:
            a1.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{path} ({method})")
    for method, style in (("repeat", "--"), ("single", "-.")):
        e = [r["empty_ns"] for r in rows if r["method"] == method and r["path"] != "encap"]
        if e:
            a1.axhline(statistics.median(e), color="grey", ls=style, lw=1,
                       label=f"empty program ({method})")
    a1.set_xscale("symlog", linthresh=16)
    a1.set_xlim(0, 1400)
    a1.set_yscale("log")
    a1.set_xticks(list(RULE_COUNTS))
    a1.set_xticklabels([str(n) for n in RULE_COUNTS])
    a1.set_xlabel("rules that do not match")
    a1.set_ylabel("ns per packet (median)")
    a1.set_title("first packet vs flow-table hit")
    a1.legend(fontsize=7)
    fixed = [r for r in rows if r["path"] in ("encap", "encap6", "decap", "gw_arp", "gw_echo")] + \
        [r for r in rows if r["path"] in ("hit_out", "hit_out6", "first_in") and r["rules"] == 0
         and r["method"] == "repeat"]
    labels = [f"{r['path']}\n({r['method']})" for r in fixed]
    a2.bar(labels, [r["ratio"] for r in fixed], color="tab:blue")
    a2.axhline(3, color="red", ls="--", lw=1, label="goal: 3x empty")
    a2.set_ylabel("x empty program of the same type")
    a2.set_title("paths against the empty program")
    a2.tick_params(axis="x", labelsize=7)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200000, help="repeat for the repeat timing")
    ap.add_argument("--samples", type=int, default=3000, help="repeat=1 runs per single timing")
    ap.add_argument("--rounds", type=int, default=5, help="alternations with the empty program")
    ap.add_argument("--out", default=str(REPO / "bench/results/prog.json"))
    args = ap.parse_args()

    t0 = time.monotonic()
    with common.lab("p") as lab:
        print(f"lab {lab.prefix} up; repeat={args.repeat} samples={args.samples} "
              f"rounds={args.rounds}", flush=True)
        b = Bench(lab, args.repeat, args.samples, args.rounds)
        try:
            bench_all(b)
        finally:
            b.close()
    rows = b.rows
    hit = {r["rules"]: r["ns"] for r in rows if r["path"] == "hit_out" and r["method"] == "repeat"}
    first = {r["rules"]: r["ns"] for r in rows if r["path"] == "first_in" and r["method"] == "repeat"}
    summary = {
        "hit_out_1024_over_0": hit[1024] / hit[0],
        "first_in_1024_over_0": first[1024] / first[0],
        "first_in_ns_per_rule": (first[1024] - first[0]) / 1024,
        # an IPv6 flow next to an IPv4 one, same run, no rules
        "hit_out6_over_hit_out": next(r["ns"] for r in rows if r["path"] == "hit_out6"
                                      and r["method"] == "repeat") / hit[0],
        "encap6_over_encap": next(r["ns"] for r in rows if r["path"] == "encap6") /
        next(r["ns"] for r in rows if r["path"] == "encap"),
        "within_3x_empty": {f"{r['path']}/{r['rules']}/{r['method']}": r["ratio"] <= 3 for r in rows},
    }
    out = write_result(args.out, {"repeat": args.repeat, "samples": args.samples,
                                  "rounds": args.rounds, "seconds": time.monotonic() - t0,
                                  "rows": rows, "summary": summary})
    print()
    print(table(rows))
    print()
    print(f"hit_out N=1024 / N=0: {summary['hit_out_1024_over_0']:.2f}   "
          f"first_in N=1024 / N=0: {summary['first_in_1024_over_0']:.2f}   "
          f"first_in per rule: {summary['first_in_ns_per_rule']:.2f} ns")
    print(f"IPv6 / IPv4: flow hit {summary['hit_out6_over_hit_out']:.2f}   "
          f"encap {summary['encap6_over_encap']:.2f}")
    png = out.with_suffix(".png")
    if plot(rows, png):
        print(f"wrote {out} and {png}")
    else:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
