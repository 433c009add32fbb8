/* Route lookups through the kernel's FIB (bpf_fib_lookup). */
#ifndef XDE_FIB_H
#define XDE_FIB_H

#include "maps.h"

/* Flags newer than the UAPI headers bcc compiles against (kernel >= 6.8). */
#ifndef BPF_FIB_LOOKUP_SKIP_NEIGH
#define BPF_FIB_LOOKUP_SKIP_NEIGH (1U << 2)
#endif
#ifndef BPF_FIB_LOOKUP_TBID
#define BPF_FIB_LOOKUP_TBID (1U << 3)
#endif

/* Underlay liveness, for passthrough's "U1, or U2 while U1 is down".
 * A BPF program cannot read a link's state, but the kernel deletes a
 * link's routes when it goes down: xdectl keeps a host route to a
 * sentinel address fd78:6465:7864::IFINDEX through each underlay in
 * a table of its own, and a link counts as up while the lookup of its
 * sentinel still leads out through it. */
static __always_inline int underlay_alive(struct __sk_buff *skb, struct xde_cfg *cfg, __u32 ifindex)
{
	struct bpf_fib_lookup p = {};
	p.family = AF_INET6;
	p.ifindex = skb->ifindex;
	p.ipv6_dst[0] = bpf_htonl(0xfd786465);
	p.ipv6_dst[1] = bpf_htonl(0x78640000);
	p.ipv6_dst[3] = bpf_htonl(ifindex);
	/* tbid shares its 4 bytes with h_vlan_proto/h_vlan_TCI (UAPI >= 6.8) */
	*(__u32 *)&p.h_vlan_proto = cfg->liveness_table;
	int rc = bpf_fib_lookup(skb, &p, sizeof(p),
				BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_TBID | BPF_FIB_LOOKUP_SKIP_NEIGH);
	return rc == BPF_FIB_LKUP_RET_SUCCESS && p.ifindex == ifindex;
}

#endif
