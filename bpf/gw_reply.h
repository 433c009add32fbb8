/* Replies the gateway builds in the datapath (DHCPv4, router and neighbour
 * advertisements, DHCPv6). What a port's replies hold is known when the
 * port is made, so xdectl writes each as a whole frame template, per port
 * and kind; the datapath copies it, fills in what comes from the request
 * (at the offsets below), appends what must be echoed, and computes every
 * length and checksum. The frame templates have checksum fields zero. */
#ifndef XDE_GW_REPLY_H
#define XDE_GW_REPLY_H

#include "config.h"
#include "counters.h"
#include "scratch.h"
#include "csum.h"
#include "gateway.h"

enum gw_reply {
	GW_DHCP4 = 0,             /* OFFER/ACK: the lease (DHCP message type patched) */
	GW_RA = 1,                /* router advertisement */
	GW_NA = 2,                /* neighbour advertisement for the gateway */
	GW_DHCP6 = 3,             /* Advertise/Reply with IA_NA (message type patched) */
	GW_DHCP6_STATUS = 4,      /* Reply to Confirm: server id, status Success */
};
#define GW_TMPL_MAX 512           /* longest template frame */
#define GW_ECHO_MAX 136           /* appended: Client Identifier (DUID up to 128), Rapid Commit */
#define GW_REPLY_MAX (GW_TMPL_MAX + GW_ECHO_MAX)

/* Frame offsets of what the datapath fills in (Ethernet, IPv4 or IPv6, UDP
 * or ICMPv6 as the template has them). */
#define GW_OFF_IP4_DST (14 + 16)
#define GW_OFF_DHCP4_XID (14 + 20 + 8 + 4)
#define GW_OFF_DHCP4_FLAGS (14 + 20 + 8 + 10)
#define GW_OFF_DHCP4_TYPE (14 + 20 + 8 + 240 + 2)  /* option 53 comes first */
#define GW_OFF_IP6_DST (14 + 24)
#define GW_OFF_NA_FLAGS (14 + 40 + 4)
#define GW_OFF_DHCP6_TYPE (14 + 40 + 8)        /* and the transaction id, 3 bytes */
#define GW_OFF_DHCP6_IAID (14 + 40 + 8 + 4 + 14 + 4)  /* server id (DUID-LL) first, then IA_NA */

struct gw_tmpl_key {
	__u32 port;
	__u32 kind;               /* enum gw_reply */
};
struct gw_tmpl {
	__u32 len;                /* frame bytes */
	__u32 pad;
	__u8 frame[GW_TMPL_MAX];
};
XDE_MAP_F("hash", struct gw_tmpl_key, struct gw_tmpl, gw_tmpl, 8192, BPF_F_NO_PREALLOC);

/* x & mask, with the mask kept: a length spilled to the stack loses the
 * bounds its checks gave it for the verifier, while clang, knowing those
 * checks, would drop a plain mask as a no-op. */
static __always_inline __u32 bound(__u32 x, __u32 mask)
{
	asm volatile("" : "+r"(x));
	return x & mask;
}
/* len for a helper's size argument: unchanged for 1 <= len <= mask + 1. */
#define SIZE_1_TO(len, mask) (bound((len) - 1, mask) + 1)

/* Start a reply of kind for port in the scratch buffer: the template, and
 * zeros after it for what is appended and for the checksum's last word.
 * Returns the template's length, 0 when the port has none of that kind. */
static __always_inline __u32 gw_start(struct scratch *sc, __u32 port, __u32 kind)
{
	struct gw_tmpl_key k = { .port = port, .kind = kind };
	struct gw_tmpl *t = gw_tmpl.lookup(&k);
	if (!t || t->len < ETH_HLEN || t->len > GW_TMPL_MAX)
		return 0;
	__builtin_memcpy(sc->reply, t->frame, GW_TMPL_MAX);
	__builtin_memset(sc->reply + GW_TMPL_MAX, 0, GW_ECHO_MAX + 8);
	return t->len;
}

/* The reply replaces the request's frame and goes back to the guest,
 * counted (event) as it goes. The callers keep len within GW_REPLY_MAX. */
static __always_inline int gw_emit(struct __sk_buff *skb, struct scratch *sc, __u32 len,
				   __u32 port, struct port_stats *st, enum port_event event)
{
	if (bpf_skb_change_tail(skb, len, 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_resize_failed);
	if (bpf_skb_store_bytes(skb, 0, sc->reply, SIZE_1_TO(len, 1023), 0) < 0)
		return tc_drop(port, DIR_OUT, DROP_store_failed);
	stat_add(st, event, 1);
	return hairpin(skb);
}

/* Lengths and checksums of an IPv4/UDP reply of len bytes, then send it. */
static __always_inline int gw_send4(struct __sk_buff *skb, struct scratch *sc, __u32 len,
				    __u32 port, struct port_stats *st, enum port_event event)
{
	/* a template xdectl wrote wrong: not a reply (not for the verifier alone) */
	if (len < ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr) || len > GW_TMPL_MAX)
		return tc_drop(port, DIR_OUT, DROP_resize_failed);
	struct iphdr *ip = (void *)(sc->reply + ETH_HLEN);
	struct udphdr *udp = (void *)(ip + 1);
	__u32 ulen = len - ETH_HLEN - sizeof(*ip);
	ip->tot_len = bpf_htons(len - ETH_HLEN);
	ip->check = 0;
	__s64 s = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);
	if (s < 0)
		return tc_drop(port, DIR_OUT, DROP_csum_failed);
	ip->check = fold_csum(s);
	udp->len = bpf_htons(ulen);
	udp->check = 0;
	struct pseudo4 ph = { .src = ip->saddr, .dst = ip->daddr, .proto = IPPROTO_UDP,
			      .len = udp->len };
	s = csum_buf((__u8 *)udp, ulen, bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0));
	if (s < 0)
		return tc_drop(port, DIR_OUT, DROP_csum_failed);
	__u16 c = fold_csum(s);
	udp->check = c ? c : 0xffff;
	return gw_emit(skb, sc, len, port, st, event);
}

/* The same for an IPv6 reply carrying UDP or ICMPv6 (proto). */
static __always_inline int gw_send6(struct __sk_buff *skb, struct scratch *sc, __u32 len,
				    __u32 port, __u8 proto, struct port_stats *st,
				    enum port_event event)
{
	__u32 l4 = ETH_HLEN + sizeof(struct ipv6hdr);
	if (len < l4 + 8 || len > GW_REPLY_MAX)
		return tc_drop(port, DIR_OUT, DROP_resize_failed);
	struct ipv6hdr *ip6 = (void *)(sc->reply + ETH_HLEN);
	__u32 plen = len - l4;
	ip6->payload_len = bpf_htons(plen);
	__be16 *check;
	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip6 + 1);
		udp->len = bpf_htons(plen);
		check = &udp->check;
	} else {
		check = (__be16 *)(sc->reply + l4 + 2);
	}
	*check = 0;
	struct pseudo6 ph = { .len = bpf_htonl(plen), .nh = bpf_htonl(proto) };
	__builtin_memcpy(ph.src, &ip6->saddr, 16);
	__builtin_memcpy(ph.dst, &ip6->daddr, 16);
	__s64 s = csum_buf(sc->reply + l4, plen, bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0));
	if (s < 0)
		return tc_drop(port, DIR_OUT, DROP_csum_failed);
	__u16 c = fold_csum(s);
	*check = proto == IPPROTO_UDP && !c ? 0xffff : c;
	return gw_emit(skb, sc, len, port, st, event);
}

#endif
