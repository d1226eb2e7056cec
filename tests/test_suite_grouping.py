"""The suite's own scheduling: the load group holds under ``--dist loadgroup``, so the soak
and the churn test never run beside each other (tests/conftest.py mends the xdist tag)."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("load")
def test_a_grouped_test_carries_its_group_in_its_node_id(request: pytest.FixtureRequest) -> None:
    """xdist schedules by the ``@group`` suffix of the node id it is sent; without it the
    test is scheduled alone, beside anything."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run with --dist loadgroup")
    assert request.node.nodeid.endswith("@load"), request.node.nodeid
