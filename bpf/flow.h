/* The flow table (OPTE's UFT): one entry per direction of a flow, holding
 * the firewall's cached verdict, the port's epoch it was reached in, TCP
 * state and statistics. */
#ifndef XDE_FLOW_H
#define XDE_FLOW_H

#include "pin.h"
#include "config.h"
#include "pkt.h"

#define NS 1000000000ULL
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

struct flow_key {
	__u32 port;
	__u8 dir;                 /* enum xde_dir */
	__u8 proto;
	__be16 sport;             /* ICMP echo: the identifier, in both */
	__be32 src[4];            /* IPv4 mapped (pkt.h) */
	__be32 dst[4];
	__be16 dport;
	__u16 pad;
};

enum tcp_state { TCP_NONE = 0, TCP_SYN_SENT, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_CLOSED };

struct flow_val {
	__u64 created_ns;
	__u64 last_ns;
	__u64 packets;
	__u64 bytes;
	__u32 epoch;              /* the port's epoch when the verdict was cached */
	__u32 rule;               /* id of the rule that decided, 0: the default */
	__u32 vni;                /* the VNI the first packet was judged in (VNI_EXTERNAL too) */
	__u8 origin;              /* direction of the flow's first packet */
	__u8 state;               /* enum tcp_state, shared by both entries' views */
	__u8 fin;                 /* bit per direction that sent FIN */
	__u8 pad;
};
XDE_MAP("lru_hash", struct flow_key, struct flow_val, flows, 262144);

static __always_inline void flow_key_of(struct flow_key *k, __u32 port, __u32 dir, struct pkt *p)
{
	k->port = port;
	k->dir = dir;
	k->proto = p->proto;
	addr_copy(k->src, p->src);
	addr_copy(k->dst, p->dst);
	k->sport = p->sport;
	k->dport = p->dport;
	k->pad = 0;
}

/* k becomes the key of the flow's other direction (twice: k again). In
 * place: a second 44-byte key would not fit XDP's stack beside the rest. */
static __always_inline void flow_key_reverse(struct flow_key *k)
{
	swap_ends(k->src, k->dst, &k->sport, &k->dport);
	k->dir = !k->dir;
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
	flow_key_reverse(k);
	struct flow_val *r = flows.lookup(k);
	flow_key_reverse(k);
	if (!r)
		return;
	r->state = f->state;
	r->fin = f->fin;
	r->epoch = f->epoch;
	r->rule = f->rule;
	r->last_ns = now;
}

static __always_inline void flow_create(struct flow_key *k, __u32 epoch, __u32 rule,
					struct pkt *p, __u32 vni, __u32 len, __u64 now)
{
	struct flow_val v = { .created_ns = now, .last_ns = now, .packets = 1, .bytes = len,
			      .epoch = epoch, .rule = rule, .vni = vni, .origin = k->dir };
	if (p->proto == IPPROTO_TCP) {
		v.state = (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN ? TCP_SYN_SENT
									       : TCP_ESTABLISHED;
		tcp_track(&v, k->dir, p->tcp_flags);
	}
	flows.update(k, &v);
	flow_key_reverse(k);
	v.packets = v.bytes = 0;
	flows.update(k, &v);
	flow_key_reverse(k);
}

static __always_inline void flow_delete(struct flow_key *k)
{
	flows.delete(k);
	flow_key_reverse(k);
	flows.delete(k);
	flow_key_reverse(k);
}

#endif
