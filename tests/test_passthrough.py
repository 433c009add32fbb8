"""Passthrough mode end to end (docs/design.md, "Passthrough ports"): the
seed's scenario (docs/glossary.md, "The seed") in namespaces. The lab (one per
module, see netns.PassthroughLab): HV runs xdectl and has underlays u1, u2;
their peers n1, n2 are ports of a bridge in NET; PEER (10.0.0.2/24) hangs off
the same bridge. Each test gets a fresh xde0 whose guest end lives in a
namespace of its own with 10.0.0.1/24."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from netns import (Netns, PassthroughLab, create_args, ping, positional_args, xdectl)

PEER = PassthroughLab.PEER_IP


@pytest.fixture(scope="module")
def lab(privileged):
    """The seed's passthrough topology (docs/glossary.md, "The seed"; see
    PassthroughLab), one per module."""
    lab = PassthroughLab()
    yield lab
    lab.close()


@pytest.fixture
def seed_port(lab):
    """xde0 in passthrough mode, its guest end moved into namespace GUEST."""
    xdectl(lab.hv, lab.root, *create_args("xde0", passthrough=True))
    guest = Netns("g")
    try:
        lab.move_to_guest("xde0", guest, "10.0.0.1/24")
        lab.peer.ip("neigh", "flush", "all")
        yield guest
    finally:
        xdectl(lab.hv, lab.root, "delete", "xde0", check=False)
        guest.delete()


def deltas(after, before, keys):
    return {k: after[k] - before[k] for k in keys}


def test_seed_ping_both_ways(lab, seed_port):
    guest = seed_port
    assert not lab.hv.has_link("xde0") and lab.hv.has_link("xde0_dp")
    before = lab.root.stats("xde0")
    ping(guest, PEER)
    ping(lab.peer, "10.0.0.1")
    d = deltas(lab.root.stats("xde0"), before,
               ("passthrough_out", "passthrough_in", "tx_packets", "rx_packets"))
    assert d["passthrough_out"] >= 6, d    # 3 requests, 3 replies (+ ARP)
    assert d["passthrough_in"] >= 6, d
    assert d["tx_packets"] >= 6 and d["rx_packets"] >= 6, d

    [port] = lab.root.ports()
    assert (port["name"], port["mode"], port["mac"], port["ip"]) == \
        ("xde0", "passthrough", "a8:40:25:ff:00:01", "10.0.0.1")
    assert port["underlays"] == ["u1", "u2"] and port["state"] == "up"


def test_host_keeps_its_own_traffic_on_underlays(lab, seed_port):
    """XDP on the underlays passes the host's own frames to the host."""
    lab.hv.ip("addr", "add", "192.168.77.1/24", "dev", "u1")
    lab.peer.ip("addr", "add", "192.168.77.2/24", "dev", "p0")
    try:
        ping(lab.hv, "192.168.77.2")
        ping(lab.peer, "192.168.77.1")
        ping(seed_port, PEER)      # and the guest still works alongside
    finally:
        lab.hv.ip("addr", "del", "192.168.77.1/24", "dev", "u1", check=False)
        lab.peer.ip("addr", "del", "192.168.77.2/24", "dev", "p0", check=False)


def test_seed_positional_form_and_delete_from_other_namespace(lab, seed_port):
    """xde-create (the seed's form, docs/glossary.md, "The seed") makes a
    working port; xde-delete removes it although its guest end lives in
    another namespace."""
    xdectl(lab.hv, lab.root, *positional_args("xde1", mac="A8:40:25:ff:00:02", ip="10.0.0.3"))
    guest2 = Netns("g2")
    try:
        lab.move_to_guest("xde1", guest2, "10.0.0.3/24")
        assert [p["name"] for p in lab.root.ports()] == ["xde0", "xde1"]
        ping(guest2, PEER)
        ping(lab.peer, "10.0.0.3")
        ping(seed_port, PEER)

        xdectl(lab.hv, lab.root, "xde-delete", "xde1")
        assert not guest2.has_link("xde1"), guest2.links()
        assert not lab.hv.has_link("xde1_dp"), lab.hv.links()
        assert [p["name"] for p in lab.root.ports()] == ["xde0"]
        ping(seed_port, PEER)
        ping(lab.peer, "10.0.0.1")
    finally:
        xdectl(lab.hv, lab.root, "delete", "xde1", check=False)
        guest2.delete()


def test_delete_with_guest_end_in_other_namespace(lab):
    xdectl(lab.hv, lab.root, *create_args("xde0", passthrough=True))
    guest = Netns("g")
    try:
        lab.move_to_guest("xde0", guest, "10.0.0.1/24")
        ping(guest, PEER)
        xdectl(lab.hv, lab.root, "delete", "xde0")
        assert not guest.has_link("xde0"), guest.links()
        assert not lab.hv.has_link("xde0_dp") and not lab.hv.has_link("xde0")
        assert lab.root.ports() == []
        for u in ("u1", "u2"):    # it was the last port
            assert lab.hv.xdp_prog_id(u) is None
            assert lab.hv.tc_filters(u) == ""
    finally:
        xdectl(lab.hv, lab.root, "delete", "xde0", check=False)
        guest.delete()


