/* TC ingress (clsact) on the datapath end of each port's veth: every frame
 * the guest sends enters here (docs/design.md, "Outbound pipeline").
 *
 * tc_port_out: passthrough, or gateway -> anti-spoofing -> firewall ->
 * MTU -> router -> overlay encap, out of the underlay NIC the kernel's FIB
 * chooses (or straight into a port on this host). tc_fw_eval: the
 * firewall's rule walk, reached by tail call. */
#include "wire.h"
#include "config.h"
#include "counters.h"
#include "pkt.h"
#include "fib.h"
#include "gateway.h"
#include "router.h"
#include "v2p.h"
#include "encap.h"
#include "mtu.h"
#include "fw.h"

/* Passthrough: the frame leaves unchanged on U1, on U2 while U1 is down. */
static __always_inline int passthrough_out(struct __sk_buff *skb, struct xde_cfg *cfg,
					   struct port_stats *st)
{
	__u32 out = cfg->u1;
	if (!underlay_alive(skb, cfg->u1) && underlay_alive(skb, cfg->u2))
		out = cfg->u2;
	stat_add(st, P_passthrough_out, 1);
	return bpf_redirect(out, 0);
}

static __always_inline int overlay_out(struct __sk_buff *skb, struct xde_cfg *cfg,
				       struct port_cfg *pc, __u32 port, struct port_stats *st)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return tc_drop(port, DIR_OUT, DROP_malformed_inner);
	if (!mac_eq(eth->h_source, pc->mac))  /* every frame, ARP included */
		return tc_drop(port, DIR_OUT, DROP_spoof);
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return gateway_arp(skb, pc, port, st);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return tc_drop(port, DIR_OUT, DROP_unsupported);
	struct iphdr *ip = (void *)(eth + 1);
	if (!ip4_valid(ip, data_end, skb->len - ETH_HLEN))
		return tc_drop(port, DIR_OUT, DROP_malformed_ipv4);
	if (ip->saddr != pc->ip)
		return tc_drop(port, DIR_OUT, DROP_spoof);
	struct pkt4 pkt;
	pkt4_parse(ip, data_end, &pkt);
	/* the helpers below may move the packet: keep what we need of it */
	struct ip_summary sum = { .saddr = ip->saddr, .daddr = ip->daddr,
				  .tot_len = bpf_ntohs(ip->tot_len), .frag_off = ip->frag_off,
				  .ihl = ip->ihl, .tos = ip->tos };
	__u32 l4off = ETH_HLEN + ip->ihl * 4;
	__be32 daddr = sum.daddr;
	__u8 tos = sum.tos;
	int rc = gateway_icmp(skb, pc, port, st, ip, l4off);
	if (rc >= 0)
		return rc;
	__u64 now = xde_now();
	int fw = firewall(pc, st, DIR_OUT, &pkt, pc->vni, skb->len, cfg, now);
	if (fw == VERDICT_PENDING)
		return tc_fw_call(skb, port, DIR_OUT);
	if (fw == VERDICT_DENY)
		return tc_drop(port, DIR_OUT, DROP_firewall);
	rc = mtu_check(skb, pc, port, st, &sum);
	if (rc >= 0)
		return rc;

	struct route_val *rt = route_lookup(port, daddr);
	if (!rt)
		return tc_drop(port, DIR_OUT, DROP_no_route);
	if (rt->target == RT_IG) {
		__u8 bmac[ETH_ALEN] = BSVC_MAC;
		return encap_and_send(skb, cfg, port, st, pc->bsvc_addr, pc->bsvc_vni, bmac, tos, &pkt,
				      now);
	}
	if (rt->target != RT_SUB4 && rt->target != RT_IP4)
		return tc_drop(port, DIR_OUT, DROP_router);
	struct v2p_key vk = { .vni = pc->vni, .ip = rt->target == RT_IP4 ? rt->addr : daddr };
	struct v2p_val *v = v2p.lookup(&vk);
	if (!v)
		return tc_drop(port, DIR_OUT, DROP_no_v2p);
	return encap_and_send(skb, cfg, port, st, v->underlay, pc->vni, v->mac, tos, &pkt, now);
}

int tc_port_out(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	struct port_cfg *pc = ports.lookup(&port);
	if (!pc)
		return tc_drop(0, DIR_OUT, DROP_unknown_port);
	struct port_stats *st = port_stats_get(port);
	if (!fw_resumed()) {  /* counted on the first run, not after a rule evaluation */
		stat_add(st, P_tx_packets, 1);
		stat_add(st, P_tx_bytes, skb->len);
	}
	struct xde_cfg *cfg = xde_config();
	if (!cfg || !cfg->u1)
		return tc_drop(port, DIR_OUT, DROP_no_underlay);
	if (pc->flags & PORT_F_PASSTHROUGH)
		return passthrough_out(skb, cfg, st);
	return overlay_out(skb, cfg, pc, port, st);
}

/* The firewall's rule walk (fw_job.h): answer, then run the pipeline again. */
int tc_fw_eval(struct __sk_buff *skb)
{
	__u32 dir;
	__u32 port = fw_answer(&dir);
	tc_progs.call(skb, PROG_MAIN);
	return tc_drop(port, dir, DROP_tail_call);
}
