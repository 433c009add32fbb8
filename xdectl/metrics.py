"""Observability: the Prometheus exporter (`xdectl metrics`) and the live
rates of `xdectl stats --watch` (docs/design.md, "Observability commands"
and "Counters and drop reasons").

Both read the instance's pinned maps when asked (a scrape, a refresh),
never on a timer of their own, and only the maps: no netlink, so the
exporter may run in any network namespace that sees the root's bpffs
(for instance the host's, serving a lab sled's root).

prometheus_client is imported inside the command: every other xdectl
call starts without it.
"""
import os
import sys
import threading
import time

from . import counters
from .abi import PORT_F_PASSTHROUGH
from .errors import XdeError


# Port events (bpf/counters.h XDE_PORT_EVENTS) -> (metric, HELP, labels).
# An event missing from this table (added to the datapath later) is still
# exported, under its own name, so nothing the datapath counts is ever
# invisible. Drops are one family, labelled by direction and by reason
# from the datapath's list; a (direction, reason) appears once it has
# counted something (most pairs never do: some 30 reasons x 2 directions x
# every port would be mostly zeros).
PORT_METRICS = {
    "rx_packets": ("xde_port_rx_packets",
                   "Frames the port delivered to its guest (the receive side of the guest's NIC).", {}),
    "rx_bytes": ("xde_port_rx_bytes", "Bytes the port delivered to its guest.", {}),
    "tx_packets": ("xde_port_tx_packets",
                   "Frames the guest sent into the port (the transmit side of the guest's NIC).", {}),
    "tx_bytes": ("xde_port_tx_bytes", "Bytes the guest sent into the port.", {}),
    "encap": ("xde_port_encap", "Guest frames encapsulated in Geneve and sent to the underlay.", {}),
    "decap": ("xde_port_decap", "Geneve packets from the underlay decapsulated for the guest.", {}),
    "arp_replies": ("xde_port_gateway_replies",
                    "Requests of the guest answered by the virtual gateway, by kind.",
                    {"kind": "arp"}),
    "icmp_replies": ("xde_port_gateway_replies",
                     "Requests of the guest answered by the virtual gateway, by kind.",
                     {"kind": "icmp"}),
    "ndp_replies": ("xde_port_gateway_replies",
                    "Requests of the guest answered by the virtual gateway, by kind.",
                    {"kind": "ndp"}),
    "dhcp4_replies": ("xde_port_gateway_replies",
                      "Requests of the guest answered by the virtual gateway, by kind.",
                      {"kind": "dhcp4"}),
    "dhcp6_replies": ("xde_port_gateway_replies",
                      "Requests of the guest answered by the virtual gateway, by kind.",
                      {"kind": "dhcp6"}),
    "passthrough_out": ("xde_port_passthrough_packets",
                        "Frames a passthrough port passed unchanged, by direction.",
                        {"dir": "out"}),
    "passthrough_in": ("xde_port_passthrough_packets",
                       "Frames a passthrough port passed unchanged, by direction.",
                       {"dir": "in"}),
    "mtu_icmp_sent": ("xde_port_mtu_icmp_sent",
                      "ICMP fragmentation-needed messages sent to the guest for oversize frames.", {}),
    "underlay_detours": ("xde_port_underlay_detours",
                         "Encapsulated frames sent through the other underlay because the "
                         "next hop the routes chose was not resolved yet.", {}),
    "route_cache_hits": ("xde_port_route_cache_lookups",
                         "Encapsulated packets by whether the underlay route cache had their "
                         "flow's route (hit) or the FIB was asked (miss).", {"result": "hit"}),
    "route_cache_misses": ("xde_port_route_cache_lookups",
                           "Encapsulated packets by whether the underlay route cache had their "
                           "flow's route (hit) or the FIB was asked (miss).", {"result": "miss"}),
    "flow_hits": ("xde_port_flow_hits", "Packets whose verdict came from the flow table.", {}),
    "flow_misses": ("xde_port_flow_misses",
                    "Packets that found no flow-table entry and were judged by the rules.", {}),
    "flow_reevaluated": ("xde_port_flow_reevaluated",
                         "Packets of cached flows judged again after the rules changed.", {}),
    "fw_allowed": ("xde_port_fw_verdicts", "Firewall rule evaluations, by verdict.",
                   {"verdict": "allowed"}),
    "fw_denied": ("xde_port_fw_verdicts", "Firewall rule evaluations, by verdict.",
                  {"verdict": "denied"}),
    "nat_out": ("xde_port_nat_packets",
                "Packets NAT translated, by direction: out from the guest to an external "
                "address, in from outside to the guest's.", {"dir": "out"}),
    "nat_in": ("xde_port_nat_packets",
               "Packets NAT translated, by direction: out from the guest to an external "
               "address, in from outside to the guest's.", {"dir": "in"}),
    "snat_allocated": ("xde_port_snat_allocated",
                       "SNAT ports given to new flows.", {}),
    "snat_reclaimed": ("xde_port_snat_reclaimed",
                       "SNAT ports given to new flows that were taken over from a flow that "
                       "had left the flow table or expired.", {}),
}
PORT_DROPS = ("xde_port_drops", "Frames of the port dropped, by direction and reason.")

