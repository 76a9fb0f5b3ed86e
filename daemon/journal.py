"""Durable event journal: QMP events, attaches, detaches and REST balloon requests, per VM.

The journal is one SQLite database in WAL mode with ``synchronous=NORMAL``, written by one
writer thread that commits entries in groups, and read through a separate connection.

**Writing.** :meth:`Journal.submit` takes an entry and returns its id at once: the event loop
never waits on SQLite. The writer thread takes whatever has been submitted (up to
``MAX_BATCH`` entries) and commits it in one transaction, so a flood of events costs one commit
per batch instead of one per event, and while it commits the next batch collects.
:meth:`Journal.append` is ``submit`` and waiting for the commit, for callers that may block.

**Acknowledged** means committed: the transaction holding the entry has been written to the WAL
(``COMMIT`` returned). From then on the entry survives a crash or ``kill -9`` of the daemon,
and readers, this journal's and other processes', see it. ``synchronous=NORMAL`` does not fsync
each commit, so a power loss can take the entries since the last checkpoint (which fsyncs) but
leaves the file consistent. An entry that was submitted but not acknowledged when the process
died is lost; a batch whose commit fails (disk full) is lost as a whole and logged. Commits
follow submission order, so what a crash leaves is always a prefix of what was submitted.
``acknowledged_id`` is the highest id up to which every entry is acknowledged or lost,
``on_commit(first_id, last_id)`` is told of each commit, and :meth:`Journal.flush` waits for
everything submitted so far.

**Reading.** :meth:`Journal.entries` reads acknowledged entries only, on its own connection: in
WAL mode a reader never waits for the writer, so pages stay fast during a flood. An entry shows
up there within a group commit of its submission (normally milliseconds); a reader that must
see a VM's own latest entries waits for ``last_submitted(vm)`` (``wait_acknowledged``), which
for a quiet VM is long done.

**Backpressure.** At most ``max_pending`` entries wait for the writer; beyond that ``submit``
refuses QMP events (returns None; the caller counts the drop) while attach, detach and request
entries are always taken: they are rare, and the history makes no sense without them.

**Retention** keeps the file bounded: entries older than ``max_age_days``, and beyond
``max_events`` in all, the oldest of the VMs over their *share*: each VM may keep an equal part
of ``max_events``, and what quiet VMs leave unused is shared by the others. So one noisy VM
evicts its own history, never another VM's. Within a VM, attach, detach and request entries go
only after its events. Retention runs on open, every ``prune_every`` entries, and whenever
:meth:`Journal.prune` is called (the daemon calls it periodically, so age retention also
applies while the journal is quiet). Per-(VM, event) counters live in their own table, so
``qemu_events_total`` keeps counting across restarts and pruning.

**Restarts.** Entry ids increase monotonically for the life of the file, also across pruning and
restarts; they are the paging cursor of ``GET /api/v1/vms/{name}/events``. A daemon that died
leaves its attached VMs with an attach and no detach: :meth:`Journal.close_dangling_attaches`,
called at start, records the missing detaches.

**Files.** One process uses a journal at a time: it takes an exclusive lock on ``PATH.lock`` and a
second process gets :class:`JournalError`. The journal, its WAL and shared-memory files and the
lock are created 0600, and missing directories 0700 (``daemon.files``).

Text that is not valid Unicode (lone surrogates) is never stored as such: a name keeps it
escaped, data has it replaced, so nothing stored can break a later read or response.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import reprlib
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from daemon.files import create_private, make_dirs
from daemon.instruments import JOURNAL_ERRORS
from daemon.untrusted import clean_json

__all__ = [
    "KINDS",
    "Journal",
    "JournalEntry",
    "JournalError",
    "NewEntry",
    "qmp_timestamp",
]

log = logging.getLogger(__name__)

#: What an entry records. ``event`` is a QMP event; ``request`` a balloon change asked through
#: the REST API; ``refused`` a connection refused for the VM (listen mode: another process
#: claimed its identity).
KINDS = frozenset({"event", "attach", "detach", "request", "refused"})
#: Kinds retention removes only after a VM's other entries, and that are never refused.
PRECIOUS_KINDS = frozenset({"attach", "detach", "request"})

SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a journal ("RCLM"), so another program's database is refused.
APPLICATION_ID = 0x52434C4D
#: Encoded JSON payloads above this size are stored as a truncated repr instead.
MAX_DATA_CHARS = 65536
MAX_REPR_CHARS = 4096
#: Entries committed in one transaction at most: bounds how long one commit takes.
MAX_BATCH = 2000
#: Seconds the writer waits for more entries before it commits what it has (group commit).
GROUP_LINGER = 0.005
#: Entries waiting for the writer at most before QMP events are refused.
MAX_PENDING = 100_000
_SECONDS_PER_DAY = 86400.0
# Up to this many entries matching `since`, entries() reads them all through the time index.
_FEW_MATCHES = 4096
# VMs whose last submitted id is remembered before the acknowledged ones are forgotten.
_MAX_TRACKED_VMS = 10_000
# QMP timestamps beyond this (the year 36812) are not a clock's.
_MAX_QMP_SECONDS = 2**40

# The (vm) index of attach and detach entries finds a VM's last one at once (restart markers).
_SESSIONS_INDEX = (
    "CREATE INDEX IF NOT EXISTS entries_sessions ON entries (vm) WHERE kind IN ('attach', 'detach')"
)
_SCHEMA = f"""
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    vm TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    data_is_repr INTEGER NOT NULL,
    qemu_time REAL,
    recorded_at REAL NOT NULL
);
-- An index carries the rowid, so this one serves "vm = ? ORDER BY id DESC".
CREATE INDEX entries_by_vm ON entries (vm);
CREATE INDEX entries_by_vm_time ON entries (vm, recorded_at);
{_SESSIONS_INDEX};
CREATE TABLE event_counts (
    vm TEXT NOT NULL,
    name TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (vm, name)
) WITHOUT ROWID;
CREATE TABLE vms (vm TEXT PRIMARY KEY) WITHOUT ROWID;
-- last_id: the highest id ever committed, kept when pruning deletes the newest rows.
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""

