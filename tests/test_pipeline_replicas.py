"""A pipeline accepted by one gateway replica is finished by another when the first is SIGKILLed."""

from __future__ import annotations

import pytest

from gateway_proc import GatewayProcess, until
from replica_cluster import Cluster
from test_pipelines import download, frames_of, wait_pipeline
from x2v_gateway.media import probe_video


def test_a_replicas_pipeline_is_finished_by_another_after_a_sigkill(tmp_path):
    cluster = Cluster(tmp_path, replicas=2, nodes=2, job_seconds=1.0).start()
    try:
        first, second = cluster.replicas
        with first.client() as api:
            doc = {"scenes": [{"task": "t2v", "prompt": f"scene {i}", "duration": 1} for i in range(4)]}
            pipeline_id = api.post("/api/v1/pipelines", json=doc).json()["id"]
            until(lambda: api.get(f"/api/v1/pipelines/{pipeline_id}").json()["progress"]["succeeded"] >= 1,
                  timeout=60, what="a step done")
        first.kill()
        with second.client() as api:
            # The second replica never heard of it: its jobs are taken over with the first's
            # lease, and the pipeline is found by the sweep of open pipelines and joined.
            done = wait_pipeline(api, pipeline_id, {"succeeded", "failed"})
            assert done["state"] == "succeeded", done
            ids = [s["job_id"] for s in done["steps"]]
            video = download(api, done["result"]["url"], tmp_path / "joined.mp4")
        cluster.check_exactly_once(ids)
        assert probe_video(video).duration == pytest.approx(4.0, abs=0.07)
        assert frames_of(video) == 64
    finally:
        cluster.stop()


def test_a_join_left_by_a_replica_that_died_holding_it_is_done_once_its_lease_ends(tmp_path):
    # Every step done and the join claimed by a replica that then died (a gateway SIGKILLed
    # mid-join): the gateway started next finds the claim still held, and must look again once
    # the dead replica's lease is over (nothing else moves a pipeline whose jobs are all done).
    import asyncio
    import time

    import gateway_proc
    from x2v_gateway.blobs import BlobStore
    from x2v_gateway.demo.video import render_video
    from x2v_gateway.store import JobStore, Pipeline, PipelineStep, new_pipeline_id

    if gateway_proc.database_for is not None:
        pytest.skip("the store is seeded as a SQLite file")
    data = tmp_path / "data"
    data.mkdir()
    clip = tmp_path / "clip.mp4"
    render_video(clip, image=None, audio=None, prompt="the only scene", seed=1, seconds=1.0)

    async def seed() -> str:
        store = JobStore(data / "gateway.db")
        try:
            pipeline = Pipeline(id=new_pipeline_id(), output={"fps": 16}, steps=[PipelineStep(
                n=0, scene=0, kind="clip", task="t2v", params={"prompt": "x"}, inputs={}, needs={}, seconds=1.0,
            )])
            await store.create_pipeline(pipeline)
            job, _ = await store.create_step_job(pipeline.id, 0, task="t2v", params={"prompt": "x"}, inputs={})
            sha, size = await BlobStore(data / "blobs").adopt(clip)
            await store.record_blob(sha, size, "mp4")
            assert await store.succeed(job.id, sha, {"duration": 1.0})
            await store.join("died-mid-join", lease=3.0)
            assert await store.claim_join(pipeline.id, "died-mid-join", time.time() + 600)
            return pipeline.id
        finally:
            store.close()

    pipeline_id = asyncio.run(seed())
    gateway = GatewayProcess(data, nodes="").start()
    try:
        with gateway.client() as api:
            done = wait_pipeline(api, pipeline_id, {"succeeded", "failed"}, timeout=30)
        assert done["state"] == "succeeded", done
        assert done["result"]["duration"] == pytest.approx(1.0, abs=0.07)
    finally:
        gateway.stop()


def test_a_pipelines_join_is_claimed_by_one_replica_until_its_lease_ends(store_location):
    import asyncio
    import time

    from x2v_gateway.store import JobStore, Pipeline, PipelineStep, new_pipeline_id

    async def run() -> None:
        # Two replicas' stores on one database: both see every step done, one joins.
        a, b = JobStore(store_location), JobStore(store_location)
        try:
            pipeline = Pipeline(id=new_pipeline_id(), output={"fps": 16}, steps=[PipelineStep(
                n=0, scene=0, kind="clip", task="t2v", params={"prompt": "x"}, inputs={}, needs={}, seconds=1.0,
            )])
            await a.create_pipeline(pipeline)
            for replica in ("a", "b", "c"):
                await a.join(replica, 60)
            now = time.time()
            claims = await asyncio.gather(a.claim_join(pipeline.id, "a", now + 60), b.claim_join(pipeline.id, "b", now + 60))
            assert sorted(claims) == [False, True]
            holder, other = ("a", b) if claims[0] else ("b", a)
            assert await (a if holder == "a" else b).claim_join(pipeline.id, holder, now + 60)  # its own, again
            assert not await other.claim_join(pipeline.id, "c", now + 60)
            # The holder dies mid-join: once its replica's lease is over, another joins; and so
            # once the join's own lease is over.
            await a.leave(holder, grace=-1)
            assert await other.claim_join(pipeline.id, "c", now + 60)
            assert not await a.claim_join(pipeline.id, "b" if holder == "a" else "a", now + 60)
            assert await a.claim_join(pipeline.id, "c", now - 1)
            assert await a.claim_join(pipeline.id, "b" if holder == "a" else "a", now + 60)
            assert await other.finish_pipeline(pipeline.id, "ab" * 32, {"seconds": 1.0})
            assert not await a.claim_join(pipeline.id, "a", now + 60)  # joined: nothing left to claim
        finally:
            a.close()
            b.close()

    asyncio.run(run())
