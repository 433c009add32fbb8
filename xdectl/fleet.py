"""The fleet: the desired state of every sled's ports, kept in etcd.

A fleet file (TOML; docs/fleet.md, deploy/fleet.example.toml) names the
VPCs and every port with the sled it runs on. `fleet apply` checks it whole
and writes it in one etcd transaction; each sled's agent (xdectl/agent.py)
turns it into that sled's ports, V2P mappings, routes, firewall rules and
external addresses. V2P is never written by hand here: it is derived from
the ports and the underlay address each sled registered.

Keys (values are JSON):
    /xde/fleet/vpc/<vni>       a [[vpc]] table
    /xde/fleet/port/<name>     a [[port]] table
    /xde/fleet/applied         {"ports": n, "vpcs": n}: its mod revision is
                               the last apply's
    /xde/fleet/sled/<name>     {"underlay_addr": A}: written by the sled's
                               agent, kept when it stops
    /xde/status/<name>         the agent's report, under its lease: present
                               while it is alive
Agents watch /xde/fleet/ (what their datapath is derived from), not the
reports.
"""
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass

from . import apply, validate
from .abi import XDE_MAX_PORTS
from .errors import XdeError
from .etcd import Unavailable

PREFIX = "/xde/"
FLEET = PREFIX + "fleet/"
VPC, PORT, SLED = FLEET + "vpc/", FLEET + "port/", FLEET + "sled/"
APPLIED = FLEET + "applied"
STATUS = PREFIX + "status/"

VPC_KEYS = {"vni", "subnet", "subnet6", "gateway_ip", "gateway_mac", "boundary_services",
            "boundary_vni", "dns", "domain"}
VPC_REQUIRED = {"vni", "gateway_ip", "gateway_mac", "boundary_services", "boundary_vni"}
PORT_KEYS = {"name", "sled", "vni", "mac", "ip", "ip6", "hostname", "routes",
             "firewall"} | apply.EXTERNAL_FIELDS
PORT_REQUIRED = {"name", "sled", "vni", "mac"}
TOP_KEYS = {"vpc", "port"}
_SLED = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# stands in for a sled's own values when a port is checked before any sled
# runs it (they are not part of what is checked)
_ANY_SLED = (("u1", "u2"), "fd00::1")


@dataclass
class Fleet:
    vpcs: dict        # vni -> its table
    ports: dict       # name -> its table


def sled_name(value, what="sled"):
    if not isinstance(value, str) or not _SLED.fullmatch(value):
        raise XdeError(f"{what} {value!r}: 1 to 63 of A-Z, a-z, 0-9, '_', '.', '-', "
                       f"starting with a letter or digit")
    return value


def port_fields(port, vpc, underlays, underlay_addr):
    """The fields `apply.port_want` takes, for a fleet port on a sled."""
    f = {"name": port["name"], "mac": port["mac"], "vni": port["vni"],
         "underlays": list(underlays), "underlay_addr": underlay_addr,
         "gateway_mac": vpc["gateway_mac"], "gateway_ip": vpc["gateway_ip"],
         "boundary_services": vpc["boundary_services"], "boundary_vni": vpc["boundary_vni"]}
    # the VPC's settings of the families the port has
    if "ip" in port and "subnet" in vpc:
        f["vpc_subnet"] = vpc["subnet"]
    if "ip6" in port and "subnet6" in vpc:
        f["vpc_subnet6"] = vpc["subnet6"]
    families = {v for v, k in ((4, "ip"), (6, "ip6")) if k in port}
    if "dns" in vpc:
        f["dns"] = [a for a in vpc["dns"] if _version(a) in families]
    if "domain" in vpc:
        f["domain"] = vpc["domain"]
    for key in ("ip", "ip6", "hostname", *apply.EXTERNAL_FIELDS):
        if key in port:
            f[key] = port[key]
    return f


def _version(addr):
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        return None      # refused where the VPC is checked


