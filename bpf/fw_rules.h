/* The firewall's rules and their walk. Rules per port and direction, kept
 * sorted by priority in one map value, so that set-fw-rules replaces a
 * whole rule set with one atomic update; the first match decides. The
 * walk runs only in the eval programs (fw_job.h says why). */
#ifndef XDE_FW_RULES_H
#define XDE_FW_RULES_H

#include "pin.h"
#include "counters.h"
#include "pkt.h"

#ifndef FW_MAX_RULES
#define FW_MAX_RULES 1024
#endif
#define FW_MAX_PORTS 8            /* ports listed in one rule */
enum fw_action { FW_ALLOW = 1, FW_DENY = 2 };
#define FW_PROTO_ANY 0
#define FW_PROTO_ARP 0xfe          /* never matches here: ARP stops at the gateway */

/* A rule as value/mask pairs, so that matching is arithmetic without
 * branches: the verifier walks the rule loop 1,024 times and gives up on
 * a loop with many branches per turn (xdectl fills in the masks). */
struct fw_rule {
	__u32 id;
	__u16 priority;
	__u8 action;              /* enum fw_action */
	__u8 proto;               /* FW_PROTO_ANY, IPPROTO_*, FW_PROTO_ARP */
	__be32 host[4];           /* ip=/subnet=: the remote address (IPv4 mapped) ... */
	__be32 host_mask[4];      /* ... and its mask (0: any host) */
	__u32 vni;                /* vni=: the VNI ... */
	__u32 vni_mask;           /* ... 0xffffffff, or 0: any */
	__u16 icmp;               /* type << 8 | code ... */
	__u16 icmp_mask;          /* ... 0xff00: type only, 0xffff: both, 0: any */
	__u16 nports;             /* 0: any port */
	__u16 ports[FW_MAX_PORTS];/* unused slots 0, never a real port */
	__u16 pad;
};

struct fw_key {
	__u32 port;
	__u32 dir;                /* enum xde_dir */
};

struct fw_rules {
	__u32 count;
	__u32 pad;
	struct fw_rule r[FW_MAX_RULES];
};

XDE_MAP_F("hash", struct fw_key, struct fw_rules, fw_rules, 2048, BPF_F_NO_PREALLOC);
/* per rule id: how many flows it decided */
XDE_MAP("percpu_array", u32, u64, fw_hits, 65536);

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
static __always_inline __u64 rule_miss(struct fw_rule *r, struct pkt *p, const __be32 *remote,
				       __u32 vni, __u64 l4ports, __u16 icmp)
{
	__u64 miss = (__u64)r->proto * (r->proto ^ p->proto);
#pragma unroll
	for (int i = 0; i < 4; i++)
		miss |= (remote[i] ^ r->host[i]) & r->host_mask[i];
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
static __always_inline __u32 fw_eval(__u32 port, __u32 dir, struct pkt *p, __u32 vni,
				     __u32 *rule_id)
{
	*rule_id = 0;
	struct fw_key k = { .port = port, .dir = dir };
	struct fw_rules *rs = fw_rules.lookup(&k);
	if (!rs)
		return 0;
	const __be32 *remote = dir == DIR_OUT ? p->dst : p->src;
	__u64 l4ports = p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP;
	__u16 icmp = p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6 ?
		(p->icmp_type << 8 | p->icmp_code) : 0;
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

#endif
