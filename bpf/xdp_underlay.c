/* XDP on each underlay NIC (docs/design.md, "Inbound pipeline").
 *
 * xdp_underlay: Geneve for a local port is checked, translated by NAT
 * when it is for an external address, judged by the port's inbound
 * firewall, decapsulated and redirected into the port; unicast for
 * a passthrough port goes to it unchanged; everything else passes to the
 * host. xdp_fw_eval: the firewall's rule walk, and xdp_nat: inbound NAT,
 * both reached by tail call. */
#include "wire.h"
#include "config.h"
#include "counters.h"
#include "geneve.h"
#include "fw.h"
#include "nat.h"

static __always_inline int deliver(struct xdp_md *ctx, __u32 port, struct port_stats *st)
{
	stat_add(st, P_rx_packets, 1);
	stat_add(st, P_rx_bytes, ctx->data_end - ctx->data);
	return bpf_redirect(port, 0);
}

static __always_inline int geneve_in(struct xdp_md *ctx, struct xde_cfg *cfg, struct geneve_rx *rx)
{
	/* the guest gets the datagram's frame, not what padded it on the wire */
	if (rx->trim && bpf_xdp_adjust_tail(ctx, -(int)rx->trim))
		return xdp_drop(0, DIR_IN, DROP_resize_failed);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *inner = data + rx->outer_len;
	if ((void *)(inner + 1) > data_end)
		return xdp_drop(0, DIR_IN, DROP_malformed_inner);
	if (inner->h_proto == bpf_htons(ETH_P_ARP))
		return xdp_drop(0, DIR_IN, DROP_arp_in_geneve);

	struct port_key pk = { .vni = rx->vni };
	__builtin_memcpy(pk.mac, inner->h_dest, ETH_ALEN);
	__u32 *port = port_index.lookup(&pk);
	struct port_cfg *pc = port ? ports.lookup(port) : 0;
	if (!pc)
		return xdp_drop(0, DIR_IN, DROP_no_port);
	__u32 p = pc->ifindex;
	struct port_stats *st = port_stats_get(p);

	struct pkt pkt;
	void *l3 = inner + 1;
	/* a family the port does not have is not the guest's */
	if (!port_has_family(pc, inner->h_proto))
		return xdp_drop(p, DIR_IN, DROP_unsupported);
	if (inner->h_proto == bpf_htons(ETH_P_IP)) {
		if (!ip4_valid(l3, data_end, data_end - l3) || !pkt_parse4(l3, data_end, &pkt))
			return xdp_drop(p, DIR_IN, DROP_malformed_ipv4);
	} else {
		if (!ip6_valid(l3, data_end, data_end - l3) || !pkt_parse6(l3, data_end, &pkt))
			return xdp_drop(p, DIR_IN, DROP_malformed_ipv6);
		/* neighbour discovery and link-local traffic never cross the gateway */
		if (is_ndp(&pkt))
			return xdp_drop(p, DIR_IN, DROP_ndp);
		if (ip6_link_scoped(pkt.src) || ip6_link_scoped(pkt.dst))
			return xdp_drop(p, DIR_IN, DROP_link_local);
	}
	/* from outside the VPC to an external address: NAT gives the guest's,
	 * here for a reply of a translated flow, else in xdp_nat (which runs
	 * the pipeline again) */
	if (rx->external && !own_address(pc, &pkt)) {
		int why = nat_in_hit(l3, data_end, pc, st, &pkt);
		if (why < 0) {
			xdp_progs.call(ctx, PROG_NAT);
			return xdp_drop(p, DIR_IN, DROP_tail_call);
		}
		if (why)
			return xdp_drop(p, DIR_IN, why);
	}
	/* inbound firewall; frames from outside the VPC belong to no VNI */
	int v = firewall(pc, st, DIR_IN, &pkt, rx->external ? VNI_EXTERNAL : rx->vni,
			 data_end - (void *)inner, cfg, xde_now(), STAGE_XDP_IN);
	if (v == VERDICT_PENDING) {
		xdp_progs.call(ctx, PROG_FW_EVAL);
		return xdp_drop(p, DIR_IN, DROP_tail_call);
	}
	if (v == VERDICT_DENY)
		return xdp_drop(p, DIR_IN, DROP_firewall);

	if (bpf_xdp_adjust_head(ctx, rx->outer_len))
		return xdp_drop(p, DIR_IN, DROP_resize_failed);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	inner = data;
	if ((void *)(inner + 1) > data_end)  /* cannot happen: checked above */
		return xdp_drop(p, DIR_IN, DROP_malformed_inner);
	/* The guest sees the gateway as the source of routed traffic. */
	__builtin_memcpy(inner->h_source, pc->gw_mac, ETH_ALEN);
	stat_add(st, P_decap, 1);
	return deliver(ctx, p, st);
}

