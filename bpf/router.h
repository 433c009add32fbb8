/* Router layer: longest-prefix match on the port's table. One LPM trie for
 * all ports; the port's ifindex and the address family lead the key, so
 * each port has a table per family (an IPv6 ::/0 never covers IPv4's
 * mapped addresses). System entries (made by create) live in a second trie
 * so that a custom entry of the same length wins over them without erasing
 * them (OPTE's priority rule). */
#ifndef XDE_ROUTER_H
#define XDE_ROUTER_H

#include "pin.h"

enum route_target { RT_DROP = 1, RT_IG = 2, RT_IP4 = 3, RT_SUB4 = 4, RT_IP6 = 5, RT_SUB6 = 6 };
#define ROUTE_KEY_BITS 64         /* port and family lead every route key */
struct route_key {
	__u32 prefixlen;          /* ROUTE_KEY_BITS + prefix length of the mapped address */
	__u32 port;
	__u32 family;             /* 4 or 6 */
	__be32 ip[4];             /* IPv4 mapped (pkt.h): an IPv4 /n is a /96+n */
};
struct route_val {
	__u32 target;             /* enum route_target */
	__be32 addr[4];           /* RT_IP*: next hop; RT_SUB*: subnet address (IPv4 mapped) */
	__u32 len;                /* RT_SUB*: the subnet's own prefix length */
	__u32 plen;               /* this entry's own prefix length (picks the longer of two tries) */
};
XDE_MAP_F("lpm_trie", struct route_key, struct route_val, routes, 65536, BPF_F_NO_PREALLOC);
XDE_MAP_F("lpm_trie", struct route_key, struct route_val, routes_sys, 4096, BPF_F_NO_PREALLOC);

static __always_inline struct route_val *route_lookup(__u32 port, __u32 family, const __be32 *dst)
{
	struct route_key k = { .prefixlen = ROUTE_KEY_BITS + 128, .port = port, .family = family };
	__builtin_memcpy(k.ip, dst, 16);
	struct route_val *custom = routes.lookup(&k);
	struct route_val *sys = routes_sys.lookup(&k);
	if (custom && sys)
		return custom->plen >= sys->plen ? custom : sys;
	return custom ? custom : sys;
}

#endif
