"""The Prometheus exporter (`xdectl metrics`) and `stats --watch` rates
(docs/design.md, "Observability commands" and "Counters and drop reasons"),
against the session's lab, reset to its built state before and after.

1. `metrics --once`: every metric has HELP and TYPE, the names and labels
   are the conventional ones, and the values are those `xdectl stats --json`
   (and dump-fw, dump-flows) report.
2. A real Prometheus server (the distribution's /usr/bin/prometheus, run
   directly with a throw-away config and TSDB) scrapes the exporter every
   second while g1 pings g2; its HTTP API must show the port counters rise.
3. The rates of `stats --watch` (metrics.watch) follow the traffic.

The exporters run in the host's network namespace with --root pointing at
a sled's root: the maps are kernel objects reached through bpffs, and the
exporter uses no netlink. Everything listens on 127.0.0.1 only.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from frames import G1_IP, G1_IP6, G1_MAC, G2_IP, GW_IP, GW_MAC
from lab_fixture import XDECTL
from xdelab.lab import SLEDS

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = "/usr/bin/prometheus"


# --- the lab -------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlab(xlab):
    """The session's lab as built, both guests answering each other."""
    xlab.reset()
    xlab.wait_guests_reach_each_other()
    yield xlab
    xlab.reset()


# --- helpers ---------------------------------------------------------------------

