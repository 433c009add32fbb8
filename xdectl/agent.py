"""`xdectl agent`: keeps one sled's root matching the fleet in etcd.

    register     the sled's underlay address (/xde/fleet/sled/NAME) and its
                 report (/xde/status/NAME) under a lease kept alive by a
                 thread of its own: the report vanishes when the agent does
    read         everything under /xde/fleet/ at one revision
    reconcile    plan the root's changes against what the kernel holds
                 (apply.plan) and make them; one failing change does not
                 stop the others, and is tried again
    watch        from the next revision; each batch of events (one etcd
                 transaction, or several when catching up) is folded into
                 the state and reconciled
When etcd cannot be reached the agent says so in its report (and its log)
and tries again with backoff, watching again from where it was; when that
revision has been compacted, it reads everything again. What it knows of
the root between reconciles is what the last one left (it is the root's
only writer); it reads the root itself at start, after a failure and every
30 s, and keeps nothing across runs: an agent killed at any point and
started again converges.

In boundary mode (--boundary) the root is a boundary-services root, and
what is reconciled is its NAT table: every external address of every port
of a registered sled, sent to that sled.
"""
import json
import os
import random
import socket
import sys
import threading
import time
from contextlib import closing

from . import apply, fleet, validate
from .errors import XdeError
from .etcd import Compacted, Etcd, Unavailable

DEFAULT_TTL = 5          # seconds a dead agent's report outlives it
IDLE = 1.0               # seconds a quiet watch waits before the loop looks around
# A reconcile plans against what the root held after the last one that made
# every change (the agent is its only writer), and reads the whole root
# again this often: what someone else changed there is put right.
FULL_READ_EVERY = 30.0


