/* NAT layer (OPTE's, between router and overlay): what a port sends to
 * the internet gateway leaves from one of its external addresses, and what
 * comes back from outside for them reaches the guest's own.
 *
 * Per port and family (nat_cfg): floating IPs, an ephemeral IP, an SNAT IP
 * with a port range. A flow's first packet out picks, in that order of
 * preference, a floating IP (by the flow's hash), the ephemeral IP, or the
 * SNAT IP and a free port of the range (one pool per protocol: TCP, UDP,
 * ICMP echo with the identifier as the port). Inbound, a packet for the
 * ephemeral or a floating IP starts a flow of its own (1:1 NAT: the address
 * alone changes); for the SNAT IP only replies get through.
 *
 * Every translated flow has two entries in nat_flows, keyed like the flow
 * table: out (the guest's tuple -> the external address and port) and in
 * (the tuple replies arrive with -> the guest's address and port). An
 * entry made under older addresses (nat_cfg.gen) is checked again and
 * forgotten if they no longer have its external address or port.
 *
 * A SNAT port is owned through snat_ports by the flow it was given to;
 * it is free again when that flow has left the flow table or expired
 * there, which the next allocation that probes it finds out. */
#ifndef XDE_NAT_H
#define XDE_NAT_H

#include "pin.h"
#include "config.h"
#include "counters.h"
#include "pkt.h"
#include "flow.h"
#include "csum.h"

#define NAT_MAX_FLOATING 16       /* floating IPs per port and family */
#define NAT_PROBES 64             /* SNAT ports an allocation looks at for a free one */
#define NAT_RECLAIM_PROBES 4      /* .. and then for one whose flow is gone */

enum nat_kind { NAT_SNAT = 1, NAT_EPHEMERAL = 2, NAT_FLOATING = 3 };
/* nat_out's answer when the flow needs a SNAT port first (tc_snat) */
#define NAT_SNAT_NEEDED DROP_MAX
enum snat_pool { POOL_TCP = 0, POOL_UDP = 1, POOL_ICMP = 2, NAT_POOLS = 3 };

/* An address in a struct: bcc describes only the first dimension of a
 * two-dimensional array, and xdectl sizes map values from bcc's types. */
struct nat_addr {
	__be32 a[4];
};

/* One family's external addresses (IPv4 mapped, pkt.h). */
struct nat_ips {
	__be32 snat[4];
	__be32 ephemeral[4];
	struct nat_addr floating[NAT_MAX_FLOATING];
	__u16 snat_start;         /* the SNAT range, host order; 0: no SNAT IP */
	__u16 snat_end;
	__u8 has_ephemeral;
	__u8 nfloating;
	__u16 cursor[4];          /* per pool: where the next allocation starts looking (one spare) */
};

struct nat_cfg {
	__u32 gen;                /* bumped by every change of the addresses */
	__u32 pad;
	struct nat_ips fam[2];    /* [0] IPv4, [1] IPv6 */
};
XDE_MAP("hash", u32, struct nat_cfg, nat_cfg, 1024);

struct nat_val {
	__be32 addr[4];           /* out: the external address; in: the guest's */
	__be16 port;              /* out: the external port; in: the guest's (1:1: unchanged) */
	__u8 kind;                /* enum nat_kind */
	__u8 pad;
	__u32 gen;                /* nat_cfg.gen it was last found valid in */
};
XDE_MAP("lru_hash", struct flow_key, struct nat_val, nat_flows, 131072);

struct snat_key {
	__u32 port;
	__u8 family;              /* 4 or 6 */
	__u8 pool;                /* enum snat_pool */
	__be16 ext_port;
};
struct snat_owner {
	__u64 stamp;              /* odd while a new owner is written over a dead one (cmpxchg) */
	struct flow_key flow;     /* the owning flow's out key */
};
/* not preallocated: a port owns at most its range's ports in each pool */
XDE_MAP_F("hash", struct snat_key, struct snat_owner, snat_ports, 1048576, BPF_F_NO_PREALLOC);

/* The layer's keys, per CPU: beside the rest of the pipeline they would
 * not fit the 512-byte stack. */
struct nat_scratch {
	struct flow_key out;
	struct flow_key in;
	struct snat_owner owner;
	struct nat_val val;
	__u32 snat_port;          /* the port whose flow ns->out waits for a SNAT port (tc_snat) */
	__u32 snat_pool;
};
XDE_MAP("percpu_array", u32, struct nat_scratch, nat_scratch, 1);

static __always_inline struct nat_scratch *nat_scratch_get(void)
{
	__u32 zero = 0;
	return nat_scratch.lookup(&zero);
}

