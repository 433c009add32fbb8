"""Typed access to the pinned maps of one datapath instance.

The key and value types are the ctypes classes bcc derives from the C
declarations in bpf/. They are recorded (as bcc's own JSON type
descriptions) in the instance's `meta` map when it is loaded, so a command
that only reads or edits maps compiles nothing (it loads bcc only for its
type decoder).
"""
import ctypes as ct
import ipaddress
import json
import os

from . import libbpf
from .abi import PORT_F_IP4, PORT_F_IP6

PERCPU_TYPES = {5, 6, 10}  # BPF_MAP_TYPE_{PERCPU_HASH,PERCPU_ARRAY,LRU_PERCPU_HASH}


def decode_type(desc):
    """Build a ctypes type from one of bcc's JSON type descriptions."""
    from bcc import BPF  # bcc's own decoder; loads libbcc but compiles nothing
    return BPF._decode_table_type(desc)


class Map:
    """One pinned map: dict-like access with bcc's ctypes key/value types."""

    def __init__(self, name, fd, key_type, leaf_type, map_type):
        self.name = name
        self.fd = fd
        self.Key = key_type
        self.Leaf = leaf_type
        self.percpu = map_type in PERCPU_TYPES
        self.ncpus = libbpf.possible_cpus() if self.percpu else 1
        info = libbpf.map_info(fd)
        self.max_entries = info.max_entries
        # A type of another size than the kernel's would have lookups write
        # past the buffer (bcc's type descriptions keep only the first
        # dimension of a multi-dimensional array, for one).
        for what, typ, size in (("key", key_type, info.key_size),
                                ("value", leaf_type, info.value_size)):
            if ct.sizeof(typ) != size:
                self.close()
                from .errors import XdeError
                raise XdeError(f"map {name}: its {what} type is {ct.sizeof(typ)} bytes, the "
                               f"kernel's {what} {size}; this xdectl cannot read it")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        # a Map owns its descriptor: long-running users (the exporter)
        # must not leak one per scrape
        self.close()

    def _leaf_buf(self):
        if not self.percpu:
            return self.Leaf()
        return (self.Leaf * self.ncpus)()

    def get(self, key):
        """The value (per-CPU maps: the list of per-CPU values), or None."""
        val = self._leaf_buf()
        if not libbpf.lookup(self.fd, key, val):
            return None
        return list(val) if self.percpu else val

    def set(self, key, value, flags=libbpf.BPF_ANY):
        if self.percpu:
            vals = (self.Leaf * self.ncpus)(*([value] * self.ncpus))
            libbpf.update(self.fd, key, vals, flags)
        else:
            libbpf.update(self.fd, key, value, flags)

    def delete(self, key):
        return libbpf.delete(self.fd, key)

    def keys(self):
        out = []
        prev = None
        while True:
            k = self.Key()
            if not libbpf.next_key(self.fd, prev, k):
                return out
            out.append(k)
            prev = k

    def items(self):
        for k in self.keys():
            v = self.get(k)
            if v is not None:
                yield k, v

    def update_batch(self, pairs):
        """Insert many (key, value) pairs with BPF_MAP_UPDATE_BATCH."""
        n = len(pairs)
        if not n:
            return 0
        keys = (self.Key * n)(*[k for k, _ in pairs])
        vals = (self.Leaf * n)(*[v for _, v in pairs])
        return libbpf.update_batch(self.fd, keys, vals, n)


def open_maps(meta_text, maps_dir):
    """Open every pinned map described by the instance's meta JSON."""
    meta = json.loads(meta_text)
    out = {}
    for name, d in meta["maps"].items():
        fd = libbpf.obj_get(maps_dir / name)
        out[name] = Map(name, fd, decode_type(d["key"]), decode_type(d["leaf"]), d["type"])
    return out


def find_port(maps, name):
    """(datapath ifindex, port_cfg) of the port called name, or (None, None)."""
    for k, pc in maps["ports"].items():
        if pc.name.decode() == name:
            return k.value, pc
    return None, None


# Field helpers shared by the modules that fill map values.

def mac_bytes(mac):
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_str(raw):
    return ":".join(f"{b:02x}" for b in bytes(raw)[:6])


def set_bytes(field, data):
    """Copy bytes into a ctypes array field."""
    ct.memmove(field, data, len(data))


def ip4_be(addr):
    """IPv4 address -> the __be32 as it is stored in a ctypes uint."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


def ip4_str(be):
    return str(ipaddress.IPv4Address(int(be).to_bytes(4, "little")))


def ip6_str(raw):
    return str(ipaddress.IPv6Address(bytes(raw)[:16]))


# Addresses of either family as the datapath keys them (bpf/pkt.h): 16
# bytes, IPv6 as it is, IPv4 mapped into ::ffff:0:0/96.
V4_MAPPED = bytes(10) + b"\xff\xff"


def addr16(addr):
    """An IPv4 or IPv6 address (text or ipaddress object) -> its 16 bytes."""
    a = ipaddress.ip_address(addr)
    return V4_MAPPED + a.packed if a.version == 4 else a.packed


def addr_str(raw):
    """16 datapath bytes -> the address as text, IPv4 when mapped."""
    b = bytes(raw)[:16]
    if b[:12] == V4_MAPPED:
        return str(ipaddress.IPv4Address(b[12:]))
    return str(ipaddress.IPv6Address(b))


def addr_order(addr):
    """A sort key for addresses as text: IPv4 before IPv6, then by value."""
    a = ipaddress.ip_address(addr)
    return a.version, int(a)


def port_ips(pc):
    """(IPv4, IPv6) of a port_cfg as text, None for a family it lacks."""
    return (ip4_str(pc.ip) if pc.flags & PORT_F_IP4 else None,
            addr_str(pc.ip6) if pc.flags & PORT_F_IP6 else None)


def mapped_prefixlen(net):
    """The prefix length of a network in the 16-byte address space."""
    return net.prefixlen + (96 if net.version == 4 else 0)


def prefix_mask16(net):
    """The 16-byte mask of a network in the 16-byte address space."""
    bits = mapped_prefixlen(net)
    return ((1 << 128) - (1 << (128 - bits))).to_bytes(16, "big")
