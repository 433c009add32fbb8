"""Firewall rules and the flow table (docs/design.md,
"Firewall and flow table"), with OPTE's grammar: `dir=in action=allow
priority=10 hosts=subnet=10.0.0.0/24 protocol=tcp ports=22,80`.

A port's rules for one direction live in one map value, sorted by
priority; replacing them is one map update. Every change bumps the port's
epoch, which makes the datapath judge cached flows again.
"""
import ipaddress
import time
from dataclasses import dataclass, field

from . import abi, counters, nat, validate
from .datapath import Datapath, session
from .errors import XdeError
from .maps import V4_MAPPED, addr16, addr_order, addr_str, prefix_mask16, set_bytes

DIRS = {"out": abi.DIR_OUT, "in": abi.DIR_IN}
ACTIONS = {"allow": abi.FW_ALLOW, "deny": abi.FW_DENY}
PROTOCOLS = {"any": abi.FW_PROTO_ANY, "tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58,
             "arp": abi.FW_PROTO_ARP}
ICMP_FAMILY = {"icmp": 4, "icmp6": 6}
MAX_PORTS = abi.FW_MAX_PORTS
DEFAULT_PRIORITY = 65535
TCP_STATES = {0: "-", **{i: name for i, name in enumerate(abi.TCP_STATES) if i}}
# OPTE's flow timeouts, in seconds
DEFAULT_TIMEOUTS = {"idle": 60, "tcp_handshake": 5, "tcp_established": 8000, "tcp_closed": 120}


@dataclass
class Rule:
    direction: str
    action: str
    priority: int
    hosts: str = "any"
    protocol: str = "any"
    ports: list = field(default_factory=list)
    id: int = 0

    def text(self):
        ports = ",".join(map(str, self.ports)) if self.ports else "any"
        return (f"dir={self.direction} action={self.action} priority={self.priority} "
                f"hosts={self.hosts} protocol={self.protocol} ports={ports}")


def parse_rule(direction, action, priority, hosts="any", protocol="any", ports="any"):
    """A Rule from OPTE's fields, or XdeError naming the bad one."""
    if direction not in DIRS:
        raise XdeError(f"dir '{direction}' is not in or out")
    if action not in ACTIONS:
        raise XdeError(f"action '{action}' is not allow or deny")
    try:
        prio = int(priority)
    except (TypeError, ValueError):
        raise XdeError(f"priority '{priority}' is not a number") from None
    if not 0 <= prio <= 65535:
        raise XdeError(f"priority {prio} is outside 0..65535")
    hosts = _parse_hosts(hosts)
    proto = _parse_protocol(protocol)
    port_list = _parse_ports(ports)
    name = proto.split(":")[0]
    if port_list and name not in ("any", "tcp", "udp"):
        raise XdeError(f"ports apply to tcp and udp, not to protocol {protocol}")
    family = _hosts_family(hosts)
    if name in ICMP_FAMILY and family not in (None, ICMP_FAMILY[name]):
        raise XdeError(f"protocol {name} never comes from or goes to IPv{family} hosts "
                       f"({hosts})")
    return Rule(direction, action, prio, hosts, proto, port_list)


def _parse_hosts(hosts):
    if hosts == "any":
        return hosts
    kind, _, arg = hosts.partition("=")
    if kind == "ip":
        return f"ip={validate.overlay_ip(arg, 'hosts ip')}"
    if kind == "subnet":
        net = validate.cidr_any(arg, "hosts subnet")
        if net.version == 6 and net.overlaps(validate.V4_MAPPED_NET):
            # one 16-byte mask cannot say "IPv6 but not IPv4-mapped"
            raise XdeError(f"hosts subnet {arg!r} overlaps ::ffff:0:0/96, where IPv4 "
                           f"addresses are kept: it would match IPv4 hosts too (use hosts=any "
                           f"for every host)")
        # a one-address subnet is that address, as it reads back from the map
        return f"ip={net.network_address}" if net.num_addresses == 1 else f"subnet={net}"
    if kind == "vni":
        return f"vni={validate.vni(arg, 'hosts vni')}"
    raise XdeError(f"hosts '{hosts}' is not any, ip=ADDR, subnet=CIDR or vni=N")


def _hosts_family(hosts):
    """4 or 6 for ip= and subnet= hosts, else None."""
    kind, _, arg = hosts.partition("=")
    return ipaddress.ip_network(arg).version if kind in ("ip", "subnet") else None


def _parse_protocol(protocol):
    name, _, rest = protocol.partition(":")
    if name not in PROTOCOLS or (rest and name not in ICMP_FAMILY):
        raise XdeError(f"protocol '{protocol}' is not any, tcp, udp, icmp[:type[,code]], "
                       f"icmp6[:type[,code]] or arp")
    if rest:
        parts = rest.split(",")
        if len(parts) > 2 or not all(p.isdigit() and int(p) <= 255 for p in parts):
            raise XdeError(f"protocol '{protocol}': ICMP type and code are numbers 0..255")
        return f"{name}:" + ",".join(str(int(p)) for p in parts)
    return protocol


