/* TC ingress (clsact) on the external NIC of a boundary host (docs/design.md,
 * "Boundary services").
 *
 * tc_boundary: an IPv4 or IPv6 packet from outside whose destination
 * address and port are in the NAT table is encapsulated in Geneve, in the
 * VNI of the guest that owns them and with Oxide's External option, and
 * sent to that guest's sled out of the underlay NIC the kernel's FIB
 * chooses. What the host's routes would send toward an underlay NIC is
 * dropped; everything else passes to the host untouched (frames for other
 * hosts on the link among it). TC, not XDP: TCP
 * from outside arrives as GSO and checksum-partial skbs, which
 * bpf_skb_adjust_room's encapsulation flags keep fit for segmentation. */
#include "wire.h"
#include "pkt.h"
#include "boundary.h"

int tc_boundary(struct __sk_buff *skb)
{
	struct bsvc_cfg *cfg = bsvc_config();
	if (!cfg || !cfg->up)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	/* only what the link addressed to this host (PACKET_HOST) */
	if ((void *)(eth + 1) > data_end || skb->pkt_type != 0)
		goto pass;
	__be16 proto = eth->h_proto;
	struct pkt pkt;
	__u32 l4;
	__u8 tos;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if (!ip4_valid(ip, data_end, skb->len - ETH_HLEN) || !pkt_parse4(ip, data_end, &pkt))
			goto pass;
		l4 = ETH_HLEN + ip->ihl * 4;
		tos = ip->tos;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if (!ip6_valid(ip6, data_end, skb->len - ETH_HLEN) ||
		    !(l4 = pkt_parse6(ip6, data_end, &pkt)))
			goto pass;
		l4 += ETH_HLEN;
		tos = ip6->priority << 4 | ip6->flow_lbl[0] >> 4;
	} else {
		goto pass;
	}
	struct bsvc_nat_val *e = bsvc_nat_lookup(pkt.dst, bsvc_port(skb, &pkt, l4));
	if (e)
		return bsvc_encap(skb, cfg, e, &pkt, tos, proto);
	/* the outside never reaches the underlay through this host */
	struct bpf_fib_lookup fib;
	__u32 out = bsvc_route_out(skb, skb->ifindex, &pkt, &fib);
	if (out && (out == cfg->underlay[0] || out == cfg->underlay[1]))
		return bsvc_tc_drop(BSVC_DROP_to_underlay);
pass:
	bsvc_count(BSVC_EV_external_passed, 1);
	return TC_ACT_OK;
}
