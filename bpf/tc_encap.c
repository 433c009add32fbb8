/* Port datapath, TC ingress on the datapath end of each port's veth: every
 * frame the guest sends enters here (docs/design.md, "Outbound pipeline"):
 * passthrough, or gateway -> anti-spoofing -> router -> overlay encap. */
#include "xde.h"
#include "maps.h"
#include "counters.h"
#include "fib.h"
#include "gateway.h"
#include "router.h"
#include "encap.h"
#include "mtu.h"
#include "fw.h"

/* Passthrough: the frame leaves unchanged on U1, on U2 while U1 is down. */
static __always_inline int passthrough_out(struct __sk_buff *skb, struct xde_cfg *cfg, __u32 port)
{
	__u32 out = cfg->u1;
	if (!underlay_alive(skb, cfg->u1) && underlay_alive(skb, cfg->u2))
		out = cfg->u2;
	port_count(port, P_passthrough_out, 1);
	return bpf_redirect(out, 0);
}

static __always_inline int overlay_out(struct __sk_buff *skb, struct xde_cfg *cfg,
				       struct port_cfg *pc, __u32 port)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	if (!mac_eq(eth->h_source, pc->mac)) {  /* every frame, ARP included */
		port_count(port, P_drop_spoof, 1);
		return TC_ACT_SHOT;
	}
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return gateway_arp(skb, pc, port);
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		port_count(port, P_drop_unsupported, 1);
		return TC_ACT_SHOT;
	}
	struct iphdr *ip = (void *)(eth + 1);
	if (!ip4_valid(ip, data_end, skb->len - ETH_HLEN)) {
		port_count(port, P_drop_unsupported, 1);
		return TC_ACT_SHOT;
	}
	if (ip->saddr != pc->ip) {
		port_count(port, P_drop_spoof, 1);
		return TC_ACT_SHOT;
	}
	struct pkt4 pkt;
	pkt4_parse(ip, data_end, &pkt);
	/* the helpers below may move the packet: keep what we need of it */
	struct ip_summary sum = { .saddr = ip->saddr, .daddr = ip->daddr,
				  .tot_len = bpf_ntohs(ip->tot_len), .frag_off = ip->frag_off,
				  .ihl = ip->ihl, .tos = ip->tos };
	__u32 l4off = ETH_HLEN + ip->ihl * 4;
	__be32 daddr = sum.daddr;
	__u8 tos = sum.tos;
	int rc = gateway_icmp(skb, pc, port, ip, l4off);
	if (rc >= 0)
		return rc;
	int fw = firewall(port, DIR_OUT, &pkt, pc->vni, skb->len, cfg);
	if (fw == VERDICT_PENDING)
		return fw_call_eval(skb);
	if (fw == VERDICT_DENY) {
		port_count(port, P_drop_firewall, 1);
		return TC_ACT_SHOT;
	}
	rc = mtu_check(skb, pc, port, &sum);
	if (rc >= 0)
		return rc;

	struct route_val *rt = route_lookup(port, daddr);
	if (!rt) {
		port_count(port, P_drop_no_route, 1);
		return TC_ACT_SHOT;
	}
	if (rt->target == RT_IG) {
		__u8 bmac[ETH_ALEN] = BSVC_MAC;
		return encap_and_send(skb, cfg, pc, port, pc->bsvc_addr, pc->bsvc_vni, bmac, tos, &pkt);
	}
	if (rt->target != RT_SUB4 && rt->target != RT_IP4) {
		port_count(port, P_drop_router, 1);
		return TC_ACT_SHOT;
	}
	struct v2p_key vk = { .vni = pc->vni, .ip = rt->target == RT_IP4 ? rt->addr : daddr };
	struct v2p_val *v = v2p.lookup(&vk);
	if (!v) {
		port_count(port, P_drop_no_v2p, 1);
		return TC_ACT_SHOT;
	}
	return encap_and_send(skb, cfg, pc, port, v->underlay, pc->vni, v->mac, tos, &pkt);
}

int tc_port_out(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	struct port_cfg *pc = ports.lookup(&port);
	if (!pc) {
		global_count(G_drop_unknown_port);
		return TC_ACT_SHOT;
	}
	if (!fw_resumed()) {  /* counted on the first run, not after a rule evaluation */
		port_count(port, P_tx_packets, 1);
		port_count(port, P_tx_bytes, skb->len);
	}
	__u32 k = CFG_KEY;
	struct xde_cfg *cfg = config.lookup(&k);
	if (!cfg || !cfg->u1) {
		port_count(port, P_drop_no_underlay, 1);
		return TC_ACT_SHOT;
	}
	if (pc->flags & PORT_F_PASSTHROUGH)
		return passthrough_out(skb, cfg, port);
	return overlay_out(skb, cfg, pc, port);
}

/* The firewall's rule walk (see fw.h): answer, then run the pipeline again. */
int tc_fw_eval(struct __sk_buff *skb)
{
	fw_answer();
	tc_progs.call(skb, PROG_MAIN);
	return TC_ACT_SHOT;
}
