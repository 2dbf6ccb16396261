"""The store in one SQLite file: `SqliteStore`, made of one module per idea.

`connections` (threads and connections), `schema` (migrations), `jobs`, `queue`, `batches`,
`nodes`, `keys`, `pipelines`, `foreign`, `webhooks`, `replicas`: each holds the SQL of its idea, reads and writes.
"""

from __future__ import annotations

from .batches import BatchReads, BatchWrites
from .connections import READER_THREADS
from .foreign import ForeignReads, ForeignWrites
from .jobs import JobReads, JobWrites
from .keys import KeyReads, KeyWrites
from .nodes import NodeReads, NodeWrites
from .pipeline_webhooks import PipelineWebhookReads
from .pipelines import PipelineReads, PipelineWrites
from .queue import QueueReads
from .webhooks import WebhookReads, WebhookWrites
from .replicas import ReplicaReads, ReplicaWrites

__all__ = ["READER_THREADS", "SqliteReads", "SqliteStore"]


class SqliteReads(JobReads, QueueReads, BatchReads, NodeReads, KeyReads, PipelineReads, ForeignReads,
                  WebhookReads, PipelineWebhookReads, ReplicaReads):
    """The store's reads on one SQLite connection: `Reads` (store/reads.py).

    The store runs them on a reader thread; the writer uses them inside its transactions too
    (`SqliteReads(conn)`).
    """


class SqliteStore(JobWrites, BatchWrites, NodeWrites, KeyWrites, PipelineWrites, ForeignWrites,
                  WebhookWrites, ReplicaWrites):
    """Jobs, nodes and keys in one SQLite file (WAL), never read or written on the event loop."""

    _reads = SqliteReads
