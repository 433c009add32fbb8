/* Internet checksums (RFC 1071) over frames the datapath builds itself. */
#ifndef XDE_CSUM_H
#define XDE_CSUM_H

#include "wire.h"

#define CSUM_CHUNK 256            /* bpf_csum_diff takes at most 512 bytes a call */

static __always_inline __u16 fold_csum(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~s;
}

/* The checksum of an upper-layer packet of len bytes at buf, which must be
 * followed by at least 3 zero bytes (the helper sums whole words), over
 * the pseudo-header already summed in seed. At most 3 chunks: 768 bytes.
 * Returns < 0 when a helper failed. */
static __always_inline __s64 csum_buf(__u8 *buf, __u32 len, __s64 seed)
{
	__s64 s = seed;
#pragma unroll
	for (__u32 i = 0; i < 3; i++) {
		__u32 off = i * CSUM_CHUNK;
		if (s < 0 || off >= len)
			break;
		__u32 n = len - off;
		if (n > CSUM_CHUNK)
			n = CSUM_CHUNK;
		n = (n + 3) & ~3U;
		s = bpf_csum_diff(0, 0, (__be32 *)(buf + off), n & 0x1fc, s);
	}
	return s;
}

/* IPv6 pseudo-header (RFC 8200 8.1) of len bytes of protocol nh. */
struct pseudo6 {
	__be32 src[4];
	__be32 dst[4];
	__be32 len;
	__be32 nh;
};

/* IPv4 pseudo-header (RFC 768). */
struct pseudo4 {
	__be32 src;
	__be32 dst;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

#endif
