"""The underlay pair of an instance: what xdectl attaches to both NICs with
the first port and removes with the last, and what it sets on them so that
the datapath works on any underlay and rides out link flaps (ARCHITECTURE.md,
"The underlay").

- XDP (Geneve in) and the broadcast hook on TC ingress.
- Sysctls, back to the namespace's defaults when the last port goes:
  keep_addr_on_down, so a flap does not delete the link's addresses;
  ignore_routes_with_linkdown, so route lookups (ECMP, and passthrough's
  liveness below) skip a link without carrier; accept_dad=0, because while
  a link that just came up checks its link-local address for duplicates
  (about a second) the kernel sends no neighbour solicitation on it, and
  flows the FIB hashes back onto the link stall until then.
- A sentinel address fd78:6465:7864::IFINDEX/128 on each NIC: the kernel
  removes its prefix route when the link goes down and restores it when the
  link comes back, so the datapath learns a link's state from a route
  lookup with no one watching (passthrough's "U1, or U2 while U1 is down").
- On a veth, transmit checksum offload off. A veth hands a frame whose
  checksums are still to be filled in (the guest's TCP and UDP are,
  encapsulated or not) to its peer as it is, and XDP on a receiving veth,
  or a userspace program reading it, loses that mark: the segments arrive
  with bad checksums and TCP moves nothing. A real NIC fills them in on
  transmit; on a veth the kernel now does, before the frame leaves. Real
  NICs are left as they are; the veth's own setting comes back at detach.

A boundary host's underlays (xdectl/boundary.py) get the same sysctls and
offload setting through tune() and untune(), and programs of their own.
"""
import ipaddress
import os

from .abi import SENTINEL_PREFIX
from .datapath import tc_name
from .errors import XdeError
from .netdev import get_feature, set_features, sysctl, read_sysctl

TX_CSUM = "tx-checksum-ip-generic"
SYSCTLS = {"keep_addr_on_down": 1, "ignore_routes_with_linkdown": 1, "accept_dad": 0}


def sentinel(ifindex):
    return str(ipaddress.IPv6Address(SENTINEL_PREFIX) + ifindex)


def attach(dp, nd, u1, u2, undo):
    """Attach to both underlays; returns the bits of those on which checksum
    offload was turned off (xde_cfg.sw_csum)."""
    xdp_fd, tc_fd = dp.prog_fd("xdp_underlay"), dp.prog_fd("tc_underlay_in")
    try:
        _check_free(dp, nd, u1, u2)
        bits = 0
        for i, u in enumerate((u1, u2)):
            undo.add(detach, nd, u)   # undoes whatever of the next steps was done
            nd.attach_xdp(u, xdp_fd, replace=True)
            nd.attach_tc_ingress(u, tc_fd, tc_name("tc_underlay_in", dp.root))
            for key, value in SYSCTLS.items():
                sysctl(f"net/ipv6/conf/{nd.name(u)}/{key}", value)
            nd.add_addr6(u, sentinel(u), 128)
            bits |= _software_checksums(nd, u, undo) << i
        return bits
    finally:
        os.close(xdp_fd)  # XDP and the filters hold the programs now
        os.close(tc_fd)


def tune(nd, u, undo):
    """What an underlay NIC of boundary services gets, programs aside: the
    same sysctls and checksum offload as a sled's pair (the boundary
    encapsulates TCP from outside as a sled does its guests'). Returns 1 if
    offload was turned off on it, else 0."""
    undo.add(untune, nd, u, 0)
    for key, value in SYSCTLS.items():
        sysctl(f"net/ipv6/conf/{nd.name(u)}/{key}", value)
    return _software_checksums(nd, u, undo)


def untune(nd, u, sw_csum):
    """Undo tune(): the namespace's default sysctls, and checksum offload on
    again if tune turned it off (sw_csum 1)."""
    name = nd.name(u)
    for key in SYSCTLS:
        sysctl(f"net/ipv6/conf/{name}/{key}", read_sysctl(f"net/ipv6/conf/default/{key}"))
    if sw_csum:
        set_features(name, {TX_CSUM: True})


def _check_free(dp, nd, u1, u2):
    ours = dp.prog_ids()  # a killed create may have left ours attached
    for u in (u1, u2):
        other = nd.xdp_prog_id(u)
        if other and other not in ours:
            raise XdeError(f"underlay {nd.name(u)} already has an XDP program (id {other}) "
                           f"that is not this root's")


def _software_checksums(nd, u, undo):
    """1 if checksum offload was turned off on this veth, else 0."""
    name = nd.name(u)
    if nd.kind(u) != "veth" or not get_feature(name, TX_CSUM):
        return 0
    set_features(name, {TX_CSUM: False})
    undo.add(set_features, name, {TX_CSUM: True})
    return 1


def detach_pair(nd, u1, u2, sw_csum=0):
    for i, u in enumerate((u1, u2)):
        if nd.name(u) is not None:
            detach(nd, u)
            if sw_csum & (1 << i):
                set_features(nd.name(u), {TX_CSUM: True})


def detach(nd, u):
    """Everything attach does to one underlay but its checksum offload
    (detach_pair restores that: only it knows whether it was on)."""
    name = nd.name(u)
    for key in SYSCTLS:
        sysctl(f"net/ipv6/conf/{name}/{key}", read_sysctl(f"net/ipv6/conf/default/{key}"))
    nd.detach_xdp(u)
    nd.detach_tc_ingress(u)
    nd.del_addr6(u, sentinel(u), 128)