_INSERT_ENTRY = (
    "INSERT INTO entries (id, vm, kind, name, data, data_is_repr, qemu_time, recorded_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_COUNT_EVENT = (
    "INSERT INTO event_counts (vm, name, count) VALUES (?, ?, ?)"
    " ON CONFLICT (vm, name) DO UPDATE SET count = count + excluded.count"
)
_SET_LAST_ID = "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_id', ?)"
_SELECT_ENTRY = "SELECT id, vm, kind, name, data, data_is_repr, qemu_time, recorded_at FROM entries"
_PRECIOUS_SQL = ", ".join(f"'{k}'" for k in sorted(PRECIOUS_KINDS))

_encode_json = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200
_repr.maxlevel = 4
# A lone surrogate in JSON text (ensure_ascii escapes it): decoding gives text UTF-8 cannot hold.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JournalError(Exception):
    """The journal cannot be used: the path is not writable, the file is not a journal or is
    corrupt, another process uses it, a commit failed, or the journal is closed. The cause, if
    any, is kept as ``__cause__``."""


@dataclass(frozen=True)
class JournalEntry:
    """One recorded entry, as read back."""

    id: int
    """Monotonically increasing for the life of the journal file."""
    vm: str
    kind: str
    """One of :data:`KINDS`."""
    name: str
    """The QMP event name (``BALLOON_CHANGE``), or ``attach``, ``detach``, ``balloon``..."""
    data: dict[str, Any]
    """The JSON payload; ``{"repr": text}`` when ``data_is_repr``."""
    qemu_time: float | None
    """QEMU's timestamp of the event (host wall clock, seconds), None if not from QEMU."""
    recorded_at: float
    """Wall clock (seconds since the epoch) when the journal recorded it."""
    data_is_repr: bool = False
    """The payload was not JSON-serializable (or was too large): ``data["repr"]`` is its repr."""


class NewEntry(NamedTuple):
    """An entry to record with :meth:`Journal.append_many`; fields as in :meth:`Journal.submit`."""

    vm: str
    kind: str
    name: str
    data: Mapping[str, Any] | None = None
    qemu_time: float | None = None
    recorded_at: float | None = None
    count_as: str | None = None


class _Row(NamedTuple):
    id: int
    vm: str
    kind: str
    name: str
    data: str
    data_is_repr: int
    qemu_time: float | None
    recorded_at: float
    count_as: str | None  # the event counter it adds to; None: not counted


class _Task:
    """Work for the writer thread other than rows (prune), with its result."""

    def __init__(self, run: Callable[[], Any]) -> None:
        self.run = run
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def qmp_timestamp(timestamp: object) -> float | None:
    """Seconds since the epoch from a QMP event's ``timestamp`` member
    (``{"seconds": S, "microseconds": U}``); None when absent, malformed, implausible, or the
    ``-1`` QEMU writes when it could not read the clock."""
    if not isinstance(timestamp, Mapping):
        return None
    seconds, micros = timestamp.get("seconds"), timestamp.get("microseconds")
    if type(seconds) is not int or type(micros) is not int:
        return None
    if not 0 <= seconds < _MAX_QMP_SECONDS or not 0 <= micros < 1_000_000:
        return None
    return seconds + micros / 1e6


