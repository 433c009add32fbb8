/* Overlay layer: Geneve encapsulation over IPv6 and the choice of underlay
 * through the kernel's FIB (docs/design.md, "Outbound pipeline", steps 10 and 11). */
#ifndef XDE_ENCAP_H
#define XDE_ENCAP_H

#include "config.h"
#include "counters.h"
#include "scratch.h"
#include "pkt.h"
#include "fib.h"
#include "fw.h"

/* bcc's helpers.h declares the pre-5.11 three-argument form. */
static long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

#ifndef BPF_F_ADJ_ROOM_ENCAP_L2_ETH
#define BPF_F_ADJ_ROOM_ENCAP_L2_ETH (1ULL << 6)
#endif

/* Everything pushed in front of the guest's frame, written in one store:
 * outer Ethernet, IPv6, UDP, Geneve, then the guest's own Ethernet header
 * (moved: bpf_skb_adjust_room opens the room right after it). */
struct encap_hdrs {
	struct ethhdr eth;
	struct ipv6hdr ip6;
	struct udphdr udp;
	struct geneve_hdr gnv;
	struct ethhdr inner;
} __attribute__((packed));
_Static_assert(sizeof(struct encap_hdrs) == ENCAP_HDRS, "scratch.h's room for them");

/* Destination port on this same host: deliver without touching the wire.
 * The receiving guest sees the gateway MAC as the source, as for any
 * routed frame. */
static __always_inline int deliver_local(struct __sk_buff *skb, struct xde_cfg *cfg, __u32 port,
					 __u32 vni, const __u8 *dmac, struct pkt *p, __u64 now)
{
	struct port_key pk = { .vni = vni };
	__builtin_memcpy(pk.mac, dmac, ETH_ALEN);
	__u32 *dst = port_index.lookup(&pk);
	struct port_cfg *dpc = dst ? ports.lookup(dst) : 0;
	if (!dpc)
		return tc_drop(port, DIR_OUT, DROP_no_port_local);
	__u32 d = dpc->ifindex;
	struct port_stats *dst_st = port_stats_get(d);
	/* as if it came off the wire: a family the port does not have is not
	 * the guest's, and then the destination port's inbound firewall */
	if (!(dpc->flags & (addr_v4mapped(p->src) ? PORT_F_IP4 : PORT_F_IP6)))
		return tc_drop(d, DIR_IN, DROP_unsupported);
	int v = firewall(dpc, dst_st, DIR_IN, p, vni, skb->len, cfg, now, STAGE_TC_LOCAL_IN);
	if (v == VERDICT_PENDING)
		return tc_fw_call(skb, d, DIR_IN);
	if (v == VERDICT_DENY)
		return tc_drop(d, DIR_IN, DROP_firewall);
	__u8 macs[12];
	__builtin_memcpy(macs, dmac, ETH_ALEN);
	__builtin_memcpy(macs + 6, dpc->gw_mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, macs, 12, 0) < 0)
		return tc_drop(d, DIR_IN, DROP_store_failed);
	stat_add(dst_st, P_rx_packets, 1);
	stat_add(dst_st, P_rx_bytes, skb->len);
	return bpf_redirect(d, 0);
}

/* Encapsulate the guest's frame toward `underlay` in `vni`, with the inner
 * destination MAC `dmac`, and send it out of the underlay NIC the kernel's
 * routes choose (ECMP across U1/U2, failover when a route goes away):
 * looked up once per flow and ROUTE_CACHE_NS (fib.h). */
