/* Port datapath, TC ingress on the datapath end of each port's veth: every
 * frame the guest sends enters here (DESIGN.md section 4, outbound). */
#include "xde.h"
#include "maps.h"
#include "counters.h"
#include "fib.h"

/* Passthrough: the frame leaves unchanged on U1, on U2 while U1 is down. */
static __always_inline int passthrough_out(struct __sk_buff *skb, __u32 port)
{
	__u32 k = CFG_KEY;
	struct xde_cfg *cfg = config.lookup(&k);
	if (!cfg || !cfg->u1) {
		port_count(port, P_drop_no_underlay, 1);
		return TC_ACT_SHOT;
	}
	__u32 out = cfg->u1;
	if (!underlay_alive(skb, cfg, cfg->u1) && underlay_alive(skb, cfg, cfg->u2))
		out = cfg->u2;
	port_count(port, P_passthrough_out, 1);
	return bpf_redirect(out, 0);
}

int tc_port_out(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	struct port_cfg *pc = ports.lookup(&port);
	if (!pc) {
		global_count(G_drop_unknown_port);
		return TC_ACT_SHOT;
	}
	port_count(port, P_tx_packets, 1);
	port_count(port, P_tx_bytes, skb->len);
	if (pc->flags & PORT_F_PASSTHROUGH)
		return passthrough_out(skb, port);
	/* The overlay pipeline is not built yet: like the seed's unconfigured
	 * OPTE, every frame is dropped, and counted. */
	port_count(port, P_drop_no_pipeline, 1);
	return TC_ACT_SHOT;
}
