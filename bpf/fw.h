/* Firewall layer (docs/design.md, "Firewall and flow table"; OPTE's
 * firewall layer over its UFT). Used by the port's TC program (outbound,
 * and inbound on the destination's behalf for same-host delivery) and by
 * the underlay's XDP program (inbound).
 *
 * A flow's first packet walks the port's rules for its direction (no
 * match: outbound allow, inbound deny). An allowed flow gets an entry for
 * each direction, so replies pass without a rule. Entries carry the port's
 * epoch; a rule change bumps it, and a flow whose epoch is old is judged
 * again by the rules of the direction it started in. Deny is stateless:
 * nothing is cached. The epoch is the port's (port_cfg.fw_epoch), read with
 * the port: no lookup of its own. */
#ifndef XDE_FW_H
#define XDE_FW_H

#include "config.h"
#include "counters.h"
#include "pkt.h"
#include "flow.h"
#include "fw_rules.h"
#include "fw_job.h"

/* What the firewall says of a packet. PENDING: the rules must be walked
 * first; tail-call PROG_FW_EVAL (fw_job.h). */
enum fw_verdict { VERDICT_DENY = 0, VERDICT_PASS = 1, VERDICT_PENDING = 2 };

/* p going dir through the port pc, len bytes, at time now, checked by
 * stage (fw_job.h). st: the port's counters, or NULL when this packet's
 * verdict here was counted in an earlier run of the pipeline (then neither
 * the port nor the flow counts it again). */
static __always_inline int firewall(struct port_cfg *pc, struct port_stats *st, __u32 dir,
				    struct pkt *p, __u32 vni, __u32 len, struct xde_cfg *cfg,
				    __u64 now, __u32 stage)
{
	__u32 port = pc->ifindex, epoch = pc->fw_epoch;
	struct flow_key k;
	flow_key_of(&k, port, dir, p);
	__u32 rule;

	struct flow_val *f = flows.lookup(&k);
	/* a new connection on the 4-tuple of a closed one starts afresh */
	if (f && p->proto == IPPROTO_TCP && f->state == TCP_CLOSED &&
	    (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
		f = 0;
	if (f && now - f->last_ns <= flow_ttl(f, p->proto, cfg)) {
		int reeval = f->epoch != epoch, ok = 1;
		if (reeval) {
			/* rules changed: judge the flow again where it
			 * started, as it was first: in its first direction
			 * (p turned around for that, and back), with the
			 * VNI it came in */
			int turn = f->origin != dir;
			if (turn)
				pkt_reverse(p);
			int answered = fw_rules_verdict(port, f->origin, p, f->vni, epoch, stage,
							&rule, &ok);
			if (turn)
				pkt_reverse(p);
			if (!answered)
				return VERDICT_PENDING;
			stat_add(st, P_flow_reevaluated, 1);
			f->epoch = epoch;
			f->rule = rule;   /* what decides it now (flow_sync tells the other entry) */
		}
		if (ok) {
			if (st) {
				stat_add(st, P_flow_hits, 1);
				__sync_fetch_and_add(&f->packets, 1);
				__sync_fetch_and_add(&f->bytes, len);
			}
			int changed = p->proto == IPPROTO_TCP && tcp_track(f, dir, p->tcp_flags);
			/* keep the other direction's entry alive, about once a second */
			if (changed || reeval || now - f->last_ns > NS)
				flow_sync(&k, f, now);
			f->last_ns = now;
			return VERDICT_PASS;
		}
		flow_delete(&k);
	}
	int allow;
	if (!fw_rules_verdict(port, dir, p, vni, epoch, stage, &rule, &allow))
		return VERDICT_PENDING;
	stat_add(st, P_flow_misses, 1);
	if (!allow) {
		stat_add(st, P_fw_denied, 1);
		return VERDICT_DENY;
	}
	stat_add(st, P_fw_allowed, 1);
	flow_create(&k, epoch, rule, p, vni, len, now);
	return VERDICT_PASS;
}

#endif
