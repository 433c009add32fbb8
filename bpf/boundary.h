/* Boundary services (docs/design.md, "Boundary services"): where the VPCs
 * meet the outside. A boundary host has its own root, with its underlay
 * NICs and one external NIC. Geneve from the sleds in the boundary VNI is
 * decapsulated and its packet handed to the host's kernel, which routes it
 * out of the external NIC (xdp_boundary.c); a packet from outside for an
 * external address and port in the NAT table is encapsulated toward the
 * sled of the guest that owns them, with Oxide's External option
 * (tc_boundary.c). Here: the boundary's configuration, its NAT table, its
 * counters (its own lists, apart from a sled's) and the encapsulation. */
#ifndef XDE_BOUNDARY_H
#define XDE_BOUNDARY_H

#include "pin.h"
#include "pkt.h"
#include "fib.h"
#include "encap.h"

/* One entry: boundary services are up on this root while `up` is 1. */
struct bsvc_cfg {
	__u32 up;
	__u32 vni;                /* the boundary VNI: what the sleds send to it in */
	__u8 underlay_addr[16];   /* the boundary's underlay address */
	__u32 underlay[2];        /* ifindexes of the underlay NICs (0: none) */
	__u32 external;           /* ifindex of the external NIC */
	__u32 sw_csum;            /* bit i: xdectl turned tx checksum offload off on underlay[i] */
	__u32 hash_seed;          /* keys the flow hash (outer flow label and UDP source port) */
};
XDE_MAP("array", u32, struct bsvc_cfg, bsvc_cfg, 1);

/* The NAT table: which guest owns an external address, or one port range
 * of it. An LPM trie over (address, port): a whole address (1:1, floating
 * and ephemeral IPs) is a /128 entry, a port range (SNAT) the few prefixes
 * of the port space that tile it (xdectl/boundary.py). Ranges of one
 * address never overlap, so a lookup finds at most one. */
#define BSVC_KEY_BITS 144         /* address and port: what a lookup gives */
struct bsvc_nat_key {
	__u32 prefixlen;          /* 128: the whole address; 128 + n: a port prefix of n bits */
	__u8 addr[16];            /* the external address, IPv4 mapped (pkt.h) */
	__be16 port;
	__u8 pad[2];
};
struct bsvc_nat_val {
	__u8 underlay[16];        /* the underlay address of the guest's sled */
	__u32 vni;                /* the guest's VPC */
	__u8 mac[6];              /* the guest's MAC: the inner destination */
	__u16 start;              /* the entry's port range as set (host order); 0-0: the whole address */
	__u16 end;
	__u8 pad[2];
};
XDE_MAP_F("lpm_trie", struct bsvc_nat_key, struct bsvc_nat_val, bsvc_nat, 65536,
	  BPF_F_NO_PREALLOC);

/* Counters: events, and drops by reason (the boundary drops only through
 * bsvc_xdp_drop() and bsvc_tc_drop(); docs/design.md lists the reasons). */
#define BSVC_EVENTS(X) \
	X(decap) X(decap_bytes) X(encap) X(encap_bytes) \
	X(underlay_passed) X(external_passed) \
	X(route_cache_hits) X(route_cache_misses) X(neigh_unresolved)

#define BSVC_DROP_REASONS(X) \
	X(malformed_truncated)       /* Geneve datagram shorter than its headers or lengths */ \
	X(malformed_version)         /* Geneve version is not 0 */ \
	X(malformed_options)         /* Geneve options overrun their area or the datagram */ \
	X(malformed_critical_option) /* a critical Geneve option xde does not know */ \
	X(malformed_protocol)        /* Geneve payload is not Ethernet */ \
	X(malformed_inner)           /* no room for the inner Ethernet header */ \
	X(wrong_vni)                 /* Geneve for the boundary in another VNI than its own */ \
	X(not_ip)                    /* the inner frame is neither IPv4 nor IPv6 */ \
	X(malformed_ipv4)            /* inner IPv4 header inconsistent with itself or the frame */ \
	X(malformed_ipv6)            /* inner IPv6 header cut short */ \
	X(not_external)              /* decapsulated, but not routed out of the external NIC */ \
	X(to_underlay)               /* from the external link toward an underlay NIC, in no NAT entry */ \
	X(underlay_unreachable)      /* the kernel's FIB has no route to the sled */ \
	X(mtu)                       /* too big for the underlay once encapsulated */ \
	X(store_failed)              /* bpf_skb_store_bytes failed */ \
	X(resize_failed)             /* growing or shrinking the frame failed */

