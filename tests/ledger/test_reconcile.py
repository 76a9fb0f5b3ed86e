"""The reconciled free split: from the agent, replayed without one, predictions and verdicts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.ledger.reconcile import AgentSplit, Moment, Reconciler

MiB = 256  # pages
T0 = 1_000_000.0


def moment(at: float, free: int, absent: int = 0, discarded: int = 0, **kw: object) -> Moment:
    return Moment(
        at=T0 + at,
        free_pages=free,
        host_at=T0 + at,
        absent_free_pages=absent,
        discarded_pages=discarded,
        **kw,  # type: ignore[arg-type]
    )


def test_an_agent_read_replaces_the_split_and_states_the_residual() -> None:
    r = Reconciler()
    first = AgentSplit(T0, tuple([100] * 9 + [512, 1024 * 3]), 9)
    state = r.observe(moment(0, sum(first.by_order_pages)), first)
    assert state.source == "agent" and state.by_order_pages == first.by_order_pages
    assert state.agent_skew_seconds == 0.0 and state.residual_pages is None
    # Two seconds on: the guest freed 100 MiB more, the agent says it is all at order 10.
    second = AgentSplit(
        T0 + 2.2, (*first.by_order_pages[:10], first.by_order_pages[10] + 100 * MiB), 9
    )
    state = r.observe(moment(2, sum(second.by_order_pages)), second)
    assert state.by_order_pages == second.by_order_pages
    # Replayed without the agent, the 100 MiB freed went half to order 10 (the untaught prior):
    # the residual is the other half, and the share is learnt from the agent's read.
    assert state.residual_pages is not None
    assert abs(state.residual_pages - 50 * MiB) <= 4 * MiB  # less a block per order of rounding
    assert abs(state.agent_skew_seconds - 0.2) < 1e-6  # type: ignore[operator]
    assert r.reportable_share > 0.5  # it learnt that freed memory merges to order 10


def test_the_agents_split_is_scaled_to_the_guest_free_memory_of_the_moment() -> None:
    r = Reconciler()
    agent = AgentSplit(T0, tuple([1000] + [0] * 9 + [9000]), 9)
    state = r.observe(moment(0, 8000), agent)  # the stats say less is free
    assert sum(state.by_order_pages) == 8000
    # In proportion: the read and the stats are moments apart, and either order may have moved.
    assert state.by_order_pages[0] == 800 and state.by_order_pages[10] == 7200


def test_without_an_agent_frees_are_predicted_reported_and_the_split_corrected() -> None:
    r = Reconciler()
    state = r.observe(moment(0, 100 * MiB, absent=40 * MiB, discarded=40 * MiB))
    assert state.source == "modelled" and sum(state.by_order_pages) == 100 * MiB
    # The guest frees 200 MiB in large blocks; upstream will report it 2 s after.
    state = r.observe(moment(2, 300 * MiB, absent=40 * MiB, discarded=40 * MiB))
    assert state.pending_pages > 0 and state.report_due_at is not None
    assert state.pending_since == T0 + 1.5  # half-way between the two pushes (stamped late)
    assert state.report_due_at - state.pending_since == 2.0  # one pass suffices
    # The host sees all of it discarded: reporting is effective, and what is left at or above
    # the reporting order is what the host has back.
    state = r.observe(moment(5, 300 * MiB, absent=240 * MiB, discarded=240 * MiB))
    assert state.verdict == "effective", state.evidence
    assert "predicted" in (state.evidence or "")
    assert state.pending_pages == 0
    assert sum(state.by_order_pages[9:]) == 240 * MiB
    assert state.residual_pages is not None
    assert r.reportable_share > 0.5


def test_verdicts_from_prediction_against_observation() -> None:
    def run(*discards: int, ever: int = 0, agent: bool = False) -> str:
        """100 MiB free, then 300 MiB; the host's discards after 6, 9 and 12 s."""
        r = Reconciler(reportable_share=1.0)
        r.observe(moment(0, 100 * MiB, discarded=ever))
        split = AgentSplit(T0 + 2, tuple([25 * MiB] * 4 + [0] * 6 + [200 * MiB]), 9)
        r.observe(moment(2, 300 * MiB, discarded=ever), split if agent else None)
        verdict = "unknown"
        for at, seen in zip((6, 9, 12), discards, strict=False):
            state = r.observe(moment(at, 300 * MiB, absent=seen, discarded=ever + seen))
            verdict = state.verdict
        return verdict

    assert run(200 * MiB) == "effective"
    assert run(0, 0, ever=10 * MiB, agent=True) == "stalled"  # it used to work
    # Without the agent nothing reported may be frees in small blocks: no verdict from it.
    assert run(0, 0, ever=10 * MiB) == "unknown"
    assert run(0, 0) == "ineffective"  # never anything discarded: acknowledged without effect
    # Less than predicted, and nothing more after: the model had more in large blocks than
    # the guest; reporting returned what there was.
    assert run(50 * MiB, 50 * MiB, 50 * MiB) == "effective"
    # The guest's own split says 200 MiB are reportable; the host sees it trickle in late.
    assert run(50 * MiB, 100 * MiB, 150 * MiB, agent=True) == "slow"


