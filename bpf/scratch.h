/* Per-CPU scratch space for what does not fit the 512-byte BPF stack once
 * every layer is inlined: the FIB lookup's parameters, the start of a
 * packet quoted in an ICMP error, and a gateway reply being built. */
#ifndef XDE_SCRATCH_H
#define XDE_SCRATCH_H

#include "pin.h"

#define ICMP_QUOTE_MAX 68         /* largest IPv4 header (60) + 8 bytes */
#define ICMP6_QUOTE 128           /* what a Packet Too Big quotes of the packet */
/* a gateway reply being built (at most 648 bytes): the verifier bounds an
 * offset masked with 0x3ff, plus a 256-byte checksum chunk, inside it */
#define GW_BUF 1280
#define ENCAP_HDRS 84              /* sizeof(struct encap_hdrs), encap.h */
struct scratch {
	struct bpf_fib_lookup fib;
	__u8 encap[ENCAP_HDRS];   /* the headers encap_and_send pushes */
	__u8 quote[ICMP6_QUOTE];
	__u8 reply[GW_BUF];
};
XDE_MAP("percpu_array", u32, struct scratch, scratch, 1);

static __always_inline struct scratch *scratch_get(void)
{
	__u32 zero = 0;
	return scratch.lookup(&zero);
}

#endif
