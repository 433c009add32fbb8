"""One list of drop reasons (bpf/counters.h) for the datapath, xdectl and
the docs: every drop in bpf/ goes through the helper that takes a reason,
every reason is used, documented, and read back by name and direction.
Reads the sources only: no root needed."""
import ctypes as ct
import re
from pathlib import Path

from xdectl import counters, datapath

REPO = Path(__file__).resolve().parents[1]
BPF = REPO / "bpf"


def code(path):
    """A C file without its comments."""
    text = re.sub(r"/\*.*?\*/", " ", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def x_list(name):
    """The members of an X-macro list in bpf/counters.h."""
    m = re.search(r"#define " + name + r"\(X\)((?:[^\n]*\\\n)*[^\n]*)", code(BPF / "counters.h"))
    assert m, f"{name} not found in bpf/counters.h"
    return re.findall(r"X\((\w+)\)", m.group(1))


REASONS = x_list("XDE_DROP_REASONS")
SOURCES = sorted(BPF.glob("*.[ch]"))


def test_the_lists_are_there():
    assert len(REASONS) == len(set(REASONS)) > 20
    assert "spoof" in REASONS and "tail_call" in REASONS
    assert x_list("XDE_GLOBAL_EVENTS") == ["passed_to_host"]


def test_no_drop_without_a_reason():
    """Only tc_drop() and xdp_drop() return a drop verdict (and boundary
    services' own, bsvc_tc_drop() and bsvc_xdp_drop(): tests/test_boundary.py)."""
    for f in SOURCES:
        found = re.findall(r"\b(TC_ACT_SHOT|XDP_DROP)\b", code(f))
        expected = ["TC_ACT_SHOT", "XDP_DROP"] if f.name in ("counters.h", "boundary.h") else []
        assert found == expected, f"{f.name} drops without a reason: {found}"


def test_every_drop_names_a_listed_reason():
    calls = 0
    for f in SOURCES:
        if f.name == "counters.h":
            continue
        for args in re.findall(r"\b(?:tc_drop|xdp_drop|count_drop)\(([^;]*?)\);", code(f)):
            calls += 1
            why = args.split(",")[-1].strip()
            # xdp_underlay passes on geneve_parse()'s reason, checked < DROP_MAX
            if f.name == "xdp_underlay.c" and why == "rc":
                continue
            # the NAT programs pass on nat.h's (nat_out, snat_serve, nat_in),
            # which return DROP_ names (checked below)
            if f.name in ("tc_port.c", "xdp_underlay.c") and why == "why":
                continue
            assert why.startswith("DROP_") and why[5:] in REASONS, f"{f.name}: drop({args})"
    assert calls > 30


def test_nat_returns_only_listed_reasons():
    """What nat.h's functions hand the programs to drop with."""
    returned = re.findall(r"\breturn [^;]*?\b(DROP_\w+)", code(BPF / "nat.h"))
    assert returned, "nat.h returns no drop reason"
    assert {r[5:] for r in returned} - {"MAX"} <= set(REASONS)


def test_every_reason_is_used():
    used = " ".join(code(f) for f in SOURCES if f.name != "counters.h")
    unused = [r for r in REASONS if not re.search(r"\bDROP_" + r + r"\b", used)]
    assert not unused, f"reasons nothing counts: {unused}"


def test_the_design_doc_lists_every_reason_in_order():
    text = (REPO / "docs" / "design.md").read_text()
    section = text[text.index("## Counters and drop reasons"):]
    section = section[:section.index("\n## ", 3)]
    rows = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert rows == REASONS


def _stats_type(events):
    """A per-port stats struct as bcc describes port_stats: the events,
    then `struct drops drop[2]`."""
    drops = type("drops", (ct.Structure,), {"_fields_": [(r, ct.c_uint64) for r in REASONS]})
    return type("port_stats", (ct.Structure,),
                {"_fields_": [(e, ct.c_uint64) for e in events] + [("drop", drops * 2)]})


def test_counts_sum_cpus_and_name_drops_by_direction():
    events = x_list("XDE_PORT_EVENTS")
    Stats = _stats_type(events)
    cpus = [Stats(), Stats()]
    cpus[0].rx_packets, cpus[1].rx_packets = 3, 4
    cpus[1].drop[0].spoof = 2                      # DIR_OUT
    cpus[0].drop[1].firewall, cpus[1].drop[1].firewall = 1, 5   # DIR_IN
    c = counters._sum(cpus)
    assert list(c.events) == events and c.events["rx_packets"] == 7
    assert c.drops[("out", "spoof")] == 2 and c.drops[("in", "firewall")] == 6
    assert c.drops[("in", "spoof")] == 0 and c.drops[("out", "firewall")] == 0
    flat = c.flat()
    assert flat["drop_out_spoof"] == 2 and flat["drop_in_firewall"] == 6
    assert len(flat) == len(events) + 2 * len(REASONS)


def test_directions_follow_the_enum():
    m = re.search(r"enum xde_dir \{ DIR_OUT = 0, DIR_IN = 1 \}", code(BPF / "counters.h"))
    assert m and counters.DIRECTIONS == ("out", "in")


def test_programs_come_from_the_entry_files():
    """One entry file per attach point, each opening with the hook it runs
    on; the programs and their types are read from them."""
    assert datapath.programs() == {"xdp_underlay": 6, "xdp_fw_eval": 6, "xdp_nat": 6,
                                   "tc_underlay_in": 3, "tc_port_out": 3, "tc_fw_eval": 3,
                                   "tc_gateway": 3, "tc_nat": 3, "tc_snat": 3,
                                   "xdp_boundary": 6, "tc_boundary": 3}
    for f in datapath.SOURCES:
        first = (BPF / f).read_text().splitlines()[0]
        hook = "XDP on" if f.startswith("xdp_") else "TC ingress"
        assert first.startswith("/* " + hook), f"{f} does not open with its hook: {first}"
