"""A port's external addresses (xdectl/nat.py; docs/design.md, "NAT"):
their validation, their encoding in the nat_cfg map (a stand-in built from
bpf/nat.h's own structs, tests/cmaps.py), what an address change keeps and
drops, and the command line's options for them. No root needed."""
import ipaddress
import sys

import pytest
from typer.testing import CliRunner

from cmaps import fake_maps
from xdectl import nat
from xdectl.errors import XdeError
from xdectl.maps import V4_MAPPED, addr16, set_bytes
from xdectl.nat import ExternalIPs

V4, V6 = "192.0.2.5", "2001:db8::5"


def refused(ext, families=(4, 6)):
    """ext.validated() raises XdeError: one non-empty line. Returns it."""
    with pytest.raises(XdeError) as exc:
        ext.validated(families)
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error must be one non-empty line: {msg!r}"
    return msg


def floating(version, n):
    base = ipaddress.ip_address("192.0.2.0" if version == 4 else "2001:db8:f::")
    return tuple(str(base + i) for i in range(1, n + 1))


# --- validation ----------------------------------------------------------------

@pytest.mark.parametrize("value", ["nope", "192.0.2", "192.0.2.256", "2001:db8::g", "", "1.2.3.4/32"])
@pytest.mark.parametrize("role", ["snat_ips", "ephemeral_ips", "floating_ips"])
def test_not_an_address(role, value):
    ext = ExternalIPs(**{role: (value,)}, **({"snat_start": 1, "snat_end": 2}
                                              if role == "snat_ips" else {}))
    msg = refused(ext)
    assert "is not an IPv4 or IPv6 address" in msg and repr(value) in msg
    flag = {"snat_ips": "--snat-ip", "ephemeral_ips": "--ephemeral-ip",
            "floating_ips": "--floating-ip"}[role]
    assert msg.startswith(flag), msg


@pytest.mark.parametrize("value", ["::ffff:192.0.2.5", "2001:db8::5%eth0"])
def test_mapped_or_scoped(value):
    msg = refused(ExternalIPs(floating_ips=(value,)))
    assert value in msg and "IPv4-mapped" in msg and "no scope" in msg


@pytest.mark.parametrize("value", [
    "169.254.0.1", "fe80::1",                     # link-local
    "224.0.0.1", "239.1.2.3", "ff02::1", "ff0e::1",   # multicast
    "0.0.0.0", "::",                               # unspecified
    "127.0.0.1", "::1",                            # loopback
    "255.255.255.255",                             # broadcast
])
def test_not_unicast(value):
    msg = refused(ExternalIPs(ephemeral_ips=(value,)))
    assert f"{value!r} is not a unicast address" in msg


@pytest.mark.parametrize("families,value,lacks", [((4,), V6, 6), ((6,), V4, 4)])
def test_family_the_port_lacks(families, value, lacks):
    for ext in (ExternalIPs(snat_ips=(value,), snat_start=1, snat_end=9),
                ExternalIPs(ephemeral_ips=(value,)), ExternalIPs(floating_ips=(value,))):
        msg = refused(ext, families)
        assert f"the port has no IPv{lacks} address to translate" in msg and value in msg


def test_one_snat_and_one_ephemeral_ip_per_family():
    msg = refused(ExternalIPs(("192.0.2.5", "192.0.2.6"), 1, 9))
    assert msg == "--snat-ip: one IPv4 address per port"
    msg = refused(ExternalIPs(ephemeral_ips=("2001:db8::5", "2001:db8::6")))
    assert msg == "--ephemeral-ip: one IPv6 address per port"
    # one of each family is fine
    ok = ExternalIPs((V4, V6), 1, 9, ("192.0.2.6", "2001:db8::6")).validated()
    assert ok.snat_ips == (V4, V6) and len(ok.ephemeral_ips) == 2


