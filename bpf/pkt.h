/* An IPv4 packet as the firewall and the flow table see it, read once. */
#ifndef XDE_PKT_H
#define XDE_PKT_H

#include "wire.h"

struct pkt4 {
	__be32 src;
	__be32 dst;
	__be16 sport;             /* ICMP echo: the identifier, in both */
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
};

/* A whole, consistent IPv4 header: version 4, header inside the packet,
 * total length from the header's end to at most the avail bytes there are. */
static __always_inline int ip4_valid(struct iphdr *ip, void *data_end, __u32 avail)
{
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
		return 0;
	__u32 hlen = ip->ihl * 4, tot = bpf_ntohs(ip->tot_len);
	return hlen <= avail && tot >= hlen && tot <= avail;
}

/* Fill p from the IPv4 header at ip; false when it is not a whole header. */
static __always_inline int pkt4_parse(struct iphdr *ip, void *data_end, struct pkt4 *p)
{
	if ((void *)(ip + 1) > data_end || ip->ihl < 5)
		return 0;
	p->src = ip->saddr;
	p->dst = ip->daddr;
	p->proto = ip->protocol;
	p->sport = p->dport = 0;
	p->tcp_flags = p->icmp_type = p->icmp_code = 0;
	if (ip->frag_off & bpf_htons(0x1fff))
		return 1;                 /* later fragments carry no L4 header */
	void *l4 = (void *)ip + ip->ihl * 4;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) > data_end)
			return 1;
		p->sport = t->source;
		p->dport = t->dest;
		p->tcp_flags = ((__u8 *)t)[13];
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) > data_end)
			return 1;
		p->sport = u->source;
		p->dport = u->dest;
	} else if (p->proto == IPPROTO_ICMP) {
		struct icmphdr *c = l4;
		if ((void *)(c + 1) > data_end)
			return 1;
		p->icmp_type = c->type;
		p->icmp_code = c->code;
		if (c->type == ICMP_ECHO || c->type == ICMP_ECHOREPLY)
			p->sport = p->dport = c->un.echo.id;  /* a ping's flow is its id */
	}
	return 1;
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
static __always_inline __u32 flow_hash(struct pkt4 *p, __u32 seed)
{
	__u32 w[4] = { p->src, p->dst, ((__u32)p->sport << 16) | p->dport, p->proto };
	__u32 h = seed;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 k = w[i] * 0xcc9e2d51;
		k = rotl32(k, 15) * 0x1b873593;
		h = rotl32(h ^ k, 13) * 5 + 0xe6546b64;
	}
	h ^= 16;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

#endif