static __always_inline int is_echo(struct pkt *p)
{
	if (p->proto == IPPROTO_ICMP)
		return p->icmp_type == ICMP_ECHO || p->icmp_type == ICMP_ECHOREPLY;
	return p->proto == IPPROTO_ICMPV6 &&
	       (p->icmp_type == ICMPV6_ECHO_REQUEST || p->icmp_type == ICMPV6_ECHO_REPLY);
}

/* The SNAT pool of a packet: SNAT translates TCP, UDP and ICMP echo only,
 * the protocols with a port to give out (-1: another). */
static __always_inline int nat_pool(struct pkt *p)
{
	if (p->proto == IPPROTO_TCP)
		return POOL_TCP;
	if (p->proto == IPPROTO_UDP)
		return POOL_UDP;
	return is_echo(p) ? POOL_ICMP : -1;
}

/* What NAT translates: whole packets (a fragment after the first has no
 * ports to find its flow's translation by, and one of a flow whose ports
 * are 0 would find that flow's), whose transport header, if NAT rewrites
 * one, is whole too. */
static __always_inline int nat_whole(struct pkt *p)
{
	if (p->fragment & PKT_FRAGMENT)
		return 0;
	return p->l4_ok || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP &&
			    p->proto != IPPROTO_ICMP && p->proto != IPPROTO_ICMPV6);
}

static __always_inline int addr_in_floating(struct nat_ips *f, const __be32 *a)
{
#pragma unroll
	for (int i = 0; i < NAT_MAX_FLOATING; i++)
		if (i < f->nfloating && addr_eq(f->floating[i].a, a))
			return 1;
	return 0;
}

/* Do the port's addresses still have ext (and ext_port, under SNAT) for a
 * flow translated as kind? */
static __always_inline int nat_has(struct nat_ips *f, __u8 kind, const __be32 *ext, __be16 ext_port)
{
	if (kind == NAT_FLOATING)
		return addr_in_floating(f, ext);
	if (kind == NAT_EPHEMERAL)
		return f->has_ephemeral && addr_eq(f->ephemeral, ext);
	__u16 port = bpf_ntohs(ext_port);
	return f->snat_start && addr_eq(f->snat, ext) && port >= f->snat_start &&
	       port <= f->snat_end;
}

/* Keys of a translated flow's two entries, from the guest's tuple p (going
 * out) and its external address and port: in is what replies carry. */
static __always_inline void nat_in_key(struct flow_key *in, struct flow_key *out,
				       const __be32 *ext, __be16 ext_port, int echo)
{
	*in = *out;
	swap_ends(in->src, in->dst, &in->sport, &in->dport);
	in->dir = DIR_IN;
	addr_copy(in->dst, ext);
	in->dport = ext_port;
	if (echo)                 /* the identifier is both "ports" of a ping */
		in->sport = ext_port;
}

/* The other way: the out key from the in key and the guest's address and
 * port. */
static __always_inline void nat_out_key(struct flow_key *out, struct flow_key *in,
					const __be32 *guest, __be16 guest_port, int echo)
{
	*out = *in;
	swap_ends(out->src, out->dst, &out->sport, &out->dport);
	out->dir = DIR_OUT;
	addr_copy(out->src, guest);
	out->sport = guest_port;
	if (echo)
		out->dport = guest_port;
}

/* Forget a translated flow: both its entries (and, under SNAT, the port
 * goes back to the pool when its owner entry is next probed). */
static __always_inline void nat_forget(struct flow_key *out, struct flow_key *in,
				       struct nat_val *v, int echo)
{
	nat_in_key(in, out, v->addr, v->port, echo);
	nat_flows.delete(in);
	nat_flows.delete(out);
}

/* Write both entries of the flow ns->out's translation. flags: BPF_ANY,
 * or BPF_NOEXIST when the flow may not have one yet (one started from
 * outside must not take over a translation the guest's tuple has). */
static __always_inline int nat_put(struct nat_scratch *ns, const __be32 *ext, __be16 ext_port,
				   const __be32 *guest, __be16 guest_port, __u8 kind, __u32 gen, int echo,
				   __u64 flags)
{
	struct nat_val *v = &ns->val;
	struct flow_key *out = &ns->out, *in = &ns->in;
	addr_copy(v->addr, ext);
	v->port = ext_port;
	v->kind = kind;
	v->pad = 0;
	v->gen = gen;
	nat_in_key(in, out, ext, ext_port, echo);
	if (flags == BPF_NOEXIST ? nat_flows.insert(out, v) : nat_flows.update(out, v))
		return -1;
	addr_copy(v->addr, guest);
	v->port = guest_port;
	if (nat_flows.update(in, v)) {
		nat_flows.delete(out);
		return -1;
	}
	return 0;
}

