"""xdectl: the command line (DESIGN.md section 3). Commands parse their
arguments and call the module that owns the concern; nothing else here."""
import json
import sys
from typing import List, Optional

import typer

from .datapath import DEFAULT_ROOT
from .errors import XdeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Control plane of xde, the eBPF overlay datapath.")
lab_app = typer.Typer(no_args_is_help=True, help="The namespace lab (DESIGN.md section 7).")
app.add_typer(lab_app, name="lab")

ROOT = typer.Option(DEFAULT_ROOT, "--root", envvar="XDE_ROOT",
                    help="bpffs directory of the datapath instance.")
JSON = typer.Option(False, "--json", help="Print JSON.")


class State:
    root = DEFAULT_ROOT


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
    """Create a port, in the seed's positional form."""
    _create(name, [underlay1, underlay2], mac, ip, gateway_mac, gateway_ip,
            boundary_services, boundary_vni, vpc_vni, src_underlay_addr, None, passthrough)


@app.command()
def delete(name: str):
    """Delete a port."""
    from .ports import delete as do_delete
    do_delete(State.root, name)


@app.command("xde-delete")
def xde_delete(name: str):
    """Delete a port (the seed's name for delete)."""
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
def stats(port: Optional[str] = typer.Argument(None), as_json: bool = JSON):
    """Per-port counters (summed over CPUs)."""
    from .ports import port_stats

    def table(data):
        for name, counters in data.items():
            print(f"{name}:")
            for k, v in counters.items():
                if v:
                    print(f"  {k:24} {v}")
    _out(port_stats(State.root, port), as_json, table)


@app.command()
def unload(force: bool = typer.Option(False, help="Delete the ports first.")):
    """Remove the datapath instance: programs, XDP, maps, pins."""
    from .ports import unload as do_unload
    if not do_unload(State.root, force):
        print(f"nothing loaded under {State.root}", file=sys.stderr)


def run():
    """Entry point: user errors become one line on stderr and exit 2."""
    try:
        rc = app(standalone_mode=False)
    except XdeError as e:
        print(f"xdectl: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # netlink and bpf syscalls
        print(f"xdectl: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