def _check_vpc(v, where):
    apply._check_keys(v, VPC_KEYS, where)
    apply._require(v, VPC_REQUIRED, where, ("subnet", "subnet6"))
    for key in ("vni", "boundary_vni"):      # TOML integers (int() takes 10.5 or true)
        if isinstance(v[key], bool) or not isinstance(v[key], int):
            raise XdeError(f"{where}: {key} must be an integer, not {v[key]!r}")
    vni = validate.vni(v["vni"], f"{where}: vni")
    where = f"{where.rsplit(' ', 2)[0]} vpc {vni}"
    for key in ("subnet", "subnet6", "gateway_ip", "gateway_mac", "boundary_services", "domain"):
        if key in v and not isinstance(v[key], str):
            raise XdeError(f"{where}: {key} must be a string")
    if "subnet" in v:
        validate.cidr4(v["subnet"], f"{where}: subnet")
    if "subnet6" in v:
        validate.cidr6(v["subnet6"], f"{where}: subnet6")
    if not isinstance(v.get("dns", []), list):
        raise XdeError(f"{where}: dns must be a list of addresses")
    for a in v.get("dns", []):
        validate.ip_any(a, f"{where}: dns server")
    return vni


def parse(text, source="FILE"):
    """A fleet file's text -> Fleet, checked whole; XdeError naming the
    first problem."""
    import tomllib
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise XdeError(f"{source}: {e}") from None
    apply._check_keys(doc, TOP_KEYS, source)
    if not isinstance(doc.get("vpc", []), list) or not isinstance(doc.get("port", []), list):
        raise XdeError(f"{source}: vpc and port are arrays of tables ([[vpc]], [[port]])")
    vpcs = {}
    for n, v in enumerate(doc.get("vpc", []), 1):
        vni = _check_vpc(v, f"{source} vpc #{n}")
        if vni in vpcs:
            raise XdeError(f"{source} vpc {vni}: a second VPC with that VNI")
        vpcs[vni] = dict(v, vni=vni)
    ports, external = {}, {}
    for n, p in enumerate(doc.get("port", []), 1):
        where = f"{source} port #{n}"
        apply._check_keys(p, PORT_KEYS, where)
        apply._require(p, PORT_REQUIRED, where, ("ip", "ip6"))
        where = f"{source} port {p['name']}"
        sled_name(p["sled"], f"{where}: sled")
        vni = p["vni"]
        if isinstance(vni, bool) or not isinstance(vni, int) or vni not in vpcs:
            raise XdeError(f"{where}: VNI {vni!r} is no [[vpc]] of the file")
        vpc = vpcs[vni]
        for key, family in (("ip", "subnet"), ("ip6", "subnet6")):
            if key in p and family not in vpc:
                raise XdeError(f"{where}: {key} given, but VPC {vni} has no {family}")
        want = apply.port_want(port_fields(p, vpc, *_ANY_SLED), p, where)
        if p["name"] in ports:
            raise XdeError(f"{where}: a second port of that name")
        ports[p["name"]] = p
        external[p["name"]] = want.spec.external    # validated: addresses canonical
    _check_across(ports, external, source)
    return Fleet(vpcs, ports)


def _check_across(ports, external, source):
    """What no single port shows: addresses and MACs used twice in a VPC,
    two ports of a sled whose links would have one name, external
    addresses two ports claim (external: name -> the port's validated
    ExternalIPs)."""
    from . import nat
    from .ports import datapath_end
    seen = {}
    for name, p in ports.items():
        where = f"{source} port {name}"
        taken = [("MAC", validate.mac(p["mac"]))] + [
            ("address", str(ipaddress.ip_address(p[k]))) for k in ("ip", "ip6") if k in p]
        # both of its links: a port's name may be another's datapath end
        taken += [("link", (p["sled"], link)) for link in (name, datapath_end(name))]
        for kind, value in taken:
            key = (kind, p["vni"] if kind != "link" else None, value)
            if key in seen:
                what = (f"{kind} {value} in VNI {p['vni']}" if kind != "link" else
                        f"on sled {p['sled']} the link {value[1]}")
                raise XdeError(f"{where}: {what} is port {seen[key]}'s too")
            seen[key] = name
    per_sled = {}
    for p in ports.values():
        per_sled[p["sled"]] = per_sled.get(p["sled"], 0) + 1
    for sled, n in sorted(per_sled.items()):
        if n > XDE_MAX_PORTS:
            raise XdeError(f"{source}: sled {sled} has {n} ports; a sled's root holds "
                           f"{XDE_MAX_PORTS}")
    claimed = {}
    for name, ext in external.items():
        if ext:
            for other, oext in claimed.items():
                why = nat.conflict(ext, oext, other)
                if why:
                    raise XdeError(f"{source} port {name}: {why}")
            claimed[name] = ext


