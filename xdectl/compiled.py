"""Compiled programs kept on disk, so that only a machine's first root
waits for clang.

bcc compiles bpf/ (clang, most of a cold create's seconds) into BPF
instructions in which each map is named by the file descriptor it had in
the compiling process (ld_imm64 with BPF_PSEUDO_MAP_FD). Kept with the maps'
definitions and that descriptor -> map table, they load into a fresh root
with plain syscalls: create the maps, put the new descriptors into the
instructions, load (the kernel verifies them as it would bcc's), pin.

The store is keyed by everything the instructions depend on: the program
text, bcc's version and the kernel release (bcc compiles against its
headers). A store that cannot be read or loaded is ignored: the root is
compiled as if there were none, and the store written again.
"""
import base64
import hashlib
import importlib.util
import json
import os
import platform
from pathlib import Path

from . import libbpf

DEFAULT_DIR = "/var/cache/xde"
LD_IMM64, PSEUDO_MAP_FD = 0x18, 1


def directory():
    return Path(os.environ.get("XDE_CACHE_DIR", DEFAULT_DIR))


def key(text):
    h = hashlib.sha256(text.encode())
    h.update(f"\0{_bcc_version()}\0{platform.release()}".encode())
    return h.hexdigest()[:24]


def _bcc_version():
    """bcc's version file, read rather than imported: importing bcc loads
    its compiler, which a root built from the store does without."""
    spec = importlib.util.find_spec("bcc")
    try:
        return Path(spec.origin).with_name("version.py").read_text()
    except (AttributeError, TypeError, OSError):
        return "?"


def path(text):
    return directory() / f"programs-{key(text)}.json"


def save(text, b, progs, maps):
    """Keep what bcc module b compiled: progs {name: type}, maps
    {name: description}. Best effort: a root loads without the store."""
    from bcc.libbcc import lib
    fd_of = {name: lib.bpf_table_fd(b.module, name.encode()) for name in maps}
    doc = {"maps": maps, "fds": {str(fd): name for name, fd in fd_of.items()},
           "progs": {name: {"type": kind, "insns": base64.b64encode(b.dump_func(name)).decode()}
                     for name, kind in progs.items()}}
    p = path(text)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, p)
    except OSError:
        pass


def read(text):
    """The stored compile of text, or None."""
    try:
        return json.loads(path(text).read_text())
    except (OSError, ValueError):
        return None


def relocate(insns, fds, new_fd):
    """insns with each map's descriptor of the compiling process replaced
    by the new one."""
    out = bytearray(insns)
    i = 0
    while i + 16 <= len(out):
        if out[i] == LD_IMM64:
            if out[i + 1] >> 4 == PSEUDO_MAP_FD:
                old = int.from_bytes(out[i + 4:i + 8], "little", signed=True)
                out[i + 4:i + 8] = new_fd[fds[str(old)]].to_bytes(4, "little", signed=True)
            i += 16              # the instruction's second half
        else:
            i += 8
    return bytes(out)


def load(doc, maps_dir, progs_dir):
    """Create and pin the maps, load and pin the programs of a stored
    compile. Returns ({map: fd}, {program: fd}); the caller closes them."""
    map_fd, prog_fd = {}, {}
    try:
        for name, m in doc["maps"].items():
            key_size, value_size, max_entries, flags = m["sizes"]
            map_fd[name] = libbpf.map_create(m["type"], name, key_size, value_size,
                                             max_entries, flags)
            libbpf.obj_pin(map_fd[name], maps_dir / name)
        for name, p in doc["progs"].items():
            insns = relocate(base64.b64decode(p["insns"]), doc["fds"], map_fd)
            prog_fd[name] = libbpf.prog_load(p["type"], name, insns)
    except BaseException:
        for fd in list(map_fd.values()) + list(prog_fd.values()):
            os.close(fd)
        raise
    return map_fd, prog_fd
