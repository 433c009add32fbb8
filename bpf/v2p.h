/* Overlay: the virtual-to-physical mapping, (VNI, guest IPv4 or IPv6) ->
 * (guest MAC, underlay address of the host it lives on). */
#ifndef XDE_V2P_H
#define XDE_V2P_H

#include "pin.h"

struct v2p_key {
	__u32 vni;
	__be32 ip[4];             /* IPv4 mapped (pkt.h) */
};
struct v2p_val {
	__u8 mac[6];
	__u8 pad[2];
	__u8 underlay[16];
};
XDE_MAP_F("hash", struct v2p_key, struct v2p_val, v2p, 1048576, BPF_F_NO_PREALLOC);

#endif