GLOBAL_METRICS = {
    "passed_to_host": ("xde_passed_to_host",
                       "Underlay packets not for xde, passed on to the host stack.", {}),
}
ROUTE_CACHE = ("gauge", "xde_route_cache_entries",
               "Entries of the underlay route cache: (destination, flow hash) pairs whose route "
               "the FIB gave in the last 100 ms, or older ones the LRU map has not reused.", [])
GLOBAL_DROPS = ("xde_drops", "Frames dropped before a port was known "
                             "(malformed Geneve, no such port), by direction and reason.")

# Boundary services (bpf/boundary.h, their own lists): events -> (metric,
# HELP, labels), as for ports; drops by reason alone. Sampled while
# boundary services are up on the root.
_BSVC_PACKETS = ("xde_boundary_packets",
                 "Packets boundary services carried, by direction: decap (Geneve from the "
                 "sleds, handed to the host to route out) and encap (from outside, to a "
                 "guest's sled).")
_BSVC_BYTES = ("xde_boundary_bytes", "Bytes of the packets boundary services carried, by "
               "direction (the inner packets' frames).")
_BSVC_PASSED = ("xde_boundary_passed_to_host",
                "Frames boundary services passed to the host untouched, by link: underlay "
                "(not Geneve for the boundary) or external (no NAT entry).")
_BSVC_CACHE = ("xde_boundary_route_cache_lookups",
               "Encapsulated packets by whether the underlay route cache had their flow's "
               "route (hit) or the FIB was asked (miss).")
BOUNDARY_METRICS = {
    "decap": (*_BSVC_PACKETS, {"dir": "decap"}),
    "encap": (*_BSVC_PACKETS, {"dir": "encap"}),
    "decap_bytes": (*_BSVC_BYTES, {"dir": "decap"}),
    "encap_bytes": (*_BSVC_BYTES, {"dir": "encap"}),
    "underlay_passed": (*_BSVC_PASSED, {"link": "underlay"}),
    "external_passed": (*_BSVC_PASSED, {"link": "external"}),
    "route_cache_hits": (*_BSVC_CACHE, {"result": "hit"}),
    "route_cache_misses": (*_BSVC_CACHE, {"result": "miss"}),
    "neigh_unresolved": ("xde_boundary_unresolved_next_hops",
                         "Encapsulated packets sent while the next hop the FIB chose was not "
                         "resolved yet (the kernel resolves it, then sends).", {}),
}
BOUNDARY_DROPS = ("xde_boundary_drops", "Packets boundary services dropped, by reason.")
BOUNDARY_UP = ("gauge", "xde_boundary_up",
               "1 while boundary services are up on the root, else 0.", [])
BOUNDARY_NAT = ("gauge", "xde_boundary_nat_entries",
                "Entries of the boundary's NAT table (an address, or a port range of one).", [])


