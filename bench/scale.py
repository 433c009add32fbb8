"""ns per packet of encap and decap as the V2P and flow tables grow
(docs/design.md, "How it is proved"; goal: flat within 1.2x).

    .venv/bin/python bench/scale.py [--samples 2000] [--rounds 5]
                                    [--out bench/results/scale.json]

Builds a lab of its own (`xdelab.lab.Lab`, prefix `xs<3 hex>-`, always torn
down) and runs sled1's pinned programs with BPF_PROG_TEST_RUN inside sled1's
namespace (tc_port_out gets a 192-byte struct __sk_buff ctx with ifindex =
xde0_dp at offset 40; xdp_underlay needs no ctx), against EMPTY programs of
the same types (`return TC_ACT_OK` / `return XDP_PASS`, compiled with bcc in
the same run), timed the same way on the same frames, alternating.

Timing: "single" only -- the median over `samples` separate runs with
repeat=1. Encap and decap rewrite the frame, and with repeat > 1 the kernel
runs later iterations on the already rewritten frame (docs/design.md,
"Kernel constraints"), so repeat > 1 would time
encap-of-an-encapsulated-frame. Each figure carries the kernel's per-call
timer overhead, the same for the empty program; the ratio to the empty
program and to the first size are what to read.

Paths (both flow hits, the counters are checked: every run a hit, no miss):
  encap  tc_port_out, g1 -> g2 UDP of an established flow: flow hit, router,
         V2P lookup, Geneve encap, fib lookup, TC_ACT_REDIRECT.
  decap  xdp_underlay, Geneve from sled2 with g2's reply: port lookup, flow
         hit (inbound), decap, XDP_REDIRECT.
Two traffic shapes:
  hot    one flow, the same frame every run (the tables' entry stays in cache).
  spread `samples` different flows, one frame each run, whose entries were
         spread through the table when it was filled (cache-cold lookups).

Dimensions:
  v2p    entries in the V2P map: 1 (only g2's mapping: the port's own is
         removed for the run), 1k, 100k, 1M (map max 1,048,576), filled with
         batched map updates (BPF_MAP_UPDATE_BATCH, as `xdectl load-v2p`).
         spread: the fill's entries are in 100.64.0.0/10, routed by a custom
         `sub4` router entry, so each spread flow's encap looks up a
         different V2P entry; decap does not read V2P (shown for completeness).
  flows  entries in the flows LRU hash (max 262,144): 1k, 10k, 100k, 262,144,
         1M attempted. Fill entries are real-looking established g1 <-> g2 UDP
         flows (both directions, current epoch, fresh timestamps). Beyond
         the maximum the LRU evicts: the table holds what `occupancy` shows,
         and the spread shape reports the share of its flows still present
         (hit rate) -- the rest are first packets again.
"""
import argparse
import ipaddress
import random
import statistics
import time

import common  # noqa: F401  (first: the checkout's xdectl, the tests' frames)
from common import REPO, Programs, write_result
from frames import G1_IP, G2_IP, U2_ADDR, g1_frame, geneve, inner_udp, underlay_frame
from scapy.layers.inet import UDP
from scapy.packet import Raw

from xdectl import counters, fw, overlay
from xdectl.datapath import Datapath
from xdectl.maps import addr16, mac_bytes, set_bytes
from xdectl.overlay import v2p_key
from xdelab.lab import VNI

XDP_REDIRECT, TC_ACT_REDIRECT = 4, 7
PAYLOAD = b"s" * 64
V2P_SIZES = (1, 1000, 100_000, 1_000_000)
FLOW_SIZES = (1000, 10_000, 100_000, 262_144, 1_000_000)
FILL_NET = ipaddress.IPv4Network("100.64.0.0/10")
BATCH = 4096


def be16(v):
    return int.from_bytes(v.to_bytes(2, "big"), "little")


def encap_frame(sport, dport, dst=G2_IP):
    return g1_frame(UDP(sport=sport, dport=dport) / Raw(PAYLOAD), dst=dst)


def decap_frame(sport, dport):
    """g2's UDP reply (sport -> dport) in Geneve from sled2, for g1."""
    return underlay_frame(geneve() + inner_udp(PAYLOAD, sport=sport, dport=dport), chksum=0)


