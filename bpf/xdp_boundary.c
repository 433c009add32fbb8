/* XDP on each underlay NIC of a boundary host (docs/design.md, "Boundary
 * services").
 *
 * xdp_boundary: Geneve for the boundary's underlay address in its VNI is
 * checked and decapsulated, and its IPv4 or IPv6 packet passes to the
 * host's kernel, which routes it (out of the external NIC). The inner
 * Ethernet header takes the outer one's addresses, so the kernel sees a
 * frame addressed to the NIC it arrived on. Only what the host's routes
 * send out of the external NIC: a guest's packet for the underlay, a sled
 * or this host is dropped. Malformed Geneve, Geneve in another VNI and
 * inner frames that are not IP are dropped too, each counted by its
 * reason; everything else passes to the host untouched. */
#include "wire.h"
#include "pkt.h"
#include "geneve.h"
#include "boundary.h"

int xdp_boundary(struct xdp_md *ctx)
{
	struct bsvc_cfg *cfg = bsvc_config();
	if (!cfg || !cfg->up)
		return XDP_PASS;
	struct geneve_rx rx = {};
	__u32 rc = geneve_parse_at(ctx, cfg->underlay_addr, &rx);
	if (rc == NOT_FOR_US) {
		bsvc_count(BSVC_EV_underlay_passed, 1);
		return XDP_PASS;
	}
	if (rc != GENEVE_OK)
		return bsvc_xdp_drop(bsvc_geneve_reason(rc));
	if (rx.vni != cfg->vni)
		return bsvc_xdp_drop(BSVC_DROP_wrong_vni);
	/* the kernel gets the datagram's packet, not what padded it on the wire */
	if (rx.trim && bpf_xdp_adjust_tail(ctx, -(int)rx.trim))
		return bsvc_xdp_drop(BSVC_DROP_resize_failed);

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *outer = data;
	struct ethhdr *inner = data + rx.outer_len;
	if ((void *)(outer + 1) > data_end || (void *)(inner + 1) > data_end)
		return bsvc_xdp_drop(BSVC_DROP_malformed_inner);
	void *l3 = inner + 1;
	struct pkt pkt;
	if (inner->h_proto == bpf_htons(ETH_P_IP)) {
		if (!ip4_valid(l3, data_end, data_end - l3) || !pkt_parse4(l3, data_end, &pkt))
			return bsvc_xdp_drop(BSVC_DROP_malformed_ipv4);
	} else if (inner->h_proto == bpf_htons(ETH_P_IPV6)) {
		if (!ip6_valid(l3, data_end, data_end - l3) || !pkt_parse6(l3, data_end, &pkt))
			return bsvc_xdp_drop(BSVC_DROP_malformed_ipv6);
	} else {
		return bsvc_xdp_drop(BSVC_DROP_not_ip);
	}
	struct bpf_fib_lookup fib;
	if (bsvc_route_out(ctx, ctx->ingress_ifindex, &pkt, &fib) != cfg->external)
		return bsvc_xdp_drop(BSVC_DROP_not_external);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	outer = data;
	inner = data + rx.outer_len;
	if ((void *)(outer + 1) > data_end || (void *)(inner + 1) > data_end)
		return bsvc_xdp_drop(BSVC_DROP_malformed_inner);
	/* to this NIC from the sled's next hop, as the outer frame came */
	__builtin_memcpy(inner->h_dest, outer->h_dest, 2 * ETH_ALEN);
	__u32 len = data_end - (void *)inner;
	if (bpf_xdp_adjust_head(ctx, rx.outer_len))
		return bsvc_xdp_drop(BSVC_DROP_resize_failed);
	bsvc_count(BSVC_EV_decap, 1);
	bsvc_count(BSVC_EV_decap_bytes, len);
	return XDP_PASS;
}
