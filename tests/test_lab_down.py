"""`xdectl lab down` removes what it can, says in one line each what it could
not, and a second run finishes: a stale namespace or a foreign pin never
stops the rest of the teardown."""
import os
import subprocess
from pathlib import Path

import pytest
from pyroute2 import netns

from netns import XDECTL, create_args, short_id, sh
from xdelab.lab import HOSTS, Lab

pytestmark = pytest.mark.usefixtures("privileged")


def lab_cli(prefix, *args):
    return subprocess.run([XDECTL, "lab", "--prefix", prefix, *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def broken_lab():
    """A lab's namespaces and roots, without building the whole lab: sled1
    has a real root (a port over two veths) and then loses its namespace's
    mount (stale, as after a reboot or a chroot's end); sled2's root holds a
    directory xdectl did not make."""
    lab = Lab(f"xt{short_id(4)}-")
    try:
        for h in HOSTS:
            netns.create(lab.ns(h))
        sled1 = f"/run/netns/{lab.ns('sled1')}"
        sh("ip", "-n", lab.ns("sled1"), "link", "add", "u1", "type", "veth", "peer", "name", "u2")
        sh("ip", "-n", lab.ns("sled1"), "link", "set", "u1", "up")
        sh("ip", "-n", lab.ns("sled1"), "link", "set", "u2", "up")
        sh("nsenter", f"--net={sled1}", XDECTL, "--root", lab.root("sled1"), *create_args("xde0"))
        stray = Path(lab.root("sled2")) / "not-xde"
        stray.mkdir(parents=True)
        sh("umount", sled1)
        yield lab, stray
    finally:
        for p in (Path(lab.root("sled2")) / "not-xde", Path(lab.root("sled2"))):
            if p.exists():
                p.rmdir()
        lab.down(quiet=True)


def test_down_goes_past_broken_pieces_and_a_second_run_finishes(broken_lab):
    lab, stray = broken_lab
    p = lab_cli(lab.prefix, "down")
    assert p.returncode == 1, p
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"xdectl: could not unload {lab.root('sled2')}:"), lines
    # everything else is gone: the stale namespace's pins, every namespace
    assert not Path(lab.root("sled1")).exists()
    assert [h for h in HOSTS if os.path.lexists(f"/run/netns/{lab.ns(h)}")] == []
    # a second run reports the same piece, and nothing new
    again = lab_cli(lab.prefix, "down")
    assert again.returncode == 1 and again.stderr == p.stderr
    stray.rmdir()
    last = lab_cli(lab.prefix, "down")
    assert last.returncode == 0 and last.stderr == "", last
    assert not Path(lab.root("sled2")).exists()


def test_bad_prefix_is_one_line():
    p = lab_cli("Bad/prefix", "down")
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p


def test_unload_force_goes_past_a_foreign_pin():
    """unload --force detaches and deletes everything it made even when the
    root also holds something else; it names that in one line."""
    from netns import Root, underlay_host
    hv, far = underlay_host("ud")
    root = Root(hv)
    stray = root.path / "not-xde"
    try:
        root.xdectl(*create_args("xde0"))
        stray.mkdir()
        p = root.xdectl("unload", "--force", check=False)
        assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p
        assert p.stderr.startswith(f"xdectl: could not remove the pins under {root}:"), p.stderr
        assert not hv.has_link("xde0") and not hv.has_link("xde0_dp")
        assert hv.xdp_prog_id("u1") is None and hv.xdp_prog_id("u2") is None
        assert sorted(root.pins()) == ["not-xde"]
        stray.rmdir()
        root.xdectl("unload", "--force")
        assert not root.exists()
    finally:
        if stray.exists():
            stray.rmdir()
        root.cleanup()
        hv.delete()
        far.delete()
