"""Throughput through the lab: xde vs the kernel's VXLAN over IPv6 vs plain
routing, on ONE topology, in the same run (docs/design.md, "How it is proved").

    .venv/bin/python bench/lab.py [--seconds 10] [--rounds 2] [--out bench/results/lab.json]

One Lab (xdelab.lab, prefix `xb-`) gives the xde path g1 -> g2 (10.0.0.1 ->
10.0.0.2). In the same sled and switch namespaces, over the same u1/u2
underlay links (MTU 1600, ECMP through sw1 and sw2), two more guest pairs:

  vxlan  v1 10.1.0.1 (off sled1) -> v2 10.1.0.2 (off sled2): each sled has a
         vxlan device (VNI 10, fd00:N::1 -> the other sled, UDP 4789, routed
         by the sled's ECMP route) bridged with a veth to its guest.
  plain  p1 10.2.0.1 (off sled1) -> p2 10.2.1.1 (off sled2): the sleds route
         the guest prefixes to each other in IPv4 with IPv6 next hops over
         u1/u2 (RFC 5549), and the switches forward IPv4.

Every guest has MTU 1500. Each test (TCP 1 stream, TCP 8 streams, 64-byte UDP)
runs xde, vxlan, plain back to back, repeated --rounds times; medians and the
ratios xde/vxlan and xde/plain are reported. The machine is shared and noisy:
only the ratios mean much. The topology is always torn down.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO as ROOT
from pyroute2 import netns  # noqa: E402

from xdelab.lab import Lab  # noqa: E402

PREFIX = "xb-"
EXTRA = ("v1", "v2", "p1", "p2")          # our guests, beside the Lab's namespaces
PORT = 5201
PATHS = {
    # name: (source guest, destination guest, destination address)
    "xde": ("g1", "g2", "10.0.0.2"),
    "vxlan": ("v1", "v2", "10.1.0.2"),
    "plain": ("p1", "p2", "10.2.1.1"),
}
TESTS = {
    "tcp1": ["-P", "1"],
    "tcp8": ["-P", "8"],
    "udp64": ["-u", "-l", "64", "-b", "0"],
}
SLED = {"sled1": 1, "sled2": 2}


class Bench:
    def __init__(self, prefix=PREFIX):
        self.lab = Lab(prefix)
        self.servers = {}

    def ns(self, host):
        return self.lab.ns(host)

    def sh(self, host, *cmd, check=True, **kw):
        """A command in host's namespace (nsenter keeps bpffs visible)."""
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.ns(host)}", *cmd],
                           capture_output=True, text=True, **kw)
        if check and r.returncode:
            raise RuntimeError(f"{host}: {' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def ip(self, host, *args):
        return self.sh(host, "ip", *args)

    def sysctl(self, host, **kv):
        for k, v in kv.items():
            self.sh(host, "sysctl", "-qw", f"{k.replace('__', '.')}={v}")

    def veth(self, a, a_name, b, b_name, mtu=1500):
        subprocess.run(["ip", "link", "add", a_name, "netns", self.ns(a), "type", "veth",
                        "peer", "name", b_name, "netns", self.ns(b)], check=True)
        self.ip(a, "link", "set", a_name, "mtu", str(mtu), "up")
        self.ip(b, "link", "set", b_name, "mtu", str(mtu), "up")

    # --- building -------------------------------------------------------

    def up(self):
        self.down()
        self.lab.up()
        for h in EXTRA:
            netns.create(self.ns(h))
            self.ip(h, "link", "set", "lo", "up")
        for sled in SLED:
            # the same knobs for every path: IPv4 forwarding for plain, L4
            # multipath hashing (the Lab sets it for IPv6) for plain's ECMP
            self.sysctl(sled, net__ipv4__ip_forward=1, net__ipv4__fib_multipath_hash_policy=1,
                        net__ipv4__conf__all__rp_filter=0, net__ipv4__conf__default__rp_filter=0)
        for sw in ("sw1", "sw2"):
            self.sysctl(sw, net__ipv4__ip_forward=1, net__ipv4__conf__all__rp_filter=0,
                        net__ipv4__conf__default__rp_filter=0)
        self._vxlan()
        self._plain()

    def xde_counters(self, sled):
        from xdectl import ports
        with self.lab.inside(sled):
            return ports.port_stats(self.lab.root(sled)).get("xde0", {})

    def nstat(self, host, name):
        out = self.sh(host, "nstat", "-az", "--json", name).stdout
        return json.loads(out)["kernel"].get(name, 0)

    def probe_xde(self):
        """A short TCP transfer on xde: does it flow, and without the two
        known product failures? Returns (Gbit/s or 0, what went wrong)."""
        before = (self.nstat("g2", "TcpInCsumErrors"),
                  self.xde_counters("sled1").get("drop_out_underlay_unreachable", 0))
        # (run from a snapshot if others edit bpf/ meanwhile: xdectl refuses
        # a pinned datapath whose layout differs from the source on disk)
        try:
            gbps = self.iperf("xde", "tcp1", 2, omit=0, tries=1, timeout=20)["gbps"]
        except RuntimeError:
            gbps = 0.0
        csum = self.nstat("g2", "TcpInCsumErrors") - before[0]
        unreach = self.xde_counters("sled1").get("drop_out_underlay_unreachable", 0) - before[1]
        problems = []
        if csum:
            problems.append(f"{csum} TCP checksum errors in g2")
        if unreach:
            problems.append(f"{unreach} drop_out_underlay_unreachable on sled1 xde0")
        return gbps, problems

    def check_xde_tcp(self):
        """Refuse to measure a broken xde path: a short TCP probe must flow
        with no checksum errors at the receiver and no underlay drops."""
        gbps, problems = self.probe_xde()
        print(f"  xde TCP probe: {gbps:.2f} Gbit/s {'; '.join(problems) or 'clean'}", flush=True)
        if problems or gbps == 0:
            raise RuntimeError("xde: TCP does not flow cleanly: " + ("; ".join(problems) or "0 Gbit/s"))

    def _vxlan(self):
        addr = {1: "fd00:1::1", 2: "fd00:2::1"}
        for sled, n in SLED.items():
            guest = f"v{n}"
            self.veth(guest, "eth0", sled, "vh0")
            self.ip(guest, "addr", "add", f"10.1.0.{n}/24", "dev", "eth0")
            # no `dev`: the kernel sends by the route to the remote, ECMP over u1/u2
            self.ip(sled, "link", "add", "vx10", "type", "vxlan", "id", "10",
                    "local", addr[n], "remote", addr[3 - n], "dstport", "4789")
            self.ip(sled, "link", "set", "vx10", "mtu", "1500")
            self.ip(sled, "link", "add", "br10", "type", "bridge")
            self.ip(sled, "link", "set", "br10", "mtu", "1500")
            for dev in ("vx10", "vh0"):
                self.ip(sled, "link", "set", dev, "master", "br10")
            for dev in ("vx10", "br10"):
                self.ip(sled, "link", "set", dev, "up")

    def _plain(self):
        # guest prefix by sled; p2p subnets are the Lab's fd10:N:I::/64
        prefix = {1: "10.2.0", 2: "10.2.1"}
        for sled, n in SLED.items():
            guest = f"p{n}"
            self.veth(guest, "eth0", sled, "ph0")
            self.ip(guest, "addr", "add", f"{prefix[n]}.1/24", "dev", "eth0")
            self.ip(guest, "route", "add", "default", "via", f"{prefix[n]}.254")
            self.ip(sled, "addr", "add", f"{prefix[n]}.254/24", "dev", "ph0")
            o = 3 - n
            self.ip(sled, "route", "add", f"{prefix[o]}.0/24",
                    "nexthop", "via", "inet6", f"fd10:{n}:1::2", "dev", "u1",
                    "nexthop", "via", "inet6", f"fd10:{n}:2::2", "dev", "u2")
            for i, sw in ((1, "sw1"), (2, "sw2")):
                self.ip(sw, "route", "add", f"{prefix[n]}.0/24", "via", "inet6",
                        f"fd10:{n}:{i}::1", "dev", sled)

    def check(self):
        for path, (src, _, dst) in PATHS.items():
            r = self.sh(src, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", dst, check=False)
            if r.returncode:
                raise RuntimeError(f"{path}: {src} cannot ping {dst}: {r.stdout.strip()}")
            # a packet the size of the MTU, DF set, both ways must fit
            r = self.sh(src, "ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1472", dst, check=False)
            if r.returncode:
                raise RuntimeError(f"{path}: 1500-byte packets do not pass {src} -> {dst}")
        for path, (src, dst, _) in PATHS.items():
            dev = "xde0" if path == "xde" else "eth0"
            mtus = {h: json.loads(self.ip(h, "-j", "link", "show", dev).stdout)[0]["mtu"]
                    for h in (src, dst)}
            print(f"  {path}: guests {src}, {dst} MTU {mtus}")

    def start_servers(self):
        for path in PATHS:
            self.start_server(path)
        time.sleep(0.5)

    def start_server(self, path):
        dst = PATHS[path][1]
        self.servers[path] = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns(dst)}", "iperf3", "-s", "-p", str(PORT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def stop_server(self, path):
        p = self.servers.pop(path, None)
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def restart_server(self, path):
        self.stop_server(path)
        self.start_server(path)
        time.sleep(0.5)

    def stop_servers(self):
        for path in list(self.servers):
            self.stop_server(path)

    def down(self):
        self.stop_servers()
        for h in EXTRA:
            if os.path.exists(f"/run/netns/{self.ns(h)}"):
                netns.remove(self.ns(h))
        try:
            self.lab.down(quiet=True)
        except Exception as e:     # e.g. the pinned datapath no longer matches this xdectl
            print(f"lab down failed ({e}); removing by hand", file=sys.stderr)
            import shutil
            from xdelab.lab import ROOTS
            for n in self.lab.namespaces:
                if os.path.exists(f"/run/netns/{n}"):
                    netns.remove(n)           # takes its links, XDP and filters with it
            for host in ROOTS:
                shutil.rmtree(self.lab.root(host), ignore_errors=True)
            self.lab._stop_servers()
            if self.lab.state.exists():
                self.lab.state.rmdir()

    # --- measuring ------------------------------------------------------

    def iperf(self, path, test, seconds, omit=1, tries=3, timeout=None):
        src, _, dst = PATHS[path]
        cmd = ["iperf3", "-c", dst, "-p", str(PORT), "-t", str(seconds), "-O", str(omit),
               "--json", *TESTS[test]]
        for attempt in range(tries):
            try:
                r = self.sh(src, *cmd, check=False, timeout=timeout or seconds + 60)
                out = json.loads(r.stdout)
            except subprocess.TimeoutExpired:
                out = {"error": "timed out"}
                self.restart_server(path)      # it may be stuck in the killed test
            except json.JSONDecodeError:
                out = {"error": r.stderr.strip() or "no JSON"}
            if "error" not in out:
                break
            print(f"    {path} {test}: iperf3 error ({out['error']})", flush=True)
            time.sleep(1)
        else:
            raise RuntimeError(f"{path} {test}: iperf3 failed: {out['error']}")
        end = out["end"]
        if test.startswith("tcp"):
            return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                    "sent_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
                    "retransmits": end["sum_sent"].get("retransmits")}
        # UDP: what the receiver got, as the server reported it to the client
        rcv, snd = end["sum_received"], end["sum_sent"]
        received = rcv["packets"] - rcv["lost_packets"]
        secs = rcv["seconds"] or seconds
        return {"mpps": received / secs / 1e6,
                "gbps": rcv["bytes"] * 8 / secs / 1e9,   # UDP payload
                "sent_mpps": snd["packets"] / snd["seconds"] / 1e6,
                "lost_percent": rcv["lost_percent"]}