def once(root):
    """`xdectl metrics --once` from the host namespace."""
    p = subprocess.run([XDECTL, "--root", root, "metrics", "--once"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, f"metrics --once exited {p.returncode}: {p.stderr}"
    return p.stdout


def samples(text):
    """{(name, frozenset(labels)): value} of an exposition, parsed by
    prometheus_client's own parser (so the format itself is checked)."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def spoofed_frame():
    """An IPv4/UDP frame from g1 whose source MAC is not the port's."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    return bytes(Ether(src="a8:40:25:ff:00:77", dst=GW_MAC) / IP(src=G1_IP, dst=G2_IP) /
                 UDP(sport=4000, dport=4001) / b"spoof")


# The mapping docs/design.md, "Counters and drop reasons", fixes, written out
# here independently of xdectl/metrics.py.
PORT_NAMES = {
    "rx_packets": ("xde_port_rx_packets_total", {}),
    "rx_bytes": ("xde_port_rx_bytes_total", {}),
    "tx_packets": ("xde_port_tx_packets_total", {}),
    "tx_bytes": ("xde_port_tx_bytes_total", {}),
    "encap": ("xde_port_encap_total", {}),
    "decap": ("xde_port_decap_total", {}),
    "arp_replies": ("xde_port_gateway_replies_total", {"kind": "arp"}),
    "icmp_replies": ("xde_port_gateway_replies_total", {"kind": "icmp"}),
    "ndp_replies": ("xde_port_gateway_replies_total", {"kind": "ndp"}),
    "dhcp4_replies": ("xde_port_gateway_replies_total", {"kind": "dhcp4"}),
    "dhcp6_replies": ("xde_port_gateway_replies_total", {"kind": "dhcp6"}),
    "flow_hits": ("xde_port_flow_hits_total", {}),
    "route_cache_hits": ("xde_port_route_cache_lookups_total", {"result": "hit"}),
    "route_cache_misses": ("xde_port_route_cache_lookups_total", {"result": "miss"}),
    "flow_misses": ("xde_port_flow_misses_total", {}),
    "passthrough_in": ("xde_port_passthrough_packets_total", {"dir": "in"}),
    "passthrough_out": ("xde_port_passthrough_packets_total", {"dir": "out"}),
    "mtu_icmp_sent": ("xde_port_mtu_icmp_sent_total", {}),
    "underlay_detours": ("xde_port_underlay_detours_total", {}),
    "flow_reevaluated": ("xde_port_flow_reevaluated_total", {}),
    "fw_allowed": ("xde_port_fw_verdicts_total", {"verdict": "allowed"}),
    "fw_denied": ("xde_port_fw_verdicts_total", {"verdict": "denied"}),
    "nat_out": ("xde_port_nat_packets_total", {"dir": "out"}),
    "nat_in": ("xde_port_nat_packets_total", {"dir": "in"}),
    "snat_allocated": ("xde_port_snat_allocated_total", {}),
    "snat_reclaimed": ("xde_port_snat_reclaimed_total", {}),
    "flow_entries": ("xde_flows", {}),  # a gauge: stats shows the occupancy too
}


def expected_port(port, counters):
    """The samples stats' port counters must appear as (drops: once they
    have counted something)."""
    exp = {}
    for c, v in counters.items():
        if c.startswith("drop_") and not v:
            continue
        if c.startswith("drop_"):
            direction, reason = c[5:].split("_", 1)
            name, labels = "xde_port_drops_total", {"dir": direction, "reason": reason}
        else:
            assert c in PORT_NAMES, f"port counter {c} has no metric name in this test"
            name, labels = PORT_NAMES[c]
        exp[(name, frozenset({"port": port, **labels}.items()))] = v
    return exp


def expected_global(counters):
    exp = {}
    for c, v in counters.items():
        if c.startswith("drop_") and not v:
            continue
        if c == "passed_to_host":
            key = ("xde_passed_to_host_total", frozenset())
        elif c == "route_cache_entries":
            key = ("xde_route_cache_entries", frozenset())
        elif c.startswith("drop_"):
            direction, reason = c[5:].split("_", 1)
            key = ("xde_drops_total", frozenset({"dir": direction, "reason": reason}.items()))
        else:
            raise AssertionError(f"global counter {c} has no metric name in this test")
        exp[key] = v
    return exp


# --- 1. the exposition -------------------------------------------------------------

HELP_REQUIRED = [
    "xde_port_rx_packets_total", "xde_port_rx_bytes_total", "xde_port_tx_packets_total",
    "xde_port_tx_bytes_total", "xde_port_encap_total", "xde_port_decap_total",
    "xde_port_gateway_replies_total", "xde_port_flow_hits_total", "xde_port_flow_misses_total",
    "xde_port_drops_total", "xde_port_info", "xde_flows", "xde_fw_rule_hits_total",
    "xde_passed_to_host_total", "xde_drops_total",
]


def test_once_names_help_and_values_match_stats(mlab):
    # traffic of several kinds: across sleds, to the gateway, and 3 spoofed frames
    for addr in (G2_IP, GW_IP):
        ok, out = mlab.ping("g1", addr)
        assert ok, out
    spoofed0 = mlab.xdectl_json("sled1", "stats")["xde0"]["drop_out_spoof"]
    mlab.send_frames("g1", "xde0", [spoofed_frame()] * 3)
    root = mlab.lab.root("sled1")

    # counters move only with traffic; guests may still send a stray frame
    # (IPv6 neighbour discovery), so compare a read bracketed by two equal ones
    for attempt in range(20):
        before = mlab.xdectl_json("sled1", "stats")
        gbefore = mlab.xdectl_json("sled1", "stats", "--global")
        text = once(root)
        after = mlab.xdectl_json("sled1", "stats")
        gafter = mlab.xdectl_json("sled1", "stats", "--global")
        if before == after and gbefore == gafter:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the counters never stood still for one read")

    # every metric family has HELP and TYPE, HELP before TYPE, HELP not empty
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert set(helps) == set(types), (set(helps) ^ set(types))
    assert all(h.strip() for h in helps.values())
    for name in HELP_REQUIRED:
        base = name[:-len("_total")] if name.endswith("_total") else name
        assert base in helps or name in helps, f"no HELP for {name}:\n{text}"
    sample_names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line and not line.startswith("#")}
    for name in sample_names:
        base = name[:-len("_total")] if name.endswith("_total") else name
        assert base in helps or name in helps, f"sample {name} without HELP"
    assert types.get("xde_port_rx_packets_total", types.get("xde_port_rx_packets")) == "counter"
    assert types.get("xde_port_info") == "gauge" and types.get("xde_flows") == "gauge"

    got = samples(text)
    # values: the port counters and the global ones, exactly as stats --json
    assert list(before) == ["xde0"], before
    exp = expected_port("xde0", before["xde0"])
    exp.update(expected_global(gbefore))
    for key, v in exp.items():
        assert key in got, f"missing sample {key[0]}{dict(key[1])}"
        assert got[key] == v, f"{key[0]}{dict(key[1])}: metrics {got[key]}, stats {v}"
    # and the traffic above shows
    port = frozenset({"port": "xde0"}.items())
    assert got[("xde_port_tx_packets_total", port)] > 0
    assert got[("xde_port_rx_packets_total", port)] > 0
    assert got[("xde_port_gateway_replies_total",
                frozenset({"port": "xde0", "kind": "icmp"}.items()))] >= 3
    assert got[("xde_port_drops_total",
                frozenset({"port": "xde0", "dir": "out", "reason": "spoof"}.items()))] == spoofed0 + 3
    # a pair that never counted is not exported (spoofing is outbound only)
    assert ("xde_port_drops_total",
            frozenset({"port": "xde0", "dir": "in", "reason": "spoof"}.items())) not in got

    # the port's identity
    info = [dict(k[1]) for k in got if k[0] == "xde_port_info"]
    assert info == [{"port": "xde0", "mac": G1_MAC, "ip": G1_IP, "ip6": G1_IP6, "vni": "10",
                     "mode": "overlay"}]
    assert got[("xde_port_info", frozenset(info[0].items()))] == 1

    # firewall rule hits and flow-table occupancy, as dump-fw and dump-flows say
    rules = mlab.xdectl_json("sled1", "dump-fw", "xde0")
    assert rules, "the port has its default rules"
    for r in rules:
        key = ("xde_fw_rule_hits_total",
               frozenset({"port": "xde0", "dir": r["dir"], "rule": str(r["id"])}.items()))
        assert got.get(key) == r["hits"], (key, got.get(key), r)
    assert len([k for k in got if k[0] == "xde_fw_rule_hits_total"]) == len(rules)
    flows = mlab.xdectl_json("sled1", "dump-flows", "xde0")
    assert flows, "the pings left flows"
    assert got[("xde_flows", port)] == len(flows)
    assert got[("xde_up", frozenset())] == 1


