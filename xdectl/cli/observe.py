"""Observability commands beyond `stats`: the Prometheus exporter and trace."""
import json
import sys
from typing import Optional

import typer

from .common import JSON, app, root

DEFAULT_LISTEN = "127.0.0.1:9477"


@app.command("metrics")
def metrics_cmd(ctx: typer.Context,
                listen: str = typer.Option(DEFAULT_LISTEN, "--listen", metavar="ADDR:PORT",
                                           help="Address and port to serve /metrics on "
                                                "(port 0: any free port, printed on stderr)."),
                once: bool = typer.Option(False, "--once",
                                          help="Print the metrics once on stdout and exit.")):
    """Prometheus exporter: serve the counters of this root, read from the
    pinned maps at every scrape."""
    from ..metrics import exposition, serve
    if once:
        sys.stdout.write(exposition(root(ctx)))
        return
    serve(root(ctx), listen)


@app.command("trace")
def trace_cmd(ctx: typer.Context,
              port: str = typer.Argument(..., help="The port (its guest-facing name)."),
              frame: str = typer.Argument(..., help="Hex bytes, or a scapy expression such as "
                                          "\"Ether(src=...,dst=...)/IP(...)/ICMP()\"."),
              direction: str = typer.Option(..., "--dir", help="out: from the guest (tc_port_out); "
                                            "in: from the underlay (xdp_underlay)."),
              vni: Optional[int] = typer.Option(None, help="--dir in: the Geneve VNI (default: the port's)."),
              external: bool = typer.Option(False, "--external", help="--dir in: add Oxide's External option, "
                                            "as traffic from outside the VPC carries."),
              as_is: bool = typer.Option(False, "--as-is", help="--dir in: run FRAME as the "
                                         "underlay NIC receives it, never encapsulate it."),
              hexdump: bool = typer.Option(False, "--hexdump", help="Also print a hexdump of the output frame."),
              as_json: bool = JSON):
    """Run one frame through the loaded datapath (BPF_PROG_TEST_RUN) and
    print the verdict, the counters it moved and the output frame.

    --dir out runs PORT's outbound program on FRAME as the guest sent it.
    --dir in runs the underlay program; an inner frame (for the guest) is
    wrapped in Geneve/IPv6 to this root's underlay address in PORT's VNI,
    a full underlay frame (IPv6 to this host's underlay address, or UDP to
    port 6081) is run as given, and so is any FRAME with --as-is.

    The run is real: it moves the live counters, the firewall's rule hits
    and its flow table (an allowed flow is remembered as if it had been
    sent). Nothing is sent: a redirect is only reported.
    Run it in the network namespace where the port was created.
    """
    from ..trace import decode, parse_frame, print_result, trace
    result = trace(root(ctx), port, direction, parse_frame(frame), vni=vni, external=external,
                   as_is=as_is)
    if as_json:
        result["output_summary"] = decode(bytes.fromhex(result["output"])).summary()
        print(json.dumps(result, indent=2))
    else:
        print_result(result, hexdump)