#define BSVC_FIELD(n) __u64 n;
struct bsvc_drops { BSVC_DROP_REASONS(BSVC_FIELD) };
struct bsvc_stats {
	BSVC_EVENTS(BSVC_FIELD)
	struct bsvc_drops drop;
};
#undef BSVC_FIELD
#define BSVC_EV_INDEX(n) BSVC_EV_##n,
enum bsvc_event { BSVC_EVENTS(BSVC_EV_INDEX) BSVC_EV_MAX };
#undef BSVC_EV_INDEX
#define BSVC_DROP_INDEX(n) BSVC_DROP_##n,
enum bsvc_drop { BSVC_DROP_REASONS(BSVC_DROP_INDEX) BSVC_DROP_MAX };
#undef BSVC_DROP_INDEX
XDE_MAP("percpu_array", u32, struct bsvc_stats, bsvc_stats, 1);

/* The NIC the host's routes send p out of, as bpf_fib_lookup finds it from
 * in_ifindex (0: none, or this host itself). What boundary services let
 * through depends on it: from the sleds only out of the external NIC, so
 * that a guest's traffic never reaches the underlay, another sled, or the
 * boundary host; from outside never toward an underlay NIC. */
static __always_inline __u32 bsvc_route_out(void *ctx, __u32 in_ifindex, struct pkt *p,
					    struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = in_ifindex;
	if (addr_v4mapped(p->dst)) {
		fib->family = 2;          /* AF_INET */
		fib->ipv4_src = p->src[3];
		fib->ipv4_dst = p->dst[3];
	} else {
		fib->family = 10;         /* AF_INET6 */
		__builtin_memcpy(fib->ipv6_src, p->src, 16);
		__builtin_memcpy(fib->ipv6_dst, p->dst, 16);
	}
	int rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ? fib->ifindex : 0;
}

static __always_inline struct bsvc_cfg *bsvc_config(void)
{
	__u32 k = 0;
	return bsvc_cfg.lookup(&k);
}

static __always_inline void bsvc_count(enum bsvc_event e, __u64 n)
{
	__u32 k = 0;
	struct bsvc_stats *s = bsvc_stats.lookup(&k);
	if (s)
		((__u64 *)s)[e] += n;
}

static __always_inline void bsvc_count_drop(enum bsvc_drop why)
{
	__u32 k = 0;
	struct bsvc_stats *s = bsvc_stats.lookup(&k);
	if (s)
		((__u64 *)&s->drop)[why] += 1;
}

static __always_inline int bsvc_tc_drop(enum bsvc_drop why)
{
	bsvc_count_drop(why);
	return TC_ACT_SHOT;
}

static __always_inline int bsvc_xdp_drop(enum bsvc_drop why)
{
	bsvc_count_drop(why);
	return XDP_DROP;
}

/* geneve_parse_at()'s reason (geneve.h) in the boundary's list. */
static __always_inline enum bsvc_drop bsvc_geneve_reason(__u32 rc)
{
	switch (rc) {
	case DROP_malformed_truncated:
		return BSVC_DROP_malformed_truncated;
	case DROP_malformed_version:
		return BSVC_DROP_malformed_version;
	case DROP_malformed_options:
		return BSVC_DROP_malformed_options;
	case DROP_malformed_critical_option:
		return BSVC_DROP_malformed_critical_option;
	case DROP_malformed_protocol:
		return BSVC_DROP_malformed_protocol;
	default:
		return BSVC_DROP_malformed_inner;
	}
}

