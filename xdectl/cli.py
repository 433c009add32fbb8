"""xdectl: the command line (docs/design.md, "The command line"). Commands
parse their arguments and call the module that owns the concern; nothing else
here."""
import json
import sys
from typing import List, Optional

import typer

from .datapath import DEFAULT_ROOT
from .errors import Incomplete, XdeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Control plane of xde, the eBPF overlay datapath.")
lab_app = typer.Typer(no_args_is_help=True, help='The namespace lab (docs/design.md, "The lab").')
app.add_typer(lab_app, name="lab")

ROOT = typer.Option(DEFAULT_ROOT, "--root", envvar="XDE_ROOT",
                    help="bpffs directory of the datapath instance.")
JSON = typer.Option(False, "--json", help="Print JSON.")


class State:
    root = DEFAULT_ROOT
    lab_prefix = "xl-"


@app.callback()
def main(root: str = ROOT):
    State.root = root


def _out(data, as_json, table):
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        table(data)


def _create(name, underlays, mac, ip, gateway_mac, gateway_ip, boundary_services,
            boundary_vni, vni, underlay_addr, vpc_subnet, passthrough):
    from .ports import PortSpec, create
    if len(underlays) != 2:
        raise XdeError(f"a port needs exactly two underlay devices, got {len(underlays)}")
    create(State.root, PortSpec(name, underlays[0], underlays[1], mac, ip, gateway_mac,
                                gateway_ip, boundary_services, boundary_vni, vni,
                                underlay_addr, vpc_subnet, passthrough))


@app.command()
def create(name: str,
           underlay: List[str] = typer.Option(..., help="Underlay device; give it twice."),
           mac: str = typer.Option(..., help="Guest (overlay) MAC."),
           ip: str = typer.Option(..., help="Guest IPv4 address."),
           gateway_mac: str = typer.Option(..., help="Virtual gateway MAC."),
           gateway_ip: str = typer.Option(..., help="Virtual gateway IPv4 address."),
           boundary_services: str = typer.Option(..., help="Boundary services underlay IPv6."),
           boundary_vni: str = typer.Option(..., help="Boundary services VNI."),
           vni: str = typer.Option(..., help="VPC VNI."),
           underlay_addr: str = typer.Option(..., help="This host's underlay IPv6 address."),
           vpc_subnet: Optional[str] = typer.Option(None, help="VPC IPv4 subnet (default: the /24 of --ip)."),
           passthrough: bool = typer.Option(False, help="Bypass the pipeline: frames pass unchanged.")):
    """Create a port."""
    _create(name, underlay, mac, ip, gateway_mac, gateway_ip, boundary_services,
            boundary_vni, vni, underlay_addr, vpc_subnet, passthrough)


@app.command("xde-create")
def xde_create(name: str, underlay1: str, underlay2: str, mac: str, ip: str,
               gateway_mac: str, gateway_ip: str, boundary_services: str,
               boundary_vni: str, vpc_vni: str, src_underlay_addr: str,
               passthrough: bool = typer.Option(False, help="Bypass the pipeline.")):
    """Create a port, in the seed's positional form (docs/glossary.md, "The seed")."""
    _create(name, [underlay1, underlay2], mac, ip, gateway_mac, gateway_ip,
            boundary_services, boundary_vni, vpc_vni, src_underlay_addr, None, passthrough)


@app.command()
def delete(name: str):
    """Delete a port."""
    from .ports import delete as do_delete
    do_delete(State.root, name)


@app.command("xde-delete")
def xde_delete(name: str):
    """Delete a port (the seed's name for delete; docs/glossary.md, "The seed")."""
    delete(name)


def _ports_table(ports):
    cols = ["name", "mode", "mac", "ip", "vni", "underlays", "state"]
    rows = [[p[c] if c != "underlays" else ",".join(str(u) for u in p[c]) for c in cols]
            for p in ports]
    _print_table([c.upper() for c in cols], rows)


def _print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


@app.command("list")
def list_cmd(as_json: bool = JSON):
    """List the ports of this root, read from the kernel's maps."""
    from .ports import list_ports
    _out(list_ports(State.root), as_json, _ports_table)


