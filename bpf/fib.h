/* Route lookups through the kernel's FIB (bpf_fib_lookup), the cache of
 * their answers per flow, and what is done when a next hop is not
 * resolved. */
#ifndef XDE_FIB_H
#define XDE_FIB_H

#include "config.h"

/* Flags newer than the UAPI headers bcc compiles against (kernel >= 6.8). */
#ifndef BPF_FIB_LOOKUP_SKIP_NEIGH
#define BPF_FIB_LOOKUP_SKIP_NEIGH (1U << 2)
#endif

/* Underlay liveness, for passthrough's "U1, or U2 while U1 is down".
 * A BPF program cannot read a link's state, but the kernel removes a
 * link's routes while it is down (and skips them while it has no carrier,
 * with ignore_routes_with_linkdown): xdectl gives each underlay the
 * sentinel address fd78:6465:7864::IFINDEX/128, whose prefix route the
 * kernel restores when the link comes back, and a link counts as up while
 * the main table's route to its sentinel leads out through it. */
static __always_inline int underlay_alive(struct __sk_buff *skb, __u32 ifindex)
{
	struct bpf_fib_lookup p = {};
	p.family = AF_INET6;
	p.ifindex = skb->ifindex;
	p.ipv6_dst[0] = bpf_htonl(0xfd786465);
	p.ipv6_dst[1] = bpf_htonl(0x78640000);
	p.ipv6_dst[3] = bpf_htonl(ifindex);
	int rc = bpf_fib_lookup(skb, &p, sizeof(p), BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_SKIP_NEIGH);
	return rc == BPF_FIB_LKUP_RET_SUCCESS && p.ifindex == ifindex;
}

/* Next hops whose neighbour is not resolved. The FIB may pick one while
 * another path is fine: a link that just came back, whose far end does not
 * answer neighbour solicitations until its own stack has caught up (up to
 * a second: the kernel handles link events in batches), or whose link-local
 * address is still being checked for duplicates. The kernel would hold the
 * frames in the neighbour's queue meanwhile, and drop them when it fills.
 * Instead the frame takes the other underlay's next hop toward the same
 * destination, as last seen resolved; once per NH_KICK_NS a copy of it also
 * goes to the unresolved one, so that the kernel keeps resolving it. */
/* Next hops seen resolved, per (underlay destination, egress NIC). */
struct nh_key {
	__u8 dst[16];
	__u32 ifindex;
};
struct nh_val {
	__u8 dmac[6];
	__u8 smac[6];
	__u64 seen_ns;            /* last time the FIB gave this next hop resolved */
	__u64 kick_ns;            /* last time a frame went to it unresolved */
};
XDE_MAP("lru_hash", struct nh_key, struct nh_val, nexthops, 4096);

/* The underlay route cache (OPTE's, 100 ms): what bpf_fib_lookup chose for
 * a flow -- egress NIC and MACs, per (underlay destination, flow hash), so
 * that ECMP keeps spreading flows as the FIB does -- reused for
 * ROUTE_CACHE_NS instead of one FIB lookup per packet. A route that
 * changes or a link that goes down costs at most that long on the flows it
 * carried. Only resolved next hops are cached: a failed lookup, or one
 * whose neighbour is not resolved, is looked up again on the next packet. */
#define ROUTE_CACHE_NS (100ULL * 1000000)
struct route_cache_key {
	__u8 dst[16];
	__u32 hash;
};
struct route_cache_val {
	__u64 stamp_ns;           /* when the FIB gave it */
	__u32 ifindex;
	__u8 dmac[6];
	__u8 smac[6];
	__u8 pad[4];
};
XDE_MAP("lru_hash", struct route_cache_key, struct route_cache_val, route_cache, 65536);

static __always_inline struct route_cache_val *route_cache_get(const __u8 *dst, __u32 hash,
							     __u64 now)
{
	struct route_cache_key k = { .hash = hash };
	__builtin_memcpy(k.dst, dst, 16);
	struct route_cache_val *v = route_cache.lookup(&k);
	return v && now - v->stamp_ns < ROUTE_CACHE_NS ? v : 0;
}

static __always_inline void route_cache_put(const __u8 *dst, __u32 hash,
					    struct bpf_fib_lookup *fib, __u64 now)
{
	struct route_cache_key k = { .hash = hash };
	__builtin_memcpy(k.dst, dst, 16);
	struct route_cache_val v = { .stamp_ns = now, .ifindex = fib->ifindex };
	__builtin_memcpy(v.dmac, fib->dmac, ETH_ALEN);
	__builtin_memcpy(v.smac, fib->smac, ETH_ALEN);
	route_cache.update(&k, &v);
}

#define NH_REFRESH_NS (50ULL * 1000000)   /* how often a resolved next hop is noted */
#define NH_TRUST_NS (1000ULL * 1000000)   /* how long a noted one may stand in */
#define NH_KICK_NS (100ULL * 1000000)

static __always_inline void nexthop_seen(const __u8 *dst, struct bpf_fib_lookup *fib, __u64 now)
{
	struct nh_key k = { .ifindex = fib->ifindex };
	__builtin_memcpy(k.dst, dst, 16);
	struct nh_val *v = nexthops.lookup(&k);
	if (v && now - v->seen_ns < NH_REFRESH_NS && mac_eq(v->dmac, fib->dmac))
		return;
	struct nh_val n = { .seen_ns = now, .kick_ns = v ? v->kick_ns : 0 };
	__builtin_memcpy(n.dmac, fib->dmac, ETH_ALEN);
	__builtin_memcpy(n.smac, fib->smac, ETH_ALEN);
	nexthops.update(&k, &n);
}

/* The FIB chose an unresolved next hop on fib->ifindex. Returns the other
 * underlay, with its next hop's MACs in fib, or 0 if there is none to
 * trust; *kick says whether the chosen one gets this frame too. */
static __always_inline __u32 nexthop_detour(const __u8 *dst, struct xde_cfg *cfg,
					    struct bpf_fib_lookup *fib, __u64 now, int *kick)
{
	struct nh_key k = { .ifindex = fib->ifindex };
	__builtin_memcpy(k.dst, dst, 16);
	struct nh_val *v = nexthops.lookup(&k);
	*kick = !v || now - v->kick_ns >= NH_KICK_NS;
	if (!v) {
		struct nh_val n = { .kick_ns = now };
		nexthops.update(&k, &n);
	} else if (*kick) {
		v->kick_ns = now;
	}
	k.ifindex = fib->ifindex == cfg->u1 ? cfg->u2 : cfg->u1;
	struct nh_val *alt = nexthops.lookup(&k);
	if (!alt || now - alt->seen_ns >= NH_TRUST_NS)
		return 0;
	__builtin_memcpy(fib->dmac, alt->dmac, ETH_ALEN);
	__builtin_memcpy(fib->smac, alt->smac, ETH_ALEN);
	return k.ifindex;
}

#endif