class Scale:
    def __init__(self, lab, samples, rounds, seed):
        self.lab, self.samples, self.rounds = lab, samples, rounds
        self.rng = random.Random(seed)
        self.root = lab.root("sled1")
        self.progs = Programs(lab)
        self.port = self.progs.port
        with lab.inside("sled1"):
            self.dp = Datapath(self.root)
            self.maps = self.dp.maps()
        self.rows = []
        self.first = {}
        self.flow_fill = 0
        self.v2p_fill = 0

    def close(self):
        self.progs.close()
        self.dp.close()

    # --- running -------------------------------------------------------------------

    def stats(self):
        return counters.port_counts(self.maps, self.port).flat()

    def runs(self, prog, frames):
        """(set of return codes, median ns) over one repeat=1 run per frame."""
        rcs, durs = set(), []
        with self.lab.inside("sled1"):
            for f in frames:
                rc, _, ns = self.progs.run(prog, f)
                rcs.add(rc)
                durs.append(ns)
        return rcs, statistics.median(durs)

    def prime(self, flows):
        """Open the flows g1 -> g2 (sport, dport) through the program."""
        with self.lab.inside("sled1"):
            for sp, dp in flows:
                rc, _, _ = self.progs.run("tc_port_out", encap_frame(sp, dp))
                assert rc == TC_ACT_REDIRECT, rc

    def measure(self, dim, size, path, shape, frames, expect_rc, occupancy, hits_required=True):
        prog = "tc_port_out" if path == "encap" else "xdp_underlay"
        empty = Programs.empty_of(prog)
        ours, base, hit_rates = [], [], []
        for _ in range(self.rounds):
            before = self.stats()
            rcs, ns = self.runs(prog, frames)
            after = self.stats()
            d = {k: after[k] - before[k] for k in after}
            hit_rates.append(d["flow_hits"] / len(frames))
            if hits_required:
                assert rcs == {expect_rc}, f"{dim}/{size}/{path}/{shape}: return codes {rcs}"
                assert d["flow_hits"] == len(frames) and d["flow_misses"] == 0, \
                    f"{dim}/{size}/{path}/{shape}: expected {len(frames)} flow hits: {d}"
            ours.append(ns)
            base.append(self.runs(empty, frames)[1])
        row = {"dim": dim, "size": size, "path": path, "shape": shape, "prog": prog,
               "ns": statistics.median(ours), "empty_ns": statistics.median(base),
               "ns_all": ours, "empty_all": base, "occupancy": occupancy,
               "hit_rate": min(hit_rates), "runs": len(frames)}
        row["vs_empty"] = row["ns"] / row["empty_ns"]
        key = (dim, path, shape)
        self.first.setdefault(key, row["ns"])
        row["vs_first"] = row["ns"] / self.first[key]
        self.rows.append(row)
        print(f"  {dim:5} {size:>9,} {path:5} {shape:6} {row['ns']:8.1f} ns  empty "
              f"{row['empty_ns']:6.1f}  x{row['vs_empty']:.2f} empty  x{row['vs_first']:.2f} first"
              f"  occ {occupancy:,}  hits {row['hit_rate']:.0%}", flush=True)
        return row

    # --- V2P ---------------------------------------------------------------------------

    def v2p_count(self):
        return len(self.maps["v2p"].keys())

    def fill_v2p(self, total):
        """Add filler mappings in 100.64.0.0/10 until V2P holds `total`."""
        m = self.maps["v2p"]
        have = self.v2p_count()
        base = int(FILL_NET.network_address)
        under = ipaddress.IPv6Address(U2_ADDR).packed
        while have < total:
            n = min(BATCH, total - have)
            pairs = []
            for i in range(self.v2p_fill, self.v2p_fill + n):
                k = v2p_key(m, VNI, ipaddress.IPv4Address(base + i))
                v = m.Leaf()
                set_bytes(v.mac, mac_bytes(f"a8:40:25:{(i >> 16) & 0xff:02x}:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"))
                set_bytes(v.underlay, under)
                pairs.append((k, v))
            m.update_batch(pairs)
            self.v2p_fill += n
            have += n
        return self.v2p_count()

    def bench_v2p(self):
        # V2P at 1: only g2's mapping (the port's own is put back afterwards)
        own = v2p_key(self.maps["v2p"], VNI, G1_IP)
        own_val = self.maps["v2p"].get(own)
        self.maps["v2p"].delete(own)
        with self.lab.inside("sled1"):
            overlay.add_router_entry(self.root, "xde0", str(FILL_NET), f"sub4={FILL_NET}")
        hot = (41000, 42000)
        self.prime([hot])
        try:
            for size in V2P_SIZES:
                occ = self.fill_v2p(size)
                assert occ == size, f"V2P holds {occ}, wanted {size}"
                self.measure("v2p", size, "encap", "hot", [encap_frame(*hot)] * self.samples,
                             TC_ACT_REDIRECT, occ)
                self.measure("v2p", size, "decap", "hot", [decap_frame(hot[1], hot[0])] * self.samples,
                             XDP_REDIRECT, occ)
                # spread: flows to filler destinations (g2's mapping at size 1)
                n = self.v2p_fill
                dsts = ([G2_IP] if n == 0 else
                        [str(ipaddress.IPv4Address(int(FILL_NET.network_address) + self.rng.randrange(n)))
                         for _ in range(self.samples)])
                flows = [(20000 + j % 40000, 30000 + j // 40000) for j in range(self.samples)]
                frames = [encap_frame(sp, dp, dst=dsts[j % len(dsts)]) for j, (sp, dp) in enumerate(flows)]
                with self.lab.inside("sled1"):
                    for f in frames:       # open the flows
                        rc, _, _ = self.progs.run("tc_port_out", f)
                        assert rc == TC_ACT_REDIRECT, rc
                self.measure("v2p", size, "encap", "spread", frames, TC_ACT_REDIRECT, occ)
                self._clear_flows(keep=[hot])
        finally:
            with self.lab.inside("sled1"):
                overlay.del_router_entry(self.root, "xde0", str(FILL_NET))
            if own_val is not None:
                self.maps["v2p"].set(own, own_val)
            self._clear_v2p_fill()

    def _clear_v2p_fill(self):
        m = self.maps["v2p"]
        base = int(FILL_NET.network_address)
        for i in range(self.v2p_fill):
            m.delete(v2p_key(m, VNI, ipaddress.IPv4Address(base + i)))
        self.v2p_fill = 0

    # --- flows ---------------------------------------------------------------------------

    def epoch(self):
        m = self.maps["ports"]
        return m.get(m.Key(self.port)).fw_epoch

    def flow_pairs(self, first, n, epoch, now):
        """Entries of established UDP flows g1:sport -> g2:dport, both directions."""
        m = self.maps["flows"]
        g1, g2 = addr16(G1_IP), addr16(G2_IP)
        pairs = []
        for j in range(first, first + n):
            flow, d = divmod(j, 2)
            sp, dp = 1024 + flow % 60000, 1024 + flow // 60000
            k = m.Key()
            k.port, k.dir, k.proto = self.port, d, 17
            src, dst, k.sport, k.dport = ((g1, g2, be16(sp), be16(dp)) if d == 0 else
                                          (g2, g1, be16(dp), be16(sp)))
            set_bytes(k.src, src)
            set_bytes(k.dst, dst)
            v = m.Leaf()
            v.created_ns = v.last_ns = now
            v.packets, v.bytes, v.epoch, v.rule, v.vni, v.origin = 1, 100, epoch, 0, VNI, 0
            pairs.append((k, v))
        return pairs

    def fill_flows(self, target):
        m = self.maps["flows"]
        epoch = self.epoch()
        while self.flow_fill < target:
            n = min(BATCH, target - self.flow_fill)
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC_COARSE)  # the datapath's clock
            m.update_batch(self.flow_pairs(self.flow_fill, n, epoch, now))
            self.flow_fill += n
        return len(m.keys())

    def _clear_flows(self, keep=()):
        m = self.maps["flows"]
        for k in m.keys():
            m.delete(k)
        self.flow_fill = 0
        if keep:
            self.prime(keep)

    def bench_flows(self):
        # the fill's entries must not expire (60 s idle) while the bigger sizes fill
        with self.lab.inside("sled1"):
            fw.set_timeouts(self.root, idle=86400)
        self._clear_flows()
        hot = (41000, 42000)       # outside the fill's port ranges
        for size in FLOW_SIZES:
            occ = self.fill_flows(size)
            self.prime([hot])       # the hot flow: (re)opened after the fill, so it is recent
            occ = len(self.maps["flows"].keys())
            self.measure("flows", size, "encap", "hot", [encap_frame(*hot)] * self.samples,
                         TC_ACT_REDIRECT, occ)
            self.measure("flows", size, "decap", "hot", [decap_frame(hot[1], hot[0])] * self.samples,
                         XDP_REDIRECT, occ)
            # spread: fill flows picked at random over the whole fill; beyond the
            # table's size some were evicted (hit rate < 100%: first packets again)
            picks = [self.rng.randrange(size // 2) for _ in range(self.samples)]
            fl = [(1024 + f % 60000, 1024 + f // 60000) for f in picks]
            full = size <= self.maps["flows"].max_entries // 2
            self.measure("flows", size, "encap", "spread", [encap_frame(sp, dp) for sp, dp in fl],
                         TC_ACT_REDIRECT, occ, hits_required=full)
            self.measure("flows", size, "decap", "spread", [decap_frame(dp, sp) for sp, dp in fl],
                         XDP_REDIRECT, occ, hits_required=full)
        self._clear_flows()


def table(rows):
    lines = ["| table | entries (occupancy) | path | traffic | ns/pkt | empty ns | x empty | x first size | flow hits |",
             "| ----- | ------------------- | ---- | ------- | ------ | -------- | ------- | ------------ | --------- |"]
    for r in rows:
        occ = f"{r['size']:,}" + (f" ({r['occupancy']:,})" if r["occupancy"] != r["size"] else "")
        lines.append(f"| {r['dim']} | {occ} | {r['path']} | {r['shape']} | {r['ns']:.0f} | "
                     f"{r['empty_ns']:.0f} | {r['vs_empty']:.2f} | {r['vs_first']:.2f} | "
                     f"{r['hit_rate']:.0%} |")
    return "\n".join(lines)


def plot(rows, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, dim in zip(axes, ("v2p", "flows")):
        for path, shape, style in (("encap", "hot", "o-"), ("decap", "hot", "s-"),
                                   ("encap", "spread", "o:"), ("decap", "spread", "s:")):
            pts = [(r["size"], r["ns"]) for r in rows
                   if r["dim"] == dim and r["path"] == path and r["shape"] == shape]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{path} {shape}")
        for path, style in (("encap", "--"), ("decap", "-.")):
            e = [r["empty_ns"] for r in rows if r["dim"] == dim and r["path"] == path]
            if e:
                ax.axhline(statistics.median(e), color="grey", ls=style, lw=1,
                           label=f"empty {'tc' if path == 'encap' else 'xdp'} program")
        if dim == "flows":
            ax.axvline(262144, color="red", lw=1, ls=":", label="flows max_entries")
        ax.set_xscale("log")
        ax.set_xlabel(f"{dim} entries")
        ax.set_ylabel("ns per packet (median, repeat=1)")
        ax.set_title(f"scale: {dim}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="repeat=1 runs per figure")
    ap.add_argument("--rounds", type=int, default=5, help="alternations with the empty program")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "bench/results/scale.json"))
    args = ap.parse_args()
    t0 = time.monotonic()
    with common.lab("s") as lab:
        print(f"lab {lab.prefix} up; samples={args.samples} rounds={args.rounds}", flush=True)
        s = Scale(lab, args.samples, args.rounds, args.seed)
        try:
            s.bench_v2p()
            s.bench_flows()
        finally:
            s.close()
    rows = s.rows
    flat = {f"{r['dim']}/{r['path']}/{r['shape']}/{r['size']}": r["vs_first"] <= 1.2 for r in rows}
    out = write_result(args.out, {
        "samples": args.samples, "rounds": args.rounds, "timing": "median of repeat=1 runs",
        "seconds": time.monotonic() - t0, "flows_max_entries": 262144, "rows": rows,
        "summary": {"flat_within_1.2x": flat, "all_flat": all(flat.values())}})
    print()
    print(table(rows))
    print()
    print(f"flat within 1.2x of the first size: {sum(flat.values())}/{len(flat)}")
    png = out.with_suffix(".png")
    print(f"wrote {out}" + (f" and {png}" if plot(rows, png) else ""))


if __name__ == "__main__":
    main()
