"""The typer app, its global --root option, and the output helpers every
area's commands share."""
import json

import typer

from ..datapath import DEFAULT_ROOT

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Control plane of xde, the eBPF overlay datapath.")

JSON = typer.Option(False, "--json", help="Print JSON.")


@app.callback()
def main(ctx: typer.Context,
         root: str = typer.Option(DEFAULT_ROOT, "--root", envvar="XDE_ROOT",
                                  help="bpffs directory of the datapath instance.")):
    ctx.obj = root


def root(ctx: typer.Context):
    """The --root of this call (the top-level callback keeps it)."""
    return ctx.find_root().obj


def out(data, as_json, table):
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        table(data)


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


def columns(cols):
    """A table printer for rows that are dicts with these keys."""
    return lambda rows: print_table([c.upper() for c in cols], [[r[c] for c in cols] for r in rows])
