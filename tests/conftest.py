"""Shared fixtures. End-to-end tests need root and a mounted bpffs; they
make their own namespaces and roots and remove them, even on failure."""
import os

import pytest

from netns import BPFFS, Netns, PassthroughLab, Root, underlay_host


@pytest.fixture(scope="session", autouse=True)
def _leave_nothing_behind():
    """Safety net: whatever a test or fixture failed to remove goes here.
    Roots first (unloaded from their namespace), then namespaces."""
    yield
    for root in list(Root.live):
        root.cleanup()
    for ns in list(Netns.live):
        ns.delete()


@pytest.fixture(scope="session")
def privileged():
    """End-to-end tests fail (not skip) without root and bpffs."""
    assert os.geteuid() == 0, "the end-to-end tests must run as root (sudo make test)"
    assert os.path.ismount(BPFFS), f"bpffs is not mounted on {BPFFS} (make setup mounts it)"


@pytest.fixture
def netns_factory(privileged):
    """Make namespaces for one test; all deleted at its end."""
    made = []

    def make(tag=""):
        ns = Netns(tag)
        made.append(ns)
        return ns
    yield make
    for ns in reversed(made):
        ns.delete()


@pytest.fixture
def host(privileged):
    """A fresh host namespace with underlays u1, u2 and a fresh root (not
    yet created: the first xdectl create loads it). Removed afterwards."""
    hv, far = underlay_host()
    root = Root(hv)
    yield hv, root
    root.cleanup()
    hv.delete()
    far.delete()


@pytest.fixture(scope="module")
def lab(privileged):
    """The seed's passthrough topology (see PassthroughLab), one per module."""
    lab = PassthroughLab()
    yield lab
    lab.close()