static __always_inline int flow_key_eq(struct flow_key *a, struct flow_key *b)
{
	return a->port == b->port && a->dir == b->dir && a->proto == b->proto &&
	       a->sport == b->sport && a->dport == b->dport && addr_eq(a->src, b->src) &&
	       addr_eq(a->dst, b->dst);
}

/* The SNAT port ext_port goes back to its pool, if the flow out (whose
 * translation is being forgotten) still owns it. */
static __always_inline void snat_release(__u32 port, int v6, __u8 proto, __be16 ext_port,
					 struct flow_key *out)
{
	struct snat_key sk = { .port = port, .family = v6 ? 6 : 4,
			       .pool = proto == IPPROTO_TCP ? POOL_TCP :
				       proto == IPPROTO_UDP ? POOL_UDP : POOL_ICMP,
			       .ext_port = ext_port };
	struct snat_owner *o = snat_ports.lookup(&sk);
	if (o && flow_key_eq(&o->flow, out))
		snat_ports.delete(&sk);
}

/* Is the flow that owns a SNAT port still there? */
static __always_inline int flow_alive(struct flow_key *k, struct xde_cfg *cfg, __u64 now)
{
	struct flow_val *f = flows.lookup(k);
	return f && now - f->last_ns <= flow_ttl(f, k->proto, cfg);
}

/* Is the flow that owns a SNAT port still there? Either direction's entry
 * says so: a flow that mostly receives refreshes its out entry only now
 * and then (flow_sync). rev: room for the other direction's key. */
static __always_inline int snat_owner_alive(struct snat_owner *o, struct flow_key *rev,
					    struct xde_cfg *cfg, __u64 now)
{
	if (flow_alive(&o->flow, cfg, now))
		return 1;
	*rev = o->flow;
	flow_key_reverse(rev);
	return flow_alive(rev, cfg, now);
}

/* min(n, max), computed where the verifier sees it: left to itself, clang
 * folds a loop's two bounds into one the verifier cannot see is small. */
static __always_inline __u32 bounded(__u32 n, __u32 max)
{
	__u32 m = n < max ? n : max;
	asm volatile("" : "+r"(m));
	if (m > max)
		m = max;
	return m;
}

/* Take over the SNAT port sk if the flow that owns it (o) is gone: atomically, by
 * bumping the owner's stamp; the dead owner's translation goes with it.
 * Returns whether it did. */
static __always_inline int snat_reclaim(struct snat_owner *o, struct nat_scratch *ns,
					struct xde_cfg *cfg, __u64 now)
{
	/* the stamp is odd while an owner is written: read it first, so that
	 * an owner judged dead is the one still there when it is claimed */
	__u64 stamp = o->stamp;
	if ((stamp & 1) || snat_owner_alive(o, &ns->in, cfg, now))
		return 0;
	if (__sync_val_compare_and_swap(&o->stamp, stamp, stamp + 1) != stamp)
		return 0;                 /* another CPU took it over first */
	struct nat_val *old = nat_flows.lookup(&o->flow);
	if (old)
		nat_forget(&o->flow, &ns->in, old,
			   o->flow.proto == IPPROTO_ICMP || o->flow.proto == IPPROTO_ICMPV6);
	o->flow = ns->owner.flow;
	__sync_fetch_and_add(&o->stamp, 1);   /* even again: written */
	return 1;
}

/* A port of the pool for the flow ns->out, looked for from where the last
 * allocation stopped: the first of NAT_PROBES ports that no flow owns, or
 * failing that the first of them whose owner is gone (so the ports given
 * out longest ago are looked at first). 0: none. */
static __always_inline __u16 snat_alloc(struct nat_ips *f, __u32 port, int v6, int pool,
					struct nat_scratch *ns, struct xde_cfg *cfg, __u64 now,
					__u32 *reclaimed)
{
	__u32 start = f->snat_start, n = (__u32)f->snat_end - start + 1;
	__u32 cursor = f->cursor[pool & 3];
	struct snat_key sk = { .port = port, .family = v6 ? 6 : 4, .pool = pool };
	ns->owner.stamp = 0;
	ns->owner.flow = ns->out;
	__u32 off = 0;
	int found = 0;
	for (__u32 i = 0; i < bounded(n, NAT_PROBES); i++) {
		off = (cursor + i) % n;
		sk.ext_port = bpf_htons(start + off);
		if (!snat_ports.lookup(&sk) && !snat_ports.insert(&sk, &ns->owner)) {
			found = 1;
			break;
		}
	}
	for (__u32 i = 0; !found && i < bounded(n, NAT_RECLAIM_PROBES); i++) {
		off = (cursor + i) % n;
		sk.ext_port = bpf_htons(start + off);
		struct snat_owner *o = snat_ports.lookup(&sk);
		if (o && snat_reclaim(o, ns, cfg, now)) {
			*reclaimed = 1;
			found = 1;
		}
	}
	if (!found)
		return 0;
	f->cursor[pool & 3] = off + 1;
	return start + off;
}

