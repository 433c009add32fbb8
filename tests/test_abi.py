"""The values C and Python must agree on are defined in bpf/ and mirrored in
xdectl/abi.py; this reads the C source and checks every mirrored value, so
that an edit on one side alone fails here (no root needed)."""
import ipaddress
import re
from pathlib import Path

import pytest

from xdectl import abi, datapath, fw, nat, overlay, ports

BPF = Path(__file__).resolve().parents[1] / "bpf"


def c_source():
    return "\n".join(p.read_text() for p in sorted(BPF.glob("*.[ch]")))


def c_value(expr):
    """A #define's value: an integer expression of literals."""
    expr = re.sub(r"/\*.*?\*/", "", expr).strip()
    expr = re.sub(r"(?<=\d)U?L*L?\b", "", expr)
    assert re.fullmatch(r"[0-9a-fA-Fx+\-*<() ]+", expr), f"not a plain integer: {expr!r}"
    return eval(expr)  # noqa: S307 - digits and operators only, checked above


def defines():
    out = {}
    for name, value in re.findall(r"^#define ([A-Z][A-Z0-9_]*) ([^\n{]+)$", c_source(), re.M):
        try:
            out[name] = c_value(value)
        except AssertionError:
            pass  # macros that are not integers (BPF helpers, lists)
    return out


def enum(name):
    """{member: value} of a named enum (or the anonymous one whose members
    include `name`)."""
    src = c_source()
    m = re.search(r"enum " + name + r" \{([^}]*)\}", src) or \
        re.search(r"enum \{([^}]*\b" + name + r"\b[^}]*)\}", src)
    assert m, f"enum {name} not found in bpf/"
    out, nxt = {}, 0
    for item in re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S).split(","):
        item = item.strip()
        if not item:
            continue
        key, _, val = item.partition("=")
        nxt = c_value(val) if val else nxt
        out[key.strip()] = nxt
        nxt += 1
    return out


D = defines()


@pytest.mark.parametrize("name", ["PORT_F_PASSTHROUGH", "PORT_F_IP4", "PORT_F_IP6", "XDE_MAX_PORTS",
                                  "ROUTE_KEY_BITS", "VNI_PASSTHROUGH", "GENEVE_PORT",
                                  "GENEVE_PROTO_ETH", "GENEVE_OPT_CLASS_OXIDE", "FW_PROTO_ANY",
                                  "FW_PROTO_ARP", "FW_MAX_PORTS", "GW_TMPL_MAX", "GW_ECHO_MAX",
                                  "GW_OFF_IP4_DST", "GW_OFF_DHCP4_XID", "GW_OFF_DHCP4_FLAGS",
                                  "GW_OFF_DHCP4_TYPE", "GW_OFF_IP6_DST", "GW_OFF_NA_FLAGS",
                                  "GW_OFF_DHCP6_TYPE", "GW_OFF_DHCP6_IAID"])
def test_defines(name):
    assert getattr(abi, name) == D[name], f"{name}: C says {D[name]:#x}"


def test_encapsulation_length():
    assert abi.ENCAP_LEN == D["ENCAP_LEN"] == 70
    assert ports.ENCAP_OVERHEAD == abi.ENCAP_LEN


def test_enums():
    targets = enum("route_target")
    assert {k: getattr(abi, k) for k in targets} == targets, f"enum route_target: C says {targets}"
    assert (abi.DIR_OUT, abi.DIR_IN) == (enum("xde_dir")["DIR_OUT"], enum("xde_dir")["DIR_IN"])
    assert (abi.FW_ALLOW, abi.FW_DENY) == \
        (enum("fw_action")["FW_ALLOW"], enum("fw_action")["FW_DENY"])
    states = enum("tcp_state")
    assert [f"TCP_{s}" for s in abi.TCP_STATES] == sorted(states, key=states.get)
    slots = enum("PROG_MAIN")
    assert {k: getattr(abi, k) for k in slots} == slots, f"tail-call slots: C says {slots}"
    assert set(slots) == {"PROG_MAIN", "PROG_FW_EVAL", "PROG_GATEWAY", "PROG_NAT", "PROG_SNAT"}
    kinds = enum("gw_reply")
    assert {k: getattr(abi, k) for k in kinds} == kinds, f"enum gw_reply: C says {kinds}"


def test_nat_values():
    """xdectl/nat.py's copies of bpf/nat.h: the floating IPs a port may
    have per family, and the kinds of translation."""
    assert nat.MAX_FLOATING == D["NAT_MAX_FLOATING"]
    kinds = enum("nat_kind")
    assert {v: k.removeprefix("NAT_").lower() for k, v in kinds.items()} == nat.KINDS, \
        f"enum nat_kind: C says {kinds}"
    assert nat.NAT_SNAT == kinds["NAT_SNAT"]


