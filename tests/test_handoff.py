"""The store's thread hand-off (store/handoff.py), the SQLite writer's group commit, and
handlers' dependencies given in line (di.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from litestar import Litestar, get
from litestar.di import NamedDependency, Provide
from litestar.testing import TestClient

from x2v_gateway.di import resolve_in_line
from x2v_gateway.store import JobStore
from x2v_gateway.store.handoff import Handoff


def test_handoff_gives_each_call_its_own_result_or_error_in_order() -> None:
    async def scenario() -> None:
        worker = Handoff(1, "test-handoff")
        seen: list[int] = []

        def step(i: int) -> int:
            seen.append(i)
            if i == 3:
                raise ValueError("three")
            return i * 10

        try:
            futures = [worker.run(lambda i=i: step(i)) for i in range(6)]
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            worker.close()
        assert results[:3] == [0, 10, 20] and results[4:] == [40, 50]
        assert isinstance(results[3], ValueError) and str(results[3]) == "three"
        assert seen == list(range(6))  # one thread: in the order given

    asyncio.run(scenario())


def test_handoff_runs_on_its_own_thread_and_skips_a_cancelled_call() -> None:
    async def scenario() -> None:
        worker = Handoff(1, "test-handoff")
        gate = threading.Event()
        ran: list[str] = []
        try:
            blocked = worker.run(lambda: gate.wait(10))
            doomed = worker.run(lambda: ran.append("doomed"))
            doomed.cancel()
            gate.set()
            assert await blocked is True
            name = await worker.run(lambda: threading.current_thread().name)
        finally:
            worker.close()
        assert name == "test-handoff_0"
        assert ran == []  # cancelled before the thread took it: never run

    asyncio.run(scenario())


def test_handoff_close_runs_what_was_given_then_refuses() -> None:
    async def scenario() -> None:
        worker = Handoff(2, "test-handoff")
        done: list[int] = []
        futures = [worker.run(lambda i=i: done.append(i)) for i in range(50)]
        await asyncio.to_thread(worker.close)
        assert sorted(done) == list(range(50))
        await asyncio.gather(*futures)
        with pytest.raises(RuntimeError):
            worker.run(lambda: None)

    asyncio.run(scenario())


def test_handoff_together_takes_the_calls_waiting_at_once_up_to_most() -> None:
    async def scenario() -> None:
        groups: list[list[int]] = []

        def together(calls):
            groups.append([call() for call in calls])
            return [(True, n) for n in groups[-1]]

        worker = Handoff(1, "test-handoff", together=together, most=4)
        entered, gate = threading.Event(), threading.Event()
        try:
            blocked = worker.run(lambda: entered.set() or gate.wait(10))
            await asyncio.to_thread(entered.wait, 10)  # the thread is in it: the rest wait together
            futures = [worker.run(lambda i=i: i) for i in range(10)]
            futures[5].cancel()  # skipped, not handed to `together`
            gate.set()
            assert await blocked is True
            results = await asyncio.gather(*futures[:5], *futures[6:])
        finally:
            worker.close()
        assert results == [0, 1, 2, 3, 4, 6, 7, 8, 9]
        assert groups == [[True], [0, 1, 2, 3], [4, 6, 7], [8, 9]]  # in order, four at most

        def broken(calls):
            raise RuntimeError("no connection")

        worker = Handoff(1, "test-handoff", together=broken, most=4)
        try:
            failed = await asyncio.gather(*(worker.run(lambda: 1) for _ in range(3)), return_exceptions=True)
        finally:
            worker.close()
        assert [str(exc) for exc in failed] == ["no connection"] * 3  # each caller told, none left waiting

    asyncio.run(scenario())


def test_sqlite_writes_waiting_together_commit_together_and_one_that_fails_is_undone_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = JobStore(tmp_path / "gateway.db")
        outside = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None, check_same_thread=False)
        outside.execute("CREATE TABLE notes (key TEXT PRIMARY KEY)")
        transactions: list[int] = []
        committed: list[int] = []  # rows another connection saw, as each write ran
        gate = threading.Event()

        def write(name: str, fail: bool = False):
            def run(conn: sqlite3.Connection) -> str:
                conn.execute("INSERT INTO notes (key) VALUES (?)", (name,))
                transactions.append(conn.execute("SELECT count(*) FROM notes").fetchone()[0])
                committed.append(outside.execute("SELECT count(*) FROM notes").fetchone()[0])
                if fail:
                    raise ValueError(f"{name} refused")
                return name
            return run

        entered = threading.Event()
        try:
            blocked = asyncio.ensure_future(store._write(lambda conn: entered.set() or gate.wait(10)))
            assert await asyncio.to_thread(entered.wait, 10)
            writes = [asyncio.ensure_future(store._write(fn)) for fn in (write("a"), write("b", fail=True), write("c"))]
            await asyncio.sleep(0.05)  # each given to the writer, all three waiting behind the first
            assert outside.execute("SELECT count(*) FROM notes").fetchone()[0] == 0
            gate.set()
            assert await blocked is True
            results = await asyncio.gather(*writes, return_exceptions=True)
            kept = sorted(row[0] for row in outside.execute("SELECT key FROM notes"))
        finally:
            store.close()
            outside.close()
        assert results[0] == "a" and results[2] == "c"
        assert isinstance(results[1], ValueError) and str(results[1]) == "b refused"
        assert kept == ["a", "c"]
        # One transaction: each write saw the ones before it, b's row was gone before c's, and
        # none was committed before the last had run.
        assert transactions == [1, 2, 2]
        assert committed == [0, 0, 0]

    asyncio.run(scenario())


def test_handler_gets_every_dependency_resolved_in_line() -> None:
    threads: list[str] = []

    def service(name: str):
        def provide() -> str:
            threads.append(threading.current_thread().name)
            return name

        return Provide(provide, sync_to_thread=False)

    async def later() -> str:
        return "async"

    @get("/deps", dependencies={"a": service("a"), "b": service("b"), "c": service("c")})
    async def handler(a: NamedDependency[str], b: NamedDependency[str], c: NamedDependency[str]) -> str:
        return a + b + c

    @get("/mixed", dependencies={"a": service("a"), "z": Provide(later)})
    async def mixed(a: NamedDependency[str], z: NamedDependency[str]) -> str:
        return a + z

    app = Litestar([handler, mixed])
    assert resolve_in_line(app) == 1  # the group with an async dependency is left alone
    models = {route.path: next(iter(route.route_handler_map.values()))[1] for route in app.routes
              if hasattr(route, "route_handler_map")}
    assert [sorted(d.key for d in batch) for batch in models["/deps"].dependency_batches] == [["a"], ["b"], ["c"]]
    assert len(models["/mixed"].dependency_batches) == 1
    with TestClient(app) as client:
        assert client.get("/deps").text == "abc"
        assert client.get("/mixed").text == "aasync"
