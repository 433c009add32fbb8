"""xde against a foreign Geneve peer: Open vSwitch's userspace datapath
(tests/ovs_peer.py builds the lab). Ping and TCP both ways between the guest
behind xde and the guest behind OVS.

OVS's userspace datapath reads frames off the underlay veth with a packet
socket and checks nothing a veth left unfinished: a segment whose inner
checksum was still to be filled in reaches the OVS guest with a bad one.
TCP then moves nothing and the guest counts InCsumErrors, which is what
xde did before it turned transmit checksum offload off on veth underlays.
"""
import pytest

from netns import ping
from ovs_peer import OVS_GUEST_IP, XDE_GUEST_IP, OvsPeerLab
from sleds import iperf3

pytestmark = pytest.mark.usefixtures("privileged")

MIN_BYTES = 10_000_000       # 2 s of TCP through the tunnel moves far more


@pytest.fixture(scope="module")
def ovs_lab(privileged):
    lab = OvsPeerLab()
    try:
        yield lab
    finally:
        lab.close()


def ends(lab, direction):
    """(sender namespace, receiver namespace, receiver's IP)."""
    if direction == "xde->ovs":
        return lab.xg, lab.og, OVS_GUEST_IP
    return lab.og, lab.xg, XDE_GUEST_IP


@pytest.mark.parametrize("direction", ["xde->ovs", "ovs->xde"])
def test_ping(ovs_lab, direction):
    src, _, dst_ip = ends(ovs_lab, direction)
    before = ovs_lab.root.stats("xde0")
    p = ping(src, dst_ip, count=5, check=False)
    after = ovs_lab.root.stats("xde0")
    assert p.returncode == 0 and " 5 received" in p.stdout, \
        f"ping {direction}:\n{p.stdout}{p.stderr}\n{ovs_lab.diagnostics()}"
    # it went through xde: five requests one way, five replies the other
    assert after["encap"] - before["encap"] >= 5, (before, after)
    assert after["decap"] - before["decap"] >= 5, (before, after)


@pytest.mark.parametrize("direction", ["xde->ovs", "ovs->xde"])
def test_tcp(ovs_lab, direction):
    """Bytes received, and no TCP checksum error at the receiver."""
    src, dst, dst_ip = ends(ovs_lab, direction)
    out, errors = iperf3(dst, src, dst_ip)
    received = out["end"]["sum_received"]["bytes"]
    why = f"{direction}: {received} bytes, checksum errors {errors}\n{ovs_lab.diagnostics()}"
    assert received > MIN_BYTES and errors["Tcp"] == 0, why
