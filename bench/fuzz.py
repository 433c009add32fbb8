#!/usr/bin/env python3
"""Differential fuzzing: the reference model (tests/model, written from
docs/design.md) against the real programs, run with BPF_PROG_TEST_RUN in a
lab of its own, on --cases generated cases (valid, edge and malformed guest
frames, Geneve frames, non-Geneve underlay traffic, and short stateful
sequences). Reports mismatches by kind; goal: 0 outside the known
datapath bugs (tests/model/gen.py known_bug, listed apart).

    sudo .venv/bin/python bench/fuzz.py --cases 100000 [--seed N] [--json out.json]
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


def kind_of(mismatch):
    """A mismatch string without its numbers: the kind it is counted by."""
    return re.sub(r"\(\d+, \d+\)|\d+", "N", mismatch)[:160]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0, help="first case seed")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--prefix", help="lab prefix (default xd<3 hex>-)")
    ap.add_argument("--examples", type=int, default=3, help="examples kept per mismatch kind")
    a = ap.parse_args()
    t0 = time.monotonic()
    # next hops resolved, so encapsulated frames carry real outer MACs
    with common.lab("d", a.prefix) as lab:
        setup.install(lab)
        runner = SledRunner(lab)
        inst = runner.instance()
        port = next(i for i, p in inst.ports.items() if p.name == "xde0")
        hops = next_hops(lab)
        kinds = collections.Counter()
        known = collections.Counter()
        per_kind = collections.Counter()
        examples = collections.defaultdict(list)
        frames = 0
        for n in range(a.seed, a.seed + a.cases):
            d, k = gen.KINDS[n % len(gen.KINDS)]
            steps = gen.case(d, k, n)
            per_kind[f"{d}/{k}"] += 1
            frames += len(steps)
            bad = run_case(runner, inst, steps, hops, port)
            for i, ms, res in bad:
                bug = gen.known_bug(*steps[i])
                for m in ms:
                    key = kind_of(m)
                    if bug:
                        known[bug] += 1
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
                      f"{sum(known.values())} known-bug mismatches, "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
        runner.close()
    elapsed = time.monotonic() - t0
    summary = {"cases": a.cases, "frames": frames, "seconds": round(elapsed, 1),
               "mismatches": sum(kinds.values()), "by_kind": dict(kinds.most_common()),
               "known_bugs": dict(known.most_common()), "examples": examples,
               "cases_by_kind": dict(per_kind)}
    print(f"fuzz: {a.cases} cases ({frames} frames) in {elapsed:.0f} s: "
          f"{summary['mismatches']} unexplained mismatches")
    for k, v in kinds.most_common():
        print(f"  {v:7d}  {k}")
        for e in examples[k][:1]:
            print(f"           e.g. {e['case']} step {e['step']}: {e['frame'][:120]}")
    if known:
        print("known datapath bugs exercised (mismatches):")
        for k, v in known.most_common():
            print(f"  {v:7d}  {k}")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    return 1 if kinds else 0


if __name__ == "__main__":
    sys.exit(main())
