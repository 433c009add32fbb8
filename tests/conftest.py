"""Shared fixtures. End-to-end tests need root and a mounted bpffs; they
make their own namespaces and roots and remove them, even on failure.

Every test that does not ask for the `privileged` fixture (directly, through
another fixture, or by a module's `pytestmark`) is a unit test: marked
`unit`, so that `pytest -m unit` runs them without root in seconds."""
import os

import pytest

from netns import BPFFS, Netns, Root

# the session's overlay lab (xlab) and its helpers
pytest_plugins = ["lab_fixture"]


def pytest_collection_modifyitems(items):
    for item in items:
        if "privileged" not in item.fixturenames:
            item.add_marker(pytest.mark.unit)


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
