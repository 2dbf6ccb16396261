"""SQLite's connections and threads: one writer thread, reader threads, each with its own connection.

SQLite has one writer anyway: writes go through one thread that owns the only writing
connection. Reads run on reader threads, each with its own connection, which WAL lets run beside
the writer. The event loop never runs a query: it awaits them.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlite_utils import Database

from ..base import JobStore
from ..handoff import Handoff, Outcome
from .schema import migrations

if TYPE_CHECKING:
    from ..reads import Reads

T = TypeVar("T")

# Threads that read the store. One: what a read costs is mostly Python (rows into jobs, jobs into
# views), which holds the GIL, so more readers only fight the event loop for it. Measured with
# bench/burst.py (15 s at the full burst's rate): /healthz p99 52 ms with one reader, 1.3 s with
# two or four, and the API's own p50 75 ms against 0.8 s.
READER_THREADS = 1
# Writes the writer thread commits in one transaction at most (those waiting when it takes one).
WRITES_TOGETHER = 64
# A rowid (a job's `seq`, an audit entry's id) above every row's. A newest-first page asks for
# rows below it, so that SQLite seeks to the newest rows rather than walking the table for them.
AFTER_NEWEST = 2**63 - 1


def timestamp() -> float:
    return time.time()


def _connect(path: Path) -> sqlite3.Connection:
    # Each connection is used by the one thread that made it (`SqliteThreads._conn`); only
    # `close` touches it from another, once every thread is done.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    # Readers and the writer wait for each other a little instead of failing at once.
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def each_chunk(conn: sqlite3.Connection, sql: str, values: list[Any], args: tuple = ()) -> list[Any]:
    """The rows of `sql` for `values` in its `IN ({marks})`, 500 at a time (SQLite's limit on
    bound parameters); `args` are the parameters before the list."""
    rows: list[Any] = []
    for start in range(0, len(values), 500):
        chunk = values[start:start + 500]
        rows += conn.execute(sql.format(marks=",".join("?" * len(chunk))), (*args, *chunk)).fetchall()
    return rows


class Rows:
    """Reads on one connection (the store's `Reads` are made of these, one class per idea)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class SqliteThreads(JobStore):
    """The plumbing of the SQLite store: the file, its migrations, its threads and connections.

    A read of a 500-job page or a scan gone wrong then costs the loop nothing but the hand-off,
    and `/healthz` answers while it runs.
    """

    # Every idea's reads on one connection (`SqliteStore` sets it).
    _reads: Callable[[sqlite3.Connection], Reads]

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = Database(path)
        db.enable_wal()
        migrations.apply(db)
        db.close()
        self._local = threading.local()
        # Every connection, by the thread (name, id) it belongs to.
        self._conns: dict[tuple[str, int], sqlite3.Connection] = {}
        self._conns_lock = threading.Lock()
        self._writer = Handoff(1, "x2v-store-writer", together=self._in_one_transaction, most=WRITES_TOGETHER)
        self._readers = Handoff(READER_THREADS, "x2v-store-reader")

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (each reader thread, the writer, a test's own thread)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            # WAL with synchronous=NORMAL is durable across a process crash (SIGKILL), which
            # is the failure the gateway is built to survive; only a power loss can drop the
            # last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
            with self._conns_lock:
                self._conns[(threading.current_thread().name, threading.get_ident())] = conn
        return conn

    def read_blocking(self, fn: Callable[[Reads], T]) -> T:
        return fn(self._reads(self._conn()))

    async def read(self, fn: Callable[[Reads], T]) -> T:
        return await self._readers.run(lambda: fn(self._reads(self._conn())))

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the writer thread, all or nothing (a savepoint in the writer's transaction,
        `_in_one_transaction`): its result once it is committed."""
        return await self._writer.run(fn)

    def _in_one_transaction(self, writes: list[Callable[[sqlite3.Connection], Any]]) -> list[Outcome]:
        """The writes waiting together, on the writer thread, in one transaction (a group commit):
        each in a savepoint of its own, so that one that fails is undone alone.

        A start sends 2,000 jobs, each claimed in a write of its own: one transaction each took
        the writer about 1 ms (the commit writes every page the claim touched to the WAL), and
        the last job reached its node 2 s after the first round. Each write still learns its
        outcome only once it is committed, and the writes run in the order they were given.
        """
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")  # waits up to the busy timeout for another process
            outcomes: list[Outcome] = []
            for fn in writes:
                conn.execute("SAVEPOINT one_write")
                try:
                    outcomes.append((True, fn(conn)))
                except BaseException as exc:  # handed to the write's caller
                    if not conn.in_transaction:
                        raise  # SQLite undid the whole transaction (a full disk, an I/O error)
                    conn.execute("ROLLBACK TO one_write")
                    outcomes.append((False, exc))
                conn.execute("RELEASE one_write")
            conn.execute("COMMIT")
            return outcomes
        except BaseException as exc:  # the transaction is lost: so is every write in it
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return [(False, exc)] * len(writes)

    async def _execute(self, sql: str, args: tuple) -> int:
        """One statement in a write of its own: how many rows it changed."""
        return await self._write(lambda conn: conn.execute(sql, args).rowcount)

    def close(self) -> None:
        self._writer.close()
        self._readers.close()
        with self._conns_lock:
            conns, self._conns = self._conns, {}
        for conn in conns.values():
            conn.close()
        self._local = threading.local()

    async def is_writable(self) -> bool:
        # Asked on the writer thread: taking the write lock waits up to the busy timeout (5 s)
        # while another writer holds it, which must not stall the event loop.
        try:
            await self._write(lambda conn: None)
            return True
        except sqlite3.Error:
            return False
