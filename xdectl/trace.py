"""`xdectl trace`: run one frame through the loaded datapath with
BPF_PROG_TEST_RUN and say what happened to it -- the verdict, the counters
it moved, and the frame that came out (docs/design.md,
"Reload, apply and trace" and "Counters and drop reasons").

The run is real: the kernel executes the pinned program against the live
maps, so the port and global counters, the firewall's rule hits and its
flow table change exactly as they would for a frame on the wire. What is
not real is the egress: a test run records a redirect without sending
anything (bpf_redirect only sets the target), so nothing leaves the host.

The ctx of a TC (SCHED_CLS) run is a struct __sk_buff (UAPI linux/bpf.h).
The kernel (net/bpf/test_run.c, convert___skb_to_skb) takes only mark,
priority, ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs,
gso_size and hwtstamp from it and refuses (EINVAL) a ctx with any other
byte set; an ifindex is looked up in the caller's network namespace
(ENODEV if absent) and becomes the skb's device. tc_port_out finds its
port by skb->ifindex, so we give the port's datapath end, which is why a
trace must run in the namespace the port was created in -- as every other
xdectl command does.

The ctx of an XDP run is a struct xdp_md: data_end must be the frame's
length, data and data_meta 0, egress_ifindex 0; ingress_ifindex (with
rx_queue_index 0) makes the frame arrive on that device. We give the
root's first underlay, where real Geneve arrives.
"""
import ipaddress
import os
import struct

from .abi import (GENEVE_OPT_CLASS_OXIDE as OXIDE_OPT_CLASS, GENEVE_PORT, GENEVE_PROTO_ETH,
                  PORT_F_PASSTHROUGH)

TC_VERDICTS = {0xFFFFFFFF: "TC_ACT_UNSPEC", 0: "TC_ACT_OK", 1: "TC_ACT_RECLASSIFY",
               2: "TC_ACT_SHOT", 3: "TC_ACT_PIPE", 4: "TC_ACT_STOLEN", 5: "TC_ACT_QUEUED",
               6: "TC_ACT_REPEAT", 7: "TC_ACT_REDIRECT", 8: "TC_ACT_TRAP"}
XDP_VERDICTS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}
OUTER_SPORT = 49152          # the bottom of RFC 8926's source-port range
OUTER_SRC_MAC = "02:00:00:00:00:01"
# port events that mean the gateway answered the guest itself
GATEWAY_REPLIES = ("arp_replies", "icmp_replies", "mtu_icmp_sent", "ndp_replies",
                   "dhcp4_replies", "dhcp6_replies")


def verdict_name(direction, retval):
    names = TC_VERDICTS if direction == "out" else XDP_VERDICTS
    return names.get(retval, f"unknown ({retval})")


# --- parsing FRAME ---------------------------------------------------------

def parse_hex(text):
    """bytes if text is hex (whitespace, ':' and a leading 0x allowed), else None."""
    t = "".join(text.split()).replace(":", "")
    if t[:2].lower() == "0x":
        t = t[2:]
    if not t or len(t) % 2:
        return None
    try:
        return bytes.fromhex(t)
    except ValueError:
        return None


def parse_frame(text):
    """FRAME as bytes: hex, or else a scapy expression evaluated with scapy's
    names (and nothing else of ours) in scope."""
    from .errors import XdeError
    raw = parse_hex(text)
    if raw is not None:
        return raw
    import scapy.all as scapy_all
    from scapy.packet import Packet
    names = {k: v for k, v in vars(scapy_all).items() if not k.startswith("_")}
    try:
        pkt = eval(text, {"__builtins__": __builtins__}, names)  # the operator's own expression
    except Exception as e:
        raise XdeError(f"FRAME is neither hex nor a scapy expression: {type(e).__name__}: {e}") from None
    if isinstance(pkt, Packet):
        return bytes(pkt)
    if isinstance(pkt, (bytes, bytearray)):
        return bytes(pkt)
    raise XdeError(f"FRAME evaluates to a {type(pkt).__name__}, not a packet")


def is_underlay_frame(frame, underlay_addr=None):
    """A frame as the underlay carries it: Ethernet / IPv6 with UDP to port
    6081, or anything IPv6 to this host's underlay address (traffic for
    the host itself, which XDP must pass)."""
    if len(frame) < 54 or frame[12:14] != b"\x86\xdd":
        return False
    if underlay_addr is not None and frame[38:54] == underlay_addr:
        return True
    return (len(frame) >= 58 and frame[20] == 17 and
            struct.unpack("!H", frame[56:58])[0] == GENEVE_PORT)


