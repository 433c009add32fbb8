"""`xdectl lab`: the namespace lab (xdelab, outside the product package):
the two-sled lab, or with --sleds a fleet of sleds kept by agents from etcd."""
import typer

from ..errors import XdeError
from .common import app

lab_app = typer.Typer(no_args_is_help=True, help='The namespace lab (docs/design.md, "The lab").')
app.add_typer(lab_app, name="lab")


@lab_app.callback()
def lab_main(ctx: typer.Context,
             prefix: str = typer.Option("xl-", help="Prefix of the lab's namespaces and roots "
                                                    "(several labs can coexist).")):
    ctx.obj = prefix


def _lab(ctx):
    """The lab that is up under the prefix: a fleet lab, or the two-sled one."""
    from xdelab.fleet import FleetLab
    from xdelab.lab import Lab
    return FleetLab(ctx.obj) if FleetLab.is_fleet(ctx.obj) else Lab(ctx.obj)


def _is_fleet(lab):
    from xdelab.fleet import FleetLab
    return isinstance(lab, FleetLab)


@lab_app.command("up")
def lab_up(ctx: typer.Context,
           sleds: int = typer.Option(None, "--sleds", help="A fleet lab of N sleds, each kept "
                                                           "by an agent from a local etcd."),
           ports: int = typer.Option(100, "--ports", help="With --sleds: the fleet's ports."),
           members: int = typer.Option(1, "--etcd-members", min=1, max=5,
                                       help="With --sleds: etcd cluster members.")):
    """Build the lab: switches, sleds, guests, boundary services; or, with
    --sleds, a fleet lab (docs/fleet.md)."""
    if sleds is None:
        lab = _lab(ctx)
        if _is_fleet(lab):
            raise XdeError(f"a fleet lab is up under prefix {ctx.obj}: 'xdectl lab down' first")
        lab.up()
        return
    from xdelab.fleet import FleetLab
    FleetLab(ctx.obj).up(sleds, ports, members)


@lab_app.command("ping")
def lab_ping(ctx: typer.Context,
             samples: int = typer.Option(8, "--samples", help="Fleet lab: pairs to ping.")):
    """Check reachability: the two-sled lab's guests, gateway and internet,
    or sampled pairs of a fleet lab's ports across sleds."""
    lab = _lab(ctx)
    if _is_fleet(lab):
        lab.check(samples)
    else:
        lab.check()


@lab_app.command("down")
def lab_down(ctx: typer.Context):
    """Remove everything the lab made."""
    _lab(ctx).down()


@lab_app.command("status")
def lab_status(ctx: typer.Context):
    """Show whether the lab is up, and its ports (or its sleds)."""
    lab = _lab(ctx)
    if _is_fleet(lab):
        lab.print_status()
    else:
        lab.status()
