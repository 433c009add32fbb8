"""`xdectl apply FILE`: make the running state of a root match a
declarative TOML file -- the boot-time restore of ports, and the way to
change many things at once (docs/design.md, "Reload, apply and trace").

The file (see deploy/xde.example.toml):

    [defaults]                     # optional: any port field, for every port
    underlays = ["u1", "u2"]
    underlay_addr = "fd00:1::1"
    gateway_mac = "a8:40:25:00:00:01"
    gateway_ip = "172.30.0.5"
    boundary_services = "fd00:99::1"
    boundary_vni = 99
    vni = 10

    [[port]]                       # one table per port
    name = "xde0"                  # required
    mac = "a8:40:25:ff:00:01"      # required
    ip = "10.0.0.1"                # ip, ip6 or both
    vpc_subnet = "10.0.0.0/24"     # optional (default: the /24 of ip)
    ip6 = "fd10::1"
    vpc_subnet6 = "fd10::/64"      # optional (default: the /64 of ip6)
    dns = ["10.0.0.53", "fd10::53"]  # optional: offered by DHCPv4 / DHCPv6
    hostname = "web1"              # optional: offered by DHCPv4
    domain = "vpc.example"         # optional: offered by DHCPv4 and DHCPv6
    passthrough = false            # optional
    snat_ip = ["192.0.2.5", "2001:db8::5"]  # optional: external addresses
    snat_start = 1024              #   (per port, not in [defaults]): one
    snat_end = 2047                #   SNAT IP and one ephemeral IP per
    ephemeral_ip = "192.0.2.6"     #   family (a string or a list), one SNAT
    floating_ips = ["192.0.2.7"]   #   range for both, 16 floating IPs per family
    # ... and every other `xdectl create` field not given in [defaults]:
    # underlays (two names), underlay_addr, gateway_mac, gateway_ip,
    # boundary_services, boundary_vni, vni (and vpc_subnet, vpc_subnet6,
    # dns, domain may be defaults too; the external addresses may not).
    routes = [                     # optional: the port's custom routes
      { dest = "192.168.0.0/16", target = "ip4=10.0.0.2" },
      { dest = "fd20::/48", target = "ip6=fd10::2" },
    ]
    firewall = [                   # optional: the port's whole rule set
      "dir=in action=allow priority=65535 hosts=vni=10",
      "dir=in action=allow priority=65535 protocol=icmp",
      "dir=in action=allow priority=65535 protocol=icmp6",
    ]

    [[v2p]]                        # V2P mappings of the instance
    ip = "10.0.0.2"
    mac = "a8:40:25:ff:00:02"
    underlay = "fd00:2::1"
    vni = 10

Meaning, resource by resource:
- Ports: those in the file exist with exactly these fields. A missing port
  is created, a port not in the file is deleted, a port whose fields differ
  is replaced (deleted and created again: a port cannot be changed in
  place; its guest loses the link for a moment and, if the guest end had
  been moved into a namespace or VM, it comes back in this namespace).
  Only what the gateway tells the guest (dns, hostname, domain) changes in
  place: the port's DHCP replies are rewritten, and the guest learns the
  new values at its next DHCP exchange. So do the port's external
  addresses (snat_ip with snat_start and snat_end, ephemeral_ip,
  floating_ips; `xdectl set-external-ips`): flows whose translation the
  new addresses no longer have are dropped, the others keep theirs.
- V2P: the mappings are exactly the file's plus each overlay port's own
  mappings, one per address (which `create` adds); others are removed.
- Routes: a port's custom routes are exactly its `routes` (none if absent).
  The system routes `create` installs are not managed here.
- Firewall: when a port has `firewall`, its rules are exactly those lines
  (set-fw-rules syntax; they replace the default rules `create` installs,
  so list those too if you want them). Without `firewall`, the rules are
  left as they are.

Unknown keys are errors, and the whole file is checked before anything
changes. Applying computes a plan (the differences between the running
state and the file, as a list of actions) and executes it in order: port
deletions, external-address changes (which may free a SNAT range a new
port takes), port creations, gateway settings, then V2P, routes and
firewall rules. Applying
the same file again finds nothing to do ("no changes"). A failure stops
the run with an error; the actions done so far stay done, and applying
again finishes the job.
"""
import dataclasses
import ipaddress
from contextlib import closing
from dataclasses import dataclass, field
from itertools import groupby

