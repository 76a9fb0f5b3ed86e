"""The durable event journal: restarts, paging, retention, bad files, concurrent readers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.journal import (
    MAX_DATA_CHARS,
    Journal,
    JournalEntry,
    JournalError,
    NewEntry,
    qmp_timestamp,
    shares,
)

DAY = 86400.0
# Recent, so the default 30-day retention (applied with the wall clock) keeps test entries.
T0 = float(int(time.time() - DAY))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    with Journal(path) as j:
        yield j


def all_counts(journal: Journal) -> dict[tuple[str, str], int]:
    """Every VM's event counts, as the journal keeps them in its file."""
    with sqlite3.connect(journal.path) as conn:
        rows = conn.execute("SELECT vm, name, count FROM event_counts").fetchall()
    return {(vm, name): count for vm, name, count in rows}


def fill(journal: Journal, vm: str, n: int, *, start: float = T0, kind: str = "event") -> list[int]:
    """n BALLOON_CHANGE entries for vm, one second apart from `start`."""
    return journal.append_many(
        NewEntry(vm, kind, "BALLOON_CHANGE", {"actual": i}, start + i + 0.5, start + i)
        for i in range(n)
    )


# -- recording and restart -------------------------------------------------------------------


def test_entries_and_counts_survive_a_restart(path: Path) -> None:
    with Journal(path) as j:
        a = j.append("web1", "attach", "attach", {"mode": "connect"}, recorded_at=T0)
        b = j.append(
            "web1",
            "event",
            "BALLOON_CHANGE",
            {"actual": 536870912},
            qmp_timestamp({"seconds": 1_760_000_001, "microseconds": 250_000}),
        )
        c = j.append("web1", "request", "balloon", {"target": 268435456, "by": "api"})
        d = j.append("db1", "event", "RESET", None, qemu_time=T0 + 3)
        e = j.append("web1", "detach", "detach", {"reason": "EOFError"})
        before = j.entries("web1")
        counts = all_counts(j)
        assert [x.id for x in before] == [e, c, b, a]
        assert a < b < c < d < e
    assert counts == {("web1", "BALLOON_CHANGE"): 1, ("db1", "RESET"): 1}

    with Journal(path) as j:
        assert j.entries("web1") == before
        assert j.event_counts("web1") == {"BALLOON_CHANGE": 1}
        assert j.event_counts("db1") == {"RESET": 1}
        assert j.event_counts("nobody") == {}
        assert j.append("web1", "event", "STOP") > e
        assert j.event_counts("web1")["STOP"] == 1

    event = before[2]
    assert event == JournalEntry(
        b, "web1", "event", "BALLOON_CHANGE", {"actual": 536870912}, 1_760_000_001.25,
        event.recorded_at,
    )  # fmt: skip


def test_entries_survive_the_writer_being_killed(path: Path) -> None:
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from daemon.journal import Journal
        j = Journal(Path({str(path)!r}))
        for i in range(500):
            j.append("vm", "event", "BALLOON_CHANGE", {{"actual": i}})
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no checkpoint
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    with Journal(path) as j:
        assert len(j.entries("vm", limit=1000)) == 500
        assert j.event_counts("vm") == {"BALLOON_CHANGE": 500}
        assert j.entries("vm", limit=1)[0].data == {"actual": 499}


def test_only_qmp_events_are_counted(journal: Journal) -> None:
    for kind in ("attach", "detach", "request"):
        journal.append("vm", kind, "BALLOON_CHANGE")
    fill(journal, "vm", 3)
    fill(journal, "other", 2)
    journal.append("vm", "event", "SHUTDOWN")
    assert all_counts(journal) == {
        ("vm", "BALLOON_CHANGE"): 3,
        ("other", "BALLOON_CHANGE"): 2,
        ("vm", "SHUTDOWN"): 1,
    }


def test_unknown_kind_is_refused_and_nothing_of_the_batch_is_recorded(journal: Journal) -> None:
    with pytest.raises(ValueError, match="unknown journal entry kind 'evnt'"):
        journal.append_many([NewEntry("vm", "event", "A"), NewEntry("vm", "evnt", "B")])
    assert journal.entries("vm") == []
    assert all_counts(journal) == {}


