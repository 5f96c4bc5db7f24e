"""builder/verify/runner.py ``sidecar_late``: when verify stops waiting for a sidecar
that consul has been ready for a while (a fenced sidecar would otherwise be waited out)."""

from __future__ import annotations

import pytest

from builder.verify.runner import SIDECAR_GRACE, SIDECAR_UNIT, sidecar_late


def states(consul: str, since_s: float, sidecar: str, now_s: float) -> dict[str, dict[str, str]]:
    return {
        "consul.service": {
            "ActiveState": consul,
            "ActiveEnterTimestampMonotonic": str(int(since_s * 1e6)),
        },
        SIDECAR_UNIT: {"ActiveState": sidecar, "SubState": "auto-restart", "NRestarts": "2"},
        "uptime": {"Seconds": str(now_s)},
    }


def test_a_sidecar_down_past_the_grace_after_consul_is_late() -> None:
    late = sidecar_late(states("active", 50.0, "activating", 50.0 + SIDECAR_GRACE + 1))
    assert late is not None
    assert SIDECAR_UNIT in late and "restarted 2 times" in late


@pytest.mark.parametrize(
    ("consul", "sidecar", "after"),
    [
        ("active", "activating", SIDECAR_GRACE - 1),  # still within the grace
        ("active", "active", SIDECAR_GRACE + 60),  # the sidecar came up
        ("activating", "activating", SIDECAR_GRACE + 60),  # the agent is not ready yet
    ],
)
def test_a_sidecar_that_may_still_come_up_is_not_late(
    consul: str, sidecar: str, after: float
) -> None:
    assert sidecar_late(states(consul, 50.0, sidecar, 50.0 + after)) is None
