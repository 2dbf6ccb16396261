"""What the rest of the gateway asks of the store: `JobStore`, the one door to it.

Every job's whole life is kept here, so that a restart resumes where a crash left off; with it
the node registry, API keys, dashboard sessions, quotas and the audit log. The store never blocks
the event loop: every method is a coroutine, and `read(fn)` runs several reads (and the work on
their rows) in one hop. Every state change is conditional, so a finished job can never be moved
again: a job cancelled by its user stays cancelled even when its node later reports it completed.

A backend implements the abstract methods and the reads of `Reads` (SQLite: `store/sqlite/`);
nothing else names it. `JobStore(location)` opens the backend for the location, as `Path(...)`
makes a `PosixPath`: a SQLite file for a path, PostgreSQL (`store/postgres/`, for several
replicas) for a `postgresql://` URL; `store/__init__.py` picks it.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from .buckets import TokenBuckets
from .reads import Reads
from .pipeline_records import Pipeline
from .records import BatchJobSpec, Job, JobWebhook

T = TypeVar("T")
P = ParamSpec("P")


def _off_loop(read: Callable[Concatenate[Reads, P], T]) -> Callable[Concatenate[JobStore, P], Awaitable[T]]:
    """`Reads.x` as `JobStore.x`: the same read, awaited, off the event loop."""
    name = read.__name__

    @functools.wraps(read)
    async def run(store: JobStore, *args: P.args, **kwargs: P.kwargs) -> T:
        return await store.read(lambda reads: getattr(reads, name)(*args, **kwargs))

    return run


class JobStore(ABC):
    """Jobs, nodes, keys and their history, never read or written on the event loop."""

    # What `JobStore(location)` opens: a backend for the location (store/__init__.py sets it:
    # PostgreSQL for a postgresql:// URL, else a SQLite file).
    backend_for: ClassVar[Callable[[Any], type[JobStore]]]

    def __new__(cls, *args: Any, **kwargs: Any) -> JobStore:
        return super().__new__(JobStore.backend_for(args[0] if args else None) if cls is JobStore else cls)

    # -- reading --------------------------------------------------------------------------------

    @abstractmethod
    async def read(self, fn: Callable[[Reads], T]) -> T:
        """Run `fn` off the event loop: several reads (and the work on their rows) in one hop."""

    @abstractmethod
    def read_blocking(self, fn: Callable[[Reads], T]) -> T:
        """Run `fn` on the calling thread. Only where no event loop serves requests: building
        the gateway before it starts, the command line."""

    @abstractmethod
    async def is_writable(self) -> bool:
        """A cheap check for /readyz: can this process write to the store right now."""

    @abstractmethod
    def close(self) -> None: ...

    get = _off_loop(Reads.get)
    list_jobs = _off_loop(Reads.list_jobs)
    active = _off_loop(Reads.active)
    inflight_counts = _off_loop(Reads.inflight_counts)
    cancel_pending = _off_loop(Reads.cancel_pending)
    counts_by_state = _off_loop(Reads.counts_by_state)
    owner_counts = _off_loop(Reads.owner_counts)
    events = _off_loop(Reads.events)
    events_after = _off_loop(Reads.events_after)
    newest_event_id = _off_loop(Reads.newest_event_id)
    recent_run_times = _off_loop(Reads.recent_run_times)
    blob = _off_loop(Reads.blob)
    blob_sizes = _off_loop(Reads.blob_sizes)
    queue_position = _off_loop(Reads.queue_position)
    queue_positions = _off_loop(Reads.queue_positions)
    queue_lanes = _off_loop(Reads.queue_lanes)
    lane_jobs = _off_loop(Reads.lane_jobs)
    inflight = _off_loop(Reads.inflight)
    count_pinned = _off_loop(Reads.count_pinned)
    batch = _off_loop(Reads.batch)
    recent_batch_ids = _off_loop(Reads.recent_batch_ids)
    batch_counts = _off_loop(Reads.batch_counts)
    batch_created_at = _off_loop(Reads.batch_created_at)
    batch_items = _off_loop(Reads.batch_items)
    batch_item = _off_loop(Reads.batch_item)
    nodes = _off_loop(Reads.nodes)
    stray_tasks = _off_loop(Reads.stray_tasks)
    key_by_hash = _off_loop(Reads.key_by_hash)
    keys = _off_loop(Reads.keys)
    session = _off_loop(Reads.session)
    jobs_used = _off_loop(Reads.jobs_used)
    concurrency_limits = _off_loop(Reads.concurrency_limits)
    audit_log = _off_loop(Reads.audit_log)
    pipeline = _off_loop(Reads.pipeline)
    pipelines = _off_loop(Reads.pipelines)
    open_pipelines = _off_loop(Reads.open_pipelines)
    pipeline_for_key = _off_loop(Reads.pipeline_for_key)
    foreign_job = _off_loop(Reads.foreign_job)
    foreign_ids = _off_loop(Reads.foreign_ids)
    job_deliveries = _off_loop(Reads.job_deliveries)
    replicas = _off_loop(Reads.replicas)
    changes_since = _off_loop(Reads.changes_since)

    # -- a job's life ---------------------------------------------------------------------------

    @abstractmethod
    async def record_blob(self, sha256: str, size: int, kind: str) -> None:
        """A file now in the blob store (kept once, however many jobs use it)."""

    @abstractmethod
    async def create_job(
        self,
        *,
        task: str,
        params: dict[str, Any],
        inputs: dict[str, str],
        priority: int = 0,
        batch_id: str | None = None,
        owner: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        pinned: str | None = None,
        webhook: JobWebhook | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job (with its `webhook`, in the same transaction); with an
        Idempotency-Key already used, return that job instead.

        Returns (job, created). Raises IdempotencyConflict when the key came with another request.
        """

    @abstractmethod
    async def claim(
        self, job_id: str, upstream: str, task_id: str, *, replica: str | None = None,
        slots: int | None = None, off_node: Iterable[str] = (),
    ) -> bool:
        """Record a submission attempt *before* it is sent: queued -> submitted on `upstream`,
        followed by `replica`.

        Because the record comes first, a crash at any later point leaves a job that says where
        it may be, and the restart asks that upstream before anything is sent again. With
        `replica`, only while that replica has a lease row (`join`): one whose jobs another
        replica took over claims nothing more.

        With `slots`, only if `upstream` then holds fewer than `slots` jobs in flight, not
        counting `off_node` (jobs the caller knows have left the node: finished there, their
        video being copied). Check and claim are one atomic step across every replica: SQLite
        gets it from BEGIN IMMEDIATE (one writer per file); PostgreSQL must lock the upstream
        first (`pg_advisory_xact_lock(hashtext(upstream))`, or `SELECT ... FOR UPDATE` of its
        `nodes` row) and count inside that transaction, and lock the job row with
        `FOR UPDATE SKIP LOCKED` so that two replicas placing the same job do not wait on each
        other: the second simply gets False.
        """

    @abstractmethod
    async def set_upstream_task_id(self, job_id: str, task_id: str, *, run: int | None = None) -> bool:
        """Record the upstream's id of the job's task (also for a job cancelled meanwhile: its
        pending cancel needs it). With `run`, only if the job is still on that run: a retry
        sent while the attempt was in flight must not get the old attempt's task."""

    @abstractmethod
    async def requeue(self, job_id: str, reason: str, *, sent: bool = True) -> bool:
        """Back to the gateway's queue (node full, node forgot the task, node gone).

        `sent=False` when the upstream certainly did not take the attempt (back-pressure), so it
        does not count as one.
        """

    @abstractmethod
    async def mark_running(self, job_id: str, started_at: float | None = None) -> bool:
        """A submitted job runs; `started_at` when the upstream says when it began (else now)."""

    @abstractmethod
    async def set_queue_info(self, updates: dict[str, dict[str, Any] | None]) -> None:
        """Upstream queue position / estimates for jobs not finished, all at once."""

    @abstractmethod
    async def succeed(self, job_id: str, result_sha: str, result_meta: dict[str, Any]) -> bool: ...

    @abstractmethod
    async def fail(self, job_id: str, error: str) -> bool: ...

    @abstractmethod
    async def set_poster(self, job_id: str, result_sha: str, poster_sha: str) -> bool:
        """A succeeded job's poster frame, made after it finished (`result_meta["poster"]`).
        Only while it still has that video and its files: False otherwise."""

    @abstractmethod
    async def cancel(
        self, job_id: str, reason: str = "cancelled by user", *, tell_upstream: bool = True
    ) -> Job | None:
        """Cancel a job that has not finished; final at once, whatever its upstream says later.

        Returns the job as it is after the call (unchanged if it had already finished), or None.
        """

    @abstractmethod
    async def cancel_sent(self, job_id: str) -> None:
        """The job's upstream was told to stop its task."""

    @abstractmethod
    async def retry(self, job_id: str) -> Job | None:
        """A failed or cancelled job goes back to the queue as a new run (same parameters)."""

    @abstractmethod
    async def resume(self, job_id: str, upstream: str, task_id: str) -> bool:
        """A failed or cancelled job whose upstream took its task back (the cloud's resume):
        `submitted` again on the same upstream task, as a new run, without a new submission.

        Only if the job is still finished on that upstream task (a second retry sent meanwhile
        did nothing to it).
        """

    @abstractmethod
    async def move(self, job_id: str, upstream: str, reason: str, *, stray: bool) -> bool:
        """Take a job back from `upstream` into the gateway's queue (node dead, or too slow to
        start it). With `stray`, its task there is remembered, to be cancelled when the node
        answers again. Only if the job is still on that upstream and not finished."""

    @abstractmethod
    async def expire_files(self, finished_before: float, grace: float = 3600.0) -> list[str]:
        """Mark finished jobs older than the cutoff as expired; return blobs nothing else needs.

        Blobs recorded within `grace` seconds are kept: they may belong to a request that is
        still being accepted."""

    @abstractmethod
    async def purge_files(self, job_ids: list[str], actor: str, target: str) -> list[str]:
        """Mark these finished jobs' files deleted; return the blobs no kept job needs any more.

        A portrait shared with a job whose files are kept stays. Unlike the retention sweep, a
        blob recorded a moment ago is not spared: a purge is someone asking for their files to be
        gone now.
        """

    # -- batches (the dashboard) ----------------------------------------------------------------

    @abstractmethod
    async def create_batch(
        self,
        batch_id: str,
        specs: list[BatchJobSpec],
        *,
        batch: dict[str, Any] | None = None,
        owner: str | None = None,
        webhook: JobWebhook | None = None,
    ) -> list[Job] | None:
        """Queue jobs in a batch, all at once: every job or none, each with `webhook`.

        With `batch` (name, task, mode, form) a new dashboard batch is recorded too; when a batch
        with that id exists already (a second click on "Create"), nothing is added: None.
        """

    # -- pipelines (pipelines/) -----------------------------------------------------------------

    @abstractmethod
    async def create_pipeline(self, pipeline: Pipeline, webhook: JobWebhook | None = None) -> str:
        """Record a new pipeline (`running`) with its steps, none of them a job yet, and its
        `webhook`; its id.

        With an `idempotency_key` already used: that pipeline's id, nothing recorded (or
        IdempotencyConflict when it came with another request)."""

    @abstractmethod
    async def create_step_job(
        self, pipeline_id: str, n: int, *, task: str, params: dict[str, Any], inputs: dict[str, str],
        priority: int = 0, owner: str | None = None,
    ) -> tuple[Job, bool] | None:
        """Queue step `n`'s job (batch: the pipeline) and record it on the step, in one
        transaction: (job, created). A step that has its job already gets that one back, so a
        pipeline advanced twice (an event and the start-up sweep) makes no second job. None for
        a pipeline that has ended (succeeded, cancelled) or no such step."""

    @abstractmethod
    async def set_pipeline_state(
        self, pipeline_id: str, state: str, error: str | None = None, *, only_from: tuple[str, ...],
    ) -> bool:
        """Move a pipeline to `state` (with `error`, or none) if it is in one of `only_from`;
        an end it was not at (failed, cancelled) is recorded as a pipeline event, for webhooks,
        in the same transaction."""

    @abstractmethod
    async def finish_pipeline(self, pipeline_id: str, result_sha: str, meta: dict[str, Any]) -> bool:
        """A running pipeline's joined video is stored: it succeeded (a pipeline event, as
        `set_pipeline_state` records)."""

    @abstractmethod
    async def claim_join(self, pipeline_id: str, holder: str, until: float) -> bool:
        """Take a running pipeline's join for replica `holder` until `until` (a lease): True when
        it was free, its lease over, `holder`'s already, or held by a replica whose own lease
        (`replicas`) is over. Replicas that both see every step done join it once; one that dies
        mid-join (or a gateway restarted) leaves it to another within that replica's lease."""

    # -- the node registry ----------------------------------------------------------------------

    @abstractmethod
    async def save_node(
        self, name: str, *, url: str, capacity: int, tasks: Iterable[str] | None, source: str
    ) -> None:
        """Add a node, or replace its URL, capacity and task types (a removed node comes back).

        Whether it is drained is left as it was: a drained node stays drained until undrained.
        """

    @abstractmethod
    async def set_node_flags(
        self, name: str, *, drained: bool | None = None, removed: bool | None = None
    ) -> None:
        """Drain/undrain or remove a node. A record is made for an upstream not in the registry
        yet (a cloud account), so that its drained flag outlives a restart too."""

    @abstractmethod
    async def delete_node(self, name: str) -> None: ...

    @abstractmethod
    async def add_stray(self, node: str, task_id: str, job_id: str) -> None:
        """A task on `node` that no job owns any more (its job was retried while the attempt
        was in flight): cancelled there before the node gets anything new."""

    @abstractmethod
    async def drop_stray(self, node: str, task_id: str) -> None: ...

    # -- gateway replicas (dispatch/replicas.py) -------------------------------------------------

    @abstractmethod
    async def join(self, replica: str, lease: float) -> None:
        """A replica starts: its lease row, valid `lease` seconds (made, or renewed when a
        replica of that id restarts; the jobs that name it are its own again)."""

    @abstractmethod
    async def heartbeat(self, replica: str, lease: float, gone: Iterable[str] = ()) -> list[str] | None:
        """Renew `replica`'s lease for `lease` seconds, and take over the jobs of dead replicas:
        those whose lease has run out, those in `gone` (known dead: a process of this host that
        no longer exists), and any job held by no replica with a lease. One transaction.

        A job is held while it is `submitted` or `running`, or cancelled with its stop request
        still owed (`cancel_pending`). Taken over, it names `replica`, whose follow loops then
        resolve it against the node's task list, exactly as a restarted gateway does: nothing is
        sent again before the node is asked. The dead replicas' rows are removed.

        Returns the ids of the jobs taken over, or None when `replica` has no lease row any more
        (another replica took its jobs over: it must stop sending and following them). On
        PostgreSQL: the dead rows are read with `FOR UPDATE SKIP LOCKED`, so two replicas that
        notice one death at once do not both take its jobs, and neither waits for the other.
        """

    @abstractmethod
    async def leave(self, replica: str, grace: float = 2.0) -> None:
        """A replica stops: its lease ends in `grace` seconds (a request it was making when it
        stopped may still be in a node's hands), and the others take its jobs over then."""

    # -- API keys, sessions, quotas, audit (auth.py) --------------------------------------------

    @abstractmethod
    async def create_key(self, key: dict[str, Any], actor: str) -> dict[str, Any]:
        """Insert a key (`key` holds every field but the timestamps). Names are unique among
        keys that are not revoked, so `keys revoke NAME` means one key (else KeyNameTaken)."""

    @abstractmethod
    async def revoke_key(
        self, key_id: str, actor: str, *, keep_admin: bool = False
    ) -> dict[str, Any] | None:
        """Revoke a key and end its dashboard sessions. None when no such key is active.

        With `keep_admin`, refuse (AdminKeyNeeded) to revoke the key in X2V_ADMIN_KEY or the
        last active admin key. The check is made with the revoke, atomically, so two revokes at
        once cannot each leave the other's key as the last one and both pass.
        """

    @abstractmethod
    async def create_session(self, id_hash: str, key_id: str, csrf: str, expires_at: float) -> None: ...

    @abstractmethod
    async def delete_session(self, id_hash: str) -> None: ...

    @abstractmethod
    async def reserve_jobs(self, key_id: str, day: str, n: int, quota: int | None) -> int | None:
        """Count `n` more jobs for a key today, unless that goes over `quota`: the new total, or
        None (nothing counted). Check and count are atomic, so two requests at once cannot both
        take the last job of a quota."""

    @abstractmethod
    async def release_jobs(self, key_id: str, day: str, n: int) -> None:
        """Give back jobs counted by `reserve_jobs` for a request that was then refused."""

    @abstractmethod
    async def record_audit(self, actor: str, action: str, target: str, detail: str = "") -> None: ...

    async def take_request(self, key_id: str, per_minute: float) -> float:
        """One request against a key's rate limit: 0 when it may go now, else the seconds until
        one may (a token bucket: `per_minute` a minute, in bursts of up to a minute's worth).

        Kept in this process's memory here, which is right for a store only this process uses
        (SQLite); a store that replicas share overrides it, so a key's limit holds across them.
        """
        buckets = self.__dict__.setdefault("_token_buckets", TokenBuckets())
        return buckets.take(key_id, per_minute)

    # -- foreign ids (the compatible surfaces, routes/compat) -----------------------------------

    @abstractmethod
    async def save_foreign_id(
        self, owner: str, surface: str, foreign_id: str, job_id: str, *, replace: bool = False,
    ) -> bool:
        """Name a job as a client of `surface` knows it, per key. False when the name is taken
        (unless `replace`: then the newest job has it, as a file written again on a node)."""

    # -- webhooks (webhooks.py, webhook_worker.py) ----------------------------------------------

    @abstractmethod
    async def record_deliveries(
        self, deliveries: list[dict[str, Any]], cursor: int, pipeline_cursor: int | None = None,
    ) -> int:
        """Record deliveries (`webhook_deliveries` columns: id, event_id, type, job_id or
        pipeline_id, url, key_id, payload, created_at), each due at once, and move the job event
        cursor to `cursor` (and the pipeline event one to `pipeline_cursor`), in one transaction. A delivery already recorded for its (event_id, type, url) is left as it
        was, with its id: a crash between reading events and recording them only redoes it.
        Returns how many were new."""

    @abstractmethod
    async def claim_deliveries(self, ids: list[str], now: float, until: float) -> list[dict[str, Any]]:
        """Take these deliveries (`due_deliveries` found them) for an attempt, atomically: those
        still pending and due by `now` (whole rows), each then due again only at `until`, so that
        replicas sharing the store never attempt one at the same time, and one a crash cut short
        is attempted again once `until` has passed."""

    @abstractmethod
    async def delivery_attempted(
        self, delivery_id: str, *, at: float, status: int | None, error: str | None,
        next_attempt_at: float | None,
    ) -> None:
        """One attempt's outcome: delivered (a 2xx `status`), or failed and due again at
        `next_attempt_at` (None: given up). A delivery no longer pending is left alone."""

    @abstractmethod
    async def set_key_webhook(
        self, key_id: str, url: str | None, events: tuple[str, ...] | None, actor: str,
    ) -> bool:
        """A key's default webhook for its jobs that name none (url None: no default); audited.
        False: no such key."""

    @abstractmethod
    async def set_webhook_secret(
        self, key_id: str, secret: str, actor: str, *, previous_until: float | None,
    ) -> bool:
        """A key's new signing secret; audited (never the secret). With `previous_until`, the
        secret it replaces signs too until then (a rotation). False: no such key."""