/* Give the out flow its external address and port, by preference. Returns
 * 0, the drop reason, or NAT_SNAT_NEEDED. */
static __always_inline int nat_new_out(struct nat_cfg *nc, __u32 port, struct pkt *p,
				       struct nat_scratch *ns, struct xde_cfg *cfg)
{
	int v6 = !addr_v4mapped(p->src);
	struct nat_ips *f = &nc->fam[v6 & 1];
	int echo = is_echo(p);
	if (f->nfloating) {
		__u32 i = flow_hash(p, cfg->hash_seed) % f->nfloating;
		return nat_put(ns, f->floating[i & (NAT_MAX_FLOATING - 1)].a, p->sport,
			       p->src, p->sport, NAT_FLOATING, nc->gen, echo, BPF_ANY) ?
		       DROP_nat_table_full : 0;
	}
	if (f->has_ephemeral)
		return nat_put(ns, f->ephemeral, p->sport, p->src, p->sport,
			       NAT_EPHEMERAL, nc->gen, echo, BPF_ANY) ? DROP_nat_table_full : 0;
	if (!f->snat_start)
		return DROP_no_external_ip;
	int pool = nat_pool(p);
	if (pool < 0)
		return DROP_nat_untranslatable;
	ns->snat_port = port;
	ns->snat_pool = pool;
	return NAT_SNAT_NEEDED;
}

/* The search for a SNAT port, in a program of its own (tc_snat): with the
 * pipeline's other branches around it, its loops would take the verifier
 * past its limits. The flow is ns->out, posted by nat_new_out. Returns 0
 * when the flow has its translation, or the drop reason. */
static __always_inline int snat_serve(__u32 port, struct port_stats *st, struct xde_cfg *cfg)
{
	struct nat_scratch *ns = nat_scratch_get();
	struct nat_cfg *nc = nat_cfg.lookup(&port);
	if (!ns || !nc || ns->snat_port != port)
		return DROP_tail_call;
	ns->snat_port = 0;
	int v6 = !addr_v4mapped(ns->out.src);
	struct nat_ips *f = &nc->fam[v6 & 1];
	if (!f->snat_start)           /* changed since the flow was posted */
		return DROP_no_external_ip;
	__u32 reclaimed = 0;
	__u16 ext = snat_alloc(f, port, v6, ns->snat_pool, ns, cfg, xde_now(), &reclaimed);
	if (!ext)
		return DROP_nat_exhausted;
	stat_add(st, P_snat_allocated, 1);
	stat_add(st, P_snat_reclaimed, reclaimed);
	__be32 guest[4];
	addr_copy(guest, ns->out.src);
	if (nat_put(ns, f->snat, bpf_htons(ext), guest, ns->out.sport, NAT_SNAT, nc->gen,
		    ns->snat_pool == POOL_ICMP, BPF_ANY)) {
		struct snat_key sk = { .port = port, .family = v6 ? 6 : 4, .pool = ns->snat_pool,
				       .ext_port = bpf_htons(ext) };
		snat_ports.delete(&sk);
		return DROP_nat_table_full;
	}
	return 0;
}

/* The checksum fields NAT must mend, from the IP header: -1 none. */
static __always_inline int l4_csum_off(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return 16;
	if (proto == IPPROTO_UDP)
		return 6;
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6)
		return 2;
	return -1;
}

/* Where the port NAT rewrites sits in the L4 header: the source (going
 * out) or destination (coming in) port, or a ping's identifier; -1 none. */
static __always_inline int l4_port_off(struct pkt *p, int dir)
{
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)
		return dir == DIR_OUT ? 0 : 2;
	return is_echo(p) ? 4 : -1;
}

/* Rewrite the source (out) or destination (in) address and port of the
 * packet at l3 in an skb, with its checksums. The helpers keep a
 * checksum the kernel has yet to finish (CHECKSUM_PARTIAL) right. */
