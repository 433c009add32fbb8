"""Boundary services commands: up, down, set-nat, clear-nat, dump-nat, show,
stats (`xdectl boundary ...`, on the root of --root)."""
import sys
from typing import List

import typer

from .common import JSON, app, columns, out, root

boundary_app = typer.Typer(no_args_is_help=True,
                           help='Boundary services: where the VPCs meet the outside '
                                '(docs/design.md, "Boundary services").')
app.add_typer(boundary_app, name="boundary")


@boundary_app.command("up")
def up(ctx: typer.Context,
       underlay: List[str] = typer.Option(..., help="Underlay device; once or twice."),
       underlay_addr: str = typer.Option(..., help="The boundary's underlay IPv6 address."),
       external: str = typer.Option(..., help="The device toward the outside."),
       vni: str = typer.Option("99", help="The boundary VNI the sleds send to it in.")):
    """Start boundary services on this host.

    What the sleds send for the outside is decapsulated and handed to the
    kernel to route out of --external; what comes from outside for an
    address in the NAT table is encapsulated toward its guest's sled. Needs
    net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1."""
    from ..boundary import up as do
    do(root(ctx), underlay, underlay_addr, external, vni)


@boundary_app.command("down")
def down(ctx: typer.Context):
    """Detach boundary services and clear their NAT table and counters."""
    from ..boundary import down as do
    if not do(root(ctx)):
        print(f"boundary services are not up on {root(ctx)}", file=sys.stderr)


@boundary_app.command("set-nat")
def set_nat(ctx: typer.Context,
            external: str = typer.Argument(..., metavar="EXT_IP[:START-END]",
                                           help="An external address, whole (a floating or "
                                                "ephemeral IP), or a port range of it (SNAT); "
                                                "IPv6 in brackets with a range: [ADDR]:START-END."),
            sled: str = typer.Argument(..., metavar="SLED_UNDERLAY",
                                       help="The underlay address of the guest's sled."),
            vni: str = typer.Argument(..., help="The guest's VPC VNI."),
            mac: str = typer.Argument(..., metavar="GUEST_MAC", help="The guest's MAC.")):
    """Give an external address, or a port range of it, to a guest.

    What comes from outside for it is sent to the guest's sled. Ranges of
    one address must not overlap; the same EXT_IP[:START-END] again changes
    whose it is."""
    from ..boundary import set_nat as do
    do(root(ctx), external, sled, vni, mac)


@boundary_app.command("clear-nat")
def clear_nat(ctx: typer.Context,
              external: str = typer.Argument(..., metavar="EXT_IP[:START-END]")):
    """Remove the NAT entry of exactly this address or port range."""
    from ..boundary import clear_nat as do
    do(root(ctx), external)


@boundary_app.command("dump-nat")
def dump_nat(ctx: typer.Context, as_json: bool = JSON):
    """The NAT table, by address and port."""
    from ..boundary import dump_nat as do
    out(do(root(ctx)), as_json, columns(["external", "sled", "vni", "mac"]))


@boundary_app.command("show")
def show(ctx: typer.Context, as_json: bool = JSON):
    """Whether boundary services are up, and on which links."""
    from ..boundary import show as do

    def table(d):
        if not d["up"]:
            print("boundary services: down")
            return
        print(f"boundary services: up, VNI {d['vni']}, underlay address {d['underlay_addr']}")
        print(f"  underlays {', '.join(map(str, d['underlays']))}; external {d['external']}; "
              f"{d['nat_entries']} NAT entries")
    out(do(root(ctx)), as_json, table)


@boundary_app.command("stats")
def stats(ctx: typer.Context, as_json: bool = JSON):
    """The boundary's counters (summed over CPUs); drops read drop_<reason>."""
    from ..boundary import stats as do
    out(do(root(ctx)), as_json, lambda d: [print(f"{k:30} {v}") for k, v in d.items() if v])