def test_once_without_instance():
    """A root with nothing loaded: every family still has HELP, xde_up is 0."""
    text = once("/sys/fs/bpf/xp-metrics-nothing-here")
    got = samples(text)
    assert got[("xde_up", frozenset())] == 0
    assert "# HELP xde_port_tx_packets_total " in text
    assert not [k for k in got if k[0].startswith("xde_port_")]


# --- 2. a real Prometheus ---------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what, cond, timeout, step=0.25):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def _http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def _stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start_exporter(root, log):
    """`xdectl metrics --listen 127.0.0.1:0` in the host namespace; (proc, port)."""
    f = open(log, "w")
    proc = subprocess.Popen([XDECTL, "--root", root, "metrics", "--listen", "127.0.0.1:0"],
                            stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    f.close()

    def bound():
        if proc.poll() is not None:
            raise AssertionError(f"exporter exited {proc.returncode}: {Path(log).read_text()}")
        m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/metrics", Path(log).read_text())
        return m and int(m.group(1))
    try:
        return proc, _wait("the exporter to listen", bound, 30)
    except BaseException:
        _stop(proc)
        raise


def test_prometheus_scrapes_rising_counters(mlab, tmp_path):
    assert os.access(PROMETHEUS, os.X_OK), \
        f"{PROMETHEUS} missing: install the distribution's prometheus (make setup)"
    procs = []
    prom = ping = None
    try:
        targets = {}
        for sled in SLEDS:
            proc, port = _start_exporter(mlab.lab.root(sled), tmp_path / f"exporter-{sled}.log")
            procs.append(proc)
            targets[sled] = port
        # the exporter answers on its own before Prometheus is involved
        status, body = _http_get(f"http://127.0.0.1:{targets['sled1']}/metrics")
        assert status == 200 and 'xde_port_tx_packets_total{port="xde0"}' in body

        web = _free_port()
        config = tmp_path / "prometheus.yml"
        scrape = "\n".join(
            f"      - targets: ['127.0.0.1:{port}']\n        labels: {{sled: {sled}}}"
            for sled, port in targets.items())
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: xde\n    static_configs:\n" + scrape + "\n")
        prom_log = open(tmp_path / "prometheus.log", "w")
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn",
             "--web.console.templates=/usr/share/prometheus/consoles",
             "--web.console.libraries=/usr/share/prometheus/console_libraries"],
            stdin=subprocess.DEVNULL, stdout=prom_log, stderr=prom_log, cwd=tmp_path)
        prom_log.close()
        api = f"http://127.0.0.1:{web}"

        def ready():
            assert prom.poll() is None, \
                f"prometheus exited {prom.returncode}: {(tmp_path / 'prometheus.log').read_text()}"
            try:
                return _http_get(f"{api}/-/ready", timeout=2)[0] == 200
            except OSError:
                return False
        _wait("prometheus to be ready", ready, 60)

        def query(expr):
            status, body = _http_get(f"{api}/api/v1/query?" +
                                     urllib.parse.urlencode({"query": expr}))
            data = json.loads(body)
            assert status == 200 and data["status"] == "success", body
            return {r["metric"].get("sled"): float(r["value"][1])
                    for r in data["data"]["result"]}

        # both targets scraped and up
        _wait("both exporters scraped and up",
              lambda: query('up{job="xde"}') == {"sled1": 1.0, "sled2": 1.0}, 30)
        tx = 'xde_port_tx_packets_total{job="xde",port="xde0"}'
        rx = 'xde_port_rx_packets_total{job="xde",port="xde0"}'
        start_tx = _wait("a first sample of sled1's tx counter",
                         lambda: query(tx).get("sled1") is not None and query(tx), 30)
        start_rx = query(rx)

        # traffic: g1 pings g2 (sled1's port sends, sled2's delivers) for a while
        ping = subprocess.Popen(["nsenter", f"--net=/run/netns/{mlab.lab.ns('g1')}", "ping",
                                 "-q", "-i", "0.2", "-c", "150", G2_IP],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Prometheus must see sled1's tx and sled2's rx rise (replies: the reverse)
        rose = _wait("Prometheus to report the rise of the port counters", lambda: (
            query(tx).get("sled1", 0) >= start_tx["sled1"] + 5 and
            query(rx).get("sled2", 0) >= start_rx.get("sled2", 0) + 5 and
            query(rx).get("sled1", 0) >= start_rx.get("sled1", 0) + 5), 30)
        assert rose
        # a rate over the scraped series is positive, as a dashboard would graph it
        _wait("a positive rate() of sled1's tx packets",
              lambda: query(f"rate({tx}[5s])").get("sled1", 0) > 0, 15)
        # what Prometheus holds never exceeds what the maps say now
        now = mlab.xdectl_json("sled1", "stats", "xde0")["xde0"]
        assert query(tx)["sled1"] <= now["tx_packets"]
        # every query of the shipped Grafana dashboard is valid PromQL here,
        # and the traffic panels have data
        for title, expr in dashboard_queries():
            result = query(expr)
            if title in ("Packets per second", "Bytes per second"):
                assert result.get("sled1", 0) > 0, (title, expr, result)
    finally:
        _stop(ping)
        _stop(prom)
        for p in procs:
            _stop(p)
    # the exporters stopped cleanly on SIGTERM
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]


