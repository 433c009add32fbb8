/* Firewall layer and flow table (docs/design.md, "Firewall and flow
 * table"; OPTE's firewall layer and UFT). Shared by the port's TC program
 * (outbound) and the underlay's XDP program (inbound)
 * (and for same-host delivery, in TC on the destination's behalf).
 *
 * A flow's first packet walks the port's rules for its direction (sorted
 * by priority, first match decides; no match: outbound allow, inbound
 * deny). An allowed flow gets an entry for each direction, so replies
 * pass without a rule. Entries carry the port's epoch; a rule change bumps
 * it, and a flow whose epoch is old is judged again by the rules of the
 * direction it started in. Deny is stateless: nothing is cached.
 *
 * The rule walk runs in a program of its own, reached by tail call: inlined
 * into the pipeline, the verifier would walk 1,024 rules once per path that
 * leads there, far past its limits. So on a flow-table miss the pipeline
 * leaves the question in the per-CPU job and returns VERDICT_PENDING; its caller
 * tail-calls the eval program, which answers and tail-calls the pipeline
 * again from the start; this time firewall() finds the answer. */
#ifndef XDE_FW_H
#define XDE_FW_H

#include "maps.h"
#include "counters.h"

#define NS 1000000000ULL
/* What the firewall says of a packet (apart from a rule's enum fw_action). */
enum fw_verdict { VERDICT_DENY = 0, VERDICT_PASS = 1, VERDICT_PENDING = 2 };
#define VNI_NONE 0xffffffff       /* frames from outside the VPC (External option) */


#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* A whole, consistent IPv4 header: version 4, header inside the packet,
 * total length from the header's end to at most the avail bytes there are. */
static __always_inline int ip4_valid(struct iphdr *ip, void *data_end, __u32 avail)
{
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
		return 0;
	__u32 hlen = ip->ihl * 4, tot = bpf_ntohs(ip->tot_len);
	return hlen <= avail && tot >= hlen && tot <= avail;
}

/* Fill p from the IPv4 header at ip; false when it is not a whole header. */
static __always_inline int pkt4_parse(struct iphdr *ip, void *data_end, struct pkt4 *p)
{
	if ((void *)(ip + 1) > data_end || ip->ihl < 5)
		return 0;
	p->src = ip->saddr;
	p->dst = ip->daddr;
	p->proto = ip->protocol;
	p->sport = p->dport = 0;
	p->tcp_flags = p->icmp_type = p->icmp_code = 0;
	if (ip->frag_off & bpf_htons(0x1fff))
		return 1;                 /* later fragments carry no L4 header */
	void *l4 = (void *)ip + ip->ihl * 4;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) > data_end)
			return 1;
		p->sport = t->source;
		p->dport = t->dest;
		p->tcp_flags = ((__u8 *)t)[13];
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) > data_end)
			return 1;
		p->sport = u->source;
		p->dport = u->dest;
	} else if (p->proto == IPPROTO_ICMP) {
		struct icmphdr *c = l4;
		if ((void *)(c + 1) > data_end)
			return 1;
		p->icmp_type = c->type;
		p->icmp_code = c->code;
		if (c->type == ICMP_ECHO || c->type == ICMP_ECHOREPLY)
			p->sport = p->dport = c->un.echo.id;  /* a ping's flow is its id */
	}
	return 1;
}

/* Branch-free helpers: 1 when x is non-zero / when x equals y. */
static __always_inline __u64 nz(__u64 x)
{
	__u64 neg = 0 - x;
	/* hide that neg is -x: clang would see "x != 0" and emit a jump */
	asm volatile("" : "+r"(neg));
	return (x | neg) >> 63;
}

static __always_inline __u64 eq(__u64 x, __u64 y)
{
	return 1 ^ nz(x ^ y);
}

/* Non-zero when rule r does not match. */
static __always_inline __u64 rule_miss(struct fw_rule *r, struct pkt4 *p, __be32 remote,
				       __u32 vni, __u64 l4ports, __u16 icmp)
{
	__u64 miss = (__u64)r->proto * (r->proto ^ p->proto);
	miss |= (remote ^ r->host) & r->host_mask;
	miss |= (vni ^ r->vni) & r->vni_mask;
	miss |= (icmp ^ r->icmp) & r->icmp_mask;
	__u64 dport = bpf_ntohs(p->dport), hit = 0;
#pragma unroll
	for (int i = 0; i < FW_MAX_PORTS; i++)
		hit |= eq(dport, r->ports[i]);
	/* a port list matches only TCP and UDP, and one of its ports */
	miss |= nz(r->nports) & (1 ^ (hit & l4ports & nz(dport)));  /* port 0: a later fragment */
	return miss;
}

