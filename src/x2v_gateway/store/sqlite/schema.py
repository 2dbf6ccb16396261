"""The SQLite schema: migrations, applied in order when the store opens (append only)."""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("x2v_gateway")


@migrations()
def m001_jobs(db: Database) -> None:
    db["jobs"].create(
        {
            "seq": int, "id": str, "task": str, "state": str, "params": str, "inputs": str,
            "upstream": str, "upstream_task_id": str, "run": int, "attempts": int,
            "priority": int, "batch_id": str, "owner": str,
            "created_at": float, "updated_at": float, "submitted_at": float,
            "started_at": float, "finished_at": float, "error": str,
            "result_sha": str, "result_meta": str, "queue_info": str,
            "idempotency_key": str, "request_hash": str, "pinned": str,
            "cancel_pending": int, "files_expired": int,
        },
        pk="seq",
        not_null={"id", "task", "state", "params", "inputs", "created_at", "updated_at"},
        defaults={"run": 0, "attempts": 0, "priority": 0, "cancel_pending": 0, "files_expired": 0},
    )
    db["jobs"].create_index(["id"], unique=True)
    db["jobs"].create_index(["idempotency_key"], unique=True)
    # The dispatcher's hot query: the next queued jobs, by priority then age.
    db.execute("CREATE INDEX idx_jobs_queue ON jobs (state, priority DESC, seq)")
    db["jobs"].create_index(["upstream", "state"])
    db["jobs"].create_index(["batch_id", "seq"])
    db["jobs"].create_index(["finished_at"])
    db["blobs"].create(
        {"sha256": str, "size": int, "kind": str, "created_at": float}, pk="sha256"
    )
    db["job_events"].create(
        {"id": int, "job_id": str, "at": float, "state": str, "detail": str}, pk="id"
    )
    db["job_events"].create_index(["job_id", "id"])


@migrations()
def m002_dashboard_batches(db: Database) -> None:
    # A batch made in the dashboard: its name and the form it came from, and for each of its
    # jobs the file names the user dropped (the jobs themselves only know blob hashes).
    db["batches"].create(
        {"id": str, "name": str, "task": str, "mode": str, "owner": str, "created_at": float,
         "form": str},
        pk="id", not_null={"created_at"},
    )
    db["batches"].create_index(["created_at"])
    db["batch_jobs"].create(
        {"job_id": str, "batch_id": str, "position": int, "files": str, "retry_of": str},
        pk="job_id", not_null={"batch_id", "position", "files"},
    )
    db["batch_jobs"].create_index(["batch_id", "position"])
    # Partial: almost every row has no retry_of, and a full index on it looks useless to the
    # query planner (after ANALYZE it scans the table instead, for each row of a batch page).
    db.execute("CREATE INDEX idx_batch_jobs_retry_of ON batch_jobs (retry_of) WHERE retry_of IS NOT NULL")
    # The dashboard's reads: counts of one batch by state (covered by this index, so a batch
    # of 10,000 jobs is counted without touching its rows), and the jobs list filtered by state
    # or task, newest first, which otherwise walks every row to find a rare state.
    db.execute("CREATE INDEX idx_jobs_batch_state ON jobs (batch_id, state)")
    db.execute("CREATE INDEX idx_jobs_state_seq ON jobs (state, seq)")
    db.execute("CREATE INDEX idx_jobs_task_seq ON jobs (task, seq)")


@migrations()
def m003_nodes(db: Database) -> None:
    # The node registry: nodes from X2V_NODES are copied here at start; nodes added, drained or
    # removed through the admin API live only here. `removed` keeps a settings node removed
    # across restarts; `source` says who decides its URL ("settings" or "api").
    db["nodes"].create(
        {"name": str, "url": str, "capacity": int, "tasks": str, "drained": int, "removed": int,
         "source": str, "created_at": float, "updated_at": float},
        pk="name", not_null={"created_at", "updated_at"},
        defaults={"capacity": 1, "drained": 0, "removed": 0},
    )
    # Tasks a job was moved away from while its node could not be told: each is cancelled on
    # that node when it answers again, so a moved job never runs there as well.
    db["stray_tasks"].create(
        {"node": str, "task_id": str, "job_id": str, "created_at": float},
        pk=("node", "task_id"),
    )
    # Fair dispatch walks the queue lane by lane (task, priority, owner, batch), skipping from
    # one lane to the next through this index instead of reading every queued row.
    db.execute(
        "CREATE INDEX idx_jobs_lanes ON jobs"
        " (state, task, priority, coalesce(owner, ''), coalesce(batch_id, ''), seq)"
    )
    # Every node's follow loop asks for unsent cancels; without this, each ask reads every job.
    db.execute("CREATE INDEX idx_jobs_cancel_pending ON jobs (cancel_pending) WHERE cancel_pending = 1")


