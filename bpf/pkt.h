/* A packet as the firewall and the flow table see it, read once: IPv4 or
 * IPv6. Addresses of both families are 16 bytes: IPv6 as it is, IPv4
 * mapped into ::ffff:0:0/96 (RFC 4291), so that one flow table, one rule
 * format and one V2P table serve both. */
#ifndef XDE_PKT_H
#define XDE_PKT_H

#include "wire.h"

#define IPV6_EXT_MAX 4            /* extension headers walked before the L4 header */
#define PKT_FRAGMENT 1            /* pkt.fragment: a piece of a packet (offset or more to come) */
#define PKT_FRAG_HDR 2            /* pkt.fragment: an IPv6 fragment header, atomic ones too */

struct pkt {
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;             /* ICMP and ICMPv6 echo: the identifier, in both */
	__be16 dport;
	__u8 proto;               /* the L4 protocol, after IPv6 extension headers */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 fragment;            /* PKT_FRAGMENT, PKT_FRAG_HDR */
	__u8 l4_ok;               /* TCP, UDP, ICMP(v6): the header is whole in the packet */
	__u16 l4;                 /* the L4 header's offset from the IP header */
};

static __always_inline void addr_from4(__be32 *a, __be32 v4)
{
	a[0] = 0;
	a[1] = 0;
	a[2] = bpf_htonl(0xffff);
	a[3] = v4;
}

static __always_inline int addr_v4mapped(const __be32 *a)
{
	return !(a[0] | a[1]) && a[2] == bpf_htonl(0xffff);
}

static __always_inline void addr_copy(__be32 *to, const void *from)
{
	__builtin_memcpy(to, from, 16);
}

static __always_inline int addr_eq(const __be32 *a, const __be32 *b)
{
	return !((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]));
}

/* Addresses that never leave the port's link: fe80::/10, ff00::/8 (every
 * multicast scope), and :: and ::1 (unspecified, loopback). */
static __always_inline int ip6_link_scoped(const __be32 *a)
{
	__u32 w = bpf_ntohl(a[0]);
	return (w >> 22) == (0xfe80 >> 6) || (w >> 24) == 0xff ||
	       !(a[0] | a[1] | a[2] | (a[3] & ~bpf_htonl(1)));
}

#define NDP_FIRST 133             /* router solicitation .. */
#define NDP_LAST 137              /* .. redirect */

/* Neighbour discovery (RFC 4861): it never leaves the port's link. */
static __always_inline int is_ndp(struct pkt *p)
{
	return p->proto == IPPROTO_ICMPV6 && p->icmp_type >= NDP_FIRST && p->icmp_type <= NDP_LAST;
}

/* A whole, consistent IPv4 header: version 4, header inside the packet,
 * total length from the header's end to at most the avail bytes there are. */
static __always_inline int ip4_valid(struct iphdr *ip, void *data_end, __u32 avail)
{
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
		return 0;
	__u32 hlen = ip->ihl * 4, tot = bpf_ntohs(ip->tot_len);
	return hlen <= avail && tot >= hlen && tot <= avail;
}

/* A whole IPv6 header whose payload fits the avail bytes there are. */
static __always_inline int ip6_valid(struct ipv6hdr *ip6, void *data_end, __u32 avail)
{
	return (void *)(ip6 + 1) <= data_end && ip6->version == 6 &&
	       sizeof(*ip6) + bpf_ntohs(ip6->payload_len) <= avail;
}

/* Ports, TCP flags, ICMP type and code from the L4 header at l4, of which
 * the IP header says there are len bytes (what follows them is padding). */
static __always_inline void pkt_l4(struct pkt *p, void *l4, void *data_end, __u32 len)
{
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) > data_end || len < sizeof(*t))
			return;
		p->sport = t->source;
		p->dport = t->dest;
		p->tcp_flags = ((__u8 *)t)[13];
		p->l4_ok = 1;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) > data_end || len < sizeof(*u))
			return;
		p->sport = u->source;
		p->dport = u->dest;
		p->l4_ok = 1;
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		struct icmphdr *c = l4;  /* ICMPv6 starts alike: type, code, checksum, id */
		if ((void *)(c + 1) > data_end || len < sizeof(*c))
			return;
		p->icmp_type = c->type;
		p->icmp_code = c->code;
		p->l4_ok = 1;
		int echo = p->proto == IPPROTO_ICMP ?
			c->type == ICMP_ECHO || c->type == ICMP_ECHOREPLY :
			c->type == ICMPV6_ECHO_REQUEST || c->type == ICMPV6_ECHO_REPLY;
		if (echo)
			p->sport = p->dport = c->un.echo.id;  /* a ping's flow is its id */
	}
}

static __always_inline void pkt_clear_l4(struct pkt *p)
{
	p->sport = p->dport = 0;
	p->tcp_flags = p->icmp_type = p->icmp_code = 0;
	p->fragment = 0;
	p->l4_ok = 0;
	p->l4 = 0;
}

