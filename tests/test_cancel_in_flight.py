"""A cancel that races a submission, on the dispatcher itself: a real SQLite store and the cloud
double over real HTTP, the store left as a gateway killed mid-submit leaves it."""

from __future__ import annotations

import asyncio

import loopback
from cloud_double import CloudDouble
from x2v_gateway.blobs import BlobStore
from x2v_gateway.dispatch import Dispatcher
from x2v_gateway.metrics import Metrics
from x2v_gateway.notify import Notifier
from x2v_gateway.store import JobStore
from x2v_gateway.upstream.base import SubmitRequest
from x2v_gateway.upstream.cloud import CloudUpstream


def test_retry_of_a_job_cancelled_in_flight_resumes_its_cloud_task_instead_of_making_another(tmp_path):
    # No worker: the task stays PENDING, one of the account's 3 active tasks, until stopped.
    with CloudDouble(tmp_path / "cloud", workers=0) as double:

        async def scenario() -> None:
            store = JobStore(tmp_path / "gateway.db")
            cloud = CloudUpstream("cloud", double.url, double.token)
            dispatcher = Dispatcher(store, BlobStore(tmp_path / "blobs"), [cloud], Notifier(),
                                    Metrics())
            try:
                params = {"prompt": "cancelled in flight"}
                job, _ = await store.create_job(task="t2v", params=params, inputs={})
                # The attempt was recorded and the cloud created the task, but its answer never
                # came back (the gateway died waiting); then the user cancelled the job.
                assert await store.claim(job.id, "cloud", None)
                task_id = await cloud.submit(SubmitRequest(job.id, job.id, "t2v", params))
                cancelled = await store.cancel(job.id)
                assert cancelled.state == "cancelled" and cancelled.upstream_task_id is None

                # Retried before any poll found the task: the cancel goes out first, then the
                # same task is resumed. No second task holds another of the account's slots.
                retried = await dispatcher.retry(job.id)
                assert (retried.state, retried.upstream_task_id, retried.run) == ("submitted", task_id, 1)
                assert not retried.cancel_pending
            finally:
                store.close()
                await cloud.aclose()
            return task_id

        task_id = asyncio.run(scenario())
        assert [e["task_id"] for e in double.journal()] == [task_id]
        calls = [r["path"] for r in double.requests() if r["query"].get("task_id") == task_id]
        assert calls.index("/api/v1/task/cancel") < calls.index("/api/v1/task/resume")
        status = loopback.get(f"{double.url}/api/v1/task/query", params={"task_id": task_id},
                              headers={"Authorization": f"Bearer {double.token}"}).json()["status"]
        assert status == "PENDING"  # running again, as the same task


def test_retry_while_the_first_submission_is_in_flight_cancels_the_task_it_made(tmp_path):
    # No worker: every task stays PENDING until stopped. The cloud creates the first task at once
    # but holds its answer, so the job is cancelled and retried before the gateway knows the task.
    with CloudDouble(tmp_path / "cloud", workers=0, submit_delay=20.0) as double:

        def cloud_status(task_id: str) -> str:
            return loopback.get(f"{double.url}/api/v1/task/query", params={"task_id": task_id},
                                headers={"Authorization": f"Bearer {double.token}"}).json()["status"]

        async def until(check, what: str, timeout: float = 20.0):
            deadline = asyncio.get_running_loop().time() + timeout
            while not (found := check()):
                assert asyncio.get_running_loop().time() < deadline, what
                await asyncio.sleep(0.05)
            return found

        async def scenario() -> tuple[str, str]:
            store = JobStore(tmp_path / "gateway.db")
            cloud = CloudUpstream("cloud", double.url, double.token)
            dispatcher = Dispatcher(store, BlobStore(tmp_path / "blobs"), [cloud], Notifier(),
                                    Metrics(), poll_interval=0.1)
            await dispatcher.start()
            try:
                job, _ = await store.create_job(task="t2v", params={"prompt": "retried in flight"}, inputs={})
                dispatcher.wake()
                (first,) = await until(double.journal, "the cloud created the first task")
                assert (await dispatcher.cancel(job.id)).state == "cancelled"
                retried = await dispatcher.retry(job.id)
                assert retried.run == 1 and retried.upstream_task_id is None
                double.configure(submit_delay=0.0)  # the first answer, with its task id, arrives

                # The first run's task is a stray: cancelled, and the new run has a task of its own.
                await until(lambda: cloud_status(first["task_id"]) == "CANCEL", "the first task cancelled")
                second = await until(
                    lambda: [e for e in double.journal() if e["task_id"] != first["task_id"]],
                    "the new run's task",
                )
                assert len(second) == 1
                deadline = asyncio.get_running_loop().time() + 20
                while not (job := await store.get(job.id)).upstream_task_id:
                    assert asyncio.get_running_loop().time() < deadline, "the new run's answer"
                    await asyncio.sleep(0.05)
                assert job.run == 1 and job.upstream_task_id == second[0]["task_id"]
                # The follow loop forgets the stray once the cloud has taken its cancel: a moment
                # after the cloud shows it CANCEL, never before.
                while await store.stray_tasks("cloud"):
                    assert asyncio.get_running_loop().time() < deadline, "the stray forgotten"
                    await asyncio.sleep(0.05)
            finally:
                await dispatcher.stop()
                store.close()
            return first["task_id"], second[0]["task_id"]

        first, second = asyncio.run(scenario())
        assert cloud_status(second) == "PENDING"  # the new run's task is left alone