from .errors import XdeError

PORT_FIELDS = {"name", "underlays", "mac", "ip", "gateway_mac", "gateway_ip",
               "boundary_services", "boundary_vni", "vni", "underlay_addr", "vpc_subnet",
               "passthrough", "ip6", "vpc_subnet6", "dns", "hostname", "domain"}
# a port's external addresses (xdectl/nat.py): per port, never in [defaults]
EXTERNAL_FIELDS = {"snat_ip", "snat_start", "snat_end", "ephemeral_ip", "floating_ips"}
PORT_FIELDS |= EXTERNAL_FIELDS
OPTIONAL_FIELDS = {"ip", "ip6", "vpc_subnet", "vpc_subnet6", "passthrough", "dns", "hostname",
                   "domain"} | EXTERNAL_FIELDS
PER_PORT_FIELDS = {"name", "mac", "ip", "ip6", "hostname"} | EXTERNAL_FIELDS   # not in [defaults]
PORT_KEYS = PORT_FIELDS | {"routes", "firewall"}
V2P_KEYS = {"ip", "mac", "underlay", "vni"}
TOP_KEYS = {"defaults", "port", "v2p"}


# --- the desired state -------------------------------------------------------

@dataclass
class PortWant:
    spec: object                          # a validated ports.PortSpec
    routes: dict = field(default_factory=dict)   # dest CIDR -> canonical target
    firewall: list | None = None          # canonical rule texts, or None: not managed


@dataclass
class Desired:
    ports: dict                           # name -> PortWant
    v2p: dict                             # (vni, ip) -> (mac, underlay)


