"""`xdectl reload`: replace the programs of a running instance without
dropping traffic. The maps stay (the new sources must define the same map
layout; they may differ in anything else); the new programs are swapped in atomically, attachment by attachment: the tail-call tables,
then XDP on the underlays (one netlink replace each), then the tc filters
(tc filter replace); boundary services' likewise."""
from . import boundary
from .datapath import session, tc_name
from .errors import XdeError


def reload(root):
    with session(root) as (dp, nd):
        if not dp.exists():
            raise XdeError(f"nothing is loaded under {root}")
        bpf, fds = dp.reload()  # bpf keeps the new programs open until swapped
        maps = dp.maps()
        cfg = maps["config"].get(maps["config"].Key(0))
        swapped = 0
        if cfg.u1:
            for u in (cfg.u1, cfg.u2):
                nd.attach_xdp(u, fds["xdp_underlay"], replace=True)
                nd.replace_tc_ingress(u, fds["tc_underlay_in"], tc_name("tc_underlay_in", root))
                swapped += 2
        for k, _ in maps["ports"].items():
            nd.replace_tc_ingress(k.value, fds["tc_port_out"], tc_name("tc_port_out", root))
            swapped += 1
        swapped += boundary.swap_programs(maps, nd, fds, root)
        del bpf
        return swapped
