"""The store in PostgreSQL: `PostgresStore`, for several gateway replicas sharing one truth.

Chosen by `X2V_DATABASE_URL=postgresql://…`. Made as the SQLite store is, one module per idea:
`connections` (pools and threads), `schema` (migrations), `jobs`, `queue`, `batches`, `nodes`,
`keys`, `pipelines`, `foreign`, `webhooks`, `replicas`. Its records and semantics are the SQLite store's: the same tests run against both.
"""

from __future__ import annotations

from .batches import BatchReads, BatchWrites
from .foreign import ForeignReads, ForeignWrites
from .jobs import JobReads, JobWrites
from .keys import KeyReads, KeyWrites
from .nodes import NodeReads, NodeWrites
from .pipeline_webhooks import PipelineWebhookReads
from .pipelines import PipelineReads, PipelineWrites
from .queue import QueueReads
from .replicas import ReplicaReads, ReplicaWrites
from .webhooks import WebhookReads, WebhookWrites

__all__ = ["PostgresReads", "PostgresStore"]


class PostgresReads(JobReads, QueueReads, BatchReads, NodeReads, KeyReads, PipelineReads, ForeignReads,
                    WebhookReads, PipelineWebhookReads, ReplicaReads):
    """The store's reads on one PostgreSQL connection (in one REPEATABLE READ transaction)."""


class PostgresStore(JobWrites, BatchWrites, NodeWrites, KeyWrites, PipelineWrites, ForeignWrites,
                    WebhookWrites, ReplicaWrites):
    """Jobs, nodes and keys in PostgreSQL, shared by every replica, never touched on the event loop."""

    _reads = PostgresReads
