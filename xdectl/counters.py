"""The datapath's counters, read in one place for `stats`, `metrics`,
`trace` and `dump-fw`.

Two lists, both taken from the instance's own recorded types (bpf/counters.h
defines them): the events of a port or of the instance (the fields of
port_stats / global_stats besides `drop`), and the drop reasons (the fields
of struct drops), each counted per direction. Per-CPU values are summed.
"""
from dataclasses import dataclass, field

DIRECTIONS = ("out", "in")      # enum xde_dir: the index of port_stats.drop


@dataclass
class Counts:
    events: dict = field(default_factory=dict)   # name -> count
    drops: dict = field(default_factory=dict)    # (direction, reason) -> count

    def flat(self):
        """One dict: events by name, drops as drop_<direction>_<reason>."""
        out = dict(self.events)
        out.update({f"drop_{d}_{r}": n for (d, r), n in self.drops.items()})
        return out


def _names(struct):
    return [f for f, _ in struct._fields_ if not f.startswith("__pad")]


def drop_reasons(maps):
    """The drop reasons, in the datapath's order."""
    leaf = maps["port_stats"].Leaf
    return _names(dict(leaf._fields_)["drop"]._type_)


def _sum(values):
    """Counts of a list of per-CPU stats structs."""
    first = values[0]
    events = [f for f in _names(first) if f != "drop"]
    reasons = _names(type(first.drop[0]))
    c = Counts()
    for f in events:
        c.events[f] = sum(getattr(v, f) for v in values)
    for i, d in enumerate(DIRECTIONS):
        for r in reasons:
            c.drops[(d, r)] = sum(getattr(v.drop[i], r) for v in values)
    return c


def port_counts(maps, index):
    """Counts of the port with datapath ifindex `index`, or None."""
    m = maps["port_stats"]
    vals = m.get(m.Key(index))
    return _sum(vals) if vals else None


def global_counts(maps):
    """Counts of the instance: frames seen before a port was known."""
    m = maps["global_stats"]
    return _sum(m.get(m.Key(0)))


def boundary_counts(maps):
    """Counts of boundary services (bpf/boundary.h, its own lists): events
    by name, drops by reason alone (each reason belongs to one side)."""
    m = maps["bsvc_stats"]
    values = m.get(m.Key(0))
    c = Counts()
    for f in _names(values[0]):
        if f != "drop":
            c.events[f] = sum(getattr(v, f) for v in values)
    for r in _names(type(values[0].drop)):
        c.drops[r] = sum(getattr(v.drop, r) for v in values)
    return c


def flows_per_port(maps):
    """{port ifindex: flow-table entries (one per direction of a flow)}."""
    counts = {}
    for k in maps["flows"].keys():
        counts[k.port] = counts.get(k.port, 0) + 1
    return counts


def route_cache_entries(maps):
    """Entries of the underlay route cache (one per (destination, flow hash)
    seen in its lifetime, until the LRU map reuses them)."""
    return len(maps["route_cache"].keys())


def rule_hits(maps, rule_id):
    """Flows the firewall rule with this id decided."""
    hits = maps["fw_hits"]
    return sum(hits.get(hits.Key(rule_id)) or [])


def port_rule_hits(maps, index):
    """[(direction, rule id, hits)] of the port's rules, in evaluation order."""
    rules = maps["fw_rules"]
    out = []
    for d, name in enumerate(DIRECTIONS):
        k = rules.Key()
        k.port, k.dir = index, d
        v = rules.get(k)
        if v is not None:
            out += [(name, v.r[i].id, rule_hits(maps, v.r[i].id)) for i in range(v.count)]
    return out