class Journal:
    """The event journal at ``path``; see the module docstring for writing, acknowledgement,
    reading and retention.

    Raises :class:`JournalError` when the path cannot be created or written, when the file is not
    a journal (garbage, another program's database, a newer schema), or when another process
    holds it. ``submit`` is for one thread (the event loop); the other methods are safe from any.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_events: int = 1_000_000,
        max_age_days: float = 30.0,
        prune_every: int = 1000,
        max_pending: int = MAX_PENDING,
        on_commit: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, not {max_events}")
        if not max_age_days > 0:
            raise ValueError(f"max_age_days must be positive, not {max_age_days}")
        if prune_every < 1:
            raise ValueError(f"prune_every must be at least 1, not {prune_every}")
        self.path = Path(path)
        self.max_events = max_events
        self.max_age_days = max_age_days
        self.prune_every = prune_every
        self.max_pending = max_pending
        self.on_commit = on_commit
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None  # the writer's (its thread's, once started)
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        # Submission side, under _state: ids, the queue, and the event rows not yet known to be
        # committed (for event_counts). The writer waits on _work, acknowledgements on _done.
        self._state = threading.Lock()
        self._work = threading.Condition(self._state)
        self._done = threading.Condition(self._state)
        self._waiting = 0  # callers blocked until entries are acknowledged: no lingering
        self._queue: deque[_Row | _Task] = deque()
        self._pending_rows = 0
        self._uncounted: deque[_Row] = deque()
        self._last_id = 0  # the last id handed out
        self._last_id_by_vm: dict[str, int] = {}  # the last id handed out per VM
        self._done_id = 0  # every id up to here is committed or lost
        self._failed: deque[tuple[int, int, Exception]] = deque(maxlen=64)  # first, last, why
        self._closing = False
        # The writer's view of the file, kept in memory so commits need no reads; valid because
        # only this Journal writes (see the lock). Used by the writer thread only, once started.
        self._rows_by_vm: Counter[str] = Counter()
        self._vms: set[str] = set()
        self._since_prune = 0
        self._ready = False
        self._thread: threading.Thread | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(
            target=self._write_forever, name="reclaimd-journal", daemon=True
        )
        self._thread.start()

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            make_dirs(self.path.parent)
        except OSError as exc:
            raise JournalError(
                f"cannot create the journal's directory {self.path.parent}: {exc.strerror}"
            ) from exc
        self._lock()
        try:
            # SQLite gives the WAL and shared-memory files the database file's mode.
            create_private(self.path)
        except IsADirectoryError:
            pass  # sqlite3 says what is wrong with that path
        except OSError as exc:
            raise JournalError(f"cannot create journal {self.path}: {exc.strerror}") from exc
        conn = self._conn = self._connect(str(self.path))
        mode = self._query_one(conn, "PRAGMA journal_mode = WAL")
        if str(mode).lower() != "wal":
            raise JournalError(f"journal {self.path}: the filesystem does not support WAL mode")
        self._run(conn, "PRAGMA synchronous = NORMAL")
        # After a checkpoint, truncate the WAL file rather than keep its high-water size.
        self._run(conn, "PRAGMA journal_size_limit = 67108864")
        self._check_schema(conn)
        self._run(conn, _SESSIONS_INDEX)  # journals from before it was in the schema
        self._load_state(conn)
        self._reader = self._connect(str(self.path))
        self._ready = True
        self._prune(time.time())

    def _lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            create_private(lock_path)
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise JournalError(
                f"cannot create the journal lock {lock_path}: {exc.strerror}"
            ) from exc
        self._lock_fd = fd  # closed by close(), also when taking the lock fails
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise JournalError(
                f"journal {self.path} is in use by another process (pid {holder})"
            ) from exc
        # The holder's pid, for the message above in the process that is refused.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _connect(self, database: str) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; commits use explicit BEGIN/COMMIT.
            # Each connection is used by one thread at a time (the writer's by its thread, the
            # reader's under _read_lock), which is what check_same_thread would enforce.
            return sqlite3.connect(
                database, timeout=1.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        app_id = self._query_one(conn, "PRAGMA application_id")
        version = self._query_one(conn, "PRAGMA user_version")
        if app_id == 0 and version == 0:
            if self._query_one(conn, "SELECT count(*) FROM sqlite_schema"):
                raise JournalError(f"{self.path} is an SQLite database but not a reclaimd journal")
            try:
                # One transaction, so a crash never leaves half a schema.
                conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise JournalError(f"cannot create journal {self.path}: {exc}") from exc
        elif app_id != APPLICATION_ID:
            raise JournalError(f"{self.path} is not a reclaimd journal (application_id {app_id})")
        elif version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema version {version}, written by a newer reclaimd;"
                f" this one reads up to version {SCHEMA_VERSION}"
            )
        elif version < 1:
            raise JournalError(f"journal {self.path} has an invalid schema version {version}")

    def _load_state(self, conn: sqlite3.Connection) -> None:
        try:
            max_id = conn.execute("SELECT max(id) FROM entries").fetchone()[0] or 0
            kept = conn.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
            self._last_id = self._done_id = max(max_id, kept[0] if kept else 0)
            self._rows_by_vm = Counter(
                dict(
                    conn.execute(
                        "SELECT vm, count(*) FROM entries INDEXED BY entries_by_vm GROUP BY vm"
                    ).fetchall()
                )
            )
            self._vms = {vm for (vm,) in conn.execute("SELECT vm FROM vms")}
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read journal {self.path}: {exc}") from exc

    # -- writing -------------------------------------------------------------------------------

    def submit(
        self,
        vm: str,
        kind: str,
        name: str,
        data: Mapping[str, Any] | None = None,
        qemu_time: float | None = None,
        recorded_at: float | None = None,
        *,
        count_as: str | None = None,
    ) -> int | None:
        """Hand one entry to the writer thread and return its id, without waiting; None when
        the journal has ``max_pending`` entries waiting and the entry is a QMP event.

        ``kind`` is one of :data:`KINDS` (else ``ValueError``). ``data`` that is not
        JSON-serializable is stored as its repr with ``data_is_repr`` set, never raised.
        ``recorded_at`` defaults to ``time.time()``. An event adds to the counter of its name,
        or of ``count_as``. Raises :class:`JournalError` when the journal is closed.
        """
        # One entry per QMP event: this is the event loop's cost per event, kept to the least.
        fields = _prepare(vm, kind, name, data, qemu_time, recorded_at, count_as, time.time())
        with self._state:
            if self._closing:
                raise JournalError(f"journal {self.path} is closed")
            if self._pending_rows >= self.max_pending and kind not in PRECIOUS_KINDS:
                return None
            self._last_id = entry_id = self._last_id + 1
            row = _Row(entry_id, *fields)
            self._last_id_by_vm[row.vm] = entry_id
            if len(self._last_id_by_vm) > _MAX_TRACKED_VMS:
                self._forget_acknowledged_vms()
            idle = not self._queue
            self._queue.append(row)
            self._pending_rows += 1
            if row.count_as is not None:
                self._uncounted.append(row)
            if idle or len(self._queue) >= MAX_BATCH:
                self._work.notify()  # see submit_many
        return entry_id

    def submit_many(self, entries: Iterable[NewEntry]) -> list[int] | None:
        """:meth:`submit` for several entries, committed in one transaction; all are taken or,
        when the journal is saturated and one of them is a QMP event, none (None)."""
        now = time.time()
        prepared = [_prepare(*entry, now) for entry in entries]
        if not prepared:
            return []
        with self._state:
            if self._closing:
                raise JournalError(f"journal {self.path} is closed")
            saturated = self._pending_rows + len(prepared) > self.max_pending
            if saturated and any(kind not in PRECIOUS_KINDS for _, kind, *_ in prepared):
                return None
            first = self._last_id + 1
            rows = [_Row(first + i, *fields) for i, fields in enumerate(prepared)]
            self._last_id = rows[-1].id
            for row in rows:
                self._last_id_by_vm[row.vm] = row.id
            if len(self._last_id_by_vm) > _MAX_TRACKED_VMS:
                self._forget_acknowledged_vms()
            idle = not self._queue
            self._queue.extend(rows)
            self._pending_rows += len(rows)
            self._uncounted.extend(r for r in rows if r.count_as is not None)
            # Waking the writer for each entry would cost a thread switch per event: it is
            # woken when work appears, lingers for more, and is woken again for a full batch.
            if idle or len(self._queue) >= MAX_BATCH:
                self._work.notify()
        return [row.id for row in rows]

    def _forget_acknowledged_vms(self) -> None:
        done = self._done_id
        self._last_id_by_vm = {v: i for v, i in self._last_id_by_vm.items() if i > done}

    def append(
        self,
        vm: str,
        kind: str,
        name: str,
        data: Mapping[str, Any] | None = None,
        qemu_time: float | None = None,
        recorded_at: float | None = None,
        *,
        count_as: str | None = None,
    ) -> int:
        """:meth:`submit`, then wait until the entry is acknowledged; returns its id.

        Raises :class:`JournalError` when its commit failed (disk full, I/O error): the entry
        is then not recorded.
        """
        entry = NewEntry(vm, kind, name, data, qemu_time, recorded_at, count_as)
        return self.append_many([entry])[0]

    def append_many(self, entries: Iterable[NewEntry]) -> list[int]:
        """Record several entries in one transaction (much cheaper per entry than separate
        appends), wait until they are acknowledged and return their ids, in order. All or none
        are recorded: :class:`JournalError` when the commit failed."""
        batch = list(entries)
        if len(batch) > MAX_BATCH:
            return [i for start in range(0, len(batch), MAX_BATCH)
                    for i in self.append_many(batch[start : start + MAX_BATCH])]  # fmt: skip
        while (ids := self.submit_many(batch)) is None:
            self.flush()  # saturated: wait for room, as a blocking caller may
        if ids:
            self._wait_done(ids[-1])
            for first, last, why in self._failed:
                if first <= ids[0] <= last:
                    raise JournalError(f"cannot append to journal {self.path}: {why}") from why
        return ids

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every entry submitted so far is acknowledged (or lost); False if that
        took longer than ``timeout`` seconds."""
        with self._state:
            target = self._last_id
        return self._wait_done(target, timeout)

    @property
    def acknowledged_id(self) -> int:
        """Every entry with an id up to this one is acknowledged (or was lost to a failed
        commit); the entries after it may still be lost."""
        return self._done_id

    def last_submitted(self, vm: str) -> int:
        """The id of the last entry submitted for ``vm`` in this process (0: none, or long
        acknowledged). :meth:`entries` shows it once ``acknowledged_id`` reaches it."""
        with self._state:
            return self._last_id_by_vm.get(_storable(vm), 0)

    def wait_acknowledged(self, entry_id: int, timeout: float | None = None) -> bool:
        """Wait until every entry up to ``entry_id`` is acknowledged (or lost); False if that
        took longer than ``timeout`` seconds. Blocks: not for the event loop."""
        return self._wait_done(entry_id, timeout)

    def _wait_done(self, entry_id: int, timeout: float | None = None) -> bool:
        with self._state:
            self._waiting += 1
            self._work.notify()  # someone waits: commit now rather than linger
            try:
                return self._done.wait_for(
                    lambda: self._done_id >= entry_id or self._thread is None, timeout
                )
            finally:
                self._waiting -= 1

    def prune(self, now: float | None = None) -> int:
        """Apply retention (age first, then count) and return how many entries were removed.

        Age is measured from ``now`` (default ``time.time()``). Event counters are kept: they are
        totals since the journal was created. Runs on the writer thread, after what was
        submitted before; waits for it.
        """
        when = time.time() if now is None else now
        return int(self._call(lambda: self._prune(when)))

    def close_dangling_attaches(self, cause: str) -> list[str]:
        """Record a detach with ``cause`` for every VM whose last attach has no detach (the
        process that attached it died), and return those VMs. Call once at start, before any
        session attaches."""
        self.flush()
        reader = self._read_connection()
        with self._read_lock:
            try:
                vms = [vm for (vm,) in reader.execute("SELECT vm FROM vms").fetchall()]
                dangling = [
                    (vm, row[0], row[1])
                    for vm in vms
                    if (row := reader.execute(_LAST_SESSION_ENTRY, (vm,)).fetchone()) is not None
                    and row[2] == "attach"
                ]
            except sqlite3.Error as exc:
                raise JournalError(f"cannot read journal {self.path}: {exc}") from exc
        self.append_many(
            NewEntry(vm, "detach", "detach", {"cause": cause, "attach_id": aid, "attached_at": at})
            for vm, aid, at in dangling
        )
        return [vm for vm, _, _ in dangling]

    def _call(self, run: Callable[[], Any]) -> Any:
        task = _Task(run)
        with self._state:
            if self._closing or self._thread is None:
                raise JournalError(f"journal {self.path} is closed")
            self._queue.append(task)
            self._work.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    # -- the writer thread ---------------------------------------------------------------------

    def _write_forever(self) -> None:
        while True:
            with self._state:
                while not self._queue and not self._closing:
                    self._work.wait()
                if not self._queue:
                    return  # closing, and everything is written
                # Group commit: let a flood collect into one transaction for a moment, unless
                # a batch is full, someone waits for the commit, or the journal closes.
                self._work.wait_for(
                    lambda: len(self._queue) >= MAX_BATCH or self._waiting or self._closing,
                    GROUP_LINGER,
                )
                head = self._queue[0]
                task = head if isinstance(head, _Task) else None
                batch: list[_Row] = []
                if task is not None:
                    self._queue.popleft()
                # Rows up to the next task: it runs after the rows submitted before it.
                while task is None and self._queue and len(batch) < MAX_BATCH:
                    row = self._queue[0]
                    if not isinstance(row, _Row):
                        break
                    self._queue.popleft()
                    batch.append(row)
            if task is not None:
                try:
                    task.result = task.run()
                except BaseException as exc:
                    task.error = exc
                task.done.set()
            else:
                self._commit_batch(batch)

    def _commit_batch(self, batch: list[_Row]) -> None:
        error: Exception | None = None
        try:
            self._insert(batch)
        except Exception as exc:  # nothing may stop the writer: the daemon would queue for ever
            cause = exc.__cause__
            error = cause if isinstance(cause, Exception) else exc
            JOURNAL_ERRORS.inc()
            log.error(
                "journal %s: %d entries (ids %d-%d) lost: %s",
                self.path, len(batch), batch[0].id, batch[-1].id, error,
            )  # fmt: skip
        else:
            if self.on_commit is not None:
                try:
                    self.on_commit(batch[0].id, batch[-1].id)
                except Exception:
                    log.exception("journal: on_commit failed")
            self._since_prune += len(batch)
            if self._since_prune >= self.prune_every:
                try:
                    self._prune(time.time())
                except JournalError as exc:
                    # The entries are recorded; retention retries at the next prune.
                    log.warning("journal retention failed: %s", exc)
        with self._state:
            if error is not None:
                self._failed.append((batch[0].id, batch[-1].id, error))
            self._pending_rows -= len(batch)
            last = batch[-1].id
            while self._uncounted and self._uncounted[0].id <= last:
                self._uncounted.popleft()
            self._done_id = last
            self._done.notify_all()

    def _insert(self, batch: list[_Row]) -> None:
        conn = self._connection()
        counted: Counter[tuple[str, str]] = Counter()
        by_vm: Counter[str] = Counter()
        for row in batch:
            by_vm[row.vm] += 1
            if row.count_as is not None:
                counted[row.vm, row.count_as] += 1
        new_vms = [vm for vm in by_vm if vm not in self._vms]
        try:
            conn.execute("BEGIN")
            try:
                conn.executemany(_INSERT_ENTRY, [row[:8] for row in batch])
                if counted:
                    conn.executemany(_COUNT_EVENT, [(*key, n) for key, n in counted.items()])
                if new_vms:
                    conn.executemany(
                        "INSERT OR IGNORE INTO vms VALUES (?)", [(v,) for v in new_vms]
                    )
                conn.execute(_SET_LAST_ID, (batch[-1].id,))
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise JournalError(f"cannot append to journal {self.path}: {exc}") from exc
        # Only a committed transaction changes the in-memory view.
        self._rows_by_vm.update(by_vm)
        self._vms.update(new_vms)

    def _prune(self, now: float) -> int:
        """Retention (see the module docstring), on the writer's connection."""
        conn = self._connection()
        cutoff = now - self.max_age_days * _SECONDS_PER_DAY
        removed: Counter[str] = Counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Per VM, so each delete is a range of the (vm, recorded_at) index.
                for vm in self._vms:
                    cursor = conn.execute(
                        "DELETE FROM entries WHERE vm = ? AND recorded_at < ?", (vm, cutoff)
                    )
                    removed[vm] += cursor.rowcount
                left = {vm: n - removed[vm] for vm, n in self._rows_by_vm.items()}
                for vm, keep in shares(left, self.max_events).items():
                    excess = left[vm] - keep
                    if excess > 0:
                        removed[vm] += self._delete_oldest(conn, vm, excess)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise JournalError(f"cannot prune journal {self.path}: {exc}") from exc
        self._rows_by_vm.subtract(removed)
        self._rows_by_vm = +self._rows_by_vm  # drop VMs left with nothing
        self._since_prune = 0
        return sum(removed.values())

    @staticmethod
    def _delete_oldest(conn: sqlite3.Connection, vm: str, n: int) -> int:
        """Delete ``vm``'s ``n`` oldest entries, its events and refusals before anything else."""
        deleted = conn.execute(
            "DELETE FROM entries WHERE id IN (SELECT id FROM entries INDEXED BY entries_by_vm"
            f" WHERE vm = ? AND kind NOT IN ({_PRECIOUS_SQL}) ORDER BY id LIMIT ?)",
            (vm, n),
        ).rowcount
        if deleted < n:
            deleted += conn.execute(
                "DELETE FROM entries WHERE id IN (SELECT id FROM entries INDEXED BY entries_by_vm"
                " WHERE vm = ? ORDER BY id LIMIT ?)",
                (vm, n - deleted),
            ).rowcount
        return deleted

    # -- reading -------------------------------------------------------------------------------

    def entries(
        self,
        vm: str,
        *,
        since: float | None = None,
        before_id: int | None = None,
        limit: int = 100,
        kinds: Collection[str] | None = None,
    ) -> list[JournalEntry]:
        """A page of ``vm``'s acknowledged entries, newest first.

        ``since`` keeps entries with ``recorded_at >= since`` (seconds since the epoch);
        ``before_id`` is the paging cursor: entries with ``id < before_id`` (pass the last id of
        the previous page); ``kinds`` keeps those kinds only (an empty collection matches
        nothing). At most ``limit`` entries.

        A page costs well under a millisecond at a million entries, except where the VM's
        history has to be walked: a ``kinds`` filter that matches few entries, or paging to the
        end of a ``since`` window of many entries (about 1 µs per entry walked; see
        bench/RESULTS-journal.md).
        """
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        reader = self._read_connection()
        if limit == 0 or (kinds is not None and not kinds):
            return []
        where = ["vm = ?"]
        params: list[object] = [_storable(vm)]
        if before_id is not None:
            where.append("id < ?")
            params.append(min(before_id, 2**63 - 1))  # SQLite integers are 64-bit
        if since is not None:
            where.append("recorded_at >= ?")
            params.append(since)
        if kinds is not None:
            kind_list = sorted(kinds)
            where.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            params.extend(kind_list)
        condition = " AND ".join(where)
        try:
            with self._read_lock:
                if since is not None and self._few_since(reader, condition, params, limit):
                    # Few entries that recent: collect their ids from the time index alone (no
                    # table reads), newest first, then read just those rows.
                    sql = (
                        f"{_SELECT_ENTRY} WHERE id IN (SELECT id FROM entries INDEXED BY"
                        f" entries_by_vm_time WHERE {condition} ORDER BY id DESC LIMIT ?)"
                        " ORDER BY id DESC"
                    )
                else:
                    # Walk the VM's entries newest first and stop at `limit`; with `since`, many
                    # entries match, and as recorded_at follows the append order they are the
                    # newest, so the walk stops early.
                    sql = (
                        f"{_SELECT_ENTRY} INDEXED BY entries_by_vm WHERE {condition}"
                        " ORDER BY id DESC LIMIT ?"
                    )
                rows = reader.execute(sql, [*params, limit]).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read journal {self.path}: {exc}") from exc
        return [_entry(*row) for row in rows]

    @staticmethod
    def _few_since(
        conn: sqlite3.Connection, condition: str, params: list[object], limit: int
    ) -> bool:
        """Whether fewer than a few thousand entries match (counted in the time index only,
        stopping there), so fetching all matches beats walking the VM's history."""
        cap = max(_FEW_MATCHES, 4 * limit)
        sql = (
            "SELECT count(*) FROM (SELECT 1 FROM entries INDEXED BY entries_by_vm_time"
            f" WHERE {condition} LIMIT ?)"
        )
        count: int = conn.execute(sql, [*params, cap]).fetchone()[0]
        return count < cap

    def event_counts(self, vm: str) -> dict[str, int]:
        """``event name -> QMP events recorded`` for ``vm``, since the journal was created,
        including events submitted and not yet acknowledged.

        Read from the file: the live counts are the VM's fleet record's, seeded from here when
        the VM is added.
        """
        reader = self._read_connection()
        key = _storable(vm)
        # The file's counts and its last committed id from one snapshot, then the events
        # submitted after that id. _state keeps the writer from forgetting rows meanwhile.
        with self._state, self._read_lock:
            try:
                reader.execute("BEGIN")
                try:
                    rows = reader.execute(
                        "SELECT name, count FROM event_counts WHERE vm = ?", (key,)
                    ).fetchall()
                    kept = reader.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
                finally:
                    reader.execute("COMMIT")
            except sqlite3.Error as exc:
                raise JournalError(f"cannot read journal {self.path}: {exc}") from exc
            counts = Counter(dict(rows))
            committed = kept[0] if kept else 0
            for row in self._uncounted:
                if row.id > committed and row.vm == key and row.count_as is not None:
                    counts[row.count_as] += 1
        return dict(counts)

    # -- closing -------------------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Commit what was submitted (waiting up to ``timeout`` seconds), close the database and
        release the writer's lock; further use raises JournalError. Closing twice is harmless."""
        with self._state:
            self._closing = True
            self._work.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("journal %s: the writer did not finish in %g s", self.path, timeout)
        with self._state:
            self._done.notify_all()  # waiters of a journal that will not commit any more
        reader, self._reader = self._reader, None
        if reader is not None:
            with self._read_lock:
                reader.close()
        conn, self._conn = self._conn, None
        if conn is not None and (thread is None or not thread.is_alive()):
            try:
                if self._ready:
                    conn.execute("PRAGMA optimize")
            except sqlite3.Error as exc:
                log.warning("journal %s: optimize on close failed: %s", self.path, exc)
            finally:
                conn.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._conn

    def _read_connection(self) -> sqlite3.Connection:
        if self._reader is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._reader

    def _query_one(self, conn: sqlite3.Connection, sql: str) -> Any:
        try:
            return conn.execute(sql).fetchone()[0]
        except sqlite3.Error as exc:
            raise JournalError(f"cannot use journal {self.path}: {exc}") from exc

    def _run(self, conn: sqlite3.Connection, sql: str) -> None:
        try:
            conn.execute(sql)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot use journal {self.path}: {exc}") from exc