@migrations()
def m010_keys(db: Database) -> None:
    # API keys. Only the sha256 of a key is kept: a generated key holds 256 random bits, so a
    # plain hash cannot be reversed or guessed and needs no salt or slow hash. `prefix` (the
    # first characters of a generated key) lets a person tell keys apart in `keys list`.
    db["api_keys"].create(
        {"id": str, "name": str, "key_hash": str, "prefix": str, "admin": int,
         "daily_quota": int, "max_concurrent": int, "rate_per_min": float, "source": str,
         "created_at": float, "created_by": str, "revoked_at": float, "revoked_by": str},
        pk="id", not_null={"name", "key_hash", "created_at"}, defaults={"admin": 0},
    )
    db["api_keys"].create_index(["key_hash"], unique=True)
    # Dashboard sign-ins: the cookie's sha256, the key it acts for, its CSRF token.
    db["sessions"].create(
        {"id_hash": str, "key_id": str, "csrf": str, "created_at": float, "expires_at": float},
        pk="id_hash", not_null={"key_id", "csrf", "expires_at"},
    )
    db["sessions"].create_index(["key_id"])
    # Jobs accepted per key and UTC day, for daily quotas (retries of a job count too).
    db["key_usage"].create({"key_id": str, "day": str, "jobs": int}, pk=("key_id", "day"))
    db["audit"].create(
        {"id": int, "at": float, "actor": str, "action": str, "target": str, "detail": str},
        pk="id", not_null={"at", "actor", "action"},
    )
    # A key's own jobs, newest first, without reading everyone else's.
    db.execute("CREATE INDEX idx_jobs_owner_seq ON jobs (owner, seq)")


@migrations()
def m020_hot_path_indexes(db: Database) -> None:
    # The jobs handed to an upstream: read once per node per poll tick, per dispatch round and
    # per look at a queued job. Partial, so they hold only those few rows, however many finished
    # jobs the store keeps (without them each read walked the whole table).
    db.execute("CREATE INDEX idx_jobs_inflight ON jobs (seq) WHERE state IN ('submitted', 'running')")
    db.execute(
        "CREATE INDEX idx_jobs_inflight_upstream ON jobs (upstream, seq)"
        " WHERE state IN ('submitted', 'running')"
    )
    # Jobs by owner and state, kept by triggers: the dashboard's and /metrics' counts are then a
    # read of a few rows instead of a count of a million (owner '' for jobs without one).
    db.execute(
        "CREATE TABLE job_counts (owner TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,"
        " PRIMARY KEY (owner, state)) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO job_counts SELECT coalesce(owner, ''), state, count(*) FROM jobs GROUP BY 1, 2"
    )
    add = (
        "INSERT INTO job_counts VALUES (coalesce(new.owner, ''), new.state, 1)"
        " ON CONFLICT (owner, state) DO UPDATE SET n = n + 1;"
    )
    remove = "UPDATE job_counts SET n = n - 1 WHERE owner = coalesce(old.owner, '') AND state = old.state;"
    db.execute(f"CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN {add} END")
    db.execute(f"CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN {remove} END")
    db.execute(
        "CREATE TRIGGER jobs_count_update AFTER UPDATE OF state, owner ON jobs"
        f" WHEN old.state IS NOT new.state OR old.owner IS NOT new.owner BEGIN {remove} {add} END"
    )


# Queued jobs are counted in blocks of this many `seq`s (see m021_queue_blocks).
QUEUE_BLOCK_SEQS = 1024


