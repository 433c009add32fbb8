/* MTU: a packet too big to fit the underlay once encapsulated gets an ICMP
 * error back to the guest, built from the packet itself: IPv4 with DF set
 * "fragmentation needed", IPv6 "packet too big". IPv4 without DF is
 * dropped, and counted. Never silent. */
#ifndef XDE_MTU_H
#define XDE_MTU_H

#include "config.h"
#include "counters.h"
#include "scratch.h"
#include "gateway.h"
#include "csum.h"

#define IP_DF 0x4000

struct ip_summary {
	__be32 saddr;
	__be32 daddr;
	__u16 tot_len;            /* host order */
	__be16 frag_off;
	__u8 ihl;
	__u8 tos;
};

/* Returns -1 when the packet fits, else the TC verdict. */
static __always_inline int mtu_check(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
				     struct port_stats *st,
				     struct ip_summary *ip)
{
	__u16 tot = ip->tot_len;
	if (tot <= pc->mtu || skb->gso_size)  /* GSO frames are segmented to fit */
		return -1;
	__u32 quote = ip->ihl * 4 + 8;
	/* without DF, or too short to quote: dropped without an ICMP error */
	if (!(ip->frag_off & bpf_htons(IP_DF)) || quote > ICMP_QUOTE_MAX || quote > tot)
		return tc_drop(port, DIR_OUT, DROP_mtu);
	struct scratch *sc = scratch_get();
	if (!sc)
		return tc_drop(port, DIR_OUT, DROP_no_scratch);
	__u8 *buf = sc->quote;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, buf, quote) < 0)
		return tc_drop(port, DIR_OUT, DROP_load_failed);
	__be32 guest = ip->saddr;

	/* frame := Ethernet, new IPv4 + ICMP headers, quoted packet start */
	if (bpf_skb_change_tail(skb, ETH_HLEN + quote, 0) < 0 ||
	    bpf_skb_adjust_room(skb, sizeof(struct iphdr) + sizeof(struct icmphdr),
				BPF_ADJ_ROOM_MAC, 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_resize_failed);

	struct {
		struct ethhdr eth;
		struct iphdr ip;
		struct icmphdr icmp;
	} __attribute__((packed)) h = {};
	__builtin_memcpy(h.eth.h_dest, pc->mac, ETH_ALEN);
	__builtin_memcpy(h.eth.h_source, pc->gw_mac, ETH_ALEN);
	h.eth.h_proto = bpf_htons(ETH_P_IP);
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tos = 0xc0;
	h.ip.tot_len = bpf_htons(sizeof(h.ip) + sizeof(h.icmp) + quote);
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_ICMP;
	h.ip.saddr = pc->gw_ip;
	h.ip.daddr = guest;
	h.ip.check = fold_csum(bpf_csum_diff(0, 0, (__be32 *)&h.ip, sizeof(h.ip), 0));
	h.icmp.type = ICMP_DEST_UNREACH;
	h.icmp.code = ICMP_FRAG_NEEDED;
	h.icmp.un.frag.mtu = bpf_htons(pc->mtu);
	__s64 s = bpf_csum_diff(0, 0, (__be32 *)&h.icmp, sizeof(h.icmp), 0);
	if (s >= 0)
		s = bpf_csum_diff(0, 0, (__be32 *)buf, quote & 0x7c, s);
	if (s < 0)
		return tc_drop(port, DIR_OUT, DROP_csum_failed);
	h.icmp.checksum = fold_csum(s);
	if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_store_failed);
	/* the guest's packet is gone (counted as an mtu drop); its frame
	 * now carries the ICMP error back */
	count_drop(port, DIR_OUT, DROP_mtu);
	stat_add(st, P_mtu_icmp_sent, 1);
	return hairpin(skb);
}

/* The same for an IPv6 packet of tot bytes from guest: Packet Too Big
 * (RFC 4443), quoting its first ICMP6_QUOTE bytes, from the gateway. */
static __always_inline int mtu_check6(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
				      struct port_stats *st, __u32 tot, const __be32 *guest)
{
	if (tot <= pc->mtu || skb->gso_size)
		return -1;
	if (tot < ICMP6_QUOTE)
		return tc_drop(port, DIR_OUT, DROP_mtu);
	struct scratch *sc = scratch_get();
	if (!sc)
		return tc_drop(port, DIR_OUT, DROP_no_scratch);
	if (bpf_skb_load_bytes(skb, ETH_HLEN, sc->quote, ICMP6_QUOTE) < 0)
		return tc_drop(port, DIR_OUT, DROP_load_failed);
	struct {
		struct ethhdr eth;
		struct ipv6hdr ip6;
		__u8 type, code;
		__be16 check;
		__be32 mtu;
	} __attribute__((packed)) h = {};
	__builtin_memcpy(h.eth.h_dest, pc->mac, ETH_ALEN);
	__builtin_memcpy(h.eth.h_source, pc->gw_mac, ETH_ALEN);
	h.eth.h_proto = bpf_htons(ETH_P_IPV6);
	h.ip6.version = 6;
	h.ip6.payload_len = bpf_htons(8 + ICMP6_QUOTE);
	h.ip6.nexthdr = IPPROTO_ICMPV6;
	h.ip6.hop_limit = 255;
	__builtin_memcpy(&h.ip6.saddr, pc->gw_ip6, 16);
	__builtin_memcpy(&h.ip6.daddr, guest, 16);
	h.type = ICMPV6_PKT_TOOBIG;
	h.mtu = bpf_htonl(pc->mtu);
	struct pseudo6 ph = { .len = bpf_htonl(8 + ICMP6_QUOTE), .nh = bpf_htonl(IPPROTO_ICMPV6) };
	__builtin_memcpy(ph.src, pc->gw_ip6, 16);
	__builtin_memcpy(ph.dst, guest, 16);
	__s64 s = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (s >= 0)
		s = bpf_csum_diff(0, 0, (__be32 *)&h.type, 8, s);
	if (s >= 0)
		s = bpf_csum_diff(0, 0, (__be32 *)sc->quote, ICMP6_QUOTE, s);
	if (s < 0)
		return tc_drop(port, DIR_OUT, DROP_csum_failed);
	h.check = fold_csum(s);
	if (bpf_skb_change_tail(skb, ETH_HLEN + ICMP6_QUOTE, 0) < 0 ||
	    bpf_skb_adjust_room(skb, sizeof(h) - ETH_HLEN, BPF_ADJ_ROOM_MAC, 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_resize_failed);
	/* the quoted bytes stay where they are, behind the new headers */
	if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_store_failed);
	count_drop(port, DIR_OUT, DROP_mtu);
	stat_add(st, P_mtu_icmp_sent, 1);
	return hairpin(skb);
}

#endif
