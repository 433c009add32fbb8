"""Boundary services (docs/design.md, "Boundary services"): the datapath of
the host where the VPCs meet the outside, in a root of its own.

`up` loads the root if it is empty, attaches xdp_boundary to the underlay
NICs (which get the sysctls and checksum offload of a sled's underlays,
xdectl/underlay.py) and tc_boundary to TC ingress of the external NIC, and
writes the boundary's configuration (bpf/boundary.h); `down` takes all of
it away again and clears the NAT table and the counters. The NAT table
says which guest (its sled's underlay address, VNI, MAC) owns an external
address: whole (1:1, for a floating or ephemeral IP) or by port ranges
(SNAT: several guests share one address). Routing what is decapsulated
is the host kernel's: `up` refuses to start while forwarding is off.
"""
import ipaddress
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

from . import counters, libbpf, underlay, validate
from .datapath import Datapath, session, tc_name
from .errors import Teardown, XdeError
from .maps import addr16, addr_order, addr_str, ip6_str, mac_bytes, mac_str, set_bytes
from .netdev import read_sysctl, sysctl

XDP_PROG, TC_PROG = "xdp_boundary", "tc_boundary"
DEFAULT_VNI = 99
ADDR_BITS = 128               # a NAT key's address bits; its port's follow (bpf/boundary.h)
# What the kernel must do for boundary services: forward IPv4 and IPv6
# (what is decapsulated goes out of the external NIC; bpf_fib_lookup from
# the external NIC's hook needs IPv6 forwarding on it).
FORWARDING = {"net/ipv4/ip_forward": "net.ipv4.ip_forward",
              "net/ipv6/conf/all/forwarding": "net.ipv6.conf.all.forwarding"}
# Decapsulated IPv4 arrives on an underlay from external addresses the host
# routes elsewhere: reverse-path filtering would drop it. `up` turns it off
# on the underlays; a host-wide setting above 0 would win over theirs.
RP_FILTER = "net/ipv4/conf/{}/rp_filter"


# --- input -----------------------------------------------------------------------

@dataclass(frozen=True)
class NatTarget:
    """An external address: the whole of it (start None), or the port range
    start-end of it."""
    addr: str
    start: int | None = None
    end: int | None = None

    @property
    def whole(self):
        return self.start is None

    def overlaps(self, other):
        return self.addr == other.addr and (self.whole or other.whole or
                                            (self.start <= other.end and other.start <= self.end))

    def sort_key(self):
        return addr_order(self.addr), self.start or 0

    def __str__(self):
        if self.whole:
            return self.addr
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{host}:{self.start}-{self.end}"


@dataclass(frozen=True)
class NatEntry:
    target: NatTarget
    sled: str                 # the underlay address of the guest's sled
    vni: int
    mac: str

    def describe(self):
        return f"{self.target} -> {self.sled} VNI {self.vni} {self.mac}"


def parse_target(text):
    """EXT_IP, EXT_IP:START-END, [EXT_IP6] or [EXT_IP6]:START-END (a single
    PORT is the range PORT-PORT) -> NatTarget, or XdeError."""
    what = f"external address {text!r}"
    if not isinstance(text, str) or not text.strip():
        raise XdeError("an external address is required (EXT_IP or EXT_IP:START-END)")
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")) or rest == ":":
            raise XdeError(f"{what}: expected [IPV6] or [IPV6]:START-END")
        ports = rest[1:] or None
        if _is_addr(addr) and ipaddress.ip_address(addr).version != 6:
            raise XdeError(f"{what}: brackets are for IPv6 addresses")
    elif ":" not in text or _is_addr(text):
        addr, ports = text, None
    else:
        addr, _, ports = text.rpartition(":")
        if ":" in addr:
            raise XdeError(f"{what}: write an IPv6 address with a port range in brackets, "
                           f"as [2001:db8::1]:1024-2047")
        if not addr:
            raise XdeError(f"{what}: expected EXT_IP or EXT_IP:START-END")
    addr = external_addr(addr, what)
    if ports is None:
        return NatTarget(addr)
    start, end = _ports(ports, what)
    return NatTarget(addr, start, end)


