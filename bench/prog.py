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
and with the default rules: encap (tc_port_out, g1 -> g2 UDP, cached
flow, Geneve-encapsulated, TC_ACT_REDIRECT), decap (= hit_in at N=0 with the
default rules), gateway ARP reply and gateway echo reply (tc_port_out).
Goals (docs/design.md, "How it is proved"): the hit path flat in N; every
path within 3x the empty program.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import secrets
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import xdectl  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from xdectl import fw, libbpf, overlay
from xdectl.datapath import Datapath
from xdelab.lab import GW_IP, GW_MAC, SLEDS, VNI, Lab
from xdectl import counters
from xdectl.maps import find_port

G1, G2 = SLEDS["sled1"], SLEDS["sled2"]
RULE_COUNTS = (0, 16, 256, 1024)
SKB_CTX_SIZE, SKB_IFINDEX_OFF = 192, 40
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
DROP_NET = "203.0.113.0/24"
PAYLOAD = b"b" * 64

EMPTY = """
int xdp_empty(struct xdp_md *ctx) { return 2; /* XDP_PASS */ }
int tc_empty(struct __sk_buff *skb) { return 0; /* TC_ACT_OK */ }
"""


# --- frames ------------------------------------------------------------------------

def geneve(vni=VNI):
    return bytes([0, 0]) + b"\x65\x58" + vni.to_bytes(3, "big") + b"\0"


def underlay(inner):
    """Geneve over IPv6 to sled1's underlay address, as sw1 would deliver it."""
    return bytes(Ether(dst="02:00:00:00:01:01", src="02:00:00:00:01:02") /
                 IPv6(src=G2["addr"], dst=G1["addr"], hlim=128) /
                 UDP(sport=50000, dport=6081, chksum=0) / Raw(geneve() + inner))


def from_g2(l4):
    return bytes(Ether(dst=G1["mac"], src=G2["mac"]) / IP(src=G2["guest_ip"], dst=G1["guest_ip"]) / l4)


def from_g1(l4, dst):
    return bytes(Ether(src=G1["mac"], dst=GW_MAC) / IP(src=G1["guest_ip"], dst=dst) / l4)


# --- the bench ---------------------------------------------------------------------

