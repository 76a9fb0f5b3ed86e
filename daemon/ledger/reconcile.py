"""Reconciliation: the split of a guest's free memory by order, kept per VM while memory moves.

Which part of the guest's free memory free page reporting will return (``reportable``) and which
only a balloon gets back (``stranded``) depends on the order of the free blocks it sits in, and
the host cannot see that. A ``Reconciler`` keeps the guest's free memory as a *split* (free
pages per order, the guest's ``/proc/buddyinfo`` summed over zones) and moves it with what it
observes, in time order:

- a read of the guest's own free lists (through its agent) replaces it: ``source = "agent"``;
  the difference from what the split had become is the fit's residual;
- between such reads, and without an agent, the guest's free memory over time (guest stats)
  and what the host saw the guest allocate (refaults, first touches) are replayed into the
  allocator at the level of orders (``daemon.model.allocate`` / ``release``):
  ``source = "modelled"`` (touches the host sees before the stats show them wait a moment
  for the stats, rather than being taken for frees). Where freed memory merges to
  (``profile``) is learnt from the agent when there is one, and else from what reporting
  returned: upstream reports every free block at or above the reporting order within a few
  passes, so once a prediction's time has passed the reportable part is known to be what the
  host saw discarded, and the split is corrected to that (the residual says by how much it
  was off).

It also predicts what upstream reporting returns and when (2 s delay, capacity 32, a budget per
pass, at the guest's reporting order), holds the prediction against what the host then saw
discarded and turns the difference into the verdict on reporting: ``effective``, ``slow``,
``stalled`` or ``ineffective``, with the evidence.

Everything here takes plain values and returns plain values: times are epoch seconds, sizes
pages. The caller aligns the inputs in time (``Moment``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from daemon.model import (
    MAX_PAGE_ORDER,
    PAGE_REPORTING_DELAY,
    PAGE_SIZE,
    allocate,
    pageblock_order,
    release,
    upstream_report_time,
)

NR_ORDERS = MAX_PAGE_ORDER + 1
MiB_PAGES = (1 << 20) // PAGE_SIZE
Source = Literal["agent", "modelled"]
Verdict = Literal["effective", "slow", "stalled", "ineffective", "off", "unknown"]

PRIOR_REPORTABLE = 0.5  # share of freed memory that merges to the reporting order, untaught
PREDICT_MIN_PAGES = 8 * MiB_PAGES  # smaller frees are not worth a prediction
EFFECTIVE_SHARE = 0.8  # of the prediction, seen discarded in time
GRACE_SECONDS = 1.5  # after the predicted time: a scan or two, and whole-second stamps
INEFFECTIVE_PAGES = 64 * MiB_PAGES  # predicted and never discarded: reports have no effect
REPORT_PASS_SECONDS = 0.5  # a pass's own time, and QEMU's whole-second stamps
LEARN_RATE = 0.5  # weight of a new observation of where freed memory merges to


@dataclass(frozen=True)
class Moment:
    """The inputs of one moment, aligned by the caller.

    ``at`` is the guest stats' time (QEMU's ``last-update``); the host figures come from the
    scan nearest to it (``host_at``). ``absent_free_pages``: free guest memory the host no longer
    backs (reported, or never backed), at most ``free_pages``. ``discarded_pages``: the ledger's
    counter of reported memory the host held until it discarded it, only growing.
    ``allocated_pages``: what the host saw the guest touch since the previous moment
    (refaults and first touches), a lower bound of its allocations.
    """

    at: float
    free_pages: int
    host_at: float | None = None
    absent_free_pages: int = 0
    discarded_pages: int = 0
    allocated_pages: int = 0
    reporting: bool = True  # free page reporting is negotiated on the device


@dataclass(frozen=True)
class AgentSplit:
    """The guest's own free lists (``/proc/buddyinfo`` through its agent), as plain values."""

    at: float
    by_order_pages: tuple[int, ...]
    reporting_order: int | None  # None: not read; MAX_PAGE_ORDER + 1: no reporting device


