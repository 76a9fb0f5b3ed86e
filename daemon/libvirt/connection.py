"""A supervised connection to one libvirt URI: typed events in, calls out, never blocking asyncio.

:class:`LibvirtSource` owns the connection to libvirtd (``qemu:///system`` by default) and keeps it:
it connects, registers for domain events and the close notification, turns on keepalive, takes a
snapshot of the domains (those running, and those defined but not running), and yields
``Connected``; when libvirtd goes away (close callback, keepalive, or a call that finds the
connection dead) it yields ``ConnectionLost``, reconnects with exponential backoff (capped at
``backoff_max``, 2 s by default, so it is back within that of libvirtd answering again), and yields
``Reconnected`` with a new snapshot. It never raises out of its supervisor: every failure is a state
and an event. The domains' QEMU processes do not depend on libvirtd, so a consumer keeps their VMs
(and their history) across a loss.

Where things run (see ``daemon.libvirt.eventloop`` for why):

- libvirt's event thread (one per process) runs libvirt's event loop and the callbacks; they
  only read the domain object they get and hand a typed event to asyncio with
  ``call_soon_threadsafe``. Nothing there calls libvirtd.
- a small thread pool (``workers``) runs every call that talks to libvirtd: ``open``, event
  (de)registration, ``setKeepAlive``, ``listAllDomains``, ``lookupByUUIDString``, ``XMLDesc``,
  ``info``, ``memoryStats``, ``setMemoryStatsPeriod``, ``setMemoryFlags``, ``qemuAgentCommand``,
  ``qemuMonitorCommand``, ``close``. Each is bounded by a timeout; a call that times out keeps its
  thread until libvirt gives up (keepalive closes a dead connection within ``keepalive_interval *
  (keepalive_count + 1)`` seconds), so a hung libvirtd exhausts the pool and later calls time out
  too instead of piling up.
- the asyncio loop runs the supervisor, the event queue and the callers.

Errors are those of ``daemon.libvirt.errors``; ``asyncio.CancelledError`` passes through.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

import libvirt
import libvirt_qemu

from daemon.libvirt.domxml import MAX_XML_CHARS, DomainFacts, DomainXMLError, parse_domain_xml
from daemon.libvirt.errors import (
    BadReply,
    CallTimeout,
    LibvirtSourceError,
    MonitorCommandFailed,
    NotConnected,
    from_libvirt_error,
    shorten,
)
from daemon.libvirt.eventloop import ensure_event_loop
from daemon.libvirt.events import (
    CALLBACKS,
    Builder,
    Connected,
    ConnectionLost,
    DomainRef,
    EventsDropped,
    Reconnected,
    SourceEvent,
    domain_ref,
)
from daemon.libvirt.pid import DEFAULT_STATE_DIR, find_qemu_pid
from daemon.libvirt.stats import LibvirtMemoryStats, parse_memory_stats

__all__ = [
    "DEFAULT_URI",
    "CallObserver",
    "DomainInfo",
    "LibvirtSource",
    "SourceState",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_URI: Final = "qemu:///system"
KiB: Final = 1024
#: A guest agent's reply is guest-controlled: no reclaimd command needs more than this.
MAX_AGENT_REPLY: Final = 1024 * 1024
#: The most of a QMP reply through libvirt that is read (as a direct QMP connection reads).
MAX_MONITOR_REPLY: Final = 1024 * 1024
_STATES: Final = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}

#: Called after every call to libvirtd with its name, duration (s) and outcome ("ok" or the
#: error's class name); for the daemon's own metrics.
CallObserver = Callable[[str, float, str], None]


class SourceState(enum.StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    CLOSED = "closed"


@dataclass(frozen=True)
class DomainInfo:
    """``virDomainGetInfo``: ``state`` (running, paused, shutoff...), ``max_memory_bytes`` (the
    domain's ``<memory>``: RAM including plugged DIMMs), ``memory_bytes`` (the balloon's current
    size as libvirt last learnt it), ``vcpus``, ``cpu_time_ns``."""

    state: str
    max_memory_bytes: int
    memory_bytes: int
    vcpus: int
    cpu_time_ns: int


class _Lost(Exception):
    """A call failed because the connection is dead (raised in a worker thread)."""

    def __init__(self, cause: libvirt.libvirtError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(eq=False)
class _Link:
    """One established connection and what belongs to it."""

    conn: libvirt.virConnect
    generation: int
    lost: asyncio.Future[str]
    domains: dict[str, libvirt.virDomain] = field(default_factory=dict)
    callback_ids: list[int] = field(default_factory=list)
    close_callback: bool = False


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half fixed, half random."""
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class LibvirtSource:
    """Every domain of one libvirt URI, as an async source of events plus calls.

    ::

        async with LibvirtSource("qemu:///system") as source:
            await source.wait_connected(10)
            async for event in source.events():
                ...   # Connected, LifecycleChanged, BalloonChanged, ConnectionLost, ...

    Calls take a domain's UUID and raise ``NotConnected`` while there is no connection.
    ``state_dir`` is where libvirt writes QEMU pid files (None: find QEMU through /proc only).
    """

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        call_timeout: float = 10.0,
        connect_timeout: float = 15.0,
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
        max_events: int = 10_000,
        workers: int = 4,
        state_dir: Path | None = DEFAULT_STATE_DIR,
        proc: Path = Path("/proc"),
        on_call: CallObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if call_timeout <= 0 or connect_timeout <= 0 or backoff_initial <= 0:
            raise ValueError("timeouts and backoff must be positive")
        if max_events < 1 or workers < 1:
            raise ValueError("max_events and workers must be at least 1")
        self.uri = uri
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self.state_dir = state_dir
        self.proc = proc
        self.on_call = on_call
        self.state = SourceState.IDLE
        #: Every state the source went through, oldest first (bounded).
        self.transitions: collections.deque[SourceState] = collections.deque(
            [SourceState.IDLE], maxlen=256
        )
        #: Why the last connection attempt failed or the last connection was lost.
        self.last_error: str | None = None
        self.events_dropped = 0
        self.reconnects = 0
        self._max_events = max_events
        self._rng = rng or random.Random()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="libvirt-call"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._link: _Link | None = None
        self._generation = 0
        self._queue: collections.deque[SourceEvent] = collections.deque()
        self._dropped_pending = 0
        self._wakeup = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._holding: list[SourceEvent] | None = None
        self._consuming = False
        self._closing = False
        self._stop = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the supervisor (connects in the background; see :meth:`wait_connected`)."""
        if self._task is not None:
            raise RuntimeError("LibvirtSource already started")
        if self._closing:
            raise RuntimeError("LibvirtSource is closed")
        ensure_event_loop()
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._supervise(), name=f"libvirt {self.uri}")

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; NotConnected (with the last error) after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while self.state != SourceState.CONNECTED:
                    if self.state == SourceState.CLOSED:
                        raise NotConnected(f"{self.uri}: closed")
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except TimeoutError:
            raise NotConnected(
                f"{self.uri}: not connected within {timeout:g} s: {self.last_error or 'no answer'}"
            ) from None

    async def close(self) -> None:
        """Stop reconnecting, close the connection, end :meth:`events`. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._stop.set()
        link = self._link
        if link is not None and not link.lost.done():
            link.lost.set_result("closed")
        if self._task is not None:
            # Let the supervisor close its connection itself; cancel it if that hangs.
            done, _ = await asyncio.wait({self._task}, timeout=self.call_timeout)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._link is not None:
            await self._teardown(self._link)
        self._set_state(SourceState.CLOSED)
        self._wakeup.set()
        # Without cancel_futures: a close still queued must run, or the connection leaks.
        self._pool.shutdown(wait=False)

    async def __aenter__(self) -> LibvirtSource:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.state == SourceState.CONNECTED

    # -- events ----------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[SourceEvent]:
        """Every event, in order, until :meth:`close`. One consumer at a time."""
        if self._consuming:
            raise RuntimeError("LibvirtSource.events() already has a consumer")
        self._consuming = True
        try:
            while True:
                if self._dropped_pending:
                    count, self._dropped_pending = self._dropped_pending, 0
                    yield EventsDropped(time.time(), count)
                    continue
                if self._queue:
                    yield self._queue.popleft()
                    continue
                if self.state == SourceState.CLOSED:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
        finally:
            self._consuming = False

    def _push(self, event: SourceEvent) -> None:
        if self._holding is not None:
            self._holding.append(event)
            return
        if len(self._queue) >= self._max_events:
            # Oldest first: the newest state is what matters.
            self._queue.popleft()
            self._dropped_pending += 1
            self.events_dropped += 1
        self._queue.append(event)
        self._wakeup.set()

    def _publish_snapshot(self, snapshot: Connected | Reconnected) -> None:
        """Queue the snapshot, then the events that arrived while it was taken."""
        held, self._holding = self._holding or [], None
        for event in (snapshot, *held):
            self._push(event)

    # Runs on libvirt's event thread: build the event there (it reads only the domain object),
    # deliver it on the asyncio loop.
    def _callback(
        self, generation: int, build: Builder, dom: libvirt.virDomain, *args: object
    ) -> None:
        try:
            event = build(time.time(), dom, *args)
        except Exception:
            log.exception("%s: cannot translate a libvirt event", self.uri)
            return
        if event is not None:
            self._threadsafe(self._deliver, generation, event)

    def _on_close_callback(self, _conn: libvirt.virConnect, reason: int, generation: int) -> None:
        names = {
            libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
            libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
            libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timed out",
            libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by this client",
        }
        self._threadsafe(self._mark_lost, generation, names.get(reason, f"closed ({reason})"))

    def _threadsafe(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, generation: int, event: SourceEvent) -> None:
        link = self._link
        if link is None or link.generation != generation or self._closing:
            return  # from a connection that is gone
        self._push(event)

    def _mark_lost(self, generation: int, reason: str) -> None:
        link = self._link
        if link is not None and link.generation == generation and not link.lost.done():
            link.lost.set_result(reason)

    # -- the supervisor --------------------------------------------------------------------------

    def _set_state(self, state: SourceState) -> None:
        if state != self.state:
            self.state = state
            self.transitions.append(state)
            self._state_changed.set()

    async def _supervise(self) -> None:
        attempt = 0
        lost_at: float | None = None
        ever_connected = False
        while not self._closing:
            self._set_state(SourceState.CONNECTING)
            link = await self._connect()
            if link is not None:
                attempt = 0
                outage = time.monotonic() - lost_at if lost_at is not None else 0.0
                snapshot = await self._snapshot(link)
                if snapshot is not None:
                    now = time.time()
                    running, defined = snapshot
                    if ever_connected:
                        self.reconnects += 1
                        self._publish_snapshot(Reconnected(now, self.uri, running, outage, defined))
                    else:
                        self._publish_snapshot(Connected(now, self.uri, running, defined))
                    ever_connected = True
                    self._set_state(SourceState.CONNECTED)
                    reason = await link.lost
                    if not self._closing:
                        self.last_error = reason
                        log.warning("%s: connection lost: %s", self.uri, reason)
                self._holding = None
                await self._teardown(link)
                if self._closing:
                    break
                if snapshot is not None:
                    lost_at = time.monotonic()
                    self._push(ConnectionLost(time.time(), self.uri, self.last_error or "lost"))
                    continue  # reconnect at once; back off only if that fails
            self._set_state(SourceState.BACKOFF)
            delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max, self._rng)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            attempt += 1

    async def _connect(self) -> _Link | None:
        """Open and set up a connection; None (``last_error`` set) when that failed."""
        assert self._loop is not None
        try:
            conn = await self._open()
        except LibvirtSourceError as exc:
            self.last_error = str(exc)
            return None
        self._generation += 1
        link = _Link(conn=conn, generation=self._generation, lost=self._loop.create_future())
        self._link = link
        if self._closing:
            await self._teardown(link)
            return None
        # Events that come before the snapshot wait for it.
        self._holding = []
        try:
            await self._in_pool("register events", lambda: self._register(link))
        except LibvirtSourceError as exc:
            self.last_error = f"cannot set up the connection: {exc}"
            self._holding = None
            await self._teardown(link)
            return None
        return link

    async def _open(self) -> libvirt.virConnect:
        # A connection that opens after we stopped waiting for it must be closed, not leaked.
        lock = threading.Lock()
        late: list[libvirt.virConnect] = []
        abandoned = False

        def open_() -> libvirt.virConnect:
            conn = libvirt.open(self.uri)
            with lock:
                if abandoned:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.close()
                else:
                    late.append(conn)
            return conn

        try:
            return await self._in_pool("open", open_, self.connect_timeout)
        except (CallTimeout, asyncio.CancelledError):
            with lock:
                abandoned = True
                leftover = late[:]
            for conn in leftover:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._in_pool("close", conn.close))
            raise

    def _register(self, link: _Link) -> None:
        # Worker thread.
        conn = link.conn
        generation = link.generation
        conn.registerCloseCallback(self._on_close_callback, generation)
        link.close_callback = True
        for name, build in CALLBACKS.items():
            event_id = getattr(libvirt, name, None)
            if type(event_id) is not int:
                continue  # this binding predates the event

            def trampoline(
                _conn: libvirt.virConnect,
                dom: libvirt.virDomain,
                *args: object,
                _b: Builder = build,
            ) -> None:
                # libvirt passes the opaque last; it is not an event argument.
                self._callback(generation, _b, dom, *args[:-1])

            try:
                link.callback_ids.append(
                    conn.domainEventRegisterAny(None, event_id, trampoline, None)
                )
            except libvirt.libvirtError as exc:
                if not conn.isAlive():
                    raise
                log.info("%s: libvirtd does not offer %s: %s", self.uri, name, exc)
        if self.keepalive_interval > 0:
            try:
                conn.setKeepAlive(self.keepalive_interval, self.keepalive_count)
            except libvirt.libvirtError as exc:
                # Local drivers (test:///) have no keepalive; the close callback still works.
                log.info("%s: no keepalive: %s", self.uri, exc)

    async def _snapshot(
        self, link: _Link
    ) -> tuple[tuple[DomainRef, ...], tuple[DomainRef, ...]] | None:
        try:
            return await self._call_on(link, "list domains", lambda: self._list_domains(link))
        except LibvirtSourceError as exc:
            self.last_error = f"cannot list the domains: {exc}"
            if not link.lost.done():
                link.lost.set_result(self.last_error)
            return None

    async def _teardown(self, link: _Link) -> None:
        if self._link is link:
            self._link = None

        def close() -> None:
            conn = link.conn
            for callback_id in link.callback_ids:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(callback_id)
            if link.close_callback:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

        link.callback_ids = []
        link.domains.clear()
        with contextlib.suppress(LibvirtSourceError):
            await self._in_pool("close", close, self.call_timeout)

    # -- running calls ---------------------------------------------------------------------------

    async def _in_pool(
        self, what: str, fn: Callable[[], T], timeout: float | None = None, *, agent: bool = False
    ) -> T:
        """Run ``fn`` in the pool with a timeout; libvirt's errors mapped, the cause kept
        (``agent``: ``fn`` runs a guest-agent command, see ``from_libvirt_error``)."""
        loop = asyncio.get_running_loop()
        limit = self.call_timeout if timeout is None else timeout
        started = time.monotonic()
        outcome = "ok"
        try:
            future = loop.run_in_executor(self._pool, fn)
        except RuntimeError as exc:  # the pool is shut down
            raise NotConnected(f"{what}: {self.uri}: closed") from exc
        try:
            async with asyncio.timeout(limit):
                return await future
        except TimeoutError:
            outcome = "CallTimeout"
            raise CallTimeout(what, limit) from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except libvirt.libvirtError as exc:
            error = from_libvirt_error(exc, what, agent=agent)
            outcome = type(error).__name__
            raise error from exc
        except _Lost as exc:
            outcome = "NotConnected"
            raise NotConnected(f"{what}: connection lost: {shorten(str(exc.cause))}") from exc.cause
        finally:
            if self.on_call is not None:
                self.on_call(what, time.monotonic() - started, outcome)

    async def _call_on(
        self,
        link: _Link,
        what: str,
        fn: Callable[[], T],
        timeout: float | None = None,
        *,
        agent: bool = False,
    ) -> T:
        def guarded() -> T:
            try:
                return fn()
            except libvirt.libvirtError as exc:
                # The error may be the connection dying under the call: say so.
                alive = 0
                with contextlib.suppress(libvirt.libvirtError):
                    alive = link.conn.isAlive()
                if alive != 1:
                    raise _Lost(exc) from exc
                raise

        try:
            return await self._in_pool(what, guarded, timeout, agent=agent)
        except NotConnected as exc:
            self._mark_lost(link.generation, str(exc))
            raise

    def _current(self, what: str) -> _Link:
        link = self._link
        if link is None or self.state != SourceState.CONNECTED or link.lost.done():
            raise NotConnected(
                f"{what}: not connected to {self.uri}: {self.last_error or 'not yet'}"
            )
        return link

    async def _domain_call(
        self,
        what: str,
        uuid: str,
        fn: Callable[[libvirt.virDomain], T],
        timeout: float | None = None,
        *,
        agent: bool = False,
    ) -> T:
        link = self._current(what)

        def call() -> T:
            dom = link.domains.get(uuid)
            if dom is None:
                dom = link.conn.lookupByUUIDString(uuid)
                link.domains[uuid] = dom
            try:
                return fn(dom)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    link.domains.pop(uuid, None)
                raise

        return await self._call_on(link, what, call, timeout, agent=agent)

    # -- calls -----------------------------------------------------------------------------------

    def _list_running(self, link: _Link) -> tuple[DomainRef, ...]:
        # Worker thread.
        found = link.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        refs = []
        for dom in found:
            ref = domain_ref(dom)
            link.domains[ref.uuid] = dom
            refs.append(ref)
        return tuple(sorted(refs, key=lambda r: (r.name, r.uuid)))

    async def list_running(self) -> tuple[DomainRef, ...]:
        """The running domains (``listAllDomains(ACTIVE)``), sorted by name."""
        link = self._current("list domains")
        return await self._call_on(link, "list domains", lambda: self._list_running(link))

    def _list_domains(self, link: _Link) -> tuple[tuple[DomainRef, ...], tuple[DomainRef, ...]]:
        # Worker thread. Every domain first, then the running ones: a domain that starts or
        # stops between the two calls is in the first and classed by the second, so only one
        # defined after the first call is missing, and its event follows the snapshot.
        every = [domain_ref(dom) for dom in link.conn.listAllDomains(0)]
        running = self._list_running(link)
        active = {r.uuid for r in running}
        defined = sorted(
            {r.uuid: DomainRef(r.uuid, r.name) for r in every if r.uuid not in active}.values(),
            key=lambda r: (r.name, r.uuid),
        )
        return running, tuple(defined)

    async def list_domains(self) -> tuple[tuple[DomainRef, ...], tuple[DomainRef, ...]]:
        """(running, defined but not running) domains, each sorted by name."""
        link = self._current("list domains")
        return await self._call_on(link, "list domains", lambda: self._list_domains(link))

    async def domain_xml(self, uuid: str, *, inactive: bool = False) -> str:
        """The domain's XML: live (default) or, with ``inactive``, as it will next boot."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        text: object = await self._domain_call("domain XML", uuid, lambda d: d.XMLDesc(flags))
        if not isinstance(text, str) or len(text) > MAX_XML_CHARS:
            raise BadReply(f"domain XML of {uuid}: not a string of at most {MAX_XML_CHARS} chars")
        return text

    async def domain_facts(self, uuid: str, *, inactive: bool = False) -> DomainFacts:
        """:meth:`domain_xml`, parsed (``BadReply`` when it cannot be used at all)."""
        text = await self.domain_xml(uuid, inactive=inactive)
        try:
            return parse_domain_xml(text)
        except DomainXMLError as exc:
            raise BadReply(f"domain XML of {uuid}: {exc}") from exc

    async def info(self, uuid: str) -> DomainInfo:
        """``virDomainGetInfo``: state, maximum and current memory, vCPUs, CPU time."""
        raw: object = await self._domain_call("domain info", uuid, lambda d: d.info())
        if (
            not isinstance(raw, list | tuple)
            or len(raw) < 5
            or not all(type(v) is int and v >= 0 for v in raw[:5])
        ):
            raise BadReply(f"domain info of {uuid}: not five counts: {str(raw)[:80]}")
        state, max_kib, kib, vcpus, cpu_ns = raw[:5]
        return DomainInfo(
            state=_STATES.get(state, f"unknown-{state}"),
            max_memory_bytes=max_kib * KiB,
            memory_bytes=kib * KiB,
            vcpus=vcpus,
            cpu_time_ns=cpu_ns,
        )

    async def memory_stats(
        self, uuid: str, *, ram_bytes: int | None = None, now: float | None = None
    ) -> LibvirtMemoryStats:
        """``virDomainMemoryStats``, parsed and checked (see ``daemon.libvirt.stats``).

        Each call makes libvirtd ask QEMU (``query-balloon`` and ``qom-get guest-stats``).
        Pass the domain's RAM (``info().max_memory_bytes``) as ``ram_bytes`` for the checks.
        """
        raw: object = await self._domain_call("memory stats", uuid, lambda d: d.memoryStats())
        return parse_memory_stats(raw, ram_bytes=ram_bytes, now=now)

    async def set_memory_stats_period(self, uuid: str, period: int) -> None:
        """Set the running balloon's guest-stats period in seconds (0 turns stats off)."""
        if not 0 <= period < 2**31:
            raise ValueError(f"stats period {period} s is out of range")
        await self._domain_call(
            "set stats period",
            uuid,
            lambda d: d.setMemoryStatsPeriod(period, libvirt.VIR_DOMAIN_AFFECT_LIVE),
        )

    async def set_balloon_target(self, uuid: str, target_bytes: int) -> None:
        """Ask the running domain's balloon for ``target_bytes`` of guest memory
        (``setMemoryFlags(KiB, AFFECT_LIVE)``; rounded down to whole KiB). The change shows as
        ``BalloonChanged`` events as the guest follows."""
        if not KiB <= target_bytes < 2**63:
            raise ValueError(f"balloon target {target_bytes} B is out of range")
        kib = target_bytes // KiB
        await self._domain_call(
            "set balloon",
            uuid,
            lambda d: d.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE),
        )

    async def qemu_pid(self, domain: DomainRef) -> int | None:
        """The pid of the domain's QEMU (see ``daemon.libvirt.pid``), or None. Needs no
        connection: it reads the host's files."""
        return await asyncio.to_thread(
            find_qemu_pid, domain.name, domain.uuid, state_dir=self.state_dir, proc=self.proc
        )

    async def agent_command(
        self,
        uuid: str,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: int = 5,
    ) -> object:
        """Run a guest-agent command through libvirt (``virDomainQemuAgentCommand``) and return
        its ``return`` value, which the guest controls: validate it.

        libvirt marks the domain tainted ("custom-ga-command", one line in the domain's log) the
        first time. Raises ``AgentUnavailable`` when the domain has no agent channel or no agent
        answers, ``AgentCommandFailed`` when the agent answers with an error.
        """
        if not 1 <= timeout <= 600:
            raise ValueError(f"agent timeout {timeout} s is out of range")
        message: dict[str, object] = {"execute": command}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        text = json.dumps(message)
        reply: object = await self._domain_call(
            "agent command",
            uuid,
            lambda d: libvirt_qemu.qemuAgentCommand(d, text, timeout, 0),
            timeout=timeout + self.call_timeout,
            agent=True,
        )
        parsed = _json_reply(reply, f"agent reply to {command}", MAX_AGENT_REPLY)
        if not isinstance(parsed, dict) or "return" not in parsed:
            raise BadReply(f"agent reply to {command}: no 'return': {shorten(str(reply), 120)}")
        return parsed["return"]

    async def monitor_command(
        self, uuid: str, command: str, arguments: Mapping[str, object] | None = None
    ) -> object:
        """Run a QMP command in the domain's QEMU through libvirt
        (``virDomainQemuMonitorCommand``) and return its ``return`` value.

        libvirt marks the domain tainted ("custom-monitor", in the domain's log) the first time,
        and supports no domain that reclaimd changes this way: send only commands that read.
        Raises ``MonitorCommandFailed`` when QEMU answers with an error, ``Unsupported`` where
        the driver has no QEMU monitor (``test:///``).
        """
        message: dict[str, object] = {"execute": command}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        text = json.dumps(message)
        reply: object = await self._domain_call(
            "monitor command", uuid, lambda d: libvirt_qemu.qemuMonitorCommand(d, text, 0)
        )
        parsed = _json_reply(reply, f"QMP reply to {command}", MAX_MONITOR_REPLY)
        if isinstance(parsed, dict) and isinstance(error := parsed.get("error"), dict):
            raise MonitorCommandFailed(
                command, str(error.get("class", "?")), str(error.get("desc", ""))
            )
        if not isinstance(parsed, dict) or "return" not in parsed:
            raise BadReply(f"QMP reply to {command}: no 'return': {shorten(str(reply), 120)}")
        return parsed["return"]


def _json_reply(reply: object, what: str, limit: int) -> object:
    """A JSON reply libvirt passed on from the guest agent or QEMU: untrusted, bounded."""
    if not isinstance(reply, str) or len(reply) > limit:
        raise BadReply(f"{what}: not a string of at most {limit}")
    try:
        parsed: object = json.loads(reply)
    except ValueError as exc:
        raise BadReply(f"{what}: not JSON: {shorten(str(exc))}") from exc
    return parsed
