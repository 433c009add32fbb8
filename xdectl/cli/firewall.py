"""Firewall and flow-table commands."""
import sys
from typing import Optional

import typer

from .common import JSON, app, columns, out, print_table, root


@app.command("add-fw-rule")
def add_fw_rule(ctx: typer.Context, port: str,
                direction: str = typer.Option(..., "--dir", help="in or out."),
                action: str = typer.Option(..., help="allow (stateful) or deny."),
                priority: str = typer.Option(..., help="0..65535, lower first."),
                hosts: str = typer.Option("any", help="any, ip=ADDR, subnet=CIDR (IPv4 or IPv6) or vni=N."),
                protocol: str = typer.Option("any", help="any, tcp, udp, icmp[:type[,code]], icmp6[:type[,code]], arp."),
                ports: str = typer.Option("any", help="any or a list: 22,80.")):
    """Add a firewall rule to PORT; prints its id."""
    from ..fw import add_rule, parse_rule
    print(add_rule(root(ctx), port, parse_rule(direction, action, priority, hosts, protocol, ports)))


@app.command("rm-fw-rule")
def rm_fw_rule(ctx: typer.Context, port: str, rule_id: int = typer.Argument(..., metavar="ID"),
               direction: str = typer.Option(..., "--dir", help="in or out.")):
    """Remove rule ID from PORT."""
    from ..fw import rm_rule
    rm_rule(root(ctx), port, direction, rule_id)


@app.command("set-fw-rules")
def set_fw_rules(ctx: typer.Context, port: str):
    """Replace all of PORT's rules with those on stdin, one a line
    (dir=in action=allow priority=10 hosts=any protocol=tcp ports=22)."""
    from ..fw import set_rules
    print(f"{set_rules(root(ctx), port, sys.stdin.readlines())} rules set")


@app.command("dump-fw")
def dump_fw(ctx: typer.Context, port: str, as_json: bool = JSON):
    """PORT's firewall rules in evaluation order, with ids and hit counts."""
    from ..fw import dump_rules
    out(dump_rules(root(ctx), port), as_json,
        columns(["id", "dir", "priority", "action", "hosts", "protocol", "ports", "hits"]))


@app.command("dump-flows")
def dump_flows(ctx: typer.Context, port: str, as_json: bool = JSON):
    """PORT's flow-table entries: state, age, packets, bytes, and for a
    flow to or from the internet its external side (NAT)."""
    from ..fw import dump_flows as do
    cols = ["dir", "proto", "src", "sport", "dst", "dport", "state", "age_s", "idle_s",
            "packets", "bytes", "rule"]

    def table(rows):
        print_table([c.upper() for c in cols] + ["NAT"],
                    [[r[c] for c in cols] + [f"{r['nat']['kind']} {r['nat']['external']}"
                                             if r["nat"] else "-"] for r in rows])
    out(do(root(ctx), port), as_json, table)


@app.command("clear-flows")
def clear_flows(ctx: typer.Context, port: str):
    """Forget PORT's flows: their next packets are judged by the rules."""
    from ..fw import clear_flows as do
    do(root(ctx), port)


@app.command("set-flow-timeouts")
def set_flow_timeouts(ctx: typer.Context,
                      idle: Optional[int] = typer.Option(None, help="Non-TCP idle expiry (s)."),
                      tcp_handshake: Optional[int] = typer.Option(None, help="TCP before the handshake completes (s)."),
                      tcp_established: Optional[int] = typer.Option(None, help="Established TCP idle expiry (s)."),
                      tcp_closed: Optional[int] = typer.Option(None, help="TCP after FIN both ways or RST (s)."),
                      as_json: bool = JSON):
    """Change the flow-table timeouts of this root (OPTE's defaults: 60, 5, 8000, 120)."""
    from ..fw import set_timeouts
    out(set_timeouts(root(ctx), idle=idle, tcp_handshake=tcp_handshake,
                     tcp_established=tcp_established, tcp_closed=tcp_closed),
        as_json, lambda d: [print(f"{k:16} {v}") for k, v in d.items()])