/* The port's rules for dir, first match wins. Returns the matching rule's
 * action (0: none matched) and its id. The loop leaves with the rule's id
 * and action as read from the map, never with its index or a pointer to
 * it: that way every exit looks alike to the verifier, which then checks
 * the code after the loop once rather than once per rule. */
static __always_inline __u32 fw_eval(__u32 port, __u32 dir, struct pkt4 *p, __u32 vni,
				     __u32 *rule_id)
{
	*rule_id = 0;
	struct fw_key k = { .port = port, .dir = dir };
	struct fw_rules *rs = fw_rules.lookup(&k);
	if (!rs)
		return 0;
	__be32 remote = dir == DIR_OUT ? p->dst : p->src;
	__u64 l4ports = p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP;
	__u16 icmp = p->proto == IPPROTO_ICMP ? (p->icmp_type << 8 | p->icmp_code) : 0;
	__u32 n = rs->count, action = 0, id = 0;
	for (__u32 i = 0; i < FW_MAX_RULES; i++) {
		if (i >= n)
			break;
		struct fw_rule *r = &rs->r[i];
		if (!rule_miss(r, p, remote, vni, l4ports, icmp)) {
			action = r->action;
			id = r->id;
			break;
		}
	}
	*rule_id = id;
	return action;
}

static __always_inline struct fw_job *fw_job(void)
{
	__u32 zero = 0;
	struct scratch *sc = scratch.lookup(&zero);
	return sc ? &sc->job : 0;
}

/* True when this run of the pipeline resumes after a rule evaluation. */
static __always_inline int fw_resumed(void)
{
	struct fw_job *j = fw_job();
	return j && j->state == JOB_DONE;
}

static __always_inline int same_pkt(struct pkt4 *a, struct pkt4 *b)
{
	return a->src == b->src && a->dst == b->dst && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto;
}

/* The rules' verdict on p going dir through port: 1 with *allow set when the
 * eval program has answered, 0 after posting the question (VERDICT_PENDING). */
static __always_inline int fw_rules_verdict(__u32 port, __u32 dir, struct pkt4 *p, __u32 vni,
					    __u32 *rule_id, int *allow)
{
	struct fw_job *j = fw_job();
	if (!j) {
		*allow = 0;
		return 1;
	}
	if (j->state == JOB_DONE && j->port == port && j->dir == dir && same_pkt(&j->p, p)) {
		j->state = JOB_IDLE;
		__u32 id = j->rule_id;
		*rule_id = id;
		if (!j->action) {
			*allow = dir == DIR_OUT;  /* the defaults */
			return 1;
		}
		__u64 *hits = fw_hits.lookup(&id);
		if (hits)
			*hits += 1;
		*allow = j->action == FW_ALLOW;
		return 1;
	}
	j->p = *p;
	j->port = port;
	j->dir = dir;
	j->vni = vni;
	j->state = JOB_PENDING;
	return 0;
}

/* The eval program's work: answer the pending job. */
static __always_inline void fw_answer(void)
{
	struct fw_job *j = fw_job();
	if (!j || j->state != JOB_PENDING)
		return;
	j->action = fw_eval(j->port, j->dir, &j->p, j->vni, &j->rule_id);
	j->state = JOB_DONE;
}

static __always_inline void flow_key_of(struct flow_key *k, __u32 port, __u32 dir, struct pkt4 *p)
{
	k->port = port;
	k->dir = dir;
	k->proto = p->proto;
	k->src = p->src;
	k->dst = p->dst;
	k->sport = p->sport;
	k->dport = p->dport;
	k->pad = 0;
}

static __always_inline void flow_key_reverse(struct flow_key *r, struct flow_key *k)
{
	r->port = k->port;
	r->dir = !k->dir;
	r->proto = k->proto;
	r->src = k->dst;
	r->dst = k->src;
	r->sport = k->dport;
	r->dport = k->sport;
	r->pad = 0;
}

