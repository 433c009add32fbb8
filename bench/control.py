"""Control-plane timings: `xdectl` as an operator runs it
(docs/design.md, "How it is proved").

    .venv/bin/python bench/control.py [--n 5] [--v2p 100000] [--out bench/results/control.json]

In one namespace (`xbc-ctl`) with two veth underlays, each repetition takes
a fresh root and times, with time.perf_counter around the subprocess:
  cold create   first port on a fresh root: compiles bpf/ with bcc and pins it
  warm create   second port on the same root
  delete        the second port (others remain), then the last port
  unload        the root's instance (programs, XDP, pins)
Baselines, same way: `nsenter true`, `python -c pass`, `python -c 'import
xdectl.cli'` (the interpreter plus the CLI's imports) and the same plus the
modules a datapath command imports lazily (ports, overlay, pyroute2, bcc);
"work" below is a command's median minus the `import xdectl.cli` median. Then bulk V2P: --v2p mappings in
a file loaded with `xdectl load-v2p FILE` (timed, repeated), checked with
`dump-v2p --json`, against one `set-v2p`. Medians; JSON to --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO as ROOT
from pyroute2 import netns  # noqa: E402

NS = "xbc-ctl"
PY = str(ROOT / ".venv/bin/python")
XDECTL = str(ROOT / ".venv/bin/xdectl")
ADDR = "fd00:1::1"
GW_MAC, GW_IP = "a8:40:25:00:00:01", "172.30.0.5"


def nsrun(*cmd, check=True):
    """Run in the namespace; returns (seconds, CompletedProcess)."""
    t0 = time.perf_counter()
    r = subprocess.run(["nsenter", f"--net=/run/netns/{NS}", *cmd], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return dt, r


def xdectl(root, *args, check=True):
    return nsrun(XDECTL, "--root", root, *args, check=check)


def port_args(name, n):
    return ["create", name, "--underlay", "u1", "--underlay", "u2",
            "--mac", f"a8:40:25:ff:00:{n:02x}", "--ip", f"10.0.0.{n}",
            "--gateway-mac", GW_MAC, "--gateway-ip", GW_IP,
            "--boundary-services", "fd00:99::1", "--boundary-vni", "99",
            "--vni", "10", "--underlay-addr", ADDR]


def setup_ns():
    teardown_ns()
    netns.create(NS)
    for cmd in (["link", "set", "lo", "up"],
                ["addr", "add", f"{ADDR}/128", "dev", "lo"],
                ["link", "add", "u1", "mtu", "1600", "type", "veth", "peer", "name", "u1p", "mtu", "1600"],
                ["link", "add", "u2", "mtu", "1600", "type", "veth", "peer", "name", "u2p", "mtu", "1600"]):
        subprocess.run(["ip", "-n", NS, *cmd], check=True)
    for dev in ("u1", "u1p", "u2", "u2p"):
        subprocess.run(["ip", "-n", NS, "link", "set", dev, "up"], check=True)


def teardown_ns():
    if os.path.exists(f"/run/netns/{NS}"):
        netns.remove(NS)


# what a command that touches the datapath imports on top of the CLI
IMPORT_ALL = "import xdectl.cli, xdectl.ports, xdectl.overlay, pyroute2, bcc"


def med(xs):
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5, help="repetitions")
    ap.add_argument("--v2p", type=int, default=100_000, help="bulk V2P mappings")
    ap.add_argument("--v2p-reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results/control.json"))
    args = ap.parse_args()
    if os.geteuid():
        sys.exit("bench/control.py: run as root")

    t = {k: [] for k in ("nsenter_true", "python_bare", "import_cli", "import_all", "help",
                         "create_cold", "create_warm", "delete_one", "delete_last", "unload",
                         "set_v2p", "load_v2p")}
    roots = []
    bulk = {}
    started = time.time()
    try:
        setup_ns()
        print(f"baselines x{args.n}...", flush=True)
        for _ in range(args.n):
            t["nsenter_true"].append(nsrun("true")[0])
            t["python_bare"].append(nsrun(PY, "-c", "pass")[0])
            t["import_cli"].append(nsrun(PY, "-c", "import xdectl.cli")[0])
            t["import_all"].append(nsrun(PY, "-c", IMPORT_ALL)[0])
            t["help"].append(nsrun(XDECTL, "--help")[0])
        for i in range(args.n):
            root = f"/sys/fs/bpf/xbc-{os.getpid()}-{i}"
            roots.append(root)
            dt, _ = xdectl(root, *port_args("xde0", 1))
            t["create_cold"].append(dt)
            dt, _ = xdectl(root, *port_args("xde1", 2))
            t["create_warm"].append(dt)
            t["delete_one"].append(xdectl(root, "delete", "xde1")[0])
            t["delete_last"].append(xdectl(root, "delete", "xde0")[0])
            t["unload"].append(xdectl(root, "unload")[0])
            print(f"  rep {i + 1}: cold {t['create_cold'][-1]:.2f}s warm {t['create_warm'][-1]:.3f}s "
                  f"delete {t['delete_one'][-1]:.3f}s/{t['delete_last'][-1]:.3f}s "
                  f"unload {t['unload'][-1]:.3f}s", flush=True)

        # bulk V2P on a root with one port
        root = f"/sys/fs/bpf/xbc-{os.getpid()}-v2p"
        roots.append(root)
        xdectl(root, *port_args("xde0", 1))
        for i in range(args.n):
            t["set_v2p"].append(xdectl(root, "set-v2p", f"10.9.0.{i + 1}", "a8:40:25:00:09:01",
                                       "fd00:2::1", "10")[0])
        with tempfile.NamedTemporaryFile("w", prefix="xbc-v2p-", suffix=".txt", delete=False) as f:
            for k in range(args.v2p):
                # distinct (VNI, IP); MACs and underlays vary too
                f.write(f"10.{16 + (k >> 16)}.{(k >> 8) & 255}.{k & 255} "
                        f"a8:40:25:{(k >> 16) & 255:02x}:{(k >> 8) & 255:02x}:{k & 255:02x} "
                        f"fd00:{2 + k % 1000:x}::1 {10 + k % 4}\n")
            path = f.name
        try:
            print(f"load-v2p of {args.v2p} mappings x{args.v2p_reps}...", flush=True)
            for _ in range(args.v2p_reps):
                dt, r = xdectl(root, "load-v2p", path)
                t["load_v2p"].append(dt)
                print(f"  {dt:.2f}s: {r.stdout.strip()}", flush=True)
            dt, r = xdectl(root, "dump-v2p", "--json")
            rows = json.loads(r.stdout)
            bulk = {"mappings": args.v2p, "file_bytes": os.path.getsize(path),
                    "dump_v2p_s": dt, "entries_after": len(rows)}
        finally:
            os.unlink(path)
    except KeyboardInterrupt:
        print("interrupted: tearing down", file=sys.stderr)
        raise SystemExit(130)
    finally:
        for root in roots:
            if os.path.exists(root):
                xdectl(root, "unload", "--force", check=False)
        teardown_ns()

    m = {k: med(v) for k, v in t.items()}
    imp = m["import_cli"]
    print()
    print(f"{'what':28} {'median':>10} {'work':>10}   (work = median - python+import median)")
    rows = [("nsenter true", "nsenter_true"), ("python -c pass", "python_bare"),
            ("python -c 'import xdectl.cli'", "import_cli"),
            ("python -c 'import ..., bcc'", "import_all"), ("xdectl --help", "help"),
            ("create, cold (bcc compile)", "create_cold"), ("create, warm", "create_warm"),
            ("delete (another port left)", "delete_one"), ("delete (last port)", "delete_last"),
            ("unload", "unload"), ("set-v2p (one)", "set_v2p"),
            (f"load-v2p ({args.v2p})", "load_v2p")]
    for label, k in rows:
        work = "" if k in ("nsenter_true", "python_bare", "import_cli", "import_all") else f"{m[k] - imp:9.3f}s"
        print(f"{label:28} {m[k]:9.3f}s {work:>10}")
    print(f"imports alone: CLI {imp - m['python_bare']:.3f}s; CLI + ports/overlay/pyroute2/bcc "
          f"{m['import_all'] - m['python_bare']:.3f}s ({IMPORT_ALL!r})")
    if m["load_v2p"]:
        print(f"load-v2p rate: {args.v2p / m['load_v2p']:,.0f} mappings/s "
              f"({args.v2p / (m['load_v2p'] - imp):,.0f}/s excluding python+imports); "
              f"dump-v2p afterwards: {bulk.get('entries_after')} entries in {bulk.get('dump_v2p_s', 0):.2f}s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"n": args.n, "cpus": os.cpu_count(), "kernel": os.uname().release,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
           "medians_s": m,
           "work_s": {k: (v - imp if v is not None else None) for k, v in m.items()
                      if k not in ("nsenter_true", "python_bare", "import_cli", "import_all")},
           "imports_s": {"cli": imp - m["python_bare"], "all": m["import_all"] - m["python_bare"],
                         "all_is": IMPORT_ALL},
           "samples_s": t, "bulk_v2p": bulk}
    if m["load_v2p"]:
        doc["bulk_v2p"]["mappings_per_s"] = args.v2p / m["load_v2p"]
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {out}")
    plot(m, imp, out.with_suffix(".png"))


def plot(m, imp, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    keys = ["create_cold", "create_warm", "delete_one", "delete_last", "unload", "set_v2p", "load_v2p"]
    keys = [k for k in keys if m.get(k) is not None]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    base = [min(imp, m[k]) for k in keys]
    work = [m[k] - b for k, b in zip(keys, base)]
    ax.barh(keys, base, color="tab:grey", label="python + imports")
    ax.barh(keys, work, left=base, color="tab:blue", label="work")
    for y, k in enumerate(keys):
        ax.text(m[k], y, f" {m[k]:.2f}s", va="center", fontsize=8)
    ax.set_xlabel("seconds (median)")
    ax.legend(loc="center right", fontsize=8)
    ax.set_title("xdectl command times")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