def test_map_types_are_ones_bcc_describes_whole():
    """xdectl reads the maps with the types bcc describes, and bcc's type
    description keeps only the first dimension of an array: a map's key or
    value with a multi-dimensional array (at any depth) would read back
    smaller than the kernel's (xdectl refuses such a map when it opens it)."""
    src = re.sub(r"/\*.*?\*/", " ", c_source(), flags=re.S)
    bodies = dict(re.findall(r"struct (\w+) \{(.*?)\n\};", src, re.S))
    bodies.update((n, b.replace(";", ";\n"))      # one-line definitions
                  for n, b in re.findall(r"struct (\w+) \{([^{}\n]*)\};", src))
    seen, bad = set(), []

    def walk(name, path):
        if name in seen or name not in bodies:
            return
        seen.add(name)
        for typ, field, dims in re.findall(r"^\s*(?:struct )?(\w+) (\w+)((?:\[\w+\])*);",
                                           bodies[name], re.M):
            if dims.count("[") > 1:
                bad.append(f"{path}.{field}{dims}")
            walk(typ, f"{path}.{field}")
    for key, leaf, m in re.findall(r'XDE_MAP(?:_F)?\("\w+", ([\w ]+), ([\w ]+), (\w+)', src):
        for t in (key, leaf):
            if t.startswith("struct "):
                walk(t.removeprefix("struct ").strip(), f"{m}: {t}")
    assert not bad, f"multi-dimensional arrays in map types: {bad}"


def test_python_users_take_the_mirrored_values():
    assert overlay.TARGET_NAMES == {abi.RT_DROP: "drop", abi.RT_IG: "ig", abi.RT_IP4: "ip4",
                                    abi.RT_SUB4: "sub4", abi.RT_IP6: "ip6", abi.RT_SUB6: "sub6"}
    assert fw.DIRS == {"out": abi.DIR_OUT, "in": abi.DIR_IN}
    assert fw.ACTIONS == {"allow": abi.FW_ALLOW, "deny": abi.FW_DENY}
    assert fw.TCP_STATES[2] == "ESTABLISHED"
    # the tail-call tables list their programs in slot order
    for table, names in datapath.TAIL_CALLS.items():
        assert names.index(names[abi.PROG_FW_EVAL]) == abi.PROG_FW_EVAL
        assert names[abi.PROG_FW_EVAL].endswith("_fw_eval"), (table, names)
    assert datapath.TAIL_CALLS["tc_progs"][abi.PROG_GATEWAY] == "tc_gateway"
    assert datapath.TAIL_CALLS["tc_progs"][abi.PROG_NAT] == "tc_nat"
    assert datapath.TAIL_CALLS["tc_progs"][abi.PROG_SNAT] == "tc_snat"
    assert datapath.TAIL_CALLS["xdp_progs"][abi.PROG_NAT] == "xdp_nat"
    # each table is as large as bpf/fw_job.h declares it
    for table, names in datapath.TAIL_CALLS.items():
        m = re.search(r'XDE_MAP\("prog", u32, u32, ' + table + r", (\d+)\)", c_source())
        assert m and int(m.group(1)) == len(names), (table, names)


def test_sentinel_prefix_is_what_fib_h_builds():
    words = re.search(r"ipv6_dst\[0\] = bpf_htonl\((0x[0-9a-f]+)\);\s*"
                      r"p\.ipv6_dst\[1\] = bpf_htonl\((0x[0-9a-f]+)\);", c_source())
    assert words, "underlay_alive() no longer builds the sentinel address as expected"
    packed = int(words.group(1), 16).to_bytes(4, "big") + int(words.group(2), 16).to_bytes(4, "big")
    assert ipaddress.IPv6Address(abi.SENTINEL_PREFIX).packed[:8] == packed


def test_each_constant_is_defined_once():
    """One definition per name across bpf/, and distinct names for the
    special VNIs of distinct meanings."""
    names = re.findall(r"^#define ([A-Z][A-Z0-9_]*)\b", c_source(), re.M)
    guards = {n for n in names if n.startswith("XDE_") and n.endswith("_H")}
    twice = {n for n in names if names.count(n) > 1} - guards - {"XDE_FIELD", "XDE_INDEX"}
    assert not twice, f"defined more than once: {twice}"
    assert D["VNI_PASSTHROUGH"] != D["VNI_EXTERNAL"]


def test_a_mismatch_is_caught(monkeypatch):
    """Not vacuous: a drifted copy fails the same comparison."""
    monkeypatch.setattr(abi, "VNI_PASSTHROUGH", 0xFFFFFFFE)
    with pytest.raises(AssertionError):
        test_defines("VNI_PASSTHROUGH")


def test_boundary_mac_is_the_one_the_tests_expect():
    """The inner destination MAC of boundary-services frames, as bpf/wire.h
    spells it, is the one the tests' frames and the model use."""
    from frames import BSVC_MAC
    from model import gen
    m = re.search(r"#define BSVC_MAC \{([^}]*)\}", c_source())
    assert m, "BSVC_MAC not found in bpf/"
    c_mac = ":".join(f"{int(x, 16):02x}" for x in m.group(1).split(","))
    assert c_mac == BSVC_MAC == gen.BSVC_MAC_S
