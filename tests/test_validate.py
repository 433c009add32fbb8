"""Unit tests of input validation: xdectl.validate and PortSpec.validated().
No kernel, no root needed."""
import dataclasses

import pytest

from xdectl import validate
from xdectl.errors import XdeError
from xdectl.ports import PortSpec


def refused(fn, value, *args):
    """fn(value) raises XdeError with one line that names the value."""
    with pytest.raises(XdeError) as exc:
        fn(value, *args)
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error must be one non-empty line: {msg!r}"
    if isinstance(value, str) and value.strip():
        assert value in msg, f"error should name the bad value {value!r}: {msg!r}"
    return msg


# --- MAC ---------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "", "A8:40:25:ff:00", "A8:40:25:ff:00:01:02", "G8:40:25:ff:00:01", "A8-40-25-ff-00-01",
    "A84025ff0001", "A8:40:25:ff:00:001", "A8:40:25:ff::01", "A8:40:25:ff:00:01 ",
    " A8:40:25:ff:00:01", "A8:40:25:ff:00:0x",
])
def test_mac_malformed(value):
    refused(validate.mac, value)


def test_mac_not_a_string():
    with pytest.raises(XdeError):
        validate.mac(None)


@pytest.mark.parametrize("value", [
    "01:00:5e:00:00:01",   # IPv4 multicast
    "33:33:00:00:00:01",   # IPv6 multicast
    "ff:ff:ff:ff:ff:ff",   # broadcast
    "03:00:00:00:00:01",   # any odd first octet
    "A9:40:25:ff:00:01",
])
def test_mac_multicast(value):
    msg = refused(validate.mac, value)
    assert "multicast" in msg or "broadcast" in msg


@pytest.mark.parametrize("value", ["00:00:00:00:00:00", "0:0:0:0:0:0"])
def test_mac_zero(value):
    refused(validate.mac, value)


@pytest.mark.parametrize("value,want", [
    ("A8:40:25:ff:00:01", "a8:40:25:ff:00:01"),
    ("a8:40:25:FF:00:01", "a8:40:25:ff:00:01"),
    ("02:00:00:00:00:01", "02:00:00:00:00:01"),   # locally administered unicast
    ("00:00:00:00:00:01", "00:00:00:00:00:01"),
])
def test_mac_accepted_and_normalised(value, want):
    assert validate.mac(value) == want


# --- IPv4 / IPv6 --------------------------------------------------------

@pytest.mark.parametrize("value", [
    "", "10.0.0.256", "10.0.0", "10.0.0.1.5", "10.0.0.1/24", "ten.0.0.1", "fd00::1",
    "-1.0.0.0", " 10.0.0.1", "10.0.0.-1",
])
def test_ipv4_refused(value):
    refused(validate.ipv4, value)


@pytest.mark.parametrize("value", ["10.0.0.1", "172.30.0.5", "0.0.0.0", "255.255.255.255"])
def test_ipv4_accepted(value):
    assert validate.ipv4(value) == value


@pytest.mark.parametrize("value", [
    "", "fd00:99::zz", "fd00:::1", "fd00::1::2", "10.0.0.1", "fd00::1/64",
    "1:2:3:4:5:6:7:8:9", "fd00:99::1 ", "g::1",
])
def test_ipv6_refused(value):
    refused(validate.ipv6, value)


@pytest.mark.parametrize("value,want", [
    ("fd00:99::1", "fd00:99::1"),
    ("FD00:0099:0000:0000:0000:0000:0000:0001", "fd00:99::1"),
    ("::1", "::1"),
])
def test_ipv6_accepted_and_normalised(value, want):
    assert validate.ipv6(value) == want