def summarise(samples):
    res = {}
    for test, by_path in samples.items():
        res[test] = {}
        key = "mpps" if test.startswith("udp") else "gbps"
        for path, runs in by_path.items():
            res[test][path] = {
                "median_" + key: statistics.median(r[key] for r in runs),
                "median_gbps": statistics.median(r["gbps"] for r in runs),
                "runs": runs,
            }
        m = {p: res[test][p]["median_" + key] for p in by_path}
        res[test]["ratio_xde_vxlan"] = m["xde"] / m["vxlan"] if m.get("vxlan") else None
        res[test]["ratio_xde_plain"] = m["xde"] / m["plain"] if m.get("plain") else None
    return res


def table(res):
    lines = [f"{'test':8} {'xde':>16} {'vxlan':>16} {'plain':>16} {'xde/vxlan':>10} {'xde/plain':>10}"]
    for test, r in res.items():
        def cell(p):
            if test.startswith("udp"):
                return f"{r[p]['median_mpps']:.3f} Mpps"
            return f"{r[p]['median_gbps']:.2f} Gbit/s"
        lines.append(f"{test:8} {cell('xde'):>16} {cell('vxlan'):>16} {cell('plain'):>16} "
                     f"{r['ratio_xde_vxlan']:>10.2f} {r['ratio_xde_plain']:>10.2f}")
    return "\n".join(lines)