@pytest.mark.parametrize("start,end,words", [
    (2000, 1000, "--snat-start 2000 is above --snat-end 1000"),
    (None, 1000, "--snat-ip needs --snat-start and --snat-end"),
    (1000, None, "--snat-ip needs --snat-start and --snat-end"),
    (0, 1000, "--snat-start 0 is outside 1..65535"),
    (1000, 65536, "--snat-end 65536 is outside 1..65535"),
    ("ten", 1000, "--snat-start 'ten' is not a number"),
])
def test_snat_range(start, end, words):
    assert refused(ExternalIPs((V4,), start, end)).startswith(words)


@pytest.mark.parametrize("start,end", [(1024, None), (None, 2047), (1024, 2047)])
def test_range_without_ip(start, end):
    msg = refused(ExternalIPs(snat_start=start, snat_end=end, ephemeral_ips=(V4,)))
    assert msg == "--snat-start and --snat-end need --snat-ip"


@pytest.mark.parametrize("ext", [
    ExternalIPs((V4,), 1, 9, (V4,)),
    ExternalIPs((V4,), 1, 9, (), (V4,)),
    ExternalIPs(ephemeral_ips=(V6,), floating_ips=("2001:DB8:0::5",)),   # written otherwise
    ExternalIPs(floating_ips=("192.0.2.7", "192.0.2.8", "192.0.2.7")),
])
def test_an_address_has_one_role(ext):
    msg = refused(ext)
    assert "is given twice; each address has one role" in msg


@pytest.mark.parametrize("version", [4, 6])
def test_at_most_16_floating_ips_per_family(version):
    msg = refused(ExternalIPs(floating_ips=floating(version, nat.MAX_FLOATING + 1)))
    assert msg == (f"--floating-ip: 17 IPv{version} addresses; a port has at most 16 of "
                   f"each family")
    # 16 of each family is the most
    both = floating(4, 16) + floating(6, 16)
    assert ExternalIPs(floating_ips=both).validated().floating_ips == both


def test_validated_normalises():
    ext = ExternalIPs(("2001:DB8::5", V4), "1024", "2047", (), ("2001:db8:0:0::7",)).validated()
    assert ext == ExternalIPs(("2001:db8::5", V4), 1024, 2047, (), ("2001:db8::7",))
    assert ext.validated() == ext
    assert not ExternalIPs() and not ExternalIPs().validated()
    assert ExternalIPs(floating_ips=(V4,))
    assert ExternalIPs().as_dict() == {"snat_ips": [], "snat_start": None, "snat_end": None,
                                       "ephemeral_ips": [], "floating_ips": []}


# --- the nat_cfg map ------------------------------------------------------------

FULL = ExternalIPs((V4, V6), 1024, 65535, ("192.0.2.6", "2001:db8::6"),
                   floating(4, 16) + floating(6, 16))


@pytest.mark.parametrize("ext", [
    ExternalIPs(),
    ExternalIPs((V4,), 1, 1),
    ExternalIPs((V6,), 40000, 40100),
    ExternalIPs(ephemeral_ips=(V6,)),
    ExternalIPs(floating_ips=("192.0.2.9", "2001:db8::9", "192.0.2.8")),
    FULL,
])
def test_encode_decode_round_trip(ext):
    """encode then decode gives the addresses back, IPv4's first (each
    family's in the given order)."""
    leaf = nat.encode(fake_maps("nat_cfg")["nat_cfg"].Leaf(), ext, 42)
    assert leaf.gen == 42
    back = nat.decode(leaf)

    def v4_first(addrs):
        return tuple(sorted(addrs, key=lambda a: ipaddress.ip_address(a).version))
    assert back == ExternalIPs(v4_first(ext.snat_ips), ext.snat_start, ext.snat_end,
                               v4_first(ext.ephemeral_ips), v4_first(ext.floating_ips))


