/* TC ingress (clsact) on the datapath end of each port's veth: every frame
 * the guest sends enters here (docs/design.md, "Outbound pipeline").
 *
 * tc_port_out: passthrough, or gateway -> anti-spoofing -> firewall ->
 * MTU -> router -> NAT (internet-bound) -> overlay encap, out of the underlay NIC the kernel's FIB
 * chooses (or straight into a port on this host); IPv4 and IPv6.
 * tc_fw_eval: the firewall's rule walk, tc_nat: NAT and encapsulation of
 * internet-bound traffic (tc_snat: its search for a SNAT port), and tc_gateway: the gateway's DHCP, DHCPv6 and
 * neighbour discovery, all reached by tail call. */
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
#include "nat.h"
#include "dhcp4.h"
#include "ndp.h"
#include "dhcp6.h"

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

/* route_out's answer for internet-bound traffic: on to tc_nat */
#define TO_NAT -2

/* Router and overlay: the pipeline past the firewall and MTU, for both
 * families. */
static __always_inline int route_out(struct __sk_buff *skb, struct xde_cfg *cfg,
				     struct port_cfg *pc, __u32 port, struct port_stats *st,
				     __u32 family, struct pkt *pkt, __u8 tos, __u64 now)
{
	struct route_val *rt = route_lookup(port, family, pkt->dst);
	if (!rt)
		return tc_drop(port, DIR_OUT, DROP_no_route);
	if (rt->target == RT_IG) {   /* NAT first: here for a translated flow, else tc_nat */
		int why = nat_out_hit(skb, port, st, pkt);
		if (why < 0)
			return TO_NAT;
		if (why)
			return tc_drop(port, DIR_OUT, why);
		__u8 bmac[ETH_ALEN] = BSVC_MAC;
		return encap_and_send(skb, cfg, port, st, pc->bsvc_addr, pc->bsvc_vni, bmac, tos, pkt,
				      now);
	}
	int via = rt->target == RT_IP4 || rt->target == RT_IP6;
	if (!via && rt->target != RT_SUB4 && rt->target != RT_SUB6)
		return tc_drop(port, DIR_OUT, DROP_router);
	struct v2p_key vk = { .vni = pc->vni };
	addr_copy(vk.ip, via ? rt->addr : pkt->dst);
	struct v2p_val *v = v2p.lookup(&vk);
	if (!v)
		return tc_drop(port, DIR_OUT, DROP_no_v2p);
	return encap_and_send(skb, cfg, port, st, v->underlay, pc->vni, v->mac, tos, pkt, now);
}

/* The firewall's verdict on an outbound packet: -1 to go on, else the
 * program's return. st NULL: counted already (fw.h). */
static __always_inline int firewall_out(struct __sk_buff *skb, struct xde_cfg *cfg,
					struct port_cfg *pc, __u32 port, struct port_stats *st,
					struct pkt *pkt, __u64 now)
{
	int fw = firewall(pc, st, DIR_OUT, pkt, pc->vni, skb->len, cfg, now, STAGE_TC_OUT);
	if (fw == VERDICT_PENDING)
		return tc_fw_call(skb, port, DIR_OUT);
	if (fw == VERDICT_DENY)
		return tc_drop(port, DIR_OUT, DROP_firewall);
	return -1;
}

/* To the gateway program (tc_gateway): what the gateway answers or drops. */
static __always_inline int gateway_call(struct __sk_buff *skb, __u32 port)
{
	tc_progs.call(skb, PROG_GATEWAY);
	return tc_drop(port, DIR_OUT, DROP_tail_call);
}

static __always_inline int out4(struct __sk_buff *skb, struct xde_cfg *cfg, struct port_cfg *pc,
				__u32 port, struct port_stats *st, int rerun)
{
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = (void *)(long)skb->data + ETH_HLEN;
	if (!ip4_valid(ip, data_end, skb->len - ETH_HLEN))
		return tc_drop(port, DIR_OUT, DROP_malformed_ipv4);
	struct pkt pkt;
	pkt_parse4(ip, data_end, &pkt);
	if (pkt.proto == IPPROTO_UDP && pkt.dport == bpf_htons(DHCP4_SERVER_PORT) &&
	    (ip->daddr == 0xffffffff || ip->daddr == pc->gw_ip))
		return gateway_call(skb, port);
	if (!(pc->flags & PORT_F_IP4) || ip->saddr != pc->ip)
		return tc_drop(port, DIR_OUT, DROP_spoof);
	/* the helpers below may move the packet: keep what we need of it */
	struct ip_summary sum = { .saddr = ip->saddr, .daddr = ip->daddr,
				  .tot_len = bpf_ntohs(ip->tot_len), .frag_off = ip->frag_off,
				  .ihl = ip->ihl, .tos = ip->tos };
	int rc = gateway_icmp(skb, pc, port, st, ip, ETH_HLEN + ip->ihl * 4);
	if (rc >= 0)
		return rc;
	__u64 now = xde_now();
	rc = firewall_out(skb, cfg, pc, port, rerun ? 0 : st, &pkt, now);
	if (rc < 0)
		rc = mtu_check(skb, pc, port, st, &sum);
	if (rc >= 0)
		return rc;
	return route_out(skb, cfg, pc, port, st, 4, &pkt, sum.tos, now);
}

