"""Reference model of the xde datapath (docs/design.md) and the harness that
compares it with the real programs (BPF_PROG_TEST_RUN)."""
