/* Counters: what happened to frames, per port and for the instance, in
 * per-CPU maps (no atomics; xdectl sums the CPUs).
 *
 * Two lists. The events below count what went through; the drop reasons
 * say why a frame died, each counted per direction. A program drops a
 * frame only by returning tc_drop() or xdp_drop() with a reason: nothing
 * else in bpf/ may return TC_ACT_SHOT or XDP_DROP (a unit test checks),
 * so there is no drop without a reason. docs/design.md lists the reasons
 * for operators (a unit test keeps that table equal to this list). */
#ifndef XDE_COUNTERS_H
#define XDE_COUNTERS_H

#include "config.h"
#include "pin.h"

/* Direction, from the port's point of view: out of the guest, or into it. */
enum xde_dir { DIR_OUT = 0, DIR_IN = 1 };

#define XDE_PORT_EVENTS(X) \
	X(rx_packets) X(rx_bytes) X(tx_packets) X(tx_bytes) \
	X(passthrough_out) X(passthrough_in) \
	X(encap) X(decap) X(arp_replies) X(icmp_replies) X(mtu_icmp_sent) \
	X(dhcp4_replies) X(dhcp6_replies) X(ndp_replies) \
	X(underlay_detours) X(route_cache_hits) X(route_cache_misses) \
	X(flow_hits) X(flow_misses) X(flow_reevaluated) X(fw_allowed) X(fw_denied) \
	X(nat_out) X(nat_in) X(snat_allocated) X(snat_reclaimed)

#define XDE_GLOBAL_EVENTS(X) \
	X(passed_to_host)

#define XDE_DROP_REASONS(X) \
	X(malformed_truncated)       /* Geneve datagram shorter than its headers or lengths */ \
	X(malformed_version)         /* Geneve version is not 0 */ \
	X(malformed_options)         /* Geneve options overrun their area or the datagram */ \
	X(malformed_critical_option) /* a critical Geneve option xde does not know */ \
	X(malformed_protocol)        /* Geneve payload is not Ethernet */ \
	X(malformed_inner)           /* frame too short for its Ethernet header */ \
	X(malformed_ipv4)            /* IPv4 header inconsistent with itself or the frame */ \
	X(malformed_ipv6)            /* IPv6 headers cut short, too many, or IPv4-mapped addresses */ \
	X(unsupported)               /* EtherType the overlay does not carry */ \
	X(arp_in_geneve)             /* ARP inside Geneve: ARP never crosses the overlay */ \
	X(no_port)                   /* Geneve for a (VNI, MAC) with no port here */ \
	X(unknown_port)              /* a veth the datapath has no port for */ \
	X(no_underlay)               /* no underlay NIC attached yet */ \
	X(spoof)                     /* source MAC or IP address is not the port's */ \
	X(arp)                       /* ARP the gateway does not answer */ \
	X(ndp)                       /* neighbour discovery the gateway does not answer, or from outside */ \
	X(dhcp4)                     /* DHCPv4 the gateway does not answer */ \
	X(dhcp6)                     /* DHCPv6 the gateway does not answer */ \
	X(link_local)                /* IPv6 link-local or multicast: never leaves the port's link */ \
	X(firewall)                  /* denied by the firewall */ \
	X(mtu)                       /* bigger than the port MTU (ICMP sent back if DF) */ \
	X(no_route)                  /* no route for the destination */ \
	X(router)                    /* the route's target is drop */ \
	X(no_v2p)                    /* no V2P entry for the next hop */ \
	X(no_external_ip)            /* internet-bound, and the port has no external IP of its family */ \
	X(nat_exhausted)             /* no free port in the SNAT range for the protocol */ \
	X(nat_untranslatable)        /* NAT cannot translate it: a fragment, a transport header cut short, or under SNAT a protocol without ports */ \
	X(nat_table_full)            /* no room for the flow's translation */ \
	X(no_nat)                    /* from outside, for an external address with no translation; an ICMP error quoting none */ \
	X(no_port_local)             /* V2P names this host, no port has that MAC */ \
	X(underlay_unreachable)      /* the kernel's FIB has no underlay route */ \
	X(tail_call)                 /* a tail call failed (program missing from its table) */ \
	X(load_failed)               /* bpf_skb_load_bytes failed */ \
	X(store_failed)              /* bpf_skb_store_bytes failed */ \
	X(resize_failed)             /* growing or shrinking the frame failed */ \
	X(csum_failed)               /* a checksum helper failed */ \
	X(no_scratch)                /* the per-CPU scratch map had no entry */

#define XDE_FIELD(n) __u64 n;
struct drops { XDE_DROP_REASONS(XDE_FIELD) };
struct port_stats {
	XDE_PORT_EVENTS(XDE_FIELD)
	struct drops drop[2];     /* indexed by enum xde_dir */
};
struct global_stats {
	XDE_GLOBAL_EVENTS(XDE_FIELD)
	struct drops drop[2];     /* drops before a port is known */
};
#undef XDE_FIELD

#define XDE_INDEX(n) P_##n,
enum port_event { XDE_PORT_EVENTS(XDE_INDEX) P_MAX };
#undef XDE_INDEX
#define XDE_INDEX(n) G_##n,
enum global_event { XDE_GLOBAL_EVENTS(XDE_INDEX) G_MAX };
#undef XDE_INDEX
#define XDE_INDEX(n) DROP_##n,
enum drop_reason { XDE_DROP_REASONS(XDE_INDEX) DROP_MAX };
#undef XDE_INDEX

XDE_MAP("percpu_hash", u32, struct port_stats, port_stats, XDE_MAX_PORTS);
XDE_MAP("percpu_array", u32, struct global_stats, global_stats, 1);

/* A program looks a port's counters up once per packet and counts through
 * the pointer (NULL: the port is going away; nothing counted). */
static __always_inline struct port_stats *port_stats_get(__u32 port)
{
	return port_stats.lookup(&port);
}

static __always_inline void stat_add(struct port_stats *st, enum port_event c, __u64 n)
{
	if (st)
		((__u64 *)st)[c] += n;
}

static __always_inline void global_count(enum global_event c)
{
	__u32 k = 0;
	struct global_stats *g = global_stats.lookup(&k);
	if (g)
		((__u64 *)g)[c] += 1;
}

/* The one place a drop is counted: on the port (its ifindex) when there
 * is one, else (port 0, or a port being deleted) on the instance. */
static __always_inline void count_drop(__u32 port, enum xde_dir dir, enum drop_reason why)
{
	struct port_stats *st = port ? port_stats.lookup(&port) : 0;
	if (st) {
		((__u64 *)&st->drop[dir & 1])[why] += 1;
		return;
	}
	__u32 k = 0;
	struct global_stats *g = global_stats.lookup(&k);
	if (g)
		((__u64 *)&g->drop[dir & 1])[why] += 1;
}

static __always_inline int tc_drop(__u32 port, enum xde_dir dir, enum drop_reason why)
{
	count_drop(port, dir, why);
	return TC_ACT_SHOT;
}

static __always_inline int xdp_drop(__u32 port, enum xde_dir dir, enum drop_reason why)
{
	count_drop(port, dir, why);
	return XDP_DROP;
}

#endif
