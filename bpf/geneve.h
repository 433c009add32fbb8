/* Inbound Geneve: is this frame for us, and is it well formed?
 * (docs/design.md, "Inbound pipeline", steps 1 and 2.) */
#ifndef XDE_GENEVE_H
#define XDE_GENEVE_H

#include "config.h"
#include "counters.h"

/* geneve_parse() returns a drop reason (< DROP_MAX) or one of these */
#define GENEVE_OK DROP_MAX
#define NOT_FOR_US (DROP_MAX + 1)

struct geneve_rx {
	__u32 vni;
	__u32 outer_len;          /* bytes before the inner Ethernet header */
	__u32 external;           /* Oxide "External" option present */
	__u32 trim;               /* bytes after the UDP datagram (padding), to cut */
};

/* Frames that are not IPv6/UDP to port 6081 at the underlay address addr
 * return NOT_FOR_US: the host stack gets them untouched. Geneve for us
 * returns GENEVE_OK with rx filled in, or the DROP_malformed_* reason why
 * not. */
static __always_inline __u32 geneve_parse_at(struct xdp_md *ctx, const __u8 *addr,
					   struct geneve_rx *rx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6) ||
	    ip6->nexthdr != IPPROTO_UDP || udp->dest != bpf_htons(GENEVE_PORT) ||
	    !addr6_eq(&ip6->daddr, addr))
		return NOT_FOR_US;

	struct geneve_hdr *g = (void *)(udp + 1);
	__u32 avail = data_end - (void *)udp;
	__u32 ulen = bpf_ntohs(udp->len);
	if ((void *)(g + 1) > data_end || bpf_ntohs(ip6->payload_len) > avail ||
	    ulen > bpf_ntohs(ip6->payload_len) || ulen < sizeof(*udp) + sizeof(*g))
		return DROP_malformed_truncated;
	/* everything below is judged against the end of the UDP datagram */
	__u32 glen = ulen - sizeof(*udp);
	if (g->ver_optlen >> 6)
		return DROP_malformed_version;
	if (g->proto != bpf_htons(GENEVE_PROTO_ETH))
		return DROP_malformed_protocol;

	__u32 optlen = (g->ver_optlen & 0x3f) * 4;
	__u32 off = 0;
	rx->external = 0;
	for (int i = 0; i < GENEVE_MAX_OPTS; i++) {
		if (off >= optlen)
			break;
		struct geneve_opt *o = (void *)(g + 1) + off;
		if ((void *)(o + 1) > data_end || sizeof(*g) + off + sizeof(*o) > glen)
			return DROP_malformed_options;
		__u32 body = (o->len & 0x1f) * 4;
		/* past the options area, or past the packet */
		if (off + sizeof(*o) + body > optlen ||
		    sizeof(*g) + off + sizeof(*o) + body > glen)
			return DROP_malformed_options;
		if (o->cls == bpf_htons(GENEVE_OPT_CLASS_OXIDE)) {
			__u8 t = o->type & 0x7f;
			if (t == GENEVE_OPT_EXTERNAL)
				rx->external = 1;
			else if (t != GENEVE_OPT_MULTICAST && t != GENEVE_OPT_MSS &&
				 (o->type & GENEVE_OPT_CRITICAL))
				return DROP_malformed_critical_option;
		} else if (o->type & GENEVE_OPT_CRITICAL) {
			return DROP_malformed_critical_option;
		}
		off += sizeof(*o) + body;
	}
	if (off != optlen)
		return DROP_malformed_options;

	rx->outer_len = sizeof(*eth) + sizeof(*ip6) + sizeof(*udp) + sizeof(*g) + optlen;
	if (sizeof(*g) + optlen + sizeof(struct ethhdr) > glen)
		return DROP_malformed_inner;
	rx->trim = avail - ulen;
	rx->vni = (g->vni[0] << 16) | (g->vni[1] << 8) | g->vni[2];
	return GENEVE_OK;
}

/* Geneve for this root's underlay address (a sled's). */
static __always_inline __u32 geneve_parse(struct xdp_md *ctx, struct xde_cfg *cfg,
					struct geneve_rx *rx)
{
	return geneve_parse_at(ctx, cfg->underlay_addr, rx);
}

#endif
