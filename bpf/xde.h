/* Types and constants shared by the underlay (XDP) and port (TC) programs.
 *
 * Every map key and value is declared here, once: xdectl reads the ctypes
 * types bcc derives from these declarations, it never redeclares them.
 * Change a struct or a map and XDE_LAYOUT changes with it (xdectl hashes
 * this file and maps.h), so an old pinned instance is refused, not misread.
 */
#ifndef XDE_H
#define XDE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_arp.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/in.h>

#define GENEVE_PORT 6081
#define GENEVE_PROTO_ETH 0x6558
#define GENEVE_OPT_CLASS_OXIDE 0x0129
#define GENEVE_OPT_EXTERNAL 0x00
#define GENEVE_OPT_MULTICAST 0x01
#define GENEVE_OPT_MSS 0x02
#define GENEVE_OPT_CRITICAL 0x80
#define OUTER_HOP_LIMIT 128       /* what OPTE sends */
#define XDE_MAX_PASSTHROUGH 16    /* passthrough ports per root (clone loop bound) */
#define GENEVE_MAX_OPTS 63        /* options fit in 63 words: loop bound */
#define ENCAP_LEN (14 + 40 + 8 + 8) /* outer Ethernet, IPv6, UDP, Geneve (no options) */
#define BSVC_MAC { 0xA8, 0x40, 0x25, 0x77, 0x77, 0x77 }

/* Port flags. */
#define PORT_F_PASSTHROUGH 1

/* Byte comparisons, unrolled: clang may turn __builtin_memcmp into a call
 * to memcmp, which BPF does not have. */
static __always_inline int bytes_eq(const void *a, const void *b, const int n)
{
	const __u8 *x = a, *y = b;
#pragma unroll
	for (int i = 0; i < n; i++)
		if (x[i] != y[i])
			return 0;
	return 1;
}
#define mac_eq(a, b) bytes_eq(a, b, 6)
#define addr6_eq(a, b) bytes_eq(a, b, 16)

/* Key of the one-entry instance config array. */
#define CFG_KEY 0

/* Instance-wide settings: one root's ports share one underlay pair and one
 * underlay source address (docs/design.md, "Ports and roots"). */
struct xde_cfg {
	__u32 u1;                 /* ifindex of underlay 1, 0 while no port */
	__u32 u2;
	__u8 underlay_addr[16];   /* this host's underlay IPv6 address */
	__u32 nports;
	/* flow-table timeouts in seconds (OPTE's defaults; settable) */
	__u32 ttl_idle;           /* non-TCP flows: idle expiry */
	__u32 ttl_tcp_handshake;
	__u32 ttl_tcp_established;
	__u32 ttl_tcp_closed;     /* after FIN from both sides or RST (TIME_WAIT) */
	char pending[16];         /* port being created: what a killed create leaves */
	__u32 sw_csum;            /* bit i: xdectl turned tx checksum offload off on underlay i+1 */
};

/* One port, keyed by the ifindex of the veth end the datapath owns. */
struct geneve_hdr {
	__u8 ver_optlen;          /* version (2 bits), option length in words (6) */
	__u8 flags;               /* O, C */
	__be16 proto;
	__u8 vni[3];
	__u8 rsvd;
};

struct geneve_opt {
	__be16 cls;
	__u8 type;                /* high bit: critical */
	__u8 len;                 /* low 5 bits: body length in words */
};

struct arp_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__be32 spa;
	__u8 tha[6];
	__be32 tpa;
} __attribute__((packed));

struct port_cfg {
	__u32 ifindex;            /* datapath end (TC ingress is attached here) */
	__u32 flags;              /* PORT_F_* */
	__u32 vni;
	__u32 bsvc_vni;
	__u8 mac[6];              /* guest MAC */
	__u8 gw_mac[6];           /* virtual gateway MAC */
	__be32 ip;                /* guest IPv4 */
	__be32 gw_ip;             /* virtual gateway IPv4 */
	__be32 subnet;            /* VPC subnet, network byte order */
	__u32 subnet_len;
	__u8 bsvc_addr[16];       /* boundary services underlay address */
	__u32 mtu;                /* guest-facing MTU */
	char name[16];            /* guest-facing interface name */
	char peer[16];            /* datapath end interface name */
};

