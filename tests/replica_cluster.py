"""Several gateway replicas on one SQLite file (or one PostgreSQL database: `database_url`), in
front of several demo nodes, as real processes.

Shared by tests/test_replicas.py and bench/replicas.py:

    cluster = Cluster(tmp_path, replicas=3, nodes=4, job_seconds=0.5).start()
    ids = cluster.submit(60)            # spread over the replicas, a client retrying elsewhere
    cluster.replicas[1].kill()          # SIGKILL; its jobs are taken over by the others
    cluster.wait_finished(ids)
    cluster.check_exactly_once(ids)     # every job reached a node once, none above its slots
    cluster.stop()

What the nodes saw comes from their journals (`submissions.jsonl`: each accepted task, with the
tasks the node held once it was accepted); what the gateways did, from the shared SQLite file.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx

import loopback
import gateway_proc
from gateway_proc import GatewayProcess, _watch
from servers import NodeProcess

# Each node holds at most this many of the gateway's jobs: capacity 1 + look-ahead 1 (defaults).
SLOTS = 2


class ReplicaProcess(GatewayProcess):
    """One gateway replica: the shared data dir, its own port, log and X2V_REPLICA_ID."""

    def __init__(self, data_dir: Path, name: str, nodes: str, **settings: str) -> None:
        super().__init__(data_dir, nodes, X2V_REPLICA_ID=name, **settings)
        self.name = name
        self.log_path = data_dir.parent / f"{name}-gateway.log"
        self.responses_path = data_dir.parent / f"{name}-responses.log"
        _watch("files", str(self.log_path))
        _watch("files", str(self.responses_path))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """`replicas` gateways sharing `root/data`, and `nodes` demo nodes (t2v) behind all of them."""

    def __init__(
        self, root: Path, *, replicas: int = 3, nodes: int = 4, job_seconds: float = 0.5,
        database_url: str = "", node_class: type[NodeProcess] = NodeProcess, **settings: str,
    ) -> None:
        self.root = root
        if not database_url and gateway_proc.database_for:  # pytest --store=postgresql
            database_url = gateway_proc.database_for(root / "data")
        self.database_url = database_url
        if database_url:
            settings["X2V_DATABASE_URL"] = database_url
        # max_queue_size well above the slots: a node given too much accepts it, and says so.
        self.nodes = [
            node_class(root / f"node{i}", job_seconds=job_seconds, max_queue_size=10, tasks="t2v")
            for i in range(nodes)
        ]
        spec = ",".join(f"n{i}={n.url}" for i, n in enumerate(self.nodes))
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.replicas = [ReplicaProcess(self.data, f"r{i}", spec, **settings) for i in range(replicas)]
        self._rr = 0
        self._lock = threading.Lock()

    def start(self) -> Cluster:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.start(), self.nodes))
        # One after another: the first creates the schema and the admin key.
        for replica in self.replicas:
            replica.start()
        return self

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        for node in self.nodes:
            node.stop()

    # -- clients -------------------------------------------------------------------------------

    def live(self) -> list[ReplicaProcess]:
        return [r for r in self.replicas if r.alive]

    def post_job(self, prompt: str, attempts: int = 60) -> str:
        """One t2v job, sent to the next replica; a refused connection (a replica just killed)
        is retried on another with the same Idempotency-Key, as a client behind a load
        balancer would."""
        key = uuid.uuid4().hex
        for _ in range(attempts):
            with self._lock:
                self._rr += 1
                replica = self.replicas[self._rr % len(self.replicas)]
            if not replica.alive:
                continue
            try:
                response = loopback.post(
                    f"{replica.url}/api/v1/jobs", json={"task": "t2v", "prompt": prompt},
                    headers={"Authorization": f"Bearer {replica.admin_key}", "Idempotency-Key": key},
                    timeout=30,
                )
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if response.status_code in (200, 201):
                return response.json()["id"]
            if response.status_code < 500:
                raise AssertionError(f"job refused: {response.status_code} {response.text}")
            time.sleep(0.1)
        raise AssertionError(f"no replica took the job {prompt!r}")

    def submit(self, count: int, *, spread: float = 0.0, prefix: str = "job") -> list[str]:
        """`count` jobs from 4 client threads, over `spread` seconds; their ids, in order."""
        def post(i: int) -> str:
            if spread:
                time.sleep(max(0.0, spread * i / count - (time.monotonic() - started)))
            return self.post_job(f"{prefix} {i}")

        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(post, range(count)))

    # -- what happened -------------------------------------------------------------------------

    def db(self) -> sqlite3.Connection:
        if self.database_url:
            return _PostgresReader(self.database_url)  # type: ignore[return-value]
        conn = sqlite3.connect(f"file:{self.data / 'gateway.db'}?mode=ro", uri=True, timeout=10)
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def states(self, ids: list[str]) -> Counter:
        with self.db() as conn:
            marks = ",".join("?" * len(ids))
            return Counter(dict(conn.execute(
                f"SELECT state, count(*) FROM jobs WHERE id IN ({marks}) GROUP BY state", ids
            ).fetchall()))

    def held_by(self, replica: str) -> set[str]:
        """Jobs in flight that `replica` follows."""
        with self.db() as conn:
            return {row[0] for row in conn.execute(
                "SELECT id FROM jobs WHERE state IN ('submitted', 'running') AND replica = ?", (replica,)
            )}

    def busiest(self) -> ReplicaProcess:
        """The live replica following the most jobs in flight."""
        return max(self.live(), key=lambda r: len(self.held_by(r.name)))

    def wait_finished(self, ids: list[str], timeout: float) -> Counter:
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(ids)
            if sum(states[s] for s in ("succeeded", "failed", "cancelled")) == len(ids):
                return states
            assert time.monotonic() < deadline, f"jobs still unfinished after {timeout} s: {dict(states)}"
            time.sleep(0.25)

    def sent(self) -> Counter:
        """Task id -> how many times a node accepted it, over every node."""
        return Counter(entry["task_id"] for node in self.nodes for entry in node.submissions())

    def most_held(self) -> int:
        """The most of the gateway's tasks any node ever held at once."""
        return max((entry["held"] for node in self.nodes for entry in node.submissions()), default=0)

    def check_exactly_once(self, ids: list[str]) -> None:
        """Every job succeeded, reached a node exactly once, and no node held more than its slots."""
        states = self.states(ids)
        assert states == Counter({"succeeded": len(ids)}), dict(states)
        sent = self.sent()
        twice = {task: n for task, n in sent.items() if n > 1}
        assert not twice, f"sent to a node more than once: {twice}"
        assert set(ids) <= set(sent), f"never sent: {set(ids) - set(sent)}"
        assert self.most_held() <= SLOTS, f"a node held {self.most_held()} tasks (slots: {SLOTS})"

    def check_videos(self, ids: list[str], *, sample: int | None = None) -> None:
        """Each job's video downloads from a live replica and decodes (a frame at least)."""
        chosen = ids if sample is None else random.sample(ids, min(sample, len(ids)))
        for i, job_id in enumerate(chosen):
            replica = self.live()[i % len(self.live())]
            with replica.client() as client:
                response = client.get(f"/api/v1/jobs/{job_id}/video")
                assert response.status_code == 200, (job_id, response.status_code)
            path = self.root / f"video-{job_id}.mp4"
            path.write_bytes(response.content)
            with av.open(str(path)) as container:
                assert next(container.decode(video=0), None) is not None, f"{job_id}: no frame"
            path.unlink()