class Bench:
    def __init__(self, lab, repeat, samples, rounds):
        self.lab, self.repeat, self.samples, self.rounds = lab, repeat, samples, rounds
        self.root = lab.root("sled1")
        with lab.inside("sled1"):
            out = subprocess.run(["ip", "-j", "link", "show", "xde0_dp"], capture_output=True,
                                 text=True, check=True).stdout
        self.ctx = bytearray(SKB_CTX_SIZE)
        struct.pack_into("<I", self.ctx, SKB_IFINDEX_OFF, json.loads(out)[0]["ifindex"])
        self.ctx = bytes(self.ctx)
        self.fds = {p: libbpf.obj_get(f"{self.root}/progs/{p}") for p in ("xdp_underlay", "tc_port_out")}
        from bcc import BPF
        self.bpf = BPF(text=EMPTY)
        self.fds["xdp_empty"] = self.bpf.load_func("xdp_empty", BPF.XDP).fd
        self.fds["tc_empty"] = self.bpf.load_func("tc_empty", BPF.SCHED_CLS).fd
        self.rows = []

    def close(self):
        for name in ("xdp_underlay", "tc_port_out"):
            os.close(self.fds[name])
        self.bpf.cleanup()

    # map access, in-process, inside sled1
    def rules(self, lines):
        with self.lab.inside("sled1"):
            fw.set_rules(self.root, "xde0", lines)
            fw.clear_flows(self.root, "xde0")

    def stats(self):
        with self.lab.inside("sled1"):
            dp = Datapath(self.root)
            try:
                maps = dp.maps()
                index, _ = find_port(maps, "xde0")
                return counters.port_counts(maps, index).flat()
            finally:
                dp.close()

    def run(self, prog, frame, repeat=1):
        ctx = self.ctx if prog.startswith("tc_") else None
        with self.lab.inside("sled1"):
            return libbpf.test_run(self.fds[prog], frame, repeat=repeat, ctx=ctx)

    def time_repeat(self, prog, frame):
        rc, _, ns = self.run(prog, frame, self.repeat)
        return rc, ns

    def time_single(self, prog, frame):
        """Median of `samples` runs with repeat=1; frame may be a list of
        frames, one per run (a new flow each run)."""
        frames = frame if isinstance(frame, list) else [frame] * self.samples
        rcs, durs = set(), []
        with self.lab.inside("sled1"):
            ctx = self.ctx if prog.startswith("tc_") else None
            fd = self.fds[prog]
            for f in frames:
                rc, _, ns = libbpf.test_run(fd, f, 1, ctx)
                rcs.add(rc)
                durs.append(ns)
        return rcs, statistics.median(durs)

    def measure(self, path, prog, frame, rules, method, expect_rc, check=None, prime=None, note=""):
        """Alternate the program and the empty one `rounds` times; medians."""
        empty = "xdp_empty" if prog.startswith("xdp") else "tc_empty"
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
    inbound_udp = underlay(from_g2(UDP(sport=40000, dport=40001) / Raw(PAYLOAD)))
    for n in RULE_COUNTS:
        b.rules(nonmatching("in", n))
        for method in ("repeat", "single"):
            b.measure("first_in", "xdp_underlay", inbound_udp, n, method, XDP_DROP,
                      check=walks(n), note="default deny after N rules; not cached")

    # flow hit, outbound, ending in a drop route (frame unchanged: repeat is sound)
    with b.lab.inside("sled1"):
        overlay.add_router_entry(b.root, "xde0", DROP_NET, "drop")

    # first packet allowed, outbound: a new flow every run (one frame per run,
    # distinct source ports), N rules walked, the default allow creates both
    # entries, then the drop route
    new_flows = [from_g1(UDP(sport=1024 + i, dport=40003) / Raw(PAYLOAD), "203.0.113.9")
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
    out_drop = from_g1(UDP(sport=40002, dport=40003) / Raw(PAYLOAD), "203.0.113.9")
    for n in RULE_COUNTS:
        b.rules(nonmatching("out", n) + DEFAULT_IN)
        rc, _, _ = b.run("tc_port_out", out_drop)          # first packet: creates the flow
        assert rc == TC_ACT_SHOT, rc
        for method in ("repeat", "single"):
            b.measure("hit_out", "tc_port_out", out_drop, n, method, TC_ACT_SHOT, check=hits,
                      note="cached outbound flow, then route drop (frame unchanged)")

    # flow hit, inbound: g2's reply to a flow g1 opened, decapsulated (single only)
    g1_open = from_g1(UDP(sport=40001, dport=40000) / Raw(PAYLOAD), G2["guest_ip"])
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
    encap = from_g1(UDP(sport=40001, dport=40000) / Raw(PAYLOAD), G2["guest_ip"])
    b.measure("encap", "tc_port_out", encap, 2, "single", TC_ACT_REDIRECT, check=hits,
              note="cached flow g1 -> g2, Geneve encap, fib lookup, redirect")
    b.measure("decap", "xdp_underlay", inbound_udp, 2, "single", XDP_REDIRECT, check=hits,
              note="cached flow g2 -> g1, decap, redirect")
    arp = bytes(Ether(src=G1["mac"], dst="ff:ff:ff:ff:ff:ff") /
                ARP(op=1, hwsrc=G1["mac"], psrc=G1["guest_ip"], pdst=GW_IP))
    b.measure("gw_arp", "tc_port_out", arp, 2, "single", TC_ACT_REDIRECT,
              note="ARP reply from the gateway, hairpinned")
    echo = from_g1(ICMP(type=8, id=0x4242, seq=1) / Raw(PAYLOAD), GW_IP)
    b.measure("gw_echo", "tc_port_out", echo, 2, "single", TC_ACT_REDIRECT,
              note="echo reply from the gateway, hairpinned")


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
    fixed = [r for r in rows if r["path"] in ("encap", "decap", "gw_arp", "gw_echo")] + \
        [r for r in rows if r["path"] in ("hit_out", "first_in") and r["rules"] == 0
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
    ap.add_argument("--out", default=str(ROOT / "bench/results/prog.json"))
    args = ap.parse_args()
    assert os.geteuid() == 0, "run as root"

    lab = Lab(f"xp{secrets.token_hex(2)[:3]}-")
    t0 = time.monotonic()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            lab.up()
        for i in (1, 2):   # next hops resolved: encap measures the common case
            lab.run("sled1", "ping", "-6", "-c", "1", "-W", "1", f"fd10:1:{i}::2",
                    capture_output=True)
        print(f"lab {lab.prefix} up; repeat={args.repeat} samples={args.samples} "
              f"rounds={args.rounds}", flush=True)
        b = Bench(lab, args.repeat, args.samples, args.rounds)
        try:
            bench_all(b)
        finally:
            b.close()
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            lab.down(quiet=True)
    rows = b.rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hit = {r["rules"]: r["ns"] for r in rows if r["path"] == "hit_out" and r["method"] == "repeat"}
    first = {r["rules"]: r["ns"] for r in rows if r["path"] == "first_in" and r["method"] == "repeat"}
    summary = {
        "hit_out_1024_over_0": hit[1024] / hit[0],
        "first_in_1024_over_0": first[1024] / first[0],
        "first_in_ns_per_rule": (first[1024] - first[0]) / 1024,
        "within_3x_empty": {f"{r['path']}/{r['rules']}/{r['method']}": r["ratio"] <= 3 for r in rows},
    }
    doc = {"kernel": platform.release(), "cpus": os.cpu_count(), "repeat": args.repeat,
           "samples": args.samples, "rounds": args.rounds, "seconds": time.monotonic() - t0,
           "command": " ".join([".venv/bin/python", "bench/prog.py"] + sys.argv[1:]),
           "rows": rows, "summary": summary}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(table(rows))
    print()
    print(f"hit_out N=1024 / N=0: {summary['hit_out_1024_over_0']:.2f}   "
          f"first_in N=1024 / N=0: {summary['first_in_1024_over_0']:.2f}   "
          f"first_in per rule: {summary['first_in_ns_per_rule']:.2f} ns")
    png = out.with_suffix(".png")
    if plot(rows, png):
        print(f"wrote {out} and {png}")
    else:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