def plot(res, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    fig, axes = plt.subplots(1, len(res), figsize=(4 * len(res), 3.5))
    colours = {"xde": "tab:blue", "vxlan": "tab:orange", "plain": "tab:grey"}
    for ax, (test, r) in zip(axes, res.items()):
        key, unit = ("median_mpps", "Mpps") if test.startswith("udp") else ("median_gbps", "Gbit/s")
        paths = list(PATHS)
        vals = [r[p][key] for p in paths]
        ax.bar(paths, vals, color=[colours[p] for p in paths])
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:.3f}" if unit == "Mpps" else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{test}  (xde/vxlan {r['ratio_xde_vxlan']:.2f})")
        ax.set_ylabel(unit)
    fig.suptitle("lab guest->guest throughput (medians)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"plot: {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tests", default=",".join(TESTS), help="comma list of " + ",".join(TESTS))
    ap.add_argument("--out", default=str(ROOT / "bench/results/lab.json"))
    args = ap.parse_args()
    tests = args.tests.split(",")
    if os.geteuid():
        sys.exit("bench/lab.py: run as root")

    # SIGTERM tears down like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bench = Bench()
    samples = {t: {p: [] for p in PATHS} for t in tests}
    started = time.time()
    try:
        print("building the topology (prefix %s)..." % PREFIX, flush=True)
        bench.up()
        bench.check()
        bench.start_servers()
        bench.check_xde_tcp()
        for rnd in range(1, args.rounds + 1):
            for test in tests:
                for path in PATHS:
                    s = bench.iperf(path, test, args.seconds)
                    samples[test][path].append(s)
                    v = f"{s['mpps']:.3f} Mpps" if "mpps" in s else f"{s['gbps']:.2f} Gbit/s"
                    print(f"  round {rnd} {test:6} {path:6} {v}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: tearing down", file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # let the teardown finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.down()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    res = summarise(samples)
    print()
    print(table(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"seconds": args.seconds, "rounds": args.rounds, "cpus": os.cpu_count(),
           "kernel": os.uname().release, "started": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                   time.localtime(started)),
           "duration_s": round(time.time() - started, 1),
           "results": res}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {out}")
    plot(res, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
