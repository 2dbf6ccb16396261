"""The job store: every job, its whole life, with the nodes, keys and audit log beside it.

The rest of the gateway uses what is exported here: the records (`records.py`), the store's
interface (`JobStore`, `base.py`) and its reads (`Reads`, `reads.py`). The SQL lives behind
them, in `sqlite/`; a second backend is one more module that implements `JobStore`.
"""

from .base import JobStore
from .memo import Memo
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

JobStore.default_backend = SqliteStore

__all__ = [
    "ACTIVE", "CANCELLED", "FAILED", "QUEUED", "RUNNING", "STATES", "SUBMITTED", "SUCCEEDED",
    "TERMINAL", "AdminKeyNeeded", "BatchItem", "BatchJobSpec", "IdempotencyConflict", "Inflight",
    "Job", "JobStore", "JobWebhook", "KeyNameTaken", "Lane", "Memo", "QueuedJob", "Reads", "new_job_id",
]
