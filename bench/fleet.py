"""The fleet at scale on one machine: N sleds (namespaces), M ports, an
agent per sled, one etcd (xdelab/fleet.py).

    .venv/bin/python bench/fleet.py [--sleds 8] [--ports 1000] [--changes 10] [--model 1000:8,100000:100]
                                    [--out bench/results/fleet.json]

Measures, in one run:
  up        `lab up`: from the first apply of M ports to every sled
            matching it (each agent compiles its root, creates its share of
            the ports, and loads the V2P of every port)
  one port  from `fleet apply` of a one-port change (a port's address: its
            sled replaces it, every sled changes one V2P entry) to every
            sled's agent reporting that revision matched; --changes times
  etcd      the baseline of the same run: a put in etcd to a watcher
            seeing it, from the same namespace as the bench's client
  100 ports 100 new ports on sled1 in one apply, until every sled matches
  agents    memory (RSS) and CPU of each agent at rest (10 s with no
            change) and under churn (--changes applies of ten ports each,
            back to back); etcd's memory, CPU and database size beside them.
  model     first, without a lab: what an agent computes for one change
            (read the keys, derive its share, plan) and fleet apply's check,
            for fleets of --model sizes (100,000 ports on 100 sleds by
            default): what the lab cannot hold on this machine.
"Matched" is the agent's own report (its --report file, written once a
reconcile has made every change): the datapath holds the revision.
Run as root; timings on a 2-core machine with N agents are what they are:
read them beside the etcd baseline of the same run.
"""
import argparse
import contextlib
import io
import os
import secrets
import statistics
import sys
import threading
import time

from common import write_result  # (first: it puts the checkout on the import path)

from xdectl.etcd import Etcd
from xdelab.fleet import FleetLab, fleet_text, port_table, vpc_prefix

TICK = os.sysconf("SC_CLK_TCK")


def proc(pid):
    """(RSS bytes, CPU seconds) of a process and its threads."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / TICK


def child_of(parent):
    """The process nsenter runs (the lab starts agents and etcd under it)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        return int(pid)
            except OSError:
                continue
    return parent


def wait_reports(lab, revision, timeout=120):
    """Seconds until every sled's report says revision (polled at 5 ms)."""
    t0 = time.monotonic()
    while True:
        if all((lab.report(s).get("revision") or 0) >= revision for s in lab.sleds):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"not every sled reached {revision} in {timeout} s")
        time.sleep(0.005)


def timed_apply(lab, text):
    t0 = time.monotonic()
    rev = lab.apply(text)
    applied = time.monotonic() - t0
    return applied, applied + wait_reports(lab, rev), rev


def etcd_baseline(lab, n):
    """Seconds from a put to a watcher of that key seeing it."""
    out = []
    with lab.inside("ctl"):
        e, w = Etcd(lab.cluster.urls), Etcd(lab.cluster.urls)
        for i in range(n):
            rev, _ = e.range("/bench/")
            seen = threading.Event()

            def watch():
                for _, events in w.watch("/bench/", rev + 1, idle=5):
                    if events:
                        seen.set()
                        return
            t = threading.Thread(target=watch)
            t.start()
            time.sleep(0.05)         # the watch is open
            t0 = time.monotonic()
            e.put("/bench/k", str(i))
            seen.wait(5)
            out.append(time.monotonic() - t0)
            t.join()
    return out


def usage(lab, seconds, during=None):
    """Per agent and etcd: RSS (MiB) and CPU % over seconds (or over
    during(), when given)."""
    pids = {s: child_of(lab.agents[s].pid) for s in lab.sleds}
    pids["etcd"] = child_of(lab.cluster.members[0].proc.pid)
    before = {k: proc(p) for k, p in pids.items()}
    t0 = time.monotonic()
    if during:
        during()
    else:
        time.sleep(seconds)
    wall = time.monotonic() - t0
    after = {k: proc(p) for k, p in pids.items()}
    return {k: {"rss_mib": round(after[k][0] / 2**20, 1),
                "cpu_percent": round(100 * (after[k][1] - before[k][1]) / wall, 1),
                "cpu_seconds": round(after[k][1] - before[k][1], 2)}
            for k in pids}, wall


def summary(xs):
    return {"median_s": round(statistics.median(xs), 3), "max_s": round(max(xs), 3),
            "min_s": round(min(xs), 3), "n": len(xs)}


