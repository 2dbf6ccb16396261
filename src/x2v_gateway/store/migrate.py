"""Moving a deployment's store from its SQLite file into PostgreSQL (`x2v-gateway migrate-store`).

Every table is copied in chunks, each chunk committed: a copy that stops half-way (Ctrl-C, a lost
connection) is run again and picks up, and a copy run twice changes nothing. Rows that can
change (jobs, keys, nodes, sessions, quotas) are upserted, so a second run after the gateway
served a little longer on SQLite brings PostgreSQL up to date; history (job events, the audit
log) is only ever added to. The counts that triggers keep (jobs by state, queue blocks) follow
the copied jobs by themselves.

Blobs are not in the store: they stay where X2V_DATA_DIR keeps them. A blob store elsewhere
(S3) copies them with its own step, after this one (`BLOB_STEPS`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from ..blobs.migrate import copy_step
from .base import JobStore

CHUNK = 5000


@dataclass(frozen=True)
class Table:
    name: str
    key: tuple[str, ...]
    flags: tuple[str, ...] = ()  # 0/1 in SQLite, booleans in PostgreSQL
    history: bool = False  # rows are never changed once written: only added
    serial: str | None = None  # a column PostgreSQL numbers itself: its sequence follows the copy


# In an order that keeps every reference valid.
TABLES = (
    Table("blobs", ("sha256",)),
    Table("jobs", ("seq",), flags=("cancel_pending", "files_expired"), serial="seq"),
    Table("job_events", ("id",), history=True, serial="id"),
    Table("batches", ("id",)),
    Table("batch_jobs", ("job_id",)),
    Table("nodes", ("name",), flags=("drained", "removed")),
    Table("stray_tasks", ("node", "task_id")),
    Table("api_keys", ("id",), flags=("admin",)),
    Table("sessions", ("id_hash",)),
    Table("key_usage", ("key_id", "day")),
    Table("audit", ("id",), history=True, serial="id"),
    Table("job_webhooks", ("job_id",)),
    Table("webhook_deliveries", ("id",)),
    Table("webhook_cursor", ("id",)),
    Table("pipelines", ("seq",), flags=("files_expired",), serial="seq"),
    Table("pipeline_steps", ("pipeline_id", "n")),
    Table("pipeline_webhooks", ("pipeline_id",)),
    Table("pipeline_events", ("id",), history=True, serial="id"),
    Table("foreign_ids", ("owner", "surface", "foreign_id")),
)
# SQLite tables that are not copied: kept by triggers from the jobs, SQLite's own, and the
# leases of the replicas that ran on the file (none runs once the store has moved).
DERIVED = {"job_counts", "queue_blocks", "_sqlite_migrations", "replicas"}

# Steps run after the store's copy, each given (settings, progress callback): where another
# blob store (S3) adds the copy of the files. Each returns a line for the summary.
BLOB_STEPS: list[Callable[..., str]] = [copy_step]


class MigrationRefused(RuntimeError):
    """The target holds another deployment's jobs: copying would mix two histories."""


@dataclass
class Copied:
    """What one run moved, table by table."""

    rows: dict[str, int] = field(default_factory=dict)  # rows read from SQLite and written
    new: dict[str, int] = field(default_factory=dict)  # of them, not in PostgreSQL before
    skipped: list[str] = field(default_factory=list)  # SQLite tables this copy does not know


def count_rows(source: Path) -> dict[str, int]:
    """Rows per table to copy: the progress bars' totals."""
    with _open_source(source) as conn:
        return {t.name: conn.execute(f"SELECT count(*) FROM {t.name}").fetchone()[0] for t in TABLES}