static __always_inline int nat_rewrite_skb(struct __sk_buff *skb, __u32 l3, struct pkt *p,
					   int dir, const __be32 *addr, __be16 port)
{
	int v6 = !addr_v4mapped(p->src);
	__be32 *old = dir == DIR_OUT ? p->src : p->dst;
	__be16 old_port = dir == DIR_OUT ? p->sport : p->dport;
	__u32 l4 = l3 + p->l4;
	int csum = l4_csum_off(p->proto), poff = l4_port_off(p, dir);
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (v6) {
		__s64 diff = bpf_csum_diff(old, 16, (__be32 *)addr, 16, 0);
		if (bpf_skb_store_bytes(skb, l3 + (dir == DIR_OUT ? 8 : 24), (void *)addr, 16, 0) < 0)
			return DROP_store_failed;
		if (csum >= 0 && bpf_l4_csum_replace(skb, l4 + csum, 0, diff,
						     BPF_F_PSEUDO_HDR | mangled) < 0)
			return DROP_csum_failed;
	} else {
		__u32 at = l3 + (dir == DIR_OUT ? 12 : 16);
		if (bpf_skb_store_bytes(skb, at, (void *)&addr[3], 4, 0) < 0)
			return DROP_store_failed;
		if (bpf_l3_csum_replace(skb, l3 + 10, old[3], addr[3], 4) < 0)
			return DROP_csum_failed;
		if (csum >= 0 && p->proto != IPPROTO_ICMP &&
		    bpf_l4_csum_replace(skb, l4 + csum, old[3], addr[3],
					BPF_F_PSEUDO_HDR | mangled | 4) < 0)
			return DROP_csum_failed;
	}
	if (poff >= 0 && port != old_port) {
		if (bpf_skb_store_bytes(skb, l4 + poff, &port, 2, 0) < 0)
			return DROP_store_failed;
		if (bpf_l4_csum_replace(skb, l4 + csum, old_port, port, mangled | 2) < 0)
			return DROP_csum_failed;
	}
	return 0;
}

/* The incremental checksum update (RFC 1624) of a field *c by diff, the
 * bpf_csum_diff of what changed under it. */
static __always_inline void csum_mend(__sum16 *c, __s64 diff, int udp)
{
	if (udp && !*c)
		return;                   /* IPv4 UDP without a checksum */
	__sum16 v = fold_csum((__u64)(__u16)~*c + (__u32)diff);
	*c = udp && !v ? 0xffff : v;
}

/* The same for a packet XDP sees (l3: its IP header, inside the frame;
 * checksums here are always whole). */
static __always_inline int nat_rewrite_xdp(void *l3, void *data_end, struct pkt *p, int dir,
					   const __be32 *addr, __be16 port)
{
	int v6 = !addr_v4mapped(p->src);
	__be32 *old = dir == DIR_OUT ? p->src : p->dst;
	__be16 old_port = dir == DIR_OUT ? p->sport : p->dport;
	int udp = p->proto == IPPROTO_UDP;
	void *l4 = l3 + (p->l4 & 0x3fff);
	__sum16 *c = 0;
	__be16 *pf = 0;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) > data_end)
			return DROP_malformed_inner;
		c = &t->check;
		pf = dir == DIR_OUT ? &t->source : &t->dest;
	} else if (udp) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) > data_end)
			return DROP_malformed_inner;
		c = &u->check;
		pf = dir == DIR_OUT ? &u->source : &u->dest;
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		struct icmphdr *ic = l4;
		if ((void *)(ic + 1) > data_end)
			return DROP_malformed_inner;
		c = &ic->checksum;
		if (is_echo(p))
			pf = &ic->un.echo.id;
	}
	__s64 diff;
	if (v6) {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end)
			return DROP_malformed_inner;
		diff = bpf_csum_diff(old, 16, (__be32 *)addr, 16, 0);
		__builtin_memcpy(dir == DIR_OUT ? (void *)&ip6->saddr : (void *)&ip6->daddr, addr, 16);
	} else {
		struct iphdr *ip = l3;
		if ((void *)(ip + 1) > data_end)
			return DROP_malformed_inner;
		diff = bpf_csum_diff(&old[3], 4, (__be32 *)&addr[3], 4, 0);
		csum_mend(&ip->check, diff, 0);
		if (dir == DIR_OUT)
			ip->saddr = addr[3];
		else
			ip->daddr = addr[3];
		if (p->proto == IPPROTO_ICMP)
			diff = 0;         /* ICMP has no pseudo-header */
	}
	if (pf && port != old_port) {
		__be32 from = old_port, to = port;
		diff = bpf_csum_diff(&from, 4, &to, 4, diff);
		*pf = port;
	}
	if (c)
		csum_mend(c, diff, udp);
	return 0;
}