def wait_for(cond, what, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def rx(lab):
    """Frames the underlays sent, as received by their far ends n1, n2."""
    return lab.net.stats("n1")[0], lab.net.stats("n2")[0]


def test_u1_down_traffic_goes_via_u2(lab, seed_port):
    guest = seed_port
    ping(guest, PEER)
    lab.hv.ip("link", "set", "u1", "down")
    try:
        n1, n2 = rx(lab)
        ping(guest, PEER, count=5)
        ping(lab.peer, "10.0.0.1", count=5)
        n1_after, n2_after = rx(lab)
        assert n2_after - n2 >= 10, "the guest's frames did not leave on u2"
        assert n1_after == n1
    finally:
        lab.hv.ip("link", "set", "u1", "up")


BACK_S = 1.0   # passthrough returns to U1 this soon after U1 comes back


def test_traffic_returns_to_u1_by_itself(lab, seed_port):
    """Frames leave on U1, on U2 only while U1 is down. When U1 comes back,
    the kernel restores the route to its sentinel address and the datapath
    sends on U1 again within BACK_S, with no command run. Batches of 5 pings
    50 ms apart: the first batch that all left on U1 marks the return."""
    guest = seed_port
    ping(guest, PEER)
    lab.hv.ip("link", "set", "u1", "down")
    ping(guest, PEER)
    lab.hv.ip("link", "set", "u1", "up")
    t_up = time.monotonic()
    back = None
    while back is None and time.monotonic() - t_up < 3 * BACK_S:
        t = time.monotonic()
        n1 = rx(lab)[0]
        ping(guest, PEER, count=5, interval="0.05", check=False)
        if rx(lab)[0] - n1 >= 5:
            back = t - t_up
    assert back is not None and back <= BACK_S, \
        f"passthrough returned to u1 after {back} s (bound {BACK_S} s, none: not within {3 * BACK_S} s)"
    n1, n2 = rx(lab)
    ping(guest, PEER, count=10, interval="0.05")
    assert rx(lab)[0] - n1 >= 10 and rx(lab)[1] - n2 < 10


def test_u1_carrier_loss_traffic_goes_via_u2(lab, seed_port):
    """U1 down by carrier loss (its far end goes down, as when a cable is
    pulled), not by administration."""
    guest = seed_port
    ping(guest, PEER)
    lab.net.ip("link", "set", "n1", "down")
    try:
        wait_for(lambda: lab.hv.operstate("u1") != "UP", "u1 to lose carrier")
        n2 = lab.net.stats("n2")[0]
        p = ping(guest, PEER, count=5, check=False)
        assert p.returncode == 0, \
            f"guest lost connectivity while only u1 has no carrier " \
            f"(n2 received +{lab.net.stats('n2')[0] - n2}):\n{p.stdout}"
    finally:
        lab.net.ip("link", "set", "n1", "up")


# --- two datapath instances on one kernel ---------------------------------------

def test_two_roots_side_by_side(privileged):
    labs, guests = [], []
    try:
        labs = [PassthroughLab(), PassthroughLab()]
        # Load both instances at the same time (each compiles on its root).
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(
                lambda lab: xdectl(lab.hv, lab.root, *create_args("xde0", passthrough=True),
                                   check=False), labs))
        for p in done:
            assert p.returncode == 0, p.stderr
        for lab in labs:
            g = Netns("g")
            guests.append(g)
            lab.move_to_guest("xde0", g, "10.0.0.1/24")
        assert labs[0].root.path != labs[1].root.path
        assert labs[0].root.exists() and labs[1].root.exists()

        before = [lab.root.stats("xde0") for lab in labs]
        for lab, g in zip(labs, guests):
            ping(g, PEER)
            ping(lab.peer, "10.0.0.1")
        for lab, b in zip(labs, before):
            d = deltas(lab.root.stats("xde0"), b, ("passthrough_out", "passthrough_in"))
            assert d["passthrough_out"] >= 6 and d["passthrough_in"] >= 6, d
            [port] = lab.root.ports()
            assert port["name"] == "xde0" and port["underlays"] == ["u1", "u2"]

        # Removing one instance leaves the other working.
        xdectl(labs[0].hv, labs[0].root, "unload", "--force")
        assert not labs[0].root.exists()
        assert not guests[0].has_link("xde0")
        ping(guests[1], PEER)
        ping(labs[1].peer, "10.0.0.1")
        assert [p["name"] for p in labs[1].root.ports()] == ["xde0"]
    finally:
        for lab in labs:
            lab.close()
        for g in guests:
            g.delete()