@migrations()
def m021_queue_blocks(db: Database) -> None:
    # A queued job's place in the queue is asked on every GET of it. Counting the jobs ahead of
    # it in the queue index walks one index entry per job ahead: 0.56 ms half-way down a queue
    # of 10,000, 5 ms at 100,000. Queued jobs counted per (priority, block of 1024 seqs), kept by
    # triggers, make it a sum over the blocks ahead plus a count inside its own block, at most
    # 1024 entries however long the queue. Empty blocks are dropped, so the blocks ahead are
    # never more than the queued jobs (and usually ~1/1000 of them).
    db.execute(
        "CREATE TABLE queue_blocks (priority INTEGER NOT NULL, block INTEGER NOT NULL,"
        " n INTEGER NOT NULL, PRIMARY KEY (priority, block)) WITHOUT ROWID"
    )
    db.execute(
        f"INSERT INTO queue_blocks SELECT priority, seq / {QUEUE_BLOCK_SEQS}, count(*) FROM jobs"
        " WHERE state = 'queued' GROUP BY 1, 2"
    )
    add = (
        f"INSERT INTO queue_blocks VALUES (new.priority, new.seq / {QUEUE_BLOCK_SEQS}, 1)"
        " ON CONFLICT (priority, block) DO UPDATE SET n = n + 1;"
    )
    where = f"priority = old.priority AND block = old.seq / {QUEUE_BLOCK_SEQS}"
    remove = f"UPDATE queue_blocks SET n = n - 1 WHERE {where}; DELETE FROM queue_blocks WHERE {where} AND n <= 0;"
    db.execute(f"CREATE TRIGGER jobs_queue_insert AFTER INSERT ON jobs WHEN new.state = 'queued' BEGIN {add} END")
    db.execute(f"CREATE TRIGGER jobs_queue_delete AFTER DELETE ON jobs WHEN old.state = 'queued' BEGIN {remove} END")
    db.execute(
        "CREATE TRIGGER jobs_queue_leave AFTER UPDATE OF state, priority ON jobs"
        f" WHEN old.state = 'queued' AND (new.state IS NOT 'queued' OR new.priority IS NOT old.priority)"
        f" BEGIN {remove} END"
    )
    db.execute(
        "CREATE TRIGGER jobs_queue_enter AFTER UPDATE OF state, priority ON jobs"
        f" WHEN new.state = 'queued' AND (old.state IS NOT 'queued' OR new.priority IS NOT old.priority)"
        f" BEGIN {add} END"
    )


@migrations()
def m022_session_expiry(db: Database) -> None:
    # Each sign-in first deletes the sessions that have expired; without this it read them all.
    db.execute("CREATE INDEX idx_sessions_expires_at ON sessions (expires_at)")


@migrations()
def m023_owner_state(db: Database) -> None:
    # A key's jobs in one state, newest first (its failed jobs, its queue): without it the
    # owner's whole history was read to find a few of them.
    db.execute("CREATE INDEX idx_jobs_owner_state_seq ON jobs (owner, state, seq)")


@migrations()
def m026_event_streams(db: Database) -> None:
    # The event streams (GET .../events) replay a batch's or a key's state changes after a
    # Last-Event-ID. Each event carries its job's owner and batch (neither ever changes), so a
    # replay reads just the events it sends, through these indexes, not every job of the batch
    # or key joined to its timeline. Partial: most events have no batch.
    db.execute("ALTER TABLE job_events ADD COLUMN owner TEXT")
    db.execute("ALTER TABLE job_events ADD COLUMN batch_id TEXT")
    db.execute(
        "UPDATE job_events SET (owner, batch_id) ="
        " (SELECT owner, batch_id FROM jobs WHERE jobs.id = job_events.job_id)"
    )
    db.execute("CREATE INDEX idx_job_events_owner ON job_events (owner, id) WHERE owner IS NOT NULL")
    db.execute("CREATE INDEX idx_job_events_batch ON job_events (batch_id, id) WHERE batch_id IS NOT NULL")


@migrations()
def m028_pipelines(db: Database) -> None:
    # A pipeline: one finished video from several steps (pipelines/). Its state and its steps
    # live here, so that a restart picks it up where it was; each step becomes an ordinary job
    # (`job_id`), made in the same transaction that records it, so none is ever made twice.
    db["pipelines"].create(
        {"seq": int, "id": str, "owner": str, "name": str, "state": str, "output": str,
         "priority": int, "created_at": float, "updated_at": float, "finished_at": float,
         "error": str, "result_sha": str, "result_meta": str, "files_expired": int},
        pk="seq", not_null={"id", "state", "output", "created_at", "updated_at"},
        defaults={"priority": 0, "files_expired": 0},
    )
    db["pipelines"].create_index(["id"], unique=True)
    db.execute("CREATE INDEX idx_pipelines_owner_seq ON pipelines (owner, seq)")
    # The start-up sweep's read: the pipelines still under way.
    db.execute("CREATE INDEX idx_pipelines_running ON pipelines (seq) WHERE state = 'running'")
    db["pipeline_steps"].create(
        {"pipeline_id": str, "n": int, "scene": int, "segment": int, "kind": str, "task": str,
         "params": str, "inputs": str, "needs": str, "seconds": float, "audio": str, "job_id": str},
        pk=("pipeline_id", "n"), not_null={"kind", "task", "params", "inputs", "needs"},
    )
    db.execute("CREATE UNIQUE INDEX idx_pipeline_steps_job ON pipeline_steps (job_id) WHERE job_id IS NOT NULL")


