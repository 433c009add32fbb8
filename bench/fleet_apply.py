"""A large first `fleet apply`, against a three-member etcd of its own (in a
namespace of its own, on loopback), for each size in --ports:

    .venv/bin/python bench/fleet_apply.py [--ports 20000,100000] [--out bench/results/fleet_apply.json]

  parse     the file checked whole (`fleet.parse`), as `fleet apply` does first
  apply     `fleet.apply_file` with the CLI's client: read, diff, one transaction
  baseline  the same keys written by one bare transaction to a fresh cluster
            of the same kind, in the same run: etcd's own cost of the write
  reported  the keys the apply said it wrote, against the keys it had to
            (an answer lost and the transaction sent again used to report 0)
Run as root.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

from common import write_result  # (first: it puts the checkout on the import path)

from pyroute2 import netns

from xdectl import fleet
from xdectl.etcd import Etcd
from xdelab.etcd import standalone
from xdelab.fleet import fleet_text

SLEDS = [f"sled{i}" for i in range(1, 101)]


@contextlib.contextmanager
def cluster():
    """A three-member etcd in a namespace of its own, and a client there."""
    with tempfile.TemporaryDirectory(prefix="xde-bench-", dir="/var/tmp") as d, \
            standalone(d, size=3) as c:
        netns.pushns(c.netns)
        e = Etcd(c.urls, txn_timeout=30)     # as `xdectl fleet apply`
        try:
            yield e
        finally:
            e.close()
            netns.popns()


def one(n):
    text = fleet_text(n, SLEDS)
    t = time.perf_counter()
    f = fleet.parse(text)
    out = {"ports": n, "parse_s": round(time.perf_counter() - t, 3)}
    keys = fleet.to_keys(f)
    out["keys"] = len(keys)
    for label in ("baseline_s", "apply_s"):
        with cluster() as e:
            t = time.perf_counter()
            if label == "baseline_s":
                e.txn([], sorted(keys.items()))
            else:
                _, puts, _ = fleet.apply_file(e, f)
                out["reported_puts"] = puts
            out[label] = round(time.perf_counter() - t, 3)
    out["apply_vs_baseline"] = round(out["apply_s"] / out["baseline_s"], 2)
    if out["reported_puts"] != out["keys"]:
        sys.exit(f"bench/fleet_apply.py: the apply of {n} ports reported {out['reported_puts']} "
                 f"keys written, not {out['keys']}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ports", default="20000,100000")
    ap.add_argument("--out", default="bench/results/fleet_apply.json")
    a = ap.parse_args()
    if os.geteuid():
        sys.exit("bench/fleet_apply.py: run as root (it makes network namespaces)")
    rows = []
    for n in (int(x) for x in a.ports.split(",")):
        r = one(n)
        rows.append(r)
        print(f"{r['ports']:7} ports ({r['keys']} keys): parse {r['parse_s']:.2f} s, apply "
              f"{r['apply_s']:.2f} s, one bare transaction {r['baseline_s']:.2f} s "
              f"(x{r['apply_vs_baseline']}); reported {r['reported_puts']} keys written",
              flush=True)
    print("wrote", write_result(a.out, {"sizes": rows}))


if __name__ == "__main__":
    main()
