"""Port and instance commands: create (and the seed's xde-create), delete,
set-gateway, set-external-ips, list, stats, reload, unload."""
import sys
from typing import List, Optional

import typer

from ..errors import XdeError
from .common import JSON, app, out, print_table, root


def _create(ctx, name, underlays, mac, ip, gateway_mac, gateway_ip, boundary_services,
            boundary_vni, vni, underlay_addr, vpc_subnet, passthrough, **family6):
    from ..ports import PortSpec, create
    if len(underlays) != 2:
        raise XdeError(f"a port needs exactly two underlay devices, got {len(underlays)}")
    create(root(ctx), PortSpec(name, underlays[0], underlays[1], mac, ip, gateway_mac,
                               gateway_ip, boundary_services, boundary_vni, vni,
                               underlay_addr, vpc_subnet, passthrough, **family6))


# a port's external addresses (xdectl/nat.py), on create and set-external-ips
SNAT_IP = typer.Option([], "--snat-ip", help="SNAT address (one per family; the range is shared).")
SNAT_START = typer.Option(None, "--snat-start", help="First port of the SNAT range.")
SNAT_END = typer.Option(None, "--snat-end", help="Last port of the SNAT range.")
EPHEMERAL_IP = typer.Option([], "--ephemeral-ip", help="Ephemeral IP (one per family).")
FLOATING_IP = typer.Option([], "--floating-ip", help="Floating IP; repeat for more.")


def _external(snat_ip, snat_start, snat_end, ephemeral_ip, floating_ip):
    from ..nat import ExternalIPs
    return ExternalIPs(tuple(snat_ip), snat_start, snat_end, tuple(ephemeral_ip),
                       tuple(floating_ip))


@app.command()
def create(ctx: typer.Context, name: str,
           underlay: List[str] = typer.Option(..., help="Underlay device; give it twice."),
           mac: str = typer.Option(..., help="Guest (overlay) MAC."),
           ip: Optional[str] = typer.Option(None, help="Guest IPv4 address (this, --ip6 or both)."),
           gateway_mac: str = typer.Option(..., help="Virtual gateway MAC."),
           gateway_ip: str = typer.Option(..., help="Virtual gateway IPv4 address."),
           boundary_services: str = typer.Option(..., help="Boundary services underlay IPv6."),
           boundary_vni: str = typer.Option(..., help="Boundary services VNI."),
           vni: str = typer.Option(..., help="VPC VNI."),
           underlay_addr: str = typer.Option(..., help="This host's underlay IPv6 address."),
           vpc_subnet: Optional[str] = typer.Option(None, help="VPC IPv4 subnet (default: the /24 of --ip)."),
           ip6: Optional[str] = typer.Option(None, help="Guest IPv6 address (global or unique-local)."),
           vpc_subnet6: Optional[str] = typer.Option(None, help="VPC IPv6 subnet (default: the /64 of --ip6)."),
           dns: List[str] = typer.Option([], help="DNS server the gateway offers by DHCP; repeat "
                                         "for more (at most 3 per family)."),
           hostname: Optional[str] = typer.Option(None, help="Host name offered by DHCPv4."),
           domain: Optional[str] = typer.Option(None, help="Domain offered by DHCPv4 and DHCPv6."),
           snat_ip: List[str] = SNAT_IP, snat_start: Optional[str] = SNAT_START,
           snat_end: Optional[str] = SNAT_END, ephemeral_ip: List[str] = EPHEMERAL_IP,
           floating_ip: List[str] = FLOATING_IP,
           passthrough: bool = typer.Option(False, help="Bypass the pipeline: frames pass unchanged.")):
    """Create a port."""
    _create(ctx, name, underlay, mac, ip, gateway_mac, gateway_ip, boundary_services,
            boundary_vni, vni, underlay_addr, vpc_subnet, passthrough, ip6=ip6,
            vpc_subnet6=vpc_subnet6, dns=dns, hostname=hostname, domain=domain,
            external=_external(snat_ip, snat_start, snat_end, ephemeral_ip, floating_ip))


@app.command("xde-create")
def xde_create(ctx: typer.Context, name: str, underlay1: str, underlay2: str, mac: str, ip: str,
               gateway_mac: str, gateway_ip: str, boundary_services: str,
               boundary_vni: str, vpc_vni: str, src_underlay_addr: str,
               passthrough: bool = typer.Option(False, help="Bypass the pipeline.")):
    """Create a port, in the seed's positional form (docs/glossary.md, "The seed")."""
    _create(ctx, name, [underlay1, underlay2], mac, ip, gateway_mac, gateway_ip,
            boundary_services, boundary_vni, vpc_vni, src_underlay_addr, None, passthrough)