static __always_inline int out6(struct __sk_buff *skb, struct xde_cfg *cfg, struct port_cfg *pc,
				__u32 port, struct port_stats *st, int rerun)
{
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = (void *)(long)skb->data + ETH_HLEN;
	struct pkt pkt;
	if (!ip6_valid(ip6, data_end, skb->len - ETH_HLEN) || !pkt_parse6(ip6, data_end, &pkt))
		return tc_drop(port, DIR_OUT, DROP_malformed_ipv6);
	/* link-local, multicast and neighbour discovery stay on the port's
	 * link: the gateway answers what it serves and drops the rest */
	if (ip6_link_scoped(pkt.src) || ip6_link_scoped(pkt.dst) || is_ndp(&pkt))
		return gateway_call(skb, port);
	if (!(pc->flags & PORT_F_IP6) || !addr_eq(pkt.src, pc->ip6))
		return tc_drop(port, DIR_OUT, DROP_spoof);
	__u32 tot = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	__u8 tos = ip6->priority << 4 | ip6->flow_lbl[0] >> 4;
	__u64 now = xde_now();
	int rc = firewall_out(skb, cfg, pc, port, rerun ? 0 : st, &pkt, now);
	if (rc < 0)
		rc = mtu_check6(skb, pc, port, st, tot, pkt.src);
	if (rc >= 0)
		return rc;
	return route_out(skb, cfg, pc, port, st, 6, &pkt, tos, now);
}

static __always_inline int overlay_out(struct __sk_buff *skb, struct xde_cfg *cfg,
				       struct port_cfg *pc, __u32 port, struct port_stats *st,
				       int rerun)
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
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return out4(skb, cfg, pc, port, st, rerun);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return out6(skb, cfg, pc, port, st, rerun);
	return tc_drop(port, DIR_OUT, DROP_unsupported);
}

int tc_port_out(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	struct port_cfg *pc = ports.lookup(&port);
	if (!pc)
		return tc_drop(0, DIR_OUT, DROP_unknown_port);
	struct port_stats *st = port_stats_get(port);
	struct fw_job *job = fw_job_get();
	__u32 resumed = fw_tc_resumed(job);
	if (!resumed) {  /* counted on the first run, not after a rule evaluation */
		stat_add(st, P_tx_packets, 1);
		stat_add(st, P_tx_bytes, skb->len);
	}
	struct xde_cfg *cfg = xde_config();
	if (!cfg || !cfg->u1)
		return tc_drop(port, DIR_OUT, DROP_no_underlay);
	if (pc->flags & PORT_F_PASSTHROUGH)
		return passthrough_out(skb, cfg, st);
	/* after the walk of a same-host destination's inbound rules, the
	 * outbound verdict (a flow hit now) was counted in an earlier run */
	int rc = overlay_out(skb, cfg, pc, port, st, resumed == STAGE_TC_LOCAL_IN);
	fw_job_end(job);
	if (rc == TO_NAT) {
		tc_progs.call(skb, PROG_NAT);
		return tc_drop(port, DIR_OUT, DROP_tail_call);
	}
	return rc;
}

/* The firewall's rule walk (fw_job.h): answer, then run the pipeline again. */
int tc_fw_eval(struct __sk_buff *skb)
{
	__u32 dir;
	__u32 port = fw_answer(&dir);
	tc_progs.call(skb, PROG_MAIN);
	fw_job_end(fw_job_get());
	return tc_drop(port, dir, DROP_tail_call);
}

/* Internet-bound traffic that tc_port_out could not translate inline (a
 * flow's first packet, a stale translation, an ICMP error), reached by
 * tail call from it, and from tc_snat once a SNAT port is given: NAT, then
 * encapsulation toward boundary services. A program of its own: inlined,
 * it took tc_port_out past the 512-byte stack. */
