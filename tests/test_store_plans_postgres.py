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
from test_store_plans import CALLS, COLD, SMALL_TABLES, _interface

from x2v_gateway.store import JobStore
from x2v_gateway.store.migrate import migrate_store

JOBS = 100_000
# PostgreSQL rightly reads a table of a few pages whole rather than through an index (sessions,
# batches of this history): only a table this big must never be.
BIG = 5000




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
    """The plans each method of CALLS ran, read from the server's log between markers."""
    start = log.stat().st_size
    for name, call in CALLS.items():
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
        if method in CALLS:
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
    assert _interface() - set(CALLS) - set(COLD) == set()


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
    assert set(plans) == set(CALLS) - {"read", "read_blocking"}, set(CALLS) - set(plans)
    problems = [
        f"{name}: seq scan on {', '.join(scans)}: {plan['Query Text'][:300]}"
        for name, found in plans.items() if name not in COLD
        for plan in found if (scans := _scans(plan["Plan"], big))
    ]
    assert not problems, "\n".join(problems)
