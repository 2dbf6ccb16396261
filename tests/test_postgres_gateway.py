"""The gateway as a real process on PostgreSQL (X2V_DATABASE_URL): a job end to end, a SIGKILL
survived, and what replicas share (the store): keys, sessions, daily quotas and rate limits."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter

from gateway_proc import GatewayProcess, remember_secret, wait_for
from servers import NodeProcess
from x2v_gateway.store import JobStore


def test_demo_job_runs_end_to_end_with_the_store_in_postgresql(tmp_path, pg_cluster):
    # With a password in the URL (the test cluster trusts local users, so it is never checked):
    # it must be in no log line and no answer (tests/test_secrets.py reads them all).
    password = remember_secret("pg-" + secrets.token_urlsafe(16))
    url = pg_cluster.new_database().replace("x2v@", f"x2v:{password}@")
    gateway = GatewayProcess(tmp_path / "data", X2V_DATABASE_URL=url, X2V_DEMO_JOB_SECONDS="0.2").start()
    try:
        assert "store      PostgreSQL, postgresql://x2v:***@127.0.0.1" in gateway.log()
        with gateway.client() as client:
            job_id = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "a cat"}).json()["id"]
            job = wait_for(client, job_id, {"succeeded", "failed"})
            assert job["state"] == "succeeded", job
            video = client.get(job["result"]["url"])
            assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    finally:
        gateway.stop()
    assert password not in gateway.log()
    # The job is in PostgreSQL, and no SQLite file was made beside the blobs.
    store = JobStore(url)
    try:
        assert asyncio.run(store.get(job_id)).state == "succeeded"
    finally:
        store.close()
    assert not (tmp_path / "data" / "gateway.db").exists()


def test_jobs_survive_gateway_sigkill_on_postgresql_with_one_submission_each(tmp_path, pg_cluster):
    node = NodeProcess(tmp_path / "node", job_seconds=0.6).start()
    gateway = GatewayProcess(
        tmp_path / "data", nodes=f"n1={node.url}", X2V_DATABASE_URL=pg_cluster.new_database()
    ).start()
    try:
        with gateway.client() as client:
            ids = [client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"crash {i}"}).json()["id"]
                   for i in range(6)]
            wait_for(client, ids[0], {"running"})
            states = {client.get(f"/api/v1/jobs/{i}").json()["state"] for i in ids}
            assert "queued" in states  # some are still waiting in the gateway when it dies
        gateway.kill()
        time.sleep(1.0)  # the node keeps working while the gateway is down
        gateway.start()
        with gateway.client() as client:
            for job_id in ids:
                assert wait_for(client, job_id, {"succeeded", "failed"})["state"] == "succeeded"
        assert Counter(e["task_id"] for e in node.submissions()) == Counter({job_id: 1 for job_id in ids})
    finally:
        gateway.stop()
        node.stop()


def test_the_gateway_works_on_across_a_database_restart(tmp_path, pg_cluster):
    gateway = GatewayProcess(
        tmp_path / "data", X2V_DATABASE_URL=pg_cluster.new_database(), X2V_DEMO_JOB_SECONDS="0.2"
    ).start()
    try:
        with gateway.client() as client:
            before = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "before"}).json()["id"]
            assert wait_for(client, before, {"succeeded", "failed"})["state"] == "succeeded"
            pg_cluster.restart()  # every pooled connection is cut
            after = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "after"})
            assert after.status_code == 201, after.text
            assert wait_for(client, after.json()["id"], {"succeeded", "failed"})["state"] == "succeeded"
            assert client.get(f"/api/v1/jobs/{before}").json()["state"] == "succeeded"
            assert client.get("/readyz").status_code == 200
    finally:
        gateway.stop()


def test_two_replicas_share_keys_sessions_a_daily_quota_and_a_rate_limit(tmp_path, pg_cluster):
    url = pg_cluster.new_database()
    node = NodeProcess(tmp_path / "node", job_seconds=0.2).start()
    a = GatewayProcess(tmp_path / "a", nodes=f"n1={node.url}", X2V_DATABASE_URL=url).start()
    b = GatewayProcess(tmp_path / "b", nodes=f"n1={node.url}", X2V_DATABASE_URL=url).start()
    try:
        with a.client() as admin:
            made = admin.post("/api/v1/keys", json={"name": "thrifty", "daily_quota": 2})
            assert made.status_code == 201, made.text
        key = remember_secret(made.json()["key"])
        with a.client(key=key) as on_a, b.client(key=key) as on_b:
            # A key made on one replica works on the other; its quota counts jobs on both.
            assert on_a.post("/api/v1/jobs", json={"task": "t2v", "prompt": "one"}).status_code == 201
            assert on_b.post("/api/v1/jobs", json={"task": "t2v", "prompt": "two"}).status_code == 201
            over = on_a.post("/api/v1/jobs", json={"task": "t2v", "prompt": "three"})
            assert over.status_code == 429 and over.json()["error"]["field"] == "quota"
            assert on_b.post("/api/v1/jobs", json={"task": "t2v", "prompt": "four"}).status_code == 429
            assert on_b.get("/api/v1/me").json()["jobs_today"] == 2
        # A rate limit holds across replicas too: three requests a minute, wherever they land.
        with a.client() as admin:
            limited = remember_secret(admin.post("/api/v1/keys", json={"name": "chatty", "rate_per_min": 3}).json()["key"])
        with a.client(key=limited) as on_a, b.client(key=limited) as on_b:
            answers = [client.get("/api/v1/jobs?limit=1") for client in (on_a, on_b, on_a, on_b)]
            assert [r.status_code for r in answers] == [200, 200, 200, 429]
            assert answers[3].json()["error"]["field"] == "rate"
        # A dashboard sign-in made on one replica is good on the other.
        cookie = a.sign_in(key)
        with b.client(key=None) as browser:
            browser.cookies.set("x2v_session", cookie)
            page = browser.get("/ui/")
        assert page.status_code == 200 and "thrifty" in page.text
    finally:
        a.stop()
        b.stop()
        node.stop()


def test_a_bad_database_url_is_refused_without_showing_its_password():
    import pytest

    from x2v_gateway.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as refused:
        load_settings({"X2V_DATABASE_URL": "mysql://me:hunter2-secret@db/x2v"}, env_file=None)
    assert "X2V_DATABASE_URL" in str(refused.value) and "hunter2" not in str(refused.value)
    settings = load_settings({"X2V_DATABASE_URL": "postgresql://me:hunter2-secret@db:5432/x2v"}, env_file=None)
    assert settings.store_location == "postgresql://me:hunter2-secret@db:5432/x2v"
    assert "hunter2" not in repr(settings) and "hunter2" not in settings.database_shown