def test_encoding_is_bpf_nat_h_layout():
    """The fields as bpf/nat.h declares them: per family ([0] IPv4, [1]
    IPv6) 16-byte addresses (IPv4 mapped), the range in host order (0:
    no SNAT IP), the ephemeral flag and the floating count."""
    leaf = nat.encode(fake_maps("nat_cfg")["nat_cfg"].Leaf(),
                      ExternalIPs((V6,), 1024, 2047, ("192.0.2.6",), ("192.0.2.7", "192.0.2.8")), 3)
    f4, f6 = leaf.fam[0], leaf.fam[1]
    assert (f4.snat_start, f4.snat_end) == (0, 0)
    assert (f6.snat_start, f6.snat_end) == (1024, 2047)
    assert bytes(f6.snat) == ipaddress.IPv6Address(V6).packed
    assert f4.has_ephemeral == 1 and bytes(f4.ephemeral) == V4_MAPPED + bytes([192, 0, 2, 6])
    assert f6.has_ephemeral == 0 and f6.nfloating == 0
    assert f4.nfloating == 2 and bytes(f4.floating[1]) == addr16("192.0.2.8")
    assert len(f4.floating) == nat.MAX_FLOATING


def test_write_bumps_the_generation_and_read_gives_it_back():
    maps = fake_maps("nat_cfg", "nat_flows", "snat_ports")
    assert nat.read(maps, 7) == ExternalIPs()
    ext = ExternalIPs((V4,), 1024, 2047).validated()
    nat.write(maps, 7, ext)
    assert nat.read(maps, 7) == ext
    gens = [maps["nat_cfg"].get(maps["nat_cfg"].Key(7)).gen]
    nat.write(maps, 7, ExternalIPs())
    gens.append(maps["nat_cfg"].get(maps["nat_cfg"].Key(7)).gen)
    assert gens == [1, 2] and nat.read(maps, 7) == ExternalIPs()
    nat.remove_port_state(maps, 7)
    assert maps["nat_cfg"].data == {}


# --- what an address change keeps ------------------------------------------------

@pytest.mark.parametrize("kind,addr,port,fits", [
    (nat.NAT_SNAT, V4, 1024, True),
    (nat.NAT_SNAT, V4, 2047, True),
    (nat.NAT_SNAT, V4, 1023, False),
    (nat.NAT_SNAT, V4, 2048, False),
    (nat.NAT_SNAT, "192.0.2.99", 1500, False),
    (nat.NAT_SNAT, "192.0.2.6", 1500, False),     # the ephemeral IP is not SNAT's
    (2, "192.0.2.6", 0, True),                    # ephemeral, any port
    (2, "192.0.2.7", 0, False),                   # a floating IP is not the ephemeral one
    (3, "192.0.2.7", 5, True),                    # floating
    (3, "192.0.2.6", 5, False),
])
def test_fits(kind, addr, port, fits):
    ext = ExternalIPs((V4,), 1024, 2047, ("192.0.2.6",), ("192.0.2.7",)).validated()
    assert nat.fits(ext, kind, addr, port) is fits


def test_fits_without_snat():
    assert not nat.fits(ExternalIPs(ephemeral_ips=(V4,)), nat.NAT_SNAT, V4, 1500)


INDEX = 5
GUEST, REMOTE = "10.0.0.1", "198.51.100.1"


def _key(m, direction, src, sport, dst, dport, proto=6):
    k = m.Key()
    k.port, k.dir, k.proto = INDEX, direction, proto
    set_bytes(k.src, addr16(src))
    set_bytes(k.dst, addr16(dst))
    k.sport, k.dport = nat._to_be16(sport), nat._to_be16(dport)
    return k


def _translated(maps, kind, guest_port, ext, ext_port):
    """A flow NAT translated, as the datapath leaves it: two nat_flows
    entries, both flow-table entries and (SNAT) the port's owner."""
    nf, flows, owners = maps["nat_flows"], maps["flows"], maps["snat_ports"]
    out = _key(nf, 0, GUEST, guest_port, REMOTE, 443)
    back = _key(nf, 1, REMOTE, 443, ext, ext_port)
    for k, addr, port in ((out, ext, ext_port), (back, GUEST, guest_port)):
        v = nf.Leaf()
        set_bytes(v.addr, addr16(addr))
        v.port, v.kind, v.gen = nat._to_be16(port), kind, 1
        nf.set(k, v)
    flows.set(out, flows.Leaf())
    flows.set(_key(flows, 1, REMOTE, 443, GUEST, guest_port), flows.Leaf())
    if kind == nat.NAT_SNAT:
        sk = owners.Key()
        sk.port, sk.family, sk.pool, sk.ext_port = INDEX, 4, 0, nat._to_be16(ext_port)
        o = owners.Leaf()
        nat.ct_copy(o.flow, out)
        owners.set(sk, o)
    return out


