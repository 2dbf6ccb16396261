"""What can be read from the store, whatever the backend: `Reads`.

A caller gets a `Reads` from `await store.read(fn)` (several reads and the work on their rows in
one hop, off the event loop) or `store.read_blocking(fn)`; every read is also a coroutine on the
store itself (`await store.get(job_id)`). What comes back is the store's records (records.py), or
plain dicts of a key's, a node's, a blob's or an audit entry's fields: never a backend's rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from .pipeline_records import Pipeline
from .records import BatchItem, Inflight, Job, JobWebhook, Lane, QueuedJob


class Reads(Protocol):
    """The store's reads, each on one consistent view of the store."""

    # -- jobs -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None: ...

    def jobs_by_id(self, ids: list[str]) -> list[Job]:
        """These jobs, oldest first."""
        ...

    def list_jobs(
        self,
        *,
        states: Iterable[str] = (),
        batch_id: str | None = None,
        task: str | None = None,
        owner: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """Newest first; `before_seq` is the cursor (the `seq` of the last job of the previous page)."""
        ...

    def active(self, upstream: str | None = None, replica: str | None = None) -> list[Job]:
        """Jobs handed to an upstream and not finished (optionally: to this one, followed by
        this gateway replica)."""
        ...

    def inflight_counts(self) -> dict[str, int]:
        """Jobs handed to each upstream and not finished."""
        ...

    def cancel_pending(self) -> list[Job]:
        """Cancelled jobs whose upstream task has not been told to stop yet."""
        ...

    def counts_by_state(self) -> dict[str, int]:
        """Every job, by state."""
        ...

    def owner_counts(self, owner: str | None) -> dict[str, int]:
        """Jobs by state: all of them, or one owner's. Costs the same with a million jobs."""
        ...

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's timeline: {at, state, detail}, oldest first."""
        ...

    def events_after(
        self, after_id: int, *, job_id: str | None = None, batch_id: str | None = None,
        owner: str | None = None, limit: int = 500,
    ) -> list[dict[str, Any]]:
        """State changes with an id above `after_id` (of one job, one batch, one owner: each
        given narrows), oldest first: {id, job_id, at, state, detail, batch_id}. Ids only grow,
        so an event stream resumes from the last one it sent (`Last-Event-ID`)."""
        ...

    def newest_event_id(self) -> int:
        """The id of the latest state change of any job (0: none yet): a live stream starts after it."""
        ...

    def recent_run_times(self, limit: int = 5000) -> list[tuple[str, str, float]]:
        """(upstream, task, seconds from started to finished) of the latest successes."""
        ...

    # -- blobs ----------------------------------------------------------------------------------

    def blob(self, sha256: str) -> dict[str, Any] | None:
        """A stored file's record: {sha256, size, kind, created_at}."""
        ...

    def blob_sizes(self, shas: Iterable[str]) -> dict[str, int]: ...

    # -- the queue ------------------------------------------------------------------------------

    def queue_position(self, job: Job) -> int | None:
        """1-based place of a queued job in the gateway's own queue (priority, then age); its
        cost does not grow with the length of the queue."""
        ...

    def queue_positions(self, jobs: Iterable[Job]) -> dict[str, int]:
        """1-based places in the gateway's queue of the queued jobs among `jobs`."""
        ...

    def queue_lanes(self, tasks: Iterable[str], *, batches_per_owner: int = 64) -> list[Lane]:
        """The queue's lanes for these task types: one per (task, priority, owner, batch), each
        with the `seq` of its oldest job. Costs a few lookups per lane, not a read of the queue."""
        ...

    def lane_jobs(self, lane: Lane, after_seq: int, limit: int) -> list[Job]:
        """Queued jobs of one lane, oldest first, after `after_seq`."""
        ...

    def lane_heads(self, lane: Lane, after_seq: int, limit: int) -> list[QueuedJob]:
        """`lane_jobs` in the few columns a dispatch round weighs (no JSON): a round at a start
        places thousands of jobs, and building each whole `Job` cost more than the placing."""
        ...

    def inflight(self) -> list[Inflight]:
        """Every job handed to an upstream and not finished, in a few columns."""
        ...

    def inflight_by_batch(self) -> dict[tuple[str, str], int]:
        """Jobs handed to an upstream and not finished, per (owner, batch) ('' for none): what
        fairness weighs, counted by the store, not read row by row, every dispatch round."""
        ...

    def inflight_on(self, upstreams: Iterable[str]) -> list[Inflight]:
        """`inflight`, of these upstreams only."""
        ...

    def inflight_among(self, job_ids: Iterable[str]) -> set[str]:
        """Which of these jobs are handed to an upstream and not finished."""
        ...

    def count_pinned(self, upstream: str) -> int:
        """Queued jobs that only this upstream may run."""
        ...

    # -- batches --------------------------------------------------------------------------------

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        """A batch made in the dashboard (API batches have no record, only a `batch_id`)."""
        ...

    def list_batches(
        self, *, owner: str | None = None, before: tuple[float, str] | None = None, limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Batches (rows of the batches table: the dashboard's and the API's), newest first;
        `owner`'s only unless None; those made before `before` (created_at, id)."""
        ...

    def recent_batch_ids(self, limit: int = 20, window: int = 5000, owner: str | None = None) -> list[str]:
        """Batches (made in the dashboard or through the API) with a job among the last
        `window` jobs (of `owner`, if given), the most recently active first. Bounded: it never
        reads more jobs than the window, however many the store holds."""
        ...

    def batch_counts(self, batch_id: str, owner: str | None = None) -> dict[str, int]:
        """A batch's jobs by state (only `owner`'s, if given: a batch id is not unique across keys)."""
        ...

    def batch_created_at(self, batch_id: str, owner: str | None = None) -> float | None:
        """When the batch's first job was accepted."""
        ...

    def batch_items(
        self, batch_id: str, *, after_seq: int = 0, limit: int = 200, owner: str | None = None,
    ) -> list[BatchItem]:
        """A batch's jobs (`owner`'s, if given) in the order they were made; `after_seq` is the cursor."""
        ...

    def batch_item(self, job_id: str) -> BatchItem | None: ...

    # -- pipelines ------------------------------------------------------------------------------

    def pipeline(self, pipeline_id: str) -> Pipeline | None:
        """A pipeline with its steps."""
        ...

    def pipelines(
        self, *, owner: str | None = None, before_seq: int | None = None, limit: int = 50,
    ) -> list[Pipeline]:
        """Pipelines (`owner`'s, if given) with their steps, newest first; `before_seq` is the cursor."""
        ...

    def pipeline_for_key(self, idempotency_key: str) -> tuple[str, str | None] | None:
        """(id, request hash) of the pipeline made with this Idempotency-Key (owner-scoped), if any."""
        ...

    def open_pipelines(self) -> list[str]:
        """The pipelines still under way or waiting for a failed step's retry, oldest first (the
        start-up sweep: their jobs' changes move them on again)."""
        ...

    # -- nodes ----------------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """Every node of the registry, removed ones included."""
        ...

    def stray_tasks(self, node: str) -> list[str]:
        """Tasks on `node` that no job owns any more, to cancel there, oldest first."""
        ...

    # -- gateway replicas (dispatch/replicas.py) -------------------------------------------------

    def replicas(self) -> list[dict[str, Any]]:
        """Every replica with a lease row: {id, started_at, expires_at} (wall times)."""
        ...

    def changes_since(self, cursor: int | None, limit: int = 1000) -> tuple[int, list[str]]:
        """The jobs that changed (a `job_events` row, by any replica) after `cursor`, at most
        `limit` events' worth, each id once: (the new cursor, job ids). `cursor` None: (the
        cursor of now, []).

        Polled about twice a second by every replica while others are alive, so it must cost
        an index seek when nothing changed (SQLite: a range of the events' primary key).
        PostgreSQL may serve it the same way, woken early by LISTEN/NOTIFY (a NOTIFY per
        committed event, `pg_notify('x2v_jobs', job_id)`) rather than polled.
        """
        ...

    # -- keys, sessions, quotas, audit ----------------------------------------------------------

    def key_by_hash(self, key_hash: str) -> dict[str, Any] | None:
        """The key with this hash, revoked or not."""
        ...

    def key(self, key_id: str) -> dict[str, Any] | None: ...

    def keys(self) -> list[dict[str, Any]]:
        """Every key, revoked ones included, oldest first."""
        ...

    def session(self, id_hash: str) -> tuple[dict[str, Any], str, float] | None:
        """(the key, the CSRF token, when it expires) of a session that has not expired, of a
        key not revoked."""
        ...

    def jobs_used(self, key_id: str, day: str) -> int: ...

    def concurrency_limits(self) -> dict[str, int]:
        """Owner (key id) -> most of its jobs on upstreams at once, for keys that have a limit."""
        ...

    def audit_log(self, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        """Audit entries, newest first; `before_id` is the cursor."""
        ...

    # -- foreign ids (the compatible surfaces, routes/compat) -----------------------------------

    def foreign_job(self, owner: str, surface: str, foreign_id: str) -> str | None:
        """The job a client of `surface` named `foreign_id` (a LightX2V `task_id`, a file name)."""
        ...

    def foreign_ids(self, owner: str, surface: str, job_ids: list[str]) -> dict[str, str]:
        """job id -> the name its client gave it on `surface`, for those of `job_ids` that have one."""
        ...

    # -- webhooks -------------------------------------------------------------------------------

    def job_webhook(self, job_id: str) -> JobWebhook | None: ...

    def webhook_events(self, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
        """Job events after the webhook cursor whose job has a webhook, oldest first: {id,
        job_id, at, state, detail, batch_id, owner, webhook}; and the cursor once they are
        recorded (past events of jobs without one too). Costs a few lookups per new event."""
        ...

    def batch_last_event(self, batch_id: str, owner: str | None) -> int | None:
        """The id of the newest job event of `owner`'s batch when all its jobs have finished;
        None while one has not."""
        ...

    def batch_webhooks(self, batch_id: str, owner: str | None) -> list[JobWebhook]:
        """The different webhooks among the batch's jobs that want `batch.finished`."""
        ...

    def due_deliveries(self, now: float, limit: int, skip_urls: Iterable[str] = ()) -> list[tuple[str, str]]:
        """(id, url) of pending deliveries due by `now`, the most overdue first, but those to
        `skip_urls` (receivers that have their share of attempts in flight)."""
        ...

    def next_delivery_at(self) -> float | None:
        """When the next pending delivery is due (None: nothing pending)."""
        ...

    def job_deliveries(self, job_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """A job's deliveries, oldest first, without their payloads."""
        ...

    def pending_deliveries(self, job_id: str) -> int:
        """A job's deliveries neither delivered nor given up."""
        ...

    def webhook_secrets(self, key_id: str) -> list[str]:
        """The secrets that sign a key's deliveries now (two during a rotation); never shown."""
        ...

    def pipeline_webhook(self, pipeline_id: str) -> JobWebhook | None:
        """A pipeline's webhook (its own, or its key's default when it was accepted)."""
        ...

    def pipeline_webhook_events(self, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
        """Pipeline ends (succeeded, failed, cancelled) after the webhook cursor's own place,
        whose pipeline has a webhook, oldest first: {id, pipeline_id, at, state, detail,
        webhook}; and that cursor once they are recorded."""
        ...

    def pipeline_deliveries(self, pipeline_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """A pipeline's deliveries, oldest first, without their payloads."""
        ...
