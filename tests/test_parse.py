"""Unit tests for the overlay's and the firewall's input parsing (router
targets and destinations, V2P, rules), both address families."""
import io

import pytest

from xdectl import fw, overlay
from xdectl.errors import XdeError


@pytest.mark.parametrize("target,expected", [
    ("drop", (overlay.RT_DROP, None, 0)),
    ("ig", (overlay.RT_IG, None, 0)),
    ("ip4=10.0.0.9", (overlay.RT_IP4, "10.0.0.9", 32)),
    ("sub4=10.1.0.0/16", (overlay.RT_SUB4, "10.1.0.0", 16)),
    ("ip6=fd10::9", (overlay.RT_IP6, "fd10::9", 128)),
    ("ip6=FD10:0:0::0009", (overlay.RT_IP6, "fd10::9", 128)),
    ("sub6=fd10:1::/48", (overlay.RT_SUB6, "fd10:1::", 48)),
    ("sub6=::/0", (overlay.RT_SUB6, "::", 0)),
])
def test_route_targets(target, expected):
    assert overlay.parse_target(target) == expected


@pytest.mark.parametrize("target", [
    "", "gw", "ip4=", "ip4=10.0.0.300", "sub4=10.1.0.1/16", "sub4=10.0.0.0/33", "ip4=fd10::1",
    "sub4=fd10::/64", "ip6=", "ip6=10.0.0.1", "ip6=fd10::1/64", "ip6=fe80::1", "ip6=ff02::1",
    "ip6=::", "ip6=::1", "ip6=::ffff:10.0.0.1", "ip6=fd10::1%eth0", "sub6=fd10::1/64",
    "sub6=fd10::/129", "sub6=10.0.0.0/8", "sub6=::ffff:10.0.0.0/120", "ip4=10.0.0.1 ",
])
def test_bad_route_targets(target):
    one_line(overlay.parse_target, target)


@pytest.mark.parametrize("dest,target", [
    ("10.1.0.0/16", "ip4=10.0.0.2"), ("10.1.0.0/16", "sub4=10.1.0.0/16"), ("0.0.0.0/0", "ig"),
    ("fd20::/48", "ip6=fd10::2"), ("fd20::/48", "sub6=fd20::/48"), ("::/0", "ig"),
    ("fd20::/48", "drop"), ("192.0.2.0/24", "drop"), ("fd10::5/128", "ip6=fd10::2"),
])
def test_route_families_that_match(dest, target):
    net, _ = overlay.parse_route(dest, target)
    assert str(net) == dest


@pytest.mark.parametrize("dest,target,words", [
    ("10.1.0.0/16", "ip6=fd10::2", "IPv6"), ("10.1.0.0/16", "sub6=fd10::/64", "IPv6"),
    ("fd20::/48", "ip4=10.0.0.2", "IPv4"), ("fd20::/48", "sub4=10.0.0.0/24", "IPv4"),
    ("fd20::1/48", "drop", "fd20::1/48"), ("10.1.0.1/16", "drop", "10.1.0.1/16"),
    ("::ffff:10.0.0.0/104", "drop", "IPv4-mapped"), ("fd20::/129", "drop", "fd20::/129"),
])
def test_route_families_that_differ_or_bad_dest(dest, target, words):
    msg = one_line(overlay.parse_route, dest, target)
    assert words in msg


def test_del_route_needs_no_root_to_refuse_bad_input(tmp_path):
    for dest, target in (("fd20::1/48", None), ("fd20::/48", "ip6=fe80::1")):
        one_line(overlay.del_router_entry, str(tmp_path / "no-root"), "xde0", dest, target)
    assert not (tmp_path / "no-root").exists()


@pytest.mark.parametrize("ip", ["10.0.0.2", "fd10::2", "2001:db8::2"])
def test_v2p_either_family(ip):
    assert overlay.parse_v2p(ip, "A8:40:25:FF:00:02", "fd00:2::1", "10") == \
        (ip, "a8:40:25:ff:00:02", "fd00:2::1", 10)


@pytest.mark.parametrize("ip", ["fe80::2", "ff02::1", "::", "::ffff:10.0.0.2", "fd10::2%u1",
                                "fd10::/64", "10.0.0.2/32", "fd10:::2"])
def test_v2p_bad_vpc_ip(ip):
    msg = one_line(overlay.parse_v2p, ip, "a8:40:25:ff:00:02", "fd00:2::1", 10)
    assert msg.startswith("VPC IP")


def test_bulk_v2p_mixed_families_one_bad_line(tmp_path):
    text = "10.0.0.2 a8:40:25:ff:00:02 fd00:2::1 10\nfd10::2 a8:40:25:ff:00:02 fd00:2::1 10\n" \
           "fe80::2 a8:40:25:ff:00:02 fd00:2::1 10\n"
    with pytest.raises(XdeError, match=r"^line 3: VPC IP 'fe80::2' is link-local"):
        overlay.load_v2p(str(tmp_path / "no-root"), io.StringIO(text))
    assert not (tmp_path / "no-root").exists()


# --- firewall rules --------------------------------------------------------------