class Agent:
    def __init__(self, etcd_urls, sled, root, underlays=(), underlay_addr=None,
                 boundary=False, ttl=DEFAULT_TTL, report_file=None, log=None, tls=None):
        self.sled = fleet.sled_name(sled, "--sled")
        self.root = root
        self.boundary = boundary
        self.underlays = tuple(underlays)
        self.addr = validate.ipv6(underlay_addr, "--underlay-addr") if underlay_addr else None
        if not boundary and (len(self.underlays) != 2 or not self.addr):
            raise XdeError("an agent needs --underlay twice and --underlay-addr "
                           "(or --boundary on a boundary-services host)")
        self.ttl = ttl
        self.report_file = report_file
        self.urls, self.tls = etcd_urls, tls
        self.etcd = self.client()
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stop = threading.Event()
        self.kvs = None          # key -> value under /xde/fleet/, as of self.rev
        self.rev = 0
        self.memo = {}           # apply.port_want per (port, vpc) tables
        self.known = None        # apply.Current after the last reconcile; None: read the root
        self.read_at = 0.0
        self.report = {"mode": "boundary" if boundary else "sled", "pid": os.getpid(),
                       "host": socket.gethostname(), "revision": None, "ports": 0,
                       "error": None, "resyncs": 0, "etcd": "connecting", "endpoint": None}
        self.lease = None
        self._reported = None
        self._keeper = None
        self._report_lock = threading.Lock()

    # --- the loop ---------------------------------------------------------

    def client(self):
        """An etcd client (one per thread)."""
        return Etcd(self.urls, tls=self.tls)

    def run(self):
        """Until stop is set (SIGTERM, SIGINT)."""
        self.log(f"agent {self.sled}: etcd {self.urls}, root {self.root}")
        backoff = 0.2
        while not self.stop.is_set():
            try:
                self._connected()
            except Compacted as e:
                self.report["resyncs"] += 1
                self.log(f"agent {self.sled}: {e}; reading the whole state again")
                self.kvs = None
                continue
            except (Unavailable, XdeError) as e:
                self._etcd_down(str(e))
                self.stop.wait(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
        self._leave()

    def _connected(self):
        self._upkeep()
        if self.kvs is None:
            self.rev, kvs = self.etcd.range(fleet.FLEET)
            self.kvs = {k: v for k, (v, _) in kvs.items()}
            self.reconcile()
            self._etcd_up()
        while not self.stop.is_set():
            # returns when the watch has been quiet for IDLE seconds (etcd
            # having answered it: else it raises)
            for rev, events in self.etcd.watch(fleet.FLEET, self.rev + 1, idle=IDLE):
                for key, value in events:
                    if value is None:
                        self.kvs.pop(key, None)
                    else:
                        self.kvs[key] = value
                self.rev = rev
                self.reconcile()
                self._etcd_up()
                if self.stop.is_set():
                    return
                self._upkeep()
            if self.report["error"] or time.monotonic() - self.read_at > FULL_READ_EVERY:
                self.reconcile()           # a change failed, or time to read the root
            self._etcd_up()
            self._upkeep()

    def _upkeep(self):
        """A lease and its keeper, whatever happened to them."""
        if self.lease is None:
            self._register()
        if self._keeper is None or not self._keeper.is_alive():
            self._keeper = threading.Thread(target=self._keep_alive, daemon=True)
            self._keeper.start()

    # --- registration and the report ----------------------------------------

    def _register(self):
        """A lease, the report under it (refused while another agent's report
        for this sled is alive), the sled's underlay address."""
        lease = self.etcd.grant(self.ttl)
        try:
            key = fleet.STATUS + self.sled
            ok, _ = self.etcd.txn([(key, 0)], [(key, json.dumps(self.report))], lease=lease)
            if not ok:
                other, _ = self.etcd.get(key)
                try:
                    who = json.loads(other)
                    who = f"pid {who.get('pid')} on {who.get('host')}"
                except (TypeError, ValueError):
                    who = "?"
                raise XdeError(f"sled {self.sled} has a live agent already ({who}); waiting "
                               f"for it to stop or its lease to end")
            if not self.boundary:
                value = json.dumps({"underlay_addr": self.addr})
                if self.etcd.get(fleet.SLED + self.sled)[0] != value:
                    self.etcd.put(fleet.SLED + self.sled, value)
        except BaseException:
            # registered whole or not at all: the next turn starts again
            try:
                self.etcd.revoke(lease)
            except XdeError:
                pass
            raise
        with self._report_lock:
            self.lease = lease
            self._reported = None
        self.log(f"agent {self.sled}: registered (lease {lease:x}, ttl {self.ttl} s)")

    def _keep_alive(self):
        """The lease's heartbeat, in its own thread and with its own client,
        so that a long reconcile does not let it end."""
        etcd = self.client()
        while not self.stop.wait(self.ttl / 3):
            lease = self.lease
            if lease is None:
                continue
            try:
                if etcd.keepalive(lease) <= 0:
                    self.log(f"agent {self.sled}: lease {lease:x} ended; registering again")
                    with self._report_lock:
                        if self.lease == lease:
                            self.lease = None
            except XdeError as e:
                self._etcd_down(str(e))
            except Exception as e:  # noqa: BLE001 - the heartbeat must outlive any surprise
                self._etcd_down(f"etcd keepalive: {e}")

    def _etcd_down(self, why):
        if self.report["etcd"] != why:
            self.log(f"agent {self.sled}: {why}; the datapath stays as last programmed")
        self.report["etcd"] = why
        self._write_report()

    def _etcd_up(self):
        if self.report["etcd"] != "ok":
            self.log(f"agent {self.sled}: etcd ok ({self.etcd.endpoint()}), at revision "
                     f"{self.rev}")
            self.report["etcd"] = "ok"
        self.report["endpoint"] = self.etcd.endpoint()
        self._write_report()

    def _write_report(self):
        with self._report_lock:       # the keeper thread reports too
            self._write_report_locked()

    def _write_report_locked(self):
        text = json.dumps(self.report, sort_keys=True)
        if self.report_file:      # beside etcd: says so also when etcd is away
            tmp = f"{self.report_file}.tmp"
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, self.report_file)
        lease = self.lease          # never written without one: it would not expire
        if lease is None or text == self._reported or self.report["etcd"] != "ok":
            return
        try:
            self.etcd.put(fleet.STATUS + self.sled, text, lease=lease)
            self._reported = text
        except XdeError:
            pass             # the next turn of the loop finds etcd gone

    def _leave(self):
        """A clean stop: the report goes at once (not at the lease's end)."""
        if self.lease is not None:
            try:
                self.etcd.revoke(self.lease)
            except XdeError:
                pass
        self.log(f"agent {self.sled}: stopped at revision {self.rev}")

    # --- reconciling -------------------------------------------------------

    def reconcile(self):
        """Make the root match self.kvs; the report says how that went."""
        state = fleet.from_keys(self.kvs)
        try:
            count, errors = (self._boundary(state) if self.boundary else self._sled(state))
        except Exception as e:  # noqa: BLE001 - the root could not be read: say so, go on
            self.known = None
            count, errors = self.report["ports"], [_why(e)]
        error = None
        if errors:
            error = errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        if error != self.report["error"]:
            self.log(f"agent {self.sled}: " + (error or "all changes made"))
        self.report.update(ports=count, error=error)
        if not errors:
            self.report["revision"] = self.rev
        self._write_report()

    def _sled(self, state):
        want, problems = fleet.sled_desired(state, self.sled, self.underlays, self.addr,
                                            self.memo)
        if self.known is None or time.monotonic() - self.read_at > FULL_READ_EVERY:
            self.known = apply.current(self.root)
            self.read_at = time.monotonic()
        actions = apply.plan(self.known, want)
        self.known = None          # until every action below is made
        errors = list(problems)
        with closing(apply.execute_all(self.root, actions)) as making:
            for _ in actions:
                if self.stop.is_set():
                    errors.append("stopped before every change was made")
                    break
                a, error = next(making)
                if error is not None:       # netlink's too: one change fails, not all
                    errors.append(f"{a.op} {a.target}: {_why(error)}")
        if len(errors) == len(problems):
            self.known = _as_current(want)
        if actions:
            self.log(f"agent {self.sled}: revision {self.rev}: {len(actions)} changes"
                     + (f", {len(errors)} failed" if errors else ""))
        return len(want.ports), errors

    def _boundary(self, state):
        from . import boundary
        want = nat_table(state)
        self.read_at = time.monotonic()      # the table is read whole each time
        changes, errors = boundary.sync_nat(self.root, want)
        if changes:
            self.log(f"agent {self.sled}: revision {self.rev}: {changes} NAT changes"
                     + (f", {len(errors)} failed" if errors else ""))
        return len(want), errors