def test_reporting_off_gives_no_prediction() -> None:
    r = Reconciler()
    r.observe(moment(0, 100 * MiB, reporting=False))
    state = r.observe(moment(2, 300 * MiB, reporting=False))
    assert state.verdict == "off" and state.report_due_at is None


def test_allocations_take_the_smallest_blocks_first() -> None:
    r = Reconciler()
    agent = AgentSplit(T0, tuple([10 * MiB] + [0] * 9 + [90 * MiB]), 9)
    r.observe(moment(0, 100 * MiB), agent)
    state = r.observe(moment(2, 95 * MiB))
    assert state.by_order_pages[0] == 5 * MiB and state.by_order_pages[10] == 90 * MiB
    assert state.source == "modelled"


moments = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=1 << 20),  # free pages
        st.integers(min_value=0, max_value=1 << 20),  # absent free pages
        st.integers(min_value=0, max_value=1 << 16),  # allocated pages seen by the host
        st.booleans(),  # an agent read comes with it
    ),
    min_size=1,
    max_size=30,
)


@given(moments, st.integers(min_value=0, max_value=2**31))
def test_the_fit_never_claims_more_free_memory_than_the_stats_show(
    steps: list[tuple[int, int, int, bool]], seed: int
) -> None:
    r = Reconciler()
    discarded = 0
    for i, (free, absent, allocated, with_agent) in enumerate(steps):
        absent = min(absent, free)
        discarded += absent // 7
        agent = None
        if with_agent:
            pages = [(seed >> o) % 64 << o for o in range(11)]
            agent = AgentSplit(T0 + 2 * i, tuple(pages), 9)
        state = r.observe(
            moment(2 * i, free, absent=absent, discarded=discarded, allocated_pages=allocated),
            agent,
        )
        assert sum(state.by_order_pages) == free
        assert all(x >= 0 for x in state.by_order_pages)
        assert 0 <= state.pending_pages <= free - absent


def test_a_fit_leaves_blocks_freed_within_the_reporting_delay_reportable() -> None:
    r = Reconciler()
    r.observe(moment(0, 100 * MiB, absent=40 * MiB, discarded=40 * MiB))
    r.observe(moment(2, 300 * MiB, absent=40 * MiB, discarded=40 * MiB))  # frees 200 MiB
    r.observe(moment(5, 300 * MiB, absent=240 * MiB, discarded=240 * MiB))  # all reported
    state = r.observe(moment(7, 380 * MiB, absent=240 * MiB, discarded=240 * MiB))  # 80 more
    big = sum(state.by_order_pages[9:]) - 240 * MiB
    assert big > 0 and state.report_due_at is not None
    # Those are reported too, and the guest has freed 80 MiB more since the last push: the fit
    # after the verdict holds what is large to what the host has back, but upstream reports
    # the new blocks only 2 s after they were freed, so they are pending, not stranded.
    absent = 240 * MiB + big
    state = r.observe(moment(10, 460 * MiB, absent=absent, discarded=absent))
    assert state.verdict == "effective", state.evidence
    assert state.pending_pages >= big // 2 > 0
    assert sum(state.by_order_pages[9:]) == absent + state.pending_pages


def test_touches_the_stats_show_a_push_later_are_not_frees() -> None:
    # The host sees the guest take 100 MiB of reported memory before the stats show free memory
    # fall: a moment later they do. Nothing was freed, so nothing new is pending.
    r = Reconciler()
    r.observe(moment(0, 200 * MiB, absent=150 * MiB, discarded=150 * MiB))
    state = r.observe(moment(2, 200 * MiB, absent=50 * MiB, allocated_pages=100 * MiB))
    assert state.report_due_at is None and r._freed_since_fit == 0
    state = r.observe(moment(4, 100 * MiB, absent=50 * MiB))
    assert sum(state.by_order_pages) == 100 * MiB
    assert state.report_due_at is None and r._freed_since_fit == 0
    # Touched and not shown by the next push either: the guest freed as much meanwhile.
    r.observe(moment(6, 100 * MiB, absent=30 * MiB, allocated_pages=20 * MiB))
    r.observe(moment(8, 100 * MiB, absent=30 * MiB))
    assert r._freed_since_fit == 20 * MiB


def test_a_guest_that_frees_as_much_as_it_takes_has_memory_pending_a_report() -> None:
    # Free memory stays level at 200 MiB: each moment the guest takes 20 MiB of reported memory
    # (the host sees it touched) and frees as much, which upstream reports a pass later. What
    # it freed in the last moment is still backed: pending, not stranded.
    r = Reconciler()
    r.observe(moment(0, 200 * MiB, absent=150 * MiB, discarded=150 * MiB))
    for step in range(1, 8):
        state = r.observe(
            moment(
                2 * step,
                200 * MiB,
                absent=130 * MiB,
                discarded=(150 + 20 * step) * MiB,
                allocated_pages=20 * MiB,
            )
        )
        assert state.pending_pages <= 200 * MiB - 130 * MiB
    assert 5 * MiB <= state.pending_pages <= 20 * MiB