@pytest.mark.parametrize("line,text", [
    ("dir=in action=allow priority=1 hosts=ip=fd10::5",
     "dir=in action=allow priority=1 hosts=ip=fd10::5 protocol=any ports=any"),
    ("dir=in action=allow priority=1 hosts=subnet=fd10::/64 protocol=tcp ports=443,22",
     "dir=in action=allow priority=1 hosts=subnet=fd10::/64 protocol=tcp ports=22,443"),
    ("dir=in action=allow priority=1 hosts=subnet=FD10:0::5/128",
     "dir=in action=allow priority=1 hosts=ip=fd10::5 protocol=any ports=any"),
    ("dir=in action=allow priority=1 hosts=subnet=10.0.0.7/32",
     "dir=in action=allow priority=1 hosts=ip=10.0.0.7 protocol=any ports=any"),
    ("dir=out action=deny priority=2 hosts=subnet=0.0.0.0/0",
     "dir=out action=deny priority=2 hosts=subnet=0.0.0.0/0 protocol=any ports=any"),
    ("dir=in action=allow priority=3 protocol=icmp6",
     "dir=in action=allow priority=3 hosts=any protocol=icmp6 ports=any"),
    ("dir=in action=allow priority=3 protocol=icmp6:128",
     "dir=in action=allow priority=3 hosts=any protocol=icmp6:128 ports=any"),
    ("dir=in action=allow priority=3 hosts=subnet=fd10::/64 protocol=icmp6:01,004",
     "dir=in action=allow priority=3 hosts=subnet=fd10::/64 protocol=icmp6:1,4 ports=any"),
    ("dir=in action=allow priority=3 hosts=ip=10.0.0.1 protocol=icmp:8,0",
     "dir=in action=allow priority=3 hosts=ip=10.0.0.1 protocol=icmp:8,0 ports=any"),
])
def test_rules_of_both_families(line, text):
    assert fw.parse_line(line).text() == text


@pytest.mark.parametrize("line,words", [
    ("dir=in action=allow priority=1 hosts=ip=fe80::1", "link-local"),
    ("dir=in action=allow priority=1 hosts=ip=::ffff:10.0.0.1", "10.0.0.1"),
    ("dir=in action=allow priority=1 hosts=ip=fd10::1%u1", "scope"),
    ("dir=in action=allow priority=1 hosts=subnet=fd10::1/64", "fd10::1/64"),
    ("dir=in action=allow priority=1 hosts=subnet=::/0", "hosts=any"),
    ("dir=in action=allow priority=1 hosts=subnet=::/64", "::ffff:0:0/96"),
    ("dir=in action=allow priority=1 hosts=subnet=::ffff:0:0/96", "::ffff:0:0/96"),
    ("dir=in action=allow priority=1 protocol=icmp6:256", "0..255"),
    ("dir=in action=allow priority=1 protocol=icmp6:1,2,3", "0..255"),
    ("dir=in action=allow priority=1 protocol=icmpv6", "icmp6[:type[,code]]"),
    ("dir=in action=allow priority=1 protocol=tcp:5", "tcp:5"),
    ("dir=in action=allow priority=1 protocol=icmp6 ports=22", "ports apply to tcp and udp"),
    ("dir=in action=allow priority=1 hosts=ip=10.0.0.1 protocol=icmp6", "IPv4"),
    ("dir=in action=allow priority=1 hosts=subnet=fd10::/64 protocol=icmp:8", "IPv6"),
])
def test_bad_rules_one_line(line, words):
    msg = one_line(fw.parse_line, line)
    assert words in msg, msg


def one_line(fn, *args):
    """fn(*args) raises XdeError with one non-empty line; returns it."""
    with pytest.raises(XdeError) as exc:
        fn(*args)
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_bulk_v2p_names_the_bad_line_and_writes_nothing(tmp_path):
    text = "10.0.0.1 a8:40:25:ff:00:01 fd00:1::1 10\n# comment\n10.0.0.2 zz:40:25:ff:00:02 fd00:2::1 10\n"
    # the root does not exist: a line error must be raised before it is touched
    with pytest.raises(XdeError, match=r"^line 3: VPC MAC"):
        overlay.load_v2p(str(tmp_path / "no-root"), io.StringIO(text))
    assert not (tmp_path / "no-root").exists()


def test_bulk_v2p_wrong_field_count():
    with pytest.raises(XdeError, match=r"^line 1: expected"):
        overlay.load_v2p("/nonexistent", io.StringIO("10.0.0.1 a8:40:25:ff:00:01 fd00:1::1\n"))


# --- trace's frames ---------------------------------------------------------------

def test_trace_wraps_and_decodes_ipv6_inner_frames():
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether

    from xdectl import trace
    inner = bytes(Ether(src="a8:40:25:ff:00:02", dst="a8:40:25:ff:00:01") /
                  IPv6(src="fd10::2", dst="fd10::1") / ICMPv6EchoRequest(id=7))
    assert str(trace._inner_source(inner)) == "fd10::2"
    assert not trace.is_underlay_frame(inner, bytes(16))
    outer = trace.encapsulate(inner, 10, "fd00:2::1", "fd00:1::1", "02:00:00:00:00:02")
    assert trace.is_underlay_frame(outer)
    pkt = trace.decode(outer)
    assert pkt.summary() == "Ether / IPv6 / UDP / GENEVE / Ether / IPv6 / ICMPv6 Echo Request " \
                            "(id: 0x7 seq: 0x0)"
    assert (pkt.getlayer(IPv6, 1).src, pkt.getlayer(IPv6, 2).src) == ("fd00:2::1", "fd10::2")
