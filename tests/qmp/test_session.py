"""Sessions: the supervised life of a VM's monitor connection, at the socket seam."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from daemon.config import Address, Settings
from daemon.fleet import Fleet, SessionState
from daemon.instruments import REGISTRY as DAEMON_REGISTRY
from daemon.journal import Journal
from daemon.qmp.connection import QMPConnection
from daemon.qmp.errors import TransitionError
from daemon.qmp.monitor import QMPMonitor
from daemon.qmp.session import (
    CONNECT_TRANSITIONS,
    POLL_TRANSITIONS,
    PollSession,
    Session,
    backoff_delay,
)
from daemon.service import Reclaimd
from tests.qmp.fake_qmp import Behaviour, FakeQMPServer, FakeVM
from tests.qmp.fake_qmp import event as fake_event

S = SessionState


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def start_session(
    settings: Settings, journal: Journal, server: Any, name: str = "vm1"
) -> tuple[Session, Any]:
    fleet = Fleet()
    vm = fleet.add(name, f"unix:{server.path}", "connect")
    session = Session(vm, settings, journal, address=Address("unix", path=str(server.path)))
    return session, asyncio.create_task(session.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_attach_reads_everything_and_sets_stats_polling(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp(vm=FakeVM(name="vm1", balloon_id=None))  # balloon without an id
    session, task = start_session(settings, journal, server)
    vm = session.vm
    await eventually(lambda: vm.up and vm.guest_stats is not None)
    assert vm.qemu_version == "7.2.22"
    assert vm.uuid == server.vm.uuid
    assert vm.memory.ram_bytes == 512 * 1024 * 1024
    assert vm.balloon.qom_path == "/machine/peripheral-anon/device[0]"
    assert vm.balloon.free_page_reporting is True
    assert server.vm.polling_interval == settings.stats_interval  # was 0, reclaimd set it
    assert vm.guest_stats is not None and vm.guest_stats.free_bytes == server.vm.free
    await stop(task)


async def test_state_sequence_across_a_loss_and_reconnect(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.vm.up)
    server.drop_clients()
    await eventually(lambda: session.vm.reconnects == 1 and session.vm.up)
    await stop(task)
    assert list(session.transitions) == [
        S.IDLE,
        S.CONNECTING,
        S.ATTACHING,
        S.RUNNING,
        S.DISCONNECTED,
        S.BACKOFF,
        S.CONNECTING,
        S.ATTACHING,
        S.RUNNING,
        S.DISCONNECTED,
        S.STOPPED,
    ]
    session.journal.flush()  # what the session submitted, committed
    entries = session.journal.entries("vm1", limit=10)
    assert [e.name for e in reversed(entries)] == ["attach", "detach", "attach", "detach"]
    assert entries[-2].data["cause"] == "connection closed by peer"


async def test_attach_and_detach_are_logged_at_info_with_the_cause(
    settings: Settings, journal: Journal, fake_qmp: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.qmp.session")
    server = await fake_qmp()
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.vm.up)
    server.drop_clients()
    await eventually(lambda: session.vm.reconnects == 1 and session.vm.up)
    await stop(task)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    attach = f"attached VM vm1 (connect, unix:{server.path})"
    assert lines == [
        attach,
        "detached VM vm1: connection closed by peer",
        attach,
        "detached VM vm1: closed",  # cancelled: the connection closed by reclaimd
    ]


async def test_dead_socket_backs_off_and_records_cause(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    await server.stop()  # the socket file is gone: QEMU died
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.transitions.count(S.CONNECTING) >= 3)
    assert not session.vm.up
    assert "No such file" in (session.vm.last_error or "")
    await stop(task)


async def test_events_update_state_and_journal(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    session, task = start_session(settings, journal, server)
    vm = session.vm
    await eventually(lambda: vm.up)
    server.vm.actual = 300 * 1024 * 1024
    server.vm.running = False
    await server.emit("BALLOON_CHANGE", {"actual": 300 * 1024 * 1024})
    await server.emit("STOP")
    await eventually(lambda: vm.event_counts.get("STOP") == 1)
    assert vm.balloon.actual_bytes == 300 * 1024 * 1024
    assert vm.running is False and vm.status == "paused"
    session.journal.flush()
    names = [e.name for e in session.journal.entries("vm1", kinds=["event"])]
    assert names == ["STOP", "BALLOON_CHANGE"]
    await stop(task)


async def test_unplugged_device_makes_the_session_read_memory_and_layout_again(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.vm.up)
    before = len(server.commands)
    await server.emit("DEVICE_DELETED", {"device": "dimm1", "path": "/machine/peripheral/dimm1"})
    await eventually(lambda: "x-query-ramblock" in server.commands[before:])
    assert "query-memory-size-summary" in server.commands[before:]
    assert session.vm.event_counts.get("DEVICE_DELETED") == 1
    await stop(task)


async def test_hung_monitor_is_dropped_and_others_keep_polling(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    hung = await fake_qmp("hung", behaviour=Behaviour(answer=False))
    healthy = await fake_qmp("ok")
    hung_session, hung_task = start_session(settings, journal, hung, "hung")
    ok_session, ok_task = start_session(settings, journal, healthy, "ok")
    await eventually(lambda: ok_session.vm.up and ok_session.vm.last_poll is not None)
    first_poll = ok_session.vm.last_poll
    assert first_poll is not None
    # The hung VM never attaches; its command timeout is the cause, the other VM polls on.
    await eventually(lambda: "no reply" in (hung_session.vm.last_error or ""), timeout=5)
    await eventually(lambda: (ok_session.vm.last_poll or 0) > first_poll + 0.3)
    assert not hung_session.vm.up and ok_session.vm.up
    await stop(hung_task)
    await stop(ok_task)


async def test_guest_without_balloon_driver(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp(vm=FakeVM(stats_updated=False))
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.vm.up and session.vm.last_poll is not None)
    assert session.vm.guest_stats is not None and not session.vm.guest_stats.available
    assert "not reported" in (session.vm.guest_stats_error or "")
    await stop(task)


async def test_impossible_guest_stats_are_flagged(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp(vm=FakeVM(free=900 * 1024 * 1024, total=400 * 1024 * 1024))
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.vm.guest_stats is not None)
    stats = session.vm.guest_stats
    assert stats is not None and not stats.valid
    assert (session.vm.guest_stats_error or "").startswith("rejected")
    await stop(task)


async def test_poll_mode_never_holds_the_socket(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    fleet = Fleet()
    vm = fleet.add("p", f"unix:{server.path}", "poll")
    session = PollSession(vm, settings, journal, address=Address("unix", path=str(server.path)))
    task = asyncio.create_task(session.run())
    await eventually(lambda: server.connections >= 3)
    assert vm.up and vm.guest_stats is not None
    await eventually(lambda: not server._writers)  # between cycles nobody is connected
    await stop(task)


def test_backoff_grows_with_jitter_and_is_capped() -> None:

    rng = random.Random(1)
    delays = [backoff_delay(n, 0.5, 30, rng) for n in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(15 <= d <= 30 for d in delays[7:])
    assert len(set(delays)) == len(delays)


async def test_polls_keep_to_their_schedule_however_long_a_poll_takes(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    # The guest pushes stats on its own fixed period; polls that slipped by their own duration
    # every cycle would drift away from it.
    interval, work = 0.2, 0.1
    polls: list[float] = []

    async def slow_cycle(monitor: QMPMonitor) -> None:
        polls.append(time.monotonic())
        await monitor.poll()
        await asyncio.sleep(work)

    server = await fake_qmp()
    vm = Fleet().add("vm1", f"unix:{server.path}", "connect")
    settings = settings.model_copy(update={"poll_interval": interval})
    address = Address("unix", path=str(server.path))
    session = Session(vm, settings, journal, address=address, cycle=slow_cycle)
    task = asyncio.create_task(session.run())
    await eventually(lambda: len(polls) >= 9, 5)
    await stop(task)
    span = polls[8] - polls[0]
    assert 8 * interval - 0.02 <= span < 8 * (interval + work) - 0.2, span  # drift: >= 2.4 s


def test_a_transition_the_table_forbids_is_refused(settings: Settings, journal: Journal) -> None:
    vm = Fleet().add("vm1", "unix:/nowhere", "connect")
    session = Session(vm, settings, journal, address=Address("unix", path="/nowhere"))
    with pytest.raises(TransitionError, match="cannot go from idle to running"):
        session._set(S.RUNNING)
    assert vm.session_state == S.IDLE and list(session.transitions) == [S.IDLE]
    poll = PollSession(vm, settings, journal, address=Address("unix", path="/nowhere"))
    poll._set(S.RUNNING)
    with pytest.raises(TransitionError, match="cannot go from running to backoff"):
        poll._set(S.BACKOFF)
    # Every state of a kind has a row, and nothing leaves STOPPED.
    for table in (CONNECT_TRANSITIONS, POLL_TRANSITIONS):
        assert set().union(*table.values()) <= set(table)
        assert table[S.STOPPED] == frozenset()


async def test_a_stop_request_ends_the_session_without_cancelling_it(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.vm.up)
    session.request_stop()
    await asyncio.wait_for(task, 5)  # it returns by itself
    assert not task.cancelled()
    assert list(session.transitions)[-3:] == [S.RUNNING, S.DISCONNECTED, S.STOPPED]
    session.journal.flush()
    detach = session.journal.entries("vm1", kinds=["detach"])
    assert [e.data["cause"] for e in detach] == ["reclaimd is stopping"]
    await eventually(lambda: not server._writers)  # the connection was closed


async def test_a_stop_request_ends_a_poll_session(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    vm = Fleet().add("p", f"unix:{server.path}", "poll")
    session = PollSession(vm, settings, journal, address=Address("unix", path=str(server.path)))
    task = asyncio.create_task(session.run())
    await eventually(lambda: vm.up)
    session.request_stop()
    await asyncio.wait_for(task, 5)
    assert session.state == S.STOPPED and not vm.up
    journal.flush()
    assert [e.name for e in reversed(journal.entries("p"))] == ["attach", "detach"]


async def test_events_received_before_a_hang_up_are_recorded_before_the_detach(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.vm.up)
    # A burst, then QEMU exits: the last events arrive together with the hang-up.
    burst: list[tuple[str, dict[str, Any] | None]] = [
        ("BALLOON_CHANGE", {"actual": n}) for n in range(50)
    ]
    server.emit_and_hang_up([*burst, ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})])
    await eventually(lambda: session.vm.reconnects == 1 and session.vm.up)
    await stop(task)
    assert session.vm.event_counts == {"BALLOON_CHANGE": 50, "SHUTDOWN": 1}
    journal.flush()
    names = [e.name for e in reversed(journal.entries("vm1", limit=100))]
    assert names.index("SHUTDOWN") < names.index("detach")


async def test_a_removed_vm_takes_its_reconnect_series_with_it(
    settings: Settings, fake_qmp: Any
) -> None:
    server = await fake_qmp("gone")
    daemon = Reclaimd(settings, host_view=False)
    await daemon.start()
    try:
        daemon.add_vm("gone", Address("unix", path=str(server.path)))
        vm = daemon.fleet.get("gone")
        assert vm is not None
        await eventually(lambda: vm.up)
        server.drop_clients()
        await eventually(lambda: vm.reconnects == 1 and vm.up)
        assert 'reclaimd_qmp_reconnects_total{vm="gone"} 1.0' in _daemon_metrics()
        daemon.remove_vm("gone")
        assert 'vm="gone"' not in _daemon_metrics()
    finally:
        await daemon.stop()


def _daemon_metrics() -> str:
    return generate_latest(DAEMON_REGISTRY).decode()


class SmallQueueSession(Session):
    """A session whose connections queue 4 events at most, so a burst overflows at once."""

    def _new_connection(self) -> QMPConnection:
        return QMPConnection(self.vm.name, command_timeout=1.0, event_queue_size=4)


async def test_dropped_events_are_counted_live_and_across_reconnects(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    burst = [fake_event("BALLOON_CHANGE", {"actual": n}) for n in range(50)]
    burst += [fake_event("RESET"), *burst[:49]]  # 100 events, one that changes the VM's state
    # Sent while reclaimd attaches: nothing takes events from the queue until it has.
    server = await fake_qmp(behaviour=Behaviour(events_after={"query-uuid": burst}))
    vm = Fleet().add("vm1", f"unix:{server.path}", "connect")
    address = Address("unix", path=str(server.path))
    counted_before = _daemon_sample("reclaimd_qmp_events_dropped_total", vm="vm1")  # per process
    session = SmallQueueSession(vm, settings, journal, address=address)
    task = asyncio.create_task(session.run())
    await eventually(lambda: vm.up and vm.event_counts)
    assert vm.events_dropped == 96  # at once, while the session is up
    dropped = _daemon_sample("reclaimd_qmp_events_dropped_total", vm="vm1") - counted_before
    assert dropped == 96
    assert vm.event_counts.get("RESET") == 1  # kept: the BALLOON_CHANGEs went first
    server.drop_clients()
    await eventually(lambda: vm.reconnects == 1 and vm.up and vm.events_dropped == 192)
    await stop(task)
    journal.flush()
    recorded = journal.entries("vm1", kinds=["event"], limit=1000)
    assert len(recorded) + vm.events_dropped == 200  # every event: recorded or counted


async def test_a_shutdown_sent_while_attaching_is_recorded(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    shutdown = fake_event("SHUTDOWN", {"guest": False, "reason": "host-signal"})
    # QEMU exits while reclaimd attaches: the attach fails, the event is history all the same.
    behaviour = Behaviour(events_after={"query-uuid": [shutdown]}, hangup_on="query-status")
    server = await fake_qmp(behaviour=behaviour)
    session, task = start_session(settings, journal, server)
    await eventually(lambda: "attach failed" in (session.vm.last_error or ""))
    await stop(task)
    journal.flush()
    assert [e.name for e in journal.entries("vm1", kinds=["event"])][-1:] == ["SHUTDOWN"]
    assert session.vm.status == "shutdown"


async def test_the_backoff_starts_over_once_a_session_ran(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    # With the backoff kept across losses, eight losses would wait 0.1 + 0.2 + ... + 6.4 s.
    settings = settings.model_copy(update={"backoff_initial": 0.1, "backoff_max": 30.0})
    server = await fake_qmp()
    session, task = start_session(settings, journal, server)
    await eventually(lambda: session.vm.up)
    started = time.monotonic()
    for n in range(1, 9):
        server.drop_clients()
        await eventually(lambda n=n: session.vm.reconnects == n and session.vm.up, 5)  # type: ignore[misc]
    assert time.monotonic() - started < 4
    await stop(task)


async def test_a_new_socket_ends_the_backoff_wait(
    settings: Settings, journal: Journal, sockdir: Path
) -> None:
    settings = settings.model_copy(update={"backoff_initial": 2.0, "backoff_max": 30.0})
    path = sockdir / "vm1.qmp"
    first = await FakeQMPServer(path, FakeVM(name="vm1")).start()
    session, task = start_session(settings, journal, first)
    await eventually(lambda: session.vm.up)
    await first.stop()  # QEMU exits and its socket goes: reclaimd backs off, 1-2 s and more
    await eventually(lambda: session.transitions.count(S.CONNECTING) >= 3, 10)
    assert session.state == S.BACKOFF
    second = await FakeQMPServer(path, FakeVM(name="vm1")).start()  # QEMU started again
    appeared = time.monotonic()
    await eventually(lambda: session.vm.up, 5)
    assert time.monotonic() - appeared < 1.0  # well inside the backoff it was waiting out
    await stop(task)
    await second.stop()


def _daemon_sample(name: str, **labels: str) -> float:
    return DAEMON_REGISTRY.get_sample_value(name, labels) or 0.0


async def test_events_beyond_the_budget_are_dropped_but_the_state_stays_right(
    settings: Settings, journal: Journal, fake_qmp: Any
) -> None:
    settings = settings.model_copy(update={"event_rate": 1.0, "event_burst": 5.0})
    server = await fake_qmp()
    counted_before = _daemon_sample("reclaimd_qmp_events_dropped_total", vm="vm1")  # per process
    session, task = start_session(settings, journal, server)
    vm = session.vm
    await eventually(lambda: vm.up)
    server.vm.running = False  # the guest pauses: the STOP comes last, when the budget is spent
    flood = [fake_event("BALLOON_CHANGE", {"actual": n * 4096}) for n in range(49)]
    await server.emit_many([*flood, fake_event("STOP")])
    await eventually(lambda: sum(vm.event_counts.values()) + vm.events_dropped == 50)
    assert 44 <= vm.events_dropped <= 45  # 5 at once, and maybe one more a second later
    dropped = _daemon_sample("reclaimd_qmp_events_dropped_total", vm="vm1") - counted_before
    assert dropped == vm.events_dropped
    # The dropped STOP still had the state read again.
    await eventually(lambda: vm.status == "paused" and vm.running is False)
    await stop(task)