_LAST_SESSION_ENTRY = (
    "SELECT id, recorded_at, kind FROM entries WHERE id = (SELECT max(id) FROM entries"
    " INDEXED BY entries_sessions WHERE vm = ? AND kind IN ('attach', 'detach'))"
)


def shares(rows_by_vm: Mapping[str, int], total: int) -> dict[str, int]:
    """How many entries each VM may keep of ``total``: an equal share each, and what VMs below
    their share leave unused split equally among the others (water-filling)."""
    quotas: dict[str, int] = {}
    left, count = total, len(rows_by_vm)
    for i, (vm, rows) in enumerate(sorted(rows_by_vm.items(), key=lambda item: item[1])):
        share = left // (count - i)
        quotas[vm] = min(rows, share)
        left -= quotas[vm]
    return quotas


def _prepare(
    vm: str,
    kind: str,
    name: str,
    data: Mapping[str, Any] | None,
    qemu_time: float | None,
    recorded_at: float | None,
    count_as: str | None,
    now: float,
) -> tuple[str, str, str, str, int, float | None, float, str | None]:
    """A row's fields but its id: checked, encoded, ready for the writer."""
    if kind not in KINDS:
        raise ValueError(f"unknown journal entry kind {kind!r}; expected one of {sorted(KINDS)}")
    text, is_repr = _encode_data(data)
    counter = None if kind != "event" else _storable(name if count_as is None else count_as)
    return (
        _storable(vm),
        kind,
        _storable(name),
        text,
        is_repr,
        _finite_or_none(qemu_time),
        now if recorded_at is None else _finite(recorded_at),
        counter,
    )


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.rollback()


