"""etcd for the lab and the tests: the distribution's etcd-server, one
member or a cluster of several on one host's address, each member in its
own data directory, run in a network namespace of the caller's.

The settings beyond etcd's defaults are the ones a fleet needs (as
docs/fleet.md says for production): a fleet apply is one transaction of
every port, so the transaction and request limits are raised.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

from pyroute2 import netns

from xdectl.errors import XdeError
from xdectl.etcd import Etcd

CLIENT_PORT, PEER_PORT = 2379, 2380
# a fleet apply is one transaction: a key per port and VPC, and the marker
FLEET_FLAGS = ["--max-txn-ops", "200000", "--max-request-bytes", str(32 << 20),
               "--heartbeat-interval", "50", "--election-timeout", "500"]


class Member:
    def __init__(self, cluster, n):
        self.name = f"m{n}"
        host = f"[{cluster.addr}]" if ":" in cluster.addr else cluster.addr
        # members share the host's address, one port pair each
        self.client_url = f"http://{host}:{CLIENT_PORT + 10000 * (n - 1)}"
        self.peer_url = f"http://{host}:{PEER_PORT + 10000 * (n - 1)}"
        self.data = cluster.dir / f"{self.name}.data"
        self.log = cluster.dir / f"{self.name}.log"
        self.pidfile = cluster.dir / f"{self.name}.pid"
        self.cluster = cluster
        self.proc = None

    def start(self):
        c = self.cluster
        initial = ",".join(f"{m.name}={m.peer_url}" for m in c.members)
        cmd = ["etcd", "--name", self.name, "--data-dir", str(self.data),
               "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
               "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
               "--initial-cluster", initial, "--initial-cluster-token", c.token,
               "--initial-cluster-state", "new", "--logger", "zap",
               "--log-outputs", str(self.log), *FLEET_FLAGS]
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{c.netns}", *cmd],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.pidfile.write_text(str(self.proc.pid))

    def signal(self, sig):
        """SIGTERM stops it, SIGKILL kills it; either way it can start again
        from its data directory."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self.pidfile.unlink(missing_ok=True)

    def freeze(self, frozen=True):
        """SIGSTOP it (a member that stops answering without going away), or
        SIGCONT it."""
        os.killpg(self.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """size members on addr (in netns), their files under directory."""

    def __init__(self, netns, addr, directory, size=1):
        self.netns, self.addr = netns, addr
        self.dir = Path(directory)
        self.token = f"xde-{os.getpid()}-{time.monotonic_ns()}"
        self.members = [Member(self, n) for n in range(1, size + 1)]

    @property
    def urls(self):
        return ",".join(m.client_url for m in self.members)

    def start(self, timeout=30):
        self.dir.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            if not m.running:
                m.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout=30):
        """Until every running member answers a read (from its namespace)."""
        deadline = time.monotonic() + timeout
        netns.pushns(self.netns)
        try:
            self._wait_members(deadline)
        finally:
            netns.popns()

    def _wait_members(self, deadline):
        for m in self.members:
            if not m.running:
                continue
            etcd = Etcd(m.client_url, timeout=1)
            while True:
                try:
                    etcd.range("/health-check/")
                    break
                except XdeError as e:
                    if m.proc.poll() is not None or time.monotonic() > deadline:
                        tail = m.log.read_text()[-400:] if m.log.exists() else ""
                        raise XdeError(f"etcd member {m.name} did not come up ({e}): {tail}")
                    time.sleep(0.1)
                finally:
                    etcd.close()

    def stop(self):
        for m in self.members:
            m.signal(signal.SIGTERM)


def kill_recorded(directory):
    """Kill the members whose pid files a lab left in directory (a lab
    taken down by another process than the one that built it)."""
    for pidfile in Path(directory).glob("m*.pid"):
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        pidfile.unlink(missing_ok=True)