int tc_nat(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	struct port_cfg *pc = ports.lookup(&port);
	struct xde_cfg *cfg = xde_config();
	if (!pc || !cfg)
		return tc_drop(port, DIR_OUT, DROP_unknown_port);
	struct port_stats *st = port_stats_get(port);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct pkt pkt;
	__u8 tos;
	if ((void *)(eth + 1) > data_end)
		return tc_drop(port, DIR_OUT, DROP_malformed_inner);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if (!ip4_valid(ip, data_end, skb->len - ETH_HLEN) || !pkt_parse4(ip, data_end, &pkt))
			return tc_drop(port, DIR_OUT, DROP_malformed_ipv4);
		tos = ip->tos;
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if (!ip6_valid(ip6, data_end, skb->len - ETH_HLEN) || !pkt_parse6(ip6, data_end, &pkt))
			return tc_drop(port, DIR_OUT, DROP_malformed_ipv6);
		tos = ip6->priority << 4 | ip6->flow_lbl[0] >> 4;
	}
	int why = nat_out(skb, cfg, port, st, &pkt);
	if (why == NAT_SNAT_NEEDED) {
		tc_progs.call(skb, PROG_SNAT);
		return tc_drop(port, DIR_OUT, DROP_tail_call);
	}
	if (why)
		return tc_drop(port, DIR_OUT, why);
	__u8 bmac[ETH_ALEN] = BSVC_MAC;
	return encap_and_send(skb, cfg, port, st, pc->bsvc_addr, pc->bsvc_vni, bmac, tos, &pkt,
			      xde_now());
}

/* A SNAT port for the flow tc_nat posted (nat.h), then tc_nat again. */
int tc_snat(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	struct xde_cfg *cfg = xde_config();
	if (!cfg)
		return tc_drop(port, DIR_OUT, DROP_unknown_port);
	int why = snat_serve(port, port_stats_get(port), cfg);
	if (why)
		return tc_drop(port, DIR_OUT, why);
	tc_progs.call(skb, PROG_NAT);
	return tc_drop(port, DIR_OUT, DROP_tail_call);
}

/* The gateway's services (reached by tail call from tc_port_out): DHCPv4,
 * neighbour discovery, echo to its IPv6 address, DHCPv6. Whatever it does
 * not answer it drops, with the reason. Apart from the fast path, so that
 * neither the verifier nor the CPU walks DHCP options for every packet. */
int tc_gateway(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	struct port_cfg *pc = ports.lookup(&port);
	if (!pc)
		return tc_drop(0, DIR_OUT, DROP_unknown_port);
	struct port_stats *st = port_stats_get(port);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return tc_drop(port, DIR_OUT, DROP_malformed_inner);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if (!ip4_valid(ip, data_end, skb->len - ETH_HLEN))
			return tc_drop(port, DIR_OUT, DROP_malformed_ipv4);
		return dhcp4_serve(skb, pc, port, st, ip, ETH_HLEN + ip->ihl * 4);
	}
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct pkt pkt;
	__u32 l4 = 0;
	if (eth->h_proto != bpf_htons(ETH_P_IPV6) ||
	    !ip6_valid(ip6, data_end, skb->len - ETH_HLEN) ||
	    !(l4 = pkt_parse6(ip6, data_end, &pkt)))
		return tc_drop(port, DIR_OUT, DROP_malformed_ipv6);
	l4 += ETH_HLEN;
	/* the gateway answers whole packets only; neighbour discovery with a
	 * fragment header, even an atomic one, is ignored (RFC 6980) */
	if (pkt.proto == IPPROTO_ICMPV6 && pkt.icmp_type == ICMPV6_ECHO_REQUEST &&
	    addr_eq(pkt.dst, pc->gw_ip6) && (pc->flags & PORT_F_IP6)) {
		if (pkt.fragment & PKT_FRAGMENT)
			return tc_drop(port, DIR_OUT, DROP_link_local);
		return gateway_echo6(skb, pc, port, st, &pkt, l4);
	}
	if (pkt.proto == IPPROTO_ICMPV6)
		return ndp_serve(skb, pc, port, st, ip6, &pkt, l4);
	if (pkt.proto == IPPROTO_UDP && pkt.dport == bpf_htons(DHCP6_SERVER_PORT))
		return dhcp6_serve(skb, pc, port, st, ip6, &pkt, l4);
	return tc_drop(port, DIR_OUT, DROP_link_local);
}