def load(path):
    return apply.load(path, parse)


# --- the fleet in etcd ---------------------------------------------------

def _json(v):
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def to_keys(fleet):
    """{key: value} of the fleet's desired state (registrations aside)."""
    out = {f"{VPC}{vni}": _json(v) for vni, v in fleet.vpcs.items()}
    out.update({f"{PORT}{name}": _json(p) for name, p in fleet.ports.items()})
    return out


@dataclass
class State:
    """What an agent derives its datapath from: the fleet and the sleds'
    registrations, as read from /xde/fleet/."""
    vpcs: dict
    ports: dict
    sleds: dict       # sled -> underlay address


def from_keys(kvs):
    """{key: value} under /xde/fleet/ -> State. A value that is not what
    fleet apply writes is skipped (agents must not stop on one bad key):
    a VPC whose vni is no number, a port whose sled is no name or whose
    vni is a list or table (sled_desired reports the port's other faults)."""
    vpcs, ports, sleds = {}, {}, {}
    for key, value in kvs.items():
        try:
            v = json.loads(value) if value else None
        except ValueError:
            continue
        if key.startswith(VPC) and isinstance(v, dict):
            if isinstance(v.get("vni"), int) and not isinstance(v["vni"], bool):
                vpcs[v["vni"]] = v
        elif key.startswith(PORT) and isinstance(v, dict):
            if isinstance(v.get("sled"), str) and not isinstance(v.get("vni"), (list, dict)):
                ports[key[len(PORT):]] = v
        elif key.startswith(SLED) and isinstance(v, dict):
            sleds[key[len(SLED):]] = v.get("underlay_addr")
    return State(vpcs, ports, sleds)


def apply_file(etcd, fleet, attempts=3):
    """Write fleet as the whole desired state in one transaction: changed
    and new keys put, keys of what the file no longer has deleted, applied
    marker bumped. Returns (revision, puts, deletes).

    The marker carries an id of this apply: a transaction whose answer was
    lost (a timeout, a member gone mid-answer: etcd may have made it, or
    may still) is known made when the marker is ours, and otherwise tried
    again against the marker's revision, which fails if it was made after
    all. Another apply landing between two tries is overwritten, as when
    it lands between a read and a transaction."""
    want = to_keys(fleet)
    marker = _json({"ports": len(fleet.ports), "vpcs": len(fleet.vpcs),
                    "id": secrets.token_hex(8)})
    sent = lost = None
    for _ in range(attempts):
        have = _read(etcd, lost)
        value, mod_revision = have.get(APPLIED, (None, 0))
        if value == marker:
            return mod_revision, *sent
        puts = [(k, v) for k, v in sorted(want.items()) if have.get(k, (None,))[0] != v]
        deletes = sorted(k for k in have if k.startswith((VPC, PORT)) and k not in want)
        sent = len(puts), len(deletes)
        try:
            ok, revision = etcd.txn([(APPLIED, mod_revision)], puts + [(APPLIED, marker)],
                                    deletes)
        except Unavailable as e:
            lost = e            # made or not: the next read tells
            continue
        if ok:
            return revision, *sent
        lost = None
    if lost:
        value, mod_revision = _read(etcd, lost).get(APPLIED, (None, 0))
        if value == marker:
            return mod_revision, *sent
        raise _maybe_made(lost)
    raise XdeError(f"the fleet changed while it was being applied, {attempts} times: "
                   f"apply again")


def _read(etcd, lost):
    """The fleet's keys; after a lost answer, not being able to read them
    says the apply may have been made."""
    try:
        return etcd.range(FLEET)[1]
    except Unavailable as e:
        if lost:
            raise _maybe_made(e) from None
        raise


def _maybe_made(why):
    return XdeError(f"{why}; the apply may have been made: `xdectl fleet status` shows the "
                    f"last applied revision, and applying the file again is safe")