static __always_inline int icmp_error(struct pkt *p)
{
	if (p->proto == IPPROTO_ICMP)
		return p->icmp_type == ICMP_DEST_UNREACH || p->icmp_type == ICMP_TIME_EXCEEDED ||
		       p->icmp_type == ICMP_PARAMETERPROB;
	return p->proto == IPPROTO_ICMPV6 && p->icmp_type >= 1 && p->icmp_type <= 4;
}

/* One 16-bit word's change, in the form bpf_csum_diff gives. */
static __always_inline __s64 word_diff(__be16 from, __be16 to, __s64 seed)
{
	__be32 f = from, t = to;
	return bpf_csum_diff(&f, 4, &t, 4, seed);
}

/* An ICMP error about a translated flow. One end of the packet it quotes
 * is ours: coming in (dir DIR_IN), the quote's source is the external
 * address and port the packet left with, and the guest must find its own
 * there (a path MTU, an unreachable port), with the error addressed to it;
 * going out (a guest's error about a packet that reached it through its
 * floating or ephemeral IP), the quote's destination and the error's
 * source become the external ones. Both ways the quote, read from its
 * far end, keys the flow's entry for dir. Checksums: the outer IPv4
 * header's, the quoted IPv4 header's, and the ICMP message's (the quoted
 * transport checksum is left as it is: errors often quote it cut short). */
static __always_inline int nat_error(void *l3, void *data_end, struct nat_cfg *nc,
				     struct nat_scratch *ns, __u32 port, struct port_stats *st,
				     struct pkt *p, int v6, int dir)
{
	struct icmphdr *ic = l3 + (p->l4 & 0x3fff);
	if ((void *)(ic + 1) > data_end)
		return DROP_no_nat;
	struct flow_key *k = &ns->in;
	__builtin_memset(k, 0, sizeof(*k));
	k->port = port;
	k->dir = dir;
	void *q = ic + 1;             /* the quoted packet's IP header */
	__be32 *qaddr;                /* its end that is ours */
	__be16 *qcheck = 0;           /* its header checksum (IPv4) */
	void *ql4;
	if (v6) {
		struct ipv6hdr *q6 = q;
		if ((void *)(q6 + 1) > data_end)
			return DROP_no_nat;
		k->proto = q6->nexthdr;   /* no extension headers: NAT'ed flows carry none */
		addr_copy(k->src, &q6->daddr);
		addr_copy(k->dst, &q6->saddr);
		qaddr = dir == DIR_IN ? (__be32 *)&q6->saddr : (__be32 *)&q6->daddr;
		ql4 = q6 + 1;
	} else {
		struct iphdr *q4 = q;
		if ((void *)(q4 + 1) > data_end || q4->ihl != 5)
			return DROP_no_nat;
		k->proto = q4->protocol;
		addr_from4(k->src, q4->daddr);
		addr_from4(k->dst, q4->saddr);
		qaddr = dir == DIR_IN ? &q4->saddr : &q4->daddr;
		qcheck = &q4->check;
		ql4 = q4 + 1;
	}
	/* source and destination ports; an echo: type and code, checksum, id */
	__be16 *qports = ql4;
	if ((void *)(qports + 4) > data_end)
		return DROP_no_nat;
	int echo = k->proto == IPPROTO_ICMP || k->proto == IPPROTO_ICMPV6;
	__be16 *qport = echo ? &qports[2] : &qports[dir == DIR_IN ? 0 : 1];
	k->sport = echo ? qports[2] : qports[1];
	k->dport = echo ? qports[2] : qports[0];
	struct nat_val *v = nat_flows.lookup(k);
	if (!v)
		return DROP_no_nat;
	/* going out, the entry holds the external end; coming in, the guest's */
	if (v->gen != nc->gen && !nat_has(&nc->fam[v6 & 1], v->kind,
					  dir == DIR_IN ? k->dst : v->addr,
					  dir == DIR_IN ? k->dport : v->port))
		return DROP_no_nat;
	/* the ICMP checksum covers the quoted bytes (and for ICMPv6 the
	 * outer addresses too) */
	__s64 diff = v6 ? bpf_csum_diff(qaddr, 16, v->addr, 16, 0) :
			  bpf_csum_diff(qaddr, 4, &v->addr[3], 4, 0);
	if (qcheck) {
		__be16 old = *qcheck;
		csum_mend(qcheck, diff, 0);
		diff = word_diff(old, *qcheck, diff);
	}
	diff = word_diff(*qport, v->port, diff);
	*qport = v->port;
	if (v6) {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end)
			return DROP_no_nat;
		__be32 *outer = dir == DIR_IN ? (__be32 *)&ip6->daddr : (__be32 *)&ip6->saddr;
		__builtin_memcpy(qaddr, v->addr, 16);
		diff = bpf_csum_diff(outer, 16, v->addr, 16, diff);
		__builtin_memcpy(outer, v->addr, 16);
	} else {
		struct iphdr *ip = l3;
		if ((void *)(ip + 1) > data_end)
			return DROP_no_nat;
		__be32 *outer = dir == DIR_IN ? &ip->daddr : &ip->saddr;
		*qaddr = v->addr[3];
		csum_mend(&ip->check, bpf_csum_diff(outer, 4, &v->addr[3], 4, 0), 0);
		*outer = v->addr[3];
	}
	csum_mend(&ic->checksum, diff, 0);
	addr_copy(dir == DIR_IN ? p->dst : p->src, v->addr);
	stat_add(st, dir == DIR_IN ? P_nat_in : P_nat_out, 1);
	return 0;
}

