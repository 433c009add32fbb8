"""A port's external addresses and the NAT layer's state (bpf/nat.h).

Traffic a port's router sends to the internet gateway (`ig`) leaves from
one of the port's external addresses: a floating IP, else its ephemeral IP,
else its SNAT IP with a source port from its range. Each family has its
own. The datapath keeps the translation of every flow; this module writes
the addresses (`nat_cfg`), and drops the flows an address change leaves
without a valid translation.
"""
import ipaddress
from dataclasses import dataclass

from .errors import XdeError

MAX_FLOATING = 16             # per family (bpf/nat.h NAT_MAX_FLOATING)


@dataclass(frozen=True)
class ExternalIPs:
    """A port's external addresses: at most one SNAT IP and one ephemeral IP
    per family (the SNAT range is shared by both families' SNAT IPs), and
    floating IPs of either family."""
    snat_ips: tuple = ()
    snat_start: int | None = None
    snat_end: int | None = None
    ephemeral_ips: tuple = ()
    floating_ips: tuple = ()

    def __bool__(self):
        return bool(self.snat_ips or self.ephemeral_ips or self.floating_ips)

    def validated(self, families=(4, 6)):
        """A normalised copy, or XdeError naming the first bad value.
        families: the address families the port has."""
        snat = _addresses(self.snat_ips, "--snat-ip", families, one_per_family=True)
        eph = _addresses(self.ephemeral_ips, "--ephemeral-ip", families, one_per_family=True)
        floating = _addresses(self.floating_ips, "--floating-ip", families)
        for v in (4, 6):
            n = sum(ipaddress.ip_address(a).version == v for a in floating)
            if n > MAX_FLOATING:
                raise XdeError(f"--floating-ip: {n} IPv{v} addresses; a port has at most "
                               f"{MAX_FLOATING} of each family")
        start, end = self.snat_start, self.snat_end
        if snat:
            if start is None or end is None:
                raise XdeError("--snat-ip needs --snat-start and --snat-end (its port range)")
            start, end = _port(start, "--snat-start"), _port(end, "--snat-end")
            if start > end:
                raise XdeError(f"--snat-start {start} is above --snat-end {end}")
        elif start is not None or end is not None:
            raise XdeError("--snat-start and --snat-end need --snat-ip")
        every = snat + eph + floating
        dup = next((a for i, a in enumerate(every) if a in every[:i]), None)
        if dup:
            raise XdeError(f"external IP {dup} is given twice; each address has one role")
        return ExternalIPs(snat, start, end, eph, floating)

    def as_dict(self):
        return {"snat_ips": list(self.snat_ips), "snat_start": self.snat_start,
                "snat_end": self.snat_end, "ephemeral_ips": list(self.ephemeral_ips),
                "floating_ips": list(self.floating_ips)}


def _port(value, what):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise XdeError(f"{what} {value!r} is not a number") from None
    if not 1 <= n <= 65535:
        raise XdeError(f"{what} {n} is outside 1..65535")
    return n


def _addresses(values, what, families, one_per_family=False):
    out = []
    for value in values:
        try:
            a = ipaddress.ip_address(value)
        except ValueError:
            raise XdeError(f"{what} {value!r} is not an IPv4 or IPv6 address") from None
        if a.version == 6 and (a.ipv4_mapped or a.scope_id):
            raise XdeError(f"{what} {value!r}: write an IPv4-mapped address as IPv4, "
                           f"and an external address has no scope")
        if (a.is_multicast or a.is_unspecified or a.is_loopback or a.is_link_local
                or (a.version == 4 and a == ipaddress.IPv4Address("255.255.255.255"))):
            raise XdeError(f"{what} {value!r} is not a unicast address")
        if a.version not in families:
            raise XdeError(f"{what} {a}: the port has no IPv{a.version} address to translate")
        if one_per_family and any(ipaddress.ip_address(b).version == a.version for b in out):
            raise XdeError(f"{what}: one IPv{a.version} address per port")
        out.append(str(a))
    return tuple(out)


# --- the datapath's state (bpf/nat.h) -----------------------------------------

KINDS = {1: "snat", 2: "ephemeral", 3: "floating"}      # enum nat_kind
NAT_SNAT = 1


def _be16(v):
    """A __be16 field as bcc reads it -> the number."""
    return int.from_bytes(int(v).to_bytes(2, "little"), "big")


def _to_be16(n):
    return int.from_bytes(int(n).to_bytes(2, "big"), "little")


def _family(addr):
    return ipaddress.ip_address(addr).version


def encode(leaf, ext, gen):
    """Fill a nat_cfg value for a validated ExternalIPs."""
    from .maps import addr16, set_bytes
    leaf.gen = gen
    for i, version in enumerate((4, 6)):
        f = leaf.fam[i]
        snat = [a for a in ext.snat_ips if _family(a) == version]
        if snat:
            set_bytes(f.snat, addr16(snat[0]))
            f.snat_start, f.snat_end = ext.snat_start, ext.snat_end
        eph = [a for a in ext.ephemeral_ips if _family(a) == version]
        if eph:
            set_bytes(f.ephemeral, addr16(eph[0]))
            f.has_ephemeral = 1
        floating = [a for a in ext.floating_ips if _family(a) == version]
        for j, a in enumerate(floating):
            set_bytes(f.floating[j].a, addr16(a))
        f.nfloating = len(floating)
    return leaf


def decode(leaf):
    """A nat_cfg value -> ExternalIPs."""
    from .maps import addr_str
    snat, eph, floating, start, end = [], [], [], None, None
    for f in leaf.fam:
        if f.snat_start:
            snat.append(addr_str(f.snat))
            start, end = f.snat_start, f.snat_end
        if f.has_ephemeral:
            eph.append(addr_str(f.ephemeral))
        floating += [addr_str(f.floating[j].a) for j in range(f.nfloating)]
    return ExternalIPs(tuple(snat), start, end, tuple(eph), tuple(floating))


