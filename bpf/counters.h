/* Counter updates. Per-CPU maps: no atomics; xdectl sums the CPUs. */
#ifndef XDE_COUNTERS_H
#define XDE_COUNTERS_H

#include "maps.h"

static __always_inline void port_count(__u32 port, enum port_counter c, __u64 n)
{
	struct port_stats *st = port_stats.lookup(&port);
	if (st)
		((__u64 *)st)[c] += n;
}

static __always_inline void global_count(enum global_counter c)
{
	__u32 k = 0;
	struct global_stats *g = global_stats.lookup(&k);
	if (g)
		((__u64 *)g)[c] += 1;
}

#endif