def test_drop_unfit_removes_exactly_the_flows_the_addresses_lost():
    maps = fake_maps("nat_flows", "flows", "snat_ports")
    keep = _translated(maps, nat.NAT_SNAT, 40000, V4, 1024)
    _translated(maps, nat.NAT_SNAT, 40001, V4, 2000)
    floating_kept = _translated(maps, 3, 40002, "192.0.2.7", 40002)
    _translated(maps, 2, 40003, "192.0.2.6", 40003)
    assert len(maps["flows"].data) == 8 and len(maps["snat_ports"].data) == 2
    # the range shrinks below 2000, the ephemeral IP goes
    gone = nat.drop_unfit(maps, INDEX, ExternalIPs((V4,), 1024, 1999, (), ("192.0.2.7",)))
    assert gone == 2
    assert len(maps["nat_flows"].data) == 4 and len(maps["flows"].data) == 4
    assert maps["flows"].get(keep) is not None and maps["flows"].get(floating_kept) is not None
    [(sk, owner)] = maps["snat_ports"].items()
    assert nat._be16(sk.ext_port) == 1024 and bytes(owner.flow) == bytes(keep)
    assert nat.translation(maps, keep) == {"kind": "snat", "external": f"{V4}:1024"}
    # the flow table's inbound entry shows its flow's translation too
    assert nat.translation(maps, nat._reverse(maps["flows"], keep)) == \
        {"kind": "snat", "external": f"{V4}:1024"}
    # another port's flows are not touched
    assert nat.drop_unfit(maps, INDEX + 1, ExternalIPs()) == 0
    assert nat.drop_unfit(maps, INDEX, ExternalIPs()) == 2
    assert maps["nat_flows"].data == {} and maps["snat_ports"].data == {}


def test_ports_share_a_snat_ip_only_with_disjoint_ranges():
    maps = fake_maps("nat_cfg", "ports")
    pc = maps["ports"].Leaf()
    pc.name = b"xde0"
    maps["ports"].set(maps["ports"].Key(3), pc)
    nat.write(maps, 3, ExternalIPs((V4,), 1024, 2047).validated())
    with pytest.raises(XdeError) as exc:
        nat.check_shared(maps, 4, ExternalIPs((V4,), 2047, 3000).validated())
    assert str(exc.value) == f"SNAT range 2047-3000 of {V4} overlaps port xde0's 1024-2047"
    nat.check_shared(maps, 4, ExternalIPs((V4,), 2048, 3000).validated())
    nat.check_shared(maps, 4, ExternalIPs(("192.0.2.6",), 1024, 2047).validated())
    nat.check_shared(maps, 3, ExternalIPs((V4,), 1, 65535).validated())   # itself
    # a floating or ephemeral IP is one port's alone, and no port's SNAT IP
    for ext in (ExternalIPs(floating_ips=(V4,)), ExternalIPs(ephemeral_ips=(V4,))):
        with pytest.raises(XdeError) as exc:
            nat.check_shared(maps, None, ext.validated())
        assert str(exc.value) == (f"external IP {V4} is port xde0's: a floating or ephemeral "
                                  f"IP belongs to one port only")
    nat.write(maps, 3, ExternalIPs(floating_ips=("192.0.2.9",)).validated())
    with pytest.raises(XdeError):
        nat.check_shared(maps, 4, ExternalIPs(floating_ips=("192.0.2.9",)).validated())
    with pytest.raises(XdeError):
        nat.check_shared(maps, 4, ExternalIPs(("192.0.2.9",), 1, 100).validated())
    nat.check_shared(maps, 3, ExternalIPs(floating_ips=("192.0.2.9",)).validated())   # itself


# --- the command line ------------------------------------------------------------