# --- VNI ------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, "-1", 16777216, "16777216", 2**32, "ten", "", None, "1.5", "0x10"])
def test_vni_refused(value):
    with pytest.raises(XdeError) as exc:
        validate.vni(value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("value,want", [(0, 0), ("0", 0), (16777215, 16777215),
                                        ("16777215", 16777215), ("10", 10), (99, 99)])
def test_vni_accepted(value, want):
    assert validate.vni(value) == want


# --- interface names ------------------------------------------------------

@pytest.mark.parametrize("value", [
    "", "a" * 16, "abcdefghijklmnop", "bad/name", "bad name", "bad\tname", "bad:name",
    ".", "..", "xde0\n",
])
def test_ifname_refused(value):
    with pytest.raises(XdeError) as exc:
        validate.ifname(value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("value", ["xde0", "a", "a" * 15, "eth0.100", "u-1_x", "vioif0"])
def test_ifname_accepted(value):
    assert validate.ifname(value) == value


# --- subnets ----------------------------------------------------------------

@pytest.mark.parametrize("value", ["10.0.0.1/24", "10.0.0.0/33", "10.0.0.0/", "fd00::/64", "x"])
def test_cidr4_refused(value):
    refused(validate.cidr4, value)


def test_cidr4_accepted():
    assert str(validate.cidr4("10.0.0.0/24")) == "10.0.0.0/24"


# --- PortSpec.validated() ----------------------------------------------------

def seed_spec(**over):
    """The seed's port (docs/glossary.md, "The seed")."""
    spec = PortSpec(name="xde0", underlay1="vioif0", underlay2="vioif1",
                    mac="A8:40:25:ff:00:01", ip="10.0.0.1",
                    gw_mac="A8:40:25:00:00:01", gw_ip="172.30.0.5",
                    bsvc_addr="fd00:99::1", bsvc_vni="99", vni="10",
                    underlay_addr="fd00:1::1", vpc_subnet=None, passthrough=True)
    return dataclasses.replace(spec, **over)


def test_spec_seed_is_valid_and_normalised():
    v = seed_spec().validated()
    assert v.name == "xde0"
    assert (v.underlay1, v.underlay2) == ("vioif0", "vioif1")
    assert v.mac == "a8:40:25:ff:00:01"
    assert v.gw_mac == "a8:40:25:00:00:01"
    assert v.ip == "10.0.0.1" and v.gw_ip == "172.30.0.5"
    assert v.bsvc_addr == "fd00:99::1" and v.underlay_addr == "fd00:1::1"
    assert v.bsvc_vni == 99 and v.vni == 10
    assert v.vpc_subnet == "10.0.0.0/24"   # default: the /24 of --ip
    assert v.passthrough is True


def test_spec_validated_does_not_modify_original():
    s = seed_spec()
    s.validated()
    assert s.mac == "A8:40:25:ff:00:01" and s.vni == "10"


@pytest.mark.parametrize("vni", ["0", "16777215"])
def test_spec_vni_bounds_accepted(vni):
    assert seed_spec(vni=vni, bsvc_vni=vni).validated().vni == int(vni)


def test_spec_explicit_subnet():
    v = seed_spec(ip="10.0.5.7", vpc_subnet="10.0.0.0/16").validated()
    assert v.vpc_subnet == "10.0.0.0/16"


BAD_FIELDS = [
    ("mac", "A8:40:25:ff:00"),
    ("mac", "01:00:5e:00:00:01"),
    ("mac", "00:00:00:00:00:00"),
    ("gw_mac", "zz:40:25:00:00:01"),
    ("gw_mac", "ff:ff:ff:ff:ff:ff"),
    ("gw_mac", "00:00:00:00:00:00"),
    ("ip", "10.0.0.256"),
    ("gw_ip", "172.30.0"),
    ("bsvc_addr", "fd00:99::zz"),
    ("bsvc_addr", "10.0.0.1"),
    ("underlay_addr", "fd00:::1"),
    ("vni", "-1"),
    ("vni", "16777216"),
    ("bsvc_vni", "-1"),
    ("bsvc_vni", "16777216"),
    ("name", ""),
    ("name", "abcdefghijklmnop"),
    ("name", "bad/name"),
    ("name", "bad name"),
    ("underlay1", ""),
    ("underlay1", "vioif0/x"),
    ("underlay2", "a" * 16),
    ("underlay2", "vio if1"),
    ("vpc_subnet", "10.0.0.1/24"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_spec_bad_field_refused(field, value):
    with pytest.raises(XdeError) as exc:
        seed_spec(**{field: value}).validated()
    msg = str(exc.value)
    assert msg and "\n" not in msg
    if value.strip():
        assert value in msg, f"error should name the bad value {value!r}: {msg!r}"


@pytest.mark.parametrize("ip,subnet", [("10.0.1.1", "10.0.0.0/24"), ("192.168.0.1", "10.0.0.0/8"),
                                       ("10.0.0.1", "10.0.0.128/25")])
def test_spec_ip_outside_subnet_refused(ip, subnet):
    with pytest.raises(XdeError) as exc:
        seed_spec(ip=ip, vpc_subnet=subnet).validated()
    assert ip in str(exc.value)


# --- IPv6 and the gateway's settings ------------------------------------------------

def overlay_spec(**over):
    """The seed's port as an overlay port, dual stack."""
    return seed_spec(**{"passthrough": False, "ip6": "fd10::1", **over})


@pytest.mark.parametrize("value", [
    "fe80::1", "ff02::1", "::", "::1", "::ffff:10.0.0.1", "fd10::1%eth0", "10.0.0.1",
    "fd10::1/64", "fd10:::1", "",
])
def test_guest_ip6_refused(value):
    refused(validate.guest_ip6, value)


@pytest.mark.parametrize("value,want", [("FD10::0001", "fd10::1"), ("2001:db8:0:0::5", "2001:db8::5")])
def test_guest_ip6_accepted_and_normalised(value, want):
    assert validate.guest_ip6(value) == want


@pytest.mark.parametrize("value", ["::ffff:0:0/96", "::ffff:10.0.0.0/104", "fd10::1/64", "x"])
def test_overlay_net_refused(value):
    refused(validate.overlay_net, value)


@pytest.mark.parametrize("value", ["::/0", "0.0.0.0/0", "fd10::/64", "10.0.0.0/8"])
def test_overlay_net_accepted(value):
    assert str(validate.overlay_net(value)) == value


def test_spec_dual_stack_defaults():
    v = overlay_spec().validated()
    assert (v.ip, v.vpc_subnet, v.ip6, v.vpc_subnet6) == ("10.0.0.1", "10.0.0.0/24", "fd10::1",
                                                          "fd10::/64")
    assert (v.dns, v.hostname, v.domain) == ([], None, None)
    assert v.addrs() == ["10.0.0.1", "fd10::1"]


def test_spec_ipv6_only():
    v = overlay_spec(ip=None, ip6="FD10:0:0:1::5", vpc_subnet6="fd10::/48").validated()
    assert (v.ip, v.vpc_subnet, v.ip6, v.vpc_subnet6) == (None, None, "fd10:0:0:1::5", "fd10::/48")
    assert v.addrs() == ["fd10:0:0:1::5"]


def test_spec_gateway_settings_normalised():
    v = overlay_spec(dns=["fd10::53", "10.0.0.53", "FD10::54"], hostname="web-1",
                     domain="vpc.example.").validated()
    # IPv4 servers first (the order they read back from the templates)
    assert v.dns == ["10.0.0.53", "fd10::53", "fd10::54"]
    assert (v.hostname, v.domain) == ("web-1", "vpc.example")


def test_gateway_settings_fit_the_replies_the_port_has():
    """A 243-character domain makes a 571-byte DHCPv4 reply, too long for a
    template, but a DHCPv6 reply that fits: an IPv6-only port takes it."""
    from xdectl.ports import check_gateway
    domain = ".".join(["d" * 60] * 4)
    assert len(domain) == 243
    assert check_gateway(None, "fd10::1", ["fd10::53"], None, domain) == \
        (["fd10::53"], None, domain)
    v = overlay_spec(ip=None, dns=["fd10::53"], domain=domain).validated()
    assert (v.ip, v.ip6, v.domain) == (None, "fd10::1", domain)
    for ip, ip6 in (("10.0.0.1", "fd10::1"), ("10.0.0.1", None)):
        with pytest.raises(XdeError, match="DHCPv4 reply 571 bytes") as exc:
            check_gateway(ip, ip6, [], None, domain)
        assert "\n" not in str(exc.value)


BAD_DUAL = [
    (dict(ip=None, ip6=None), "--ip, --ip6"),
    (dict(ip6="fe80::1"), "fe80::1"),
    (dict(ip6="::ffff:10.0.0.1"), "::ffff:10.0.0.1"),
    (dict(ip6="10.0.0.1"), "10.0.0.1"),
    (dict(vpc_subnet6="fd20::/64"), "fd20::/64"),
    (dict(vpc_subnet6="fd10::1/64"), "fd10::1/64"),
    (dict(vpc_subnet6="10.0.0.0/24"), "10.0.0.0/24"),
    (dict(ip=None, vpc_subnet="10.0.0.0/24"), "needs --ip"),
    (dict(ip6=None, vpc_subnet6="fd10::/64"), "needs --ip6"),
    (dict(dns=["8.8.8.8.8"]), "8.8.8.8.8"),
    (dict(dns=["ff02::1"]), "ff02::1"),
    (dict(dns=["10.0.0.53", "10.0.0.53"]), "twice"),
    (dict(dns=["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]), "at most 3"),
    (dict(dns=["fd10::1", "fd10::2", "fd10::3", "fd10::4"]), "at most 3"),
    (dict(ip=None, dns=["10.0.0.53"]), "no --ip"),
    (dict(ip6=None, dns=["fd10::53"]), "no --ip6"),
    (dict(ip=None, hostname="web1"), "only DHCPv4"),
    (dict(hostname="web.1"), "web.1"),
    (dict(hostname="-web"), "-web"),
    (dict(hostname="a" * 64), "a" * 64),
    (dict(hostname=""), "host name"),
    (dict(domain="bad..example"), "bad..example"),
    (dict(domain="under_score.example"), "under_score.example"),
    (dict(domain=".".join(["a" * 60] * 5)), "more than 253"),
    (dict(hostname="h" * 63, domain=".".join(["d" * 60] * 4)), "bytes, more than the 512"),
]


@pytest.mark.parametrize("over,words", BAD_DUAL, ids=[str(i) for i in range(len(BAD_DUAL))])
def test_spec_dual_stack_refused(over, words):
    with pytest.raises(XdeError) as exc:
        overlay_spec(**over).validated()
    msg = str(exc.value)
    assert msg and "\n" not in msg
    assert words in msg, msg


@pytest.mark.parametrize("over", [dict(ip6="fd10::1"), dict(vpc_subnet6="fd10::/64"),
                                  dict(dns=["10.0.0.53"]), dict(hostname="web1"),
                                  dict(domain="vpc.example")])
def test_spec_passthrough_takes_no_ipv6_or_gateway_settings(over):
    with pytest.raises(XdeError) as exc:
        seed_spec(**over).validated()
    assert "passthrough" in str(exc.value) and "\n" not in str(exc.value)


def test_spec_passthrough_needs_ipv4():
    with pytest.raises(XdeError, match="needs --ip"):
        seed_spec(ip=None, ip6=None, vpc_subnet6=None).validated()
