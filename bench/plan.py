"""Dispatch planning with 1,000 nodes and 50,000 queued jobs, the dispatcher's loops live.

    .venv/bin/python bench/plan.py [--nodes 1000] [--queued 50000] [--history 200000]
        [--base /path/to/other/checkout/src]

A real store holds `--history` finished jobs (the realistic case: most of a gateway's jobs are
done) and `--queued` queued ones of 3 keys, 30 batches plus unbatched jobs, 2 task types and 2
priorities. The real Dispatcher starts on it with `--nodes` in-memory nodes (tests/
memory_upstream.py: no HTTP, so the gateway's own cost is what is measured), 2 slots each, its
follow, dispatch and retention loops all running. Measured:

- a start: the first dispatch round, every slot free (2 x nodes jobs placed), three times. A
  round with more free slots than `schedule.PIECE` goes on in pieces, one hop to a reader thread
  each: the first piece (which reads what the round needs), the longest, and the whole start
  (from the first piece asked for to the last placed) are timed, and when the jobs reached their
  nodes (half of them, all), which the submissions decide;
- steady state: the rounds while runs of 5-15 s end and free slots one by one, for `--steady`
  seconds;
- alone, first: `Scheduler._plan_round` called directly on one thread, no loop running, for a
  start (its first piece, and all its pieces) and for a steady round (every slot but one taken):
  the round's own work;
- the event loop's longest stall meanwhile (a 5 ms ticker's worst lateness): planning that runs
  on the loop shows there, and so does the cycle collector's pass over every object it tracks
  (the process is set up as `serve` sets it up: `app.settle_heap` once the dispatcher started;
  that one full collection at start is timed on its own, not counted as a stall).

Each round is timed twice: awaited on the event loop (`Dispatcher.plan()`: the snapshot, the hop
to a reader thread and back, so the loop's own lateness under the follow loops counts too), and
on its thread (`Scheduler._plan_round`: wall time, and the thread's CPU time, which is the
round's own work whatever else holds the interpreter).

With `--base`, the same measurement runs first on that checkout's sources (in a subprocess),
then on this one's, and both are printed side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fill_store(path: Path, queued: int, history: int) -> None:
    from x2v_gateway.store import JobStore

    JobStore(path).close()  # migrations
    conn = sqlite3.connect(path)
    now = time.time()
    rows = []
    for i in range(history):
        done = now - 86400 + i * 0.1
        rows.append((f"h{i:07d}", "t2v", "succeeded" if i % 20 else "failed", '{"prompt": "p"}', "{}", 0,
                     None, f"key{i % 3}", done - 30, done, f"n{i % 1000}", done - 20, done))
    conn.executemany(
        "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner, created_at,"
        " updated_at, upstream, started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    rows = []
    for i in range(queued):
        batch = None if i % 10 == 0 else f"batch{(i // 500) % 30}"
        rows.append((f"j{i:07d}", "s2v" if i % 4 == 0 else "t2v", json.dumps({"prompt": "p", "seed": i}),
                     "{}", 5 if i % 100 == 0 else 0, batch, f"key{i % 3}", now, now))
    conn.executemany(
        "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner, created_at,"
        " updated_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)", rows,
    )
    conn.commit()
    conn.close()


def _dispatcher(path: Path, nodes: int):
    """The real Dispatcher (not started) on the store at `path`, with `nodes` in-memory nodes."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from memory_upstream import MemoryUpstream

    from x2v_gateway.blobs import BlobStore
    from x2v_gateway.dispatch import Dispatcher, Notifier
    from x2v_gateway.metrics import Metrics
    from x2v_gateway.store import JobStore

    rng = random.Random(1)
    upstreams = [MemoryUpstream(f"n{i}", tasks=frozenset({"t2v", "s2v"}), slots=2,
                                seconds=rng.uniform(5, 15)) for i in range(nodes)]
    store = JobStore(path)
    return store, Dispatcher(store, BlobStore(path.parent / "blobs"), upstreams, Notifier(), Metrics())