def _is_addr(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def external_addr(value, what):
    """An external address: unicast IPv4 or IPv6, normalised."""
    try:
        a = ipaddress.ip_address(value)
    except ValueError:
        raise XdeError(f"{what}: {value!r} is not an IPv4 or IPv6 address") from None
    if a.version == 6 and a.ipv4_mapped:
        raise XdeError(f"{what}: write an IPv4-mapped address as IPv4 ({a.ipv4_mapped})")
    if a.version == 6 and a.scope_id:
        raise XdeError(f"{what}: an external address has no scope")
    if (a.is_multicast or a.is_unspecified or a.is_loopback or a.is_link_local
            or a == ipaddress.IPv4Address("255.255.255.255")):
        raise XdeError(f"{what}: {a} is not a unicast address")
    return str(a)


def _ports(text, what):
    lo, sep, hi = text.partition("-")
    values = []
    for p in (lo, hi) if sep else (lo,):
        if not p.strip().isdigit():
            raise XdeError(f"{what}: port range {text!r} is not START-END (1 to 65535)")
        n = int(p)
        if not 1 <= n <= 65535:
            raise XdeError(f"{what}: port {n} is outside 1..65535")
        values.append(n)
    start, end = values[0], values[-1]
    if start > end:
        raise XdeError(f"{what}: the range starts at {start}, above its end {end}")
    return start, end


def underlay_ip(value, what="sled underlay address"):
    """An underlay address (a sled's, the boundary's): global or
    unique-local unicast IPv6."""
    a = ipaddress.ip_address(validate.ipv6(value, what))
    if a.is_multicast or a.is_unspecified or a.is_loopback or a.is_link_local or a.ipv4_mapped:
        raise XdeError(f"{what} {value!r} is not a global or unique-local unicast IPv6 address")
    return str(a)


def nat_entry(target, sled, vni, mac):
    """set-nat's arguments, checked and normalised: a NatEntry, or XdeError
    naming the first bad one."""
    return NatEntry(parse_target(target), underlay_ip(sled), validate.vni(vni, "VNI"),
                    validate.mac(mac, "guest MAC"))


def conflict(targets, new):
    """The first of targets (by address, then port) that new overlaps, other
    than new itself (setting that again changes whose it is), or None."""
    for t in sorted(targets, key=NatTarget.sort_key):
        if t != new and t.overlaps(new):
            return t
    return None


def port_prefixes(start, end):
    """The prefixes of the 16-bit port space that tile start..end, as
    (first port, prefix bits): the keys of a port range in the trie."""
    out = []
    while start <= end:
        size = start & -start or 1 << 16
        while size > end - start + 1:
            size >>= 1
        out.append((start, 17 - size.bit_length()))
        start += size
    return out


# --- the maps ----------------------------------------------------------------------

def _cfg(maps):
    m = maps["bsvc_cfg"]
    return m, m.get(m.Key(0))


def _nat_key(m, addr, port=0, bits=0):
    k = m.Key()
    k.prefixlen = ADDR_BITS + bits
    set_bytes(k.addr, addr16(addr))
    k.port = socket.htons(port)
    return k


def _nat_keys(m, target):
    if target.whole:
        return [_nat_key(m, target.addr)]
    return [_nat_key(m, target.addr, p, b) for p, b in port_prefixes(target.start, target.end)]


def _key_count(target):
    return 1 if target.whole else len(port_prefixes(target.start, target.end))


def _entries(maps):
    """{NatTarget: NatEntry} of the NAT table (each read once, from any of
    its keys)."""
    out = {}
    for k, v in maps["bsvc_nat"].items():
        addr = addr_str(k.addr)
        t = NatTarget(addr) if v.start == 0 else NatTarget(addr, v.start, v.end)
        out[t] = NatEntry(t, ip6_str(v.underlay), v.vni, mac_str(v.mac))
    return out


def nat_entries(maps):
    """How many entries the NAT table has (not keys: a range has several)."""
    return len(_entries(maps))


def _clear_table(maps):
    m = maps["bsvc_nat"]
    for k in m.keys():
        m.delete(k)


def _clear_state(maps):
    """The configuration and counters, as before `up`."""
    m, _ = _cfg(maps)
    m.set(m.Key(0), m.Leaf())
    s = maps["bsvc_stats"]
    s.set(s.Key(0), s.Leaf())


@contextmanager
def _locked(root):
    """The root's maps under its lock (no netlink: the NAT table is maps only)."""
    dp = Datapath(root)
    dp.lock()
    try:
        yield dp
    finally:
        dp.close()
        dp.release()


def _up_maps(dp):
    if dp.exists():
        maps = dp.maps()
        if _cfg(maps)[1].up:
            return maps
    raise XdeError(f"boundary services are not up on {dp.root}: 'xdectl boundary up' first")


# --- up and down -----------------------------------------------------------------

def up(root, underlays, underlay_addr, external, vni=DEFAULT_VNI):
    from .ports import Undo
    names = [validate.ifname(u, "--underlay device") for u in underlays]
    if not 1 <= len(names) <= 2:
        raise XdeError(f"boundary services take one or two --underlay devices, got {len(names)}")
    if len(set(names)) != len(names):
        raise XdeError(f"--underlay {names[0]} is given twice")
    ext = validate.ifname(external, "--external device")
    if ext in names:
        raise XdeError(f"--external {ext} is also an --underlay device")
    addr = underlay_ip(underlay_addr, "--underlay-addr")
    vni = validate.vni(vni, "--vni")
    with session(root) as (dp, nd):
        links = [nd.index(n) for n in names]
        ext_index = nd.index(ext)
        for n, i in list(zip(names, links)) + [(ext, ext_index)]:
            if i is None:
                raise XdeError(f"device {n} not found in this network namespace")
        _check_kernel(ext)
        if dp.exists() and dp.interrupted():
            dp.remove()       # a first load that was killed: nothing attached yet
        fresh = not dp.exists()
        ours = set()
        if not fresh:
            _check_root(dp, nd)
            ours = dp.prog_ids()
        for n, i in zip(names, links):
            other = nd.xdp_prog_id(i)
            if other and other not in ours:
                raise XdeError(f"underlay {n} already has an XDP program (id {other}) that is "
                               f"not this root's")
        undo = Undo()
        try:
            if fresh:
                dp.load()
                undo.add(dp.remove)
            _attach(dp, nd, links, ext_index, addr, vni, undo)
        except BaseException:
            undo.run()
            raise


def _check_kernel(ext):
    """What `up` needs of the host's kernel and leaves to the operator."""
    off = [name for path, name in FORWARDING.items() if read_sysctl(path) != "1"]
    if not off and read_sysctl(f"net/ipv6/conf/{ext}/forwarding") != "1":
        off = [f"net.ipv6.conf.{ext}.forwarding"]
    if off:
        raise XdeError(f"boundary services hand what they decapsulate to this host's kernel to "
                       f"route: set {' and '.join(f'{n}=1' for n in off)} first")
    if read_sysctl(RP_FILTER.format("all")) != "0":
        raise XdeError("decapsulated packets come from external addresses, which reverse-path "
                       "filtering on the underlays would drop: set net.ipv4.conf.all.rp_filter=0 "
                       "first (up turns the underlays' own off)")


def _rp_filter_off(name, undo):
    undo.add(_rp_filter_default, name)
    sysctl(RP_FILTER.format(name), 0)


def _rp_filter_default(name):
    sysctl(RP_FILTER.format(name), read_sysctl(RP_FILTER.format("default")))


def _check_root(dp, nd):
    maps = dp.maps()          # refuses a root built from other sources
    names = sorted(pc.name.decode() for _, pc in maps["ports"].items())
    if names:
        raise XdeError(f"{dp.root} holds ports ({', '.join(names)}): boundary services need a "
                       f"root of their own")
    _, cfg = _cfg(maps)
    if cfg.up:
        links = ", ".join(str(nd.name(u)) for u in cfg.underlay if u)
        raise XdeError(f"boundary services are already up on {dp.root} (underlays {links}, "
                       f"external {nd.name(cfg.external)}): 'xdectl boundary down' first")


def _attach(dp, nd, links, ext_index, addr, vni, undo):
    maps = dp.maps()
    m, cfg = _cfg(maps)
    cfg.up, cfg.vni, cfg.external, cfg.sw_csum = 1, vni, ext_index, 0
    set_bytes(cfg.underlay_addr, ipaddress.IPv6Address(addr).packed)
    for i, u in enumerate(links):
        cfg.underlay[i] = u
    cfg.hash_seed = int.from_bytes(os.urandom(4), "little") or 1
    # recorded first, and again as each step is done: what a killed `up`
    # leaves, `down` finds
    undo.add(_clear_state, maps)
    _clear_state(maps)
    m.set(m.Key(0), cfg)
    xdp_fd, tc_fd = dp.prog_fd(XDP_PROG), dp.prog_fd(TC_PROG)
    try:
        for i, u in enumerate(links):
            cfg.sw_csum |= underlay.tune(nd, u, undo) << i
            m.set(m.Key(0), cfg)
            _rp_filter_off(nd.name(u), undo)
            undo.add(nd.detach_xdp, u)
            nd.attach_xdp(u, xdp_fd, replace=True)
        undo.add(nd.detach_tc_ingress, ext_index)
        nd.attach_tc_ingress(ext_index, tc_fd, tc_name(TC_PROG, dp.root))
    finally:
        os.close(xdp_fd)      # XDP and the filter hold the programs now
        os.close(tc_fd)


def down(root):
    """Detach boundary services and clear their state. False when they were
    not up. A piece that cannot be removed is named (Incomplete), the rest
    is removed all the same."""
    with session(root) as (dp, nd):
        if not dp.exists():
            return False
        maps = dp.maps()
        _, cfg = _cfg(maps)
        if not cfg.up:
            return False
        _detach(dp, nd, maps, cfg)
        return True


def _detach(dp, nd, maps, cfg):
    td = Teardown()
    ours = dp.prog_ids()
    for i, u in enumerate(cfg.underlay):
        name = nd.name(u) if u else None
        if name is None:      # gone, and what was attached to it with it
            continue
        if nd.xdp_prog_id(u) in ours:
            td.step(f"detach XDP from {name}", nd.detach_xdp, u)
        td.step(f"restore the settings of {name}", underlay.untune, nd, u, cfg.sw_csum >> i & 1)
        td.step(f"restore the settings of {name}", _rp_filter_default, name)
    ext = nd.name(cfg.external) if cfg.external else None
    if ext is not None and tc_name(TC_PROG, dp.root) in nd.tc_ingress_names(cfg.external):
        td.step(f"detach the TC filter from {ext}", nd.detach_tc_ingress, cfg.external)
    td.step("clear the NAT table", _clear_table, maps)
    td.step("clear the boundary's configuration", _clear_state, maps)
    td.done()


def detach(dp, nd):
    """For `unload`: take away whatever boundary services attached under
    this root, from the maps when they can be read, else found by program
    id and filter name (xdp_boundary's underlays keep their sysctls and
    offload settings then)."""
    if dp.layout_matches():
        maps = dp.maps()
        _, cfg = _cfg(maps)
        if cfg.up:
            _detach(dp, nd, maps, cfg)
    xdp_id = None
    if (dp.progs_dir / XDP_PROG).exists():
        fd = dp.prog_fd(XDP_PROG)
        try:
            xdp_id = libbpf.prog_id(fd)
        finally:
            os.close(fd)
    name = tc_name(TC_PROG, dp.root)
    for index, _ in nd.links():
        if xdp_id and nd.xdp_prog_id(index) == xdp_id:
            nd.detach_xdp(index)
        if name in nd.tc_ingress_names(index):
            nd.detach_tc_ingress(index)


def swap_programs(maps, nd, fds, root):
    """`reload`: the new programs in place of the old on the boundary's
    links (atomic swaps); returns how many."""
    _, cfg = _cfg(maps)
    if not cfg.up:
        return 0
    n = 0
    for u in cfg.underlay:
        if u:
            nd.attach_xdp(u, fds[XDP_PROG], replace=True)
            n += 1
    nd.replace_tc_ingress(cfg.external, fds[TC_PROG], tc_name(TC_PROG, root))
    return n + 1


# --- the NAT table -----------------------------------------------------------------

class _NatTable:
    """The NAT map and its entries, read once and kept current as entries
    are put and removed: many changes cost one walk of the table, not one
    each (with 5,000 entries a set-nat takes 40 ms, most of it the walk;
    sync_nat changes all 5,000 in 0.2 s)."""

    def __init__(self, maps):
        self.m = maps["bsvc_nat"]
        self.entries = _entries(maps)
        self.keys = sum(_key_count(t) for t in self.entries)
        self.by_addr = {}
        for t in self.entries:
            self.by_addr.setdefault(t.addr, set()).add(t)

    def put(self, entry):
        """Refused, with nothing changed, if it overlaps another entry of
        that address; the same target again changes whose it is."""
        m, t = self.m, entry.target
        clash = conflict(self.by_addr.get(t.addr, ()), t)
        if clash:
            raise XdeError(f"{t} overlaps {self.entries[clash].describe()}: "
                           f"'xdectl boundary clear-nat {clash}' first")
        keys = _nat_keys(m, t)
        new = t not in self.entries
        if new and self.keys + len(keys) > m.max_entries:
            raise XdeError(f"the NAT table is full ({m.max_entries} prefixes): {t} "
                           f"needs {len(keys)}")
        v = m.Leaf()
        set_bytes(v.underlay, ipaddress.IPv6Address(entry.sled).packed)
        v.vni = entry.vni
        set_bytes(v.mac, mac_bytes(entry.mac))
        v.start, v.end = (0, 0) if t.whole else (t.start, t.end)
        done = []
        try:
            for k in keys:
                done.append((k, m.get(k)))
                m.set(k, v)
        except BaseException:  # put back what was there: all of it or none
            for k, before in reversed(done):
                if before is None:
                    m.delete(k)
                else:
                    m.set(k, before)
            raise
        self.entries[t] = entry
        self.by_addr.setdefault(t.addr, set()).add(t)
        self.keys += len(keys) if new else 0

    def remove(self, t, root):
        """The entry of exactly this address or range."""
        if t not in self.entries:
            same = sorted(str(o) for o in self.by_addr.get(t.addr, ()))
            raise XdeError(f"no NAT entry {t} on {root}" +
                           (f" ({t.addr} has {', '.join(same)})" if same else ""))
        keys = _nat_keys(self.m, t)
        for k in keys:
            self.m.delete(k)
        del self.entries[t]
        self.by_addr[t.addr].discard(t)
        self.keys -= len(keys)


def set_nat(root, target, sled, vni, mac):
    """Give the external address (or port range) to a guest (_NatTable.put)."""
    entry = nat_entry(target, sled, vni, mac)
    with _locked(root) as dp:
        _NatTable(_up_maps(dp)).put(entry)
    return entry


def clear_nat(root, target):
    """Remove the entry of exactly this address or range."""
    t = parse_target(target)
    with _locked(root) as dp:
        _NatTable(_up_maps(dp)).remove(t, root)


def sync_nat(root, want):
    """Make the NAT table hold exactly want ({external: (sled, vni, mac)},
    as set-nat takes them), through one read of the table: entries not
    wanted are cleared first, then the missing and changed ones set.
    Returns (changes tried, one line for each change that failed)."""
    errors, wanted = [], {}
    for text, owner in sorted(want.items()):
        try:
            e = nat_entry(text, *owner)
            wanted[e.target] = e
        except XdeError as x:
            errors.append(f"set-nat {text}: {x}")
    changes = 0
    with _locked(root) as dp:
        table = _NatTable(_up_maps(dp))
        for t in sorted(table.entries.keys() - wanted.keys(), key=NatTarget.sort_key):
            changes += 1
            try:
                table.remove(t, root)
            except Exception as x:  # noqa: BLE001 - bcc's too: one change fails, not all
                errors.append(f"clear-nat {t}: {x}")
        for t in sorted(wanted, key=NatTarget.sort_key):
            if table.entries.get(t) != wanted[t]:
                changes += 1
                try:
                    table.put(wanted[t])
                except Exception as x:  # noqa: BLE001
                    errors.append(f"set-nat {t}: {x}")
    return changes, errors


def dump_nat(root):
    """The NAT table, by address then port: one dict an entry."""
    dp = Datapath(root)
    if not dp.exists():
        return []
    try:
        return [{"external": str(e.target), "address": e.target.addr,
                 "start": e.target.start, "end": e.target.end, "sled": e.sled,
                 "vni": e.vni, "mac": e.mac}
                for e in sorted(_entries(dp.maps()).values(), key=lambda e: e.target.sort_key())]
    finally:
        dp.close()


# --- observing -----------------------------------------------------------------------

def show(root):
    """The boundary's configuration as the maps hold it."""
    dp = Datapath(root)
    if not dp.exists():
        return {"up": False}
    try:
        maps = dp.maps()
        _, cfg = _cfg(maps)
        if not cfg.up:
            return {"up": False}
        from .netdev import Netdev
        nd = Netdev()
        try:
            links = [nd.name(u) for u in cfg.underlay if u]
            ext = nd.name(cfg.external)
        finally:
            nd.close()
        return {"up": True, "vni": cfg.vni, "underlay_addr": ip6_str(cfg.underlay_addr),
                "underlays": links, "external": ext, "nat_entries": nat_entries(maps)}
    finally:
        dp.close()


def stats(root):
    """The boundary's counters (summed over CPUs): events, then drop_<reason>;
    {} when nothing is loaded under the root."""
    dp = Datapath(root)
    if not dp.exists():
        return {}
    try:
        maps = dp.maps()
        c = counters.boundary_counts(maps)
        return {**c.events, **{f"drop_{r}": n for r, n in c.drops.items()},
                "nat_entries": nat_entries(maps)}
    finally:
        dp.close()
