"""Every query the store runs on a hot path uses an index, however much history the store holds.

The queries are not listed here: each method of the store's interface is called as a hot path
calls it on a store of 200,000 mostly finished jobs, and the SQL it really runs is caught
(SQLite's trace callback). Each statement's plan must not read a table of history whole, without
the planner's statistics (a gateway never runs ANALYZE) and with them; and each read must cost
SQLite no more work once older history is added (a plan can SEARCH an index and still walk it
through all of history). A method added to the interface fails the test until it is called here
or named cold, with the reason it may read much.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from contextlib import closing
from typing import Any

import pytest
from history import History, add_older_history, fill_history, steps

from x2v_gateway.store import BatchJobSpec, JobStore, JobWebhook, Pipeline, PipelineStep, Reads, new_pipeline_id

JOBS = 200_000
# Tables whose size does not grow with history (keys, nodes, replicas, counts by owner and state, queued
# jobs by priority and block of 1024): these may be read whole.
SMALL_TABLES = {"api_keys", "nodes", "stray_tasks", "job_counts", "queue_blocks", "webhook_cursor", "replicas"}

COLD = {
    "expire_files": "the retention sweep: once an hour, on the writer thread, it reads the jobs"
                    " that still keep their files to find the blobs nobody needs",
    "purge_files": "an admin's purge: it reads the jobs that still keep their files, to spare a"
                   " blob another job shares",
    "read": "runs the reads it is given, each checked here",
    "read_blocking": "runs the reads it is given, each checked here",
    "is_writable": "takes the write lock, reads nothing",
    "close": "no query",
}


def run(coro):
    return asyncio.run(coro)


def _reads(fn: Callable[[Reads, History], Any]) -> Callable[[JobStore, History], Any]:
    return lambda store, h: store.read_blocking(lambda r: fn(r, h))


def _fresh(store: JobStore, **kw) -> str:
    job, _ = run(store.create_job(task="s2v", params={"prompt": "x"}, inputs={"image": "ab" * 32}, **kw))
    return job.id


def _claimed(store: JobStore, node: str = "n01") -> str:
    job_id = _fresh(store, owner="k0001")
    run(store.claim(job_id, node, job_id))
    return job_id


def _finished(store: JobStore, how: str) -> str:
    job_id = _claimed(store)
    run(store.fail(job_id, "boom") if how == "failed" else store.cancel(job_id))
    return job_id


_PIPELINES: dict[str, str] = {}


def _hooked_pipeline(store: JobStore, h: History, name: str = "a") -> str:
    """A pipeline of two steps, with a webhook, made once per name."""
    if name not in _PIPELINES:
        step = {"scene": 0, "kind": "clip", "task": "t2v", "params": {}, "inputs": {}, "needs": {}, "seconds": 1.0}
        pipeline = Pipeline(id=new_pipeline_id(), owner=h.owner, output={"fps": 16}, idempotency_key=f"{h.owner}:{name}",
                            request_hash="x", steps=[PipelineStep(n=n, **step) for n in range(2)])
        _PIPELINES[name] = run(store.create_pipeline(pipeline, JobWebhook("http://hooks.example/p", ("pipeline.failed",), h.owner)))
    return _PIPELINES[name]


def _list_pages(r: Reads, h: History) -> None:
    for states in ((), ("queued",), ("failed",), ("succeeded", "failed")):
        for batch_id in (None, h.api_batch):
            for task in (None, "t2v"):
                for owner in (None, h.owner):
                    for before in (None, h.total // 2):
                        r.list_jobs(states=states, batch_id=batch_id, task=task, owner=owner,
                                    before_seq=before, limit=500)


def _lanes(r: Reads, h: History) -> None:
    lanes = r.queue_lanes(["s2v", "i2v", "t2v"])
    assert lanes
    r.lane_jobs(lanes[0], 0, 10)
    r.lane_jobs(lanes[-1], lanes[-1].head_seq, 10)
    r.lane_heads(lanes[0], 0, 10)
    r.lane_heads(lanes[-1], lanes[-1].head_seq, 10)


def _batch_items(r: Reads, h: History) -> None:
    first = r.batch_items(h.dashboard_batch, limit=10)
    assert first
    r.batch_items(h.dashboard_batch, after_seq=first[-1].job.seq, owner=first[-1].job.owner)
    r.batch_items(h.api_batch, limit=500)


# How each method is called on a hot path: the reads of a GET, a list page, a dashboard page,
# dispatch planning, a node's follow loop, a sign-in; and every write of a job's life.
def _pipeline(store: JobStore, h, idempotency_key: str | None = None) -> str:
    """A new one-step pipeline of the history's owner: its id."""
    pipeline = Pipeline(
        id=new_pipeline_id(), owner=h.owner, output={}, request_hash="r",
        idempotency_key=f"{h.owner}:{idempotency_key}" if idempotency_key else None,
        steps=[PipelineStep(n=0, scene=0, kind="clip", task="t2v", params={}, inputs={}, needs={})],
    )
    return run(store.create_pipeline(pipeline))


