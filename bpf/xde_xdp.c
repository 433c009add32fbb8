/* Underlay datapath: XDP on each underlay NIC (docs/design.md, "Inbound
 * pipeline"): Geneve for a local port is checked, decapsulated and
 * redirected into the port; everything else passes to the host. A TC
 * ingress hook on the same NICs copies to passthrough guests the
 * broadcasts they need (XDP cannot clone a frame). */
#include "xde.h"
#include "maps.h"
#include "counters.h"
#include "geneve.h"
#include "fw.h"

static __always_inline int deliver(struct xdp_md *ctx, __u32 port)
{
	port_count(port, P_rx_packets, 1);
	port_count(port, P_rx_bytes, ctx->data_end - ctx->data);
	return bpf_redirect(port, 0);
}

static __always_inline int drop(enum global_counter why)
{
	global_count(why);
	return XDP_DROP;
}

static __always_inline int geneve_in(struct xdp_md *ctx, struct xde_cfg *cfg, struct geneve_rx *rx)
{
	/* the guest gets the datagram's frame, not what padded it on the wire */
	if (rx->trim && bpf_xdp_adjust_tail(ctx, -(int)rx->trim))
		return drop(G_malformed_inner);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *inner = data + rx->outer_len;
	if ((void *)(inner + 1) > data_end)
		return drop(G_malformed_inner);
	if (inner->h_proto == bpf_htons(ETH_P_ARP))
		return drop(G_drop_arp_in_geneve);

	struct port_key pk = { .vni = rx->vni };
	__builtin_memcpy(pk.mac, inner->h_dest, ETH_ALEN);
	__u32 *port = port_index.lookup(&pk);
	struct port_cfg *pc = port ? ports.lookup(port) : 0;
	if (!pc)
		return drop(G_drop_no_port);
	__u32 p = pc->ifindex;

	/* inbound firewall; frames from outside the VPC belong to no VNI */
	struct pkt4 pkt;
	if (inner->h_proto != bpf_htons(ETH_P_IP)) {
		port_count(p, P_drop_unsupported, 1);  /* the IPv6 overlay comes later */
		return XDP_DROP;
	}
	struct iphdr *iip = (void *)(inner + 1);
	if (!ip4_valid(iip, data_end, data_end - (void *)iip) ||
	    !pkt4_parse(iip, data_end, &pkt))
		return drop(G_malformed_inner);
	int v = firewall(p, DIR_IN, &pkt, rx->external ? VNI_NONE : rx->vni,
			 data_end - (void *)inner, cfg);
	if (v == VERDICT_PENDING) {
		xdp_progs.call(ctx, PROG_FW_EVAL);
		return XDP_DROP;  /* only if the tail call failed */
	}
	if (v == VERDICT_DENY) {
		port_count(p, P_drop_firewall, 1);
		return XDP_DROP;
	}

	if (bpf_xdp_adjust_head(ctx, rx->outer_len))
		return drop(G_malformed_inner);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	inner = data;
	if ((void *)(inner + 1) > data_end)
		return XDP_DROP;
	/* The guest sees the gateway as the source of routed traffic. */
	__builtin_memcpy(inner->h_source, pc->gw_mac, ETH_ALEN);
	port_count(p, P_decap, 1);
	return deliver(ctx, p);
}

int xdp_underlay(struct xdp_md *ctx)
{
	__u32 k = CFG_KEY;
	struct xde_cfg *cfg = config.lookup(&k);
	if (!cfg)
		return XDP_PASS;
	struct geneve_rx rx = {};
	int rc = geneve_parse(ctx, cfg, &rx);
	if (rc == 0)
		return geneve_in(ctx, cfg, &rx);
	if (rc != NOT_FOR_US)
		return drop(rc);

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
		port_count(*port, P_passthrough_in, 1);
		return deliver(ctx, *port);
	}
pass:
	global_count(G_passed_to_host);
	return XDP_PASS;
}

/* The firewall's rule walk (see fw.h): answer, then run the pipeline again. */
int xdp_fw_eval(struct xdp_md *ctx)
{
	fw_answer();
	xdp_progs.call(ctx, PROG_MAIN);
	return XDP_DROP;
}

/* Broadcast and multicast frames reach the host (XDP passed them) and,
 * cloned here, every passthrough port: the guest must see ARP requests. */
int tc_underlay_in(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || !(eth->h_dest[0] & 1))
		return TC_ACT_OK;
	for (__u32 i = 0; i < XDE_MAX_PASSTHROUGH; i++) {
		__u32 idx = i;
		__u32 *port = passthru.lookup(&idx);
		if (!port || !*port)
			break;
		port_count(*port, P_passthrough_in, 1);
		port_count(*port, P_rx_packets, 1);
		port_count(*port, P_rx_bytes, skb->len);
		bpf_clone_redirect(skb, *port, 0);
	}
	return TC_ACT_OK;
}