static __always_inline __u64 flow_ttl(struct flow_val *f, __u8 proto, struct xde_cfg *cfg)
{
	if (proto != IPPROTO_TCP)
		return cfg->ttl_idle * NS;
	if (f->state == TCP_SYN_SENT)
		return cfg->ttl_tcp_handshake * NS;
	if (f->state == TCP_CLOSED)
		return cfg->ttl_tcp_closed * NS;
	return cfg->ttl_tcp_established * NS;
}

/* TCP state from the flags of a packet going in dir; 1 if it changed. */
static __always_inline int tcp_track(struct flow_val *f, __u32 dir, __u8 flags)
{
	__u8 old = f->state;
	if (flags & TCPF_RST) {
		f->state = TCP_CLOSED;
	} else if (flags & TCPF_FIN) {
		f->fin |= 1 << dir;
		f->state = f->fin == 3 ? TCP_CLOSED : TCP_FIN_WAIT;
	} else if (f->state == TCP_SYN_SENT && dir != f->origin && (flags & TCPF_ACK)) {
		f->state = TCP_ESTABLISHED;
	}
	return f->state != old;
}

/* Mirror what changed in one direction's entry into the other's. */
static __always_inline void flow_sync(struct flow_key *k, struct flow_val *f, __u64 now)
{
	struct flow_key rk;
	flow_key_reverse(&rk, k);
	struct flow_val *r = flows.lookup(&rk);
	if (!r)
		return;
	r->state = f->state;
	r->fin = f->fin;
	r->epoch = f->epoch;
	r->last_ns = now;
}

static __always_inline void flow_create(struct flow_key *k, __u32 epoch, __u32 rule,
					struct pkt4 *p, __u32 vni, __u32 len, __u64 now)
{
	struct flow_val v = { .created_ns = now, .last_ns = now, .packets = 1, .bytes = len,
			      .epoch = epoch, .rule = rule, .vni = vni, .origin = k->dir };
	if (p->proto == IPPROTO_TCP) {
		v.state = (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN ? TCP_SYN_SENT
									       : TCP_ESTABLISHED;
		tcp_track(&v, k->dir, p->tcp_flags);
	}
	flows.update(k, &v);
	struct flow_key rk;
	flow_key_reverse(&rk, k);
	v.packets = v.bytes = 0;
	flows.update(&rk, &v);
}

/* Tail-call the eval program (TC); it comes back to tc_port_out. */
static __always_inline int fw_call_eval(struct __sk_buff *skb)
{
	tc_progs.call(skb, PROG_FW_EVAL);
	return TC_ACT_SHOT;  /* only if the tail call failed */
}

/* VERDICT_PASS, VERDICT_DENY, or VERDICT_PENDING: tail-call PROG_FW_EVAL. */
static __always_inline int firewall(__u32 port, __u32 dir, struct pkt4 *p, __u32 vni,
				    __u32 len, struct xde_cfg *cfg)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 *ep = fw_epoch.lookup(&port);
	__u32 epoch = ep ? *ep : 0;
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
			/* rules changed: judge the flow again where it started */
			port_count(port, P_flow_reevaluated, 1);
			struct pkt4 o = *p;
			if (f->origin != dir) {
				o.src = p->dst;
				o.dst = p->src;
				o.sport = p->dport;
				o.dport = p->sport;
			}
			/* judged as it was first: with the VNI it came in (or none) */
			if (!fw_rules_verdict(port, f->origin, &o, f->vni, &rule, &ok))
				return VERDICT_PENDING;
			f->epoch = epoch;
		}
		if (ok) {
			port_count(port, P_flow_hits, 1);
			__sync_fetch_and_add(&f->packets, 1);
			__sync_fetch_and_add(&f->bytes, len);
			int changed = p->proto == IPPROTO_TCP && tcp_track(f, dir, p->tcp_flags);
			/* keep the other direction's entry alive, about once a second */
			if (changed || reeval || now - f->last_ns > NS)
				flow_sync(&k, f, now);
			f->last_ns = now;
			return VERDICT_PASS;
		}
		struct flow_key rk;
		flow_key_reverse(&rk, &k);
		flows.delete(&rk);
		flows.delete(&k);
	}
	int allow;
	if (!fw_rules_verdict(port, dir, p, vni, &rule, &allow))
		return VERDICT_PENDING;
	port_count(port, P_flow_misses, 1);
	if (!allow) {
		port_count(port, P_fw_denied, 1);
		return VERDICT_DENY;
	}
	port_count(port, P_fw_allowed, 1);
	flow_create(&k, epoch, rule, p, vni, len, now);
	return VERDICT_PASS;
}

#endif
