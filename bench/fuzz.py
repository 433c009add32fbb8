#!/usr/bin/env python3
"""Differential fuzzing: the reference model (tests/model, written from
docs/design.md) against the real programs, run with BPF_PROG_TEST_RUN in a
lab of its own, on --cases generated cases (valid, edge and malformed guest
frames of both families, DHCPv4, DHCPv6 and neighbour discovery, Geneve
frames, non-Geneve underlay traffic, short stateful sequences, some
with a change to the port's rules between two frames, and NAT: g1's
traffic with the internet through its SNAT IPs, its replies, ICMP errors,
unsolicited and stale traffic, exhaustion, changes of its external
addresses; with --guest g2, g2's through its floating IPs).
Reports mismatches by kind, the counters the model moved (what the run
covered) and what it never reached; goal: 0 outside the known datapath
bugs (tests/model/gen.py known_bug, listed apart by the frames they made
disagree).

    sudo .venv/bin/python bench/fuzz.py --cases 100000 [--seed N] [--json out.json]
        [--kinds dhcp6,ndp] [--guest g3|g2]
"""
import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import common  # first: puts the checkout and tests/ on the import path
from model import gen, setup
from model.harness import SledRunner, next_hops, run_case


# what a run should reach: every event and drop reason a frame can cause
# without a broken kernel (not tail_call, load/store/resize/csum_failed,
# no_scratch, no_underlay, unknown_port, passthrough, underlay_detours), in
# the lab's routes (never no_route: both families have a default route),
# through BPF_PROG_TEST_RUN (never malformed_inner from the guest: the
# kernel refuses a frame shorter than Ethernet)
# (NAT: never nat_table_full, which needs 131,072 translations)
COVER = ["encap", "decap", "rx_packets", "tx_packets", "arp_replies", "icmp_replies",
         "mtu_icmp_sent", "dhcp4_replies", "dhcp6_replies", "ndp_replies", "flow_hits",
         "flow_misses", "flow_reevaluated", "fw_allowed", "fw_denied", "passed_to_host",
         "nat_out", "nat_in", "snat_allocated", "snat_reclaimed"] + \
    [f"drop_out_{r}" for r in ("malformed_ipv4", "malformed_ipv6",
                               "unsupported", "spoof", "arp", "ndp", "dhcp4", "dhcp6",
                               "link_local", "firewall", "mtu", "router", "no_v2p",
                               "no_port_local", "no_external_ip", "nat_exhausted",
                               "nat_untranslatable", "no_nat")] + \
    [f"drop_in_{r}" for r in ("malformed_truncated", "malformed_version", "malformed_options",
                              "malformed_critical_option", "malformed_protocol",
                              "malformed_inner", "malformed_ipv4", "malformed_ipv6",
                              "unsupported", "arp_in_geneve", "no_port", "ndp", "link_local",
                              "firewall", "no_nat", "nat_untranslatable")]
# g2 (--guest g2): its floating IPs only, both ways
COVER_G2 = ["encap", "decap", "rx_packets", "tx_packets", "flow_hits", "flow_misses",
            "fw_allowed", "fw_denied", "nat_out", "nat_in", "drop_out_nat_untranslatable",
            "drop_in_firewall", "drop_in_no_nat", "drop_in_nat_untranslatable"]