@dataclass(frozen=True)
class FreeState:
    """What the reconciliation knows of the guest's free memory at ``at`` (published)."""

    at: float
    source: Source
    by_order_pages: tuple[int, ...]  # sums to the guest's free memory at ``at``
    reporting_order: int  # MAX_PAGE_ORDER + 1 when nothing is reportable
    residual_pages: int | None  # how far the split was off at its last check
    residual_at: float | None
    agent_skew_seconds: float | None  # agent read minus stats time, when the agent was used
    pending_pages: int  # free at or above the reporting order and still backed by the host
    pending_since: float | None  # when that memory was freed (upstream's notification)
    report_due_at: float | None  # when upstream will have reported it, predicted
    verdict: Verdict
    evidence: str | None

    @property
    def reportable_order_pages(self) -> int:
        return sum(self.by_order_pages[self.reporting_order :])


@dataclass
class _Prediction:
    made_at: float | None  # None: still gathering small frees
    freed_at: float
    pages: int  # expected to be discarded
    due_at: float
    discarded_at_start: int  # the host's counter before the free
    burst: int  # the largest rise of free memory from one moment to the next in it
    seen_at_due: int | None = None  # discarded by the due time, when that fell short


@dataclass
class Reconciler:
    """The reconciliation state of one VM (see the module docstring): about a hundred bytes of
    numbers, whatever the guest's size."""

    reporting_order: int = pageblock_order
    split: list[int] | None = None
    at: float | None = None
    source: Source = "modelled"
    residual_pages: int | None = None
    residual_at: float | None = None
    agent_skew: float | None = None
    reportable_share: float = PRIOR_REPORTABLE
    alloc_order: int = 0
    verdict: Verdict = "unknown"
    evidence: str | None = None
    ever_discarded: bool = False
    _prediction: _Prediction | None = field(default=None, repr=False)
    _discarded_before: int = 0  # the host's counter at the previous moment
    _freed_since_fit: int = 0
    _grown_big: int = 0  # freed at or above the reporting order at the last moment
    _discarded_at_fit: int = 0
    _last_agent_at: float | None = None
    _pending_since: float | None = None
    # (stats time, pages) that frees added at or above the reporting order, for as long as
    # upstream may not have reported them yet: a fit must not count them as stranded.
    _recent_big: list[tuple[float, int]] = field(default_factory=list, repr=False)
    # Pages the host saw the guest touch that its stats did not show yet (see _replay).
    _touched_ahead: int = 0

    # -- observing ------------------------------------------------------------------------------

    def observe(self, moment: Moment, agent: AgentSplit | None = None) -> FreeState:
        """Move the split to ``moment`` (and to the agent's read, when it is new) and judge."""
        if moment.discarded_pages > 0:
            self.ever_discarded = True
        previous = list(self.split) if self.split is not None else None
        previous_at = self.at
        self._grown_big = 0
        if self.split is None or self.at is None or moment.at > self.at:
            self._replay(moment)
        if agent is not None and agent.at != self._last_agent_at:
            self._from_agent(agent, moment, previous)
        if moment.reporting and self.reporting_order <= MAX_PAGE_ORDER:
            self._judge(moment)  # a prediction that came due first, then what is new
            self._predict(moment, previous, previous_at)
        else:
            self._prediction = None
            self.verdict, self.evidence = "off", "free page reporting is not negotiated"
        self._discarded_before = moment.discarded_pages
        return self._state(moment)

    def _from_agent(self, agent: AgentSplit, moment: Moment, previous: list[int] | None) -> None:
        """The guest's own split replaces the replayed one; how far that was off at or above
        the reporting order is the residual, and where the freed memory went is learnt."""
        split = _scaled(agent.by_order_pages, moment.free_pages)
        if previous is not None and self.split is not None:
            order = self.reporting_order
            self.residual_pages = abs(sum(self.split[order:]) - sum(split[order:]))
            self.residual_at = moment.at
            self._learn_from(previous, split)
            order = min(self.reporting_order, NR_ORDERS)
            self._grown_big = max(0, sum(split[order:]) - sum(previous[order:]))
        if agent.reporting_order is not None:
            self.reporting_order = agent.reporting_order
        self.split, self.at, self.source = split, moment.at, "agent"
        self._touched_ahead = 0  # the guest's own read has them
        self.agent_skew = agent.at - moment.at
        self._last_agent_at = agent.at

    def _replay(self, moment: Moment) -> None:
        """Replay what changed since the last moment into the split."""
        free = moment.free_pages
        if self.split is None:
            # Nothing known yet: assume reporting has caught up, as it has within half a minute
            # of the guest's last free. What the host no longer backs is in big blocks (reporting
            # returned it, or the guest never touched it); the rest is below the reporting
            # order. The first prediction that comes due corrects it.
            big = min(free, moment.absent_free_pages)
            small = [0.0] * NR_ORDERS
            for o in range(min(self.reporting_order, NR_ORDERS)):
                small[o] = 1.0
            self.split = release([0] * NR_ORDERS, big, _big_profile(self.reporting_order))
            self.split = release(self.split, free - big, small if any(small) else [1.0])
            self.at, self.source = moment.at, "modelled"
            return
        change = free - sum(self.split)
        # The host scans between the guest's stats pushes, so it can see an allocation a push
        # before the stats do: touches beyond what free memory fell by wait a moment for the
        # stats. What the next push still does not show was touched and freed again (a busy
        # guest does both at once): a free, one moment late. Counted at once, a lagging push
        # would look like a free, and teach the fit that freed memory is rarely reported.
        drop = max(0, -change)
        carried = self._touched_ahead
        shown = min(carried, drop)
        touched_now = min(moment.allocated_pages, drop - shown)
        self._touched_ahead = moment.allocated_pages - touched_now
        touched = carried + touched_now  # the carried part not shown now: touched, then freed
        allocated = max(touched, drop)
        freed = allocated + change
        # What the host saw the guest touch came from free memory it did not back: reported
        # or never-touched blocks, at or above the reporting order. The rest of the guest's
        # allocations reused resident free memory, smallest blocks first.
        from_big = min(touched, allocated)
        split = _take_from_large(self.split, from_big, self.reporting_order)
        if allocated > from_big:
            split = allocate(split, allocated - from_big, self.alloc_order)
        if freed > 0:
            before = sum(split[self.reporting_order :])
            split = release(split, freed, self._profile())
            self._freed_since_fit += freed
            self._grown_big = sum(split[self.reporting_order :]) - before
            if self._grown_big > 0:
                keep = moment.at - 2 * PAGE_REPORTING_DELAY  # bounded between fits too
                self._recent_big = [r for r in self._recent_big if r[0] > keep]
                self._recent_big.append((moment.at, self._grown_big))
        # Allocation could not be served from orders at or above alloc_order: whatever is left
        # below it must go too, so the split never claims more than the guest has free.
        split = _scaled(split, free)
        # Host-absent free memory is in blocks at least as large as what reported them, and so
        # is what frees added there too recently for upstream to have reported it yet: in a
        # guest that allocates and frees at once, free memory stays level and only this says
        # that some of it waits for a report.
        unreported = min(free - moment.absent_free_pages, self._unreported_recent(moment))
        split = _hold_at_least(
            split, moment.absent_free_pages + max(0, unreported), self.reporting_order
        )
        if self.source == "agent" and (change or allocated):
            self.source = "modelled"  # moved on from the agent's read
        self.split, self.at = split, moment.at

    def _profile(self) -> list[float]:
        """Where freed memory merges to: ``reportable_share`` of it at or above the reporting
        order (mostly the largest), the rest spread over the smaller orders by page count."""
        order = min(self.reporting_order, NR_ORDERS)
        profile = [0.0] * NR_ORDERS
        if order < NR_ORDERS:
            big = _big_profile(order)
            for o in range(order, NR_ORDERS):
                profile[o] = self.reportable_share * big[o]
        small = 1.0 - (self.reportable_share if order < NR_ORDERS else 0.0)
        for o in range(order):
            profile[o] = small / order
        return profile

    def _learn_from(self, predicted: Sequence[int], observed: Sequence[int]) -> None:
        """Learn where freed memory merges to from an agent read of the split it predicted."""
        order = min(self.reporting_order, NR_ORDERS)
        gained = [max(0, o - p) for p, o in zip(predicted, observed, strict=True)]
        lost = [max(0, p - o) for p, o in zip(predicted, observed, strict=True)]
        if sum(gained) >= PREDICT_MIN_PAGES:
            share = sum(gained[order:]) / sum(gained)
            self.reportable_share += LEARN_RATE * (share - self.reportable_share)
        lost_small, lost_big = sum(lost[:order]), sum(lost[order:])
        if lost_big > 2 * lost_small and lost_big >= PREDICT_MIN_PAGES:
            self.alloc_order = pageblock_order  # the guest allocates huge pages
        elif lost_small > 2 * lost_big and lost_small >= PREDICT_MIN_PAGES:
            self.alloc_order = 0

    # -- predicting and judging ----------------------------------------------------------------

    def pending_pages(self, moment: Moment) -> int:
        """Free at or above the reporting order and still backed by the host."""
        if self.split is None or self.reporting_order > MAX_PAGE_ORDER:
            return 0
        resident_free = moment.free_pages - moment.absent_free_pages
        big = sum(self.split[self.reporting_order :])
        return max(0, min(resident_free, big - moment.absent_free_pages))

    def _predict(
        self, moment: Moment, previous: list[int] | None, previous_at: float | None
    ) -> None:
        """A prediction of what upstream reports, once the guest freed memory at or above the
        reporting order: what frees added there (reported since or not, so a report faster than
        the stats still counts), summed over moments until it is worth a prediction."""
        assert self.split is not None
        if self.pending_pages(moment) <= 0:
            self._pending_since = None
        if previous is None:
            return
        # Only what frees added counts: big blocks the host saw reported were there already.
        grown = self._grown_big
        rise = sum(self.split) - sum(previous)
        if grown <= 0:
            return
        freed_at = moment.at - _half_interval(moment, previous_at)
        if self._pending_since is None:
            self._pending_since = freed_at  # upstream was notified then
        p = self._prediction
        if p is not None and p.made_at is not None:
            # More freed before the first was reported: one prediction for both. Upstream is
            # asked again by these frees, so it reports them a pass after them.
            p.pages += grown
            p.due_at = max(p.due_at, freed_at + self._report_seconds(p.pages))
            p.burst = max(p.burst, rise)
            return
        if p is None:  # a first small free: gather until there is enough to judge
            p = self._prediction = _Prediction(
                made_at=None,
                freed_at=freed_at,
                pages=0,
                due_at=freed_at,
                discarded_at_start=self._discarded_before,
                burst=0,
            )
        p.pages += grown
        p.burst = max(p.burst, rise)
        if p.pages >= PREDICT_MIN_PAGES:
            p.made_at = moment.at
            p.due_at = freed_at + self._report_seconds(p.pages)

    def _report_seconds(self, pending: int) -> float:
        """Upstream's time to report ``pending`` pages, spread over the lists at or above the
        reporting order as the split has them (each list has its own budget)."""
        assert self.split is not None
        big = self.split[self.reporting_order :]
        total = sum(big) or 1
        seconds = PAGE_REPORTING_DELAY
        for offset, pages in enumerate(big):
            order = self.reporting_order + offset
            blocks = (pending * pages // total) >> order
            seconds = max(seconds, upstream_report_time(blocks, pages >> order))
        return seconds

    def _judge(self, moment: Moment) -> None:
        """Hold a prediction that came due against what the host saw discarded."""
        p = self._prediction
        if p is None or p.made_at is None or moment.host_at is None:
            return
        if moment.host_at < p.due_at + GRACE_SECONDS:
            return
        seen = max(0, moment.discarded_pages - p.discarded_at_start)
        if seen < EFFECTIVE_SHARE * p.pages:
            # Less than predicted: look again two passes later. Reporting is slow if discards
            # still arrive then; if not, the model put more of the freed memory in large blocks
            # than the guest did (or, with nothing at all, it stalled or has no effect).
            if p.seen_at_due is None:
                p.seen_at_due = seen
                return
            if moment.host_at < p.due_at + GRACE_SECONDS + 2 * PAGE_REPORTING_DELAY:
                return
        mib = MiB_PAGES
        text = (
            f"predicted {p.pages // mib} MiB reported {p.due_at - p.freed_at:.0f} s after the "
            f"guest freed it; the host saw {seen // mib} MiB discarded by "
            f"{moment.host_at - p.freed_at:.0f} s"
        )
        agent = self.source == "agent"
        if seen >= EFFECTIVE_SHARE * p.pages:
            self.verdict = "effective"
        elif seen > 0:
            late = p.seen_at_due is not None and seen > p.seen_at_due
            self.verdict = "slow" if late and agent else "effective"
            if not (late and agent):
                text += " (all the guest had in large blocks: fewer than modelled)"
        elif agent and self.ever_discarded:
            self.verdict = "stalled"
        elif self.ever_discarded:
            # Without the guest's own free lists, nothing reported tells no more than that the
            # freed memory was not in large blocks; reporting has worked before.
            text += (
                ": fewer large blocks than modelled, or reporting stalled (the guest's agent "
                "would tell which)"
            )
        elif (agent and p.pages >= INEFFECTIVE_PAGES) or p.burst >= INEFFECTIVE_PAGES:
            # The guest had large free blocks (its agent says so, or it freed that much at
            # once, which merges) and the host has never discarded anything.
            self.verdict = "ineffective"
            text += (
                ": reports are acknowledged without effect (VFIO passthrough, page poisoning, "
                "postcopy) or reporting is not running"
            )
        else:
            self.verdict = "unknown"
        self.evidence = text
        self._prediction = None
        if not agent and self.verdict != "ineffective":
            self._fit_to_reporting(moment)

    def _fit_to_reporting(self, moment: Moment) -> None:
        """Reporting has had its time: what is left at or above the reporting order is what the
        host already discarded. Correct the split to that, and learn from how far it was off
        which share of freed memory reaches the reporting order."""
        assert self.split is not None
        order = self.reporting_order
        big_now = sum(self.split[order:])
        observed_big = min(moment.free_pages, moment.absent_free_pages)
        self.residual_pages, self.residual_at = abs(big_now - observed_big), moment.at
        freed, self._freed_since_fit = self._freed_since_fit, 0
        discarded = moment.discarded_pages - self._discarded_at_fit
        self._discarded_at_fit = moment.discarded_pages
        if freed >= PREDICT_MIN_PAGES:
            share = min(1.0, max(0.0, discarded / freed))
            self.reportable_share += LEARN_RATE * (share - self.reportable_share)
        pending = self._unreported_recent(moment)
        self.split = _hold_at_most(
            self.split, min(big_now, observed_big + pending, moment.free_pages), order
        )

    def _unreported_recent(self, moment: Moment) -> int:
        """What frees added at or above the reporting order since the host's scan less the
        reporting delay: upstream waits that long after a free before it reports, so these
        blocks are large and still backed."""
        seen_at = moment.host_at if moment.host_at is not None else moment.at
        since = seen_at - PAGE_REPORTING_DELAY - REPORT_PASS_SECONDS
        self._recent_big = [(at, pages) for at, pages in self._recent_big if at > since]
        return sum(pages for _, pages in self._recent_big)

    def _state(self, moment: Moment) -> FreeState:
        assert self.split is not None and self.at is not None
        p = self._prediction
        return FreeState(
            at=self.at,
            source=self.source,
            by_order_pages=tuple(self.split),
            reporting_order=self.reporting_order,
            residual_pages=self.residual_pages,
            residual_at=self.residual_at,
            agent_skew_seconds=self.agent_skew if self.source == "agent" else None,
            pending_pages=self.pending_pages(moment),
            pending_since=self._pending_since,
            report_due_at=p.due_at if p is not None and p.made_at is not None else None,
            verdict=self.verdict,
            evidence=self.evidence,
        )


# -- split arithmetic ------------------------------------------------------------------------


def _big_profile(order: int) -> list[float]:
    """Freed memory that reaches the reporting order mostly merges on to the largest order."""
    profile = [0.0] * NR_ORDERS
    if order > MAX_PAGE_ORDER:
        profile[MAX_PAGE_ORDER] = 1.0
        return profile
    if order == MAX_PAGE_ORDER:
        profile[order] = 1.0
        return profile
    profile[MAX_PAGE_ORDER] = 0.9
    for o in range(order, MAX_PAGE_ORDER):
        profile[o] = 0.1 / (MAX_PAGE_ORDER - order)
    return profile


def _scaled(split: Sequence[int], total: int) -> list[int]:
    """``split`` made to sum to ``total`` pages, each order in proportion: the split and the
    total are of moments a little apart, and nothing says which orders moved between."""
    out = [max(0, int(x)) for x in split][:NR_ORDERS]
    out += [0] * (NR_ORDERS - len(out))
    total = max(total, 0)
    have = sum(out)
    if have == total:
        return out
    if have == 0:
        return [total] + [0] * (NR_ORDERS - 1)
    scaled = [x * total // have for x in out]
    scaled[max(range(NR_ORDERS), key=lambda o: out[o])] += total - sum(scaled)
    return scaled


def _take_from_large(split: Sequence[int], pages: int, order: int) -> list[int]:
    """``pages`` taken from the orders at or above ``order``, the largest first (then below,
    should those not hold enough)."""
    out = [int(x) for x in split]
    order = min(order, MAX_PAGE_ORDER)
    for o in [*range(MAX_PAGE_ORDER, order - 1, -1), *range(order - 1, -1, -1)]:
        if pages <= 0:
            break
        take = min(out[o], pages)
        out[o] -= take
        pages -= take
    return out


def _hold_at_least(split: list[int], pages: int, order: int) -> list[int]:
    """At least ``pages`` at or above ``order``: moved up from the smaller orders."""
    order = min(order, MAX_PAGE_ORDER)
    short = pages - sum(split[order:])
    if short <= 0:
        return split
    out = list(split)
    for o in range(order):
        take = min(out[o], short)
        out[o] -= take
        short -= take
        out[MAX_PAGE_ORDER] += take
    return out


def _hold_at_most(split: list[int], pages: int, order: int) -> list[int]:
    """At most ``pages`` at or above ``order``: the rest moved down below it."""
    out = list(split)
    extra = sum(out[order:]) - pages
    for o in range(order, NR_ORDERS):
        if extra <= 0:
            break
        take = min(out[o], extra)
        out[o] -= take
        extra -= take
        out[max(order - 1, 0)] += take
    return out


def _half_interval(moment: Moment, last_at: float | None) -> float:
    """How long before ``moment.at`` a change first seen now probably happened: half-way
    between the previous stats push and this one (the guest pushes every few seconds), and
    QEMU stamps a push with the whole second it arrived in, so the push was half a second
    after its stamp on average."""
    if last_at is None:
        return 0.0
    return max(0.0, min(moment.at - last_at, 10.0) / 2 - 0.5)