def _parse_ports(ports):
    if ports == "any":
        return []
    out = []
    for p in ports.split(","):
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise XdeError(f"port '{p}' is not 1..65535 (0 is refused)")
        out.append(int(p))
    if len(out) > MAX_PORTS:
        raise XdeError(f"at most {MAX_PORTS} ports in one rule")
    return sorted(set(out))


def parse_line(line):
    """One set-fw-rules line of key=value tokens."""
    fields = {}
    for tok in line.split():
        key, eq, value = tok.partition("=")
        if not eq or key not in ("dir", "action", "priority", "hosts", "protocol", "ports"):
            raise XdeError(f"token '{tok}' is not one of dir=, action=, priority=, hosts=, "
                           f"protocol=, ports=")
        fields[key] = value
    missing = [k for k in ("dir", "action", "priority") if k not in fields]
    if missing:
        raise XdeError(f"missing {', '.join(k + '=' for k in missing)}")
    return parse_rule(fields["dir"], fields["action"], fields["priority"],
                      fields.get("hosts", "any"), fields.get("protocol", "any"),
                      fields.get("ports", "any"))


# --- to and from the map ----------------------------------------------------

def _encode(rule, leaf):
    leaf.id = rule.id
    leaf.priority = rule.priority
    leaf.action = ACTIONS[rule.action]
    name, _, icmp = rule.protocol.partition(":")
    leaf.proto = PROTOCOLS[name]
    kind, _, arg = rule.hosts.partition("=")
    if kind in ("ip", "subnet"):
        net = ipaddress.ip_network(arg)
        set_bytes(leaf.host, addr16(net.network_address))
        set_bytes(leaf.host_mask, prefix_mask16(net))
    elif kind == "vni":
        leaf.vni, leaf.vni_mask = int(arg), 0xFFFFFFFF
    if icmp:
        parts = [int(p) for p in icmp.split(",")]
        leaf.icmp = parts[0] << 8 | (parts[1] if len(parts) > 1 else 0)
        leaf.icmp_mask = 0xFFFF if len(parts) > 1 else 0xFF00
    leaf.nports = len(rule.ports)
    for i, p in enumerate(rule.ports):
        leaf.ports[i] = p


def _decode(direction, r):
    proto = {v: k for k, v in PROTOCOLS.items()}.get(r.proto, str(r.proto))
    if r.icmp_mask:
        proto += f":{r.icmp >> 8}" + (f",{r.icmp & 0xFF}" if r.icmp_mask == 0xFFFF else "")
    if r.vni_mask:
        hosts = f"vni={r.vni}"
    elif any(r.host_mask):
        hosts = _hosts_text(bytes(r.host), bin(int.from_bytes(bytes(r.host_mask), "big")).count("1"))
    else:
        hosts = "any"
    action = {v: k for k, v in ACTIONS.items()}[r.action]
    return Rule(direction, action, r.priority, hosts, proto, list(r.ports[:r.nports]), r.id)


def _hosts_text(host, bits):
    """hosts= of a rule's 16-byte host and the number of bits its mask has."""
    if bits == 128:
        return f"ip={addr_str(host)}"
    v4 = host[:12] == V4_MAPPED and bits >= 96
    return f"subnet={addr_str(host)}/{bits - 96 if v4 else bits}"


def _key(m, port, direction):
    k = m.Key()
    k.port, k.dir = port, DIRS[direction]
    return k


def read_rules(maps, port):
    """The port's rules, both directions, in evaluation order."""
    m = maps["fw_rules"]
    out = []
    for d in DIRS:
        v = m.get(_key(m, port, d))
        if v is not None:
            out += [_decode(d, v.r[i]) for i in range(v.count)]
    return out


def write_rules(maps, port, rules):
    """Replace the port's rules (one atomic update per direction), give new
    rules ids, and bump the port's epoch."""
    m = maps["fw_rules"]
    limit = len(m.Leaf().r)
    for d in DIRS:  # check before anything is written
        n = sum(r.direction == d for r in rules)
        if n > limit:
            raise XdeError(f"at most {limit} rules per direction, got {n} {d}")
    used = {r.id for k, v in m.items() for r in v.r[:v.count]}
    hits = maps["fw_hits"]
    next_id = 1
    for rule in rules:
        if not rule.id:
            while next_id in used:
                next_id += 1
            if next_id >= hits.max_entries:
                raise XdeError("out of firewall rule ids")
            rule.id = next_id
            used.add(next_id)
            hits.set(hits.Key(next_id), hits.Leaf(0))
    leaves = {}
    for d in DIRS:
        mine = sorted((r for r in rules if r.direction == d), key=lambda r: (r.priority, r.id))
        leaf = leaves[d] = m.Leaf()
        leaf.count = len(mine)
        for i, r in enumerate(mine):
            _encode(r, leaf.r[i])
    for d, leaf in leaves.items():
        m.set(_key(m, port, d), leaf)
    bump_epoch(maps, port)


