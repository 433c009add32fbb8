"""Extra state the differential tests put on a lab's sled1 so that every
branch of the router and overlay is reachable: a local V2P entry with no
port, custom routes of every target kind. uninstall() takes it away."""
from xdectl import overlay

EXTRA_V2P = [  # (ip, mac, underlay, vni)
    ("10.0.0.3", "a8:40:25:ff:00:03", "fd00:1::1", 10),      # on this host, no such port
    ("10.0.0.4", "a8:40:25:ff:00:04", "fd00:2::1", 10),      # on sled2, no such port there
    ("10.0.0.9", "a8:40:25:ff:00:09", "fd00:2::1", 11),      # other VNI: not ours
]
EXTRA_ROUTES = [  # (dest, target)
    ("198.51.100.0/24", "drop"),
    ("203.0.113.0/24", "ip4=10.0.0.2"),
    ("203.0.114.0/24", "ip4=10.0.0.77"),                      # next hop without V2P
    ("10.1.0.0/16", "sub4=10.1.0.0/16"),
    ("10.0.0.128/25", "ig"),                                  # custom beats the system /24
    ("192.0.2.128/25", "drop"),
]


def install(lab, sled="sled1"):
    # the guest's own IPv6 chatter (router solicitations) would reach the
    # real TC hook between a test run's counter reads: silence it
    for g in ("g1", "g2"):
        lab.run(g, "sysctl", "-qw", "net.ipv6.conf.xde0.disable_ipv6=1", check=True)
    root = lab.root(sled)
    with lab.inside(sled):
        for ip, mac, ul, vni in EXTRA_V2P:
            overlay.set_v2p(root, ip, mac, ul, vni)
        for dest, target in EXTRA_ROUTES:
            overlay.add_router_entry(root, "xde0", dest, target)


def uninstall(lab, sled="sled1"):
    root = lab.root(sled)
    with lab.inside(sled):
        for dest, _ in EXTRA_ROUTES:
            overlay.del_router_entry(root, "xde0", dest)
        for ip, mac, ul, vni in EXTRA_V2P:
            overlay.clear_v2p(root, ip, mac, ul, vni)
    for g in ("g1", "g2"):
        lab.run(g, "sysctl", "-qw", "net.ipv6.conf.xde0.disable_ipv6=0", check=True)
