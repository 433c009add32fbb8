"""One datapath instance: the programs and maps pinned under a root.

The first command on a root compiles bpf/ with bcc and pins everything;
every later command opens the pins. The kernel keeps the instance alive
between commands; this module only finds it, builds it or removes it.
"""
import ctypes as ct
import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from . import compiled, libbpf
from .errors import XdeError
from .maps import find_port, open_maps

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
DEFAULT_ROOT = "/sys/fs/bpf/xde"
# The entry files, one per attach point; they are compiled as one unit.
SOURCES = ("xdp_underlay.c", "tc_underlay.c", "tc_port.c", "xdp_boundary.c", "tc_boundary.c")
# A program's context type says its hook: bcc's BPF.XDP and BPF.SCHED_CLS.
PROG_TYPES = {"xdp_md": 6, "__sk_buff": 3}
# Tail-call tables: map -> programs in slot order (PROG_MAIN, PROG_FW_EVAL,
# PROG_GATEWAY, PROG_NAT, PROG_SNAT; None: the slot is not used at that hook).
TAIL_CALLS = {"xdp_progs": ("xdp_underlay", "xdp_fw_eval", None, "xdp_nat"),
              "tc_progs": ("tc_port_out", "tc_fw_eval", "tc_gateway", "tc_nat", "tc_snat")}


# what the compile depends on beside the text (the pin directory is only
# where bcc pins the maps, not in the instructions)
CFLAGS = ("-Wno-unused-function",)


def compile_input():
    """What a compile is made from: the key of its stored instructions."""
    return program_text() + "\0" + " ".join(CFLAGS)


def programs():
    """{program: bcc program type}: every non-static function of an entry
    file is a program, of the hook its context argument names."""
    out = {}
    for f in SOURCES:
        for name, ctx in re.findall(r"^int (\w+)\(struct (\w+) \*", (BPF_DIR / f).read_text(), re.M):
            out[name] = PROG_TYPES[ctx]
    return out


def sources_digest():
    """What the programs are built from: every file of bpf/."""
    h = hashlib.sha256()
    for f in sorted(BPF_DIR.glob("*.[ch]")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def layout_id(maps):
    """The map layout: bcc's type descriptions of every key and value, with
    each map's type, sizes and flags as the kernel holds them. Comments,
    helpers and programs do not change it."""
    text = json.dumps(maps, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def tc_name(prog, root):
    """Our tc filters are named for their program and root, so that what an
    instance attached can be found (tc filter show) even when its maps
    cannot be read."""
    return f"{prog}@{root}"


def program_text():
    """bpf/ sources as one compilation unit, local headers inlined.

    One unit, so that all five programs share every map. Inlined, because
    bcc only rewrites map calls (m.lookup()) and takes programs from its
    main file, not from included headers."""
    seen = set()

    def inline(name):
        if name in seen:
            return ""
        seen.add(name)
        out = [f'#line 1 "{name}"']
        for n, line in enumerate((BPF_DIR / name).read_text().splitlines(), 1):
            m = re.match(r'\s*#include "([^"]+)"', line)
            if m:
                out += [inline(m.group(1)), f'#line {n + 1} "{name}"']
            else:
                out.append(line)
        return "\n".join(out)

    return "\n".join(inline(f) for f in SOURCES) + "\n"


def _bpffs_mounts():
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] == "bpf"]


