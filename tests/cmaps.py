"""The datapath's maps as in-memory stand-ins, for unit tests of the code
that fills and reads them (no root, no bcc). Key and value types are
ctypes structures built from the struct declarations in bpf/, so Python
is checked against the C layout itself, not against a copy of it. Only
what the maps' types use is understood: integer fields, arrays of them
(of one or more dimensions, lengths in digits or a #define) and nested
structs."""
import ctypes as ct
import re
from pathlib import Path

BPF = Path(__file__).resolve().parents[1] / "bpf"

SCALARS = {"__u8": ct.c_ubyte, "__u16": ct.c_ushort, "__be16": ct.c_ushort, "__u32": ct.c_uint,
           "__be32": ct.c_uint, "u32": ct.c_uint, "__u64": ct.c_ulonglong, "u64": ct.c_ulonglong,
           "char": ct.c_char}


def _source():
    text = "\n".join(p.read_text() for p in sorted(BPF.glob("*.[ch]")))
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


SRC = _source()
DEFINES = {n: int(v, 0) for n, v in re.findall(r"^#define (\w+) (0x[0-9a-fA-F]+|\d+)\s*$", SRC,
                                               re.M)}
_structs = {}


def ctype(decl):
    """The ctypes type of a C type name: a scalar or `struct NAME`."""
    decl = decl.strip()
    if decl in SCALARS:
        return SCALARS[decl]
    name = decl.removeprefix("struct ").strip()
    if name not in _structs:
        body = re.search(r"struct " + name + r" \{([^{}\n]*)\};", SRC) or \
            re.search(r"struct " + name + r" \{(.*?)\n\};", SRC, re.S)   # one line, or many
        assert body, f"struct {name} not found in bpf/"
        fields = []
        for typ, field, dims in re.findall(r"^\s*((?:struct )?\w+) (\w+)((?:\[\w+\])*);",
                                           body.group(1).replace(";", ";\n"), re.M):
            t = ctype(typ)
            for n in reversed(re.findall(r"\[(\w+)\]", dims)):   # a[N][M]: N arrays of M
                t = t * (int(n) if n.isdigit() else DEFINES[n])
            fields.append((field, t))
        _structs[name] = type(name, (ct.Structure,), {"_fields_": fields})
    return _structs[name]


class FakeMap:
    """What xdectl.maps.Map offers the code under test, over a dict."""

    def __init__(self, name, key, leaf, max_entries):
        self.name, self.Key, self.Leaf, self.max_entries = name, key, leaf, max_entries
        self.data = {}

    def get(self, key):
        raw = self.data.get(bytes(key))
        return None if raw is None else self.Leaf.from_buffer_copy(raw)

    def set(self, key, value, flags=0):
        self.data[bytes(key)] = bytes(value)

    def delete(self, key):
        return self.data.pop(bytes(key), None) is not None

    def keys(self):
        return [self.Key.from_buffer_copy(k) for k in self.data]

    def items(self):
        return [(k, self.get(k)) for k in self.keys()]

    def update_batch(self, pairs):
        for k, v in pairs:
            self.set(k, v)
        return len(pairs)


def fake_maps(*names):
    """The named maps as bpf/ declares them, empty (arrays too: a test sets
    what it reads)."""
    decls = {name: (key, leaf, size) for key, leaf, name, size in re.findall(
        r'XDE_MAP(?:_F)?\("\w+", ([\w ]+), ([\w ]+), (\w+), (\w+)', SRC)}
    out = {}
    for name in names:
        key, leaf, size = decls[name]
        out[name] = FakeMap(name, ctype(key), ctype(leaf),
                            int(size) if size.isdigit() else DEFINES[size])
    return out
