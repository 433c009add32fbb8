"""The values the datapath (bpf/) and xdectl must agree on, as the C source
defines them. C is the definition; tests/test_abi.py reads the C headers and
checks every value here against them, so the two cannot drift silently.
(Map layouts need no copy: xdectl takes them from bcc's type descriptions.)"""

# bpf/config.h
PORT_F_PASSTHROUGH = 1              # port_cfg.flags
VNI_PASSTHROUGH = 0xFFFFFFFF        # port_index key of passthrough ports
# bpf/wire.h
ENCAP_LEN = 14 + 40 + 8 + 8         # outer Ethernet, IPv6, UDP, Geneve (no options)
GENEVE_PORT = 6081
GENEVE_PROTO_ETH = 0x6558
GENEVE_OPT_CLASS_OXIDE = 0x0129
RT_DROP, RT_IG, RT_IP4, RT_SUB4 = 1, 2, 3, 4                  # router.h enum route_target
DIR_OUT, DIR_IN = 0, 1                                        # counters.h enum xde_dir
FW_ALLOW, FW_DENY = 1, 2                                      # fw_rules.h enum fw_action
FW_PROTO_ANY, FW_PROTO_ARP = 0, 0xFE
FW_MAX_PORTS = 8                                              # ports listed in one rule
TCP_STATES = ("NONE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT", "CLOSED")  # flow.h enum tcp_state
PROG_MAIN, PROG_FW_EVAL = 0, 1                                # fw_job.h tail-call slots

# bpf/fib.h: underlay_alive() looks up SENTINEL_PREFIX + ifindex
SENTINEL_PREFIX = "fd78:6465:7864::"
