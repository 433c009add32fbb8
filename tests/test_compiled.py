"""The stored compile (xdectl/compiled.py): a root built from it runs the
very instructions a compile gives, the store is really what it runs, and a
store that does not load is compiled over and written again."""
import base64
import ctypes as ct
import json
import os

import pytest

from netns import BPFFS, short_id
from xdectl import compiled, libbpf
from xdectl.datapath import Datapath, compile_input

pytestmark = pytest.mark.usefixtures("privileged")

# r0 = 2 (XDP_PASS); exit
TINY_XDP = bytes([0xb7, 0, 0, 0, 2, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


class _Info(ct.Structure):
    # the leading fields of struct bpf_prog_info, up to its name
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64), ("name", ct.c_char * 16)]


def _info(fd, info):
    n = ct.c_uint32(ct.sizeof(info))
    assert libbpf._lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)) == 0


def programs(dp):
    """{program: (tag, xlated length, names of the maps it uses)} of a
    root's pinned programs. The kernel's tag leaves map references out:
    the maps' names say each reference went to the map of that name."""
    libbpf._lib.bpf_map_get_fd_by_id.argtypes = [ct.c_uint32]
    out = {}
    for p in dp.progs_dir.iterdir():
        fd = libbpf.obj_get(p)
        try:
            ids = (ct.c_uint32 * 64)()
            info = _Info(nr_map_ids=64, map_ids=ct.addressof(ids))
            _info(fd, info)
            names = []
            for map_id in ids[:info.nr_map_ids]:
                mfd = libbpf._lib.bpf_map_get_fd_by_id(map_id)
                assert mfd >= 0
                try:
                    names.append(libbpf.map_info(mfd).name.decode())
                finally:
                    os.close(mfd)
            out[p.name] = (bytes(info.tag), info.xlated_prog_len, sorted(names))
        finally:
            os.close(fd)
    return out


@pytest.fixture
def roots():
    made = []

    def new():
        dp = Datapath(BPFFS / f"xt-{short_id(8)}")
        dp.lock()
        made.append(dp)
        dp.load()
        return dp
    yield new
    for dp in made:
        if dp.root.exists():
            dp.remove()
        dp.release()


def test_a_root_from_the_store_runs_what_the_compile_gave_and_a_bad_store_is_compiled_over(
        roots, tmp_path, monkeypatch):
    monkeypatch.setenv("XDE_CACHE_DIR", str(tmp_path))
    store = compiled.path(compile_input())
    assert not store.exists()
    first = roots()                                   # compiled, and stored
    assert store.exists()
    second = roots()                                  # from the store
    assert programs(second) == programs(first)
    assert second.layout_matches()
    assert sorted(p.name for p in second.maps_dir.iterdir()) == \
        sorted(p.name for p in first.maps_dir.iterdir())
    # the store is what a root runs: a program changed there is the one loaded
    doc = json.loads(store.read_text())
    doc["progs"]["xdp_fw_eval"]["insns"] = base64.b64encode(TINY_XDP).decode()
    store.write_text(json.dumps(doc))
    other = roots()
    assert programs(other)["xdp_fw_eval"][1] == len(TINY_XDP)
    assert programs(other)["xdp_underlay"] == programs(first)["xdp_underlay"]
    # instructions the kernel refuses: compiled instead, and stored again
    doc["progs"]["xdp_underlay"]["insns"] = base64.b64encode(b"\xff" * 16).decode()
    store.write_text(json.dumps(doc))
    again = roots()
    assert programs(again) == programs(first)
    assert store.read_text() != json.dumps(doc)
    assert programs(roots()) == programs(first)       # from the store written again