/* p as NAT left its packet: the source (out) or destination (in) address
 * and port replaced. */
static __always_inline void pkt_translated(struct pkt *p, int dir, const __be32 *addr, __be16 port)
{
	addr_copy(dir == DIR_OUT ? p->src : p->dst, addr);
	if (l4_port_off(p, dir) < 0)
		return;
	if (is_echo(p))
		p->sport = p->dport = port;
	else if (dir == DIR_OUT)
		p->sport = port;
	else
		p->dport = port;
}

/* The translation of p going dir through port, if it has one made under
 * the port's current addresses and p is whole and no ICMP error: what the
 * inline paths use as it is; anything else is for tc_nat / xdp_nat. */
static __always_inline struct nat_val *nat_current(__u32 port, int dir, struct pkt *p)
{
	struct nat_cfg *nc = nat_cfg.lookup(&port);
	struct nat_scratch *ns = nat_scratch_get();
	if (!nc || !ns || !nat_whole(p) || icmp_error(p))
		return 0;
	flow_key_of(&ns->in, port, dir, p);
	struct nat_val *v = nat_flows.lookup(&ns->in);
	return v && v->gen == nc->gen ? v : 0;
}

/* Outbound, the common case inline (tc_port_out): a flow whose
 * translation is there and current. Returns 0 when translated (p now
 * carries the external source), -1 when tc_nat must see to it, or a drop
 * reason. */
static __always_inline int nat_out_hit(struct __sk_buff *skb, __u32 port, struct port_stats *st,
				       struct pkt *p)
{
	struct nat_val *v = nat_current(port, DIR_OUT, p);
	if (!v)
		return -1;
	int why = nat_rewrite_skb(skb, ETH_HLEN, p, DIR_OUT, v->addr, v->port);
	if (why)
		return why;
	pkt_translated(p, DIR_OUT, v->addr, v->port);
	stat_add(st, P_nat_out, 1);
	return 0;
}

/* Outbound, for a packet the router sends to the internet gateway: find or
 * make the flow's translation and apply it. Returns 0 to go on (p now
 * carries the external source), the drop reason, or NAT_SNAT_NEEDED. */
static __always_inline int nat_out(struct __sk_buff *skb, struct xde_cfg *cfg, __u32 port,
				   struct port_stats *st, struct pkt *p)
{
	struct nat_cfg *nc = nat_cfg.lookup(&port);
	if (!nc)
		return DROP_no_external_ip;
	struct nat_scratch *ns = nat_scratch_get();
	if (!ns)
		return DROP_no_scratch;
	if (!nat_whole(p))
		return DROP_nat_untranslatable;
	int v6 = !addr_v4mapped(p->src);
	if (icmp_error(p)) {
		void *data_end = (void *)(long)skb->data_end;
		void *l3 = (void *)(long)skb->data + ETH_HLEN;
		return nat_error(l3, data_end, nc, ns, port, st, p, v6, DIR_OUT);
	}
	flow_key_of(&ns->out, port, DIR_OUT, p);
	struct nat_val *v = nat_flows.lookup(&ns->out);
	if (v && v->gen != nc->gen) {
		if (!nat_has(&nc->fam[v6 & 1], v->kind, v->addr, v->port)) {
			if (v->kind == NAT_SNAT)
				snat_release(port, v6, p->proto, v->port, &ns->out);
			nat_forget(&ns->out, &ns->in, v, is_echo(p));
			v = 0;
		} else {
			v->gen = nc->gen;
		}
	}
	if (!v) {
		int why = nat_new_out(nc, port, p, ns, cfg);
		if (why)
			return why;
		v = nat_flows.lookup(&ns->out);
		if (!v)
			return DROP_nat_table_full;
	}
	int why = nat_rewrite_skb(skb, ETH_HLEN, p, DIR_OUT, v->addr, v->port);
	if (why)
		return why;
	pkt_translated(p, DIR_OUT, v->addr, v->port);
	stat_add(st, P_nat_out, 1);
	return 0;
}

