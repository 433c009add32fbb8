"""Traffic over veth underlays joined back to back (tests/sleds.py): TCP
and UDP arrive with valid checksums with no configuration but xdectl's
own, and xdectl leaves a veth's checksum offload as it found it."""
import json
import time

import pytest

from netns import Root, create_args, underlay_host, xdectl
from sleds import BackToBack, PingSeries, iperf3

pytestmark = pytest.mark.usefixtures("privileged")


@pytest.fixture(scope="module")
def b2b(privileged):
    lab = BackToBack()
    try:
        lab.resolve()
        yield lab
    finally:
        lab.close()


@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("direction", ["a->b", "b->a"])
def test_tcp_between_back_to_back_sleds(b2b, direction, streams):
    src, dst, addr = ((b2b.ga, b2b.gb, "10.0.0.2") if direction == "a->b"
                      else (b2b.gb, b2b.ga, "10.0.0.1"))
    out, errors = iperf3(dst, src, addr, "-P", streams)
    received = out["end"]["sum_received"]["bytes"]
    assert received > 10_000_000, f"{direction}, {streams} streams: {received} bytes received"
    assert errors["Tcp"] == 0, f"{errors['Tcp']} TCP checksum errors at the receiver"


@pytest.mark.parametrize("direction", ["a->b", "b->a"])
def test_udp_between_back_to_back_sleds(b2b, direction):
    src, dst, addr = ((b2b.ga, b2b.gb, "10.0.0.2") if direction == "a->b"
                      else (b2b.gb, b2b.ga, "10.0.0.1"))
    out, errors = iperf3(dst, src, addr, "-u", "-b", "100M", "-l", "1400")
    s = out["end"]["sum"]
    assert s["packets"] > 1000 and s["lost_percent"] < 5, s
    assert errors["Udp"] == 0, f"{errors['Udp']} UDP checksum errors at the receiver"


def _tx_csum(ns, dev):
    line = [l for l in ns.run("ethtool", "-k", dev).stdout.splitlines()
            if "tx-checksum-ip-generic" in l][0]
    return line.split(":")[1].split()[0]


def test_checksum_offload_is_restored_as_found(privileged):
    """xdectl turns transmit checksum offload off on veth underlays while a
    port uses them and back on after the last port; an underlay on which
    it was already off stays off."""
    hv, far = underlay_host("cs")
    root = Root(hv)
    try:
        hv.run("ethtool", "-K", "u2", "tx-checksum-ip-generic", "off")
        assert (_tx_csum(hv, "u1"), _tx_csum(hv, "u2")) == ("on", "off")
        xdectl(hv, root, *create_args("xde0"))
        assert (_tx_csum(hv, "u1"), _tx_csum(hv, "u2")) == ("off", "off")
        xdectl(hv, root, "delete", "xde0")
        assert (_tx_csum(hv, "u1"), _tx_csum(hv, "u2")) == ("on", "off")
    finally:
        root.cleanup()
        hv.delete()
        far.delete()


# --- link flaps ---------------------------------------------------------------

INTERVAL, FLOWS, FLAPS, DOWN_S = 0.01, 16, 3, 0.3   # 16 flows: both links carry some, whatever the hash seed
# Between flaps, longer than the kernel's batching of link events: it
# handles a carrier change at most once a second after the previous batch,
# so flaps closer together than that would measure its batching, not xde.
BETWEEN_S = 2.0
MOVE_S, BACK_S = 0.15, 0.2   # flows leave a dead link within MOVE_S, lose nothing BACK_S after it returns


def _u1_packets(ns):
    st = json.loads(ns.ip("-s", "-j", "link", "show", "dev", "u1").stdout)[0]["stats64"]
    return st["tx"]["packets"], st["rx"]["packets"]


@pytest.mark.parametrize("where", ["admin", "carrier"])
def test_underlay_flap_loses_only_packets_in_flight(b2b, where):
    """Ping ga -> gb every 10 ms in FLOWS series (each its own ICMP id, so
    its own outer UDP source port and ECMP hash: some cross each link each
    way) while a link goes down for 0.3 s three times: A's u1 set down by an
    operator ("admin"), or B's end of it ("carrier": A's u1 loses carrier).
    Each series may lose only what was sent in the MOVE_S after the link
    went down and the BACK_S after it came back; every series answers at
    the end."""
    flapper = b2b.a if where == "admin" else b2b.b
    b2b.resolve()
    series = PingSeries(b2b.ga, "10.0.0.2", FLOWS, INTERVAL,
                        seconds=1.5 + FLAPS * (DOWN_S + BETWEEN_S) + 0.5)
    time.sleep(0.5)
    t0 = _u1_packets(b2b.a)
    time.sleep(1.0)
    crossed = [after - before for after, before in zip(_u1_packets(b2b.a), t0)]
    windows = []
    for _ in range(FLAPS):
        down = time.time()
        flapper.ip("link", "set", "u1", "down")
        time.sleep(DOWN_S)
        flapper.ip("link", "set", "u1", "up")
        windows.append((down, time.time()))
        time.sleep(BETWEEN_S)
    lost = series.lost()
    report, bad = [], []
    for n, times in enumerate(lost):
        late = [t for t in times if not any(d - INTERVAL <= t <= d + MOVE_S or
                                            u - INTERVAL <= t <= u + BACK_S for d, u in windows)]
        report.append(f"series {n}: lost {len(times)}, outside the allowed {len(late)} "
                      f"(at {[round(t - windows[0][0], 3) for t in late][:12]} s after the first down)")
        bad += late
    text = "\n".join(report)
    print(text)
    assert min(crossed) >= 40, f"u1 carried {crossed} (tx, rx) packets in a second: nothing tested"
    assert not bad, f"losses outside {MOVE_S} s after down and {BACK_S} s after up:\n{text}"
