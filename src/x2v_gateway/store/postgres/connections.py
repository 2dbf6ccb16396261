"""PostgreSQL's connections and threads: a pool for reads, a pool for writes, threads to run them.

psycopg 3's synchronous API is used from threads, as the SQLite store runs its queries: every
read and write the rest of the store is written against (`Reads`, the conditional UPDATEs) stays
a plain function on one connection, awaited off the event loop. Unlike SQLite, PostgreSQL takes
writers at once, from this process and from every other replica: each write is one transaction,
run again when PostgreSQL picks it as a deadlock's victim or a serialization failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import IsolationLevel, errors
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import ConnectionPool

from ...settings import redact_url
from ..base import JobStore
from ..handoff import Handoff
from .schema import apply_migrations

if TYPE_CHECKING:
    from ..reads import Reads

T = TypeVar("T")
log = logging.getLogger("x2v_gateway.store")

# Threads (and connections) for reads and for writes. A read's cost is mostly Python turning rows
# into jobs, which holds the GIL (see the SQLite store's READER_THREADS), but here each query also
# waits on the network, which does not: a few threads keep the server busy while one computes.
READER_THREADS = 4
WRITER_THREADS = 4
# A write picked as a deadlock's victim (two replicas moving jobs of one owner between the same
# states in opposite orders) or failing serialization is run again, this many times at most.
WRITE_ATTEMPTS = 6
AFTER_NEWEST = 2**63 - 1
# Seconds a read or write waits for a connection of its pool (the database down or full).
POOL_TIMEOUT = 10.0


def timestamp() -> float:
    return time.time()


def rows(conn: psycopg.Connection, sql: str, args: Any = ()) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(sql, args).fetchall()


def one(conn: psycopg.Connection, sql: str, args: Any = ()) -> dict[str, Any] | None:
    return conn.cursor(row_factory=dict_row).execute(sql, args).fetchone()


def tuples(conn: psycopg.Connection, sql: str, args: Any = ()) -> list[tuple]:
    return conn.cursor(row_factory=tuple_row).execute(sql, args).fetchall()


def value(conn: psycopg.Connection, sql: str, args: Any = ()) -> Any:
    row = conn.cursor(row_factory=tuple_row).execute(sql, args).fetchone()
    return row[0] if row else None


def changed(conn: psycopg.Connection, sql: str, args: Any = ()) -> int:
    """Run one statement: how many rows it changed."""
    return conn.execute(sql, args).rowcount


class PgRows:
    """Reads on one connection (the store's `Reads` are made of these, one class per idea)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn


def _configure_reader(conn: psycopg.Connection) -> None:
    # Each `read(fn)` sees one consistent view of the store, as a SQLite read transaction does.
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    conn.read_only = True


class PostgresThreads(JobStore):
    """The plumbing of the PostgreSQL store: its migrations, pools and threads."""

    # Every idea's reads on one connection (`PostgresStore` sets it).
    _reads: Callable[[psycopg.Connection], Reads]

    def __init__(self, url: str) -> None:
        self.url = url
        with psycopg.connect(url, autocommit=True) as conn:
            apply_migrations(conn)
        # check: a connection is pinged as it is handed out, so one broken by a database restart
        # or a failover is replaced before a query fails on it (a write is never run twice: it
        # may have committed before the connection broke). timeout: a thread waits this long
        # for a connection, then the call fails (/readyz says not ready) rather than hanging.
        pools = {"min_size": 1, "check": ConnectionPool.check_connection, "timeout": POOL_TIMEOUT, "open": True}
        self._read_pool = ConnectionPool(
            url, max_size=READER_THREADS, configure=_configure_reader, name="x2v-store-read", **pools,
        )
        self._write_pool = ConnectionPool(
            url, max_size=WRITER_THREADS, kwargs={"autocommit": True}, name="x2v-store-write", **pools,
        )
        self._writers = Handoff(WRITER_THREADS, "x2v-store-writer")
        self._readers = Handoff(READER_THREADS, "x2v-store-reader")

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    def read_blocking(self, fn: Callable[[Reads], T]) -> T:
        with self._read_pool.connection() as conn:
            return fn(self._reads(conn))

    async def read(self, fn: Callable[[Reads], T]) -> T:
        return await self._readers.run(lambda: self.read_blocking(fn))

    def write_blocking(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run `fn` in one transaction on the calling thread, again if PostgreSQL asks."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self._write_pool.connection() as conn, conn.transaction():
                    return fn(conn)
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
                log.info("store write run again (%s)", type(exc).__name__)
                time.sleep(0.005 * 2**attempt)
        raise AssertionError("unreachable")

    async def _write(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run `fn` in one transaction on a writer thread."""
        return await self._writers.run(lambda: self.write_blocking(fn))

    async def _execute(self, sql: str, args: Any) -> int:
        """One statement in a transaction of its own: how many rows it changed."""
        return await self._write(lambda conn: changed(conn, sql, args))

    def close(self) -> None:
        self._writers.close()
        self._readers.close()
        self._read_pool.close()
        self._write_pool.close()

    async def is_writable(self) -> bool:
        try:
            await self._write(lambda conn: conn.execute("SELECT 1"))
            return True
        except psycopg.Error:
            return False
