"""`xdectl lab`: the namespace lab (xdelab, outside the product package)."""
import typer

from .common import app

lab_app = typer.Typer(no_args_is_help=True, help='The namespace lab (docs/design.md, "The lab").')
app.add_typer(lab_app, name="lab")


@lab_app.callback()
def lab_main(ctx: typer.Context,
             prefix: str = typer.Option("xl-", help="Prefix of the lab's namespaces and roots "
                                                    "(several labs can coexist).")):
    ctx.obj = prefix


def _lab(ctx):
    from xdelab.lab import Lab
    return Lab(ctx.obj)


@lab_app.command("up")
def lab_up(ctx: typer.Context):
    """Build the lab: switches, sleds, guests, boundary services."""
    _lab(ctx).up()


@lab_app.command("ping")
def lab_ping(ctx: typer.Context):
    """Check guest-guest, guest-gateway and guest-boundary reachability."""
    _lab(ctx).check()


@lab_app.command("down")
def lab_down(ctx: typer.Context):
    """Remove everything the lab made."""
    _lab(ctx).down()


@lab_app.command("status")
def lab_status(ctx: typer.Context):
    """Show whether the lab is up, and its ports."""
    _lab(ctx).status()
