/* Every map of one datapath instance is pinned under XDE_PIN_DIR (the
 * root's maps/ directory, given by xdectl at compile time). Each map is
 * declared with XDE_MAP in the header of the topic that owns it; xdectl
 * reads the key and value types bcc derives from those declarations and
 * never redeclares them. */
#ifndef XDE_PIN_H
#define XDE_PIN_H

#include "wire.h"

#ifndef XDE_PIN_DIR
#error "XDE_PIN_DIR must name the root's maps directory"
#endif

#define XDE_MAP(type, key, val, name, n) \
	BPF_TABLE_PINNED(type, key, val, name, n, XDE_PIN_DIR "/" #name)
#define XDE_MAP_F(type, key, val, name, n, flags) \
	BPF_TABLE_PINNED(type, key, val, name, n, XDE_PIN_DIR "/" #name, flags)

/* Metadata xdectl stores when it loads an instance: the bcc type
 * descriptions of every map and the layout they add up to, so that later
 * calls open the pins without compiling anything. */
#define XDE_META_TYPES 16384
struct xde_meta {
	char layout[72];
	__u32 types_len;
	char types[XDE_META_TYPES];
};
XDE_MAP("array", u32, struct xde_meta, meta, 1);

#endif