@pytest.mark.parametrize(
    "data",
    [
        {"o": object()},
        {"nan": math.nan},
        {"big": 10**5000},
        {"raw": b"\x00\xff"},
        {(1, 2): "tuple key"},
    ],
)
def test_data_that_is_not_json_is_kept_as_a_flagged_repr(journal: Journal, data: Any) -> None:
    entry_id = journal.append("vm", "request", "odd", data)
    (entry,) = journal.entries("vm")
    assert entry.id == entry_id
    assert entry.data_is_repr
    assert isinstance(entry.data["repr"], str) and entry.data["repr"]


def test_circular_and_unprintable_data_do_not_crash(journal: Journal) -> None:
    circular: dict[str, Any] = {}
    circular["self"] = circular

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    journal.append("vm", "request", "circular", circular)
    journal.append("vm", "request", "hostile", {"h": Hostile()})
    hostile, looped = journal.entries("vm")
    assert looped.data_is_repr and "self" in looped.data["repr"]
    assert hostile.data_is_repr and hostile.data["repr"]


def test_oversized_data_is_truncated_and_flagged(journal: Journal) -> None:
    journal.append("vm", "request", "huge", {"text": "x" * (MAX_DATA_CHARS + 1)})
    (entry,) = journal.entries("vm")
    assert entry.data_is_repr
    assert len(entry.data["repr"]) < MAX_DATA_CHARS


def test_json_data_round_trips(journal: Journal) -> None:
    data = {"actual": 2**62, "nested": {"list": [1, "two", None, True]}, "text": "é\u2603"}
    journal.append("vm", "event", "X", data)
    (entry,) = journal.entries("vm")
    assert entry.data == data
    assert not entry.data_is_repr


def test_names_that_are_not_valid_utf8_are_stored(journal: Journal) -> None:
    vm = "guest-\udcff"  # a lone surrogate, as os.fsdecode gives for a non-UTF-8 byte
    journal.append(vm, "attach", "attach")
    (entry,) = journal.entries(vm)
    assert entry.kind == "attach"
    assert all_counts(journal) == {}


def test_timestamps(journal: Journal) -> None:
    journal.append("vm", "event", "A", qemu_time=math.nan, recorded_at=T0)
    (entry,) = journal.entries("vm")
    assert entry.qemu_time is None
    assert entry.recorded_at == T0
    with pytest.raises(ValueError, match="finite"):
        journal.append("vm", "event", "B", recorded_at=math.inf)


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ({"seconds": 1_760_000_000, "microseconds": 500_000}, 1_760_000_000.5),
        ({"seconds": 0, "microseconds": 0}, 0.0),
        ({"seconds": -1, "microseconds": -1}, None),  # QEMU could not read its clock
        ({"seconds": 1, "microseconds": 1_000_000}, None),
        ({"seconds": True, "microseconds": 0}, None),
        ({"seconds": 1.5, "microseconds": 0}, None),
        ({"seconds": 1}, None),
        (None, None),
        ("1760000000", None),
    ],
)
def test_qmp_timestamp(timestamp: object, expected: float | None) -> None:
    assert qmp_timestamp(timestamp) == expected


# -- reading: paging, since, kinds -----------------------------------------------------------


def test_pages_newest_first_without_gaps_or_overlaps(journal: Journal) -> None:
    ids = fill(journal, "vm", 250)
    fill(journal, "other", 30)
    pages: list[list[int]] = []
    cursor: int | None = None
    while page := journal.entries("vm", before_id=cursor, limit=100):
        pages.append([e.id for e in page])
        cursor = page[-1].id
    assert [len(p) for p in pages] == [100, 100, 50]
    assert [i for p in pages for i in p] == sorted(ids, reverse=True)


def test_since_is_inclusive_on_recorded_at(journal: Journal) -> None:
    fill(journal, "vm", 10)
    got = journal.entries("vm", since=T0 + 7)
    assert [e.recorded_at for e in got] == [T0 + 9, T0 + 8, T0 + 7]
    assert journal.entries("vm", since=T0 + 9.5) == []


def test_kinds_filter(journal: Journal) -> None:
    fill(journal, "vm", 5)
    journal.append("vm", "request", "balloon", {"target": 1})
    journal.append("vm", "detach", "detach")
    assert [e.kind for e in journal.entries("vm", kinds={"request", "detach"})] == [
        "detach",
        "request",
    ]
    assert journal.entries("vm", kinds=()) == []
    assert journal.entries("vm", limit=0) == []
    with pytest.raises(ValueError):
        journal.entries("vm", limit=-1)


