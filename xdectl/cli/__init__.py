"""xdectl: the command line (docs/design.md, "The command line"). One module
per area registers its commands on one typer app; commands parse their
arguments, call the library module that owns the concern with the root
from the typer context, and print. Nothing else happens here."""
import sys

from ..errors import Incomplete, XdeError
from .common import app
# Importing an area registers its commands; --help lists them in this order.
from . import ports, overlay, firewall, observe, apply, boundary, fleet, lab  # noqa: E402,I001

AREAS = (ports, overlay, firewall, observe, apply, boundary, fleet, lab)


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