CALLS: dict[str, Callable[[JobStore, History], Any]] = {
    "get": _reads(lambda r, h: (r.get(h.queued_id), r.get(h.finished_id), r.get("jnothere"))),
    "jobs_by_id": _reads(lambda r, h: r.jobs_by_id([h.queued_id, h.finished_id, h.inflight_id])),
    "list_jobs": _reads(_list_pages),
    "active": _reads(lambda r, h: (r.active(), r.active(h.node))),
    "inflight_counts": _reads(lambda r, h: r.inflight_counts()),
    "cancel_pending": _reads(lambda r, h: r.cancel_pending()),
    "counts_by_state": _reads(lambda r, h: r.counts_by_state()),
    "owner_counts": _reads(lambda r, h: (r.owner_counts(None), r.owner_counts(h.owner))),
    "events": _reads(lambda r, h: r.events(h.finished_id)),
    # An event stream's replay and each of its wake-ups: a job's, a batch's, a key's, everyone's.
    "events_after": _reads(lambda r, h: (
        r.events_after(0, job_id=h.finished_id), r.events_after(h.total // 2, batch_id=h.api_batch),
        r.events_after(h.total // 2, batch_id=h.dashboard_batch, owner=h.owner),
        r.events_after(h.total // 2, owner=h.owner), r.events_after(h.total - 10),
    )),
    "newest_event_id": _reads(lambda r, h: r.newest_event_id()),
    "recent_run_times": _reads(lambda r, h: r.recent_run_times()),
    "blob": _reads(lambda r, h: r.blob("ab" * 32)),
    "blob_sizes": _reads(lambda r, h: r.blob_sizes(["ab" * 32, "cd" * 32])),
    "queue_position": _reads(lambda r, h: r.queue_position(r.get(h.queued_id))),
    "queue_positions": _reads(lambda r, h: (
        r.queue_positions(r.list_jobs(states=["queued"], limit=20)),
        r.queue_positions(r.list_jobs(states=["queued"], limit=500)),
    )),
    "queue_lanes": _reads(_lanes),
    "lane_jobs": _reads(_lanes),
    "lane_heads": _reads(_lanes),
    "inflight": _reads(lambda r, h: r.inflight()),
    # A dispatch round's: counts per batch, the rows of the nodes with a free slot, and which of
    # the jobs this process holds (being submitted, videos being copied) are in flight.
    "inflight_by_batch": _reads(lambda r, h: r.inflight_by_batch()),
    "inflight_on": _reads(lambda r, h: (r.inflight_on([h.node]), r.inflight_on([h.node, "n02", "gone"]))),
    "inflight_among": _reads(lambda r, h: r.inflight_among([h.inflight_id, h.queued_id, h.finished_id])),
    "count_pinned": _reads(lambda r, h: r.count_pinned(h.node)),
    "batch": _reads(lambda r, h: r.batch(h.dashboard_batch)),
    "recent_batch_ids": _reads(lambda r, h: (r.recent_batch_ids(), r.recent_batch_ids(owner=h.owner))),
    "batch_counts": _reads(lambda r, h: (r.batch_counts(h.dashboard_batch), r.batch_counts(h.api_batch, h.owner))),
    "batch_created_at": _reads(lambda r, h: (
        r.batch_created_at(h.dashboard_batch), r.batch_created_at(h.api_batch, h.owner),
    )),
    "batch_items": _reads(_batch_items),
    "batch_item": _reads(lambda r, h: (
        r.batch_item(r.batch_items(h.dashboard_batch, limit=1)[0].job.id), r.batch_item(h.finished_id),
    )),
    "nodes": _reads(lambda r, h: r.nodes()),
    "stray_tasks": _reads(lambda r, h: r.stray_tasks(h.node)),
    "key_by_hash": _reads(lambda r, h: (r.key_by_hash(h.key_hash), r.key_by_hash("0" * 64))),
    "key": _reads(lambda r, h: r.key(h.owner)),
    "keys": _reads(lambda r, h: r.keys()),
    "session": _reads(lambda r, h: (r.session(h.session_hash), r.session("0" * 64))),
    "jobs_used": _reads(lambda r, h: r.jobs_used(h.owner, "2026-01-05")),
    "concurrency_limits": _reads(lambda r, h: r.concurrency_limits()),
    "audit_log": _reads(lambda r, h: (r.audit_log(), r.audit_log(before_id=100))),
    # -- writes
    "record_blob": lambda s, h: run(s.record_blob("ef" * 32, 10, "png")),
    "create_job": lambda s, h: [
        run(s.create_job(task="t2v", params={}, inputs={}, idempotency_key="idem-1", request_hash="a"))
        for _ in range(2)
    ],
    "claim": lambda s, h: _claimed(s),
    "set_upstream_task_id": lambda s, h: run(s.set_upstream_task_id(_claimed(s), "task-1", run=0)),
    "requeue": lambda s, h: run(s.requeue(_claimed(s), "node forgot")),
    "mark_running": lambda s, h: run(s.mark_running(_claimed(s))),
    "set_queue_info": lambda s, h: run(s.set_queue_info({_claimed(s): {"position": 1}, h.finished_id: None})),
    "succeed": lambda s, h: run(s.succeed(_claimed(s), "ab" * 32, {"duration": 1.0})),
    "set_poster": lambda s, h: (lambda job_id: (
        run(s.succeed(job_id, "ab" * 32, {"duration": 1.0})), run(s.set_poster(job_id, "ab" * 32, "cd" * 32)),
    ))(_claimed(s)),
    "fail": lambda s, h: _finished(s, "failed"),
    "cancel": lambda s, h: (run(s.cancel(_fresh(s))), _finished(s, "cancelled")),
    "cancel_sent": lambda s, h: run(s.cancel_sent(_finished(s, "cancelled"))),
    "retry": lambda s, h: run(s.retry(_finished(s, "cancelled"))),
    "resume": lambda s, h: (lambda job_id: run(s.resume(job_id, "n01", job_id)))(_finished(s, "failed")),
    "move": lambda s, h: run(s.move(_claimed(s), "n01", "node gone", stray=True)),
    "create_batch": lambda s, h: (
        run(s.create_batch("bnew", [BatchJobSpec(task="s2v", params={}, inputs={}, files={})] * 3,
                           batch={"name": "new", "task": "s2v", "mode": "each"}, owner=h.owner)),
        run(s.create_batch(h.api_batch, [BatchJobSpec(task="s2v", params={}, inputs={}, files={})],
                           owner=h.owner)),
    ),
    "save_node": lambda s, h: run(s.save_node("n99", url="http://127.0.0.1:1", capacity=1, tasks=None, source="api")),
    "set_node_flags": lambda s, h: run(s.set_node_flags("n02", drained=True)),
    "delete_node": lambda s, h: run(s.delete_node("n03")),
    "add_stray": lambda s, h: run(s.add_stray("n01", "task-9", h.finished_id)),
    "drop_stray": lambda s, h: run(s.drop_stray("n01", "task-9")),
    "create_key": lambda s, h: run(s.create_key({
        "id": "knew", "name": "new key", "key_hash": "12" * 32, "prefix": "", "admin": False,
        "daily_quota": None, "max_concurrent": None, "rate_per_min": None, "source": "api",
    }, "admin")),
    "revoke_key": lambda s, h: (run(s.revoke_key("k0002", "admin", keep_admin=True)),
                                run(s.revoke_key("k0000", "admin", keep_admin=False))),
    "create_session": lambda s, h: run(s.create_session("34" * 32, h.owner, "csrf", 2e9)),
    "delete_session": lambda s, h: run(s.delete_session("34" * 32)),
    "reserve_jobs": lambda s, h: run(s.reserve_jobs(h.owner, "2026-01-05", 1, 1000)),
    "release_jobs": lambda s, h: run(s.release_jobs(h.owner, "2026-01-05", 1)),
    "record_audit": lambda s, h: run(s.record_audit("admin", "node.drain", "n01")),
    # -- webhooks: the worker's rounds (its cursor keeps up with the events), a job's page
    "job_webhook": _reads(lambda r, h: r.job_webhook(h.finished_id)),
    "webhook_events": lambda s, h: (
        run(s.record_deliveries([], s.read_blocking(lambda r: r.newest_event_id()) - 50)),
        s.read_blocking(lambda r: r.webhook_events()),
    ),
    "batch_last_event": _reads(lambda r, h: (
        r.batch_last_event(h.api_batch, h.owner), r.batch_last_event(h.dashboard_batch, None),
    )),
    "batch_webhooks": _reads(lambda r, h: r.batch_webhooks(h.api_batch, h.owner)),
    "next_delivery_at": _reads(lambda r, h: r.next_delivery_at()),
    "job_deliveries": _reads(lambda r, h: r.job_deliveries(h.finished_id)),
    "pending_deliveries": _reads(lambda r, h: r.pending_deliveries(h.finished_id)),
    "webhook_secrets": _reads(lambda r, h: r.webhook_secrets(h.owner)),
    "record_deliveries": lambda s, h: run(s.record_deliveries([{
        "id": "msg_plans", "event_id": 1, "type": "job.failed", "job_id": h.finished_id,
        "url": "http://hooks.example/x", "key_id": h.owner, "payload": "{}", "created_at": 1.0,
    }], 1)),
    "due_deliveries": _reads(lambda r, h: (r.due_deliveries(2.0, 200), r.due_deliveries(2.0, 200, ["http://a/"]))),
    "claim_deliveries": lambda s, h: run(s.claim_deliveries(["msg_plans", "msg_none"], 2.0, 30.0)),
    "delivery_attempted": lambda s, h: run(s.delivery_attempted(
        "msg_plans", at=3.0, status=500, error="answered 500", next_attempt_at=9.0,
    )),
    "set_key_webhook": lambda s, h: run(s.set_key_webhook(h.owner, "http://hooks.example/x", ("failed",), "admin")),
    "set_webhook_secret": lambda s, h: run(s.set_webhook_secret(h.owner, "whsec_x", "admin", previous_until=9.0)),
    # pipelines: made (twice with one Idempotency-Key), their step jobs, their pages
    "create_pipeline": lambda s, h: ([_pipeline(s, h, "idem-p") for _ in range(2)], _hooked_pipeline(s, h),
                                     _hooked_pipeline(s, h, "b")),
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
    # a pipeline's join claimed once; its webhook, its ends and deliveries (the worker's rounds)
    "claim_join": lambda s, h: run(s.claim_join(_hooked_pipeline(s, h, "b"), "replica-1", 9e9)),
    "pipeline_webhook": _reads(lambda r, h: r.pipeline_webhook(_PIPELINES["a"])),
    "pipeline_webhook_events": lambda s, h: (
        run(s.record_deliveries([{
            "id": "msg_pipeline", "event_id": 1, "type": "pipeline.failed", "pipeline_id": _PIPELINES["a"],
            "url": "http://hooks.example/p", "key_id": h.owner, "payload": "{}", "created_at": 1.0,
        }], s.read_blocking(lambda r: r.newest_event_id()), 0)),
        s.read_blocking(lambda r: r.pipeline_webhook_events()),
    ),
    "pipeline_deliveries": _reads(lambda r, h: r.pipeline_deliveries(_PIPELINES["a"])),
}


def _interface() -> set[str]:
    reads = {name for name in vars(Reads) if not name.startswith("_") and callable(getattr(Reads, name))}
    return reads | set(JobStore.__abstractmethods__)


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> History:
    return fill_history(tmp_path_factory.mktemp("history") / "gateway.db", JOBS)


def test_every_method_of_the_store_is_checked_here_or_named_cold():
    assert set(CALLS) | set(COLD) == _interface()
    assert not set(CALLS) & set(COLD)


def statements_by_method(store: JobStore, h: History) -> dict[str, list[str]]:
    """The SQL each method of CALLS runs, caught on every connection of the (SQLite) store:
    its reader and writer threads' and this thread's."""
    store.read_blocking(lambda r: None)
    run(store.read(lambda r: None))
    run(store.is_writable())
    caught: list[str] = []
    for conn in store._conns.values():
        conn.set_trace_callback(caught.append)
    found = {}
    for name, call in CALLS.items():
        call(store, h)
        found[name] = [sql for sql in caught if sql.lstrip().split(" ", 1)[0].upper() in _STATEMENTS]
        caught.clear()
    return found


_STATEMENTS = {"SELECT", "UPDATE", "DELETE", "INSERT", "WITH"}  # not BEGIN, COMMIT, PRAGMA


def history_scans(conn: sqlite3.Connection, sql: str, partial: set[str]) -> list[str]:
    """Steps of the plan that read a table of history whole. Only a partial index (the few jobs
    in flight, the pending cancels) may be: `partial` names them."""
    plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
    return [
        step for step in plan
        if step.startswith("SCAN ") and step.split()[1] not in SMALL_TABLES
        and step != "SCAN CONSTANT ROW" and "subquery" not in step
        and not any(step.endswith(f"INDEX {name}") for name in partial)
    ]


def _cost(conn: sqlite3.Connection, sql: str) -> int:
    return steps(conn, conn.execute(sql).fetchall)[1]


def test_hot_path_queries_use_an_index_and_cost_the_same_with_more_history(history):
    store = JobStore(history.path)
    try:
        statements = statements_by_method(store, history)
    finally:
        store.close()
    assert all(statements.values()), [name for name, sql in statements.items() if not sql]
    reads = {(name, sql) for name, sqls in statements.items() for sql in sqls if sql.startswith("SELECT")}
    with closing(sqlite3.connect(history.path)) as conn:
        partial = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '% WHERE %'"
        )}
        before = {sql: _cost(conn, sql) for _, sql in reads}
    add_older_history(history.path, history.total // 2)
    problems = []
    with closing(sqlite3.connect(history.path)) as conn:
        for name, sql in sorted(reads):
            if (after := _cost(conn, sql)) > before[sql] * 1.25 + 100:
                problems.append(f"{name}: {before[sql]} -> {after} hundred steps: {sql[:300]}")
    for stats in ("without statistics", "after ANALYZE"):
        with closing(sqlite3.connect(history.path)) as conn:
            if stats == "after ANALYZE":
                conn.execute("ANALYZE")
            problems += [
                f"{name} ({stats}): {found}: {sql[:300]}"
                for name, sqls in statements.items() for sql in sqls
                if (found := history_scans(conn, sql, partial))
            ]
    assert not problems, "\n".join(problems)
