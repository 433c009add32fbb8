"""BPF_PROG_TEST_RUN on a lab sled's pinned programs, with the product's
own ctx definitions (xdectl.libbpf): the one runner the tests share."""
import os

from xdectl import libbpf


class ProgRun:
    def __init__(self, lab, sled):
        self.lab, self.sled = lab, sled
        self.progs = f"{lab.root(sled)}/progs"

    def run(self, prog, frame, ifindex=None, repeat=1):
        """(retval, output frame, ns per run) of one run of the pinned
        program `prog`; a tc_* program sees the frame entering ifindex."""
        ctx = libbpf.skb_ctx(ifindex) if prog.startswith("tc_") else None
        with self.lab.inside(self.sled):
            fd = libbpf.obj_get(f"{self.progs}/{prog}")
            try:
                return libbpf.test_run(fd, bytes(frame), repeat=repeat, ctx=ctx)
            finally:
                os.close(fd)