def bump_epoch(maps, port):
    """The port's flows are judged again by the rules (port_cfg.fw_epoch)."""
    m = maps["ports"]
    k = m.Key(port)
    pc = m.get(k)
    if pc is not None:
        pc.fw_epoch += 1
        m.set(k, pc)


def default_rules(vni, ip4=True, ip6=False):
    """OPTE's default VPC rules: inbound from the same VNI, and inbound ICMP
    and ICMPv6 for the address families the port has."""
    return ([Rule("in", "allow", DEFAULT_PRIORITY, hosts=f"vni={vni}")]
            + [Rule("in", "allow", DEFAULT_PRIORITY, protocol=p)
               for p, on in (("icmp", ip4), ("icmp6", ip6)) if on])


def remove_port_state(maps, port):
    """Forget a deleted port's rules and flows."""
    for d in DIRS:
        maps["fw_rules"].delete(_key(maps["fw_rules"], port, d))
    _delete_flows(maps, port)


# --- commands ---------------------------------------------------------------

def _port(dp, name):
    return dp.port(name)[0]


def add_rule(root, port, rule):
    with session(root) as (dp, _):
        index = _port(dp, port)
        maps = dp.maps()
        rules = read_rules(maps, index) + [rule]
        write_rules(maps, index, rules)
        return rule.id


def rm_rule(root, port, direction, rule_id):
    if direction not in DIRS:
        raise XdeError(f"dir '{direction}' is not in or out")
    with session(root) as (dp, _):
        index = _port(dp, port)
        maps = dp.maps()
        rules = read_rules(maps, index)
        keep = [r for r in rules if not (r.id == rule_id and r.direction == direction)]
        if len(keep) == len(rules):
            raise XdeError(f"port {port} has no {direction} rule {rule_id}")
        write_rules(maps, index, keep)


def set_rules(root, port, lines):
    """Replace all of the port's rules; a bad line changes nothing."""
    rules = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                rules.append(parse_line(line))
            except XdeError as e:
                raise XdeError(f"line {n}: {e}") from None
    with session(root) as (dp, _):
        index = _port(dp, port)
        write_rules(dp.maps(), index, rules)
    return len(rules)


def dump_rules(root, port):
    dp = Datapath(root)
    index = _port(dp, port)
    maps = dp.maps()
    out = []
    for r in read_rules(maps, index):
        out.append({"id": r.id, "dir": r.direction, "priority": r.priority, "action": r.action,
                    "hosts": r.hosts, "protocol": r.protocol,
                    "ports": ",".join(map(str, r.ports)) or "any",
                    "hits": counters.rule_hits(maps, r.id)})
    return out


def _flows_of(maps, port):
    return [(k, v) for k, v in maps["flows"].items() if k.port == port]


def _delete_flows(maps, port):
    m = maps["flows"]
    for k in [k for k in m.keys() if k.port == port]:
        m.delete(k)


def dump_flows(root, port):
    dp = Datapath(root)
    index = _port(dp, port)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    ports = dp.maps()["ports"]
    pc = ports.get(ports.Key(index))
    out = []
    for k, v in _flows_of(dp.maps(), index):
        proto = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6"}.get(k.proto, str(k.proto))
        out.append({"dir": "in" if k.dir else "out", "proto": proto,
                    "src": addr_str(k.src), "dst": addr_str(k.dst),
                    "sport": int.from_bytes(int(k.sport).to_bytes(2, "little"), "big"),
                    "dport": int.from_bytes(int(k.dport).to_bytes(2, "little"), "big"),
                    "state": TCP_STATES.get(v.state, "?") if k.proto == 6 else "-",
                    "age_s": round((now - v.created_ns) / 1e9, 1),
                    "idle_s": round((now - v.last_ns) / 1e9, 1),
                    "packets": v.packets, "bytes": v.bytes, "rule": v.rule,
                    "stale": pc is not None and v.epoch != pc.fw_epoch,
                    "nat": nat.translation(dp.maps(), k)})
    return sorted(out, key=lambda f: (f["dir"], f["proto"], addr_order(f["src"]),
                                      addr_order(f["dst"])))


def clear_flows(root, port):
    with session(root) as (dp, _):
        index = _port(dp, port)
        _delete_flows(dp.maps(), index)


def set_timeouts(root, **seconds):
    """Change the flow-table timeouts of the instance (seconds)."""
    with session(root) as (dp, _):
        if not dp.exists():
            raise XdeError(f"nothing is loaded under {root}: create a port first")
        m = dp.maps()["config"]
        cfg = m.get(m.Key(0))
        for name, value in seconds.items():
            if value is not None:
                if value <= 0:
                    raise XdeError(f"timeout {name} must be positive, got {value}")
                setattr(cfg, f"ttl_{name}", value)
        m.set(m.Key(0), cfg)
        return {n: getattr(cfg, f"ttl_{n}") for n in DEFAULT_TIMEOUTS}