def parse_listen(text):
    """ADDR:PORT, [V6ADDR]:PORT or :PORT -> (addr, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise XdeError(f"--listen {text!r} is not ADDR:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise XdeError(f"--listen {text!r}: write an IPv6 address in brackets, [::1]:PORT")
    return host or "0.0.0.0", int(port)


class Reader:
    """The root's maps, opened once and reopened when the instance under
    the root is replaced (unload and a new create pin new maps)."""

    def __init__(self, root):
        from .datapath import Datapath
        self.root = root
        self._Datapath = Datapath
        self._dp = None
        self._ident = None
        self.lock = threading.Lock()

    def _pin_ident(self):
        try:
            st = os.stat(os.path.join(self.root, "maps", "meta"))
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def close(self):
        if self._dp is not None:
            self._dp.close()
        self._dp = None
        self._ident = None

    def maps(self):
        """The maps, or None when nothing is loaded under the root.
        XdeError when the instance has a layout this xdectl cannot read."""
        ident = self._pin_ident()
        if ident != self._ident or self._dp is None:
            self.close()
            if ident is None:
                return None
            dp = self._Datapath(self.root)
            dp.maps()
            self._dp, self._ident = dp, ident
        return self._dp._maps

    # --- reads ---------------------------------------------------------------

    @staticmethod
    def ports(maps):
        """[(datapath ifindex, port_cfg)], by name."""
        return sorted(((k.value, pc) for k, pc in maps["ports"].items()),
                      key=lambda kv: kv[1].name)


def _port_info(pc):
    from .maps import mac_str, port_ips
    ip, ip6 = port_ips(pc)
    return {"mac": mac_str(pc.mac), "ip": ip or "", "ip6": ip6 or "", "vni": str(pc.vni),
            "mode": "passthrough" if pc.flags & PORT_F_PASSTHROUGH else "overlay"}


class XdeCollector:
    """A prometheus_client collector: every collect() is one read of the maps."""

    def __init__(self, root):
        self.reader = Reader(root)
        self._last_error = None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        with self.reader.lock:
            families = {}

            def family(kind, name, help_text, labels):
                f = families.get(name)
                if f is None:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    f = families[name] = cls(name, help_text, labels=labels)
                return f

            # Families that always appear (with HELP), even with no ports.
            for counter, (name, help_text, extra) in PORT_METRICS.items():
                family("counter", name, help_text, ["port", *extra])
            family("counter", PORT_DROPS[0], PORT_DROPS[1], ["port", "dir", "reason"])
            info = family("gauge", "xde_port_info",
                          "A port of the root: its guest MAC, IPv4 and IPv6 addresses (empty "
                          "for a family it lacks), VNI and mode (always 1).",
                          ["port", "mac", "ip", "ip6", "vni", "mode"])
            flows = family("gauge", "xde_flows", "Flow-table entries of the port (both directions).",
                           ["port"])
            hits = family("counter", "xde_fw_rule_hits",
                          "Packets that matched a firewall rule, by port, direction and rule id.",
                          ["port", "dir", "rule"])
            for counter, (name, help_text, extra) in GLOBAL_METRICS.items():
                family("counter", name, help_text, list(extra))
            family("counter", GLOBAL_DROPS[0], GLOBAL_DROPS[1], ["dir", "reason"])
            for counter, (name, help_text, extra) in BOUNDARY_METRICS.items():
                family("counter", name, help_text, list(extra))
            family("counter", BOUNDARY_DROPS[0], BOUNDARY_DROPS[1], ["reason"])
            family(*BOUNDARY_UP)
            family(*BOUNDARY_NAT)
            up = family("gauge", "xde_up",
                        "1 when the datapath instance under the root could be read, else 0.", [])
            nports = family("gauge", "xde_ports", "Ports of the root.", [])
            family(*ROUTE_CACHE)

            try:
                maps = self.reader.maps()
                if maps is not None:
                    self._collect(maps, family, info, flows, hits, nports)
                up.add_metric([], 1 if maps is not None else 0)
                self._last_error = None
            except (XdeError, OSError) as e:
                self.reader.close()
                up.add_metric([], 0)
                if str(e) != self._last_error:
                    print(f"xdectl metrics: {e}", file=sys.stderr)
                    self._last_error = str(e)
        yield from families.values()

    @staticmethod
    def _collect(maps, family, info, flows, hits, nports):
        ports = Reader.ports(maps)
        nports.add_metric([], len(ports))
        family(*ROUTE_CACHE).add_metric([], counters.route_cache_entries(maps))
        flow_counts = counters.flows_per_port(maps)
        port_drops = family("counter", PORT_DROPS[0], PORT_DROPS[1], ["port", "dir", "reason"])
        for index, pc in ports:
            port = pc.name.decode()
            i = _port_info(pc)
            info.add_metric([port, i["mac"], i["ip"], i["ip6"], i["vni"], i["mode"]], 1)
            flows.add_metric([port], flow_counts.get(index, 0))
            c = counters.port_counts(maps, index) or counters.Counts()
            for event, value in c.events.items():
                name, help_text, extra = PORT_METRICS.get(
                    event, (f"xde_port_{event}", f"Port event {event} of the datapath.", {}))
                family("counter", name, help_text, ["port", *extra]).add_metric(
                    [port, *extra.values()], value)
            for (direction, reason), value in c.drops.items():
                if value:
                    port_drops.add_metric([port, direction, reason], value)
            for direction, rid, n in counters.port_rule_hits(maps, index):
                hits.add_metric([port, direction, str(rid)], n)
        g = counters.global_counts(maps)
        for event, value in g.events.items():
            name, help_text, extra = GLOBAL_METRICS.get(
                event, (f"xde_{event}", f"Instance event {event} of the datapath.", {}))
            family("counter", name, help_text, list(extra)).add_metric(list(extra.values()), value)
        global_drops = family("counter", GLOBAL_DROPS[0], GLOBAL_DROPS[1], ["dir", "reason"])
        for (direction, reason), value in g.drops.items():
            if value:
                global_drops.add_metric([direction, reason], value)
        XdeCollector._collect_boundary(maps, family)

    @staticmethod
    def _collect_boundary(maps, family):
        from .boundary import nat_entries
        cfg = maps["bsvc_cfg"].get(maps["bsvc_cfg"].Key(0))
        family(*BOUNDARY_UP).add_metric([], 1 if cfg.up else 0)
        if not cfg.up:
            return
        family(*BOUNDARY_NAT).add_metric([], nat_entries(maps))
        c = counters.boundary_counts(maps)
        for event, value in c.events.items():
            name, help_text, extra = BOUNDARY_METRICS.get(
                event, (f"xde_boundary_{event}", f"Boundary services event {event}.", {}))
            family("counter", name, help_text, list(extra)).add_metric(list(extra.values()), value)
        drops = family("counter", BOUNDARY_DROPS[0], BOUNDARY_DROPS[1], ["reason"])
        for reason, value in c.drops.items():
            if value:
                drops.add_metric([reason], value)


def exposition(root):
    """The metrics of root in the Prometheus text format (one read)."""
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry()
    registry.register(XdeCollector(root))
    return generate_latest(registry).decode()


def serve(root, listen):
    """Serve /metrics until Ctrl-C or SIGTERM."""
    import signal

    from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR,
                                   CollectorRegistry, start_http_server)
    addr, port = parse_listen(listen)
    registry = CollectorRegistry()
    collector = XdeCollector(root)
    registry.register(collector)
    for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(c)
    try:
        server, _ = start_http_server(port, addr, registry)
    except OSError as e:
        raise XdeError(f"cannot listen on {listen}: {e.strerror or e}") from None
    host, bound = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"xdectl metrics: serving {root} on http://{shown}:{bound}/metrics", file=sys.stderr,
          flush=True)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        collector.reader.close()


# --- stats --watch -------------------------------------------------------------

# Shown even while zero, in this order; other counters appear once non-zero.
WATCH_ALWAYS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "encap", "decap")


def _rate(v):
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.1f}" if v % 1 else f"{v:.0f}"


class Watcher:
    """The frames of `stats --watch`: each one a fresh read of the counters,
    with rates against the previous read."""

    def __init__(self, root, port=None, interval=1.0):
        self.root, self.port, self.interval = root, port, interval
        self.reader = Reader(root)
        self.prev = {}           # port name -> (monotonic time, counters)

    def frame(self):
        maps = self.reader.maps()
        if maps is None:
            raise XdeError(f"nothing is loaded under {self.root}")
        now = time.monotonic()
        ports = [(i, pc) for i, pc in Reader.ports(maps)
                 if self.port is None or pc.name.decode() == self.port]
        if self.port is not None and not ports:
            raise XdeError(f"no port {self.port} on {self.root}")
        lines = [f"xde {self.root}  every {self.interval:g}s  {time.strftime('%H:%M:%S')}"
                 "  (Ctrl-C to quit)", ""]
        for index, pc in ports:
            name = pc.name.decode()
            c = counters.port_counts(maps, index)
            values = c.flat() if c else {}
            prev = self.prev.get(name)
            lines.append(f"{name}:")
            lines.append(f"  {'COUNTER':26} {'TOTAL':>14} {'PER SECOND':>12}")
            for k, v in values.items():
                rate = None
                if prev is not None and now > prev[0]:
                    rate = max(0, v - prev[1].get(k, 0)) / (now - prev[0])
                if k in WATCH_ALWAYS or v or rate:
                    shown = "-" if rate is None else _rate(rate)
                    lines.append(f"  {k:26} {v:>14} {shown:>12}")
            self.prev[name] = (now, values)
            lines.append("")
        if not ports:
            lines.append("(no ports)")
        return "\n".join(lines)

    def close(self):
        self.reader.close()


def watch(root, port=None, interval=1.0):
    """Redraw the port counters and their per-second rates every interval
    seconds, in place, until Ctrl-C. (Not a terminal: frames one after the
    other.)"""
    if interval <= 0:
        raise XdeError(f"interval must be positive, got {interval}")
    tty = sys.stdout.isatty()
    w = Watcher(root, port, interval)
    try:
        if tty:
            sys.stdout.write("\x1b[2J")
        while True:
            text = w.frame()
            if tty:
                # home, draw (clearing each line's rest), clear below
                sys.stdout.write("\x1b[H" + text.replace("\n", "\x1b[K\n") + "\x1b[K\x1b[J")
            else:
                sys.stdout.write(text + "\n\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
    finally:
        w.close()