/* Inbound port lookup: (VNI, destination MAC) -> datapath end ifindex.
 * Passthrough ports are indexed with VNI_PASSTHROUGH, outside the 24 bits. */
#define VNI_PASSTHROUGH 0xffffffff
struct port_key {
	__u32 vni;
	__u8 mac[6];
	__u8 pad[2];
};

/* Counters. One list, expanded into the per-port struct (whose field names
 * xdectl reads through bcc) and into the index enum the programs use. */
#define XDE_PORT_COUNTERS(X) \
	X(rx_packets) X(rx_bytes) X(tx_packets) X(tx_bytes) \
	X(passthrough_out) X(passthrough_in) \
	X(encap) X(decap) X(arp_replies) X(icmp_replies) \
	X(drop_spoof) X(drop_no_route) X(drop_no_v2p) X(drop_firewall) \
	X(drop_router) X(drop_arp) X(drop_mtu) X(drop_unsupported) \
	X(drop_no_underlay) X(drop_underlay_unreachable) X(drop_no_port_local) \
	X(underlay_detours) \
	X(mtu_icmp_sent) X(flow_hits) X(flow_misses) X(flow_reevaluated) \
	X(fw_allowed) X(fw_denied)

#define XDE_GLOBAL_COUNTERS(X) \
	X(passed_to_host) X(drop_no_port) X(drop_arp_in_geneve) \
	X(malformed_truncated) X(malformed_version) X(malformed_options) \
	X(malformed_critical_option) X(malformed_protocol) X(malformed_inner) \
	X(drop_unknown_port)

#define XDE_FIELD(n) __u64 n;
struct port_stats { XDE_PORT_COUNTERS(XDE_FIELD) };
struct global_stats { XDE_GLOBAL_COUNTERS(XDE_FIELD) };
#undef XDE_FIELD

#define XDE_PINDEX(n) P_##n,
#define XDE_GINDEX(n) G_##n,
enum port_counter { XDE_PORT_COUNTERS(XDE_PINDEX) P_MAX };
enum global_counter { XDE_GLOBAL_COUNTERS(XDE_GINDEX) G_MAX };
#undef XDE_PINDEX
#undef XDE_GINDEX

/* Overlay: virtual-to-physical mapping, (VNI, guest IP) -> (MAC, host). */
struct v2p_key {
	__u32 vni;
	__be32 ip;
};
struct v2p_val {
	__u8 mac[6];
	__u8 pad[2];
	__u8 underlay[16];
};

/* Router: one LPM trie for all ports; the port's ifindex leads the key so
 * each port has its own table. System entries (made by create) live in a
 * second trie so that a custom entry of the same length wins over them
 * without erasing them (OPTE's priority rule). */
enum route_target { RT_DROP = 1, RT_IG = 2, RT_IP4 = 3, RT_SUB4 = 4 };
struct route_key {
	__u32 prefixlen;          /* 32 (port) + IPv4 prefix length */
	__u32 port;
	__be32 ip;
};
struct route_val {
	__u32 target;             /* enum route_target */
	__be32 addr;              /* RT_IP4: next hop; RT_SUB4: subnet address */
	__u32 len;                /* RT_SUB4: subnet prefix length */
	__u32 plen;               /* this entry's own prefix length (picks the longer of two tries) */
};

/* Firewall (docs/design.md, "Firewall and flow table"): rules per port and direction, kept
 * sorted by priority in one map value, so that set-fw-rules replaces a
 * whole rule set with one atomic update. */
#ifndef FW_MAX_RULES
#define FW_MAX_RULES 1024
#endif
#define FW_MAX_PORTS 8            /* ports listed in one rule */
enum fw_dir { DIR_OUT = 0, DIR_IN = 1 };
enum fw_action { FW_ALLOW = 1, FW_DENY = 2 };
#define FW_PROTO_ANY 0
#define FW_PROTO_ARP 0xfe          /* never matches here: ARP stops at the gateway */

