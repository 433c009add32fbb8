/* Every map of one datapath instance, pinned under XDE_PIN_DIR (the root's
 * maps/ directory, given by xdectl at compile time). */
#ifndef XDE_MAPS_H
#define XDE_MAPS_H

#include "xde.h"

#ifndef XDE_PIN_DIR
#error "XDE_PIN_DIR must name the root's maps directory"
#endif

#define XDE_MAP(type, key, val, name, n) \
	BPF_TABLE_PINNED(type, key, val, name, n, XDE_PIN_DIR "/" #name)
#define XDE_MAP_F(type, key, val, name, n, flags) \
	BPF_TABLE_PINNED(type, key, val, name, n, XDE_PIN_DIR "/" #name, flags)

XDE_MAP("array", u32, struct xde_meta, meta, 1);
XDE_MAP("array", u32, struct xde_cfg, config, 1);
XDE_MAP("hash", u32, struct port_cfg, ports, 1024);
XDE_MAP("hash", struct port_key, u32, port_index, 1024);
XDE_MAP("array", u32, u32, passthru, XDE_MAX_PASSTHROUGH);
XDE_MAP("percpu_hash", u32, struct port_stats, port_stats, 1024);
XDE_MAP("percpu_array", u32, struct global_stats, global_stats, 1);
XDE_MAP_F("hash", struct v2p_key, struct v2p_val, v2p, 1048576, BPF_F_NO_PREALLOC);
XDE_MAP_F("lpm_trie", struct route_key, struct route_val, routes, 65536, BPF_F_NO_PREALLOC);
XDE_MAP_F("lpm_trie", struct route_key, struct route_val, routes_sys, 4096, BPF_F_NO_PREALLOC);

XDE_MAP("percpu_array", u32, struct scratch, scratch, 1);
XDE_MAP_F("hash", struct fw_key, struct fw_rules, fw_rules, 2048, BPF_F_NO_PREALLOC);
XDE_MAP("hash", u32, u32, fw_epoch, 1024);
XDE_MAP("percpu_array", u32, u64, fw_hits, 65536);
XDE_MAP("lru_hash", struct flow_key, struct flow_val, flows, 262144);
XDE_MAP("lru_hash", struct nh_key, struct nh_val, nexthops, 4096);
XDE_MAP("prog", u32, u32, xdp_progs, 2);
XDE_MAP("prog", u32, u32, tc_progs, 2);

#endif