/* Fill p from the IPv4 header at ip (ip4_valid); false when it is not a
 * whole header. */
static __always_inline int pkt_parse4(struct iphdr *ip, void *data_end, struct pkt *p)
{
	if ((void *)(ip + 1) > data_end || ip->ihl < 5)
		return 0;
	addr_from4(p->src, ip->saddr);
	addr_from4(p->dst, ip->daddr);
	p->proto = ip->protocol;
	pkt_clear_l4(p);
	p->fragment = ip->frag_off & bpf_htons(0x3fff) ? PKT_FRAGMENT : 0;
	if (ip->frag_off & bpf_htons(0x1fff))
		return 1;                 /* later fragments carry no L4 header */
	__u32 hlen = ip->ihl * 4, tot = bpf_ntohs(ip->tot_len);
	p->l4 = hlen;
	pkt_l4(p, (void *)ip + hlen, data_end, tot > hlen ? tot - hlen : 0);
	return 1;
}

/* Fill p from the IPv6 header at ip6 (ip6_valid), past up to IPV6_EXT_MAX
 * extension headers (hop-by-hop, routing, fragment, destination options).
 * Returns the L4 header's offset from ip6, or 0 when the headers overrun
 * the payload length, there are more of them, or an address is
 * IPv4-mapped. Four extension headers end before byte 8232: the mask that
 * bounds their offsets for the verifier never cuts one. */
static __always_inline __u32 pkt_parse6(struct ipv6hdr *ip6, void *data_end, struct pkt *p)
{
	if ((void *)(ip6 + 1) > data_end)
		return 0;
	addr_copy(p->src, &ip6->saddr);
	addr_copy(p->dst, &ip6->daddr);
	/* IPv4-mapped addresses never appear on the wire (RFC 4291 2.5.5.2);
	 * here they would pass for IPv4 ones in rules, routes and V2P */
	if (addr_v4mapped(p->src) || addr_v4mapped(p->dst))
		return 0;
	pkt_clear_l4(p);
	__u8 nh = ip6->nexthdr;
	__u32 off = sizeof(*ip6), end = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	int later_fragment = 0;
#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX + 1; i++) {
		if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_FRAGMENT &&
		    nh != IPPROTO_DSTOPTS)
			break;
		if (i == IPV6_EXT_MAX)
			return 0;
		__u8 *h = (void *)ip6 + (off & 0x3fff);
		if ((void *)(h + 8) > data_end)
			return 0;
		if (nh == IPPROTO_FRAGMENT) {
			later_fragment = (h[2] << 8 | h[3]) & 0xfff8;
			p->fragment = PKT_FRAG_HDR | (later_fragment || (h[3] & 1) ? PKT_FRAGMENT : 0);
			off += 8;
		} else {
			off += (h[1] + 1) * 8;
		}
		if (off > end)
			return 0;
		nh = h[0];
	}
	p->proto = nh;
	p->l4 = off;
	if (!later_fragment)
		pkt_l4(p, (void *)ip6 + (off & 0x3fff), data_end, end - off);
	return off;
}

/* A 5-tuple's ends swapped, as the other direction of its flow sees them. */
static __always_inline void swap_ends(__be32 *src, __be32 *dst, __be16 *sport, __be16 *dport)
{
	__be32 a[4];
	addr_copy(a, src);
	addr_copy(src, dst);
	addr_copy(dst, a);
	__be16 port = *sport;
	*sport = *dport;
	*dport = port;
}

static __always_inline void pkt_reverse(struct pkt *p)
{
	swap_ends(p->src, p->dst, &p->sport, &p->dport);
}

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

/* The flow's hash, from the 5-tuple already parsed (ICMP echo: the
 * identifier stands for both ports), keyed by the instance's seed:
 * MurmurHash3's mixing, cheaper than having the kernel's flow dissector
 * walk the packet again. Every packet of a flow hashes alike, so it keeps
 * its ECMP path; flows spread over every bit. */
static __always_inline __u32 flow_hash(struct pkt *p, __u32 seed)
{
	__u32 w[10] = { p->src[0], p->src[1], p->src[2], p->src[3],
			p->dst[0], p->dst[1], p->dst[2], p->dst[3],
			((__u32)p->sport << 16) | p->dport, p->proto };
	__u32 h = seed;
#pragma unroll
	for (int i = 0; i < 10; i++) {
		__u32 k = w[i] * 0xcc9e2d51;
		k = rotl32(k, 15) * 0x1b873593;
		h = rotl32(h ^ k, 13) * 5 + 0xe6546b64;
	}
	h ^= 40;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The outer IPv6 flow label: the hash's low 20 bits, never 0, which
 * RFC 6437 reserves for "unlabelled" (ECMP would then ignore it). */
static __always_inline __u32 flow_label(__u32 hash)
{
	__u32 label = hash & 0xFFFFF;
	return label ? label : 1;
}

#endif
