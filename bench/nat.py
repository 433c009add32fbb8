"""What NAT costs under real traffic: TCP throughput guest -> internet
(through g1's SNAT IP, the boundary services datapath and the internet
host) beside guest -> guest (g1 -> g2 across sleds), and the per-packet
cost of sled1's programs on each, from the kernel's run-time statistics.

    .venv/bin/python bench/nat.py [--seconds 5] [--rounds 3]
                                  [--out bench/results/nat.json]

One lab of the bench's own (bench/common.py). Each round runs both paths
back to back, one iperf3 TCP stream each, the server in inet or in g2.
With `kernel.bpf_stats_enabled=1` the kernel accounts the run time and
count of every program; per path:

  out  tc_port_out on sled1 (g1's frames: one GSO super-packet a run), plus
       tc_nat and tc_snat, which internet-bound frames go on to (tail
       calls), per tc_port_out run;
  in   xdp_underlay on sled1, plus xdp_nat which replies from the internet
       go on to, per xdp_underlay run (the ACKs coming back).

The guest -> guest figures are the plain (no NAT) baseline of the same
run. The internet path also crosses bsvc's programs and kernel
forwarding, so its throughput is the whole path's, NAT included.
Run as root; the machine is noisy: read the ratios of one run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common
from common import REPO, write_result
from datapath import Probe, pinned_id

from xdelab.lab import GUESTS, OUTSIDE

PROGS = {"tc_port_out": "out", "tc_nat": "out", "tc_snat": "out",
         "xdp_underlay": "in", "xdp_nat": "in"}
IPERF_PORT = 5201


def iperf(lab, client, server, seconds):
    r = lab.run(client, "iperf3", "-c", server, "-p", str(IPERF_PORT), "-t", str(seconds),
                "-J", capture_output=True, text=True, timeout=seconds + 30)
    if r.returncode:
        raise RuntimeError(f"iperf3 {client} -> {server}: {r.stdout[-300:]} {r.stderr[-300:]}")
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]


def per_packet(result):
    """ns per run of each side: the programs' time over the entry's runs."""
    out = {}
    for side, entry in (("out", "tc_port_out"), ("in", "xdp_underlay")):
        runs = result[entry]["runs"]
        ns = sum((result[p]["ns_per_run"] or 0) * result[p]["runs"]
                 for p, s in PROGS.items() if s == side)
        out[side] = round(ns / runs, 1) if runs else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench/results/nat.json"))
    args = ap.parse_args()
    if os.geteuid():
        sys.exit("bench/nat.py: run as root")
    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    stats_before = open(stats_path).read().strip()
    paths = {"internet": ("g1", "inet", OUTSIDE), "guest": ("g1", "g2", GUESTS["g2"]["ip"])}
    rows = []
    started = time.monotonic()
    servers = []
    try:
        with open(stats_path, "w") as f:
            f.write("1")
        with common.lab("n") as lab:
            ids = {p: pinned_id(f"{lab.root('sled1')}/progs/{p}") for p in PROGS}
            for host in ("inet", "g2"):
                servers.append(subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{lab.ns(host)}", "iperf3", "-s", "-p",
                     str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
            for rnd in range(1, args.rounds + 1):
                for path, (client, _, addr) in paths.items():
                    with Probe(ids) as probe:
                        bps = iperf(lab, client, addr, args.seconds)
                    row = {"round": rnd, "path": path, "gbps": round(bps / 1e9, 3),
                           "ns": per_packet(probe.result), "programs": probe.result}
                    rows.append(row)
                    print(f"  round {rnd} {path:8} {row['gbps']:6.2f} Gb/s  "
                          f"out {row['ns']['out']} ns  in {row['ns']['in']} ns", flush=True)
    finally:
        for s in servers:
            s.kill()
            s.wait()
        with open(stats_path, "w") as f:
            f.write(stats_before)
    summary = {}
    for path in paths:
        mine = [r for r in rows if r["path"] == path]
        summary[path] = {"gbps": statistics.median(r["gbps"] for r in mine),
                         "out_ns": statistics.median(r["ns"]["out"] for r in mine),
                         "in_ns": statistics.median(r["ns"]["in"] for r in mine)}
    ratio = {k: round(summary["internet"][k] / summary["guest"][k], 2)
             for k in ("gbps", "out_ns", "in_ns") if summary["guest"][k]}
    print("\n| path | TCP Gb/s | out ns/run | in ns/run |\n| --- | --- | --- | --- |")
    for path, s in summary.items():
        print(f"| {path} | {s['gbps']:.2f} | {s['out_ns']} | {s['in_ns']} |")
    print(f"| internet / guest | {ratio.get('gbps')} | {ratio.get('out_ns')} | "
          f"{ratio.get('in_ns')} |")
    out = write_result(args.out, {"seconds": args.seconds, "rounds": args.rounds,
                                  "duration_s": round(time.monotonic() - started, 1),
                                  "summary": summary, "ratio": ratio, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
