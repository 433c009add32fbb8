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
    ip = "10.0.0.1"                # required
    vpc_subnet = "10.0.0.0/24"     # optional (default: the /24 of ip)
    passthrough = false            # optional
    # ... and every other `xdectl create` field not given in [defaults]:
    # underlays (two names), underlay_addr, gateway_mac, gateway_ip,
    # boundary_services, boundary_vni, vni.
    routes = [                     # optional: the port's custom routes
      { dest = "192.168.0.0/16", target = "ip4=10.0.0.2" },
    ]
    firewall = [                   # optional: the port's whole rule set
      "dir=in action=allow priority=65535 hosts=vni=10",
      "dir=in action=allow priority=65535 protocol=icmp",
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
- V2P: the mappings are exactly the file's plus each overlay port's own
  mapping (which `create` adds); others are removed.
- Routes: a port's custom routes are exactly its `routes` (none if absent).
  The system routes `create` installs are not managed here.
- Firewall: when a port has `firewall`, its rules are exactly those lines
  (set-fw-rules syntax; they replace the default rules `create` installs,
  so list those too if you want them). Without `firewall`, the rules are
  left as they are.

Unknown keys are errors, and the whole file is checked before anything
changes. Applying computes a plan (the differences between the running
state and the file, as a list of actions) and executes it in order: port
deletions, port creations, then V2P, routes and firewall rules. Applying
the same file again finds nothing to do ("no changes"). A failure stops
the run with an error; the actions done so far stay done, and applying
again finishes the job.
"""
import ipaddress
from dataclasses import dataclass, field

from .errors import XdeError

PORT_FIELDS = {"name", "underlays", "mac", "ip", "gateway_mac", "gateway_ip",
               "boundary_services", "boundary_vni", "vni", "underlay_addr", "vpc_subnet",
               "passthrough"}
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


def _canon_target(target):
    from .overlay import RT_IP4, RT_SUB4, parse_target
    kind, addr, length = parse_target(target)
    if kind == RT_IP4:
        return f"ip4={addr}"
    if kind == RT_SUB4:
        return f"sub4={addr}/{length}"
    return target


def _canon_rule(rule):
    """A rule's text as it reads back from the map: a /32 subnet is stored
    as an address, a /0 subnet as any host."""
    kind, _, arg = rule.hosts.partition("=")
    if kind == "subnet":
        net = ipaddress.IPv4Network(arg)
        rule.hosts = ("any" if net.prefixlen == 0 else
                      f"ip={net.network_address}" if net.prefixlen == 32 else rule.hosts)
    return rule.text()


def _check_keys(table, allowed, where):
    if not isinstance(table, dict):
        raise XdeError(f"{where}: expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise XdeError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def parse(text, source="FILE"):
    """The file's text -> Desired, or XdeError naming the first problem."""
    import tomllib

    from . import validate
    from .fw import parse_line
    from .overlay import parse_v2p
    from .ports import PortSpec

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise XdeError(f"{source}: {e}") from None
    _check_keys(doc, TOP_KEYS, source)
    defaults = doc.get("defaults", {})
    _check_keys(defaults, PORT_FIELDS - {"name", "mac", "ip"}, f"{source} [defaults]")
    ports = {}
    for n, p in enumerate(doc.get("port", []), 1):
        where = f"{source} port #{n}"
        _check_keys(p, PORT_KEYS, where)
        f = dict(defaults, **{k: v for k, v in p.items() if k in PORT_FIELDS})
        missing = sorted(PORT_FIELDS - {"vpc_subnet", "passthrough"} - set(f))
        if missing:
            raise XdeError(f"{where}: missing {', '.join(missing)}")
        where = f"{source} port {f['name']}"
        if not isinstance(f["underlays"], list) or len(f["underlays"]) != 2:
            raise XdeError(f"{where}: underlays must be a list of two device names")
        if not isinstance(f.get("passthrough", False), bool):
            raise XdeError(f"{where}: passthrough must be true or false")
        try:
            spec = PortSpec(f["name"], f["underlays"][0], f["underlays"][1], f["mac"], f["ip"],
                            f["gateway_mac"], f["gateway_ip"], f["boundary_services"],
                            f["boundary_vni"], f["vni"], f["underlay_addr"],
                            f.get("vpc_subnet"), f.get("passthrough", False)).validated()
        except XdeError as e:
            raise XdeError(f"{where}: {e}") from None
        if spec.name in ports:
            raise XdeError(f"{where}: a second port of that name")
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
                dest = str(validate.cidr4(r["dest"], "route dest"))
                target = _canon_target(str(r["target"]))
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
                    want.firewall.append(_canon_rule(parse_line(line)))
                except XdeError as e:
                    raise XdeError(f"{where}: firewall rule {i}: {e}") from None
        ports[spec.name] = want

    shared = {(w.spec.underlay1, w.spec.underlay2, w.spec.underlay_addr) for w in ports.values()}
    if len(shared) > 1:
        raise XdeError(f"{source}: the ports of one root share one underlay pair and one "
                       f"underlay address; the file gives {len(shared)} different ones")

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
        if v2p.get((s.vni, s.ip), own) != own:
            raise XdeError(f"{source}: the v2p entry for {s.ip} in VNI {s.vni} contradicts "
                           f"port {s.name}'s own mapping ({s.mac} at {s.underlay_addr})")
        v2p[(s.vni, s.ip)] = own
    return Desired(ports, v2p)


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read(), path)
    except OSError as e:
        raise XdeError(f"cannot read {path}: {e.strerror}") from None


