"""etcd for the lab and the tests: the distribution's etcd-server, one
member or a cluster of several on one host's address, each member in its
own data directory, run in a network namespace of the caller's.

The settings beyond etcd's defaults are the ones a fleet needs (as
docs/fleet.md says for production): a fleet apply is one transaction of
every port, so the transaction and request limits are raised.
"""
import os
import secrets
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import netns

from xdectl.errors import XdeError
from xdectl.etcd import Etcd, Tls

CLIENT_PORT, PEER_PORT = 2379, 2380
# a fleet apply is one transaction: a key per port and VPC, and the marker
FLEET_FLAGS = ["--max-txn-ops", "200000", "--max-request-bytes", str(32 << 20),
               "--heartbeat-interval", "50", "--election-timeout", "500"]


def make_certs(directory, addr):
    """A CA, a server certificate for addr and a client certificate, made
    with openssl in directory: (server cert, server key, Tls of the client)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", *key, "-keyout", d / "ca.key", "-out", d / "ca.pem", "-days", "2",
        "-subj", "/CN=xde lab CA")
    # (etcd's HTTP gateway reaches its own gRPC server with the server's
    # certificate: it must be good for clients too)
    for name, ext in (("server", f"subjectAltName=IP:{addr}\n"
                                 "extendedKeyUsage=serverAuth,clientAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text(ext)
        run("req", *key, "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
            "-subj", f"/CN=xde lab {name}")
        run("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", d / f"{name}.ext",
            "-out", d / f"{name}.pem")
    return (str(d / "server.pem"), str(d / "server.key"),
            Tls(str(d / "ca.pem"), str(d / "client.pem"), str(d / "client.key")))


class Member:
    def __init__(self, cluster, n):
        self.name = f"m{n}"
        host = f"[{cluster.addr}]" if ":" in cluster.addr else cluster.addr
        scheme = "https" if cluster.certs else "http"
        # members share the host's address, one port pair each
        self.client_url = f"{scheme}://{host}:{CLIENT_PORT + 10000 * (n - 1)}"
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
        if c.certs:        # clients over TLS, with a certificate of the lab's CA
            cert, key, client = c.certs
            cmd += ["--cert-file", cert, "--key-file", key, "--client-cert-auth",
                    "--trusted-ca-file", client.ca]
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
    """size members on addr (in netns), their files under directory; with
    certs (make_certs), clients reach them over TLS with a certificate."""

    def __init__(self, netns, addr, directory, size=1, certs=None):
        self.netns, self.addr, self.certs = netns, addr, certs
        self.tls = certs[2] if certs else None       # what a client needs
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
            etcd = Etcd(m.client_url, timeout=1, tls=self.tls)
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


@contextmanager
def standalone(directory, size=1, certs=None):
    """A cluster in a network namespace of its own (loopback up), on
    127.0.0.1; stopped and the namespace removed afterwards."""
    ns = f"xe{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    c = Cluster(ns, "127.0.0.1", directory, size, certs)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        c.start()
        yield c
    finally:
        c.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def kill_recorded(directory):
    """Kill the members whose pid files a lab left in directory (a lab
    taken down by another process than the one that built it)."""
    for pidfile in Path(directory).glob("m*.pid"):
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        pidfile.unlink(missing_ok=True)