int xdp_underlay(struct xdp_md *ctx)
{
	struct xde_cfg *cfg = xde_config();
	if (!cfg)
		return XDP_PASS;
	struct geneve_rx rx = {};
	__u32 rc = geneve_parse(ctx, cfg, &rx);
	if (rc == GENEVE_OK)
		return geneve_in(ctx, cfg, &rx);
	if (rc < DROP_MAX)
		return xdp_drop(0, DIR_IN, rc);

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		goto pass;
	/* Passthrough: unicast frames for a passthrough port's MAC. */
	struct port_key pk = { .vni = VNI_PASSTHROUGH };
	__builtin_memcpy(pk.mac, eth->h_dest, ETH_ALEN);
	__u32 *port = port_index.lookup(&pk);
	if (port) {
		struct port_stats *st = port_stats_get(*port);
		stat_add(st, P_passthrough_in, 1);
		return deliver(ctx, *port, st);
	}
pass:
	global_count(G_passed_to_host);
	return XDP_PASS;
}

/* NAT for a frame from outside the VPC to an external address (reached
 * by tail call from geneve_in, which checked it): the guest's address in
 * place of the external one, then the pipeline again. Apart from the fast
 * path, whose verification the layer would push past the verifier's
 * limits. */
int xdp_nat(struct xdp_md *ctx)
{
	struct xde_cfg *cfg = xde_config();
	struct geneve_rx rx = {};
	if (!cfg || geneve_parse(ctx, cfg, &rx) != GENEVE_OK)
		return xdp_drop(0, DIR_IN, DROP_malformed_inner);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *inner = data + (rx.outer_len & 0x1ff);
	if ((void *)(inner + 1) > data_end)
		return xdp_drop(0, DIR_IN, DROP_malformed_inner);
	struct port_key pk = { .vni = rx.vni };
	__builtin_memcpy(pk.mac, inner->h_dest, ETH_ALEN);
	__u32 *port = port_index.lookup(&pk);
	struct port_cfg *pc = port ? ports.lookup(port) : 0;
	if (!pc)
		return xdp_drop(0, DIR_IN, DROP_no_port);
	__u32 p = pc->ifindex;
	struct pkt pkt;
	void *l3 = inner + 1;
	if (inner->h_proto == bpf_htons(ETH_P_IP)) {
		if (!ip4_valid(l3, data_end, data_end - l3) || !pkt_parse4(l3, data_end, &pkt))
			return xdp_drop(p, DIR_IN, DROP_malformed_ipv4);
	} else if (!ip6_valid(l3, data_end, data_end - l3) || !pkt_parse6(l3, data_end, &pkt)) {
		return xdp_drop(p, DIR_IN, DROP_malformed_ipv6);
	}
	int why = nat_in(l3, data_end, pc, port_stats_get(p), &pkt);
	if (why)
		return xdp_drop(p, DIR_IN, why);
	xdp_progs.call(ctx, PROG_MAIN);
	return xdp_drop(p, DIR_IN, DROP_tail_call);
}

/* The firewall's rule walk (fw_job.h): answer, then run the pipeline again. */
int xdp_fw_eval(struct xdp_md *ctx)
{
	__u32 dir;
	__u32 port = fw_answer(&dir);
	xdp_progs.call(ctx, PROG_MAIN);
	return xdp_drop(port, dir, DROP_tail_call);
}
