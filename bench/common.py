"""Shared by the benchmarks: real processes on 127.0.0.1, a store with a long history, and small
statistics helpers."""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gateway_proc import GatewayProcess, wait_for  # noqa: E402
from media import make_big_wav, make_png, make_wav  # noqa: E402
from servers import NodeProcess, free_port  # noqa: E402

__all__ = ["GatewayProcess", "History", "NodeProcess", "STORE_CACHE", "fill_store", "free_port", "key_secret",
           "make_big_wav", "make_png", "make_wav", "percentile", "median", "rss_peak_mb", "wait_for"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


# -- A store with a long history, filled through SQL (and cached: filling a million jobs takes minutes)

OWNER = "kbench"
# Filled stores are kept here between runs, by the fill's parameters, the schema they were filled
# on and the filler's code; delete the directory to reclaim the space (or pass cache=False).
STORE_CACHE = Path(tempfile.gettempdir()) / "x2v-bench-stores"


@dataclass(frozen=True)
class History:
    """What `fill_store` writes: `finished` jobs, ~10 a second over the past, each run on n1 for
    2 s (4 events each), then `queued` jobs still waiting. The defaults are one key's successes;
    `realistic()` is a gateway that has run a long while."""

    finished: int
    queued: int
    task: str = "t2v"
    other_task: str | None = None  # every 97th job's, for a filter that finds few
    failed_pct: int = 0  # of the finished jobs, spread evenly through history
    cancelled_pct: int = 0
    owners: int = 1  # keys OWNER0..: each owns runs of 5,000 jobs (a key's batches are its own)
    # and is an API key (`key_secret`) when there are several
    # Out of every 20,000 finished jobs, from the newest: one batch of 5,000 (every other one made
    # in the dashboard, with its rows in `batches` and `batch_jobs`; the others through the API,
    # a batch_id only), ten dashboard batches of 500, and 10,000 jobs without a batch. The queued
    # jobs are in dashboard batches of 500.
    batches: bool = False
    kept: int = 0  # the newest finished jobs that keep their files (the rest expired)
    analyze: bool = True  # statistics for the planner (a gateway itself never runs ANALYZE)

    @classmethod
    def realistic(cls, jobs: int, queued: int) -> History:
        return cls(finished=jobs - queued, queued=queued, task="s2v", other_task="t2v", failed_pct=4,
                   cancelled_pct=2, owners=5, batches=True, kept=100_000, analyze=False)

    def batch_ids(self) -> dict[str, str]:
        """Dashboard batches of 500 and 5,000 and an API one of 5,000, from the middle of history;
        a dashboard batch of 500 still queued."""
        middle = self.finished // 2 // 40_000 * 2
        return {"500": f"d500-{middle * 40 + 10}", "5000": f"d5000-{middle}", "api": f"a5000-{middle + 1}",
                "queued": "dq500-1"}


def key_secret(key_id: str) -> str:
    """The API key of an owner of a filled history (with several owners)."""
    return f"x2v_bench-{key_id}-0123456789abcdef"


def _batch_of(h: History) -> str:
    """SQL: the batch of finished job `i`, laid out from the newest (see History.batches)."""
    if not h.batches:
        return "NULL"
    j = f"({h.finished} - i)"
    return (f"CASE WHEN {j} % 20000 < 5000 THEN (CASE WHEN {j} / 20000 % 2 = 0 THEN 'd' ELSE 'a' END)"
            f" || '5000-' || ({j} / 20000) WHEN {j} % 20000 < 10000 THEN 'd500-' || ({j} / 500) END")


def fill_store(db_path: Path, src: Path, history: History, *, cache: bool = True) -> float:
    """A store as a gateway that has run for a while has it, with the schema of the code in `src`
    (its own migrations); returns the seconds it took. A store filled before with the same
    history and schema is copied from STORE_CACHE instead."""
    started = time.monotonic()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from x2v_gateway.store import JobStore;"
         " JobStore(Path(sys.argv[1])).close()", str(db_path)],
        env={**os.environ, "PYTHONPATH": str(src)}, check=True,
    )
    conn = sqlite3.connect(db_path, isolation_level=None)
    schema = "\n".join(sql for (sql,) in conn.execute("SELECT sql FROM sqlite_master ORDER BY name") if sql)
    conn.close()
    # Keyed by the fill's parameters, the schema and the filler's own code: a change to any fills again.
    filler = "".join(inspect.getsource(f) for f in (_fill, _batch_of, key_secret))
    cached = STORE_CACHE / (hashlib.sha256(f"{history!r}\n{schema}\n{filler}".encode()).hexdigest()[:20] + ".db")
    if cache and cached.exists():
        shutil.copyfile(cached, db_path)
        return time.monotonic() - started
    _fill(db_path, history)
    if cache:
        STORE_CACHE.mkdir(exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.part")
        shutil.copyfile(db_path, partial)
        partial.rename(cached)
    return time.monotonic() - started


def _fill(db_path: Path, h: History) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA cache_size = -400000")
    # Filled in one go with no journal (a failed fill is thrown away), then back to WAL.
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    t0 = time.time() - h.finished * 0.1 - 3600
    owner = f"'{OWNER}'" if h.owners == 1 else f"'{OWNER}' || (({h.finished} - i) / 5000 % {h.owners})"
    task = f"CASE WHEN i % 97 = 0 THEN '{h.other_task}' ELSE :task END" if h.other_task else ":task"
    state = (f"CASE WHEN i * 7919 % 100 < {h.failed_pct} THEN 'failed'"
             f" WHEN i * 7919 % 100 < {h.failed_pct + h.cancelled_pct} THEN 'cancelled' ELSE 'succeeded' END")
    conn.execute("BEGIN")
    # Finished jobs, ~10 a second over the past, each run on n1 for 2 s; ids random like real ones.
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 WHERE :finished > 0 UNION ALL SELECT i + 1 FROM n WHERE i < :finished)"
        " INSERT INTO jobs (id, task, state, params, inputs, upstream, upstream_task_id, run, attempts,"
        " priority, owner, batch_id, created_at, updated_at, submitted_at, started_at, finished_at,"
        " error, result_sha, result_meta, files_expired)"
        " SELECT 'j' || lower(hex(randomblob(10))), task, state,"
        " '{\"prompt\": \"a past job\", \"infer_steps\": 4}', '{}', 'n1', 't' || i, 1, 1, 0, owner, batch,"
        " :t0 + i * 0.1, :t0 + i * 0.1 + 2.5, :t0 + i * 0.1 + 0.2, :t0 + i * 0.1 + 0.5, :t0 + i * 0.1 + 2.5,"
        " CASE state WHEN 'failed' THEN 'n1: RuntimeError: out of memory' END,"
        " CASE state WHEN 'succeeded' THEN lower(hex(randomblob(32))) END,"
        " CASE state WHEN 'succeeded' THEN '{\"size\": 1048576}' END, i <= :finished - :kept"
        f" FROM (SELECT i, {task} AS task, {state} AS state, {owner} AS owner, {_batch_of(h)} AS batch FROM n)",
        {"finished": h.finished, "task": h.task, "t0": t0, "kept": h.kept},
    )
    # Then the queue; with batches, in dashboard batches of 500 (dq500-0, ...).
    now = time.time()
    queued_owner = f"'{OWNER}'" if h.owners == 1 else f"'{OWNER}' || ((i - 1) / 500 % {h.owners})"
    queued_batch = "'dq500-' || ((i - 1) / 500)" if h.batches else "NULL"
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 WHERE :queued > 0 UNION ALL SELECT i + 1 FROM n WHERE i < :queued)"
        " INSERT INTO jobs (id, task, state, params, inputs, priority, owner, batch_id, created_at, updated_at)"
        f" SELECT 'j' || lower(hex(randomblob(10))), :task, 'queued', '{{\"prompt\": \"waiting\"}}', '{{}}',"
        f" 0, {queued_owner}, {queued_batch},"
        " :now + i * 0.001, :now + i * 0.001 FROM n",
        {"queued": h.queued, "task": h.task, "now": now},
    )
    # Their timelines: accepted, then (once finished) submitted, running, and how each ended.
    conn.execute(
        "INSERT INTO job_events (job_id, at, state, detail, owner, batch_id)"
        " SELECT id, created_at + s.k, coalesce(s.state, jobs.state), s.detail, owner, batch_id FROM jobs,"
        " (SELECT 0 AS k, 'queued' AS state, 'accepted' AS detail UNION ALL SELECT 1, 'submitted', 'to n1'"
        "  UNION ALL SELECT 2, 'running', '' UNION ALL SELECT 3, NULL, '') AS s"
        " WHERE s.k = 0 OR jobs.state != 'queued' ORDER BY jobs.seq, s.k"
    )
    # The dashboard's batches: their names and forms, and each job's place and file names.
    conn.execute(
        "INSERT INTO batches (id, name, task, mode, owner, created_at, form)"
        " SELECT batch_id, 'Campaign ' || batch_id, min(task), 'each', min(owner), min(created_at), '{}'"
        " FROM jobs WHERE batch_id LIKE 'd%' GROUP BY batch_id"
    )
    conn.execute(
        "INSERT INTO batch_jobs (job_id, batch_id, position, files)"
        " SELECT id, batch_id, row_number() OVER (PARTITION BY batch_id ORDER BY seq),"
        " '{\"image\": \"face.png\", \"audio\": \"voice.wav\"}' FROM jobs WHERE batch_id LIKE 'd%'"
    )
    if h.owners > 1:  # each owner a key a benchmark can sign in with (`key_secret`)
        conn.executemany(
            "INSERT INTO api_keys (id, name, key_hash, prefix, admin, source, created_at)"
            " VALUES (?, ?, ?, '', 0, 'api', ?)",
            [(f"{OWNER}{n}", f"bench key {n}", hashlib.sha256(key_secret(f"{OWNER}{n}").encode()).hexdigest(), t0)
             for n in range(h.owners)],
        )
    conn.execute("COMMIT")
    if h.analyze:
        conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