CREATE = ["create", "xde0", "--underlay", "u1", "--underlay", "u2", "--mac", "a8:40:25:ff:00:01",
          "--ip", "10.0.0.1", "--ip6", "fd10::1", "--gateway-mac", "a8:40:25:00:00:01",
          "--gateway-ip", "172.30.0.5", "--boundary-services", "fd00:99::1",
          "--boundary-vni", "99", "--vni", "10", "--underlay-addr", "fd00:1::1"]
EXTERNAL_OPTS = ["--snat-ip", "2001:db8::5", "--snat-ip", V4, "--snat-start", "1024",
                 "--snat-end", "2047", "--ephemeral-ip", "192.0.2.6", "--floating-ip",
                 "192.0.2.7", "--floating-ip", "2001:db8::7"]


def invoke(args):
    from xdectl.cli import app
    r = CliRunner().invoke(app, ["--root", "/nowhere", *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def test_create_takes_the_external_addresses(monkeypatch):
    got = []
    monkeypatch.setattr("xdectl.ports.create", lambda root, spec: got.append((root, spec)))
    assert invoke(CREATE + EXTERNAL_OPTS).exit_code == 0
    [(root, spec)] = got
    assert root == "/nowhere"
    assert spec.external == ExternalIPs(("2001:db8::5", V4), "1024", "2047", ("192.0.2.6",),
                                        ("192.0.2.7", "2001:db8::7"))
    assert spec.validated().external == ExternalIPs(("2001:db8::5", V4), 1024, 2047,
                                                    ("192.0.2.6",), ("192.0.2.7", "2001:db8::7"))
    got.clear()
    assert invoke(CREATE).exit_code == 0
    assert got[0][1].external == ExternalIPs() and not got[0][1].external


def test_set_external_ips_options(monkeypatch):
    got = []

    def fake(root, name, ext):
        got.append((root, name, ext))
        return 3
    monkeypatch.setattr(nat, "set_external_ips", fake)
    r = invoke(["set-external-ips", "xde0", *EXTERNAL_OPTS])
    assert r.exit_code == 0 and r.stdout == "xde0: external IPs set; 3 translated flows dropped\n"
    assert got == [("/nowhere", "xde0", ExternalIPs(("2001:db8::5", V4), "1024", "2047",
                                                    ("192.0.2.6",), ("192.0.2.7", "2001:db8::7")))]
    # no option: none left
    got.clear()
    monkeypatch.setattr(nat, "set_external_ips", lambda *a: got.append(a) or 1)
    r = invoke(["set-external-ips", "xde0"])
    assert r.stdout == "xde0: external IPs set; 1 translated flow dropped\n"
    assert got == [("/nowhere", "xde0", ExternalIPs())]
    help_text = invoke(["set-external-ips", "--help"]).stdout
    for opt in ("--snat-ip", "--snat-start", "--snat-end", "--ephemeral-ip", "--floating-ip"):
        assert opt in help_text


@pytest.mark.parametrize("opts,words", [
    (["--snat-ip", "192.0.2.999", "--snat-start", "1", "--snat-end", "2"],
     "--snat-ip '192.0.2.999' is not an IPv4 or IPv6 address"),
    (["--snat-ip", V4], "--snat-ip needs --snat-start and --snat-end"),
    (["--snat-ip", V4, "--snat-start", "x", "--snat-end", "2"], "--snat-start 'x' is not a number"),
    (["--floating-ip", "ff02::1"], "is not a unicast address"),
    (["--ephemeral-ip", V4, "--floating-ip", V4], "given twice"),
])
def test_create_with_a_bad_external_address_is_one_line(monkeypatch, capsys, opts, words):
    """Through the real entry point: exit 2, one line, and nothing touched
    (the root does not exist; the spec is refused before it is looked at)."""
    from xdectl import cli
    monkeypatch.setattr(sys, "argv", ["xdectl", "--root", "/nowhere", *CREATE, *opts])
    with pytest.raises(SystemExit) as exc:
        cli.run()
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("xdectl: ") and words in err[0], err