def _check_keys(table, allowed, where):
    if not isinstance(table, dict):
        raise XdeError(f"{where}: expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise XdeError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _require(table, required, where, either=None):
    """XdeError naming what table lacks: the keys of required, and one of
    the pair either (at least one of the two)."""
    missing = sorted(set(required) - set(table))
    if either and not any(k in table for k in either):
        missing.append(f"{either[0]} (or {either[1]})")
    if missing:
        raise XdeError(f"{where}: missing {', '.join(missing)}")


def _check_types(f, where):
    """The fields TOML could give a wrong type that validation would misread."""
    if not isinstance(f["underlays"], list) or len(f["underlays"]) != 2:
        raise XdeError(f"{where}: underlays must be a list of two device names")
    if not isinstance(f.get("passthrough", False), bool):
        raise XdeError(f"{where}: passthrough must be true or false")
    if not isinstance(f.get("dns", []), list) or not all(isinstance(a, str) for a in f.get("dns", [])):
        raise XdeError(f"{where}: dns must be a list of addresses")
    for key in ("ip", "ip6", "vpc_subnet", "vpc_subnet6", "hostname", "domain"):
        if not isinstance(f.get(key, ""), str):
            raise XdeError(f"{where}: {key} must be a string")


def _external(f, where):
    """The port's external addresses from the file's fields (not yet
    validated: PortSpec.validated does that against the port's families)."""
    from .nat import ExternalIPs

    def addresses(key, one_ok):
        v = f.get(key, [])
        if one_ok and isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
            raise XdeError(f"{where}: {key} must be "
                           + ("an address or a list of addresses" if one_ok
                              else "a list of addresses"))
        return tuple(v)

    for key in ("snat_start", "snat_end"):
        v = f.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise XdeError(f"{where}: {key} must be a port number")
    return ExternalIPs(addresses("snat_ip", True), f.get("snat_start"), f.get("snat_end"),
                       addresses("ephemeral_ip", True), addresses("floating_ips", False))


def canon_external(ext):
    """ext with its addresses in the order the datapath keeps them (IPv4's,
    then IPv6's, each family's in the given order), as current() reads
    them back."""
    from .nat import ExternalIPs
    if not ext:
        return ExternalIPs()

    def by_family(addrs):
        return tuple(sorted(addrs, key=lambda a: ipaddress.ip_address(a).version))
    return dataclasses.replace(ext, snat_ips=by_family(ext.snat_ips),
                               ephemeral_ips=by_family(ext.ephemeral_ips),
                               floating_ips=by_family(ext.floating_ips))


def parse(text, source="FILE"):
    """The file's text -> Desired, or XdeError naming the first problem."""
    import tomllib

    from .overlay import parse_v2p

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise XdeError(f"{source}: {e}") from None
    _check_keys(doc, TOP_KEYS, source)
    defaults = doc.get("defaults", {})
    _check_keys(defaults, PORT_FIELDS - PER_PORT_FIELDS, f"{source} [defaults]")
    ports = {}
    for n, p in enumerate(doc.get("port", []), 1):
        where = f"{source} port #{n}"
        _check_keys(p, PORT_KEYS, where)
        f = dict(defaults, **{k: v for k, v in p.items() if k in PORT_FIELDS})
        _require(f, PORT_FIELDS - OPTIONAL_FIELDS, where, ("ip", "ip6"))
        where = f"{source} port {f['name']}"
        want = port_want(f, p, where)
        if want.spec.name in ports:
            raise XdeError(f"{where}: a second port of that name")
        ports[want.spec.name] = want

    shared = {(w.spec.underlay1, w.spec.underlay2, w.spec.underlay_addr) for w in ports.values()}
    if len(shared) > 1:
        raise XdeError(f"{source}: the ports of one root share one underlay pair and one "
                       f"underlay address; the file gives {len(shared)} different ones")
    _check_external(ports, source)

    v2p = {}
    for n, m in enumerate(doc.get("v2p", []), 1):
        where = f"{source} v2p #{n}"
        _check_keys(m, V2P_KEYS, where)
        missing = sorted(V2P_KEYS - set(m))
        if missing:
            raise XdeError(f"{where}: missing {', '.join(missing)}")
        try:
            ip, mac, underlay, vni = parse_v2p(str(m["ip"]), str(m["mac"]), str(m["underlay"]),
                                               m["vni"])
        except XdeError as e:
            raise XdeError(f"{where}: {e}") from None
        if (vni, ip) in v2p and v2p[(vni, ip)] != (mac, underlay):
            raise XdeError(f"{where}: {ip} in VNI {vni} is mapped twice, differently")
        v2p[(vni, ip)] = (mac, underlay)
    for w in ports.values():
        s = w.spec
        if s.passthrough:
            continue
        own = (s.mac, s.underlay_addr)
        for ip in s.addrs():
            if v2p.get((s.vni, ip), own) != own:
                raise XdeError(f"{source}: the v2p entry for {ip} in VNI {s.vni} contradicts "
                               f"port {s.name}'s own mapping ({s.mac} at {s.underlay_addr})")
            v2p[(s.vni, ip)] = own
    return Desired(ports, v2p)


def port_want(f, p, where):
    """One port's PortWant from its fields f (the port's table merged with
    what it takes from elsewhere) and its own table p (routes, firewall);
    XdeError naming where."""
    from .fw import parse_line
    from .overlay import canon_target, parse_route
    from .ports import PortSpec

    _check_types(f, where)
    external = _external(f, where)
    try:
        spec = PortSpec(f["name"], f["underlays"][0], f["underlays"][1], f["mac"], f.get("ip"),
                        f["gateway_mac"], f["gateway_ip"], f["boundary_services"],
                        f["boundary_vni"], f["vni"], f["underlay_addr"],
                        f.get("vpc_subnet"), f.get("passthrough", False), ip6=f.get("ip6"),
                        vpc_subnet6=f.get("vpc_subnet6"), dns=f.get("dns", []),
                        hostname=f.get("hostname"), domain=f.get("domain"),
                        external=external).validated()
    except XdeError as e:
        raise XdeError(f"{where}: {e}") from None
    spec = dataclasses.replace(spec, external=canon_external(spec.external))
    want = PortWant(spec)
    routes = p.get("routes", [])
    firewall = p.get("firewall")
    if spec.passthrough and (routes or firewall):
        raise XdeError(f"{where}: a passthrough port has no routes or firewall")
    if not isinstance(routes, list):
        raise XdeError(f"{where}: routes must be a list of {{dest, target}} tables")
    for r in routes:
        _check_keys(r, {"dest", "target"}, f"{where} route")
        if "dest" not in r or "target" not in r:
            raise XdeError(f"{where}: a route needs dest and target")
        try:
            dest, _ = parse_route(str(r["dest"]), str(r["target"]))
            dest, target = str(dest), canon_target(str(r["target"]))
        except XdeError as e:
            raise XdeError(f"{where}: {e}") from None
        if dest in want.routes:
            raise XdeError(f"{where}: two routes for {dest}")
        want.routes[dest] = target
    if firewall is not None:
        if not isinstance(firewall, list) or not all(isinstance(x, str) for x in firewall):
            raise XdeError(f"{where}: firewall must be a list of rule lines")
        want.firewall = []
        for i, line in enumerate(firewall, 1):
            try:
                want.firewall.append(parse_line(line).text())
            except XdeError as e:
                raise XdeError(f"{where}: firewall rule {i}: {e}") from None
    return want


def _check_external(ports, source):
    """The file's ports' external addresses, beside each other, as create
    and set-external-ips require of a root's ports (nat.conflict)."""
    from . import nat
    names = list(ports)
    for i, name in enumerate(names):
        for other in names[:i]:
            why = nat.conflict(ports[name].spec.external, ports[other].spec.external, other)
            if why:
                raise XdeError(f"{source} port {name}: {why}")


def load(path, parse_text=parse):
    """The file at path, parsed (by default as an apply file)."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_text(f.read(), path)
    except OSError as e:
        raise XdeError(f"cannot read {path}: {e.strerror}") from None


# --- the running state -------------------------------------------------------

@dataclass
class Current:
    ports: dict       # name -> validated PortSpec
    routes: dict      # name -> {dest: target} (custom routes)
    firewall: dict    # name -> sorted rule texts
    v2p: dict         # (vni, ip) -> (mac, underlay)
    missing: set = field(default_factory=set)   # ports whose links are gone


def _spec_of(p):
    from .nat import ExternalIPs
    from .ports import PortSpec
    u1, u2 = (p["underlays"] + [None, None])[:2]
    e = p.get("external") or {}
    external = ExternalIPs(tuple(e.get("snat_ips", ())), e.get("snat_start"), e.get("snat_end"),
                           tuple(e.get("ephemeral_ips", ())), tuple(e.get("floating_ips", ())))
    return PortSpec(p["name"], u1 or "?", u2 or "?", p["mac"], p["ip"], p["gateway_mac"],
                    p["gateway_ip"], p["boundary_services"], p["boundary_vni"], p["vni"],
                    p["underlay_addr"], p["vpc_subnet"], p["mode"] == "passthrough",
                    ip6=p["ip6"], vpc_subnet6=p["vpc_subnet6"], dns=p["dns"],
                    hostname=p["hostname"], domain=p["domain"],
                    external=canon_external(external))


def current(root):
    from .datapath import Datapath
    from .fw import read_rules
    from .overlay import dump_v2p, route_dest, target_str
    from .ports import list_ports

    dp = Datapath(root)
    if not dp.exists() or dp.interrupted():
        return Current({}, {}, {}, {})     # (a killed first load: create clears it)
    maps = dp.maps()
    index_of = {pc.name.decode(): k.value for k, pc in maps["ports"].items()}
    custom = {}       # one pass over the custom routes, grouped by port
    for k, v in maps["routes"].items():
        custom.setdefault(k.port, {})[str(route_dest(k))] = target_str(v)
    ports, routes, firewall, missing = {}, {}, {}, set()
    for p in list_ports(root):
        name = p["name"]
        ports[name] = _spec_of(p)
        if p["state"] == "missing":
            missing.add(name)
        index = index_of[name]
        routes[name] = custom.get(index, {})
        firewall[name] = sorted(r.text() for r in read_rules(maps, index))
    v2p = {(e["vni"], e["ip"]): (e["mac"], e["underlay"]) for e in dump_v2p(root)}
    return Current(ports, routes, firewall, v2p, missing)


# --- the plan ----------------------------------------------------------------

# A port whose SPEC_FIELDS differ is replaced; GATEWAY_FIELDS (what its
# gateway tells the guest) and its external addresses change in place.
SPEC_FIELDS = ("underlay1", "underlay2", "mac", "ip", "gw_mac", "gw_ip", "bsvc_addr",
               "bsvc_vni", "vni", "underlay_addr", "vpc_subnet", "passthrough", "ip6",
               "vpc_subnet6")
GATEWAY_FIELDS = ("dns", "hostname", "domain")


@dataclass
class Action:
    op: str           # delete-port, create-port, set-gateway, set-external-ips, set-v2p,
                      # clear-v2p, add-route, del-route, set-fw
    target: str       # what it acts on, for people
    detail: str = ""
    args: tuple = ()

    def line(self):
        sign = {"delete-port": "-", "create-port": "+", "set-gateway": "~",
                "set-external-ips": "~", "set-v2p": "+",
                "clear-v2p": "-", "add-route": "+", "del-route": "-", "set-fw": "~"}[self.op]
        return f"{sign} {self.op} {self.target}" + (f" ({self.detail})" if self.detail else "")

    def as_dict(self):
        return {"op": self.op, "target": self.target, "detail": self.detail}


def _changed(fields, have, want):
    """'field old -> new' of each of fields that differs."""
    def show(v):
        return ",".join(v) or "none" if isinstance(v, list) else "none" if v is None else v
    return [f"{f} {show(getattr(have, f))} -> {show(getattr(want, f))}" for f in fields
            if getattr(have, f) != getattr(want, f)]


def _external_changed(have, want):
    """'what old -> new' of each part of the external addresses that differs."""
    def show(e):
        return {"snat_ip": ",".join(e.snat_ips) or "none",
                "snat_range": f"{e.snat_start}-{e.snat_end}" if e.snat_ips else "none",
                "ephemeral_ip": ",".join(e.ephemeral_ips) or "none",
                "floating_ips": ",".join(e.floating_ips) or "none"}
    h, w = show(have), show(want)
    return [f"{k} {h[k]} -> {w[k]}" for k in h if h[k] != w[k]]


def plan(cur, want):
    """The actions that turn cur into want, in execution order."""
    from .maps import addr_order
    deletes, external, creates, later = [], [], [], []
    v2p = dict(cur.v2p)     # V2P as it will be after the port actions

    def own_v2p_removed(spec):
        # delete removes a port's own mappings if they are still the ones create made
        for ip in [] if spec.passthrough else spec.addrs():
            if v2p.get((spec.vni, ip)) == (spec.mac, spec.underlay_addr):
                del v2p[(spec.vni, ip)]

    fresh = set()
    for name, have in sorted(cur.ports.items()):
        w = want.ports.get(name)
        if w is None:
            deletes.append(Action("delete-port", name, "not in the file", (name,)))
            own_v2p_removed(have)
            continue
        diff = (["its links are gone"] if name in cur.missing else []) + \
            _changed(SPEC_FIELDS, have, w.spec)
        if diff:
            deletes.append(Action("delete-port", name, "replaced: " + ", ".join(diff), (name,)))
            own_v2p_removed(have)
            fresh.add(name)
        elif (have.dns is None and not have.passthrough) or \
                _changed(GATEWAY_FIELDS, have, w.spec):
            # dns None: list could not read the port's templates; rewrite them
            s = w.spec
            detail = ("templates unreadable, rewritten" if have.dns is None
                      else ", ".join(_changed(GATEWAY_FIELDS, have, s)))
            later.append(Action("set-gateway", name, detail, (name, s.dns, s.hostname, s.domain)))
        if name not in fresh and have.external != w.spec.external:
            e = w.spec.external
            external.append(Action("set-external-ips", name,
                                   ", ".join(_external_changed(have.external, e)), (name, e)))
    fresh |= set(want.ports) - set(cur.ports)
    for name in sorted(fresh):
        s = want.ports[name].spec
        mode = "passthrough" if s.passthrough else f"{' '.join(s.addrs())} {s.mac} vni {s.vni}"
        creates.append(Action("create-port", name, mode, (s,)))
        if not s.passthrough:
            for ip in s.addrs():
                v2p[(s.vni, ip)] = (s.mac, s.underlay_addr)

    for key in sorted(set(v2p) | set(want.v2p), key=lambda k: (k[0], addr_order(k[1]))):
        vni, ip = key
        have, w = v2p.get(key), want.v2p.get(key)
        if have == w:
            continue
        if have is not None and w is None:
            later.append(Action("clear-v2p", f"{ip} vni {vni}", f"{have[0]} at {have[1]}",
                                (ip, have[0], have[1], vni)))
        else:
            later.append(Action("set-v2p", f"{ip} vni {vni}", f"{w[0]} at {w[1]}"
                                + (f", was {have[0]} at {have[1]}" if have else ""),
                                (ip, w[0], w[1], vni)))

    for name, w in sorted(want.ports.items()):
        if w.spec.passthrough:
            continue
        have_routes = {} if name in fresh else cur.routes.get(name, {})
        for dest in sorted(set(have_routes) | set(w.routes), key=_dest_order):
            h, t = have_routes.get(dest), w.routes.get(dest)
            if h == t:
                continue
            if t is None:
                later.append(Action("del-route", f"{name} {dest}", f"was {h}", (name, dest)))
            else:
                later.append(Action("add-route", f"{name} {dest}",
                                    t + (f", was {h}" if h else ""), (name, dest, t)))
        if w.firewall is not None:
            have_fw = None if name in fresh else cur.firewall.get(name)
            if have_fw != sorted(w.firewall):
                later.append(Action("set-fw", name, f"{len(w.firewall)} rules",
                                    (name, list(w.firewall))))
    return deletes + external + creates + later


def _dest_order(dest):
    net = ipaddress.ip_network(dest)
    return net.version, int(net.network_address), net.prefixlen


# --- executing -----------------------------------------------------------------

def _execute(root, action):
    """One change but V2P's (see execute_all)."""
    from . import fw, nat, overlay, ports
    op, a = action.op, action.args
    if op == "delete-port":
        ports.delete(root, *a)
    elif op == "create-port":
        ports.create(root, *a)
    elif op == "set-gateway":
        ports.set_gateway(root, *a)
    elif op == "set-external-ips":
        nat.set_external_ips(root, *a)
    elif op == "add-route":
        name, dest, target = a
        # replace, not add: the route may exist with another target
        overlay.add_router_entry(root, name, dest, target)
    elif op == "del-route":
        overlay.del_router_entry(root, *a)
    elif op == "set-fw":
        fw.set_rules(root, a[0], a[1])
    else:
        raise XdeError(f"internal: unknown action {op}")


V2P_OPS = ("set-v2p", "clear-v2p")


def execute_all(root, actions):
    """Make actions in order, yielding (action, None or the exception it
    raised) after each: the caller may stop between them, and closes the
    generator (contextlib.closing) when it does. A run of V2P changes, most
    of a sled's first convergence, shares one locked, opened root (opening
    it per change cost 2.5 ms, the change itself 15 us): the root stays
    locked while the caller holds a V2P change's result."""
    for v2p, run in groupby(actions, key=lambda a: a.op in V2P_OPS):
        if v2p:
            yield from _v2p_run(root, list(run))
        else:
            for a in run:
                yield a, _error_of(_execute, root, a)


def _v2p_run(root, run):
    from . import overlay
    from .datapath import session

    def change(maps, a):
        args = overlay.parse_v2p(*a.args)
        (overlay.put_v2p if a.op == "set-v2p" else overlay.remove_v2p)(maps, *args)

    done = 0
    try:
        with session(root) as (dp, _):
            maps = overlay.loaded(dp)
            for a in run:
                yield a, _error_of(change, maps, a)
                done += 1
    except Exception as e:  # noqa: BLE001 - the root would not open: each change failed
        for a in run[done:]:
            yield a, e


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the caller decides what a failure stops
        return e
    return None


def apply(root, path, dry_run=False, out=None):
    """Plan, and unless dry_run execute; returns the list of actions."""
    out = out or (lambda line: print(line, flush=True))
    want = load(path)
    actions = plan(current(root), want)
    if dry_run:
        for a in actions:
            out(a.line())
        return actions
    with closing(execute_all(root, actions)) as making:
        for n, (a, error) in enumerate(making, 1):
            if isinstance(error, XdeError):
                raise XdeError(f"{a.op} {a.target}: {error} (after {n - 1} of {len(actions)} "
                               f"changes; apply again to finish)") from None
            if error is not None:
                raise error
            out(a.line())
    return actions
