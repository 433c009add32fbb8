"""`xdectl apply`: a root's desired state from a TOML file."""
import json

import typer

from .common import JSON, app, root


@app.command("apply")
def apply_cmd(ctx: typer.Context,
              file: str = typer.Argument(..., help="TOML file: ports, V2P, routes, firewall."),
              dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; change nothing."),
              as_json: bool = JSON):
    """Make the root's ports, V2P mappings, routes and firewall rules match
    FILE (idempotent: a second run changes nothing). Ports not in FILE are
    deleted; changed ports are replaced. The format is documented in
    deploy/xde.example.toml."""
    from ..apply import apply
    if as_json:
        actions = apply(root(ctx), file, dry_run, out=lambda line: None)
        print(json.dumps({"dry_run": dry_run, "actions": [a.as_dict() for a in actions]},
                         indent=2))
        return
    actions = apply(root(ctx), file, dry_run)
    if not actions:
        print("no changes")
    elif dry_run:
        print(f"{len(actions)} changes planned (dry run: nothing changed)")
    else:
        print(f"{len(actions)} changes applied")
