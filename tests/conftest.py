from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gateway_proc import GatewayProcess, remember_secret
from media import make_png, make_wav
from s3_server import SeaweedS3
from pg_cluster import PostgresCluster


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--store", choices=("sqlite", "postgresql"), default="sqlite",
        help="where every test gateway keeps its store: its SQLite file (default), or a PostgreSQL"
             " database of the test process's own cluster (the suite run on PostgreSQL)",
    )


def pytest_configure(config) -> None:
    # The run's directory, where every process lists the secrets and files tests/test_secrets.py
    # checks (gateway_proc.py). ./dev test makes it, for its two pytest runs; for a plain `pytest`
    # it is made here, before pytest-xdist starts its workers, which inherit the environment.
    if "X2V_TEST_RUN_DIR" not in os.environ:
        os.environ["X2V_TEST_RUN_DIR"] = config.x2v_made_run_dir = tempfile.mkdtemp(prefix="x2v-test-run-")


def pytest_unconfigure(config) -> None:
    if made := getattr(config, "x2v_made_run_dir", None):
        shutil.rmtree(made, ignore_errors=True)
        del os.environ["X2V_TEST_RUN_DIR"]


# Seconds each file's tests took, one after the other, in a parallel run on 2 cores (from its
# first test's start to its last one's end on its worker, every file measured in one run).
# `./dev test` gives each file whole to one worker, in the order of the collection
# (`--no-loadscope-reorder`): the longest files go first, so that no worker starts a long file
# when the others are nearly done. A file not named here goes last: name a new one.
FILE_SECONDS = {
    "test_replicas.py": 167, "test_replicas_postgres.py": 145, "test_resilience.py": 144,
    "test_forward.py": 98, "test_failover.py": 78, "test_webhooks.py": 44, "test_pool.py": 40,
    "test_cloud_gateway.py": 35, "test_blob_backends.py": 26, "test_client.py": 23,
    "test_auth.py": 22, "test_dashboard.py": 22, "test_api.py": 22, "test_pipelines.py": 20,
    "test_demo_node.py": 15, "test_postgres_gateway.py": 13, "test_events.py": 13,
    "test_compat_lightx2v.py": 11, "test_tasks.py": 10, "test_pipeline_replicas.py": 10,
    "test_follow.py": 10, "test_dashboard_tasks.py": 9, "test_pipeline_dashboard.py": 8,
    "test_first_run.py": 8, "test_gallery.py": 8, "test_store_plans.py": 8, "test_leaks.py": 7,
    "test_cloud_double.py": 7, "test_cloud_adapter.py": 6, "test_auth_cache.py": 6,
    "test_batches_api.py": 5, "test_store_plans_postgres.py": 5, "test_replica_store.py": 5,
    "test_queue_position.py": 5, "test_compat_openai.py": 4, "test_pipeline_webhooks.py": 4,
    "test_schema_page.py": 4, "test_compat_seeds.py": 3, "test_blobs.py": 3, "test_posters.py": 3,
    "test_store.py": 3, "test_checker.py": 2, "test_schedule.py": 2, "test_plain_http.py": 2,
    "test_batch_limits.py": 1, "test_cancel_in_flight.py": 1, "test_migrate_store.py": 1,
    "test_store_postgres.py": 1, "test_deploy_files.py": 1, "test_deploy_replicas.py": 1,
    "test_bad_input.py": 1, "test_http_protocol.py": 1, "test_image_limits.py": 1,
    "test_settings.py": 1, "test_handoff.py": 1,
}


def pytest_collection_modifyitems(config, items) -> None:
    # tests/test_secrets.py reads the logs and bodies every other test left behind: it runs last.
    items.sort(key=lambda item: (item.path.name == "test_secrets.py", -FILE_SECONDS.get(item.path.name, 0)))
    if hasattr(config, "workerinput"):
        # In a pytest-xdist worker, other workers are still running tests: it would check only
        # part of what they write. ./dev test runs it on its own after the parallel run.
        after_all = pytest.mark.skip(reason="checks what every other test wrote: run it alone, after them (./dev test does)")
        for item in items:
            if item.path.name == "test_secrets.py":
                item.add_marker(after_all)


@pytest.fixture
def cleanup():
    """Everything started in a test is stopped at its end, whatever happened."""
    things: list = []
    yield things.append
    for thing in reversed(things):
        thing.stop()


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL server for this test process (each pytest-xdist worker starts its own),
    started the first time a test asks for it."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session", autouse=True)
def gateways_on_postgresql(request):
    """With --store=postgresql, every gateway process gets a PostgreSQL database (gateway_proc.py)."""
    if request.config.getoption("--store") != "postgresql":
        yield
        return
    import gateway_proc

    cluster = request.getfixturevalue("pg_cluster")
    databases: dict[Path, str] = {}
    gateway_proc.database_for = lambda data_dir: databases.setdefault(data_dir.resolve(), cluster.new_database())
    yield
    gateway_proc.database_for = None


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request, tmp_path):
    """Where a store lives, once for each backend: a SQLite file, or a fresh PostgreSQL
    database with the gateway's schema (`JobStore(location)` opens either)."""
    if request.param == "sqlite":
        return tmp_path / "gateway.db"
    return request.getfixturevalue("pg_cluster").new_database()


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Real input files: a portrait, a second portrait, a voice-over, and things that are not."""
    root = tmp_path_factory.mktemp("media")
    not_image = root / "notes.png"
    not_image.write_text("this is a text file with a .png name\n" * 20)
    return {
        "face": make_png(root / "face.png"),
        "face2": make_png(root / "face2.png", color=(60, 90, 200)),
        "voice": make_wav(root / "voice.wav", seconds=1.5),
        "not_image": not_image,
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> SeaweedS3:
    """A real S3 server (SeaweedFS) on loopback, started once per test process."""
    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    remember_secret(server.secret_access_key)
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def demo_gateway(tmp_path_factory) -> GatewayProcess:
    """A gateway with its embedded defaults (the built-in demo node), as the quick start runs it.

    Demo jobs take at least 0.8 s, and the node is asked every 0.2 s (not the tests' 0.5 s), so
    a test can catch one running or queued.
    """
    root = tmp_path_factory.mktemp("gw")
    # Private URLs allowed: the URL-input tests serve their files from 127.0.0.1.
    gateway = GatewayProcess(
        root / "data", X2V_DEMO_JOB_SECONDS="0.8", X2V_POLL_INTERVAL="0.2", X2V_PRIVATE_URLS="true",
    ).start()
    yield gateway
    gateway.stop()