def _why(e):
    """An error as one line; a programming error names its type."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, (XdeError, OSError)) else f"{type(e).__name__}: {text}"


def _as_current(want):
    """The root as a reconcile that made every change leaves it: what it
    wanted (firewall rules not managed by the fleet left unknown)."""
    return apply.Current({n: w.spec for n, w in want.ports.items()},
                         {n: dict(w.routes) for n, w in want.ports.items()},
                         {n: sorted(w.firewall) for n, w in want.ports.items()
                          if w.firewall is not None},
                         dict(want.v2p))


def nat_table(state):
    """{external address or range: (sled address, VNI, MAC)}: what a boundary
    host's NAT table holds for the fleet's ports on registered sleds."""
    from .boundary import NatTarget
    out = {}
    for p in state.ports.values():
        sled = state.sleds.get(p.get("sled"))
        if not sled:
            continue
        try:
            # validated: canonical addresses, a SNAT IP has its range; a
            # malformed stored port is skipped, not the agent's end
            ext = apply._external(p, f"port {p.get('name')}").validated()
            owner = (sled, p["vni"], validate.mac(p["mac"]))
        except (XdeError, KeyError):
            continue
        for ip in ext.snat_ips:
            out[str(NatTarget(ip, ext.snat_start, ext.snat_end))] = owner
        for ip in ext.ephemeral_ips + ext.floating_ips:
            out[str(NatTarget(ip))] = owner
    return out


def run(etcd_urls, sled, root, underlays, underlay_addr, boundary=False, ttl=DEFAULT_TTL,
        report_file=None, tls=None):
    """The CLI's entry: run until SIGTERM or SIGINT."""
    import signal
    agent = Agent(etcd_urls, sled, root, underlays, underlay_addr, boundary, ttl, report_file,
                  tls=tls)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    agent.run()