class _PostgresReader:
    """The shared PostgreSQL database read as `Cluster.db()` reads the SQLite file (`?` marks)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, args=()):
        return self.conn.execute(sql.replace("?", "%s"), args)

    def __enter__(self) -> _PostgresReader:
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()


def run_chaos(
    cluster: Cluster, jobs: int, kills: int, *, seed: int, spread: float, gap: tuple[float, float],
    timeout: float,
) -> dict:
    """`jobs` submitted across the replicas over `spread` seconds while a random live replica is
    SIGKILLed `kills` times at random moments (`gap` seconds apart), each restarted at once.
    Returns what happened; the caller checks the invariants."""
    rng = random.Random(seed)
    done = threading.Event()
    killed: list[tuple[str, float]] = []
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            for _ in range(kills):
                time.sleep(rng.uniform(*gap))
                victim = rng.choice(cluster.live())
                victim.kill()
                killed.append((victim.name, time.monotonic()))
                time.sleep(rng.uniform(0.0, 1.0))
                victim.start()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    ids = cluster.submit(jobs, spread=spread, prefix=f"chaos {seed}")
    states = cluster.wait_finished(ids, timeout)
    done.wait(timeout)
    thread.join(timeout=60)
    if errors:
        raise errors[0]
    return {"ids": ids, "states": states, "kills": killed, "seconds": time.monotonic() - started}