/* The port a packet from outside is for, in network order (0: none). TCP
 * and UDP: the destination port; ICMP and ICMPv6 echo: the identifier (set
 * by pkt_l4 in both); an ICMP error: the source port, or echo identifier,
 * of the packet it quotes, which the guest sent from that address. l4: the
 * L4 header's offset in the frame. */
static __always_inline __be16 bsvc_port(struct __sk_buff *skb, struct pkt *p, __u32 l4)
{
	__u32 quoted, qproto_off, qhlen = 0;
	int v4 = p->proto == IPPROTO_ICMP;
	if (v4 && (p->icmp_type == ICMP_DEST_UNREACH || p->icmp_type == ICMP_TIME_EXCEEDED ||
		   p->icmp_type == ICMP_PARAMETERPROB)) {
		__u8 vihl;
		quoted = l4 + sizeof(struct icmphdr);
		if (bpf_skb_load_bytes(skb, quoted, &vihl, 1) < 0)
			return 0;
		qhlen = (vihl & 0xf) * 4;
		qproto_off = quoted + __builtin_offsetof(struct iphdr, protocol);
	} else if (p->proto == IPPROTO_ICMPV6 && p->icmp_type >= ICMPV6_DEST_UNREACH &&
		   p->icmp_type <= ICMPV6_PARAMPROB) {
		quoted = l4 + 8;
		qhlen = sizeof(struct ipv6hdr);  /* quoted extension headers are not walked */
		qproto_off = quoted + __builtin_offsetof(struct ipv6hdr, nexthdr);
	} else {
		return p->dport;
	}
	__u8 qproto;
	__be16 q[3];              /* the quoted L4 header's first 6 bytes */
	if (qhlen < sizeof(struct iphdr) || bpf_skb_load_bytes(skb, qproto_off, &qproto, 1) < 0 ||
	    bpf_skb_load_bytes(skb, quoted + (qhlen & 0x7c), q, sizeof(q)) < 0)
		return 0;
	if (qproto == IPPROTO_TCP || qproto == IPPROTO_UDP)
		return q[0];          /* the source port */
	if (qproto == IPPROTO_ICMP || qproto == IPPROTO_ICMPV6)
		return q[2];          /* the identifier of a quoted echo request */
	return 0;
}

static __always_inline struct bsvc_nat_val *bsvc_nat_lookup(const __be32 *addr, __be16 port)
{
	struct bsvc_nat_key k = { .prefixlen = BSVC_KEY_BITS, .port = port };
	__builtin_memcpy(k.addr, addr, 16);
	return bsvc_nat.lookup(&k);
}

/* Pushed in front of the packet, in one store: outer Ethernet, IPv6, UDP,
 * Geneve with one option (External, no body), and the inner Ethernet
 * header, after the room bpf_skb_adjust_room opens behind the frame's own. */
#define BSVC_ENCAP_LEN (ENCAP_LEN + 4)
struct bsvc_hdrs {
	struct ethhdr eth;
	struct ipv6hdr ip6;
	struct udphdr udp;
	struct geneve_hdr gnv;
	struct geneve_opt opt;
	struct ethhdr inner;
} __attribute__((packed));

/* Encapsulate the packet from outside toward the sled of NAT entry e and
 * send it out of the underlay NIC the kernel's routes choose (ECMP by the
 * flow's hash; the route cache of fib.h keeps the answer 100 ms). */
