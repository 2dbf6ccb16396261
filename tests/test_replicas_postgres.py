"""tests/test_replicas.py on PostgreSQL: three gateway replicas on one database (X2V_DATABASE_URL)
share the queue without overfilling a node, see each other's changes within a second, take a
SIGKILLed replica's jobs over within 10 s, and lose nothing and send nothing twice in a chaos
round whose files are kept in a real S3 bucket (SeaweedFS). The same tests, run here with the store below (a file of its own, so that it runs beside
the SQLite ones)."""

from __future__ import annotations

import secrets

import pytest
from s3_server import SeaweedS3
from test_replicas import (  # noqa: F401 (collected here again, with this module's database_url)
    test_chaos_replicas_sigkilled_at_random_lose_nothing_and_send_nothing_twice,
    test_replicas_share_the_queue_without_overfilling_a_node_and_see_each_others_changes,
    test_sigkilled_replicas_jobs_are_taken_over_within_10_s_and_sent_once,
)


@pytest.fixture
def database_url(pg_cluster) -> str:
    return pg_cluster.new_database()


@pytest.fixture
def bucket(s3_server) -> tuple[SeaweedS3, str]:
    """PostgreSQL and S3: the chaos round runs as the deployment of docs/deploy.md does."""
    return s3_server, f"chaos-{secrets.token_hex(4)}"