@app.command()
def stats(port: Optional[str] = typer.Argument(None), as_json: bool = JSON,
          instance: bool = typer.Option(False, "--global",
                                        help="The instance's counters: host-bound and malformed frames."),
          watch: bool = typer.Option(False, "--watch", help="Redraw every second with rates, until Ctrl-C."),
          interval: float = typer.Option(1.0, help="Seconds between --watch frames.")):
    """Per-port counters (summed over CPUs), or with --global the instance's."""
    from .ports import global_stats, port_stats
    if watch:
        from .metrics import watch as do_watch
        do_watch(State.root, port, interval)
        return
    if instance:
        data = global_stats(State.root)
        _out(data, as_json, lambda d: [print(f"{k:28} {v}") for k, v in d.items() if v])
        return

    def table(data):
        for name, counters in data.items():
            print(f"{name}:")
            for k, v in counters.items():
                if v:
                    print(f"  {k:24} {v}")
    _out(port_stats(State.root, port), as_json, table)


@app.command("set-v2p")
def set_v2p(vpc_ip: str, vpc_mac: str, underlay_ip: str, vni: str):
    """Map (VNI, VPC_IP) to VPC_MAC on the host at UNDERLAY_IP."""
    from .overlay import set_v2p as do
    do(State.root, vpc_ip, vpc_mac, underlay_ip, vni)


@app.command("clear-v2p")
def clear_v2p(vpc_ip: str, vpc_mac: str, underlay_ip: str, vni: str):
    """Remove a V2P mapping (all four fields must match)."""
    from .overlay import clear_v2p as do
    do(State.root, vpc_ip, vpc_mac, underlay_ip, vni)


@app.command("dump-v2p")
def dump_v2p(as_json: bool = JSON):
    """List the V2P mappings."""
    from .overlay import dump_v2p as do
    _out(do(State.root), as_json, lambda rows: _print_table(
        ["VNI", "VPC IP", "VPC MAC", "UNDERLAY"],
        [[r["vni"], r["ip"], r["mac"], r["underlay"]] for r in rows]))


@app.command("load-v2p")
def load_v2p(file: str = typer.Argument("-", help="File of 'VPC_IP VPC_MAC UNDERLAY_IP VNI' lines; - for stdin.")):
    """Set many V2P mappings at once (batched; all lines checked first)."""
    from .overlay import load_v2p as do, read_lines
    n = do(State.root, read_lines(file))
    print(f"{n} mappings set")


@app.command("add-router-entry")
def add_router_entry(port: str, dest: str, target: str):
    """Route DEST (IPv4 CIDR) on PORT to TARGET: drop, ig, ip4=ADDR, sub4=CIDR."""
    from .overlay import add_router_entry as do
    do(State.root, port, dest, target)


@app.command("del-router-entry")
def del_router_entry(port: str, dest: str, target: Optional[str] = typer.Argument(None)):
    """Remove a custom route of PORT."""
    from .overlay import del_router_entry as do
    do(State.root, port, dest, target)


@app.command("dump-router")
def dump_router(port: str, as_json: bool = JSON):
    """List PORT's routes, longest prefix first."""
    from .overlay import dump_router as do
    _out(do(State.root, port), as_json, lambda rows: _print_table(
        ["DEST", "TARGET", "KIND"], [[r["dest"], r["target"], r["kind"]] for r in rows]))


@app.command("add-fw-rule")
def add_fw_rule(port: str,
                direction: str = typer.Option(..., "--dir", help="in or out."),
                action: str = typer.Option(..., help="allow (stateful) or deny."),
                priority: str = typer.Option(..., help="0..65535, lower first."),
                hosts: str = typer.Option("any", help="any, ip=ADDR, subnet=CIDR or vni=N."),
                protocol: str = typer.Option("any", help="any, tcp, udp, icmp[:type[,code]], arp."),
                ports: str = typer.Option("any", help="any or a list: 22,80.")):
    """Add a firewall rule to PORT; prints its id."""
    from .fw import add_rule, parse_rule
    print(add_rule(State.root, port, parse_rule(direction, action, priority, hosts, protocol, ports)))