def read(maps, index):
    m = maps["nat_cfg"]
    v = m.get(m.Key(index))
    return decode(v) if v is not None else ExternalIPs()


def write(maps, index, ext):
    """Give port index the external addresses ext (validated); the new
    generation makes the datapath check every translation made before."""
    m = maps["nat_cfg"]
    old = m.get(m.Key(index))
    m.set(m.Key(index), encode(m.Leaf(), ext, (old.gen + 1 if old is not None else 1) & 0xFFFFFFFF))


def fits(ext, kind, addr, port):
    """Does ext still have this translation's external address (and port)?"""
    if kind == NAT_SNAT:
        return addr in ext.snat_ips and ext.snat_start <= port <= ext.snat_end
    return addr in (ext.floating_ips if KINDS.get(kind) == "floating" else ext.ephemeral_ips)


def _reverse(m, k):
    """The key of the flow's other direction (bpf/flow.h flow_key_reverse)."""
    r = m.Key()
    r.port, r.dir, r.proto = k.port, 1 - k.dir, k.proto
    r.src, r.dst, r.sport, r.dport = k.dst, k.src, k.dport, k.sport
    return r


def drop_unfit(maps, index, ext):
    """Remove the port's translations ext no longer has, with their flows
    (both directions) and SNAT ports. Returns how many flows went."""
    from .maps import addr_str
    nat, flows, owners = maps["nat_flows"], maps["flows"], maps["snat_ports"]
    gone = []
    for k, v in list(nat.items()):
        if k.port != index:
            continue
        ext_addr, ext_port = (addr_str(v.addr), _be16(v.port)) if k.dir == 0 else \
                             (addr_str(k.dst), _be16(k.dport))
        if fits(ext, v.kind, ext_addr, ext_port):
            continue
        nat.delete(k)
        if k.dir == 0:
            gone.append(k)
    for k in gone:
        flows.delete(k)
        flows.delete(_reverse(flows, k))
    dead = {bytes(k) for k in gone}
    for sk, o in list(owners.items()):
        if sk.port == index and bytes(o.flow) in dead:
            owners.delete(sk)
    return len(gone)


def remove_port_state(maps, index):
    """Everything NAT holds for a port that is going away."""
    for name in ("nat_flows", "snat_ports"):
        m = maps[name]
        for k in [k for k in m.keys() if k.port == index]:
            m.delete(k)
    maps["nat_cfg"].delete(maps["nat_cfg"].Key(index))


def translation(maps, k):
    """How the flow-table entry k is translated: {kind, external} or None."""
    from .maps import addr_str
    out = k if k.dir == 0 else _reverse(maps["flows"], k)
    nat = maps["nat_flows"]
    key = nat.Key()
    ct_copy(key, out)
    v = nat.get(key)
    if v is None:
        return None
    return {"kind": KINDS.get(v.kind, str(v.kind)), "external": f"{addr_str(v.addr)}:{_be16(v.port)}"}


def ct_copy(dst, src):
    """Copy one ctypes struct into another of the same layout."""
    import ctypes
    ctypes.memmove(ctypes.addressof(dst), ctypes.addressof(src), ctypes.sizeof(dst))


def conflict(ext, other, other_name):
    """Why a port with external addresses ext cannot be beside port
    other_name with other's, or None. Ports may share a SNAT IP, with
    disjoint ranges; a floating or ephemeral IP is one port's alone (the
    boundary sends it to one guest), and no port's SNAT IP."""
    mine_1to1 = set(ext.ephemeral_ips + ext.floating_ips)
    other_1to1 = set(other.ephemeral_ips + other.floating_ips)
    taken = (mine_1to1 & (other_1to1 | set(other.snat_ips))) or (set(ext.snat_ips) & other_1to1)
    if taken:
        return (f"external IP {sorted(taken)[0]} is port {other_name}'s: a floating or "
                f"ephemeral IP belongs to one port only")
    shared = set(other.snat_ips) & set(ext.snat_ips)
    if shared and ext.snat_start <= other.snat_end and other.snat_start <= ext.snat_end:
        return (f"SNAT range {ext.snat_start}-{ext.snat_end} of {sorted(shared)[0]} overlaps "
                f"port {other_name}'s {other.snat_start}-{other.snat_end}")
    return None


def check_shared(maps, index, ext):
    """ext beside the root's other ports' external addresses (conflict)."""
    for k, v in maps["nat_cfg"].items():
        if k.value == index:
            continue
        pc = maps["ports"].get(maps["ports"].Key(k.value))
        why = conflict(ext, decode(v), pc.name.decode() if pc is not None else
                       f"ifindex {k.value}")
        if why:
            raise XdeError(why)


def port_families(pc):
    from .abi import PORT_F_IP4, PORT_F_IP6
    return tuple(v for v, flag in ((4, PORT_F_IP4), (6, PORT_F_IP6)) if pc.flags & flag)


def set_external_ips(root, name, ext):
    """Replace port NAME's external addresses; flows whose translation no
    longer fits are dropped from the flow table. Returns how many."""
    from .abi import PORT_F_PASSTHROUGH
    from .datapath import session
    with session(root) as (dp, _):
        index, pc = dp.port(name)
        if pc.flags & PORT_F_PASSTHROUGH:
            raise XdeError(f"port {name} is a passthrough port: it has no NAT")
        ext = ext.validated(port_families(pc))
        maps = dp.maps()
        check_shared(maps, index, ext)
        write(maps, index, ext)
        return drop_unfit(maps, index, ext)
