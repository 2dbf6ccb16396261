"""The one write path for jobs and batches: submit, cancel, purge, retry, run again, and a batch's
cancel and retry. Routes parse, call one method here and shape the answer.

Accepting a job: body read (request_bodies.py) → validated struct → input files kept → queued row → dispatcher woken.
Every change here is the caller's (`Caller`): it touches that key's jobs only (an admin key:
every job), and each job it makes or runs again counts against that key's daily quota. What an
upstream must do about a change (a stop request, a resume) is `Dispatcher.cancel`/`retry`'s.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from .auth import Auth, Caller, LimitError
from .batch_plan import BatchPlan, find_uploads, listed_names, new_batch_id, plan_batch, retry_params
from .blobs import BlobStore
from .dispatch import Dispatcher, Notifier
from .forward import UploadForward
from .inputs import IncomingFile, discard, fetch_input, keep_files
from .schemas import (
    INPUT_ROLES, PROMPT_REQUIRED, TASK_INPUTS, ApiError, JobRequest, generation_params,
)
from .reads import batch_summary, every_item, find_item, find_job
from .request_bodies import BodyReader, refuse_doubled_inputs
from .settings import Settings
from .store import BatchJobSpec, IdempotencyConflict, Job, JobStore, JobWebhook
from .upstream.base import Rejected, Unavailable
from .webhooks import JobWebhooks


class JobService:
    """Every change to a job or a batch, made for a caller."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        blobs: BlobStore,
        dispatcher: Dispatcher,
        notifier: Notifier,
        http: httpx.AsyncClient,
        auth: Auth,
        bodies: BodyReader,
        webhooks: JobWebhooks | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.dispatcher = dispatcher
        self.notifier = notifier
        self.http = http
        self.auth = auth
        self.bodies = bodies
        self.webhooks = webhooks or JobWebhooks(store, private_ok=settings.private_urls)

    def runnable_tasks(self) -> set[str]:
        """The task types some upstream runs."""
        # A copy: batch planning asks from a worker thread while the loop may add a node.
        return {task for state in list(self.dispatcher.states.values()) for task in state.upstream.tasks}

    # -- submitting a job -----------------------------------------------------------------------

    async def submit(
        self, who: Caller, content_type: str, body: AsyncIterator[bytes], *, size: int | None,
        idempotency_key: str | None, wait: float | None = None,
    ) -> tuple[Job, bool]:
        """A job as JSON, a multipart upload or a URL-encoded form of `size` bytes (when the client
        said), counted against `who`'s quota; (job, created): a replay makes none. With `wait`,
        the job as it is once it finished or that many seconds passed."""
        self.bodies.refuse_job_headers(content_type, size)
        async with self.auth.counting_jobs(who) as count:
            async with self.bodies.job(content_type, body, size=size, owner=who.owner) as read:
                job, created = await self._submit(read.request, read.files, idempotency_key, who.owner, read.forward)
            if not created:
                count.refund()  # a replay: no new job
        if wait:
            job = await self.wait(job, wait)
        return job, created

    async def submit_read(
        self, who: Caller, request: JobRequest, files: list[IncomingFile] | None = None, *,
        wait: float | None = None,
    ) -> Job:
        """A job a compatible surface (routes/lightx2v_api.py, openai_api.py, seed_services.py)
        has read already (`BodyReader.form`), with its uploaded `files` (roles image, audio,
        last_frame): checked, kept and queued as `who`'s, counted against its quota, exactly like
        `submit`'s."""
        files = files or []
        try:
            self.bodies.check_free_space()
            refuse_doubled_inputs(request, files)
            async with self.auth.counting_jobs(who):
                job, _ = await self._submit(request, files, None, who.owner)
        except BaseException:
            discard(files)  # nothing once they are kept: the writers are committed
            raise
        return await self.wait(job, wait) if wait else job

    async def _submit(
        self, request: JobRequest, files: list[IncomingFile], idempotency_key: str | None,
        owner: str | None, forward: UploadForward | None = None,
    ) -> tuple[Job, bool]:
        """A decoded job with its uploaded `files`: checked, its other inputs (URLs, base64)
        fetched, all kept, and queued; when anything is wrong, nothing of it is kept."""
        uploaded = {f.role for f in files}
        max_bytes = self.settings.max_file_mb * 1024 * 1024
        try:
            self.check_job(request, given=uploaded)
            await self.check_cloud_model(request)
            webhook = await self.webhooks.for_job(request.webhook_url, request.webhook_events, owner)
            for role in INPUT_ROLES:
                value = getattr(request, role)
                if value and role not in uploaded:
                    files.append(await fetch_input(role, value, self.blobs, self.http, max_bytes=max_bytes))
        except BaseException:
            discard(files)
            raise
        return await self._accept(request, files, idempotency_key, owner, forward, webhook)

    def check_job(self, request: JobRequest, given: set[str] = frozenset()) -> None:
        """A 422 naming the field for a job that cannot run: inputs its task lacks or does not
        take (`given`: those uploaded as files), an unknown upstream, a task no upstream runs,
        a missing prompt, a `model` where it cannot choose."""
        present = given | {role for role in INPUT_ROLES if getattr(request, role)}
        needed = TASK_INPUTS[request.task]
        for role in needed:
            if role not in present:
                raise ApiError(422, f"{role} is required for {request.task} jobs", role)
        for role in present - set(needed):
            raise ApiError(422, f"{role} is not used by {request.task} jobs", role)
        if request.i2i_denoise_strength is not None and request.task != "i2i":
            raise ApiError(422, f"i2i_denoise_strength is for i2i jobs, not {request.task}", "i2i_denoise_strength")
        if request.upstream is not None and request.upstream not in self.dispatcher.states:
            raise ApiError(422, f"no upstream named {request.upstream!r}; known: "
                           + ", ".join(self.dispatcher.states), "upstream")
        if not any(request.task in s.upstream.tasks for s in self.dispatcher.states.values()):
            raise ApiError(422, f"no configured upstream runs {request.task} jobs", "task")
        if why := self.prompt_missing(request.task, request.prompt, request.upstream):
            raise ApiError(422, f"prompt is required: {why}", "prompt")
        clouds, others = self.candidates(request.task, request.upstream)
        if request.model is not None and others:
            raise ApiError(
                422, "model chooses a hosted-cloud model, and this job may go to "
                + ", ".join(others) + "; pin it to a cloud upstream with `upstream`", "model",
            )

    def prompt_missing(self, task: str, prompt: Any, pinned: str | None = None) -> str | None:
        """Why this job needs the prompt it lacks (None: it has one, or may go without). The one
        rule for the API, batches and retries; a blank prompt is no prompt."""
        if str(prompt or "").strip():
            return None
        if task in PROMPT_REQUIRED:
            return f"a {task} job renders its prompt"
        clouds, others = self.candidates(task, pinned)
        if clouds and not others:
            return f"the hosted cloud refuses {task} jobs without one"
        return None

    def candidates(self, task: str, pinned: str | None) -> tuple[list[Any], list[str]]:
        """The cloud upstreams a job may go to, and the names of the other ones."""
        clouds, others = [], []
        # A copy: batch planning asks from a worker thread while the loop may add a node.
        for state in list(self.dispatcher.states.values()):
            upstream = state.upstream
            if task in upstream.tasks and pinned in (None, upstream.name):
                if upstream.capabilities.chooses_models:
                    clouds.append(upstream)
                else:
                    others.append(upstream.name)
        return clouds, others

    async def check_cloud_model(self, request: JobRequest) -> None:
        """Refuse a model the cloud does not offer (named, or the default) before anything is uploaded."""
        clouds, _ = self.candidates(request.task, request.upstream)
        params = {"model_cls": request.model} if request.model else None
        for cloud in clouds:
            try:
                await cloud.check_model(cloud.model_for(request.task, params))
            except Rejected as exc:
                raise ApiError(422, str(exc), "model") from None
            except Unavailable:
                pass  # cannot tell now (cloud down, token refused): the job waits for it

    async def _accept(
        self, request: JobRequest, files: list[IncomingFile], idempotency_key: str | None,
        owner: str | None, forward: UploadForward | None = None, webhook: JobWebhook | None = None,
    ) -> tuple[Job, bool]:
        stored = await keep_files(files, self.store, owner)
        params = generation_params(request)
        if request.model is not None:
            params["model_cls"] = request.model
        inputs = {role: s.sha256 for role, s in stored.items()}
        fingerprint = hashlib.sha256(json.dumps(
            [request.task, params, inputs, request.priority, request.batch_id, request.upstream]
            # Only with one, so that requests without a webhook keep the fingerprint they had.
            + ([request.webhook_url, request.webhook_events] if request.webhook_url else []),
            sort_keys=True,
        ).encode()).hexdigest()
        # The seed is fixed now, so that a resubmission after a node restart renders the same video.
        params.setdefault("seed", secrets.randbelow(2**32))
        try:
            job, created = await self.store.create_job(
                task=request.task, params=params, inputs=inputs, priority=request.priority,
                batch_id=request.batch_id, owner=owner,
                # Each key has its own Idempotency-Keys: another key's "row-7" is not this one's.
                idempotency_key=f"{owner}:{idempotency_key}" if owner and idempotency_key else idempotency_key,
                request_hash=fingerprint, pinned=request.upstream, webhook=webhook,
            )
        except IdempotencyConflict:
            raise ApiError(
                409, "this Idempotency-Key was already used for a different request",
                "Idempotency-Key",
            ) from None
        if created:
            self.notifier.changed(job.id)
            if forward is None or not forward.hand_over(job):
                self.dispatcher.wake()
        return job, created

    async def wait(self, job: Job, seconds: float) -> Job:
        """Block until the job finishes or `seconds` pass (the old S2V service's wait_for_completion)."""
        deadline = time.monotonic() + min(seconds, self.settings.max_wait)
        while not job.finished:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.notifier.wait(job.id, remaining)
            job = await self.store.get(job.id) or job
        return job

    # -- pipeline steps (pipelines/) ------------------------------------------------------------

    async def keep_inputs(self, values: dict[str, str], owner: str | None) -> dict[str, str]:
        """Inputs given as http(s) URLs, data URLs or base64 (role -> value): fetched, checked
        by their content as `owner`'s and kept. Role -> sha256; all or nothing."""
        files: list[IncomingFile] = []
        max_bytes = self.settings.max_file_mb * 1024 * 1024
        try:
            for role, value in values.items():
                files.append(await fetch_input(role, value, self.blobs, self.http, max_bytes=max_bytes))
        except BaseException:
            discard(files)
            raise
        return {role: s.sha256 for role, s in (await keep_files(files, self.store, owner)).items()}

    async def submit_step(
        self, pipeline_id: str, n: int, *, task: str, params: dict[str, Any], inputs: dict[str, str],
        priority: int, owner: str | None,
    ) -> Job | None:
        """Queue a pipeline step's job, an ordinary job in the pipeline's batch (the step's
        own if it has one already). None when the pipeline has ended. Counted against the
        owner's quota when the pipeline was accepted."""
        made = await self.store.create_step_job(
            pipeline_id, n, task=task, params=params, inputs=inputs, priority=priority, owner=owner,
        )
        if made is None:
            return None
        job, created = made
        if created:
            self.notifier.changed(job.id)
            self.dispatcher.wake()
        return job

    # -- changing a job -------------------------------------------------------------------------

    async def cancel(self, job_id: str, who: Caller, *, purge: bool = False) -> Job:
        """Cancel a job, final at once (one that had finished stays as it was); with `purge`,
        delete its files now too."""
        await find_job(self.store, job_id, who)
        job = await self.dispatcher.cancel(job_id)
        if purge:
            await self.purge([job_id], who, job_id)
            job = await self.store.get(job_id)
        assert job is not None  # jobs are never deleted
        return job

    async def purge(self, job_ids: list[str], who: Caller, target: str) -> int:
        """Delete these jobs' inputs and videos now (a file another kept job uses stays); the jobs
        stay, marked `files_expired`. Unfinished ones are cancelled first. Audited as `target`;
        returns how many files were removed."""
        for job_id in job_ids:
            job = await self.store.get(job_id)
            if job is not None and not job.finished:
                await self.dispatcher.cancel(job_id)
        doomed = await self.store.purge_files(job_ids, who.label, target)
        await self.blobs.delete(doomed)
        for job_id in job_ids:
            self.notifier.changed(job_id)
        self.auth.note(who.label, "purge", target, f"jobs={len(job_ids)} files={len(doomed)}")
        return len(doomed)

    async def retry(self, job_id: str, who: Caller) -> Job:
        """A failed or cancelled job back to the queue, as it was (the API's retry)."""
        job = await find_job(self.store, job_id, who)
        if job.state not in ("failed", "cancelled"):
            raise ApiError(409, f"only failed or cancelled jobs can be retried; this one is {job.state}", "state")
        if job.files_expired:
            raise ApiError(410, "this job's input files have expired; submit it again", "files_expired")
        return await self._requeue(job, who)

    async def run_again(self, job_id: str, who: Caller, prompt: str | None, seed: str) -> tuple[Job, bool]:
        """Run a finished job again (the dashboard's retry form): as it was, or with an edited
        prompt (None: its own) or seed as a new job in its batch. Returns (job, is_new)."""
        item = await find_item(self.store, job_id, who)
        job = item.job
        if not job.finished:
            raise ApiError(409, f"This job is {job.state}: cancel it first, or wait for it to end")
        prompt = job.params.get("prompt", "") if prompt is None else prompt
        params = retry_params(job.params, prompt, seed)
        unchanged = params.get("prompt", "") == job.params.get("prompt", "") and (
            not seed.strip() or params.get("seed") == job.params.get("seed")
        )
        if unchanged and job.state in ("failed", "cancelled"):
            if job.files_expired:
                raise ApiError(410, "This job's input files have expired; submit it again with its files")
            return await self._requeue(job, who), False
        # It costs a GPU as much as a new job, so it counts against the caller's quota.
        async with self.auth.counting_jobs(who):
            return await self._run_anew(job, params, item.files), True

    async def _requeue(self, job: Job, who: Caller) -> Job:
        """The job's own row back to the queue (or resumed upstream), counted as a new job."""
        async with self.auth.counting_jobs(who):  # a run again costs a GPU as much as a new job
            again = await self.dispatcher.retry(job.id)
        assert again is not None  # jobs are never deleted
        return again

    # -- batches (the dashboard) ----------------------------------------------------------------

    async def plan_batch(self, form: dict[str, str], files: list[str]) -> BatchPlan:
        """The jobs a filled-in batch form would create, each with what stops it from running.

        The listed files are looked up on a reader thread, and the rows (up to 2,000, each checked)
        are planned on a worker thread: the event loop, serving every other request, waits for neither.
        """
        uploads = await find_uploads(self.store, self.blobs, files)
        return await asyncio.to_thread(
            plan_batch, form, uploads, runnable=self.runnable_tasks(), prompt_missing=self.prompt_missing,
        )

    async def create_batch(self, who: Caller, form: dict[str, str], files: list[str]) -> tuple[BatchPlan, str | None]:
        """Plan the form again (never trust a preview) and, when every row can run, queue its jobs
        as `who`'s. Returns the plan and the batch's id (None: nothing was queued)."""
        plan = await self.plan_batch(form, files)
        if not plan.ok:
            return plan, None
        # The form's webhook: each job of the batch gets it (and its key's default without one).
        webhook = await self.webhooks.for_job(
            form.get("webhook_url", "").strip() or None,
            [e for e in form.get("webhook_events", "").split(",") if e.strip()] or None,
            who.owner,
        )
        batch_id = form.get("batch_id", "")
        if not re.fullmatch(r"b[a-z0-9]{8,40}", batch_id):
            batch_id = new_batch_id()
        specs = plan.specs()
        kept_form: dict[str, Any] = {k: v for k, v in form.items() if k not in ("batch_id",)}
        kept_form["files"] = listed_names(files)
        name = form.get("name", "").strip()[:200] or None
        existing = await self.store.batch(batch_id)
        if existing is not None:
            if not who.may_touch(existing["owner"]):
                batch_id = new_batch_id()  # a guessed id of someone else's batch: a new one
            else:
                return plan, batch_id  # a second click on Create: show the batch the first one made
        # The jobs are `who`'s and count against its daily quota, like jobs posted to the API.
        async with self.auth.counting_jobs(who, len(specs)) as count:
            made = await self.submit_batch(
                batch_id, specs, owner=who.owner,
                batch={"name": name, "task": plan.task, "mode": plan.mode, "form": kept_form},
                webhook=webhook,
            )
            if made is None:
                count.refund()  # made by a click a moment earlier
        return plan, batch_id

    async def submit_batch(
        self, batch_id: str, specs: list[BatchJobSpec], *, batch: dict[str, Any] | None = None,
        owner: str | None = None, webhook: JobWebhook | None = None,
    ) -> list[Job] | None:
        """Queue a batch of jobs whose inputs are already in the blob store: all of them or none.

        Returns None when a batch with this id was created already (the form sent twice).
        """
        for spec in specs:
            for role, sha in spec.inputs.items():
                if not await self.blobs.exists(sha):
                    name = spec.files.get(role, role)
                    raise ApiError(422, f"{name} is no longer stored on the gateway; add it again", role)
            if why := self.prompt_missing(spec.task, spec.params.get("prompt")):
                raise ApiError(
                    422, f"{', '.join(spec.files.values()) or spec.task}: a prompt is required, {why}", "prompt",
                )
            # Fixed now, as for single jobs: a resubmission after a node restart renders the same video.
            spec.params.setdefault("seed", secrets.randbelow(2**32))
        jobs = await self.store.create_batch(batch_id, specs, batch=batch, owner=owner, webhook=webhook)
        if jobs:
            for job in jobs:
                self.notifier.changed(job.id)
            self.dispatcher.wake()
        return jobs

    async def cancel_batch(self, batch_id: str, who: Caller, *, purge: bool = False) -> BatchCancel:
        """Cancel the batch's unfinished jobs `who` may touch; with `purge`, delete their files now too."""
        await batch_summary(self.store, batch_id, who)  # NotFound for a batch this key cannot see
        items = [item async for item in every_item(self.store, batch_id, who.sees)]
        cancelled = 0
        # Newest first: the batch's queued jobs go before its running ones, so that a slot a
        # cancel frees is not given to a job of this batch a moment before it is cancelled too.
        for item in reversed(items):
            if not item.job.finished:
                job = await self.dispatcher.cancel(item.job.id)
                cancelled += job is not None and job.state == "cancelled"
        removed = await self.purge([item.job.id for item in items], who, f"batch {batch_id}") if purge else 0
        return BatchCancel(len(items), cancelled, removed)

    async def retry_failed(self, batch_id: str, who: Caller) -> tuple[int, int, str | None]:
        """Failed jobs back to the queue: (retried, skipped as their files expired, why the rest were not)."""
        await batch_summary(self.store, batch_id, who)  # NotFound for a batch this key cannot see
        retried = expired = 0
        for item in [item async for item in every_item(self.store, batch_id, who.sees)]:
            # A failed job already run again with an edited prompt or seed is left alone: its new
            # run stands for it.
            if item.job.state != "failed" or item.retried_as:
                continue
            if item.job.files_expired:
                expired += 1
                continue
            try:
                await self._requeue(item.job, who)
            except LimitError as exc:
                return retried, expired, exc.message  # the caller's quota ran out
            retried += 1
        return retried, expired, None

    async def _run_anew(self, job: Job, params: dict[str, Any], files: dict[str, str]) -> Job:
        """A new job with the inputs of `job` and edited parameters, in the same batch."""
        if job.files_expired or not all([await self.blobs.exists(sha) for sha in job.inputs.values()]):
            raise ApiError(410, "this job's input files have expired; submit it again with its files")
        if why := self.prompt_missing(job.task, params.get("prompt"), job.pinned):
            raise ApiError(422, f"prompt is required: {why}", "prompt")
        params.setdefault("seed", secrets.randbelow(2**32))
        webhook = await self.store.read(lambda r: r.job_webhook(job.id))  # the new job's too
        if job.batch_id is None:
            new, _ = await self.store.create_job(
                task=job.task, params=params, inputs=dict(job.inputs), priority=job.priority,
                owner=job.owner, pinned=job.pinned, webhook=webhook,
            )
        else:
            spec = BatchJobSpec(
                task=job.task, params=params, inputs=dict(job.inputs), files=files,
                priority=job.priority, retry_of=job.id, pinned=job.pinned,
            )
            (new,) = await self.store.create_batch(job.batch_id, [spec], owner=job.owner, webhook=webhook) or []
        self.notifier.changed(new.id)
        self.dispatcher.wake()
        return new


@dataclass(frozen=True)
class BatchCancel:
    jobs: int  # the batch's jobs the caller may touch
    cancelled: int  # of them, those the cancel ended
    files_removed: int  # with purge
