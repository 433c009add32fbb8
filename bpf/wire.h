/* What travels on the wire: the kernel's protocol headers, the Geneve
 * header and options as RFC 8926 and Oxide define them, ARP for IPv4, and
 * the constants of xde's encapsulation. */
#ifndef XDE_WIRE_H
#define XDE_WIRE_H

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
#define GENEVE_MAX_OPTS 63        /* options fit in 63 words: loop bound */
#define OUTER_HOP_LIMIT 128       /* what OPTE sends */
#define ENCAP_LEN (14 + 40 + 8 + 8) /* outer Ethernet, IPv6, UDP, Geneve (no options) */
/* Inner destination MAC of frames for boundary services (Oxide's). */
#define BSVC_MAC { 0xA8, 0x40, 0x25, 0x77, 0x77, 0x77 }

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

#endif
