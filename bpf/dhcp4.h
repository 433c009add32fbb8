/* The gateway's DHCPv4 server (OPTE's): a broadcast DISCOVER gets an OFFER,
 * a broadcast REQUEST an ACK, both the port's lease (gw_reply.h). No NAK,
 * no unicast renewal (a client rebinds by broadcast instead), the
 * parameter request list is not read. Everything else to the server port
 * is dropped and counted. */
#ifndef XDE_DHCP4_H
#define XDE_DHCP4_H

#include "config.h"
#include "counters.h"
#include "gw_reply.h"

#define DHCP4_SERVER_PORT 67
#define DHCP4_CLIENT_PORT 68
#define DHCP4_COOKIE 0x63825363
#define DHCP4_OPTS_MAX 64         /* options read before giving up on the message type */
enum { DHCPDISCOVER = 1, DHCPOFFER = 2, DHCPREQUEST = 3, DHCPACK = 5 };

/* BOOTP's fixed fields up to the client hardware address */
struct bootp_head {
	__u8 op, htype, hlen, hops;
	__be32 xid;
	__be16 secs;
	__be16 flags;             /* 0x8000: the client wants a broadcast reply */
	__be32 ciaddr, yiaddr, siaddr, giaddr;
	__u8 chaddr[6];
} __attribute__((packed));
#define BOOTP_OPTIONS 240         /* fixed part (236) and the magic cookie */

/* The value of option 53 (message type) of the message at bootp, 0 if none. */
static __always_inline __u8 dhcp4_type(struct __sk_buff *skb, __u32 bootp, __u32 end)
{
	__u32 off = bootp + BOOTP_OPTIONS;
	for (int i = 0; i < DHCP4_OPTS_MAX; i++) {
		__u8 o[3];
		if (off + 1 > end || bpf_skb_load_bytes(skb, off & 0xffff, o, 1) < 0)
			return 0;
		if (o[0] == 255)
			return 0;
		if (o[0] == 0) {          /* pad */
			off++;
			continue;
		}
		if (off + 3 > end || bpf_skb_load_bytes(skb, off & 0xffff, o, 3) < 0)
			return 0;
		if (o[0] == 53)
			return o[1] == 1 ? o[2] : 0;
		off += 2 + o[1];
	}
	return 0;
}

/* A UDP datagram to the server port (ip: its header, l4off: where UDP
 * starts): answered, or dropped and counted. */
static __always_inline int dhcp4_serve(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
				       struct port_stats *st, struct iphdr *ip, __u32 l4off)
{
	__u32 end = ETH_HLEN + bpf_ntohs(ip->tot_len);
	if (!(pc->flags & PORT_F_IP4) || ip->daddr != 0xffffffff ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return tc_drop(port, DIR_OUT, DROP_dhcp4);
	struct udphdr udp;
	struct bootp_head b;
	__u32 bootp = l4off + sizeof(udp);
	__be32 cookie;
	if (bootp + BOOTP_OPTIONS > end ||
	    bpf_skb_load_bytes(skb, l4off, &udp, sizeof(udp)) < 0 ||
	    bpf_skb_load_bytes(skb, bootp, &b, sizeof(b)) < 0 ||
	    bpf_skb_load_bytes(skb, bootp + 236, &cookie, 4) < 0)
		return tc_drop(port, DIR_OUT, DROP_dhcp4);
	if (udp.source != bpf_htons(DHCP4_CLIENT_PORT) || b.op != 1 || b.htype != 1 ||
	    b.hlen != ETH_ALEN || cookie != bpf_htonl(DHCP4_COOKIE))
		return tc_drop(port, DIR_OUT, DROP_dhcp4);
	if (!mac_eq(b.chaddr, pc->mac))
		return tc_drop(port, DIR_OUT, DROP_spoof);
	__u8 type = dhcp4_type(skb, bootp, end);
	if (type != DHCPDISCOVER && type != DHCPREQUEST)
		return tc_drop(port, DIR_OUT, DROP_dhcp4);

	struct scratch *sc = scratch_get();
	if (!sc)
		return tc_drop(port, DIR_OUT, DROP_no_scratch);
	__u32 len = gw_start(sc, port, GW_DHCP4);
	if (!len)
		return tc_drop(port, DIR_OUT, DROP_dhcp4);
	__u8 *f = sc->reply;
	__builtin_memcpy(f + GW_OFF_DHCP4_XID, &b.xid, 4);
	__builtin_memcpy(f + GW_OFF_DHCP4_FLAGS, &b.flags, 2);
	f[GW_OFF_DHCP4_TYPE] = type == DHCPDISCOVER ? DHCPOFFER : DHCPACK;
	if (b.flags & bpf_htons(0x8000)) {
		__builtin_memset(f, 0xff, ETH_ALEN);
		__builtin_memset(f + GW_OFF_IP4_DST, 0xff, 4);
	}
	return gw_send4(skb, sc, len, port, st, P_dhcp4_replies);
}

#endif