/* A rule as value/mask pairs, so that matching is arithmetic without
 * branches: the verifier walks the rule loop 1,024 times and gives up on
 * a loop with many branches per turn (xdectl fills in the masks). */
struct fw_rule {
	__u32 id;
	__u16 priority;
	__u8 action;              /* enum fw_action */
	__u8 proto;               /* FW_PROTO_ANY, IPPROTO_*, FW_PROTO_ARP */
	__be32 host;              /* ip=/subnet=: the remote address ... */
	__be32 host_mask;         /* ... and its mask (0: any host) */
	__u32 vni;                /* vni=: the VNI ... */
	__u32 vni_mask;           /* ... 0xffffffff, or 0: any */
	__u16 icmp;               /* type << 8 | code ... */
	__u16 icmp_mask;          /* ... 0xff00: type only, 0xffff: both, 0: any */
	__u16 nports;             /* 0: any port */
	__u16 ports[FW_MAX_PORTS];/* unused slots 0, never a real port */
	__u16 pad;
};

struct fw_key {
	__u32 port;
	__u32 dir;
};

struct fw_rules {
	__u32 count;
	__u32 pad;
	struct fw_rule r[FW_MAX_RULES];
};

/* Flow table (OPTE's UFT): one entry per direction of a flow. */
struct flow_key {
	__u32 port;
	__u8 dir;
	__u8 proto;
	__be16 sport;             /* ICMP echo: the identifier, in both */
	__be32 src;
	__be32 dst;
	__be16 dport;
	__u16 pad;
};

enum tcp_state { TCP_NONE = 0, TCP_SYN_SENT, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_CLOSED };

struct flow_val {
	__u64 created_ns;
	__u64 last_ns;
	__u64 packets;
	__u64 bytes;
	__u32 epoch;              /* the port's epoch when the verdict was cached */
	__u32 rule;               /* id of the rule that decided, 0: the default */
	__u32 vni;                /* the VNI the first packet was judged in (VNI_NONE: external) */
	__u8 origin;              /* direction of the flow's first packet */
	__u8 state;               /* enum tcp_state, shared by both entries' views */
	__u8 fin;                 /* bit per direction that sent FIN */
	__u8 pad;
};

/* What the firewall looks at, read once from the packet. */
struct pkt4 {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
};

/* A rule evaluation handed to the eval program by tail call, and its answer
 * handed back the same way (see fw.h). */
enum fw_job_state { JOB_IDLE = 0, JOB_PENDING = 1, JOB_DONE = 2 };
struct fw_job {
	struct pkt4 p;
	__u32 port;
	__u32 dir;
	__u32 vni;
	__u32 state;              /* enum fw_job_state */
	__u32 action;             /* the answer: enum fw_action, 0 when no rule matched */
	__u32 rule_id;
};

/* Next hops seen resolved, per (underlay destination, egress NIC): when the
 * FIB picks a next hop whose neighbour is not resolved (a link that has
 * just come back), the frame takes the other underlay's instead (fib.h). */
struct nh_key {
	__u8 dst[16];
	__u32 ifindex;
};
struct nh_val {
	__u8 dmac[6];
	__u8 smac[6];
	__u64 seen_ns;            /* last time the FIB gave this next hop resolved */
	__u64 kick_ns;            /* last time a frame went to it unresolved */
};

/* Per-CPU scratch space: what does not fit the 512-byte BPF stack once every
 * layer is inlined, and what passes between programs across a tail call
 * (a program and the one it tail-calls run on one CPU without a break). */
#define ICMP_QUOTE_MAX 68         /* largest IPv4 header (60) + 8 bytes */
struct scratch {
	struct bpf_fib_lookup fib;
	__u8 quote[ICMP_QUOTE_MAX];
	struct fw_job job;
};

/* Slots of the tail-call program arrays. */
enum { PROG_MAIN = 0, PROG_FW_EVAL = 1 };

/* Metadata xdectl stores when it loads an instance: the layout hash and the
 * bcc type descriptions of every map, so that later calls open the pins
 * without compiling anything. */
#define XDE_META_TYPES 16384
struct xde_meta {
	char layout[72];
	__u32 types_len;
	char types[XDE_META_TYPES];
};

#endif
