/* The gateway's DHCPv6 server (OPTE's): Solicit gets an Advertise, or a
 * Reply when it asks for Rapid Commit; Request (naming this server) a
 * Reply; Confirm a Reply with status Success. The lease is the port's IPv6
 * address in an IA_NA with infinite lifetimes (gw_reply.h). Renew, Rebind,
 * Release, Decline and Information-request are dropped and counted. */
#ifndef XDE_DHCP6_H
#define XDE_DHCP6_H

#include "config.h"
#include "counters.h"
#include "pkt.h"
#include "gw_reply.h"

#define DHCP6_CLIENT_PORT 546
#define DHCP6_SERVER_PORT 547
#define DHCP6_OPTS_MAX 16         /* options read from one message */
enum { DHCP6_SOLICIT = 1, DHCP6_ADVERTISE = 2, DHCP6_REQUEST = 3, DHCP6_CONFIRM = 4,
       DHCP6_REPLY = 7 };
enum { OPT6_CLIENTID = 1, OPT6_SERVERID = 2, OPT6_IA_NA = 3, OPT6_RAPID_COMMIT = 14 };
#define DUID_LL_LEN 10            /* type 3, hardware type 1, the gateway MAC */

/* What the server needs of a client's message. */
struct dhcp6_req {
	__u32 client_off;         /* the Client Identifier option (header included) */
	__u32 client_len;         /* its bytes, header included; 0: none */
	__be32 iaid;              /* the first IA_NA's IAID */
	__u32 servers;            /* Server Identifiers seen */
	__u32 foreign;            /* one of them is not this gateway's */
	__u32 has_ia;             /* an IA_NA seen (iaid is the first one's) */
	__u32 rapid;              /* Rapid Commit present */
};

/* Is the Server Identifier of len bytes at off this gateway's (mine)? */
static __always_inline int dhcp6_ours(struct __sk_buff *skb, __u32 off, __u32 len,
				      const __u8 *mine)
{
	__u8 duid[DUID_LL_LEN];
	return len == DUID_LL_LEN && bpf_skb_load_bytes(skb, off & 0xffff, duid, DUID_LL_LEN) == 0 &&
	       bytes_eq(duid, mine, DUID_LL_LEN);
}

static __always_inline void dhcp6_options(struct __sk_buff *skb, __u32 off, __u32 end,
					  struct dhcp6_req *r, const __u8 *mine)
{
	for (int i = 0; i < DHCP6_OPTS_MAX; i++) {
		__be16 o[2];
		if (off + 4 > end || bpf_skb_load_bytes(skb, off & 0xffff, o, 4) < 0)
			return;
		__u16 code = bpf_ntohs(o[0]), len = bpf_ntohs(o[1]);
		if (off + 4 + len > end)
			return;
		if (code == OPT6_CLIENTID && !r->client_len) {
			r->client_off = off;
			r->client_len = 4 + len;
		} else if (code == OPT6_SERVERID) {
			r->servers++;
			r->foreign |= !dhcp6_ours(skb, off + 4, len, mine);
		} else if (code == OPT6_IA_NA && len >= 12 && !r->has_ia) {
			r->has_ia = 1;
			bpf_skb_load_bytes(skb, (off + 4) & 0xffff, &r->iaid, 4);
		} else if (code == OPT6_RAPID_COMMIT) {
			r->rapid = 1;
		}
		off += 4 + len;
	}
}

/* A datagram to the DHCPv6 server port (l4off: where UDP starts). */
static __always_inline int dhcp6_serve(struct __sk_buff *skb, struct port_cfg *pc, __u32 port,
				       struct port_stats *st, struct ipv6hdr *ip6, struct pkt *p,
				       __u32 l4off)
{
	__u8 all_servers[16] = { 0xff, 0x02, [13] = 1, [15] = 2 };  /* ff02::1:2 */
	__u32 end = ETH_HLEN + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	__be32 head;              /* message type, transaction id */
	if (!(pc->flags & PORT_F_IP6) || (p->fragment & PKT_FRAGMENT) || p->sport != bpf_htons(DHCP6_CLIENT_PORT) ||
	    !bytes_eq(&ip6->daddr, all_servers, 16) || l4off + 12 > end ||
	    bpf_skb_load_bytes(skb, l4off + 8, &head, 4) < 0)
		return tc_drop(port, DIR_OUT, DROP_dhcp6);
	__u8 mine[DUID_LL_LEN] = { 0, 3, 0, 1 };  /* DUID-LL of the gateway MAC */
	__builtin_memcpy(mine + 4, pc->gw_mac, ETH_ALEN);
	struct dhcp6_req r = {};
	dhcp6_options(skb, l4off + 12, end, &r, mine);
	__u8 type = ((__u8 *)&head)[0];
	__u32 kind = GW_DHCP6;
	__u8 reply = DHCP6_REPLY;
	if (type == DHCP6_SOLICIT && !r.servers)
		reply = r.rapid ? DHCP6_REPLY : DHCP6_ADVERTISE;
	else if (type == DHCP6_REQUEST && r.servers && !r.foreign)
		r.rapid = 0;
	else if (type == DHCP6_CONFIRM && !r.servers)  /* RFC 8415: discarded */
		kind = GW_DHCP6_STATUS, r.rapid = 0;
	else
		return tc_drop(port, DIR_OUT, DROP_dhcp6);
	__u32 n = r.client_len;
	if (n < 4 || n > GW_ECHO_MAX - 4)
		return tc_drop(port, DIR_OUT, DROP_dhcp6);

	struct scratch *sc = scratch_get();
	if (!sc)
		return tc_drop(port, DIR_OUT, DROP_no_scratch);
	__u32 len = gw_start(sc, port, kind);
	if (!len || len > GW_TMPL_MAX)  /* (gw_start's bound, again for the verifier) */
		return tc_drop(port, DIR_OUT, DROP_dhcp6);
	__u8 *f = sc->reply;
	((__u8 *)&head)[0] = reply;
	__builtin_memcpy(f + GW_OFF_DHCP6_TYPE, &head, 4);
	if (kind == GW_DHCP6)
		__builtin_memcpy(f + GW_OFF_DHCP6_IAID, &r.iaid, 4);
	__builtin_memcpy(f + GW_OFF_IP6_DST, p->src, 16);
	/* echo the Client Identifier, then Rapid Commit when it was used */
	if (bpf_skb_load_bytes(skb, r.client_off & 0xffff, f + bound(len, 0x3ff), SIZE_1_TO(n, 0xff)) < 0)
		return tc_drop(port, DIR_OUT, DROP_load_failed);
	len += n;
	if (r.rapid) {
		__u8 rc[4] = { 0, OPT6_RAPID_COMMIT, 0, 0 };
		__builtin_memcpy(f + bound(len, 0x3ff), rc, 4);
		len += 4;
	}
	return gw_send6(skb, sc, len, port, IPPROTO_UDP, st, P_dhcp6_replies);
}

#endif
