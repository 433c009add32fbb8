"""Per-packet cost of the datapath where packets really flow: the kernel's
own run-time statistics of each program under lab traffic, beside the
same run's throughput of xde, the kernel's VXLAN and plain routing.

    .venv/bin/python bench/datapath.py [--seconds 5] [--rounds 3] [--tests udp64,tcp1,tcp8]
                                       [--out bench/results/datapath.json]

The topology is bench/lab.py's (one lab, three guest pairs over the same
u1/u2 links). With `kernel.bpf_stats_enabled=1` the kernel accounts each
program's run time and run count; around every xde run the bench reads
them (bpftool) for the programs that carry that traffic:

  encap  tc_port_out on sled1 (TC ingress of g1's port): g1's frames;
  decap  xdp_underlay on sled2 (XDP on u1, u2): the Geneve from sled1.

ns per run is run time / run count over the run. For TCP a run is one GSO
super-packet on the encap side (a segment on the decap side: XDP on a veth
turns GSO off on its peer); 64-byte UDP is one packet per run on both.

The baselines, measured the same way in the same run: a program that does
nothing (`return TC_ACT_OK` / `return XDP_PASS`) attached at the same kind
of hook on the plain path while it carries the same test -- TC ingress of
p1's veth on sled1 (where g1's frames meet tc_port_out) and XDP on p2's
own interface (a native XDP on a veth receiving the stream, as u1/u2 are
for xdp_underlay). The ratio program / empty is what xde adds over the
bare hook.

Run as root; `sudo make setup-bench` installs bpftool (and matplotlib for
the plot). The machine is noisy: read the ratios of one run.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import common
from common import REPO, write_result
from lab import PATHS, TESTS, Bench

from xdectl import libbpf
from xdectl.netdev import Netdev

HOOKS = {"encap": ("sled1", "tc_port_out"), "decap": ("sled2", "xdp_underlay")}


def prog_stats(prog_id):
    """(run time ns, run count) of a program, as the kernel accounts them."""
    out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def pinned_id(path):
    fd = libbpf.obj_get(path)
    try:
        return libbpf.prog_id(fd)
    finally:
        os.close(fd)


class Probe:
    """Run-time statistics of a set of programs around one run."""

    def __init__(self, ids):
        self.ids = ids

    def __enter__(self):
        self.before = {k: prog_stats(i) for k, i in self.ids.items()}
        return self

    def __exit__(self, *exc):
        after = {k: prog_stats(i) for k, i in self.ids.items()}
        self.result = {}
        for k in self.ids:
            ns = after[k][0] - self.before[k][0]
            runs = after[k][1] - self.before[k][1]
            self.result[k] = {"runs": runs, "ns_per_run": ns / runs if runs else None}


class Empty:
    """The empty programs, attached at their hooks on the plain path while
    it runs, detached afterwards."""

    def __init__(self, bench):
        from bcc import BPF
        self.bench = bench
        self.bpf = BPF(text=common.EMPTY)
        self.fds = {"tc": self.bpf.load_func("tc_empty", BPF.SCHED_CLS).fd,
                    "xdp": self.bpf.load_func("xdp_empty", BPF.XDP).fd}
        self.ids = {"encap_empty": libbpf.prog_id(self.fds["tc"]),
                    "decap_empty": libbpf.prog_id(self.fds["xdp"])}

    def _in(self, host, fn):
        with self.bench.lab.inside(host):
            nd = Netdev()
            try:
                fn(nd)
            finally:
                nd.close()

    def attach(self):
        self._in("sled1", lambda nd: nd.attach_tc_ingress(nd.index("ph0"), self.fds["tc"], "empty"))
        self._in("p2", lambda nd: nd.attach_xdp(nd.index("eth0"), self.fds["xdp"]))

    def detach(self):
        self._in("sled1", lambda nd: nd.detach_tc_ingress(nd.index("ph0")))
        self._in("p2", lambda nd: nd.detach_xdp(nd.index("eth0")))

    def close(self):
        self.bpf.cleanup()


def run(bench, tests, rounds, seconds):
    ids = {hook: pinned_id(f"{bench.lab.root(sled)}/progs/{prog}")
           for hook, (sled, prog) in HOOKS.items()}
    empty = Empty(bench)
    rows = []
    try:
        for rnd in range(1, rounds + 1):
            for test in tests:
                row = {"round": rnd, "test": test}
                for path in PATHS:
                    with Probe(ids) as p:
                        row[path] = bench.iperf(path, test, seconds)
                    if path == "xde":
                        row["programs"] = p.result
                empty.attach()
                try:
                    with Probe(empty.ids) as p:
                        row["plain_with_empty"] = bench.iperf("plain", test, seconds)
                    row["empty"] = p.result
                finally:
                    empty.detach()
                rows.append(row)
                print(f"  round {rnd} {test:6} " + "  ".join(
                    f"{h} {row['programs'][h]['ns_per_run'] or 0:7.0f} ns "
                    f"(empty {row['empty'][h + '_empty']['ns_per_run'] or 0:5.0f})"
                    for h in HOOKS) + "  " + "  ".join(
                    f"{path} {_rate(row[path])}" for path in PATHS), flush=True)
    finally:
        empty.close()
    return rows


def _rate(r):
    return f"{r['mpps']:.3f} Mpps" if "mpps" in r else f"{r['gbps']:.2f} Gbit/s"


def summarise(rows, tests):
    out = {}
    for test in tests:
        rs = [r for r in rows if r["test"] == test]
        key = "mpps" if test.startswith("udp") else "gbps"
        s = {}
        for hook in HOOKS:
            ns = statistics.median(r["programs"][hook]["ns_per_run"] for r in rs)
            en = statistics.median(r["empty"][hook + "_empty"]["ns_per_run"] for r in rs)
            s[hook] = {"ns_per_run": ns, "empty_ns_per_run": en, "ratio_to_empty": ns / en}
        for path in PATHS:
            s[path] = {key: statistics.median(r[path][key] for r in rs)}
        s["xde_over_vxlan"] = s["xde"][key] / s["vxlan"][key]
        s["xde_over_plain"] = s["xde"][key] / s["plain"][key]
        out[test] = s
    return out


def table(summary):
    lines = [f"{'test':6} {'encap ns':>9} {'(empty)':>8} {'decap ns':>9} {'(empty)':>8} "
             f"{'xde':>10} {'vxlan':>10} {'plain':>10} {'xde/vxlan':>9}"]
    for test, s in summary.items():
        key = "mpps" if test.startswith("udp") else "gbps"
        lines.append(f"{test:6} {s['encap']['ns_per_run']:9.0f} {s['encap']['empty_ns_per_run']:8.0f} "
                     f"{s['decap']['ns_per_run']:9.0f} {s['decap']['empty_ns_per_run']:8.0f} "
                     + " ".join(f"{s[p][key]:10.3f}" for p in PATHS)
                     + f" {s['xde_over_vxlan']:9.2f}")
    return "\n".join(lines)


def plot(summary, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tests = list(summary)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(tests))
    for i, (hook, color) in enumerate((("encap", "tab:blue"), ("decap", "tab:orange"))):
        a1.bar([j + i * 0.4 for j in x], [summary[t][hook]["ns_per_run"] for t in tests], 0.35,
               color=color, label=f"{hook} ({HOOKS[hook][1]})")
        a1.bar([j + i * 0.4 for j in x], [summary[t][hook]["empty_ns_per_run"] for t in tests], 0.35,
               color="grey", alpha=0.6, label="empty program" if i == 0 else None)
    a1.set_xticks([j + 0.2 for j in x])
    a1.set_xticklabels(tests)
    a1.set_ylabel("ns per run (kernel run-time statistics)")
    a1.set_title("per-packet cost under lab traffic")
    a1.legend(fontsize=7)
    a2.bar(tests, [summary[t]["xde_over_vxlan"] for t in tests], color="tab:blue")
    a2.axhline(1, color="grey", ls="--", lw=1)
    a2.set_ylabel("xde / kernel VXLAN (same run)")
    a2.set_title("throughput ratio")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tests", default="udp64,tcp1,tcp8", help="comma list of " + ",".join(TESTS))
    ap.add_argument("--out", default=str(REPO / "bench/results/datapath.json"))
    args = ap.parse_args()
    tests = args.tests.split(",")
    if os.geteuid():
        sys.exit("bench/datapath.py: run as root")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    stats_before = open(stats_path).read().strip()
    bench = Bench("xdp-")
    started = time.monotonic()
    try:
        with open(stats_path, "w") as f:
            f.write("1")
        bench.up()
        bench.check()
        bench.start_servers()
        bench.check_xde_tcp()
        rows = run(bench, tests, args.rounds, args.seconds)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.down()
        with open(stats_path, "w") as f:
            f.write(stats_before)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    summary = summarise(rows, tests)
    print()
    print(table(summary))
    out = write_result(args.out, {"seconds": args.seconds, "rounds": args.rounds,
                                  "duration_s": round(time.monotonic() - started, 1),
                                  "summary": summary, "rows": rows})
    png = out.with_suffix(".png")
    print(f"wrote {out}" + (f" and {png}" if plot(summary, png) else ""))


if __name__ == "__main__":
    main()