static __always_inline int bsvc_encap(struct __sk_buff *skb, struct bsvc_cfg *cfg,
				      struct bsvc_nat_val *e, struct pkt *p, __u8 tos,
				      __be16 proto)
{
	struct bsvc_hdrs h = {};
	__u8 bmac[ETH_ALEN] = BSVC_MAC;
	__builtin_memcpy(h.inner.h_dest, e->mac, ETH_ALEN);
	__builtin_memcpy(h.inner.h_source, bmac, ETH_ALEN);
	h.inner.h_proto = proto;
	__u8 dst[16];
	__builtin_memcpy(dst, e->underlay, 16);
	__u32 vni = e->vni;

	__u32 hash = flow_hash(p, cfg->hash_seed);
	__u32 label = flow_label(hash);
	__u32 inner_len = skb->len;
	if (bpf_skb_adjust_room(skb, BSVC_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
				BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN) | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) < 0)
		return bsvc_tc_drop(BSVC_DROP_resize_failed);

	__u16 l4len = inner_len + sizeof(struct udphdr) + sizeof(struct geneve_hdr) +
		      sizeof(struct geneve_opt);
	*(__be32 *)&h.ip6 = bpf_htonl((6U << 28) | ((__u32)tos << 20) | label);
	h.ip6.payload_len = bpf_htons(l4len);
	h.ip6.nexthdr = IPPROTO_UDP;
	h.ip6.hop_limit = OUTER_HOP_LIMIT;
	__builtin_memcpy(&h.ip6.saddr, cfg->underlay_addr, 16);
	__builtin_memcpy(&h.ip6.daddr, dst, 16);
	h.udp.source = bpf_htons(0xC000 | ((hash >> 16) & 0x3FFF));
	h.udp.dest = bpf_htons(GENEVE_PORT);
	h.udp.len = bpf_htons(l4len);
	h.udp.check = 0;
	h.gnv.ver_optlen = sizeof(struct geneve_opt) / 4;
	h.gnv.proto = bpf_htons(GENEVE_PROTO_ETH);
	h.gnv.vni[0] = vni >> 16;
	h.gnv.vni[1] = vni >> 8;
	h.gnv.vni[2] = vni;
	h.opt.cls = bpf_htons(GENEVE_OPT_CLASS_OXIDE);
	h.opt.type = GENEVE_OPT_EXTERNAL;
	h.eth.h_proto = bpf_htons(ETH_P_IPV6);

	__u64 now = xde_now();
	struct route_cache_val *rc = route_cache_get(dst, hash, now);
	if (rc) {
		__u32 out = rc->ifindex;
		__builtin_memcpy(h.eth.h_dest, rc->dmac, ETH_ALEN);
		__builtin_memcpy(h.eth.h_source, rc->smac, ETH_ALEN);
		if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0) < 0)
			return bsvc_tc_drop(BSVC_DROP_store_failed);
		bsvc_count(BSVC_EV_route_cache_hits, 1);
		bsvc_count(BSVC_EV_encap, 1);
		bsvc_count(BSVC_EV_encap_bytes, inner_len);
		return bpf_redirect(out, 0);
	}
	bsvc_count(BSVC_EV_route_cache_misses, 1);

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	fib.ifindex = skb->ifindex;
	fib.l4_protocol = IPPROTO_UDP;
	fib.sport = h.udp.source;
	fib.dport = h.udp.dest;
	fib.flowinfo = bpf_htonl(label);
	fib.tot_len = skb->gso_size ? 0 : l4len + sizeof(struct ipv6hdr);
	__builtin_memcpy(fib.ipv6_src, cfg->underlay_addr, 16);
	__builtin_memcpy(fib.ipv6_dst, dst, 16);
	int ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return bsvc_tc_drop(BSVC_DROP_mtu);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return bsvc_tc_drop(BSVC_DROP_underlay_unreachable);
	if (ret == BPF_FIB_LKUP_RET_SUCCESS) {
		route_cache_put(dst, hash, &fib, now);
		__builtin_memcpy(h.eth.h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(h.eth.h_source, fib.smac, ETH_ALEN);
	}
	if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0) < 0)
		return bsvc_tc_drop(BSVC_DROP_store_failed);
	bsvc_count(BSVC_EV_encap, 1);
	bsvc_count(BSVC_EV_encap_bytes, inner_len);
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* the kernel resolves the next hop the FIB chose, and sends */
		bsvc_count(BSVC_EV_neigh_unresolved, 1);
		struct bpf_redir_neigh nh = { .nh_family = AF_INET6 };
		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
		return redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	return bpf_redirect(fib.ifindex, 0);
}

#endif