def encapsulate(inner, vni, src6, dst6, dst_mac, external=False):
    """Outer Ethernet + IPv6 + UDP + Geneve around an inner frame
    (docs/design.md, "Wire format"; UDP checksum 0, as OPTE sends)."""
    opts = struct.pack("!HBB", OXIDE_OPT_CLASS, 0x00, 0) if external else b""
    geneve = (bytes([len(opts) // 4, 0]) + struct.pack("!H", GENEVE_PROTO_ETH) +
              vni.to_bytes(3, "big") + b"\0" + opts)
    udp_len = 8 + len(geneve) + len(inner)
    udp = struct.pack("!HHHH", OUTER_SPORT, GENEVE_PORT, udp_len, 0)
    ip6 = (struct.pack("!IHBB", 6 << 28, udp_len, 17, 128) +
           ipaddress.IPv6Address(src6).packed + ipaddress.IPv6Address(dst6).packed)
    eth = _mac(dst_mac) + _mac(OUTER_SRC_MAC) + b"\x86\xdd"
    return eth + ip6 + udp + geneve + inner


def _mac(s):
    return bytes.fromhex(s.replace(":", ""))


# --- counters ----------------------------------------------------------------

def snapshot(maps, port_index):
    """Everything a run can count: every port's counters (an inbound frame
    may be delivered to another port than the one named), the global
    counters, the traced port's rule hits, and its number of flows."""
    from . import counters
    from .fw import read_rules
    snap = {}
    for k, pc in maps["ports"].items():
        c = counters.port_counts(maps, k.value)
        if c:
            snap[pc.name.decode()] = c.flat()
    snap["global"] = counters.global_counts(maps).flat()
    snap["_rules"] = {r.id: (r.text(), counters.rule_hits(maps, r.id))
                      for r in read_rules(maps, port_index)}
    snap["_flows"] = counters.flows_per_port(maps).get(port_index, 0)
    return snap


def diff(before, after):
    """(counters {scope: {name: delta}}, rule hits {id: (text, delta)}, flows delta)."""
    counters = {}
    for scope, vals in after.items():
        if scope.startswith("_"):
            continue
        old = before.get(scope, {})
        d = {k: v - old.get(k, 0) for k, v in vals.items() if v != old.get(k, 0)}
        if d:
            counters[scope] = d
    rules = {i: (text, n - before["_rules"].get(i, (text, 0))[1])
             for i, (text, n) in after["_rules"].items()
             if n != before["_rules"].get(i, (text, 0))[1]}
    return counters, rules, after["_flows"] - before["_flows"]


# --- running -----------------------------------------------------------------

def trace(root, port, direction, frame, vni=None, external=False, as_is=False):
    """Run frame through PORT's outbound (TC) or the underlay's inbound (XDP)
    program; returns a dict describing what happened."""
    from . import libbpf
    from .datapath import Datapath
    from .errors import XdeError
    from .maps import ip6_str

    if direction not in ("in", "out"):
        raise XdeError(f"--dir '{direction}' is not in or out")
    if len(frame) < 14:
        raise XdeError(f"FRAME is {len(frame)} bytes: shorter than an Ethernet header")
    dp = Datapath(root)
    index, pc = dp.port(port)
    maps = dp.maps()
    cfg = maps["config"].get(maps["config"].Key(0))
    passthrough = bool(pc.flags & PORT_F_PASSTHROUGH)
    notes = []

    if direction == "out":
        _check_link(index, pc.peer.decode())
        prog, ctx, data = "tc_port_out", libbpf.skb_ctx(index), frame
    else:
        prog, data = "xdp_underlay", frame
        if passthrough:
            notes.append("passthrough port: the frame is run as the underlay receives it, "
                         "unencapsulated")
        elif as_is:
            notes.append("run as given (--as-is)")
        elif is_underlay_frame(frame, bytes(cfg.underlay_addr)):
            notes.append("FRAME is an underlay frame (IPv6 to this host or to UDP 6081): "
                         "run as given")
        else:
            vni = pc.vni if vni is None else vni
            src6 = _sender(maps, vni, frame) or ip6_str(pc.bsvc_addr)
            data = encapsulate(frame, vni, src6, ip6_str(cfg.underlay_addr),
                               _links(lambda nd: nd.mac(cfg.u1)) or "02:00:00:00:00:02", external)
            notes.append(f"encapsulated: Geneve VNI {vni} from {src6} to "
                         f"{ip6_str(cfg.underlay_addr)}" + (", option External" if external else ""))
        ctx = libbpf.xdp_ctx(len(data), cfg.u1) if cfg.u1 else None

    fd = dp.prog_fd(prog)
    try:
        before = snapshot(maps, index)
        try:
            retval, out, _ = libbpf.test_run(fd, data, ctx=ctx)
        except OSError:
            if direction != "in" or ctx is None:
                raise
            # the underlay's rx queue is not usable for a test run (the
            # kernel checks it is registered): arrive on loopback instead
            notes.append("run without ingress_ifindex (the kernel refused the underlay's rx queue)")
            before = snapshot(maps, index)
            retval, out, _ = libbpf.test_run(fd, data)
        after = snapshot(maps, index)
    finally:
        os.close(fd)
    counters, rules, flows = diff(before, after)
    notes += _where(direction, retval, port, counters, out)
    notes += _nat(direction, port, counters, data, out)
    return {"port": port, "dir": direction, "program": prog, "retval": retval,
            "verdict": verdict_name(direction, retval), "input": data.hex(),
            "output": out.hex(), "output_changed": out != data, "counters": counters,
            "rule_hits": {str(i): {"rule": t, "hits": n} for i, (t, n) in rules.items()},
            "flows": flows, "notes": notes}


def _where(direction, retval, port, counters, out):
    """Where a redirect goes: the test run does not report the target, so
    say what the counters and the output frame show."""
    if retval not in (4, 7) or (direction == "in" and retval != 4):
        return []
    if direction == "in":
        into = [p for p, d in counters.items() if p != "global" and d.get("rx_packets")]
        return [f"redirected into port {', '.join(into)}"] if into else []
    mine = counters.get(port, {})
    if any(mine.get(c) for c in GATEWAY_REPLIES):
        return [f"redirected back to the guest of {port} (the gateway answered)"]
    if mine.get("encap"):
        if out[:12] == bytes(12):
            return ["redirected to the underlay with the outer MACs unset: the next hop's "
                    "neighbour entry is not resolved yet (bpf_redirect_neigh resolves it)"]
        mac = ":".join(f"{b:02x}" for b in out[6:12])
        dev = _links(lambda nd: nd.by_mac(mac))
        return ["redirected to the underlay" + (f" via {dev}" if dev else "") +
                " (the kernel's FIB chose it)"]
    if mine.get("passthrough_out"):
        return ["redirected unchanged to an underlay (passthrough)"]
    return []


def _nat(direction, port, counters, data, out):
    """What NAT made of the frame: the end it translated, before and after
    (the inner frame of what was encapsulated)."""
    mine = counters.get(port, {})
    if not mine.get("nat_out" if direction == "out" else "nat_in"):
        return []
    end = "src" if direction == "out" else "dst"
    return [f"NAT ({'outbound' if direction == 'out' else 'inbound'}): {end} "
            f"{_endpoint(_guest_frame(data), end)} -> {_endpoint(_guest_frame(out), end)}"]


def _guest_frame(frame):
    """The guest's Ethernet frame: frame itself, or what it encapsulates."""
    from scapy.layers.l2 import Ether
    f = decode(frame)
    return f.getlayer(Ether, nb=2) or f


def _endpoint(frame, end):
    """ADDR[:PORT] of one end of an Ethernet frame's IP packet."""
    l3 = frame.payload
    addr = getattr(l3, end, "?")
    l4 = l3.payload
    port = getattr(l4, "sport" if end == "src" else "dport", None)
    if port is None:
        port = getattr(l4, "id", None)        # an echo: its identifier
    if port is None:
        return str(addr)
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def _inner_source(inner):
    """The IPv4 or IPv6 source address of an Ethernet frame, or None."""
    if len(inner) >= 34 and inner[12:14] == b"\x08\x00":
        return ipaddress.IPv4Address(inner[26:30])
    if len(inner) >= 54 and inner[12:14] == b"\x86\xdd":
        return ipaddress.IPv6Address(inner[22:38])
    return None


def _sender(maps, vni, inner):
    """The underlay address V2P gives the inner frame's source, if any."""
    from .maps import ip6_str
    from .overlay import v2p_key
    src = _inner_source(inner)
    if src is None:
        return None
    m = maps["v2p"]
    v = m.get(v2p_key(m, vni, src))
    return ip6_str(v.underlay) if v is not None else None


def _links(query):
    """Ask netlink one question about this namespace's links."""
    from .netdev import Netdev
    nd = Netdev()
    try:
        return query(nd)
    finally:
        nd.close()


def _check_link(index, peer):
    """The port's datapath end must be here: the kernel resolves the ctx's
    ifindex in this network namespace."""
    from .errors import XdeError
    if _links(lambda nd: nd.name(index)) != peer:
        raise XdeError(f"the port's datapath end {peer} (ifindex {index}) is not in this network "
                       f"namespace: run trace where the port was created")


# --- output ------------------------------------------------------------------

def decode(frame):
    """A scapy packet of frame, Geneve decoded."""
    import importlib
    importlib.import_module("scapy.contrib.geneve")   # binds UDP 6081 to Geneve
    from scapy.layers.l2 import Ether
    return Ether(frame)


def print_result(r, hexdump=False):
    print(f"{r['port']} {r['dir']}: {r['program']} -> {r['verdict']} ({r['retval']})")
    for n in r["notes"]:
        print(f"  note: {n}")
    print("counters:" if r["counters"] else "counters: none changed")
    for scope, d in r["counters"].items():
        print(f"  {scope}: " + ", ".join(f"{k} {v:+d}" for k, v in d.items()))
    for rid, h in r["rule_hits"].items():
        print(f"  firewall rule {rid} ({h['rule']}): hits {h['hits']:+d}")
    if r["flows"]:
        print(f"  flow table ({r['port']}): entries {r['flows']:+d}")
    out = bytes.fromhex(r["output"])
    pkt = decode(out)
    what = "output" if r["output_changed"] else "output (unchanged)"
    print(f"{what}, {len(out)} bytes: {pkt.summary()}")
    print(pkt.show(dump=True).rstrip())
    if hexdump:
        from scapy.utils import hexdump as hd
        print(hd(pkt, dump=True))