@app.command("rm-fw-rule")
def rm_fw_rule(port: str, rule_id: int = typer.Argument(..., metavar="ID"),
               direction: str = typer.Option(..., "--dir", help="in or out.")):
    """Remove rule ID from PORT."""
    from .fw import rm_rule
    rm_rule(State.root, port, direction, rule_id)


@app.command("set-fw-rules")
def set_fw_rules(port: str):
    """Replace all of PORT's rules with those on stdin, one a line
    (dir=in action=allow priority=10 hosts=any protocol=tcp ports=22)."""
    from .fw import set_rules
    n = set_rules(State.root, port, sys.stdin.readlines())
    print(f"{n} rules set")


@app.command("dump-fw")
def dump_fw(port: str, as_json: bool = JSON):
    """PORT's firewall rules in evaluation order, with ids and hit counts."""
    from .fw import dump_rules
    cols = ["id", "dir", "priority", "action", "hosts", "protocol", "ports", "hits"]
    _out(dump_rules(State.root, port), as_json, lambda rows: _print_table(
        [c.upper() for c in cols], [[r[c] for c in cols] for r in rows]))


@app.command("dump-flows")
def dump_flows(port: str, as_json: bool = JSON):
    """PORT's flow-table entries: state, age, packets, bytes."""
    from .fw import dump_flows as do
    cols = ["dir", "proto", "src", "sport", "dst", "dport", "state", "age_s", "idle_s",
            "packets", "bytes", "rule"]
    _out(do(State.root, port), as_json, lambda rows: _print_table(
        [c.upper() for c in cols], [[r[c] for c in cols] for r in rows]))


@app.command("clear-flows")
def clear_flows(port: str):
    """Forget PORT's flows: their next packets are judged by the rules."""
    from .fw import clear_flows as do
    do(State.root, port)


@app.command("set-flow-timeouts")
def set_flow_timeouts(idle: Optional[int] = typer.Option(None, help="Non-TCP idle expiry (s)."),
                      tcp_handshake: Optional[int] = typer.Option(None, help="TCP before the handshake completes (s)."),
                      tcp_established: Optional[int] = typer.Option(None, help="Established TCP idle expiry (s)."),
                      tcp_closed: Optional[int] = typer.Option(None, help="TCP after FIN both ways or RST (s)."),
                      as_json: bool = JSON):
    """Change the flow-table timeouts of this root (OPTE's defaults: 60, 5, 8000, 120)."""
    from .fw import set_timeouts
    _out(set_timeouts(State.root, idle=idle, tcp_handshake=tcp_handshake,
                      tcp_established=tcp_established, tcp_closed=tcp_closed),
         as_json, lambda d: [print(f"{k:16} {v}") for k, v in d.items()])


@app.command()
def reload():
    """Replace the programs of this root with freshly compiled ones, under
    live traffic: maps kept, each attachment swapped atomically."""
    from .reload import reload as do
    print(f"{do(State.root)} attachments swapped")


@app.command()
def unload(force: bool = typer.Option(False, help="Delete the ports first.")):
    """Remove the datapath instance: programs, XDP, maps, pins."""
    from .ports import unload as do_unload
    if not do_unload(State.root, force):
        print(f"nothing loaded under {State.root}", file=sys.stderr)


@lab_app.callback()
def lab_main(prefix: str = typer.Option("xl-", help="Prefix of the lab's namespaces and roots "
                                                     "(several labs can coexist).")):
    State.lab_prefix = prefix


@lab_app.command("up")
def lab_up():
    """Build the lab: switches, sleds, guests, boundary services."""
    from xdelab.lab import Lab
    Lab(State.lab_prefix).up()


@lab_app.command("ping")
def lab_ping():
    """Check guest-guest, guest-gateway and guest-boundary reachability."""
    from xdelab.lab import Lab
    Lab(State.lab_prefix).check()


@lab_app.command("down")
def lab_down():
    """Remove everything the lab made."""
    from xdelab.lab import Lab
    Lab(State.lab_prefix).down()


@lab_app.command("status")
def lab_status():
    """Show whether the lab is up, and its ports."""
    from xdelab.lab import Lab
    Lab(State.lab_prefix).status()