def model(n_ports, n_sleds):
    """What an agent computes for one change, without a kernel: a fleet of
    n_ports over n_sleds parsed and checked (fleet apply), read from its keys,
    one sled's share derived (cold, and again with its memo) and planned
    against what the last reconcile left. Seconds each."""
    import json as _json

    from xdectl import agent, apply, fleet
    sleds = [f"sled{i}" for i in range(1, n_sleds + 1)]
    out = {"ports": n_ports, "sleds": n_sleds}
    text = fleet_text(n_ports, sleds)
    t = time.perf_counter()
    f = fleet.parse(text)
    out["parse_s"] = round(time.perf_counter() - t, 3)
    keys = fleet.to_keys(f)
    out["etcd_bytes"] = sum(len(k) + len(v) for k, v in keys.items())
    for i, sled in enumerate(sleds, 1):
        keys[fleet.SLED + sled] = _json.dumps({"underlay_addr": f"fd00:{i:x}::1"})
    t = time.perf_counter()
    state = fleet.from_keys(keys)
    out["from_keys_s"] = round(time.perf_counter() - t, 3)
    memo = {}
    for label in ("derive_cold_s", "derive_s"):
        t = time.perf_counter()
        want, _ = fleet.sled_desired(state, "sled1", ("u1", "u2"), "fd00:1::1", memo)
        out[label] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    apply.plan(agent._as_current(want), want)
    out["plan_s"] = round(time.perf_counter() - t, 3)
    out.update(sled_ports=len(want.ports), sled_v2p=len(want.v2p))
    out["per_change_s"] = round(out["from_keys_s"] + out["derive_s"] + out["plan_s"], 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sleds", type=int, default=8)
    ap.add_argument("--ports", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--model", default="1000:8,100000:100",
                    help="PORTS:SLEDS,... : the agent's computation alone, at these sizes")
    ap.add_argument("--out", default="bench/results/fleet.json")
    a = ap.parse_args()
    models = [model(*map(int, m.split(":"))) for m in a.model.split(",") if m]
    for m in models:
        print(f"model {m['ports']} ports / {m['sleds']} sleds: parse {m['parse_s']} s, one "
              f"change on a sled ({m['sled_ports']} ports, {m['sled_v2p']} V2P): read "
              f"{m['from_keys_s']} + derive {m['derive_s']} + plan {m['plan_s']} = "
              f"{m['per_change_s']} s", flush=True)
    assert os.geteuid() == 0, "run as root"
    lab = FleetLab(f"xb{secrets.token_hex(2)[:3]}-")
    res = {"sleds": a.sleds, "ports": a.ports, "model": models}
    try:
        t0 = time.monotonic()
        with contextlib.redirect_stdout(io.StringIO()):
            lab.up(a.sleds, a.ports, timeout=900)
        res["up_s"] = round(time.monotonic() - t0, 1)
        print(f"up: {a.sleds} sleds, {a.ports} ports matched in {res['up_s']} s", flush=True)
        tables = [port_table(i, lab.sleds) for i in range(a.ports)]

        res["rest"], _ = usage(lab, 10)
        res["etcd_put_to_watch"] = summary(etcd_baseline(lab, a.changes))

        one, applies = [], []
        for k in range(a.changes):
            changed = list(tables)
            changed[0] = dict(tables[0], ip=f"10.0.0.{200 + k % 50}")
            applied, total, _ = timed_apply(lab, fleet_text(0, lab.sleds, changed))
            one.append(total)
            applies.append(applied)
        res["one_port_change"] = summary(one)
        res["fleet_apply_call"] = summary(applies)
        print(f"one-port change on every sled: median {res['one_port_change']['median_s']} s, "
              f"max {res['one_port_change']['max_s']} s (etcd put->watch "
              f"{res['etcd_put_to_watch']['median_s']} s)", flush=True)

        extra = [dict(port_table(a.ports + k, lab.sleds), sled=lab.sleds[0])
                 for k in range(100)]
        _, total, _ = timed_apply(lab, fleet_text(0, lab.sleds, tables + extra))
        res["hundred_creations_s"] = round(total, 2)
        print(f"100 port creations on {lab.sleds[0]}: {total:.2f} s", flush=True)
        _, total, _ = timed_apply(lab, fleet_text(0, lab.sleds, tables))
        res["hundred_deletions_s"] = round(total, 2)

        def churn():
            for k in range(a.changes):
                changed = [dict(t, ip=f"{vpc_prefix(i // 100)}.{200 + k % 50}") if i % 100 == k
                           else t for i, t in enumerate(tables)]
                timed_apply(lab, fleet_text(0, lab.sleds, changed))
        res["churn"], wall = usage(lab, 0, churn)
        res["churn_wall_s"] = round(wall, 1)
        with lab.client() as e:
            res["etcd_status"] = e.status()
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            lab.down(quiet=True)
    agents = [v for k, v in res["rest"].items() if k != "etcd"]
    print(f"agents at rest: RSS {statistics.median(x['rss_mib'] for x in agents)} MiB, CPU "
          f"{statistics.median(x['cpu_percent'] for x in agents)} %; under churn CPU "
          f"{statistics.median(v['cpu_percent'] for k, v in res['churn'].items() if k != 'etcd')}"
          f" %; etcd RSS {res['churn']['etcd']['rss_mib']} MiB")
    print(f"wrote {write_result(a.out, res)}")


if __name__ == "__main__":
    sys.exit(main())