def kind_of(mismatch):
    """A mismatch string without its numbers: the kind it is counted by."""
    return re.sub(r"0x[0-9a-f]+|\(\d+, \d+\)|\d+", "N", mismatch)[:160]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0, help="first case seed")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--prefix", help="lab prefix (default xd<3 hex>-)")
    ap.add_argument("--examples", type=int, default=3, help="examples kept per mismatch kind")
    ap.add_argument("--kinds", help="only these generator kinds (comma-separated, e.g. "
                    "ndp,dhcp6 or out/ipv6)")
    ap.add_argument("--guest", choices=("g1", "g3", "g2"), default="g1",
                    help="g1: sled1's dual-stack xde0, every kind (default); g3: sled2's "
                    "IPv6-only xde3, the outbound cases as g3 sends them; g2: sled2's xde0, "
                    "the NAT kinds through its floating IPs")
    a = ap.parse_args()
    kinds_run = gen.KINDS if a.guest != "g2" else [("nat2", k) for k in gen.NAT2_KINDS]
    if a.kinds:
        want = set(a.kinds.split(","))
        kinds_run = [(d, k) for d, k in gen.KINDS if k in want or f"{d}/{k}" in want]
        assert kinds_run, f"no generator kind in {a.kinds}"
    t0 = time.monotonic()
    # next hops resolved, so encapsulated frames carry real outer MACs
    sled, pname = {"g1": ("sled1", "xde0"), "g2": ("sled2", "xde0"), "g3": ("sled2", "xde3")}[
        a.guest]
    if a.guest == "g3":
        kinds_run = [(d, k) for d, k in kinds_run if d == "out"]
    with common.lab("d", a.prefix) as lab:
        if a.guest == "g1":
            setup.install(lab)
        else:
            for g in ("g2", "g3"):      # sled2's counters must move by our frames only
                setup._quiet(lab, g)
            if a.guest == "g2":
                setup.give_external(lab, "sled2", "xde0", setup.EXTERNAL_G2)
        runner = SledRunner(lab, sled)
        inst = runner.instance()
        port = next(i for i, p in inst.ports.items() if p.name == pname)
        hops = next_hops(lab, sled)
        kinds = collections.Counter()
        known = collections.Counter()
        per_kind = collections.Counter()
        examples = collections.defaultdict(list)
        frames = 0
        seen = collections.Counter()     # counters the model moved: what the run covered
        for n in range(a.seed, a.seed + a.cases):
            d, k = kinds_run[n % len(kinds_run)]
            steps = gen.case(d, k, n)
            if a.guest == "g3":
                steps = gen.as_port(steps)
            per_kind[f"{d}/{k}"] += 1
            frames += sum(d in ("in", "out") for d, _ in steps)   # a rule or address change is none
            bad = run_case(runner, inst, steps, hops, port, seen)
            for i, ms, res in bad:
                bug = gen.known_bug(*steps[i])
                if bug:
                    known[bug] += 1         # frames, each of one or more mismatch kinds
                for m in ms:
                    key = kind_of(m)
                    if bug:
                        continue
                    kinds[key] += 1
                    if len(examples[key]) < a.examples:
                        examples[key].append({"case": f"{d}/{k}/{n}", "step": i,
                                              "frame": steps[i][1].hex(), "mismatch": m,
                                              "model": f"{res.verdict} {res.reason}"})
                if bug:
                    continue
            if (n - a.seed + 1) % 10000 == 0:
                print(f"  {n - a.seed + 1} cases, {sum(kinds.values())} unexplained mismatches, "
                      f"{sum(known.values())} known-bug frames, "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
        runner.close()
    elapsed = time.monotonic() - t0
    summary = {"cases": a.cases, "frames": frames, "seconds": round(elapsed, 1),
               "mismatches": sum(kinds.values()), "by_kind": dict(kinds.most_common()),
               "known_bugs": dict(known.most_common()), "examples": examples,
               "cases_by_kind": dict(per_kind), "model_counters": dict(seen.most_common())}
    print(f"fuzz: {a.cases} cases ({frames} frames) in {elapsed:.0f} s: "
          f"{summary['mismatches']} unexplained mismatches")
    for k, v in kinds.most_common():
        print(f"  {v:7d}  {k}")
        for e in examples[k][:1]:
            print(f"           e.g. {e['case']} step {e['step']}: {e['frame'][:120]}")
    if known:
        print("known datapath bugs exercised (frames that disagreed):")
        for k, v in known.most_common():
            print(f"  {v:7d}  {k}")
    cover = COVER if a.guest == "g1" else COVER_G2 if a.guest == "g2" else [
        # outbound only, and no IPv4 to answer
        c for c in COVER if c.startswith(("drop_out", "encap", "tx_", "icmp", "mtu", "dhcp6",
                                          "ndp", "flow", "fw_"))
        and c not in ("drop_out_arp", "drop_out_router", "drop_out_no_port_local",
                      "drop_out_firewall", "fw_denied", "drop_out_nat_exhausted",
                      "drop_out_no_nat")]
    never = [c for c in cover if not seen[c]]
    print("covered: " + ", ".join(f"{c} {seen[c]}" for c in cover if seen[c]))
    if never:
        print("never reached: " + ", ".join(never))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    return 1 if kinds else 0


if __name__ == "__main__":
    sys.exit(main())
