from __future__ import annotations

import pytest

from daemon.host.cadence import ScanCadence


def test_fast_while_changing_then_backs_off_to_idle() -> None:
    c = ScanCadence(budget=0.01, interval=1.0, idle_interval=2.0, backoff=1.5)
    assert c.next_interval(0.001, changed=True) == 1.0
    assert c.next_interval(0.001, changed=False) == 1.5
    assert c.next_interval(0.001, changed=False) == 2.0
    assert c.next_interval(0.001, changed=False) == 2.0
    assert c.next_interval(0.001, changed=True) == 1.0
    assert not c.budget_bound


def test_budget_bounds_the_cpu_share() -> None:
    c = ScanCadence(budget=0.01, interval=1.0, idle_interval=2.0, smoothing=1.0)
    # A scan costing 50 ms of CPU may run at most every 5 s on a 1% budget, even while changing.
    assert c.next_interval(0.05, changed=True) == pytest.approx(5.0)
    assert c.budget_bound
    # Whatever the sequence, scan cost / interval never exceeds the budget.
    for cost in (0.02, 0.2, 0.001, 0.5):
        interval = c.next_interval(cost, changed=True)
        assert cost / interval <= 0.01 + 1e-12


def test_cost_is_smoothed() -> None:
    c = ScanCadence(budget=0.1, interval=0.1, idle_interval=1.0, smoothing=0.5)
    c.next_interval(0.1, changed=True)
    # One cheap scan halves the estimate rather than dropping it: 0.05 CPU-s / 0.1 = 0.5 s.
    assert c.next_interval(0.0, changed=True) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs", [{"budget": 0}, {"interval": 0}, {"interval": 3.0, "idle_interval": 2.0}]
)
def test_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ScanCadence(**kwargs)