class Datapath:
    def __init__(self, root):
        self.root = Path(root)
        self.maps_dir = self.root / "maps"
        self.progs_dir = self.root / "progs"
        self._lock_fd = None
        self._maps = None

    # --- presence and locking -------------------------------------------

    def check_bpffs(self):
        mounts = _bpffs_mounts()
        if not any(self.root == Path(m) or Path(m) in self.root.parents for m in mounts):
            raise XdeError(f"root {self.root} is not on a mounted bpffs "
                           f"(mount -t bpf bpf /sys/fs/bpf, or choose --root under a bpffs)")

    def exists(self):
        return (self.maps_dir / "meta").exists()

    def lock(self):
        """Serialize changes to this root between concurrent xdectl calls."""
        self.check_bpffs()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)

    def release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        # A root left without an instance is removed: a failed first create
        # must not leave even an empty directory behind. One that holds
        # something xdectl did not make stays (unload --force names it).
        if self.root.exists() and not self.exists():
            try:
                self._remove_pins()
            except XdeError:
                pass

    # --- load ----------------------------------------------------------

    def _compile(self):
        """Compile bpf/ against the root's maps (bcc creates and pins them
        where absent, and reuses the pins where present), load every
        program. Returns (bcc module, {program: fd}); the fds live as long
        as it."""
        from bcc import BPF
        b = BPF(text=program_text().encode(),
                cflags=[f"-I{BPF_DIR}", f'-DXDE_PIN_DIR="{self.maps_dir}"', *CFLAGS])
        fds = {name: b.load_func(name, kind).fd for name, kind in programs().items()}
        return b, fds

    @staticmethod
    def _describe(b):
        """{map: its description} for every map of a compiled module."""
        from bcc.libbcc import lib
        lib.bpf_num_tables.argtypes = [ct.c_void_p]
        lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_ulonglong]
        lib.bpf_table_name.restype = ct.c_char_p
        lib.bpf_table_fd.argtypes = [ct.c_void_p, ct.c_char_p]
        maps = {}
        for i in range(lib.bpf_num_tables(b.module)):
            name = lib.bpf_table_name(b.module, i)
            info = libbpf.map_info(lib.bpf_table_fd(b.module, name))
            maps[name.decode()] = {
                "key": json.loads(lib.bpf_table_key_desc(b.module, name)),
                "leaf": json.loads(lib.bpf_table_leaf_desc(b.module, name)),
                "type": lib.bpf_table_type(b.module, name),
                "sizes": [info.key_size, info.value_size, info.max_entries, info.map_flags],
            }
        return maps

    def _write_meta(self, maps):
        meta = json.dumps({"layout": layout_id(maps), "sources": sources_digest(),
                           "maps": maps}).encode()
        fd = libbpf.obj_get(self.maps_dir / "meta")
        try:
            leaf = ct.create_string_buffer(libbpf.map_value_size(fd))
            if len(meta) >= len(leaf):
                raise XdeError("internal: map type descriptions exceed the meta map")
            ct.memmove(leaf, meta, len(meta))
            libbpf.update(fd, ct.c_uint32(0), leaf)
        finally:
            os.close(fd)

    def _point_tail_calls(self, fds):
        for table, names in TAIL_CALLS.items():
            fd = libbpf.obj_get(self.maps_dir / table)
            try:
                for slot, name in enumerate(names):
                    if name:
                        libbpf.update(fd, ct.c_uint32(slot), ct.c_uint32(fds[name]))
            finally:
                os.close(fd)

    def load(self):
        """Build the root (cold start): maps and programs pinned under it,
        from the stored compile of these sources if there is one
        (xdectl/compiled.py), else compiled with bcc (and stored)."""
        text = compile_input()
        try:
            self.maps_dir.mkdir(parents=True, exist_ok=True)
            self.progs_dir.mkdir(exist_ok=True)
            doc = compiled.read(text)
            if doc is not None and self._load_stored(doc):
                return
            b, fds = self._compile()
            maps = self._describe(b)
            self._point_tail_calls(fds)
            for name, fd in fds.items():
                libbpf.obj_pin(fd, self.progs_dir / name)
            self._write_meta(maps)
            compiled.save(text, b, programs(), maps)
        except Exception as e:
            self._remove_pins()
            if isinstance(e, XdeError):
                raise
            raise XdeError(f"cannot load the datapath under {self.root}: {e}") from e

    def _load_stored(self, doc):
        """Build the root from a stored compile; False (nothing left under
        the root) when the store does not load: compile instead."""
        try:
            map_fds, prog_fds = compiled.load(doc, self.maps_dir, self.progs_dir)
        except Exception:  # noqa: BLE001 - any store that does not load is compiled over
            # the pins only: the root stays, locked by this process
            for d in (self.maps_dir, self.progs_dir):
                for p in d.iterdir():
                    p.unlink()
            return False
        try:
            self._point_tail_calls(prog_fds)
            for name, fd in prog_fds.items():
                libbpf.obj_pin(fd, self.progs_dir / name)
            self._write_meta(doc["maps"])
        finally:
            for fd in list(map_fds.values()) + list(prog_fds.values()):
                os.close(fd)
        return True

    def reload(self):
        """Compile the current sources against the pinned maps, which stay
        as they are, and re-pin the programs: refused unless the sources
        define the same map layout. The tail-call tables switch at once;
        the caller swaps the attachments. Returns what _compile does: keep
        the module until the swaps are done."""
        pinned = json.loads(self._meta_text())
        fds = {}
        try:
            b, fds = self._compile()
            maps = self._describe(b)
            if layout_id(maps) != pinned.get("layout"):
                raise XdeError(self._layout_error(pinned.get("layout"), layout_id(maps)))
            # pinned beside the old ones first ('.' is not allowed in bpffs)
            for name, fd in fds.items():
                libbpf.obj_pin(fd, self.progs_dir / f"new_{name}")
        except Exception as e:
            for name in fds:
                (self.progs_dir / f"new_{name}").unlink(missing_ok=True)
            if isinstance(e, XdeError):
                raise
            raise XdeError(f"cannot load new programs for {self.root}: {e}") from e
        self._point_tail_calls(fds)
        for name in fds:
            os.replace(self.progs_dir / f"new_{name}", self.progs_dir / name)
        self._write_meta(maps)
        return b, fds

    # --- open ----------------------------------------------------------

    def maps(self):
        """The instance's maps, opened from their pins (cached)."""
        if self._maps is None:
            meta = self._read_meta()
            self._maps = open_maps(meta, self.maps_dir)
        return self._maps

    def port(self, name):
        """(datapath ifindex, port_cfg) of port NAME; XdeError, one line, when
        nothing is loaded under the root or it has no such port."""
        if not self.exists():
            raise XdeError(f"no port {name}: nothing is loaded under {self.root}")
        index, pc = find_port(self.maps(), name)
        if index is None:
            raise XdeError(f"no port {name} on {self.root}")
        return index, pc

    def interrupted(self):
        """Pinned, but its first load was killed before it wrote meta."""
        return not self._meta_text()

    def layout_matches(self):
        try:
            self._read_meta()
            return True
        except XdeError:
            return False

    def prog_ids(self):
        """ids of the programs pinned under the root."""
        ids = set()
        for p in self.progs_dir.iterdir() if self.progs_dir.exists() else []:
            fd = libbpf.obj_get(p)
            try:
                ids.add(libbpf.prog_id(fd))
            finally:
                os.close(fd)
        return ids

    def _meta_text(self):
        fd = libbpf.obj_get(self.maps_dir / "meta")
        try:
            buf = ct.create_string_buffer(libbpf.map_value_size(fd))
            libbpf.lookup(fd, ct.c_uint32(0), buf)
        finally:
            os.close(fd)
        return buf.value.decode()

    def _layout_error(self, found, expected):
        return (f"the datapath pinned under {self.root} has map layout {found}, "
                f"this xdectl's is {expected}; remove it with "
                f"'xdectl --root {self.root} unload --force' and create the ports again")

    def _read_meta(self):
        """The instance's meta, if it was built from this xdectl's sources."""
        text = self._meta_text()
        if json.loads(text).get("sources") != sources_digest():
            raise XdeError(f"the datapath pinned under {self.root} runs programs built from "
                           f"other bpf/ sources than this xdectl's: 'xdectl --root {self.root} "
                           f"reload' loads these if their map layout is the same, else "
                           f"'unload --force' removes it and the ports are created again")
        return text

    def close(self):
        """Close the map descriptors maps() opened."""
        for m in (self._maps or {}).values():
            m.close()
        self._maps = None

    def prog_fd(self, name):
        return libbpf.obj_get(self.progs_dir / name)

    # --- remove --------------------------------------------------------

    def _remove_pins(self):
        for d in (self.maps_dir, self.progs_dir):
            if d.exists():
                for p in d.iterdir():
                    p.unlink()
                d.rmdir()
        if self.root.exists():
            try:
                self.root.rmdir()
            except OSError as e:
                raise XdeError(f"{self.root} holds pins xdectl did not make: {e}") from e

    def remove(self):
        """Unpin everything; the kernel frees what nothing else holds."""
        self.close()
        self._remove_pins()


@contextmanager
def session(root):
    """A locked datapath root and a netlink socket, for one command."""
    from .netdev import Netdev  # pyroute2 only where links are touched
    dp = Datapath(root)
    dp.lock()
    nd = Netdev()
    try:
        yield dp, nd
    finally:
        nd.close()
        dp.close()
        dp.release()
