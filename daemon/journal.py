"""Durable event journal: QMP events, attaches, detaches and REST balloon requests, per VM.

The journal is one SQLite database in WAL mode with ``synchronous=NORMAL``. Each append is one
small transaction written to the WAL without an fsync: when ``append`` returns, the entry is in
the operating system's hands, so it survives a crash or kill of the daemon; a power loss can lose
the entries since the last checkpoint (which fsyncs) but leaves the file consistent. Readers in
other processes see committed entries at once (WAL readers never block the writer).

Retention keeps the file bounded: entries older than ``max_age_days`` and the oldest entries beyond
``max_events`` (across all VMs) are deleted on open, every ``prune_every`` appends, and whenever
:meth:`Journal.prune` is called (the daemon should call it periodically, so age retention also
applies while the journal is quiet). Per-(VM, event) counters live in their own table, so
``qemu_events_total`` keeps counting across restarts and pruning.

Entry ids increase monotonically for the life of the file, also across pruning and restarts; they
are the paging cursor of ``GET /api/v1/vms/{name}/events``.

One process uses a journal at a time: it takes an exclusive lock on ``PATH.lock`` and a second
process gets :class:`JournalError`.

A ``Journal`` is for single-threaded use, from the daemon's event loop: appends take tens of
microseconds, so they are made inline rather than from a thread. The connection refuses use from
another thread.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import reprlib
import sqlite3
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
#: the REST API.
KINDS = frozenset({"event", "attach", "detach", "request"})

SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a journal ("RCLM"), so another program's database is refused.
APPLICATION_ID = 0x52434C4D
#: Encoded JSON payloads above this size are stored as a truncated repr instead.
MAX_DATA_CHARS = 65536
MAX_REPR_CHARS = 4096
_SECONDS_PER_DAY = 86400.0
# Up to this many entries matching `since`, entries() reads them all through the time index.
_FEW_MATCHES = 4096

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
CREATE TABLE event_counts (
    vm TEXT NOT NULL,
    name TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (vm, name)
) WITHOUT ROWID;
CREATE TABLE vms (vm TEXT PRIMARY KEY) WITHOUT ROWID;
-- last_id: the highest id ever assigned, kept when pruning deletes the newest rows.
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
_SELECT_ENTRY = "SELECT id, vm, kind, name, data, data_is_repr, qemu_time, recorded_at FROM entries"

_encode_json = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200
_repr.maxlevel = 4


class JournalError(Exception):
    """The journal cannot be used: the path is not writable, the file is not a journal or is
    corrupt, another process uses it, or the journal is closed. The cause, if any, is kept
    as ``__cause__``."""


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
    """An entry to record with :meth:`Journal.append_many`; fields as in :meth:`Journal.append`."""

    vm: str
    kind: str
    name: str
    data: Mapping[str, Any] | None = None
    qemu_time: float | None = None
    recorded_at: float | None = None


def qmp_timestamp(timestamp: object) -> float | None:
    """Seconds since the epoch from a QMP event's ``timestamp`` member
    (``{"seconds": S, "microseconds": U}``); None when absent, malformed or the ``-1`` QEMU
    writes when it could not read the clock."""
    if not isinstance(timestamp, Mapping):
        return None
    seconds, micros = timestamp.get("seconds"), timestamp.get("microseconds")
    if type(seconds) is not int or type(micros) is not int:
        return None
    if seconds < 0 or not 0 <= micros < 1_000_000:
        return None
    return seconds + micros / 1e6


class Journal:
    """The event journal at ``path``; see the module docstring for durability and retention.

    Raises :class:`JournalError` when the path cannot be created or written, when the file is not
    a journal (garbage, another program's database, a newer schema), or when another process
    holds it.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_events: int = 1_000_000,
        max_age_days: float = 30.0,
        prune_every: int = 1000,
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
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        # The writer's view of the file, kept in memory so appends need no reads; valid because
        # only this Journal writes (see the lock).
        self._last_id = 0
        self._rows = 0
        self._vms: set[str] = set()
        self._since_prune = 0
        self._ready = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(
                f"cannot create the journal's directory {self.path.parent}: {exc.strerror}"
            ) from exc
        self._lock()
        conn = self._conn = self._connect(str(self.path))
        mode = self._query_one(conn, "PRAGMA journal_mode = WAL")
        if str(mode).lower() != "wal":
            raise JournalError(f"journal {self.path}: the filesystem does not support WAL mode")
        self._run(conn, "PRAGMA synchronous = NORMAL")
        # After a checkpoint, truncate the WAL file rather than keep its high-water size.
        self._run(conn, "PRAGMA journal_size_limit = 67108864")
        self._check_schema(conn)
        self._load_state(conn)
        self._ready = True
        self.prune()

    def _lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
            # isolation_level=None: no implicit transactions; appends use explicit BEGIN/COMMIT.
            return sqlite3.connect(database, timeout=1.0, isolation_level=None)
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
            self._last_id = max(max_id, kept[0] if kept else 0)
            self._rows = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
            self._vms = {vm for (vm,) in conn.execute("SELECT vm FROM vms")}
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read journal {self.path}: {exc}") from exc

    # -- writing -------------------------------------------------------------------------------

    def append(
        self,
        vm: str,
        kind: str,
        name: str,
        data: Mapping[str, Any] | None = None,
        qemu_time: float | None = None,
        recorded_at: float | None = None,
    ) -> int:
        """Record one entry and return its id.

        ``kind`` is one of :data:`KINDS` (else ``ValueError``). ``data`` that is not
        JSON-serializable is stored as its repr with ``data_is_repr`` set, never raised.
        ``recorded_at`` defaults to ``time.time()``. Raises :class:`JournalError` when the
        database fails (disk full, I/O error); the entry is then not recorded.
        """
        return self.append_many([NewEntry(vm, kind, name, data, qemu_time, recorded_at)])[0]

    def append_many(self, entries: Iterable[NewEntry]) -> list[int]:
        """Record several entries in one transaction (about three times cheaper per entry than
        separate appends) and return their ids, in order. All or none are recorded."""
        conn = self._connection()
        now = time.time()
        rows: list[tuple[int, str, str, str, str, int, float | None, float]] = []
        counted: Counter[tuple[str, str]] = Counter()
        new_vms: list[str] = []
        next_id = self._last_id
        for vm, kind, name, data, qemu_time, recorded_at in entries:
            if kind not in KINDS:
                raise ValueError(
                    f"unknown journal entry kind {kind!r}; expected one of {sorted(KINDS)}"
                )
            vm, name = _storable(vm), _storable(name)
            text, is_repr = _encode_data(data)
            next_id += 1
            rows.append(
                (
                    next_id,
                    vm,
                    kind,
                    name,
                    text,
                    is_repr,
                    _finite_or_none(qemu_time),
                    now if recorded_at is None else _finite(recorded_at),
                )
            )
            if kind == "event":
                counted[vm, name] += 1
            if vm not in self._vms and vm not in new_vms:
                new_vms.append(vm)
        if not rows:
            return []
        try:
            conn.execute("BEGIN")
            try:
                conn.executemany(_INSERT_ENTRY, rows)
                if counted:
                    conn.executemany(_COUNT_EVENT, [(*key, n) for key, n in counted.items()])
                if new_vms:
                    conn.executemany(
                        "INSERT OR IGNORE INTO vms VALUES (?)", [(v,) for v in new_vms]
                    )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise JournalError(f"cannot append to journal {self.path}: {exc}") from exc
        # Only a committed transaction changes the in-memory view.
        self._last_id = next_id
        self._rows += len(rows)
        self._vms.update(new_vms)
        self._since_prune += len(rows)
        if self._since_prune >= self.prune_every:
            try:
                self.prune()
            except JournalError as exc:
                # The entries are recorded; retention retries at the next prune.
                log.warning("journal retention failed: %s", exc)
        return [row[0] for row in rows]

    def prune(self, now: float | None = None) -> int:
        """Apply retention (age first, then count) and return how many entries were removed.

        Age is measured from ``now`` (default ``time.time()``). Event counters are kept: they are
        totals since the journal was created.
        """
        conn = self._connection()
        cutoff = (time.time() if now is None else now) - self.max_age_days * _SECONDS_PER_DAY
        removed = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Recorded before deleting, in case the newest rows go: ids must never be reused.
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_id', ?)",
                    (self._last_id,),
                )
                # Per VM, so each delete is a range of the (vm, recorded_at) index.
                for vm in self._vms:
                    cursor = conn.execute(
                        "DELETE FROM entries WHERE vm = ? AND recorded_at < ?", (vm, cutoff)
                    )
                    removed += cursor.rowcount
                excess = self._rows - removed - self.max_events
                if excess > 0:
                    cursor = conn.execute(
                        "DELETE FROM entries WHERE id IN"
                        " (SELECT id FROM entries ORDER BY id LIMIT ?)",
                        (excess,),
                    )
                    removed += cursor.rowcount
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise JournalError(f"cannot prune journal {self.path}: {exc}") from exc
        self._rows -= removed
        self._since_prune = 0
        return removed

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
        """A page of ``vm``'s entries, newest first.

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
        if limit == 0 or (kinds is not None and not kinds):
            return []
        where = ["vm = ?"]
        params: list[object] = [_storable(vm)]
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        if since is not None:
            where.append("recorded_at >= ?")
            params.append(since)
        if kinds is not None:
            kind_list = sorted(kinds)
            where.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            params.extend(kind_list)
        condition = " AND ".join(where)
        try:
            conn = self._connection()
            if since is not None and self._few_since(conn, condition, params, limit):
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
            rows = conn.execute(sql, [*params, limit]).fetchall()
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
        """``event name -> QMP events recorded`` for ``vm``, since the journal was created.

        Read from the file: the live counts are the VM's fleet record's, seeded from here when
        the VM is added.
        """
        conn = self._connection()
        try:
            rows = conn.execute(
                "SELECT name, count FROM event_counts WHERE vm = ?", (_storable(vm),)
            ).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read journal {self.path}: {exc}") from exc
        return dict(rows)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database and release the writer's lock; further use raises JournalError.
        Closing twice is harmless."""
        conn, self._conn = self._conn, None
        if conn is not None:
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
        data = decoded if isinstance(decoded, dict) else {"value": decoded}
    return JournalEntry(entry_id, vm, kind, name, data, qemu_time, recorded_at, bool(is_repr))


def _encode_data(data: Mapping[str, Any] | None) -> tuple[str, int]:
    """The payload as JSON text, or as a bounded repr (flagged) when it cannot be JSON."""
    if not data:
        return "{}", 0
    try:
        text = _encode_json(dict(data))
    # The caller's data must never break recording: anything that fails becomes a repr
    # (TypeError: not serializable; ValueError: NaN, circular, or an int too long to print).
    except Exception:
        return _bounded_repr(data), 1
    if len(text) > MAX_DATA_CHARS:
        return text[:MAX_REPR_CHARS], 1
    return text, 0


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
    value = float(value)
    return value if math.isfinite(value) else None
