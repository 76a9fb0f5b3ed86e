"""Follow a LibvirtSource's events in the background and wait for the ones a test expects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from daemon.libvirt import LibvirtSource, SourceEvent

E = TypeVar("E", bound=SourceEvent)


class EventTap:
    """``async with EventTap(source) as tap: ... await tap.wait_for(Kind, pred, timeout)``.

    Every event is kept in ``seen``; ``wait_for`` returns the first one after its cursor that
    matches, and moves the cursor past it, so successive waits see events in order.
    """

    def __init__(self, source: LibvirtSource) -> None:
        self.source = source
        self.seen: list[SourceEvent] = []
        self._cursor = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _follow(self) -> None:
        async for event in self.source.events():
            self.seen.append(event)
            self._arrived.set()

    async def __aenter__(self) -> EventTap:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def skip_past(self) -> None:
        """Ignore everything seen so far."""
        self._cursor = len(self.seen)

    async def wait_for(
        self,
        kind: type[E],
        predicate: Callable[[E], bool] = lambda _: True,
        timeout: float = 30.0,
    ) -> E:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for i in range(self._cursor, len(self.seen)):
                        event = self.seen[i]
                        if isinstance(event, kind) and predicate(event):
                            self._cursor = i + 1
                            return event
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            recent = "\n  ".join(repr(e) for e in self.seen[self._cursor :][-15:])
            raise AssertionError(
                f"no {kind.__name__} matching within {timeout:g} s; since the cursor:\n  {recent}"
            ) from None
