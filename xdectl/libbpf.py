"""The few libbpf calls xdectl needs, through ctypes.

libbpf.so.1 comes with bcc (python3-bpfcc depends on it). Using it directly
keeps every command after the first from importing bcc and its compiler:
opening a pin, reading a map and running a test frame are plain syscalls.
"""
import ctypes as ct
import ctypes.util
import os

_lib = ct.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

_lib.bpf_obj_get.argtypes = [ct.c_char_p]
_lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
_lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p,
                                      ct.POINTER(ct.c_uint32), ct.c_void_p]
_lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.c_void_p]
_lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32,
                                ct.c_void_p]
_lib.bpf_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_char_p, ct.c_size_t,
                               ct.c_void_p]

BPF_ANY = 0
BPF_NOEXIST = 1


class BpfError(OSError):
    pass


def _check(rc, what):
    # libbpf 1.x returns -errno and also sets errno
    if rc < 0:
        err = -rc if rc != -1 else ct.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


def obj_get(path):
    return _check(_lib.bpf_obj_get(str(path).encode()), f"open pin {path}")


def obj_pin(fd, path):
    _check(_lib.bpf_obj_pin(fd, str(path).encode()), f"pin {path}")


class _MapCreateOpts(ct.Structure):
    # struct bpf_map_create_opts (libbpf 1.0); sz tells libbpf which fields follow
    _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("inner_map_fd", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("map_extra", ct.c_uint64), ("numa_node", ct.c_uint32),
                ("map_ifindex", ct.c_uint32)]


def map_create(map_type, name, key_size, value_size, max_entries, flags):
    opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(_lib.bpf_map_create(map_type, name.encode()[:15], key_size, value_size,
                                      max_entries, ct.byref(opts)), f"create map {name}")


def prog_load(prog_type, name, insns):
    """Load a program's instructions (GPL, as bcc loads them); its fd."""
    return _check(_lib.bpf_prog_load(prog_type, name.encode()[:15], b"GPL", insns,
                                     len(insns) // 8, None), f"load program {name}")


def lookup(fd, key, value):
    """Fill value; False when the key is absent."""
    rc = _lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value))
    if rc < 0 and (-rc == 2 or ct.get_errno() == 2):
        return False
    _check(rc, "map lookup")
    return True


def update(fd, key, value, flags=BPF_ANY):
    _check(_lib.bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags), "map update")


def delete(fd, key):
    """False when the key was absent."""
    rc = _lib.bpf_map_delete_elem(fd, ct.byref(key))
    if rc < 0 and (-rc == 2 or ct.get_errno() == 2):
        return False
    _check(rc, "map delete")
    return True


def next_key(fd, key, out):
    """Write the key after `key` (the first if key is None) into out."""
    rc = _lib.bpf_map_get_next_key(fd, ct.byref(key) if key is not None else None, ct.byref(out))
    if rc < 0 and (-rc == 2 or ct.get_errno() == 2):
        return False
    _check(rc, "map iterate")
    return True


def update_batch(fd, keys, values, count):
    n = ct.c_uint32(count)
    _check(_lib.bpf_map_update_batch(fd, keys, values, ct.byref(n), None), "map batch update")
    return n.value


# Test-run contexts, as the UAPI (include/uapi/linux/bpf.h) defines them.

class SkBuff(ct.Structure):
    """struct __sk_buff, as in include/uapi/linux/bpf.h (192 bytes since
    hwtstamp, Linux 5.16). Pointer members (__bpf_md_ptr) are 8 bytes,
    8-aligned, whatever the architecture."""
    _fields_ = [("len", ct.c_uint32), ("pkt_type", ct.c_uint32), ("mark", ct.c_uint32),
                ("queue_mapping", ct.c_uint32), ("protocol", ct.c_uint32),
                ("vlan_present", ct.c_uint32), ("vlan_tci", ct.c_uint32),
                ("vlan_proto", ct.c_uint32), ("priority", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("ifindex", ct.c_uint32),
                ("tc_index", ct.c_uint32), ("cb", ct.c_uint32 * 5), ("hash", ct.c_uint32),
                ("tc_classid", ct.c_uint32), ("data", ct.c_uint32), ("data_end", ct.c_uint32),
                ("napi_id", ct.c_uint32), ("family", ct.c_uint32), ("remote_ip4", ct.c_uint32),
                ("local_ip4", ct.c_uint32), ("remote_ip6", ct.c_uint32 * 4),
                ("local_ip6", ct.c_uint32 * 4), ("remote_port", ct.c_uint32),
                ("local_port", ct.c_uint32), ("data_meta", ct.c_uint32),
                ("flow_keys", ct.c_uint64), ("tstamp", ct.c_uint64), ("wire_len", ct.c_uint32),
                ("gso_segs", ct.c_uint32), ("sk", ct.c_uint64), ("gso_size", ct.c_uint32),
                ("tstamp_type", ct.c_uint8), ("_pad", ct.c_uint8 * 3), ("hwtstamp", ct.c_uint64)]


class XdpMd(ct.Structure):
    """struct xdp_md, as in include/uapi/linux/bpf.h."""
    _fields_ = [("data", ct.c_uint32), ("data_end", ct.c_uint32), ("data_meta", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("rx_queue_index", ct.c_uint32),
                ("egress_ifindex", ct.c_uint32)]


assert ct.sizeof(SkBuff) == 192 and SkBuff.ifindex.offset == 40
assert ct.sizeof(XdpMd) == 24


def skb_ctx(ifindex):
    """A __sk_buff ctx for a frame entering TC ingress of ifindex. Only the
    fields the kernel accepts from a test run's ctx_in are set."""
    c = SkBuff()
    c.ifindex = ifindex
    c.ingress_ifindex = ifindex
    return bytes(c)


def xdp_ctx(frame_len, ingress_ifindex):
    c = XdpMd()
    c.data_end = frame_len
    c.ingress_ifindex = ingress_ifindex
    return bytes(c)


class _TestRunOpts(ct.Structure):
    # struct bpf_test_run_opts (libbpf 1.1)
    _fields_ = [("sz", ct.c_size_t),
                ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


def test_run(prog_fd, frame, repeat=1, ctx=None, out_size=None):
    """BPF_PROG_TEST_RUN: returns (retval, output frame, ns per run)."""
    size_out = out_size or len(frame) + 512
    data_in = ct.create_string_buffer(bytes(frame), len(frame))
    data_out = ct.create_string_buffer(size_out)
    opts = _TestRunOpts(sz=ct.sizeof(_TestRunOpts), data_in=ct.cast(data_in, ct.c_void_p),
                        data_out=ct.cast(data_out, ct.c_void_p), data_size_in=len(frame),
                        data_size_out=size_out, repeat=repeat)
    if ctx is not None:
        ctx_buf = ct.create_string_buffer(bytes(ctx), len(ctx))
        opts.ctx_in = ct.cast(ctx_buf, ct.c_void_p)
        opts.ctx_size_in = len(ctx)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "test run")
    return opts.retval, data_out.raw[:opts.data_size_out], opts.duration


def possible_cpus():
    return _check(_lib.libbpf_num_possible_cpus(), "possible cpus")


class _ProgInfo(ct.Structure):
    # leading fields of struct bpf_prog_info
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32)]


def prog_id(fd):
    info = _ProgInfo()
    n = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)), "prog info")
    return info.id


class _MapInfo(ct.Structure):
    # leading fields of struct bpf_map_info
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16)]


def map_info(fd):
    info = _MapInfo()
    n = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)), "map info")
    return info


def map_value_size(fd):
    return map_info(fd).value_size