@app.command()
def delete(ctx: typer.Context, name: str):
    """Delete a port."""
    from ..ports import delete as do
    do(root(ctx), name)


@app.command("xde-delete")
def xde_delete(ctx: typer.Context, name: str):
    """Delete a port (the seed's name for delete; docs/glossary.md, "The seed")."""
    delete(ctx, name)


@app.command("set-gateway")
def set_gateway(ctx: typer.Context, port: str,
                dns: List[str] = typer.Option([], help="DNS server the gateway offers by DHCP; "
                                              "repeat for more (at most 3 per family)."),
                hostname: Optional[str] = typer.Option(None, help="Host name offered by DHCPv4."),
                domain: Optional[str] = typer.Option(None, help="Domain offered by DHCPv4 and "
                                                     "DHCPv6.")):
    """Replace what the gateway of a live port tells its guest (DNS servers,
    host name, domain); no option clears them all. The guest learns it at
    its next DHCP exchange."""
    from ..ports import set_gateway as do
    do(root(ctx), port, dns, hostname, domain)


@app.command("set-external-ips")
def set_external_ips(ctx: typer.Context, port: str,
                     snat_ip: List[str] = SNAT_IP, snat_start: Optional[str] = SNAT_START,
                     snat_end: Optional[str] = SNAT_END, ephemeral_ip: List[str] = EPHEMERAL_IP,
                     floating_ip: List[str] = FLOATING_IP):
    """Replace the external addresses of a live port (no option removes
    them all). Flows whose translation no longer fits are dropped."""
    from ..nat import set_external_ips as do
    n = do(root(ctx), port, _external(snat_ip, snat_start, snat_end, ephemeral_ip, floating_ip))
    print(f"{port}: external IPs set; {n} translated flow{'s' if n != 1 else ''} dropped")


def _ports_table(ports):
    cols = ["name", "mode", "mac", "ip", "ip6", "vni", "underlays", "state"]
    rows = [[",".join(str(u) for u in p[c]) if c == "underlays" else
             "-" if p[c] is None else p[c] for c in cols] for p in ports]
    print_table([c.upper() for c in cols], rows)
    for p in ports:
        if p.get("gateway_error"):
            print(f"note: port {p['name']}: {p['gateway_error']}", file=sys.stderr)


@app.command("list")
def list_cmd(ctx: typer.Context, as_json: bool = JSON):
    """List the ports of this root, read from the kernel's maps."""
    from ..ports import list_ports
    out(list_ports(root(ctx)), as_json, _ports_table)


@app.command()
def stats(ctx: typer.Context, port: Optional[str] = typer.Argument(None), as_json: bool = JSON,
          instance: bool = typer.Option(False, "--global",
                                        help="The root's counters: frames dropped before a "
                                             "port was known, and those passed to the host."),
          watch: bool = typer.Option(False, "--watch", help="Redraw every second with rates, until Ctrl-C."),
          interval: float = typer.Option(1.0, help="Seconds between --watch frames.")):
    """Per-port counters (summed over CPUs), or with --global the root's.
    Drops read drop_<direction>_<reason>."""
    from ..ports import global_stats, port_stats
    if watch:
        from ..metrics import watch as do_watch
        do_watch(root(ctx), port, interval)
        return
    if instance:
        out(global_stats(root(ctx)), as_json,
            lambda d: [print(f"{k:40} {v}") for k, v in d.items() if v])
        return

    def table(data):
        for name, counters in data.items():
            print(f"{name}:")
            for k, v in counters.items():
                if v:
                    print(f"  {k:36} {v}")
    out(port_stats(root(ctx), port), as_json, table)


@app.command()
def reload(ctx: typer.Context):
    """Replace the programs of this root with freshly compiled ones, under
    live traffic: maps kept, each attachment swapped atomically."""
    from ..reload import reload as do
    print(f"{do(root(ctx))} attachments swapped")


@app.command()
def unload(ctx: typer.Context, force: bool = typer.Option(False, help="Delete the ports first.")):
    """Remove the datapath instance: programs, XDP, maps, pins."""
    from ..ports import unload as do
    if not do(root(ctx), force):
        print(f"nothing loaded under {root(ctx)}", file=sys.stderr)