@pytest.mark.parametrize("n", [300, 6000])  # below and above the dense-since threshold
def test_queries_match_a_reference_filter(journal: Journal, n: int) -> None:
    # recorded_at mostly follows the append order but not always, as with a clock step.
    entries = [
        NewEntry(
            "vm",
            "request" if i % 7 == 0 else "event",
            "X",
            None,
            None,
            T0 + i - (50 if i % 97 == 0 else 0),
        )
        for i in range(n)
    ]
    journal.append_many(entries)
    everything = journal.entries("vm", limit=n + 1)
    assert len(everything) == n
    for since in (None, T0, T0 + n // 2, T0 + n - 20, T0 + n + 1):
        for before_id in (None, n // 3, n - 5):
            for kinds in (None, {"request"}):
                for limit in (1, 100):
                    expected = [
                        e
                        for e in everything
                        if (since is None or e.recorded_at >= since)
                        and (before_id is None or e.id < before_id)
                        and (kinds is None or e.kind in kinds)
                    ][:limit]
                    got = journal.entries(
                        "vm", since=since, before_id=before_id, kinds=kinds, limit=limit
                    )
                    assert got == expected, (since, before_id, kinds, limit)


# -- retention -------------------------------------------------------------------------------


def test_retention_by_count_bounds_growth_and_keeps_each_vms_newest_share(path: Path) -> None:
    with Journal(path, max_events=90, prune_every=10) as j:
        for i in range(50):
            fill(j, f"vm{i % 3}", 9, start=T0 + 10 * i)
            stored = sum(len(j.entries(f"vm{v}", limit=1000)) for v in range(3))
            assert stored < 90 + 10
        j.prune(now=T0)
        for v in range(3):
            entries = j.entries(f"vm{v}", limit=1000)
            written = [i for i in range(50) if i % 3 == v]  # each VM's fills, 9 entries each
            newest = [(i, k) for i in reversed(written) for k in reversed(range(9))][:30]
            assert [e.recorded_at for e in entries] == [T0 + 10 * i + k for i, k in newest]


def test_a_noisy_vm_evicts_only_its_own_history(path: Path) -> None:
    with Journal(path, max_events=1000, prune_every=100) as j:
        quiet = {}
        for v in range(4):
            j.append(f"quiet{v}", "attach", "attach", {"mode": "connect"}, recorded_at=T0)
            fill(j, f"quiet{v}", 50, start=T0 + 1)
            quiet[v] = j.entries(f"quiet{v}", limit=1000)
        j.append("noisy", "attach", "attach", recorded_at=T0)
        for burst in range(20):
            fill(j, "noisy", 500, start=T0 + 100 + burst * 500)
        j.prune(now=T0)
        for v in range(4):
            assert j.entries(f"quiet{v}", limit=1000) == quiet[v]
        noisy = j.entries("noisy", limit=2000)
        # What the quiet VMs leave of the total is the noisy VM's: its newest entries, and
        # its attach, which goes only after all its events.
        assert len(noisy) == 1000 - 4 * 51
        assert noisy[-1].kind == "attach"
        assert [e.recorded_at for e in noisy[:-1]] == [
            T0 + 100 + i for i in reversed(range(10_000 - len(noisy) + 1, 10_000))
        ]


def test_shares_fill_up_what_small_vms_leave() -> None:
    assert shares({"a": 10, "b": 500, "c": 500}, 100) == {"a": 10, "b": 45, "c": 45}
    assert shares({"a": 10, "b": 20}, 100) == {"a": 10, "b": 20}
    assert shares({}, 100) == {}
    assert sum(shares({f"v{i}": 1000 for i in range(7)}, 100).values()) <= 100


def test_retention_by_age(path: Path) -> None:
    with Journal(path, max_age_days=1.0) as j:
        fill(j, "vm", 10, start=T0 - 2 * DAY)
        fill(j, "vm", 10, start=T0 - 0.5 * DAY)
        assert j.prune(now=T0) == 10
        assert j.prune(now=T0) == 0
        left = j.entries("vm", limit=100)
    assert len(left) == 10
    assert min(e.recorded_at for e in left) == T0 - 0.5 * DAY


def test_age_and_count_retention_together_remove_no_more_than_needed(path: Path) -> None:
    with Journal(path, max_events=10, max_age_days=1.0, prune_every=1000) as j:
        fill(j, "vm", 5, start=T0 - 3 * DAY)
        fill(j, "vm", 10, start=T0)
        assert j.prune(now=T0 + 60) == 5
        assert len(j.entries("vm")) == 10


def test_age_retention_applies_on_open(path: Path) -> None:
    with Journal(path) as j:
        fill(j, "vm", 20, start=T0 - 5 * DAY)
        fill(j, "vm", 5, start=T0)
    with Journal(path, max_age_days=2.0) as j:
        assert [e.recorded_at for e in j.entries("vm")] == [T0 + i for i in (4, 3, 2, 1, 0)]


def test_count_retention_applies_on_open(path: Path) -> None:
    with Journal(path) as j:
        fill(j, "vm", 20, start=T0)
    with Journal(path, max_events=3) as j:
        assert [e.recorded_at for e in j.entries("vm")] == [T0 + i for i in (19, 18, 17)]


def test_counts_survive_pruning_and_restart(path: Path) -> None:
    with Journal(path, max_age_days=1.0) as j:
        fill(j, "vm", 40, start=T0 - 5 * DAY)
        last = j.append("vm", "event", "STOP", recorded_at=T0 - 5 * DAY)
        assert j.prune(now=T0) == 41
        assert j.entries("vm") == []
        counts = j.event_counts("vm")
    assert counts == {"BALLOON_CHANGE": 40, "STOP": 1}
    with Journal(path, max_age_days=1.0) as j:
        assert j.event_counts("vm") == counts
        assert j.append("vm", "event", "RESUME") > last  # ids are never reused


def test_bad_retention_settings_are_refused(path: Path) -> None:
    for kwargs in ({"max_events": 0}, {"max_age_days": 0.0}, {"prune_every": 0}):
        with pytest.raises(ValueError):
            Journal(path, **kwargs)


# -- unusable files --------------------------------------------------------------------------


def test_path_under_a_regular_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(JournalError, match="cannot create the journal's directory") as info:
        Journal(tmp_path / "afile" / "journal.sqlite3")
    assert info.value.__cause__ is not None


def test_path_that_is_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(JournalError, match=r"cannot .* journal") as info:
        Journal(tmp_path / "dir")
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_garbage_file_is_refused(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(JournalError, match="file is not a database") as info:
        Journal(path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert path.read_bytes() == bytes(range(256)) * 64  # left alone


def test_journal_damaged_after_its_header_is_refused(path: Path) -> None:
    with Journal(path) as j:
        fill(j, "vm", 2000)
    data = bytearray(path.read_bytes())
    page_size = 4096
    data[page_size:] = b"\xa5" * (len(data) - page_size)  # every page but the header page
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match=r"malformed|not a database") as info:
        Journal(path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_another_programs_database_is_refused(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE users (name TEXT)")
    other.close()
    with pytest.raises(JournalError, match="not a reclaimd journal"):
        Journal(path)


def test_newer_schema_is_refused(path: Path) -> None:
    Journal(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(JournalError, match="schema version 99, written by a newer reclaimd"):
        Journal(path)


def test_second_writer_is_refused_until_the_first_closes(path: Path) -> None:
    first = Journal(path)
    with pytest.raises(JournalError, match=r"in use by another process \(pid \d+\)"):
        Journal(path)
    first.close()
    Journal(path).close()


def test_closed_journal_refuses_use(path: Path) -> None:
    j = Journal(path)
    j.close()
    j.close()  # harmless
    with pytest.raises(JournalError, match="closed"):
        j.append("vm", "event", "X")
    with pytest.raises(JournalError, match="closed"):
        j.entries("vm")


def test_failed_append_leaves_no_trace(journal: Journal) -> None:
    fill(journal, "vm", 3)
    before_counts = all_counts(journal)
    conn = journal._conn  # the only way to make the disk "full" without a tiny filesystem
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(JournalError, match="full") as info:
        journal.append_many(NewEntry("vm", "event", "BIG", {"x": "y" * 50_000}) for _ in range(3))
    assert isinstance(info.value.__cause__, sqlite3.Error)
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert all_counts(journal) == before_counts
    assert [e.name for e in journal.entries("vm")] == ["BALLOON_CHANGE"] * 3
    assert journal.acknowledged_id == 6  # done with: lost, never to be acknowledged
    assert journal.append("vm", "event", "NEXT") == 7  # the lost ids are not given again
    assert [e.id for e in journal.entries("vm")] == [7, 3, 2, 1]


# -- other readers ---------------------------------------------------------------------------


def test_concurrent_reader_sees_consistent_snapshots_while_writing(path: Path) -> None:
    total = 3000
    seen: list[int] = []
    failures: list[BaseException] = []
    started = threading.Event()
    done = threading.Event()

    def read() -> None:
        try:
            reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            with contextlib.closing(reader):
                started.set()
                while True:
                    finished = done.is_set()
                    reader.execute("BEGIN")  # one snapshot for both reads
                    ids = [
                        row[0]
                        for row in reader.execute(
                            "SELECT id FROM entries WHERE vm = 'vm' ORDER BY id DESC LIMIT 50"
                        )
                    ]
                    (counted,) = reader.execute(
                        "SELECT coalesce(sum(count), 0) FROM event_counts WHERE vm = 'vm'"
                    ).fetchone()
                    reader.execute("COMMIT")
                    # The counter and the entries commit together, and ids are 1..n here.
                    assert counted >= (ids[0] if ids else 0)
                    seen.append(counted)
                    if finished:
                        return
        except BaseException as exc:
            failures.append(exc)
            started.set()

    Journal(path).close()  # create it, so the reader can open it
    with Journal(path) as writer:
        thread = threading.Thread(target=read)
        thread.start()
        assert started.wait(10)
        for i in range(total):
            writer.append("vm", "event", "BALLOON_CHANGE", {"actual": i})
        done.set()
        thread.join(30)
    assert not thread.is_alive()
    assert failures == []
    assert seen == sorted(seen), "a reader saw the counter go backwards"
    assert seen[-1] == total
    assert len(set(seen)) > 2, "the reader never overlapped the writer"


# -- group commit, acknowledgement, saturation -----------------------------------------------


def test_submit_returns_at_once_and_entries_show_once_acknowledged(path: Path) -> None:
    committed: list[tuple[int, int]] = []
    with Journal(path, on_commit=lambda first, last: committed.append((first, last))) as j:
        ids = [j.submit("vm", "event", "BALLOON_CHANGE", {"actual": i}) for i in range(5000)]
        assert ids == list(range(1, 5001))
        assert j.flush(timeout=30)
        assert j.acknowledged_id == 5000
        # Group commit: far fewer transactions than entries, in order, without gaps.
        assert len(committed) < 5000
        assert [first for first, _ in committed] == [1] + [last + 1 for _, last in committed[:-1]]
        assert committed[-1][1] == 5000
        assert len(j.entries("vm", limit=10_000)) == 5000
        assert j.event_counts("vm") == {"BALLOON_CHANGE": 5000}


def test_event_counts_include_what_is_not_acknowledged_yet(path: Path) -> None:
    gate = threading.Event()
    with Journal(path, on_commit=lambda first, last: gate.wait(10)) as j:
        j.submit("vm", "event", "STOP")  # its commit waits in on_commit: after it, more queue
        for _ in range(3):
            j.submit("vm", "event", "RESUME", count_as="other")
        assert j.event_counts("vm") == {"STOP": 1, "other": 3}
        gate.set()
        j.flush()
        assert j.event_counts("vm") == {"STOP": 1, "other": 3}
        assert [e.name for e in j.entries("vm")] == ["RESUME"] * 3 + ["STOP"]


def test_a_saturated_journal_refuses_events_but_not_attaches_and_detaches(path: Path) -> None:
    gate = threading.Event()
    with Journal(path, max_pending=10, on_commit=lambda first, last: gate.wait(10)) as j:
        j.submit("vm", "event", "FIRST")  # held in its commit
        taken = [j.submit("vm", "event", "E") for _ in range(20)]
        # FIRST waits too (pending until committed): 9 more fit.
        assert taken.count(None) == 11 and None not in taken[:9]
        assert j.submit("vm", "detach", "detach", {"cause": "x"}) is not None
        gate.set()
        j.flush()
        assert j.entries("vm", limit=1)[0].kind == "detach"
        assert j.submit("vm", "event", "E") is not None  # room again


def test_close_commits_what_was_submitted(path: Path) -> None:
    with Journal(path) as j:
        for i in range(3000):
            j.submit("vm", "event", "BALLOON_CHANGE", {"actual": i})
    with Journal(path) as j:
        assert len(j.entries("vm", limit=5000)) == 3000


def test_kill_9_during_a_flood_loses_no_acknowledged_entry(path: Path) -> None:
    # The daemon's way of writing: submit without waiting, as fast as events come; the child
    # reports each commit it was told of (acknowledged), and is killed while flooding.
    child = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from daemon.journal import Journal
        def acknowledged(first, last):
            sys.stdout.write(f"{{last}}\\n")
            sys.stdout.flush()
        j = Journal(Path({str(path)!r}), on_commit=acknowledged)
        i = 0
        while True:
            if j.submit("vm", "event", "BALLOON_CHANGE", {{"actual": i}}) is None:
                time.sleep(0.001)  # saturated: the same entry again
            else:
                i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    acknowledged = 0
    while acknowledged < 30_000:
        line = proc.stdout.readline()
        assert line, "the child exited"
        acknowledged = int(line)
    proc.kill()  # SIGKILL, mid-flood: no close, no checkpoint
    rest = proc.stdout.read()  # acknowledgements written before it died
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    acknowledged = max([acknowledged, *(int(x) for x in rest.split())])
    with Journal(path) as j:
        entries = j.entries("vm", limit=10**6)
    ids = sorted(e.id for e in entries)
    # Every acknowledged entry is there, and what is there is a prefix of what was submitted.
    assert ids == list(range(1, len(ids) + 1))
    assert len(ids) >= acknowledged
    assert all(e.data == {"actual": e.id - 1} for e in entries)


def test_a_restart_records_the_detach_of_vms_left_attached(path: Path) -> None:
    with Journal(path) as j:
        j.append("up", "attach", "attach")
        fill(j, "up", 3)  # the VM's last entry is an event, its last session entry the attach
        j.append("clean", "attach", "attach")
        j.append("clean", "detach", "detach", {"cause": "reclaimd is stopping"})
        j.append("events-only", "event", "STOP")
    with Journal(path) as j:  # as after kill -9
        assert j.close_dangling_attaches("restarted") == ["up"]
        newest = j.entries("up", limit=1)[0]
        assert (newest.kind, newest.data["cause"]) == ("detach", "restarted")
        assert newest.data["attach_id"] == 1
        assert j.close_dangling_attaches("restarted") == []
        assert [e.kind for e in j.entries("clean")] == ["detach", "attach"]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o777])
def test_files_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "a" / "b" / "journal.sqlite3"
    old = os.umask(umask)
    try:
        with Journal(path) as j:
            fill(j, "vm", 10)
            files = [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", ".lock"))]
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
            dirs = {
                d.name: stat.S_IMODE(d.stat().st_mode) for d in (path.parent, path.parent.parent)
            }
    finally:
        os.umask(old)
    assert modes == {f.name: 0o600 for f in files}
    assert dirs == {"a": 0o700, "b": 0o700}


# -- text that is not valid Unicode ----------------------------------------------------------


def test_lone_surrogates_in_data_are_stored_as_valid_text(journal: Journal) -> None:
    journal.append("vm", "event", "X\ud800", {"desc": "bad \udcff", "\ud83d": ["\ud800"]})
    (entry,) = journal.entries("vm")
    json.dumps(entry.data, ensure_ascii=False).encode()  # what a response does: no error
    assert entry.data == {"desc": "bad \ufffd", "\ufffd": ["\ufffd"]}
    assert entry.name.encode()


def test_surrogates_stored_by_an_older_version_are_read_as_valid_text(journal: Journal) -> None:
    conn = journal._conn
    assert conn is not None
    conn.execute(
        "INSERT INTO entries VALUES (99, 'vm', 'event', 'X', ?, 0, NULL, ?)",
        (r'{"status":"\ud800"}', T0),
    )
    (entry,) = journal.entries("vm")
    assert entry.data == {"status": "\ufffd"}
