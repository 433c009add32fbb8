/* Gateway layer: the virtual router every port sees answers ARP and ping
 * itself, straight back to the guest (docs/design.md, "Outbound pipeline"). */
#ifndef XDE_GATEWAY_H
#define XDE_GATEWAY_H

#include "config.h"
#include "counters.h"

static __always_inline int in_subnet(struct port_cfg *pc, __be32 addr)
{
	__u32 mask = pc->subnet_len ? ~0U << (32 - pc->subnet_len) : 0;
	return (bpf_ntohl(addr) & mask) == bpf_ntohl(pc->subnet);
}

/* Send the (rewritten) frame back out of the datapath end, to the guest. */
static __always_inline int hairpin(struct __sk_buff *skb)
{
	return bpf_redirect(skb->ifindex, 0);
}

/* ARP from the guest: a reply with the gateway MAC for the gateway IP and,
 * as proxy ARP, for every other address of the VPC subnet, so an on-link
 * /24 guest works. Anything else is dropped: ARP never crosses the overlay. */
static __always_inline int gateway_arp(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
				       struct port_stats *st)
{
	struct arp_ipv4 a;
	/* too short for an ARP body: not a request the gateway answers */
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &a, sizeof(a)) < 0)
		return tc_drop(port, DIR_OUT, DROP_arp);
	if (a.htype != bpf_htons(ARPHRD_ETHER) || a.ptype != bpf_htons(ETH_P_IP) ||
	    a.hlen != ETH_ALEN || a.plen != 4 || a.op != bpf_htons(ARPOP_REQUEST))
		return tc_drop(port, DIR_OUT, DROP_arp);
	/* a port without IPv4 has no address to send ARP from */
	if (!mac_eq(a.sha, pc->mac) || a.spa != pc->ip || !(pc->flags & PORT_F_IP4))
		return tc_drop(port, DIR_OUT, DROP_spoof);
	if (a.tpa != pc->gw_ip && !(in_subnet(pc, a.tpa) && a.tpa != pc->ip))
		return tc_drop(port, DIR_OUT, DROP_arp);

	struct ethhdr eth = { .h_proto = bpf_htons(ETH_P_ARP) };
	__builtin_memcpy(eth.h_dest, pc->mac, ETH_ALEN);
	__builtin_memcpy(eth.h_source, pc->gw_mac, ETH_ALEN);
	__be32 asked = a.tpa;
	a.op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(a.tha, pc->mac, ETH_ALEN);
	a.tpa = a.spa;
	__builtin_memcpy(a.sha, pc->gw_mac, ETH_ALEN);
	a.spa = asked;
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &a, sizeof(a), 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_store_failed);
	stat_add(st, P_arp_replies, 1);
	return hairpin(skb);
}

/* An echo request (type req) turned into the reply (type rep) in place,
 * back to the guest: the addresses (alen bytes each, the source at aoff)
 * swapped, which leaves any checksum over them as it was, the MACs
 * guest <- gateway, the type changed and the ICMP checksum with it. */
static __always_inline int echo_in_place(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
					 struct port_stats *st, const void *src, const void *dst,
					 const int alen, __u32 aoff, __u32 l4off, __u8 req, __u8 rep)
{
	__u8 addrs[32];
	__builtin_memcpy(addrs, dst, alen);
	__builtin_memcpy(addrs + alen, src, alen);
	__u8 macs[12];
	__builtin_memcpy(macs, pc->mac, ETH_ALEN);
	__builtin_memcpy(macs + 6, pc->gw_mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, aoff, addrs, 2 * alen, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, macs, 12, 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_store_failed);
	if (bpf_l4_csum_replace(skb, l4off + 2, bpf_htons(req << 8), bpf_htons(rep << 8), 2) < 0)
		return tc_drop(port, DIR_OUT, DROP_csum_failed);
	if (bpf_skb_store_bytes(skb, l4off, &rep, 1, 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_store_failed);
	stat_add(st, P_icmp_replies, 1);
	return hairpin(skb);
}

/* ICMP echo request to the gateway IP: the reply. Returns -1 when the
 * frame is not one. */
static __always_inline int gateway_icmp(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
					struct port_stats *st,
					struct iphdr *ip, __u32 l4off)
{
	/* only a whole datagram carries an echo request (not a fragment) */
	if (ip->daddr != pc->gw_ip || ip->protocol != IPPROTO_ICMP ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return -1;
	struct icmphdr icmp;
	if (bpf_skb_load_bytes(skb, l4off, &icmp, sizeof(icmp)) < 0 ||
	    icmp.type != ICMP_ECHO || icmp.code != 0)
		return -1;
	__be32 src = ip->saddr, dst = ip->daddr;
	return echo_in_place(skb, pc, port, st, &src, &dst, 4,
			     ETH_HLEN + offsetof(struct iphdr, saddr), l4off, ICMP_ECHO, ICMP_ECHOREPLY);
}

#endif
