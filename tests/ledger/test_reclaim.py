"""The reclaim controller: bounded steps, the cool-down, deflation at once, the host goal."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.ledger.advice import Advice, Pressure
from daemon.ledger.reclaim import AT_TARGET, Decision, ReclaimController, ReclaimPolicy

MiB = 1 << 20
GiB = 1 << 30
RAM = 4 * GiB
MARGIN = 205 * MiB
POLICY = ReclaimPolicy(step_bytes=128 * MiB, cooldown_seconds=30.0, host_target=0.8)


def advice(at: float, target: int | None, signals: tuple[str, ...] = ()) -> Advice:
    return Advice(
        at=at,
        target_bytes=target,
        expected_gain_bytes=0,
        current_bytes=None,
        floor_bytes=None,
        action="inflate",
        reasons=(),
        pressure=Pressure(signals=signals),
    )


def decide(
    c: ReclaimController,
    a: Advice | None,
    *,
    now: float,
    actual: int,
    available: int = 2 * GiB,
    host_use: float | None = 0.9,
    doom: bool = False,
    opted_out: bool = False,
) -> Decision:
    return c.decide(
        "vm",
        a,
        now=now,
        ram_bytes=RAM,
        actual_bytes=actual,
        available_bytes=available,
        margin_bytes=MARGIN,
        deflate_on_oom=doom,
        host_use=host_use,
        opted_out=opted_out,
    )


def test_inflates_by_at_most_a_step_towards_the_advice() -> None:
    c = ReclaimController(POLICY)
    d = decide(c, advice(1, 3 * GiB), now=1, actual=RAM)
    assert (d.action, d.reason, d.target_bytes) == ("inflate", "advice", RAM - 128 * MiB)
    assert d.inputs["advice_target_bytes"] == 3 * GiB


def test_holds_while_the_host_is_below_its_goal_and_for_opted_out_vms() -> None:
    c = ReclaimController(POLICY)
    assert decide(c, advice(1, 3 * GiB), now=1, actual=RAM, host_use=0.5).reason == (
        "host_below_target"
    )
    assert decide(c, advice(1, 3 * GiB), now=1, actual=RAM, host_use=None).action == "hold"
    assert decide(c, advice(1, 3 * GiB), now=1, actual=RAM, opted_out=True).reason == "opted_out"


def test_cooldown_and_fresh_advice_between_inflations() -> None:
    c = ReclaimController(POLICY)
    d = decide(c, advice(1, 3 * GiB), now=1, actual=RAM)
    c.done(d, 1)
    assert d.target_bytes is not None
    actual = d.target_bytes
    assert decide(c, advice(1, 3 * GiB), now=40, actual=actual).reason == "advice_not_newer"
    assert decide(c, advice(5, 3 * GiB), now=10, actual=actual).reason == "cooldown"
    assert decide(c, advice(5, 3 * GiB), now=31, actual=actual).action == "inflate"


def test_deflates_at_once_on_pressure_whatever_the_cooldown() -> None:
    c = ReclaimController(POLICY)
    c.done(decide(c, advice(1, 3 * GiB), now=1, actual=RAM), 1)
    d = decide(c, advice(2, RAM, ("swap_in",)), now=2, actual=3 * GiB)
    assert (d.action, d.reason, d.target_bytes) == ("deflate", "pressure", RAM)


def test_deflates_when_available_memory_falls_towards_the_margin() -> None:
    c = ReclaimController(POLICY)
    d = decide(c, advice(1, 3 * GiB), now=1, actual=3 * GiB, available=MARGIN + 10 * MiB)
    assert d.action == "deflate" and d.reason == "near_margin"
    assert d.target_bytes == 3 * GiB + MARGIN - 10 * MiB


def test_follows_a_deflate_on_oom_and_waits_long() -> None:
    c = ReclaimController(POLICY)
    d = decide(c, advice(1, 3 * GiB), now=1, actual=RAM, doom=True)
    c.done(d, 1)
    assert d.target_bytes is not None
    grown = d.target_bytes + 64 * MiB  # the guest let 64 MiB go on OOM
    oom = decide(c, advice(2, 3 * GiB), now=40, actual=grown, doom=True)
    assert (oom.action, oom.reason, oom.target_bytes) == ("deflate", "deflate_on_oom", grown)
    c.done(oom, 40)
    assert decide(c, advice(50, 3 * GiB), now=100, actual=grown, doom=True).reason == "cooldown"


def test_a_dry_run_never_counts_as_the_balloons_target() -> None:
    c = ReclaimController(POLICY)
    d = decide(c, advice(1, 3 * GiB), now=1, actual=RAM, doom=True)
    c.done(d, 1, applied=False)
    assert decide(c, advice(2, 3 * GiB), now=40, actual=RAM, doom=True).reason == "advice"


steps = st.lists(
    st.tuples(
        st.floats(min_value=0.5, max_value=60),  # seconds to the next cycle
        st.integers(min_value=GiB, max_value=RAM),  # advice target
        st.booleans(),  # pressure
        st.integers(min_value=0, max_value=RAM),  # available
        st.floats(min_value=0, max_value=1),  # host use
        st.integers(min_value=-64 * MiB, max_value=64 * MiB),  # the guest's own drift
    ),
    min_size=1,
    max_size=40,
)


@given(steps)
def test_never_exceeds_the_step_nor_violates_the_cooldown(
    run: list[tuple[float, int, bool, int, float, int]],
) -> None:
    c = ReclaimController(POLICY)
    now, actual = 0.0, RAM
    last_action: float | None = None
    for dt, target, pressed, available, host, drift in run:
        now += dt
        signals = ("alloc_stalls",) if pressed else ()
        d = decide(c, advice(now, target, signals), now=now, actual=actual, available=available,
                   host_use=host)  # fmt: skip
        if d.action == "inflate":
            assert d.target_bytes is not None
            assert 0 < actual - d.target_bytes <= POLICY.step_bytes
            assert d.target_bytes >= target
            assert not pressed and host > POLICY.host_target
            assert last_action is None or now - last_action >= POLICY.cooldown_seconds
        if d.action == "deflate":
            assert d.target_bytes is not None and d.target_bytes > actual - AT_TARGET
        if pressed and target > actual + AT_TARGET:
            assert d.action == "deflate"  # at once, whatever the cool-down
        if d.target_bytes is not None:
            c.done(d, now)
            last_action = now
            actual = d.target_bytes
        actual = max(GiB, min(RAM, actual + drift))
