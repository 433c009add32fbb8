"""Unit tests for the overlay's input parsing (router targets, bulk V2P)."""
import io

import pytest

from xdectl import overlay
from xdectl.errors import XdeError


@pytest.mark.parametrize("target,expected", [
    ("drop", (overlay.RT_DROP, "0.0.0.0", 0)),
    ("ig", (overlay.RT_IG, "0.0.0.0", 0)),
    ("ip4=10.0.0.9", (overlay.RT_IP4, "10.0.0.9", 32)),
    ("sub4=10.1.0.0/16", (overlay.RT_SUB4, "10.1.0.0", 16)),
])
def test_route_targets(target, expected):
    assert overlay.parse_target(target) == expected


@pytest.mark.parametrize("target", ["", "gw", "ip4=", "ip4=10.0.0.300", "sub4=10.1.0.1/16",
                                    "sub4=10.0.0.0/33", "ip6=fd00::1"])
def test_bad_route_targets(target):
    with pytest.raises(XdeError):
        overlay.parse_target(target)


def test_bulk_v2p_names_the_bad_line_and_writes_nothing(tmp_path):
    text = "10.0.0.1 a8:40:25:ff:00:01 fd00:1::1 10\n# comment\n10.0.0.2 zz:40:25:ff:00:02 fd00:2::1 10\n"
    # the root does not exist: a line error must be raised before it is touched
    with pytest.raises(XdeError, match=r"^line 3: VPC MAC"):
        overlay.load_v2p(str(tmp_path / "no-root"), io.StringIO(text))
    assert not (tmp_path / "no-root").exists()


def test_bulk_v2p_wrong_field_count():
    with pytest.raises(XdeError, match=r"^line 1: expected"):
        overlay.load_v2p("/nonexistent", io.StringIO("10.0.0.1 a8:40:25:ff:00:01 fd00:1::1\n"))