# --- the running state -------------------------------------------------------

@dataclass
class Current:
    ports: dict       # name -> validated PortSpec
    routes: dict      # name -> {dest: target} (custom routes)
    firewall: dict    # name -> sorted rule texts
    v2p: dict         # (vni, ip) -> (mac, underlay)


def _spec_of(p):
    from .ports import PortSpec
    u1, u2 = (p["underlays"] + [None, None])[:2]
    return PortSpec(p["name"], u1 or "?", u2 or "?", p["mac"], p["ip"], p["gateway_mac"],
                    p["gateway_ip"], p["boundary_services"], p["boundary_vni"], p["vni"],
                    p["underlay_addr"], p["vpc_subnet"], p["mode"] == "passthrough")


def current(root):
    from .datapath import Datapath
    from .fw import read_rules
    from .maps import find_port
    from .overlay import dump_v2p, port_routes
    from .ports import list_ports

    dp = Datapath(root)
    if not dp.exists():
        return Current({}, {}, {}, {})
    maps = dp.maps()
    ports, routes, firewall = {}, {}, {}
    for p in list_ports(root):
        name = p["name"]
        ports[name] = _spec_of(p)
        index, _ = find_port(maps, name)
        routes[name] = {r["dest"]: r["target"] for r in port_routes(maps, index)
                        if r["kind"] == "custom"}
        firewall[name] = sorted(r.text() for r in read_rules(maps, index))
    v2p = {(e["vni"], e["ip"]): (e["mac"], e["underlay"]) for e in dump_v2p(root)}
    return Current(ports, routes, firewall, v2p)


# --- the plan ----------------------------------------------------------------

SPEC_FIELDS = ("underlay1", "underlay2", "mac", "ip", "gw_mac", "gw_ip", "bsvc_addr",
               "bsvc_vni", "vni", "underlay_addr", "vpc_subnet", "passthrough")


@dataclass
class Action:
    op: str           # delete-port, create-port, set-v2p, clear-v2p, add-route, del-route, set-fw
    target: str       # what it acts on, for people
    detail: str = ""
    args: tuple = ()

    def line(self):
        sign = {"delete-port": "-", "create-port": "+", "set-v2p": "+", "clear-v2p": "-",
                "add-route": "+", "del-route": "-", "set-fw": "~"}[self.op]
        return f"{sign} {self.op} {self.target}" + (f" ({self.detail})" if self.detail else "")

    def as_dict(self):
        return {"op": self.op, "target": self.target, "detail": self.detail}


def _changed_fields(have, want):
    return [f for f in SPEC_FIELDS if getattr(have, f) != getattr(want, f)]


def plan(cur, want):
    """The actions that turn cur into want, in execution order."""
    deletes, creates, later = [], [], []
    v2p = dict(cur.v2p)     # V2P as it will be after the port actions

    def own_v2p_removed(spec):
        # delete removes a port's own mapping if it is still the one create made
        if not spec.passthrough and v2p.get((spec.vni, spec.ip)) == (spec.mac, spec.underlay_addr):
            del v2p[(spec.vni, spec.ip)]

    fresh = set()
    for name, have in sorted(cur.ports.items()):
        w = want.ports.get(name)
        if w is None:
            deletes.append(Action("delete-port", name, "not in the file", (name,)))
            own_v2p_removed(have)
        else:
            diff = _changed_fields(have, w.spec)
            if diff:
                deletes.append(Action("delete-port", name, "replaced: " + ", ".join(
                    f"{f} {getattr(have, f)} -> {getattr(w.spec, f)}" for f in diff), (name,)))
                own_v2p_removed(have)
                fresh.add(name)
    fresh |= set(want.ports) - set(cur.ports)
    for name in sorted(fresh):
        s = want.ports[name].spec
        mode = "passthrough" if s.passthrough else f"{s.ip} {s.mac} vni {s.vni}"
        creates.append(Action("create-port", name, mode, (s,)))
        if not s.passthrough:
            v2p[(s.vni, s.ip)] = (s.mac, s.underlay_addr)

    for key in sorted(set(v2p) | set(want.v2p), key=lambda k: (k[0], ipaddress.IPv4Address(k[1]))):
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
        for dest in sorted(set(have_routes) | set(w.routes)):
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
    return deletes + creates + later


# --- executing -----------------------------------------------------------------

def execute(root, action):
    from . import fw, overlay, ports
    op, a = action.op, action.args
    if op == "delete-port":
        ports.delete(root, *a)
    elif op == "create-port":
        ports.create(root, *a)
    elif op == "set-v2p":
        overlay.set_v2p(root, *a)
    elif op == "clear-v2p":
        overlay.clear_v2p(root, *a)
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


def apply(root, path, dry_run=False, out=None):
    """Plan, and unless dry_run execute; returns the list of actions."""
    out = out or (lambda line: print(line, flush=True))
    want = load(path)
    actions = plan(current(root), want)
    for n, a in enumerate(actions, 1):
        if not dry_run:
            try:
                execute(root, a)
            except XdeError as e:
                raise XdeError(f"{a.op} {a.target}: {e} (after {n - 1} of {len(actions)} "
                               f"changes; apply again to finish)") from None
        out(a.line())
    return actions
