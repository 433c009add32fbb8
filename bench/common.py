"""What the benches share: the import path (this checkout's xdectl and the
tests' frame builders and fixture table), a lab built for one run, sled1's
programs beside the empty programs every per-packet figure is a ratio
against, and the result file."""
import contextlib
import io
import json
import os
import platform
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tests")) if p not in sys.path]

from xdectl import counters, libbpf  # noqa: E402
from xdectl.datapath import Datapath  # noqa: E402
from xdectl.maps import find_port  # noqa: E402
from xdelab.lab import Lab  # noqa: E402

# The baselines: a program of each type that does nothing, run the same way.
EMPTY = """
int xdp_empty(struct xdp_md *ctx) { return 2; /* XDP_PASS */ }
int tc_empty(struct __sk_buff *skb) { return 0; /* TC_ACT_OK */ }
"""


@contextlib.contextmanager
def lab(letter, prefix=None):
    """A lab of the bench's own (prefix x<letter><3 hex>-, or the one
    given), with sled1's next hops resolved (the common case), always torn
    down."""
    assert os.geteuid() == 0, "run as root"
    lab = Lab(prefix or f"x{letter}{secrets.token_hex(2)[:3]}-")
    assert not lab.is_up(), f"a lab {lab.prefix} is already up"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            lab.up()
        for i in (1, 2):
            lab.run("sled1", "ping", "-6", "-c", "1", "-W", "1", f"fd10:1:{i}::2",
                    capture_output=True)
        yield lab
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            lab.down(quiet=True)


class Programs:
    """sled1's pinned programs and the empty ones, for BPF_PROG_TEST_RUN
    inside sled1's namespace (tc_port_out finds its port by the ctx's
    ifindex, resolved there)."""

    def __init__(self, lab, port="xde0"):
        self.lab = lab
        self.root = lab.root("sled1")
        with lab.inside("sled1"):
            dp = Datapath(self.root)
            try:
                self.port, _ = find_port(dp.maps(), port)
            finally:
                dp.close()
        self.ctx = libbpf.skb_ctx(self.port)
        self.fds = {p: libbpf.obj_get(f"{self.root}/progs/{p}") for p in ("xdp_underlay", "tc_port_out")}
        from bcc import BPF
        self.bpf = BPF(text=EMPTY)
        self.fds["xdp_empty"] = self.bpf.load_func("xdp_empty", BPF.XDP).fd
        self.fds["tc_empty"] = self.bpf.load_func("tc_empty", BPF.SCHED_CLS).fd

    @staticmethod
    def empty_of(prog):
        return "xdp_empty" if prog.startswith("xdp") else "tc_empty"

    def run(self, prog, frame, repeat=1):
        """(retval, output frame, ns per run); call inside sled1 for many."""
        ctx = self.ctx if prog.startswith("tc_") else None
        return libbpf.test_run(self.fds[prog], frame, repeat, ctx)

    def run_in(self, prog, frame, repeat=1):
        with self.lab.inside("sled1"):
            return self.run(prog, frame, repeat)

    def stats(self):
        """xde0's counters, as `xdectl stats` names them."""
        with self.lab.inside("sled1"):
            dp = Datapath(self.root)
            try:
                return counters.port_counts(dp.maps(), self.port).flat()
            finally:
                dp.close()

    def close(self):
        for name in ("xdp_underlay", "tc_port_out"):
            os.close(self.fds[name])
        self.bpf.cleanup()


def write_result(out, doc):
    """The bench's JSON, with the machine and the command that made it."""
    doc = {"kernel": platform.release(), "cpus": os.cpu_count(),
           "command": " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
           **doc}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out
