"""The underlay pair of an instance: XDP and the broadcast hook on both
NICs (attached with the first port, detached with the last), and the
liveness routes passthrough failover reads (ARCHITECTURE.md)."""
import os

from .datapath import tc_name
from .errors import XdeError
from .netdev import sysctl

LIVENESS_TABLE = 0x7864        # "xd": table of the underlay liveness routes
LIVENESS_PREFIX = "fd78:6465:7864::"


def liveness_dst(ifindex):
    return f"{LIVENESS_PREFIX}{ifindex >> 16:x}:{ifindex & 0xFFFF:x}"


def attach(dp, nd, u1, u2, undo):
    xdp_fd, tc_fd = dp.prog_fd("xdp_underlay"), dp.prog_fd("tc_underlay_in")
    try:
        _attach(dp, nd, u1, u2, undo, xdp_fd, tc_fd)
    finally:
        os.close(xdp_fd)  # XDP and the filters hold the programs now
        os.close(tc_fd)


def _attach(dp, nd, u1, u2, undo, xdp_fd, tc_fd):
    ours = dp.prog_ids()  # a killed create may have left ours attached
    for u in (u1, u2):
        other = nd.xdp_prog_id(u)
        if other and other not in ours:
            raise XdeError(f"underlay {nd.name(u)} already has an XDP program (id {other}) "
                           f"that is not this root's")
    for u in (u1, u2):
        nd.attach_xdp(u, xdp_fd, replace=True)
        undo.add(nd.detach_xdp, u)
        nd.attach_tc_ingress(u, tc_fd, tc_name("tc_underlay_in", dp.root))
        undo.add(nd.detach_tc_ingress, u)
        undo.add(nd.del_route6, liveness_dst(u), LIVENESS_TABLE)
        # A link that loses carrier keeps its routes, marked linkdown; make
        # lookups skip them, so both ECMP and passthrough fail over.
        sysctl(f"net/ipv6/conf/{nd.name(u)}/ignore_routes_with_linkdown", 1)
        undo.add(sysctl, f"net/ipv6/conf/{nd.name(u)}/ignore_routes_with_linkdown", 0)
    ensure_liveness(nd, u1, u2)


def ensure_liveness(nd, u1, u2):
    """(Re)install the sentinel routes of the links that are up: the kernel
    deleted those of a link that went down, and does not restore them."""
    for u in (u1, u2):
        if nd.name(u) is not None and nd.is_up(u):
            nd.replace_route6(liveness_dst(u), u, LIVENESS_TABLE)


def detach_pair(nd, u1, u2):
    for u in (u1, u2):
        if nd.name(u) is not None:
            detach(nd, u)


def detach(nd, u):
    sysctl(f"net/ipv6/conf/{nd.name(u)}/ignore_routes_with_linkdown", 0)
    nd.detach_xdp(u)
    nd.detach_tc_ingress(u)
    nd.del_route6(liveness_dst(u), LIVENESS_TABLE)