def _alone(path: Path, nodes: int, runs: int = 9) -> dict:
    """`Scheduler._plan_round` timed on this thread with nothing else running (no loops, no
    event loop): a start (every slot free, the run times just loaded from the store as
    `Dispatcher.start` loads them, a new dispatcher each time), then a steady round (every slot
    but one taken, as `running` jobs in the store). The round's own work, medians of `runs`."""
    from x2v_gateway.dispatch.schedule import _Snapshot

    def one_round(store, dispatcher) -> tuple[list, float, float]:
        """The jobs placed, the first hop's seconds and the whole round's."""
        states = dispatcher._scheduler.ctx.states
        snapshot = _Snapshot(states=dict(states), unclaimed=Counter(), submitting=set(), collecting={},
                             wall=time.time())
        started = time.perf_counter()
        going = store.read_blocking(partial(dispatcher._scheduler._plan_round, snap=snapshot))
        first = time.perf_counter() - started
        if isinstance(going, tuple):  # a checkout that places a round in one piece
            return going[0], first, first
        from x2v_gateway.dispatch.schedule import PIECE

        placed = list(going.placed)
        while not going.done:
            placed += store.read_blocking(partial(going.place, most=PIECE))
        return placed, first, time.perf_counter() - started

    def started_dispatcher():
        store, dispatcher = _dispatcher(path, nodes)
        runs = reversed(store.read_blocking(lambda r: r.recent_run_times()))
        if hasattr(dispatcher.timings, "load"):
            dispatcher.timings.load(runs)
        else:  # a checkout from before Timings.load, as its Dispatcher.start does
            for node, task, seconds in runs:
                dispatcher.timings.record(node, task, seconds)
        for state in dispatcher._scheduler.ctx.states.values():
            state.up, state.ready = True, True
        return store, dispatcher

    starts, wholes = [], []
    for _ in range(runs):
        store, dispatcher = started_dispatcher()
        placed, first, whole = one_round(store, dispatcher)
        starts.append(first)
        wholes.append(whole)
        store.close()
    conn = sqlite3.connect(path)
    now = time.time()
    conn.executemany("UPDATE jobs SET state = 'running', upstream = ?, submitted_at = ?, started_at = ? WHERE id = ?",
                     [(state.name, now, now, job.id) for job, state in placed[1:]])
    conn.commit()
    conn.close()
    store, dispatcher = started_dispatcher()
    steady = [one_round(store, dispatcher)[1] for _ in range(runs)]
    store.close()
    return {"alone_start_ms": sorted(starts)[runs // 2] * 1000, "alone_start_all_ms": sorted(wholes)[runs // 2] * 1000,
            "alone_steady_ms": sorted(steady)[runs // 2] * 1000}


async def _measure(path: Path, nodes: int, steady: float, *, first_only: bool) -> dict:
    store, dispatcher = _dispatcher(path, nodes)
    rounds: list[tuple[float, float, int]] = []  # began, seconds, jobs placed
    plan = dispatcher.plan

    async def timed_plan():
        started = time.monotonic()
        result = await plan()
        rounds.append((started, time.monotonic() - started, len(result)))
        return result

    dispatcher.plan = timed_plan  # type: ignore[method-assign]
    on_thread: list[tuple[float, float, int]] = []  # wall, CPU, jobs placed
    scheduler = dispatcher._scheduler
    plan_round = getattr(scheduler, "_plan_round", None)  # a checkout that plans on the loop has none

    def timed_round(reads, snapshot):
        wall, cpu = time.perf_counter(), time.thread_time()
        going = plan_round(reads, snapshot)
        placed = going[0] if isinstance(going, tuple) else going.placed  # the first piece
        on_thread.append((time.perf_counter() - wall, time.thread_time() - cpu, len(placed)))
        return going

    if plan_round is not None:
        scheduler._plan_round = timed_round
    piece_thread: list[float] = []  # a round's later pieces on their thread (a round's first is in its own)
    try:
        from x2v_gateway.dispatch.schedule import _Round
    except ImportError:  # a checkout that places a round in one piece
        _Round = None
    if _Round is not None:
        place = _Round.place

        def timed_place(going, reads, most):
            wall = time.perf_counter()
            placed = place(going, reads, most)
            if going.placed:
                piece_thread.append(time.perf_counter() - wall)
            return placed

        _Round.place = timed_place
    stall = 0.0
    settling = (0.0, 0.0)  # when `settle_heap` ran: its one collection is reported on its own

    async def ticker() -> None:
        nonlocal stall
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            if not settling[0] <= before <= settling[1]:
                stall = max(stall, time.perf_counter() - before - 0.005)

    try:  # what `serve` does once started; a checkout from before it has none
        from x2v_gateway.app import settle_heap
    except ImportError:
        settle_heap = None
    tick = asyncio.ensure_future(ticker())
    await dispatcher.start()
    settled = None
    if settle_heap is not None:
        began = time.perf_counter()
        settle_heap()
        settling = (began - 0.006, time.perf_counter())  # a tick that began in it is not counted
        settled = settling[1] - began
    deadline = time.monotonic() + 120
    while sum(n for _, _, n in rounds) < 2 * nodes:
        assert time.monotonic() < deadline, "the start did not fill every slot"
        await asyncio.sleep(0.01)
    pieces = [(began, seconds, n) for began, seconds, n in rounds if n]
    first, placed = pieces[0][1], sum(n for _, _, n in pieces)
    start_all = pieces[-1][0] + pieces[-1][1] - pieces[0][0]
    # When the jobs reached their nodes, from the first piece asked for: half of them, and all.
    nodes_held = [state.upstream for state in dispatcher.states.values()]
    while sum(len(node.log) for node in nodes_held) < 2 * nodes:
        assert time.monotonic() < deadline, "the start's jobs did not all reach their nodes"
        await asyncio.sleep(0.01)
    arrivals = sorted(task.arrived for node in nodes_held for task in node.log)
    sent_half, sent_all = arrivals[nodes - 1] - pieces[0][0], arrivals[2 * nodes - 1] - pieces[0][0]
    start_pieces_thread = max(piece_thread, default=None)
    start_stall = stall
    first_thread = next(((wall, cpu) for wall, cpu, n in on_thread if n > 0), (None, None))
    steady_rounds: list[float] = []
    steady_thread: list[tuple[float, float, int]] = []
    if not first_only:
        await asyncio.sleep(2)  # the first round's submissions settle
        stall, mark, thread_mark = 0.0, len(rounds), len(on_thread)
        await asyncio.sleep(steady)
        steady_rounds = [t for _, t, n in rounds[mark:] if n > 0]
        steady_thread = [row for row in on_thread[thread_mark:] if row[2] > 0]
    await dispatcher.stop()
    tick.cancel()
    store.close()
    return {"first": first, "placed": placed, "pieces": len(pieces), "longest": max(t for _, t, _ in pieces),
            "start_all": start_all, "sent_half": sent_half, "sent_all": sent_all,
            "pieces_thread": start_pieces_thread, "start_stall": start_stall, "settled": settled, "steady": steady_rounds,
            "steady_stall": stall, "first_thread": first_thread[0], "first_cpu": first_thread[1],
            "steady_thread": [wall for wall, _, _ in steady_thread],
            "steady_cpu": [cpu for _, cpu, _ in steady_thread]}


def _on_a_copy(template: Path, run, *args):
    """`run(path, *args)` on a fresh copy of the store."""
    work = Path(tempfile.mkdtemp(prefix="plan-run-"))
    try:
        for suffix in ("", "-wal", "-shm"):
            if (template.parent / (template.name + suffix)).exists():
                shutil.copy(template.parent / (template.name + suffix), work / (template.name + suffix))
        return run(work / template.name, *args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(template: Path, nodes: int, steady: float) -> dict:
    """The rounds alone, then three live starts (a fresh copy of the store each), then a steady
    run on the last."""
    alone = _on_a_copy(template, _alone, nodes)
    firsts, longests, alls, placed, stalls, first_threads, first_cpus, settles = [], [], [], 0, [], [], [], []
    halves, sents, piece_threads = [], [], []
    result: dict = {}
    for attempt in range(3):
        result = _on_a_copy(template, lambda path, first_only: asyncio.run(
            _measure(path, nodes, steady, first_only=first_only)), attempt < 2)
        firsts.append(result["first"])
        longests.append(result["longest"])
        alls.append(result["start_all"])
        halves.append(result["sent_half"])
        sents.append(result["sent_all"])
        piece_threads.append(result["pieces_thread"])
        stalls.append(result["start_stall"])
        first_threads.append(result["first_thread"])
        first_cpus.append(result["first_cpu"])
        settles.append(result["settled"])
        placed = result["placed"]

    def ms(values: list, q: float = 0.5) -> float | None:
        values = sorted(v for v in values if v is not None)
        return values[int(q * (len(values) - 1))] * 1000 if values else None

    return {**alone, "first_ms": ms(firsts), "longest_ms": ms(longests), "start_all_ms": ms(alls),
            "sent_half_ms": ms(halves), "sent_all_ms": ms(sents), "pieces_thread_ms": ms(piece_threads),
            "placed": placed, "pieces": result["pieces"], "start_stall_ms": ms(stalls),
            "settle_ms": ms(settles),
            "first_thread_ms": ms(first_threads), "first_cpu_ms": ms(first_cpus),
            "steady_ms": ms(result["steady"]), "steady_p95_ms": ms(result["steady"], 0.95),
            "steady_thread_ms": ms(result["steady_thread"]), "steady_cpu_ms": ms(result["steady_cpu"]),
            "steady_cpu_p95_ms": ms(result["steady_cpu"], 0.95),
            "steady_rounds": len(result["steady"]), "steady_stall_ms": result["steady_stall"] * 1000}


def side_by_side(script: str, base: str | None, args: list[str]) -> dict[str, dict]:
    """`script --store PATH *args` run on the `base` checkout's sources (if given), then on this
    one's, each in a process of its own with a store of its own: the JSON each printed last, by
    "base" and "this"."""
    root = Path(tempfile.mkdtemp(prefix=f"{Path(script).stem}-bench-"))
    try:
        results = {}
        sources = ([("base", base)] if base else []) + [("this", str(HERE.parent / "src"))]
        for label, src in sources:
            (root / label).mkdir()
            out = subprocess.run(
                [sys.executable, script, "--store", str(root / label / "gateway.db"), *args],
                env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False,
            )
            if out.returncode:
                sys.exit(f"{label} ({src}) failed:\n{out.stderr[-3000:]}")
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=50_000)
    parser.add_argument("--history", type=int, default=200_000)
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of steady state")
    parser.add_argument("--base", help="src directory of the checkout to compare with")
    parser.add_argument("--store", help=argparse.SUPPRESS)  # where the subprocess fills its store
    args = parser.parse_args()

    if args.store:
        # Each code fills its own store: the same jobs, in the schema its migrations make.
        fill_store(Path(args.store), args.queued, args.history)
        print(json.dumps(measure(Path(args.store), args.nodes, args.steady)))
        return
    results = side_by_side(__file__, args.base, ["--nodes", str(args.nodes), "--queued", str(args.queued),
                                                 "--history", str(args.history), "--steady", str(args.steady)])
    print(f"{args.nodes} nodes, {args.queued} queued, {args.history} finished (medians):")
    for key, name in (("alone_start_ms", "alone: a start's 1st hop"), ("alone_start_all_ms", "alone: a whole start"),
                      ("alone_steady_ms", "alone: a steady round"),
                      ("first_ms", "a start: first piece"), ("first_thread_ms", "  on its thread"),
                      ("first_cpu_ms", "  its thread's CPU"), ("longest_ms", "  longest piece"),
                      ("pieces_thread_ms", "  later pieces, thread max"),
                      ("start_all_ms", "  all placed"), ("sent_half_ms", "  half on their nodes"),
                      ("sent_all_ms", "  all on their nodes"), ("start_stall_ms", "  loop's longest stall"),
                      ("settle_ms", "  settle_heap, once"),
                      ("steady_ms", "steady rounds"), ("steady_p95_ms", "  p95"),
                      ("steady_thread_ms", "  on its thread"), ("steady_cpu_ms", "  its thread's CPU"),
                      ("steady_cpu_p95_ms", "  its thread's CPU p95"),
                      ("steady_stall_ms", "  loop's longest stall")):
        row = "  ".join(f"{label}: {results[label][key]:8.1f} ms" for label in results
                        if results[label][key] is not None)
        print(f"  {name:<24} {row}")
    print("  placed at a start: " + ", ".join(f"{k} {v['placed']} in {v['pieces']} pieces" for k, v in results.items())
          + "; steady rounds: " + ", ".join(f"{k} {v['steady_rounds']}" for k, v in results.items()))


if __name__ == "__main__":
    main()