def status(etcd):
    """{"revision": the fleet's (its last change: an apply or a sled's
    registration), "applied": the last apply's, "sleds": [...]}: each sled named by a
    port, registered or with a live agent (a boundary host's too), whether
    its agent is alive, the revision its datapath matches, its ports, its
    last error."""
    _, kvs = etcd.range(PREFIX)
    fleet_kvs = {k: v for k, (v, _) in kvs.items() if k.startswith(FLEET)}
    state = from_keys(fleet_kvs)
    wanted = {}
    for p in state.ports.values():
        wanted[p.get("sled")] = wanted.get(p.get("sled"), 0) + 1
    sleds = []
    reporting = {k[len(STATUS):] for k in kvs if k.startswith(STATUS)}   # boundary hosts too
    for name in sorted(set(state.sleds) | set(wanted) | reporting):
        report = kvs.get(STATUS + name, (None, 0))[0]
        try:
            r = json.loads(report) if report else {}
        except ValueError:
            r = {}
        sleds.append({"name": name, "alive": bool(report),
                      "registered": name in state.sleds,
                      "underlay_addr": state.sleds.get(name),
                      "revision": r.get("revision"), "ports": r.get("ports"),
                      "desired_ports": wanted.get(name, 0), "error": r.get("error"),
                      "mode": r.get("mode", "sled"), "resyncs": r.get("resyncs")})
    # what every datapath must have seen: the last apply, and the sleds'
    # registrations since (a port's V2P waits for its sled's)
    revision = max((rev for k, (_, rev) in kvs.items() if k.startswith(FLEET)), default=0)
    return {"revision": revision, "applied": kvs.get(APPLIED, (None, 0))[1], "sleds": sleds}


def dump(etcd):
    """The desired state as a fleet file that `fleet apply` takes."""
    import tomli_w
    _, kvs = etcd.range(FLEET)
    state = from_keys({k: v for k, (v, _) in kvs.items()})
    doc = {"vpc": [state.vpcs[k] for k in sorted(state.vpcs)],          # by VNI (integers)
           "port": [state.ports[k] for k in sorted(state.ports)]}
    return tomli_w.dumps({k: v for k, v in doc.items() if v})


# --- one sled's share ----------------------------------------------------

def sled_desired(state, sled, underlays, underlay_addr, memo=None):
    """(apply.Desired for the sled's root, [why a port is not there]). V2P
    holds the mappings of every port of the VNIs the sled has ports in,
    from the ports' registered sleds; a port on an unregistered sled
    waits (no mapping)."""
    memo = {} if memo is None else memo
    ports, problems, used = {}, [], set()
    for name, p in sorted(state.ports.items()):
        if p.get("sled") != sled:
            continue
        vpc = state.vpcs.get(p.get("vni"))
        key = (_json(p), _json(vpc))
        used.add(key)
        if key not in memo:
            try:
                if vpc is None:
                    raise XdeError(f"port {name}: VNI {p.get('vni')} has no VPC")
                memo[key] = apply.port_want(port_fields(p, vpc, underlays, underlay_addr), p,
                                            f"port {name}")
            except Exception as e:  # noqa: BLE001 - a stored port of any shape
                memo[key] = XdeError(str(e) if isinstance(e, XdeError)
                                     else f"port {name}: malformed ({e})")
        want = memo[key]
        if isinstance(want, XdeError):
            problems.append(str(want))
        else:
            ports[name] = want
    for key in set(memo) - used:          # what no port is any more
        del memo[key]
    vnis = {w.spec.vni for w in ports.values()}
    v2p = {}
    for name, p in state.ports.items():
        if p.get("vni") not in vnis:
            continue
        where = underlay_addr if p.get("sled") == sled else state.sleds.get(p.get("sled"))
        if not where or (p.get("sled") == sled and name not in ports):
            continue
        try:
            mac = validate.mac(p["mac"])
            for k in ("ip", "ip6"):
                if k in p:
                    v2p[(p["vni"], str(ipaddress.ip_address(p[k])))] = (mac, where)
        except (XdeError, KeyError, ValueError):
            continue
    return apply.Desired(ports, v2p), problems