/* Is a (16-byte) destination the guest's own address? */
static __always_inline int own_address(struct port_cfg *pc, struct pkt *p)
{
	if (addr_v4mapped(p->dst))
		return (pc->flags & PORT_F_IP4) && p->dst[3] == pc->ip;
	return (pc->flags & PORT_F_IP6) && addr_eq(p->dst, pc->ip6);
}

/* Inbound, the common case inline (xdp_underlay): a reply of a flow whose
 * translation is there and current. Returns 0 when translated (p now
 * carries the guest's address), -1 when xdp_nat must see to it, or a drop
 * reason. */
static __always_inline int nat_in_hit(void *l3, void *data_end, struct port_cfg *pc,
				      struct port_stats *st, struct pkt *p)
{
	struct nat_val *v = nat_current(pc->ifindex, DIR_IN, p);
	if (!v)
		return -1;
	int why = nat_rewrite_xdp(l3, data_end, p, DIR_IN, v->addr, v->port);
	if (why)
		return why;
	pkt_translated(p, DIR_IN, v->addr, v->port);
	stat_add(st, P_nat_in, 1);
	return 0;
}

/* Inbound, for a packet from outside the VPC to an address that is not the
 * guest's own: a reply of a translated flow, or the start of one to the
 * ephemeral or a floating IP. Returns 0 to go on (p now carries the
 * guest's address), or the drop reason. */
static __always_inline int nat_in(void *l3, void *data_end, struct port_cfg *pc,
				  struct port_stats *st, struct pkt *p)
{
	__u32 port = pc->ifindex;
	struct nat_cfg *nc = nat_cfg.lookup(&port);
	if (!nc)
		return DROP_no_nat;
	struct nat_scratch *ns = nat_scratch_get();
	if (!ns)
		return DROP_no_scratch;
	if (!nat_whole(p))
		return DROP_nat_untranslatable;
	int v6 = !addr_v4mapped(p->src), echo = is_echo(p);
	/* an error is about the flow it quotes, not one of its own */
	if (icmp_error(p))
		return nat_error(l3, data_end, nc, ns, port, st, p, v6, DIR_IN);
	struct nat_ips *f = &nc->fam[v6 & 1];
	struct flow_key *in = &ns->in, *out = &ns->out;
	flow_key_of(in, port, DIR_IN, p);
	struct nat_val *v = nat_flows.lookup(in);
	if (v && v->gen != nc->gen) {
		if (!nat_has(f, v->kind, p->dst, p->dport)) {
			/* the out entry's key: the guest's tuple */
			nat_out_key(out, in, v->addr, v->port, echo);
			if (v->kind == NAT_SNAT)
				snat_release(port, v6, p->proto, p->dport, out);
			nat_flows.delete(out);
			nat_flows.delete(in);
			v = 0;
		} else {
			v->gen = nc->gen;
		}
	}
	__be32 guest[4];
	__be16 guest_port = p->dport;
	if (v) {
		addr_copy(guest, v->addr);
		guest_port = v->port;
	} else {
		/* a new flow, to the ephemeral or a floating IP */
		__u8 kind = addr_in_floating(f, p->dst) ? NAT_FLOATING :
			    f->has_ephemeral && addr_eq(f->ephemeral, p->dst) ? NAT_EPHEMERAL : 0;
		if (!kind)
			return DROP_no_nat;
		if (v6)
			addr_copy(guest, pc->ip6);
		else
			addr_from4(guest, pc->ip);
		/* the guest's tuple may have a translation already (its flow to
		 * this peer leaves from another address): not this one's to
		 * take over */
		nat_out_key(out, in, guest, p->dport, echo);
		if (nat_flows.lookup(out))
			return DROP_no_nat;
		if (nat_put(ns, p->dst, p->dport, guest, p->dport, kind, nc->gen, echo, BPF_NOEXIST))
			return DROP_nat_table_full;
	}
	int why = nat_rewrite_xdp(l3, data_end, p, DIR_IN, guest, guest_port);
	if (why)
		return why;
	pkt_translated(p, DIR_IN, guest, guest_port);
	stat_add(st, P_nat_in, 1);
	return 0;
}

#endif