@migrations()
def m030_foreign_ids(db: Database) -> None:
    # Ids the compatible surfaces' clients chose or were given (a LightX2V client's own
    # `task_id`, its `save_result_path` file name), each naming a gateway job, per key.
    db.execute(
        "CREATE TABLE foreign_ids (owner TEXT NOT NULL, surface TEXT NOT NULL,"
        " foreign_id TEXT NOT NULL, job_id TEXT NOT NULL, created_at REAL NOT NULL,"
        " PRIMARY KEY (owner, surface, foreign_id))"
    )
    db.execute("CREATE INDEX idx_foreign_ids_job ON foreign_ids (job_id)")


@migrations()
def m024_webhooks(db: Database) -> None:
    # A job's webhook, fixed when it is accepted (its own, or its key's default then): the URL,
    # the events it wants (comma-separated) and the key whose secret signs its deliveries.
    db["job_webhooks"].create(
        {"job_id": str, "url": str, "events": str, "key_id": str},
        pk="job_id", not_null={"url", "events"},
    )
    # One row per message to send, recorded before its first attempt: `id` is the stable
    # `webhook-id` every attempt carries, `payload` the body every attempt sends. A job event
    # turned into deliveries a second time (a crash between the two steps) adds none: unique per
    # event, type and URL.
    db["webhook_deliveries"].create(
        {"id": str, "event_id": int, "type": str, "job_id": str, "url": str, "key_id": str,
         "payload": str, "created_at": float, "attempts": int, "next_attempt_at": float,
         "last_attempt_at": float, "last_status": int, "last_error": str,
         "delivered_at": float, "gave_up_at": float},
        pk="id", not_null={"event_id", "type", "url", "payload", "created_at"},
        defaults={"attempts": 0},
    )
    db.execute("CREATE UNIQUE INDEX idx_webhook_deliveries_event ON webhook_deliveries (event_id, type, url)")
    db["webhook_deliveries"].create_index(["job_id", "created_at"])
    # The worker's question, many times a minute: what is due. Only pending rows are indexed.
    db.execute(
        "CREATE INDEX idx_webhook_deliveries_due ON webhook_deliveries (next_attempt_at)"
        " WHERE delivered_at IS NULL AND gave_up_at IS NULL"
    )
    # The last job event turned into deliveries. Starts at the newest event: jobs made before
    # webhooks existed have none to send.
    db.execute("CREATE TABLE webhook_cursor (id INTEGER PRIMARY KEY CHECK (id = 1), event_id INTEGER NOT NULL)")
    db.execute("INSERT INTO webhook_cursor VALUES (1, (SELECT coalesce(max(id), 0) FROM job_events))")


@migrations()
def m025_key_webhooks(db: Database) -> None:
    # A key's default webhook (for its jobs that name none) and its signing secrets. The secret
    # is kept as it is (the gateway signs with it; unlike the key, it is not a password) and is
    # shown once, when made. During a rotation the previous secret signs too, until `_until`.
    for column in ("webhook_url", "webhook_events", "webhook_secret", "webhook_secret_previous"):
        db.execute(f"ALTER TABLE api_keys ADD COLUMN {column} TEXT")
    db.execute("ALTER TABLE api_keys ADD COLUMN webhook_secret_previous_until FLOAT")


@migrations()
def m032_replicas(db: Database) -> None:
    # Gateway replicas sharing this store (dispatch/replicas.py): each holds a lease it renews,
    # and each job in flight names the replica that follows it, so a replica that dies has its
    # jobs taken over by another one, and only by one.
    db.execute(
        "CREATE TABLE replicas (id TEXT PRIMARY KEY, started_at REAL NOT NULL,"
        " expires_at REAL NOT NULL) WITHOUT ROWID"
    )
    db.execute("ALTER TABLE jobs ADD COLUMN replica TEXT")
    # A replica's jobs in flight (and those whose cancel it owes): read on each take-over.
    db.execute(
        "CREATE INDEX idx_jobs_replica ON jobs (replica)"
        " WHERE state IN ('submitted', 'running') OR cancel_pending = 1"
    )


