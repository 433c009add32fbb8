/* TC ingress (clsact) on each underlay NIC, behind XDP.
 *
 * tc_underlay_in: broadcast and multicast frames reach the host (XDP
 * passed them) and, cloned here, every passthrough port: the guest must
 * see ARP requests. XDP cannot clone a frame. Nothing is dropped here. */
#include "wire.h"
#include "config.h"
#include "counters.h"

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
		struct port_stats *st = port_stats_get(*port);
		stat_add(st, P_passthrough_in, 1);
		stat_add(st, P_rx_packets, 1);
		stat_add(st, P_rx_bytes, skb->len);
		bpf_clone_redirect(skb, *port, 0);
	}
	return TC_ACT_OK;
}
