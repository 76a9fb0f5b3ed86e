"""One VM's free lists through its guest agent, as a value or as a reason why not.

``AgentReader.read(ram_bytes)`` returns ``FreeLists`` or ``AgentProblem`` and never raises for
anything the guest or its agent does. It bounds its own time (``budget``), so a caller that runs
it as its own task never waits on a hung agent for longer than that; and a hung agent touches
nothing but this reader's socket (the VM's QMP monitor is another socket).

What it does per read: ``guest-info`` when not known (or older than ``info_ttl``),
``/proc/pagetypeinfo`` when asked, ``page_reporting_order`` when older than ``order_ttl``, and
last ``/proc/buddyinfo`` with ``/proc/meminfo``: opened together, read together (the agent
reads one right after the other) and closed together, so the split and MemFree are of the same
moment and the files cost three waves of round trips, not six. When the two disagree beyond the
slack (a reporting batch fell between them) they are read once more at once.

What is cached: the ``guest-info`` answer (``info_ttl``) and the reporting order (``order_ttl``:
it changes only when an administrator writes it or a reporting device registers); both are
dropped after any problem, so a restarted or reconfigured agent is seen afresh.

After a problem it waits before trying again, and until then answers at once with the same
``AgentProblem`` (``retry_at`` says until when):
- absent, timeout, bad reply, failed: exponential backoff from ``backoff_initial`` to
  ``backoff_max``, reset by a good read;
- blocked (guest-info lacks a ``guest-file-*`` command, or a call answered "disabled"): no retry
  loop; ``guest-info`` is asked again after ``blocked_recheck``;
- rejected (the guest's data failed validation): tried again on the next call; the files are
  small, and a guest that moves memory fast can fail the cross-check once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.agent.client import FILE_COMMANDS, AgentClient, AgentInfo
from daemon.agent.errors import (
    AgentError,
    AgentTimeout,
    CommandBlocked,
    CommandFailed,
    GuestDataRejected,
    ProblemKind,
)
from daemon.agent.freelists import FreeLists, build_free_lists
from daemon.agent.procfs import (
    BUDDYINFO,
    MAX_BYTES,
    MEMINFO,
    PAGETYPEINFO,
    REPORTING_ORDER,
    PageTypeInfo,
    decode,
    parse_pagetypeinfo,
    parse_reporting_order,
)
from daemon.agent.transport import AgentTransport

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentProblem:
    """Why there are no free lists from this VM's agent right now.

    ``kind``: absent, timeout, blocked, failed, bad-reply or rejected (``daemon.agent.errors``).
    ``reason``: one short human line. ``at``: epoch seconds of the attempt that found it.
    ``retry_at``: epoch seconds before which the reader makes no new attempt (== ``at`` when it
    tries again on the next call).
    """

    kind: ProblemKind
    reason: str
    at: float
    retry_at: float


@dataclass(frozen=True)
class ReaderConfig:
    """Timing of one VM's agent reads (seconds)."""

    command_timeout: float = 2.0
    budget: float = 8.0
    backoff_initial: float = 5.0
    backoff_max: float = 300.0
    blocked_recheck: float = 900.0
    info_ttl: float = 600.0
    order_ttl: float = 60.0
    pagetypeinfo: bool = False

    def __post_init__(self) -> None:
        if min(self.command_timeout, self.budget) <= 0:
            raise ValueError("timeouts and the budget must be positive")
        if not 0 <= self.backoff_initial <= self.backoff_max:
            raise ValueError("need 0 <= backoff_initial <= backoff_max")


@dataclass(frozen=True, slots=True)
class _Order:
    value: int | None
    problem: str | None
    read_at: float