def migrate_store(source: Path, target: str, progress: Callable[[str, int], None] = lambda table, n: None) -> Copied:
    """Copy the SQLite store at `source` into the PostgreSQL database `target`.

    `progress(table, rows)` is called after each chunk. Run it with the gateway stopped (or
    run it again after stopping it: the second run copies what changed meanwhile).
    """
    # Both schemas brought up to date: SQLite's so every column exists, PostgreSQL's so every
    # table does.
    for location in (source, target):
        JobStore(location).close()
    copied = Copied()
    with _open_source(source) as src, psycopg.connect(target) as dst:
        _refuse_another_deployment(src, dst)
        names = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        copied.skipped = sorted(n for n in names - {t.name for t in TABLES} - DERIVED if not n.startswith("sqlite_"))
        for table in TABLES:
            rows = new = 0
            for chunk, columns in _chunks(src, table):
                added = _write_chunk(dst, table, columns, chunk)
                dst.commit()
                rows += len(chunk)
                new += added
                progress(table.name, len(chunk))
            copied.rows[table.name], copied.new[table.name] = rows, new
        for table in TABLES:
            if table.serial:
                dst.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table.name}', '{table.serial}'),"
                    f" (SELECT coalesce(max({table.serial}), 0) + 1 FROM {table.name}), false)"
                )
        dst.commit()
    return copied


def _open_source(source: Path) -> sqlite3.Connection:
    if not source.is_file():
        raise FileNotFoundError(f"no SQLite store at {source}")
    return sqlite3.connect(f"file:{source}?mode=ro", uri=True)


def _refuse_another_deployment(src: sqlite3.Connection, dst: psycopg.Connection) -> None:
    """A PostgreSQL database already serving other jobs would have them overwritten seq by seq."""
    row = dst.execute("SELECT seq, id FROM jobs ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return
    mine = src.execute("SELECT id FROM jobs WHERE seq = ?", (row[0],)).fetchone()
    if mine is None or mine[0] != row[1]:
        raise MigrationRefused(
            f"the PostgreSQL database already holds jobs that are not this SQLite file's (job"
            f" {row[1]}): copy into an empty database"
        )


def _chunks(src: sqlite3.Connection, table: Table) -> Iterator[tuple[list[tuple], list[str]]]:
    """The table's rows in key order, CHUNK at a time (a keyset walk: no OFFSET)."""
    columns = [r[1] for r in src.execute(f"PRAGMA table_info({table.name})")]
    key = ", ".join(table.key)
    after: tuple | None = None
    while True:
        where = f"WHERE ({key}) > ({', '.join('?' * len(table.key))})" if after else ""
        chunk = src.execute(
            f"SELECT {', '.join(columns)} FROM {table.name} {where} ORDER BY {key} LIMIT {CHUNK}", after or ()
        ).fetchall()
        if not chunk:
            return
        yield chunk, columns
        last = chunk[-1]
        after = tuple(last[columns.index(k)] for k in table.key)


def _write_chunk(dst: psycopg.Connection, table: Table, columns: list[str], chunk: list[tuple]) -> int:
    """Upsert one chunk (history: insert what is missing); how many rows were new.

    The rows go in with COPY into a scratch table, then one INSERT … SELECT: a million jobs
    copy in minutes, where a statement per row took many times longer.
    """
    flags = [columns.index(c) for c in table.flags]
    names = ", ".join(columns)
    dst.execute(f"CREATE TEMP TABLE IF NOT EXISTS incoming_{table.name} (LIKE {table.name}) ON COMMIT DELETE ROWS")
    with dst.cursor().copy(f"COPY incoming_{table.name} ({names}) FROM STDIN") as copy:
        for row in chunk:
            values = list(row)
            for i in flags:
                values[i] = None if values[i] is None else bool(values[i])
            copy.write_row(values)
    key = ", ".join(table.key)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in table.key)
    conflict = f"DO UPDATE SET {updates}" if updates and not table.history else "DO NOTHING"
    # xmax = 0: the row was inserted, not updated (a row skipped by DO NOTHING returns none).
    return dst.execute(
        f"WITH written AS (INSERT INTO {table.name} ({names}) SELECT {names} FROM incoming_{table.name}"
        f" ORDER BY {key} ON CONFLICT ({key}) {conflict} RETURNING (xmax = 0) AS new)"
        " SELECT count(*) FILTER (WHERE new) FROM written"
    ).fetchone()[0]
