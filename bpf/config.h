/* What xdectl configures: the instance (its underlay pair and address,
 * flow-table timeouts) and its ports, with the indexes the programs find a
 * port by. */
#ifndef XDE_CONFIG_H
#define XDE_CONFIG_H

#include "pin.h"

#define CFG_KEY 0                 /* key of the one-entry config array */
#define XDE_MAX_PASSTHROUGH 16    /* passthrough ports per root (clone loop bound) */
#define PORT_F_PASSTHROUGH 1      /* port_cfg.flags */
#define PORT_F_IP4 2              /* the port has an IPv4 address */
#define PORT_F_IP6 4              /* the port has an IPv6 address */
/* port_index key VNI of passthrough ports: outside the 24 bits of a VNI */
#define VNI_PASSTHROUGH 0xffffffff
/* The VNI a frame from outside the VPC (Oxide's External option) is judged
 * in by the firewall: matches no vni= filter. */
#define VNI_EXTERNAL 0xfffffffe

/* Instance-wide settings: one root's ports share one underlay pair and one
 * underlay source address (docs/design.md, "Ports and roots"). */
struct xde_cfg {
	__u32 u1;                 /* ifindex of underlay 1, 0 while no port */
	__u32 u2;
	__u8 underlay_addr[16];   /* this host's underlay IPv6 address */
	__u32 nports;
	/* flow-table timeouts in seconds (OPTE's defaults; settable) */
	__u32 ttl_idle;           /* non-TCP flows: idle expiry */
	__u32 ttl_tcp_handshake;
	__u32 ttl_tcp_established;
	__u32 ttl_tcp_closed;     /* after FIN from both sides or RST (TIME_WAIT) */
	char pending[16];         /* port being created: what a killed create leaves */
	__u32 sw_csum;            /* bit i: xdectl turned tx checksum offload off on underlay i+1 */
	__u32 hash_seed;          /* random, set at load: keys the flows' ECMP hash */
};

/* One port, keyed by the ifindex of the veth end the datapath owns. */
struct port_cfg {
	__u32 ifindex;            /* datapath end (TC ingress is attached here) */
	__u32 flags;              /* PORT_F_* */
	__u32 vni;
	__u32 bsvc_vni;
	__u8 mac[6];              /* guest MAC */
	__u8 gw_mac[6];           /* virtual gateway MAC */
	__be32 ip;                /* guest IPv4 (PORT_F_IP4) */
	__be32 gw_ip;             /* virtual gateway IPv4 */
	__be32 subnet;            /* VPC subnet, network byte order */
	__u32 subnet_len;
	__be32 ip6[4];            /* guest IPv6 (PORT_F_IP6) */
	__be32 subnet6[4];        /* VPC IPv6 subnet */
	__u32 subnet6_len;
	__be32 gw_ip6[4];         /* the gateway's IPv6: the EUI-64 link-local of gw_mac */
	__u8 bsvc_addr[16];       /* boundary services underlay address */
	__u32 mtu;                /* guest-facing MTU */
	char name[16];            /* guest-facing interface name */
	char peer[16];            /* datapath end interface name */
	__u32 fw_epoch;           /* bumped by every rule change: cached verdicts are judged again */
};

/* Inbound port lookup: (VNI, destination MAC) -> datapath end ifindex. */
struct port_key {
	__u32 vni;                /* VNI_PASSTHROUGH for passthrough ports */
	__u8 mac[6];
	__u8 pad[2];
};

XDE_MAP("array", u32, struct xde_cfg, config, 1);
#define XDE_MAX_PORTS 1024        /* ports a root holds */
XDE_MAP("hash", u32, struct port_cfg, ports, XDE_MAX_PORTS);
XDE_MAP("hash", struct port_key, u32, port_index, XDE_MAX_PORTS);
/* the passthrough ports' ifindexes, 0-terminated */
XDE_MAP("array", u32, u32, passthru, XDE_MAX_PASSTHROUGH);

/* The datapath's clock: CLOCK_MONOTONIC at the resolution of a jiffy. What
 * the datapath times (flows idle for seconds, the route cache's 100 ms, the
 * next hops' 50 ms to 1 s) is far coarser than that, and reading the TSC
 * for bpf_ktime_get_ns cost a seventh of the decap program on this VM. */
static __always_inline __u64 xde_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

/* Does the port carry this EtherType's family (IPv4 or IPv6)? */
static __always_inline int port_has_family(struct port_cfg *pc, __be16 proto)
{
	if (proto == bpf_htons(ETH_P_IP))
		return pc->flags & PORT_F_IP4;
	if (proto == bpf_htons(ETH_P_IPV6))
		return pc->flags & PORT_F_IP6;
	return 0;
}

static __always_inline struct xde_cfg *xde_config(void)
{
	__u32 k = CFG_KEY;
	return config.lookup(&k);
}

#endif
