"""Property tests: any sequence of operations leaves the allocator consistent."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.model import ENGINES, MIGRATE_MOVABLE, PAGE_USED, SimConfig, Simulation
from daemon.model.checks import check_invariants
from daemon.model.constants import MIGRATE_ISOLATE, PG_FREE_MASK

RAM_PAGES = 4096  # 16 MiB: small enough to check after every step, big enough for order 10

op = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 10), st.integers(0, 2), st.integers(0, 1)),
    st.tuples(st.just("free"), st.integers(0, 10_000), st.just(0), st.integers(0, 1)),
    st.tuples(st.just("alloc_at"), st.integers(0, RAM_PAGES - 1), st.integers(0, 10), st.just(0)),
    st.tuples(st.just("advance"), st.integers(1, 300), st.just(0), st.just(0)),
    st.tuples(st.just("drain"), st.just(0), st.just(0), st.integers(0, 1)),
    st.tuples(st.just("balloon"), st.integers(-20, 20), st.just(0), st.just(0)),
    st.tuples(st.just("move"), st.integers(0, RAM_PAGES - 1), st.integers(0, 2), st.just(0)),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    engine=st.sampled_from([*ENGINES, None]),
    order=st.integers(2, 10),
    ops=st.lists(op, max_size=80),
)
def test_any_operation_sequence_keeps_the_allocator_consistent(
    engine: str | None, order: int, ops: list[tuple[str, int, int, int]]
) -> None:
    sim = Simulation(
        SimConfig(
            ram_bytes=RAM_PAGES << 12,
            engine=engine,
            order=order,
            reserve=False,
            single_zone=True,
            keep_log=True,
        )
    )
    alloc = sim.alloc
    live: list[tuple[int, int]] = []
    t = 0.0
    for name, a, b, cpu in ops:
        if name == "alloc":
            pfn = sim.alloc_pages(a, b, cpu)
            if pfn >= 0:
                live.append((pfn, a))
        elif name == "free" and live:
            pfn, o = live.pop(a % len(live))
            sim.free_pages(pfn, o, cpu)
        elif name == "alloc_at":
            pfn = a & ~((1 << b) - 1)
            if alloc.alloc_at(pfn, b):
                live.append((pfn, b))
        elif name == "advance":
            t += a / 100
            sim.advance_to(t)
        elif name == "drain":
            alloc.drain_pages(cpu)
        elif name == "balloon":
            if a > 0:
                sim.balloon.inflate(a)
            else:
                sim.balloon.deflate(-a)
        elif name == "move" and alloc.migratetype_of(a) != MIGRATE_ISOLATE:
            alloc.move_freepages_block(a, b)
        check_invariants(alloc)

    # Pages are conserved: allocated + free + balloon = everything, each page counted once.
    free = int(alloc.expand_blocks(alloc.heads(PG_FREE_MASK)).sum())
    assert free == alloc.free_page_count()
    assert alloc.allocated_pages == sum(1 << o for _, o in live) + len(sim.balloon)
    states = sim.page_states()
    assert int((states != PAGE_USED).sum()) >= free - len(sim.balloon)

    # Every reported range is a naturally aligned block of at least the reporting order.
    min_order = 0 if engine == "perpage" else order
    for pfn, o, _ in sim.drain_log().reported:
        assert o >= min_order
        assert pfn % (1 << o) == 0
        assert pfn + (1 << o) <= RAM_PAGES


@settings(max_examples=40, deadline=None, derandomize=True)
@given(orders=st.lists(st.integers(0, 10), min_size=1, max_size=60))
def test_freeing_everything_restores_the_boot_layout(orders: list[int]) -> None:
    sim = Simulation(
        SimConfig(ram_bytes=RAM_PAGES << 12, engine=None, reserve=False, single_zone=True)
    )
    alloc = sim.alloc
    boot = alloc.free_pages_by_order().tolist()
    blocks = [(sim.alloc_pages(o, MIGRATE_MOVABLE), o) for o in orders]
    for pfn, o in reversed(blocks):
        if pfn >= 0:
            sim.free_pages(pfn, o)
    alloc.drain_all_pages()
    check_invariants(alloc)
    # Every block merged back: the free memory is whole max-order blocks again.
    assert alloc.free_pages_by_order().tolist() == boot
