/* Underlay datapath: XDP on each underlay NIC (DESIGN.md section 4,
 * inbound), plus a TC ingress hook on the same NICs that copies the
 * broadcasts passthrough guests need (XDP cannot clone a frame). */
#include "xde.h"
#include "maps.h"
#include "counters.h"

static __always_inline int deliver(struct xdp_md *ctx, __u32 port)
{
	port_count(port, P_rx_packets, 1);
	port_count(port, P_rx_bytes, ctx->data_end - ctx->data);
	return bpf_redirect(port, 0);
}

int xdp_underlay(struct xdp_md *ctx)
{
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
