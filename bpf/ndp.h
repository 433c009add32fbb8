/* The gateway's IPv6 neighbour: its address is the EUI-64 link-local of
 * the gateway MAC (port_cfg.gw_ip6). A router solicitation gets the port's
 * router advertisement (gw_reply.h: M set, no prefix, the MTU), a
 * neighbour solicitation for the gateway's address a neighbour
 * advertisement, an echo request to it the reply. Every other neighbour
 * discovery message is dropped, both ways (OPTE's rule). */
#ifndef XDE_NDP_H
#define XDE_NDP_H

#include "config.h"
#include "counters.h"
#include "pkt.h"
#include "gw_reply.h"
#include "gateway.h"

#define NDP_RS 133
#define NDP_NS 135
#define NA_FLAG_SOLICITED 0x40
#define NDP_HOP_LIMIT 255         /* RFC 4861: NDP never crosses a router */

/* Reply of kind to the solicitation from src: unicast back, or to all
 * nodes when it came from the unspecified address (RFC 4861 6.2.6, 7.2.4). */
static __always_inline int ndp_answer(struct __sk_buff *skb, __u32 port, struct port_stats *st,
				      __u32 kind, const __be32 *src)
{
	struct scratch *sc = scratch_get();
	if (!sc)
		return tc_drop(port, DIR_OUT, DROP_no_scratch);
	__u32 len = gw_start(sc, port, kind);
	if (!len)
		return tc_drop(port, DIR_OUT, DROP_ndp);
	__u8 *f = sc->reply;
	if (src[0] | src[1] | src[2] | src[3]) {
		__builtin_memcpy(f + GW_OFF_IP6_DST, src, 16);
	} else {
		__u8 all_nodes[16] = { 0xff, 0x02, [15] = 1 };
		__u8 all_nodes_mac[ETH_ALEN] = { 0x33, 0x33, 0, 0, 0, 1 };
		__builtin_memcpy(f + GW_OFF_IP6_DST, all_nodes, 16);
		__builtin_memcpy(f, all_nodes_mac, ETH_ALEN);
		if (kind == GW_NA)
			f[GW_OFF_NA_FLAGS] &= ~NA_FLAG_SOLICITED;
	}
	return gw_send6(skb, sc, len, port, IPPROTO_ICMPV6, st, P_ndp_replies);
}

/* ICMPv6 from the guest within its link (ip6: the header, l4off: where
 * ICMPv6 starts): answered, or dropped and counted. */
static __always_inline int ndp_serve(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
				     struct port_stats *st, struct ipv6hdr *ip6, struct pkt *p,
				     __u32 l4off)
{
	if (!is_ndp(p))
		return tc_drop(port, DIR_OUT, DROP_link_local);
	if (!(pc->flags & PORT_F_IP6) || ip6->hop_limit != NDP_HOP_LIMIT || p->icmp_code ||
	    (p->fragment & PKT_FRAG_HDR))
		return tc_drop(port, DIR_OUT, DROP_ndp);
	if (p->icmp_type == NDP_RS) {
		return ndp_answer(skb, port, st, GW_RA, p->src);
	}
	if (p->icmp_type == NDP_NS) {
		__be32 target[4];
		__u32 end = ETH_HLEN + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		if (l4off + 8 + 16 > end || bpf_skb_load_bytes(skb, l4off + 8, target, 16) < 0 ||
		    !addr_eq(target, pc->gw_ip6))
			return tc_drop(port, DIR_OUT, DROP_ndp);
		return ndp_answer(skb, port, st, GW_NA, p->src);
	}
	return tc_drop(port, DIR_OUT, DROP_ndp);
}

/* Echo request to the gateway's address: the reply, made in place. */
static __always_inline int gateway_echo6(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
					 struct port_stats *st, struct pkt *p, __u32 l4off)
{
	if (p->icmp_code)
		return tc_drop(port, DIR_OUT, DROP_link_local);
	return echo_in_place(skb, pc, port, st, p->src, p->dst, 16,
			     ETH_HLEN + offsetof(struct ipv6hdr, saddr), l4off,
			     ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY);
}

#endif