class AgentReader:
    """Reads one VM's free lists through its agent; one ``read`` at a time (a second caller
    waits for the first). ``clock`` (monotonic) schedules; ``wall`` stamps results."""

    def __init__(
        self,
        transport: AgentTransport,
        config: ReaderConfig | None = None,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or ReaderConfig()
        self.transport = transport
        self.name = name
        self.client = AgentClient(transport, timeout=self.config.command_timeout)
        self._clock = clock
        self._wall = wall
        self._lock = asyncio.Lock()
        self._info: AgentInfo | None = None
        self._info_at = 0.0
        self._order: _Order | None = None
        self._held: AgentProblem | None = None
        self._hold_until = 0.0
        self._failures = 0

    @property
    def info(self) -> AgentInfo | None:
        """The last ``guest-info`` answer still trusted, if any."""
        return self._info

    async def read(self, ram_bytes: int) -> FreeLists | AgentProblem:
        """The guest's free lists now, or the problem that prevents it (see the module doc).
        ``ram_bytes``: the VM's RAM as the host knows it, the bound for every guest count."""
        if ram_bytes <= 0:
            raise ValueError(f"ram_bytes={ram_bytes}")
        async with self._lock:
            if self._held is not None and self._clock() < self._hold_until:
                return self._held
            at = self._wall()
            try:
                async with asyncio.timeout(self.config.budget):
                    result = await self._read(ram_bytes)
            except AgentError as exc:
                return await self._problem(exc, at)
            except TimeoutError:
                timeout = AgentTimeout(f"the read took longer than {self.config.budget:g} s")
                return await self._problem(timeout, at)
            if self._held is not None:
                log.info("%s: agent reads work again (after: %s)", self.name, self._held.reason)
            self._held = None
            self._failures = 0
            return result

    async def close(self) -> None:
        await self.transport.close()

    async def _problem(self, exc: AgentError, at: float) -> AgentProblem:
        cfg = self.config
        if exc.kind == "rejected":
            hold = 0.0
        elif exc.kind == "blocked":
            hold = cfg.blocked_recheck
        else:
            hold = min(cfg.backoff_max, cfg.backoff_initial * 2.0**self._failures)
            # Capped so that 2.0**failures never overflows, however long the agent is away.
            self._failures = min(self._failures + 1, 64)
        if exc.kind != "rejected":
            # The agent may come back restarted or reconfigured: ask it afresh.
            self._info = None
            self._order = None
            await self.transport.close()
        problem = AgentProblem(exc.kind, exc.reason, at, at + hold)
        if self._held is None or self._held.kind != problem.kind:
            log.info("%s: no free lists from the agent: %s", self.name, problem.reason)
        self._held = problem
        self._hold_until = self._clock() + hold
        return problem

    async def _agent_info(self) -> AgentInfo:
        now = self._clock()
        if self._info is None or now - self._info_at >= self.config.info_ttl:
            self._info = await self.client.info()
            self._info_at = now
        missing = self._info.unavailable(FILE_COMMANDS)
        if missing:
            raise CommandBlocked(
                missing[0],
                f"the agent does not allow {', '.join(missing)} (guest-info); "
                "RHEL-family agents block guest-file-* by default (--block-rpcs)",
            )
        return self._info

    async def _read_text(self, path: str) -> str:
        return decode(path, await self.client.read_file(path, limit=MAX_BYTES[path]))

    async def _read(self, ram_bytes: int) -> FreeLists:
        await self._agent_info()
        started = self._wall()
        problems: list[str] = []
        migratetypes: PageTypeInfo | None = None
        if self.config.pagetypeinfo:
            try:
                migratetypes = parse_pagetypeinfo(await self._read_text(PAGETYPEINFO))
            except (CommandFailed, GuestDataRejected) as exc:
                problems.append(f"pagetypeinfo not used: {exc.reason}")
        order = await self._reporting_order()
        if order.problem:
            problems.append(order.problem)
        split = functools.partial(
            self._split, ram_bytes, started, order.value, migratetypes, tuple(problems)
        )
        try:
            return await split()
        except GuestDataRejected as exc:
            if not exc.transient:
                raise
        # Memory moved between the two files (a reporting batch): once more, at once.
        return await split()

    async def _split(
        self,
        ram_bytes: int,
        started: float,
        reporting_order: int | None,
        migratetypes: PageTypeInfo | None,
        problems: tuple[str, ...],
    ) -> FreeLists:
        # Together, and last: the moment of the split is the moment of MemFree.
        buddyinfo, meminfo = await self.client.read_files(
            [(BUDDYINFO, MAX_BYTES[BUDDYINFO]), (MEMINFO, MAX_BYTES[MEMINFO])]
        )
        at = self._wall()
        return build_free_lists(
            buddyinfo=decode(BUDDYINFO, buddyinfo),
            meminfo=decode(MEMINFO, meminfo),
            ram_bytes=ram_bytes,
            at=at,
            span=at - started,
            reporting_order=reporting_order,
            migratetypes=migratetypes,
            problems=problems,
        )

    async def _reporting_order(self) -> _Order:
        now = self._clock()
        if self._order is not None and now - self._order.read_at < self.config.order_ttl:
            return self._order
        try:
            order = _Order(parse_reporting_order(await self._read_text(REPORTING_ORDER)), None, now)
        except CommandFailed as exc:
            # No such file: a kernel before 5.14 or without CONFIG_PAGE_REPORTING, or no sysfs.
            order = _Order(None, f"page_reporting_order unreadable: {exc.desc}", now)
        except GuestDataRejected as exc:
            order = _Order(None, exc.reason, now)
        self._order = order
        return order
