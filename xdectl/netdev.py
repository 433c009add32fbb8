"""Netlink operations on links, tc, XDP, addresses, features and sysctls
(pyroute2).

Everything here acts on the network namespace xdectl runs in; the root's
datapath ends and underlays live there.
"""
import errno
import socket

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.exceptions import NetlinkError

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
TC_PRIO = 0xD0      # the priority our filters use, so we find and remove only ours


class Netdev:
    def __init__(self):
        self.ipr = IPRoute()

    def close(self):
        self.ipr.close()

    # --- links -----------------------------------------------------------

    def index(self, name):
        """ifindex of name, or None."""
        found = self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def name(self, index):
        try:
            return self.ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
        except NetlinkError:
            return None

    def links(self):
        """(index, name) of every link in this namespace."""
        return [(l["index"], l.get_attr("IFLA_IFNAME")) for l in self.ipr.get_links()]

    def mac(self, index):
        """The link's MAC address, or None if there is no such link."""
        try:
            return self.ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
        except NetlinkError:
            return None

    def by_mac(self, mac):
        """Name of the link with this MAC address, or None."""
        for link in self.ipr.get_links():
            if link.get_attr("IFLA_ADDRESS") == mac:
                return link.get_attr("IFLA_IFNAME")
        return None

    def operstate(self, index):
        """The link's operational state (UP, DOWN, LOWERLAYERDOWN...), or None."""
        try:
            return self.ipr.get_links(index)[0].get_attr("IFLA_OPERSTATE")
        except NetlinkError:
            return None

    def operstates(self):
        """{ifindex: operational state} of every link, from one dump."""
        return {link["index"]: link.get_attr("IFLA_OPERSTATE") for link in self.ipr.get_links()}

    def tc_ingress_names(self, index):
        """Names of the bpf filters on the link's ingress."""
        names = set()
        for f in self.tc_ingress_filters(index):
            opts = f.get_attr("TCA_OPTIONS")
            if opts is not None and opts.get_attr("TCA_BPF_NAME"):
                names.add(opts.get_attr("TCA_BPF_NAME"))
        return names

    def kind(self, index):
        """The link's type (veth, bridge, ...), or None for a physical NIC."""
        info = self.ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info else None

    def is_up(self, index):
        link = self.ipr.get_links(index)[0]
        return bool(link["flags"] & 1)

    def create_veth(self, name, peer, mac, mtu, peer_mtu):
        self.ipr.link("add", ifname=name, kind="veth", address=mac, mtu=mtu,
                      peer={"ifname": peer, "mtu": peer_mtu})

    def up(self, index):
        self.ipr.link("set", index=index, state="up")

    def delete(self, index):
        try:
            self.ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise

    def enable_gro(self, name):
        """XDP_REDIRECT into a veth needs NAPI on the receiving end; GRO turns
        it on without an XDP program there (docs/design.md,
        "Kernel constraints")."""
        set_features(name, {"rx-gro": True})

    # --- tc --------------------------------------------------------------

    def attach_tc_ingress(self, index, prog_fd, name):
        try:
            self.ipr.tc("add", "clsact", index)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        # replace: adds the filter, or swaps ours if a killed command left it
        self.ipr.tc("replace-filter", "bpf", index, ":1", fd=prog_fd, name=name,
                    parent=TC_INGRESS, prio=TC_PRIO, classid=1, direct_action=True)

    def replace_tc_ingress(self, index, prog_fd, name):
        """Swap the program of our ingress filter in place (atomic)."""
        self.ipr.tc("replace-filter", "bpf", index, ":1", fd=prog_fd, name=name,
                    parent=TC_INGRESS, prio=TC_PRIO, classid=1, direct_action=True)

    def detach_tc_ingress(self, index):
        """Remove our filter, and the clsact qdisc once nothing else uses it."""
        try:
            self.ipr.tc("del-filter", "bpf", index, ":1", parent=TC_INGRESS, prio=TC_PRIO)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                raise
        if not self.tc_ingress_filters(index) and not self.tc_egress_filters(index):
            try:
                self.ipr.tc("del", "clsact", index)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise

    def tc_ingress_filters(self, index):
        return self._filters(index, TC_INGRESS)

    def tc_egress_filters(self, index):
        return self._filters(index, TC_EGRESS)

    def _filters(self, index, parent):
        try:
            return [f for f in self.ipr.get_filters(index=index, parent=parent)
                    if f.get_attr("TCA_KIND")]
        except NetlinkError:
            return []

    # --- XDP -------------------------------------------------------------

    def xdp_prog_id(self, index):
        """id of the XDP program attached to the link, or 0 (also when the
        link is gone)."""
        try:
            link = self.ipr.get_links(index)[0]
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return 0
            raise
        xdp = link.get_attr("IFLA_XDP")
        if not xdp:
            return 0
        return xdp.get_attr("IFLA_XDP_PROG_ID") or 0

    def attach_xdp(self, index, prog_fd, replace=False):
        """Native mode where the driver has it, generic otherwise. Refuses
        to displace a program unless replace (an atomic swap)."""
        only_new = 0 if replace else XDP_FLAGS_UPDATE_IF_NOEXIST
        for mode in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            try:
                self.ipr.link("set", index=index,
                              xdp={"attrs": [("IFLA_XDP_FD", prog_fd),
                                             ("IFLA_XDP_FLAGS", only_new | mode)]})
                return
            except NetlinkError as e:
                if mode == XDP_FLAGS_SKB_MODE or e.code not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise

    def detach_xdp(self, index):
        for mode in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            try:
                self.ipr.link("set", index=index,
                              xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", mode)]})
            except NetlinkError as e:
                if e.code not in (errno.ENODEV, errno.EINVAL, errno.EOPNOTSUPP):
                    raise

    # --- addresses -------------------------------------------------------

    def add_addr6(self, index, addr, plen):
        """An IPv6 address that needs no duplicate detection (replaced if
        it is there already)."""
        self.ipr.addr("replace", index=index, address=addr, prefixlen=plen,
                      family=socket.AF_INET6, IFA_F_NODAD=True)

    def del_addr6(self, index, addr, plen):
        try:
            self.ipr.addr("del", index=index, address=addr, prefixlen=plen, family=socket.AF_INET6)
        except NetlinkError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                raise


def get_feature(name, feature):
    """ethtool -k: whether feature is on, on a link of this namespace."""
    eth = Ethtool()
    try:
        return bool(eth.get_features(name).features[feature].enable)
    finally:
        eth.close()


def set_features(name, features):
    """ethtool -K: features as {name: on}, on a link of this namespace."""
    eth = Ethtool()
    try:
        feats = eth.get_features(name)
        for f, on in features.items():
            feats.features[f].enable = on
        eth.set_features(name, feats)
    finally:
        eth.close()


def read_sysctl(path):
    with open(f"/proc/sys/{path}") as f:
        return f.read().strip()


def sysctl(path, value):
    """Write a sysctl of the current network namespace (/proc/sys/net is
    per namespace)."""
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(str(value))
