"""Differential tests (docs/design.md, "How it is proved"): the reference
model in tests/model (written from docs/design.md, not from bpf/) must agree
with the real loaded programs, run with BPF_PROG_TEST_RUN on sled1 of the
session's lab (with the extra state of tests/model/setup.py, taken away
again at the end), on frames generated
with hypothesis: verdict (return code), counter deltas (per-CPU counters
summed, read before and after each frame) and output bytes.

Each case starts from an empty flow table (the LRU map `flows` is
cleared), so the firewall is modelled exactly; sequences of two or three
frames check its state (replies of an allowed flow, External frames).

The datapath bugs these tests found (B1-B6) are fixed; their inputs stay
below as regression tests, and tests/model/gen.py known_bug() is where an
input of a new, known bug would be set aside. bench/fuzz.py runs the same
comparison on 100,000+ cases.
"""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model import gen, setup, xde
from model.compare import compare
from model.harness import SledRunner, next_hops, run_case
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether


@pytest.fixture(scope="module")
def dlab(xlab):
    lab = xlab.lab
    xlab.reset()            # the lab as built, next hops resolved
    runner = None
    try:
        setup.install(lab)
        runner = SledRunner(lab)
        inst = runner.instance()
        port = next(i for i, p in inst.ports.items() if p.name == "xde0")
        yield runner, inst, next_hops(lab), port
    finally:
        if runner is not None:
            runner.close()
        setup.uninstall(lab)
        xlab.reset()


def check(dlab, steps, allow_known=False):
    runner, inst, hops, port = dlab
    bad = run_case(runner, inst, steps, hops, port)
    report = []
    for i, ms, res in bad:
        if not allow_known and gen.known_bug(*steps[i]):
            continue
        report.append(f"step {i} ({steps[i][0]}) {steps[i][1].hex()}\n"
                      f"  model: {res.verdict} {res.reason} {res.counters}\n  " + "\n  ".join(ms))
    assert not report, "datapath and model disagree:\n" + "\n".join(report)


def _not_known(steps):
    return not any(gen.known_bug(d, f) for d, f in steps)


SETTINGS = dict(database=None, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck))


@settings(max_examples=1500, **SETTINGS)
@given(kind=st.sampled_from(gen.OUT_KINDS), seed=st.integers(0, 2**32))
def test_outbound(dlab, kind, seed):
    steps = gen.case("out", kind, seed)
    if not _not_known(steps):
        return
    check(dlab, steps)


@settings(max_examples=1500, **SETTINGS)
@given(kind=st.sampled_from(gen.IN_KINDS), seed=st.integers(0, 2**32))
def test_inbound(dlab, kind, seed):
    steps = gen.case("in", kind, seed)
    if not _not_known(steps):
        return
    check(dlab, steps)


@settings(max_examples=600, **SETTINGS)
@given(kind=st.sampled_from(gen.SEQ_KINDS), seed=st.integers(0, 2**32))
def test_stateful_sequences(dlab, kind, seed):
    steps = gen.case("seq", kind, seed)
    if not _not_known(steps):
        return
    check(dlab, steps)


@settings(max_examples=300, **SETTINGS)
@given(seed=st.integers(0, 2**32), data=st.data())
def test_geneve_truncated_at_every_offset(dlab, seed, data):
    """A valid Geneve frame (options included) cut at any offset."""
    import random
    r = random.Random(seed)
    f = gen.underlay(r, gen.geneve(opts=gen._options(r)) + gen.inner_frame(r))
    cut = data.draw(st.integers(0, len(f) - 1))
    check(dlab, [("in", f[:cut])])


def test_truncation_sweep(dlab):
    """Every offset of one Geneve frame with all three Oxide options."""
    import random
    r = random.Random(6)
    opts = (gen.geneve_opt(gen.OXIDE, 0) + gen.geneve_opt(gen.OXIDE, 1, b"\0" * 4) +
            gen.geneve_opt(gen.OXIDE, 2, struct.pack("!I", 1400)))
    f = gen.underlay(r, gen.geneve(opts=opts) + gen.inner_frame(r, proto=1, n=16))
    for cut in range(len(f) + 1):
        check(dlab, [("in", f[:cut])])


def test_model_can_fail(dlab):
    """The comparison is not vacuous: a model told the wrong counter fails."""
    runner, inst, hops, port = dlab
    frame = bytes(Ether(src=gen.G1_MAC, dst=gen.GW_MAC) / IP(src="10.0.0.66", dst=gen.G2_IP) / ICMP())
    res = xde.outbound(inst, port, frame)
    rc, out, delta = runner.run("out", frame, port, ports=[port])
    assert compare(res, frame, rc, out, delta, hops) == []
    res.counters = {(port, "drop_out_no_v2p"): 1}
    assert compare(res, frame, rc, out, delta, hops)


# --- datapath bugs these tests found (B1-B6), fixed: they stay as regressions ----

G1E = Ether(src=gen.G1_MAC, dst=gen.GW_MAC)


# B1 (fixed)
@pytest.mark.parametrize("ip", [dict(flags="MF"), dict(frag=5)], ids=["first", "later"])
def test_bug_gateway_echo_fragment(dlab, ip):
    check(dlab, [("out", bytes(G1E / IP(src=gen.G1_IP, dst=gen.GW_IP, proto=1, **ip) /
                                 ICMP(id=5) / b"fragment"))], allow_known=True)


# B2 (fixed)
@pytest.mark.parametrize("field", ["version", "len_long", "len_short"])
def test_bug_outbound_ipv4_not_validated(dlab, field):
    f = bytearray(bytes(G1E / IP(src=gen.G1_IP, dst=gen.G2_IP) / UDP(sport=1, dport=2) / b"x"))
    if field == "version":
        f[14] = 0x55
    elif field == "len_long":
        struct.pack_into("!H", f, 16, 400)
    else:
        struct.pack_into("!H", f, 16, 10)
    check(dlab, [("out", bytes(f))], allow_known=True)


# B3 (fixed)
@pytest.mark.parametrize("what", ["trailer"])
def test_bug_decap_trailing_bytes(dlab, what):
    import random
    r = random.Random(3)
    f = gen.underlay(r, gen.geneve() + gen.inner_frame(r, proto=1, n=8))
    if what == "trailer":
        f += b"\xee" * 8
    else:
        f = bytearray(f)
        struct.pack_into("!H", f, 58, struct.unpack_from("!H", f, 58)[0] + 6)
        f = bytes(f)
    check(dlab, [("in", f)], allow_known=True)


# B4 (fixed)
def test_bug_inner_ipv4_truncated(dlab):
    import random
    r = random.Random(4)
    inner = gen.inner_frame(r, proto=17, n=8)[:24]
    check(dlab, [("in", gen.underlay(r, gen.geneve() + inner))], allow_known=True)


# B5 (fixed)
def test_bug_arp_foreign_ethernet_source(dlab):
    f = bytes(Ether(src="a8:40:25:ff:00:66", dst="ff:ff:ff:ff:ff:ff") /
              ARP(hwsrc=gen.G1_MAC, psrc=gen.G1_IP, pdst=gen.GW_IP))
    check(dlab, [("out", f)], allow_known=True)


# B6 (fixed)
def test_bug_option_body_past_packet(dlab):
    import random
    r = random.Random(5)
    g = gen.geneve(optlen=8, opts=gen.geneve_opt(0x0102, 0x01, b"\0" * 28)[:4])
    check(dlab, [("in", gen.underlay(r, g + b"\0" * 6))], allow_known=True)