def _entry(
    entry_id: int,
    vm: str,
    kind: str,
    name: str,
    text: str,
    is_repr: int,
    qemu_time: float | None,
    recorded_at: float,
) -> JournalEntry:
    data: dict[str, Any]
    if is_repr:
        data = {"repr": text}
    else:
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded, is_repr = {"repr": text}, 1
        if _ESCAPED_SURROGATE.search(text):
            # Written by an older reclaimd, which stored such text as it came.
            decoded = _valid_text(decoded)
        data = decoded if isinstance(decoded, dict) else {"value": decoded}
    return JournalEntry(entry_id, vm, kind, name, data, qemu_time, recorded_at, bool(is_repr))


def _encode_data(data: Mapping[str, Any] | None) -> tuple[str, int]:
    """The payload as JSON text, or as a bounded repr (flagged) when it cannot be JSON."""
    if not data:
        return "{}", 0
    try:
        text = _encode_json(dict(data))
        if "\\u" in text and _ESCAPED_SURROGATE.search(text):
            # Stored as is, it would decode to text no response can encode.
            text = _encode_json(_valid_text(dict(data)))
    # The caller's data must never break recording: anything that fails becomes a repr
    # (TypeError: not serializable; ValueError: NaN, circular, or an int too long to print;
    # RecursionError: nested too deep).
    except Exception:
        return _bounded_repr(data), 1
    if len(text) > MAX_DATA_CHARS:
        return text[:MAX_REPR_CHARS], 1
    return text, 0


def _valid_text(value: object) -> Any:
    """``value`` with its text made valid (lone surrogates replaced), nothing else bounded."""
    big = 1 << 20
    return clean_json(value, max_depth=64, max_items=big, max_text=big, max_nodes=big)


def _bounded_repr(value: object) -> str:
    try:
        text = _repr.repr(value)
    except Exception:  # e.g. a __repr__ that raises, or an int too long to print
        text = f"<unrepresentable {type(value).__name__}>"
    return _storable(text[:MAX_REPR_CHARS])


def _storable(text: str) -> str:
    """``text`` as SQLite can store it (valid UTF-8): lone surrogates are escaped."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text


def _finite(value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"recorded_at must be finite, not {value}")
    return value


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return value if math.isfinite(value) else None