def dashboard_queries():
    """(panel title, expr) of deploy/grafana-dashboard.json, its variables
    replaced by what Grafana would send with 'All' selected."""
    dash = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", "5s")
                    .replace("$instance", ".*").replace("$port", ".*"))
            out.append((p["title"], expr))
    return out


def test_deploy_files():
    """The example scrape config passes promtool; the dashboard is JSON whose
    queries use only metrics the exporter defines."""
    p = subprocess.run(["promtool", "check", "config", str(REPO / "deploy" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    dash = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    queries = dashboard_queries()
    assert dash["title"] and dash["uid"] and queries
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    help_names = set(re.findall(r"^# HELP (\S+) ", once("/sys/fs/bpf/xp-metrics-nothing-here"),
                                re.M))
    used = {m for _, e in queries for m in re.findall(r"\b(xde_[a-z_]+)", e)}
    assert used, queries
    for m in used:
        base = m[:-len("_total")] if m.endswith("_total") else m
        assert m in help_names or base in help_names, f"dashboard uses unknown metric {m}"
    for name in ("xde_port_rx_packets_total", "xde_port_tx_bytes_total",
                 "xde_port_drops_total", "xde_port_flow_hits_total", "xde_port_flow_misses_total"):
        assert name in used, f"dashboard lacks {name}"


# --- 3. stats --watch rates --------------------------------------------------------

def test_watch_rates_follow_traffic(mlab):
    root = mlab.lab.root("sled1")
    code = ("import sys; from xdectl.metrics import watch; "
            "watch(sys.argv[1], 'xde0', 0.5)")
    # Ctrl-C as at a terminal, however the tests were started: a shell's
    # background job has SIGINT ignored, and Python keeps it so
    proc = subprocess.Popen([sys.executable, "-c", code, root], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(1.2)
        ok, out = mlab.ping("g1", G2_IP, count=10)
        assert ok, out
        time.sleep(0.6)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    assert proc.returncode == 0, f"watch exited {proc.returncode} on Ctrl-C: {stderr}"
    frames = [f for f in re.split(r"^(?=xde /)", stdout, flags=re.M) if "xde0:" in f]
    assert len(frames) >= 4, stdout

    def rate(frame, counter):
        m = re.search(rf"^\s+{counter}\s+(\d+)\s+(\S+)$", frame, re.M)
        assert m, f"{counter} not in frame:\n{frame}"
        return int(m.group(1)), m.group(2)

    assert rate(frames[0], "tx_packets")[1] == "-"          # no rate before a second read
    rates = [rate(f, "tx_packets")[1] for f in frames[1:]]
    assert any(r not in ("-", "0") and float(r.rstrip("kM")) > 0 for r in rates), rates
    totals = [rate(f, "tx_packets")[0] for f in frames]
    assert totals == sorted(totals) and totals[-1] >= totals[0] + 10, totals
