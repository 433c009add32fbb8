"""`xdectl agent` and `xdectl fleet`: the fleet's desired state in etcd."""
import json

import typer

from .common import JSON, app, columns, out, root

ETCD = typer.Option("http://127.0.0.1:2379", "--etcd", envvar="XDE_ETCD",
                    help="etcd client URL(s), comma-separated.")
ETCD_CA = typer.Option(None, "--etcd-ca", envvar="XDE_ETCD_CA",
                       help="https: the CA of etcd's certificates (default: the system's).")
ETCD_CERT = typer.Option(None, "--etcd-cert", envvar="XDE_ETCD_CERT",
                         help="https: this client's certificate (with --etcd-key).")
ETCD_KEY = typer.Option(None, "--etcd-key", envvar="XDE_ETCD_KEY",
                        help="https: this client's private key.")


def client(urls, ca, cert, key, **kw):
    """An Etcd for the command's options, checked first."""
    from ..etcd import Etcd, check_tls
    return Etcd(urls, tls=check_tls(urls, ca, cert, key), **kw)

fleet_app = typer.Typer(no_args_is_help=True,
                        help="The fleet's desired state in etcd (docs/fleet.md).")
app.add_typer(fleet_app, name="fleet")


@app.command("agent")
def agent_cmd(ctx: typer.Context, etcd: str = ETCD, etcd_ca: str = ETCD_CA,
              etcd_cert: str = ETCD_CERT, etcd_key: str = ETCD_KEY,
              sled: str = typer.Option(..., "--sled", help="This sled's name in the fleet."),
              underlay: list[str] = typer.Option([], "--underlay",
                                                 help="An underlay device (give two)."),
              underlay_addr: str = typer.Option(None, "--underlay-addr",
                                                help="This sled's underlay IPv6 address."),
              boundary: bool = typer.Option(False, "--boundary",
                                            help="Keep a boundary-services root's NAT table."),
              ttl: int = typer.Option(5, "--ttl", min=2, max=300,
                                      help="Seconds the sled's report outlives a dead agent."),
              report: str = typer.Option(None, "--report",
                                         help="Also write the agent's report to this file.")):
    """Run the sled's agent (foreground): keep the root matching the fleet."""
    from ..agent import run
    from ..etcd import check_tls
    run(etcd, sled, root(ctx), underlay, underlay_addr, boundary, ttl, report,
        tls=check_tls(etcd, etcd_ca, etcd_cert, etcd_key))


@fleet_app.command("apply")
def fleet_apply(file: str = typer.Argument(..., help="The fleet file (TOML)."),
                etcd: str = ETCD, etcd_ca: str = ETCD_CA, etcd_cert: str = ETCD_CERT,
                etcd_key: str = ETCD_KEY, as_json: bool = JSON):
    """Check FILE whole and write it as the fleet's desired state, in one
    transaction. Prints the etcd revision written."""
    from .. import fleet
    e = client(etcd, etcd_ca, etcd_cert, etcd_key,
               # etcd answers a large apply in seconds (bench/fleet_apply.py: 100,000
               # ports, 3 s), or says itself that it timed out (after about 7 s)
               txn_timeout=30)
    desired = fleet.load(file)
    revision, puts, deletes = fleet.apply_file(e, desired)
    if as_json:
        print(json.dumps({"revision": revision, "put": puts, "deleted": deletes}))
    else:
        print(f"revision {revision}: {len(desired.ports)} ports, {len(desired.vpcs)} VPCs "
              f"({puts} keys written, {deletes} deleted)")


@fleet_app.command("status")
def fleet_status(etcd: str = ETCD, etcd_ca: str = ETCD_CA, etcd_cert: str = ETCD_CERT,
                 etcd_key: str = ETCD_KEY, as_json: bool = JSON):
    """Per sled: alive, the revision its datapath matches, ports, last error."""
    from .. import fleet
    s = fleet.status(client(etcd, etcd_ca, etcd_cert, etcd_key))

    def table(s):
        print(f"fleet revision {s['revision']}")
        rows = [dict(r, alive="yes" if r["alive"] else "no",
                     match="yes" if r["revision"] is not None and r["revision"] >= s["revision"]
                     else "no", revision=r["revision"] if r["revision"] is not None else "-",
                     ports=f"{r['ports'] if r['ports'] is not None else '-'}/{r['desired_ports']}",
                     error=r["error"] or "-") for r in s["sleds"]]
        columns(["name", "alive", "revision", "match", "ports", "error"])(rows)
    out(s, as_json, table)


@fleet_app.command("dump")
def fleet_dump(etcd: str = ETCD, etcd_ca: str = ETCD_CA, etcd_cert: str = ETCD_CERT,
               etcd_key: str = ETCD_KEY):
    """Print the desired state as a fleet file."""
    from .. import fleet
    print(fleet.dump(client(etcd, etcd_ca, etcd_cert, etcd_key)), end="")
