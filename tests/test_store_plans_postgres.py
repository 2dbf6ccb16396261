"""PostgreSQL's plans for every query of the store's hot paths: no table of history read whole.

The store of test_store_plans.py (SQLite, here 100,000 mostly finished jobs, with their events,
batches, keys, sessions and audit) is copied into PostgreSQL with `migrate-store`'s own code, and
analyzed, as autovacuum would. Each method is then called as its hot path calls it
(test_store_plans.CALLS), and the plan PostgreSQL really ran for each statement, triggers' ones
included, is caught with auto_explain in the server's log.
"""

from __future__ import annotations

import json
import re

import psycopg
import pytest
from history import fill_history
from test_store_plans import CALLS, COLD, SMALL_TABLES, _interface, _reads, run

from x2v_gateway.store import JobStore, Pipeline, PipelineStep, new_pipeline_id
from x2v_gateway.store.migrate import migrate_store

JOBS = 100_000
# PostgreSQL rightly reads a table of a few pages whole rather than through an index (sessions,
# batches of this history): only a table this big must never be.
BIG = 5000


def _pipeline(store: JobStore, h, idempotency_key: str | None = None) -> str:
    """A new one-step pipeline of the history's owner: its id."""
    pipeline = Pipeline(
        id=new_pipeline_id(), owner=h.owner, output={}, request_hash="r",
        idempotency_key=f"{h.owner}:{idempotency_key}" if idempotency_key else None,
        steps=[PipelineStep(n=0, scene=0, kind="clip", task="t2v", params={}, inputs={}, needs={})],
    )
    return run(store.create_pipeline(pipeline))


# Methods test_store_plans.CALLS does not call yet (its completeness test says which), called
# here so that their PostgreSQL plans are checked too.
ALL_CALLS = {
    # pipelines: made (twice with one Idempotency-Key), their step jobs, their pages
    "create_pipeline": lambda s, h: [_pipeline(s, h, "idem-p") for _ in range(2)],
    "create_step_job": lambda s, h: run(s.create_step_job(_pipeline(s, h), 0, task="t2v", params={}, inputs={})),
    "set_pipeline_state": lambda s, h: run(s.set_pipeline_state(_pipeline(s, h), "failed", "x", only_from=("running",))),
    "finish_pipeline": lambda s, h: run(s.finish_pipeline(_pipeline(s, h), "ab" * 32, {"duration": 1.0})),
    "pipeline": _reads(lambda r, h: (r.pipeline("pnothere"), r.pipelines(limit=1))),
    "pipelines": _reads(lambda r, h: (r.pipelines(), r.pipelines(owner=h.owner, before_seq=100))),
    "pipeline_for_key": _reads(lambda r, h: r.pipeline_for_key(f"{h.owner}:idem-p")),
    "open_pipelines": _reads(lambda r, h: r.open_pipelines()),
    # the compatible surfaces' foreign ids, the batches API
    "save_foreign_id": lambda s, h: (run(s.save_foreign_id(h.owner, "lightx2v", "task-1", h.finished_id)),
                                     run(s.save_foreign_id(h.owner, "lightx2v", "task-1", h.queued_id, replace=True))),
    "foreign_job": _reads(lambda r, h: r.foreign_job(h.owner, "lightx2v", "task-1")),
    "foreign_ids": _reads(lambda r, h: r.foreign_ids(h.owner, "lightx2v", [h.finished_id, h.queued_id])),
    "list_batches": _reads(lambda r, h: (r.list_batches(owner=h.owner), r.list_batches(owner=h.owner, before=(2e9, "b")))),
    # replicas: a lease, a heartbeat (taking over the jobs in flight of none), the change feed
    "join": lambda s, h: run(s.join("r-plans", 6.0)),
    "heartbeat": lambda s, h: run(s.heartbeat("r-plans", 6.0, gone=["r-gone"])),
    "leave": lambda s, h: run(s.leave("r-plans")),
    "replicas": _reads(lambda r, h: r.replicas()),
    "changes_since": _reads(lambda r, h: (r.changes_since(None), r.changes_since(r.newest_event_id() - 20))),
    **CALLS,
}


@pytest.fixture(scope="module")
def history_in_postgres(tmp_path_factory, pg_cluster):
    history = fill_history(tmp_path_factory.mktemp("history") / "gateway.db", JOBS)
    url = pg_cluster.new_database()
    migrate_store(history.path, url)
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")
        for setting, value in (
            ("session_preload_libraries", "auto_explain"), ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"), ("auto_explain.log_format", "json"),
        ):
            conn.execute(f"ALTER DATABASE {database} SET {setting} = '{value}'")
    return history, url


def plans_by_method(store: JobStore, history, log) -> dict[str, list[dict]]:
    """The plans each method of ALL_CALLS ran, read from the server's log between markers."""
    start = log.stat().st_size
    for name, call in ALL_CALLS.items():
        store.write_blocking(lambda conn, name=name: conn.execute(f"SELECT 'x2v-marker {name}'"))
        call(store, history)
    store.write_blocking(lambda conn: conn.execute("SELECT 'x2v-marker end'"))
    with log.open() as f:
        f.seek(start)
        text = f.read()
    found: dict[str, list[dict]] = {}
    method = None
    # Each entry: "<time> [pid] LOG:  duration: 0.01 ms  plan:\n{json}".
    for entry in re.split(r"\n(?=\d{4}-\d\d-\d\d )", text):
        if "plan:" not in entry:
            continue
        plan = json.loads(entry.split("plan:", 1)[1])
        if marker := re.match(r"SELECT 'x2v-marker (\w+)'", plan["Query Text"]):
            method = marker.group(1)
            continue
        if method in ALL_CALLS:
            found.setdefault(method, []).append(plan)
    return found


def _scans(node: dict, big: set[str]) -> list[str]:
    """Big tables of history a plan reads whole."""
    here = []
    if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in big:
        here.append(node["Relation Name"])
    for child in node.get("Plans", []):
        here += _scans(child, big)
    return here


def test_every_method_of_the_store_has_its_postgresql_plans_checked_or_is_named_cold():
    assert _interface() - set(ALL_CALLS) - set(COLD) == set()


def test_hot_path_queries_read_no_table_of_history_whole(history_in_postgres, pg_cluster):
    history, url = history_in_postgres
    with psycopg.connect(url) as conn:
        big = {name for (name,) in conn.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND reltuples >= %s", (BIG,)
        )} - SMALL_TABLES
    assert {"jobs", "job_events", "batch_jobs", "audit", "blobs"} <= big
    store = JobStore(url)
    try:
        plans = plans_by_method(store, history, pg_cluster.root / "log")
    finally:
        store.close()
    assert set(plans) == set(ALL_CALLS) - {"read", "read_blocking"}, set(ALL_CALLS) - set(plans)
    problems = [
        f"{name}: seq scan on {', '.join(scans)}: {plan['Query Text'][:300]}"
        for name, found in plans.items() if name not in COLD
        for plan in found if (scans := _scans(plan["Plan"], big))
    ]
    assert not problems, "\n".join(problems)
