"""The fleet over TLS: an etcd member (started by the test, in a namespace of
its own) that serves clients over https only and requires a client
certificate of the test's CA (made with openssl); `fleet apply|status|dump`,
a watch and an agent through it, and clients refused in one line.
"""
import json
import os
import secrets
import signal
import subprocess
import time

import pytest
from pyroute2 import netns

from lab_fixture import XDECTL
from xdectl.etcd import Etcd
from xdelab.etcd import make_certs, standalone
from xdelab.fleet import fleet_text

pytestmark = pytest.mark.usefixtures("privileged")


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    with standalone(d / "etcd", certs=make_certs(d / "certs", "127.0.0.1")) as c:
        yield c.netns, c


def xdectl(ns, *args, check=True):
    p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", XDECTL, *args],
                       capture_output=True, text=True, timeout=60)
    assert not check or p.returncode == 0, p.stdout + p.stderr
    return p


def tls_args(tls, ca=True, cert=True):
    return ([*(["--etcd-ca", tls.ca] if ca else []),
             *(["--etcd-cert", tls.cert, "--etcd-key", tls.key] if cert else [])])


def test_fleet_apply_status_and_dump_over_tls(tls_etcd, tmp_path):
    ns, c = tls_etcd
    assert c.urls.startswith("https://")
    f = tmp_path / "fleet.toml"
    f.write_text(fleet_text(4, ["sled1", "sled2"]))
    out = json.loads(xdectl(ns, "fleet", "apply", str(f), "--etcd", c.urls, *tls_args(c.tls),
                            "--json").stdout)
    assert out["put"] == 5 and out["revision"] > 1         # 4 ports, 1 VPC
    status = json.loads(xdectl(ns, "fleet", "status", "--etcd", c.urls, *tls_args(c.tls),
                               "--json").stdout)
    assert status["applied"] == out["revision"]
    assert {s["name"]: s["desired_ports"] for s in status["sleds"]} == {"sled1": 2, "sled2": 2}
    dump = tmp_path / "dump.toml"
    dump.write_text(xdectl(ns, "fleet", "dump", "--etcd", c.urls, *tls_args(c.tls)).stdout)
    again = json.loads(xdectl(ns, "fleet", "apply", str(dump), "--etcd", c.urls,
                              *tls_args(c.tls), "--json").stdout)
    assert (again["put"], again["deleted"]) == (0, 0)


@pytest.mark.parametrize("ca, cert, says", [
    (True, False, "TLS: etcd ended the handshake"),     # no client certificate: etcd refuses
    (False, True, "TLS: certificate verify failed"),    # the system's CAs do not know etcd's
])
def test_a_client_etcd_does_not_trust_or_that_does_not_trust_etcd_is_refused_in_one_line(
        tls_etcd, tmp_path, ca, cert, says):
    ns, c = tls_etcd
    before = json.loads(xdectl(ns, "fleet", "status", "--etcd", c.urls, *tls_args(c.tls),
                               "--json").stdout)["applied"]
    f = tmp_path / "fleet.toml"
    f.write_text(fleet_text(6, ["sled1", "sled2"]))
    p = xdectl(ns, "fleet", "apply", str(f), "--etcd", c.urls, *tls_args(c.tls, ca, cert),
               check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and says in lines[0], p.stderr
    after = json.loads(xdectl(ns, "fleet", "status", "--etcd", c.urls, *tls_args(c.tls),
                              "--json").stdout)["applied"]
    assert after == before


def test_a_watch_over_tls_sees_a_change(tls_etcd):
    ns, c = tls_etcd
    netns.pushns(ns)
    try:
        e = Etcd(c.urls, tls=c.tls)
        rev, _ = e.range("/tls-test/")
        e.put("/tls-test/k", "v")
        got = [events for _, events in e.watch("/tls-test/", rev + 1, idle=1)]
        assert got == [[("/tls-test/k", "v")]]
        e.close()
    finally:
        netns.popns()


def test_an_agent_registers_and_keeps_its_lease_over_tls(tls_etcd, tmp_path):
    """Its main client and its lease keeper's both speak TLS: the sled is
    alive past its lease's ttl; a clean stop ends it at once."""
    ns, c = tls_etcd
    root = f"/sys/fs/bpf/xde-tls-{secrets.token_hex(3)}"      # boundary mode: no ports made
    report = tmp_path / "report.json"
    agent = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", XDECTL, "--root", root,
                              "agent", "--boundary", "--sled", "edge", "--ttl", "2",
                              "--report", str(report), "--etcd", c.urls, *tls_args(c.tls)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def alive():
            s = json.loads(xdectl(ns, "fleet", "status", "--etcd", c.urls, *tls_args(c.tls),
                                  "--json").stdout)
            return any(x["name"] == "edge" and x["alive"] for x in s["sleds"])
        deadline = time.monotonic() + 20
        while not alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive()
        time.sleep(3)                                       # past the 2 s lease
        assert alive() and json.loads(report.read_text())["etcd"] == "ok"
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
        assert not alive()
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait()
        if os.path.isdir(root):
            os.rmdir(root)