static __always_inline int encap_and_send(struct __sk_buff *skb, struct xde_cfg *cfg,
					  __u32 port, struct port_stats *st,
					  const __u8 *underlay, __u32 vni, const __u8 *dmac,
					  __u8 tos, struct pkt *p, __u64 now)
{
	if (addr6_eq(underlay, cfg->underlay_addr))
		return deliver_local(skb, cfg, port, vni, dmac, p, now);

	/* per CPU, not on the stack: beside the rest of the pipeline (NAT's
	 * tail call included) it would not fit there */
	struct scratch *sc = scratch_get();
	if (!sc)
		return tc_drop(port, DIR_OUT, DROP_no_scratch);
	struct encap_hdrs *hp = (void *)sc->encap;
	__builtin_memset(hp, 0, sizeof(*hp));
	if (bpf_skb_load_bytes(skb, 0, &hp->inner, sizeof(hp->inner)) < 0)
		return tc_drop(port, DIR_OUT, DROP_load_failed);
	__builtin_memcpy(hp->inner.h_dest, dmac, ETH_ALEN);

	/* Entropy for ECMP: the flow's hash, in the flow label and the UDP
	 * source port (49152-65535, RFC 8926). */
	__u32 hash = flow_hash(p, cfg->hash_seed);
	__u32 label = flow_label(hash);
	__u16 sport = 0xC000 | ((hash >> 16) & 0x3FFF);

	__u32 inner_len = skb->len;
	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
				BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN) | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) < 0)
		return tc_drop(port, DIR_OUT, DROP_resize_failed);

	/* For a GSO packet these lengths are the whole super-packet's (possibly
	 * past 16 bits); segmentation rewrites them per segment. */
	__u16 l4len = inner_len + sizeof(struct udphdr) + sizeof(struct geneve_hdr);
	/* version 6, traffic class = inner DSCP+ECN (RFC 6040 normal mode), flow label */
	*(__be32 *)&hp->ip6 = bpf_htonl((6U << 28) | ((__u32)tos << 20) | label);
	hp->ip6.payload_len = bpf_htons(l4len);
	hp->ip6.nexthdr = IPPROTO_UDP;
	hp->ip6.hop_limit = OUTER_HOP_LIMIT;
	__builtin_memcpy(&hp->ip6.saddr, cfg->underlay_addr, 16);
	__builtin_memcpy(&hp->ip6.daddr, underlay, 16);
	hp->udp.source = bpf_htons(sport);
	hp->udp.dest = bpf_htons(GENEVE_PORT);
	hp->udp.len = bpf_htons(l4len);
	hp->udp.check = 0;  /* allowed for tunnels over IPv6 (RFC 6935/6936), as OPTE */
	hp->gnv.proto = bpf_htons(GENEVE_PROTO_ETH);
	hp->gnv.vni[0] = vni >> 16;
	hp->gnv.vni[1] = vni >> 8;
	hp->gnv.vni[2] = vni;
	hp->eth.h_proto = bpf_htons(ETH_P_IPV6);

	struct route_cache_val *rc = route_cache_get(underlay, hash, now);
	if (rc) {
		__u32 out = rc->ifindex;
		__builtin_memcpy(hp->eth.h_dest, rc->dmac, ETH_ALEN);
		__builtin_memcpy(hp->eth.h_source, rc->smac, ETH_ALEN);
		if (bpf_skb_store_bytes(skb, 0, hp, sizeof(*hp), 0) < 0)
			return tc_drop(port, DIR_OUT, DROP_store_failed);
		stat_add(st, P_encap, 1);
		stat_add(st, P_route_cache_hits, 1);
		return bpf_redirect(out, 0);
	}
	stat_add(st, P_route_cache_misses, 1);

	struct bpf_fib_lookup *fib = &sc->fib;
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET6;
	fib->ifindex = skb->ifindex;
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = hp->udp.source;
	fib->dport = hp->udp.dest;
	fib->flowinfo = bpf_htonl(label);
	/* the FIB checks tot_len against the route's MTU: a GSO packet is
	 * checked by its segments, which the port MTU already sizes */
	fib->tot_len = skb->gso_size ? 0 : l4len + sizeof(struct ipv6hdr);
	__builtin_memcpy(fib->ipv6_src, cfg->underlay_addr, 16);
	__builtin_memcpy(fib->ipv6_dst, underlay, 16);
	int ret = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	__u32 detour = 0;
	int kick = 1;
	if (ret == BPF_FIB_LKUP_RET_SUCCESS) {
		nexthop_seen(underlay, fib, now);
		route_cache_put(underlay, hash, fib, now);
	} else if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		detour = nexthop_detour(underlay, cfg, fib, now, &kick);
	} else {
		return tc_drop(port, DIR_OUT, DROP_underlay_unreachable);
	}
	if (ret == BPF_FIB_LKUP_RET_SUCCESS || detour) {
		__builtin_memcpy(hp->eth.h_dest, fib->dmac, ETH_ALEN);
		__builtin_memcpy(hp->eth.h_source, fib->smac, ETH_ALEN);
	}
	if (bpf_skb_store_bytes(skb, 0, hp, sizeof(*hp), 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_store_failed);
	stat_add(st, P_encap, 1);
	if (detour) {
		stat_add(st, P_underlay_detours, 1);
		if (!kick)
			return bpf_redirect(detour, 0);
		bpf_clone_redirect(skb, detour, 0);
	}
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* Next hop not resolved yet: the kernel resolves it and sends.
		 * Name the next hop the FIB chose (with our ECMP entropy); left
		 * to itself the kernel would pick one without it. */
		struct bpf_redir_neigh nh = { .nh_family = AF_INET6 };
		__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, 16);
		return redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	return bpf_redirect(fib->ifindex, 0);
}

#endif
