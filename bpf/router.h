/* Router layer: longest-prefix match on the port's table. One LPM trie for
 * all ports; the port's ifindex leads the key so each port has its own
 * table. System entries (made by create) live in a second trie so that a
 * custom entry of the same length wins over them without erasing them
 * (OPTE's priority rule). */
#ifndef XDE_ROUTER_H
#define XDE_ROUTER_H

#include "pin.h"

enum route_target { RT_DROP = 1, RT_IG = 2, RT_IP4 = 3, RT_SUB4 = 4 };
struct route_key {
	__u32 prefixlen;          /* 32 (port) + IPv4 prefix length */
	__u32 port;
	__be32 ip;
};
struct route_val {
	__u32 target;             /* enum route_target */
	__be32 addr;              /* RT_IP4: next hop; RT_SUB4: subnet address */
	__u32 len;                /* RT_SUB4: subnet prefix length */
	__u32 plen;               /* this entry's own prefix length (picks the longer of two tries) */
};
XDE_MAP_F("lpm_trie", struct route_key, struct route_val, routes, 65536, BPF_F_NO_PREALLOC);
XDE_MAP_F("lpm_trie", struct route_key, struct route_val, routes_sys, 4096, BPF_F_NO_PREALLOC);

static __always_inline struct route_val *route_lookup(__u32 port, __be32 dst)
{
	struct route_key k = { .prefixlen = 64, .port = port, .ip = dst };
	struct route_val *custom = routes.lookup(&k);
	struct route_val *sys = routes_sys.lookup(&k);
	if (custom && sys)
		return custom->plen >= sys->plen ? custom : sys;
	return custom ? custom : sys;
}

#endif
