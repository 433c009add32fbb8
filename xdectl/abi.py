"""The values the datapath (bpf/) and xdectl must agree on, as the C source
defines them. C is the definition; tests/test_abi.py reads the C headers and
checks every value here against them, so the two cannot drift silently.
(Map layouts need no copy: xdectl takes them from bcc's type descriptions.)"""

# bpf/config.h
PORT_F_PASSTHROUGH = 1              # port_cfg.flags
PORT_F_IP4 = 2
PORT_F_IP6 = 4
VNI_PASSTHROUGH = 0xFFFFFFFF        # port_index key of passthrough ports
XDE_MAX_PORTS = 1024                # ports a root holds (the ports map's size)
# bpf/wire.h
ENCAP_LEN = 14 + 40 + 8 + 8         # outer Ethernet, IPv6, UDP, Geneve (no options)
GENEVE_PORT = 6081
GENEVE_PROTO_ETH = 0x6558
GENEVE_OPT_CLASS_OXIDE = 0x0129
RT_DROP, RT_IG, RT_IP4, RT_SUB4, RT_IP6, RT_SUB6 = 1, 2, 3, 4, 5, 6  # router.h enum route_target
ROUTE_KEY_BITS = 64                                           # route_key bits before the address
DIR_OUT, DIR_IN = 0, 1                                        # counters.h enum xde_dir
FW_ALLOW, FW_DENY = 1, 2                                      # fw_rules.h enum fw_action
FW_PROTO_ANY, FW_PROTO_ARP = 0, 0xFE
FW_MAX_PORTS = 8                                              # ports listed in one rule
TCP_STATES = ("NONE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT", "CLOSED")  # flow.h enum tcp_state
PROG_MAIN, PROG_FW_EVAL, PROG_GATEWAY, PROG_NAT, PROG_SNAT = 0, 1, 2, 3, 4  # fw_job.h

# bpf/fib.h: underlay_alive() looks up SENTINEL_PREFIX + ifindex
SENTINEL_PREFIX = "fd78:6465:7864::"

# bpf/gw_reply.h: the gateway's reply templates (xdectl/gateway.py builds them)
GW_DHCP4, GW_RA, GW_NA, GW_DHCP6, GW_DHCP6_STATUS = 0, 1, 2, 3, 4   # enum gw_reply
GW_TMPL_MAX = 512                   # longest template frame
GW_ECHO_MAX = 136                   # appended by the datapath: client id (DUID <= 128), Rapid Commit
GW_OFF_IP4_DST = 14 + 16            # frame offsets the datapath fills in
GW_OFF_DHCP4_XID = 14 + 20 + 8 + 4
GW_OFF_DHCP4_FLAGS = 14 + 20 + 8 + 10
GW_OFF_DHCP4_TYPE = 14 + 20 + 8 + 240 + 2
GW_OFF_IP6_DST = 14 + 24
GW_OFF_NA_FLAGS = 14 + 40 + 4
GW_OFF_DHCP6_TYPE = 14 + 40 + 8     # and the transaction id after it, 3 bytes
GW_OFF_DHCP6_IAID = 14 + 40 + 8 + 4 + 14 + 4
