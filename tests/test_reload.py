"""`xdectl reload` (docs/design.md, "Reload, apply and trace"): the
programs of a running instance are replaced under live traffic, maps kept,
without losing a packet."""
import re
import threading

from frames import G2_IP
from lab_fixture import XDECTL


def xdp_prog_id(xlab, sled):
    out = xlab.ip(sled, "-d", "link", "show", "u1").stdout
    return int(re.search(r"prog/xdp id (\d+)", out).group(1))


def test_reload_under_traffic_loses_nothing(xlab):
    before_ids = {s: xdp_prog_id(xlab, s) for s in ("sled1", "sled2")}
    v2p_before = xlab.xdectl_json("sled1", "dump-v2p")
    stats_before = xlab.port_stats("sled1")
    result = {}

    def pings():
        result["p"] = xlab.ping("g1", G2_IP, count=600, interval="0.01")

    t = threading.Thread(target=pings)
    t.start()
    try:
        for sled in ("sled1", "sled2"):
            out = xlab.xdectl(sled, "reload").stdout
            assert "attachments swapped" in out, out
    finally:
        t.join()
    ok, out = result["p"]
    assert ok and " 0% packet loss" in out and "600 received" in out, out
    # new programs are attached; the maps (and their contents) are the same
    for sled, old in before_ids.items():
        assert xdp_prog_id(xlab, sled) != old
    assert xlab.xdectl_json("sled1", "dump-v2p") == v2p_before
    after = xlab.port_stats("sled1")
    assert after["encap"] >= stats_before["encap"] + 600  # counters kept counting
    xlab.must_ping("g1", G2_IP)


def test_reload_of_an_empty_root_is_one_clear_error(xlab):
    p = xlab.run("sled1", XDECTL, "--root", "/sys/fs/bpf/xt-none-here", "reload", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
