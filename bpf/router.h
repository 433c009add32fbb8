/* Router layer: longest-prefix match on the port's table. A custom entry
 * beats a system entry of the same length (OPTE's rule). */
#ifndef XDE_ROUTER_H
#define XDE_ROUTER_H

#include "maps.h"

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