@migrations()
def m027_batches_by_owner(db: Database) -> None:
    # GET /api/v1/batches: a key's own batches, newest first, a page at a time.
    db.execute("CREATE INDEX idx_batches_owner_created ON batches (owner, created_at, id)")


@migrations()
def m029_open_pipelines(db: Database) -> None:
    # The start-up sweep reads failed pipelines too: a failed step's job retried on its own
    # (`POST /api/v1/jobs/{id}/retry`) moves its pipeline on again.
    db.execute("DROP INDEX idx_pipelines_running")
    db.execute("CREATE INDEX idx_pipelines_open ON pipelines (seq) WHERE state IN ('running', 'failed')")
    # `Idempotency-Key` on POST /api/v1/pipelines, as for jobs: a repeated request gets the
    # pipeline the first one made.
    db.execute("ALTER TABLE pipelines ADD COLUMN idempotency_key TEXT")
    db.execute("ALTER TABLE pipelines ADD COLUMN request_hash TEXT")
    db.execute("CREATE UNIQUE INDEX idx_pipelines_idempotency ON pipelines (idempotency_key)"
               " WHERE idempotency_key IS NOT NULL")


@migrations()
def m033_pipeline_webhooks(db: Database) -> None:
    # A pipeline's webhook, fixed when it is accepted (its own, or its key's default), as a job's.
    db.execute(
        "CREATE TABLE pipeline_webhooks (pipeline_id TEXT PRIMARY KEY, url TEXT NOT NULL,"
        " events TEXT NOT NULL, key_id TEXT)"
    )
    # A pipeline's ends (succeeded, failed, cancelled), recorded in the transaction that moves
    # it: the webhook worker turns those after its own cursor into deliveries, as it does job
    # events, so a message is recorded before it is sent and survives a crash.
    db.execute(
        "CREATE TABLE pipeline_events (id INTEGER PRIMARY KEY AUTOINCREMENT, pipeline_id TEXT NOT NULL,"
        " at REAL NOT NULL, state TEXT NOT NULL, detail TEXT)"
    )
    db.execute("ALTER TABLE webhook_cursor ADD COLUMN pipeline_event_id INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE webhook_deliveries ADD COLUMN pipeline_id TEXT")
    db.execute(
        "CREATE INDEX idx_webhook_deliveries_pipeline ON webhook_deliveries (pipeline_id, created_at)"
        " WHERE pipeline_id IS NOT NULL"
    )
    # The join is claimed with a lease (replicas sharing the store): one joins, and should it
    # die, another does once the lease ends.
    db.execute("ALTER TABLE pipelines ADD COLUMN join_by TEXT")
    db.execute("ALTER TABLE pipelines ADD COLUMN join_until REAL")


@migrations()
def m034_queued_lanes(db: Database) -> None:
    # The lanes' index holds queued jobs only (the rest of history never needs it) and every
    # column a dispatch round reads of them: a round reads the first jobs of a hundred lanes or
    # more, and looking each row up in the table cost a third of a round at a start (the rows
    # of 50,000 queued jobs do not stay in a connection's page cache). `owner` and `batch_id`
    # are there as themselves too: SQLite 3.40 (Debian 12's) counts an index covering only if
    # every column a query names is in it, expressions aside.
    db.execute("DROP INDEX idx_jobs_lanes")
    db.execute(
        "CREATE INDEX idx_jobs_lanes ON jobs (state, task, priority, coalesce(owner, ''),"
        " coalesce(batch_id, ''), seq, id, pinned, owner, batch_id) WHERE state = 'queued'"
    )


@migrations()
def m035_inflight_counts(db: Database) -> None:
    # A dispatch round counts the jobs in flight per node and per owner and batch, each time a
    # slot frees: from these two indexes of in-flight jobs alone, never a row of the table
    # (2,000 in flight: 1.8 -> 0.7 ms and 1.5 -> 0.2 ms). `state` is in them for that, and
    # `owner` and `batch_id` as themselves (see m034).
    db.execute("DROP INDEX idx_jobs_inflight_upstream")
    db.execute(
        "CREATE INDEX idx_jobs_inflight_upstream ON jobs (upstream, seq, state)"
        " WHERE state IN ('submitted', 'running')"
    )
    db.execute(
        "CREATE INDEX idx_jobs_inflight_batches ON jobs (coalesce(owner, ''), coalesce(batch_id, ''), state,"
        " owner, batch_id) WHERE state IN ('submitted', 'running')"
    )
