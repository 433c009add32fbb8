"""Overlay commands: V2P mappings and the ports' router tables."""
from typing import Optional

import typer

from .common import JSON, app, columns, out, print_table, root


@app.command("set-v2p")
def set_v2p(ctx: typer.Context, vpc_ip: str, vpc_mac: str, underlay_ip: str, vni: str):
    """Map (VNI, VPC_IP) to VPC_MAC on the host at UNDERLAY_IP (VPC_IP: IPv4 or IPv6)."""
    from ..overlay import set_v2p as do
    do(root(ctx), vpc_ip, vpc_mac, underlay_ip, vni)


@app.command("clear-v2p")
def clear_v2p(ctx: typer.Context, vpc_ip: str, vpc_mac: str, underlay_ip: str, vni: str):
    """Remove a V2P mapping (all four fields must match)."""
    from ..overlay import clear_v2p as do
    do(root(ctx), vpc_ip, vpc_mac, underlay_ip, vni)


@app.command("dump-v2p")
def dump_v2p(ctx: typer.Context, as_json: bool = JSON):
    """List the V2P mappings (by VNI, IPv4 before IPv6)."""
    from ..overlay import dump_v2p as do
    out(do(root(ctx)), as_json, lambda rows: print_table(
        ["VNI", "VPC IP", "VPC MAC", "UNDERLAY"],
        [[r["vni"], r["ip"], r["mac"], r["underlay"]] for r in rows]))


@app.command("load-v2p")
def load_v2p(ctx: typer.Context,
             file: str = typer.Argument("-", help="File of 'VPC_IP VPC_MAC UNDERLAY_IP VNI' lines; - for stdin.")):
    """Set many V2P mappings at once (batched; all lines checked first)."""
    from ..overlay import load_v2p as do, read_lines
    print(f"{do(root(ctx), read_lines(file))} mappings set")


@app.command("add-router-entry")
def add_router_entry(ctx: typer.Context, port: str, dest: str, target: str):
    """Route DEST (IPv4 or IPv6 CIDR) on PORT to TARGET: drop, ig, ip4=ADDR,
    sub4=CIDR (IPv4 DEST), ip6=ADDR, sub6=CIDR (IPv6 DEST)."""
    from ..overlay import add_router_entry as do
    do(root(ctx), port, dest, target)


@app.command("del-router-entry")
def del_router_entry(ctx: typer.Context, port: str, dest: str,
                     target: Optional[str] = typer.Argument(None)):
    """Remove a custom route of PORT."""
    from ..overlay import del_router_entry as do
    do(root(ctx), port, dest, target)


@app.command("dump-router")
def dump_router(ctx: typer.Context, port: str, as_json: bool = JSON):
    """List PORT's routes: IPv4, then IPv6, each longest prefix first."""
    from ..overlay import dump_router as do
    out(do(root(ctx), port), as_json, columns(["dest", "target", "kind"]))