@app.command("apply")
def apply_cmd(file: str = typer.Argument(..., help="TOML file: ports, V2P, routes, firewall."),
              dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; change nothing."),
              as_json: bool = JSON):
    """Make the root's ports, V2P mappings, routes and firewall rules match
    FILE (idempotent: a second run changes nothing). Ports not in FILE are
    deleted; changed ports are replaced. The format is documented in
    deploy/xde.example.toml."""
    from .apply import apply
    if as_json:
        actions = apply(State.root, file, dry_run, out=lambda line: None)
        print(json.dumps({"dry_run": dry_run, "actions": [a.as_dict() for a in actions]},
                         indent=2))
        return
    actions = apply(State.root, file, dry_run)
    if not actions:
        print("no changes")
    elif dry_run:
        print(f"{len(actions)} changes planned (dry run: nothing changed)")
    else:
        print(f"{len(actions)} changes applied")


DEFAULT_LISTEN = "127.0.0.1:9477"


@app.command("metrics")
def metrics_cmd(listen: str = typer.Option(DEFAULT_LISTEN, "--listen", metavar="ADDR:PORT",
                                           help="Address and port to serve /metrics on "
                                                "(port 0: any free port, printed on stderr)."),
                once: bool = typer.Option(False, "--once",
                                          help="Print the metrics once on stdout and exit.")):
    """Prometheus exporter: serve the counters of this root, read from the
    pinned maps at every scrape."""
    from .metrics import exposition, serve
    if once:
        sys.stdout.write(exposition(State.root))
        return
    serve(State.root, listen)


@app.command("trace")
def trace_cmd(port: str = typer.Argument(..., help="The port (its guest-facing name)."),
              frame: str = typer.Argument(..., help="Hex bytes, or a scapy expression such as "
                                          "\"Ether(src=...,dst=...)/IP(...)/ICMP()\"."),
              direction: str = typer.Option(..., "--dir", help="out: from the guest (tc_port_out); "
                                            "in: from the underlay (xdp_underlay)."),
              vni: Optional[int] = typer.Option(None, help="--dir in: the Geneve VNI (default: the port's)."),
              external: bool = typer.Option(False, "--external", help="--dir in: add Oxide's External option, "
                                            "as traffic from outside the VPC carries."),
              as_is: bool = typer.Option(False, "--as-is", help="--dir in: run FRAME as the "
                                         "underlay NIC receives it, never encapsulate it."),
              hexdump: bool = typer.Option(False, "--hexdump", help="Also print a hexdump of the output frame."),
              as_json: bool = JSON):
    """Run one frame through the loaded datapath (BPF_PROG_TEST_RUN) and
    print the verdict, the counters it moved and the output frame.

    --dir out runs PORT's outbound program on FRAME as the guest sent it.
    --dir in runs the underlay program; an inner frame (for the guest) is
    wrapped in Geneve/IPv6 to this root's underlay address in PORT's VNI,
    a full underlay frame (IPv6 to this host's underlay address, or UDP to
    port 6081) is run as given, and so is any FRAME with --as-is.

    The run is real: it moves the live counters, the firewall's rule hits
    and its flow table (an allowed flow is remembered as if it had been
    sent). Nothing is sent: a redirect is only reported.
    Run it in the network namespace where the port was created.
    """
    from .trace import decode, parse_frame, print_result, trace
    result = trace(State.root, port, direction, parse_frame(frame), vni=vni, external=external,
                   as_is=as_is)
    if as_json:
        result["output_summary"] = decode(bytes.fromhex(result["output"])).summary()
        print(json.dumps(result, indent=2))
    else:
        print_result(result, hexdump)


def run():
    """Entry point: user errors become one line on stderr and exit 2."""
    try:
        app()
    except Incomplete as e:
        for line in e.lines:
            print(f"xdectl: {line}", file=sys.stderr)
        sys.exit(1)
    except XdeError as e:
        print(f"xdectl: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a bpf syscall the kernel refused
        print(f"xdectl: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        # a netlink request the kernel refused (pyroute2 is imported only by
        # the commands that touch links, so look for it rather than load it)
        nl = sys.modules.get("pyroute2.netlink.exceptions")
        if nl and isinstance(e, nl.NetlinkError):
            print(f"xdectl: netlink: {e}", file=sys.stderr)
            sys.exit(1)
        raise
