"""The job store: every job, its whole life, with the nodes, keys and audit log beside it.

The rest of the gateway uses what is exported here: the records (`records.py`), the store's
interface (`JobStore`, `base.py`) and its reads (`Reads`, `reads.py`). The SQL lives behind
them, in `sqlite/` (the default: one file) and `postgres/` (several replicas, one database).
"""

from .base import JobStore
from .memo import Memo
from .pipeline_records import Pipeline, PipelineStep, new_pipeline_id
from .reads import Reads
from .records import (
    ACTIVE,
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    STATES,
    SUBMITTED,
    SUCCEEDED,
    TERMINAL,
    AdminKeyNeeded,
    BatchItem,
    BatchJobSpec,
    IdempotencyConflict,
    Inflight,
    Job,
    JobWebhook,
    KeyNameTaken,
    Lane,
    QueuedJob,
    new_job_id,
)
from .sqlite import SqliteStore



def is_database_url(location: object) -> bool:
    """A PostgreSQL URL (X2V_DATABASE_URL), as opposed to a SQLite file's path."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def _backend_for(location: object) -> type[JobStore]:
    if is_database_url(location):
        # Imported only when asked for: a SQLite deployment never loads psycopg.
        from .postgres import PostgresStore

        return PostgresStore
    return SqliteStore


JobStore.backend_for = staticmethod(_backend_for)

__all__ = [
    "ACTIVE", "CANCELLED", "FAILED", "QUEUED", "RUNNING", "STATES", "SUBMITTED", "SUCCEEDED",
    "TERMINAL", "AdminKeyNeeded", "BatchItem", "BatchJobSpec", "IdempotencyConflict", "Inflight",
    "Job", "JobStore", "JobWebhook", "KeyNameTaken", "Lane", "Memo", "Pipeline", "PipelineStep", "QueuedJob", "Reads",
    "is_database_url", "new_job_id", "new_pipeline_id",
]
