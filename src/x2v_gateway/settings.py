"""Settings from the environment and a `.env` file.

Every setting is one `X2V_*` (or `LIGHTX2V_*`) variable. A bad value stops start-up with a
message naming the variable; the README's settings table is checked against `SETTINGS` by a test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

from .tasks import ALL_TASKS, NODE_TASKS


class SettingsError(ValueError):
    """A setting has a value the gateway cannot use; the message names the variable."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    url: str


@dataclass(frozen=True, slots=True)
class CloudSpec:
    name: str
    base_url: str
    token: str = field(repr=False)  # never in a repr, a log line or an error


@dataclass(frozen=True, slots=True)
class S3Config:
    """Where an S3-compatible blob store is (`X2V_BLOBS=s3://bucket/prefix` and the X2V_S3_*)."""

    bucket: str
    prefix: str = ""
    endpoint: str = ""  # empty: AWS
    region: str = "us-east-1"
    access_key_id: str = ""  # empty: the AWS_* variables, or the machine's role
    secret_access_key: str = field(default="", repr=False)  # never in a repr, a log line or an error
    presign_minutes: float = 0.0  # > 0: downloads redirect to presigned URLs this long-lived


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = 8000
    nodes: tuple[NodeSpec, ...] = ()
    poll_interval: float = 1.0
    lookahead: int = 1
    request_timeout: float = 30.0
    retention_hours: float = 168.0
    max_upload_mb: int = 2048
    max_json_mb: int = 64
    form_threshold_mb: int = 16
    forward_uploads: bool = True
    max_wait: float = 600.0
    event_streams: int = 8
    event_keepalive: float = 15.0
    max_file_mb: int = 2048
    min_free_disk_mb: int = 1024
    media_checkers: int = 2
    max_image_megapixels: float = 40.0
    # Access control (auth.py): the bootstrap admin key, never in a repr, a log line or an error.
    admin_key: str = field(default="", repr=False)
    metrics_open: bool = False
    # The key (id or name) requests without credentials on the compatible surfaces act as.
    headerless_key: str = ""
    private_urls: bool = False
    cors_origins: tuple[str, ...] = ()
    session_hours: float = 12.0
    demo_node_port: int = 0
    demo_job_seconds: float = 0.0
    log_level: str = "INFO"
    clouds: tuple[CloudSpec, ...] = ()
    # Task type -> the cloud model its jobs run on when they name none (over the adapter's defaults).
    cloud_models: dict[str, str] = field(default_factory=dict)
    # Per node name; a node not listed learns its task types from its metadata, capacity 1.
    node_tasks: dict[str, frozenset[str]] = field(default_factory=dict)
    node_capacity: dict[str, int] = field(default_factory=dict)
    start_deadline: float = 300.0
    blobs: str = ""
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = field(default="", repr=False)
    s3_presign_minutes: float = 0.0
    # A pipeline's s2v audio longer than this is split at its silences into parts (pipelines/).
    speech_part_seconds: float = 30.0
    # PostgreSQL instead of the SQLite file (several replicas); its password never in a repr.
    database_url: str = field(default="", repr=False)
    # Webhooks (webhooks.py, webhook_worker.py).
    webhook_retry_hours: float = 24.0
    webhook_first_retry: float = 5.0
    webhook_timeout: float = 10.0
    webhook_concurrency: int = 8
    replica_id: str = ""
    replica_lease: float = 6.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "gateway.db"

    @property
    def s3(self) -> S3Config | None:
        """The bucket blobs are kept in; None: the local `blob_dir`."""
        if not self.blobs:
            return None
        parts = urlsplit(self.blobs)
        return S3Config(
            bucket=parts.netloc, prefix=parts.path.strip("/"), endpoint=self.s3_endpoint,
            region=self.s3_region, access_key_id=self.s3_access_key_id,
            secret_access_key=self.s3_secret_access_key, presign_minutes=self.s3_presign_minutes,
        )

    @property
    def store_location(self) -> Path | str:
        """What `JobStore(...)` opens: the PostgreSQL URL when one is set, else the SQLite file."""
        return self.database_url or self.db_path

    @property
    def database_shown(self) -> str:
        """X2V_DATABASE_URL fit for a page or a log line: its password hidden."""
        return redact_url(self.database_url)

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


def redact_url(url: str) -> str:
    """A URL with its password (if any) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _int(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")
        return value

    return parse


def _text(name: str, raw: str) -> str:
    return raw


def _replica_id(name: str, raw: str) -> str:
    if len(raw) > 200 or not raw.isprintable():
        raise SettingsError(f"{name} must be at most 200 printable characters")
    return raw


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(f"{name} must not be empty")
    return Path(raw).expanduser()


def _bool(name: str, raw: str) -> bool:
    value = raw.lower()
    if value not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    return value in {"true", "1", "yes", "on"}


def _admin_key(name: str, raw: str) -> str:
    # The key is compared by its sha256 only; a short one could be guessed by trying.
    if len(raw) < 24 or any(c.isspace() for c in raw):
        raise SettingsError(
            f"{name} must be at least 24 characters without spaces; make one with"
            " `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return raw


def _database_url(name: str, raw: str) -> str:
    # The URL may hold a password: an error names the variable, never the value.
    parts = urlsplit(raw)
    if parts.scheme not in {"postgresql", "postgres"} or not parts.path.strip("/"):
        raise SettingsError(
            f"{name} must be a PostgreSQL URL with a database name,"
            " postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    return raw


def _origins(name: str, raw: str) -> tuple[str, ...]:
    """`https://app.example.com,http://localhost:5173` -> origins allowed to call the API from a browser."""
    origins = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        parts = urlsplit(item)
        if item != "*" and (parts.scheme not in {"http", "https"} or not parts.hostname
                            or parts.path not in {"", "/"} or parts.query):
            raise SettingsError(f"{name}: {item!r} is not an origin like https://app.example.com")
        origins.append(item.rstrip("/"))
    return tuple(origins)


def _bucket_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    # S3's bucket rules: 3 to 63 lower-case letters, digits, dots and hyphens.
    if parts.scheme != "s3" or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", parts.netloc) \
            or parts.query or parts.fragment:
        raise SettingsError(f"{name} must be s3://bucket or s3://bucket/prefix, got {raw!r}")
    return raw.rstrip("/")


def _log_level(name: str, raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"{name} must be one of DEBUG, INFO, WARNING, ERROR, got {raw!r}")
    return level


def _check_url(name: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise SettingsError(f"{name}: {url!r} is not an http(s) URL")
    return url.rstrip("/")


def parse_nodes(name: str, raw: str) -> tuple[NodeSpec, ...]:
    """`gpu0=http://10.0.0.5:8000,http://10.0.0.6:8000` -> named nodes (unnamed: node1, node2...)."""
    nodes: list[NodeSpec] = []
    for position, item in enumerate((p.strip() for p in raw.split(",")), start=1):
        if not item:
            continue
        label, sep, url = item.partition("=")
        if not sep or "://" in label:
            label, url = f"node{position}", item
        label = label.strip()
        if not label.replace("-", "").replace("_", "").isalnum():
            raise SettingsError(f"{name}: node name {label!r} may hold only letters, digits, - and _")
        nodes.append(NodeSpec(label, _check_url(name, url.strip())))
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise SettingsError(f"{name}: node names must be unique, got {', '.join(names)}")
    return tuple(nodes)




def _node_pairs(name: str, raw: str) -> list[tuple[str, str]]:
    pairs = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        node, sep, value = item.partition("=")
        if not sep or not node.strip() or not value.strip():
            raise SettingsError(f"{name}: expected name=value pairs separated by commas, got {item!r}")
        pairs.append((node.strip(), value.strip()))
    return pairs


def parse_node_tasks(name: str, raw: str) -> dict[str, frozenset[str]]:
    """`gpu0=t2v+i2v,gpu1=s2v` -> the task types each named node runs."""
    result = {}
    for node, value in _node_pairs(name, raw):
        tasks = frozenset(t.strip() for t in value.split("+") if t.strip())
        unknown = tasks - NODE_TASKS
        if unknown or not tasks:
            raise SettingsError(
                f"{name}: {node} lists {', '.join(sorted(unknown)) or 'no task'}; task types are"
                f" {', '.join(sorted(NODE_TASKS))}"
            )
        result[node] = tasks
    return result


def parse_node_capacity(name: str, raw: str) -> dict[str, int]:
    """`gpu0=2,gpu1=1` -> tasks each named node runs at once; a bare number applies to all (`*`)."""
    if "=" not in raw:
        return {"*": _int(1, 64)(name, raw)}
    return {node: _int(1, 64)(f"{name} ({node})", value) for node, value in _node_pairs(name, raw)}


# name -> (Settings field, parser, description for the README). Order is the README's order.
SETTINGS: dict[str, tuple[str, Callable[[str, str], Any], str]] = {
    "X2V_DATA_DIR": ("data_dir", _path, "Where the SQLite file and the blob store live"),
    "X2V_DATABASE_URL": ("database_url", _database_url, "A PostgreSQL database (`postgresql://USER:PASSWORD@HOST:PORT/DATABASE`) for the job store instead of the SQLite file in X2V_DATA_DIR, so that several gateway replicas share it; its schema is made and migrated at start. Empty: SQLite"),
    "X2V_HOST": ("host", _text, "Address the gateway listens on"),
    "X2V_PORT": ("port", _int(1, 65535), "Port the gateway listens on"),
    "X2V_NODES": ("nodes", parse_nodes, "Self-hosted LightX2V nodes: comma-separated base URLs, each optionally `name=url`. Empty: a built-in demo node is started"),
    "X2V_POLL_INTERVAL": ("poll_interval", _float(0.05, 60), "Seconds per status request to a node, on average: a node running a job is asked when its end is due, and more often only within this budget"),
    "X2V_LOOKAHEAD": ("lookahead", _int(0, 9), "Jobs waiting in a node's own queue beyond the one it runs, so the GPU starts the next at once"),
    "X2V_NODE_TASKS": ("node_tasks", parse_node_tasks, "Task types per node, `name=t2v+i2v` pairs separated by commas, for nodes started with one `--task`. A node not listed runs what its model class (`/v1/service/metadata`) allows"),
    "X2V_NODE_CAPACITY": ("node_capacity", parse_node_capacity, "Tasks a node runs at once (a LightX2V server runs 1): one number for every node, or `name=N` pairs"),
    "X2V_START_DEADLINE": ("start_deadline", _float(1, 7 * 86400), "Seconds a job may wait in a node's own queue (or on a node that stopped answering) before it is moved to another node; longer when the node's measured job times say the work ahead needs longer"),
    "X2V_REQUEST_TIMEOUT": ("request_timeout", _float(1, 3600), "Seconds before an upstream request gives up"),
    "X2V_RETENTION_HOURS": ("retention_hours", _float(0, 24 * 3650), "Inputs and results of finished jobs are deleted after this many hours (0 keeps them forever)"),
    "X2V_MAX_UPLOAD_MB": ("max_upload_mb", _int(1, 1024 * 1024), "Largest multipart upload accepted, in MiB"),
    "X2V_MAX_JSON_MB": ("max_json_mb", _int(1, 4096), "Largest JSON request body accepted (base64 inputs included), in MiB"),
    "X2V_FORM_THRESHOLD_MB": ("form_threshold_mb", _int(0, 1024 * 1024), "Inputs larger than this go to a node through its multipart `/form` route instead of base64 JSON"),
    "X2V_FORWARD_UPLOADS": ("forward_uploads", _bool, "`true`: a multipart upload over `X2V_FORM_THRESHOLD_MB` whose `task` comes before its files is sent on to a node with a free slot while it arrives (still kept and checked first). `false`: every upload is received whole, then sent"),
    "X2V_MAX_WAIT": ("max_wait", _float(0, 86400), "Longest wait (`?wait=` or `Prefer: wait=`) a client may ask `POST /api/v1/jobs` or `GET /api/v1/jobs/{id}` to block for, in seconds"),
    "X2V_EVENT_STREAMS": ("event_streams", _int(1, 1000), "Event streams (`GET .../events`) one API key may hold open at once; one more gets 429"),
    "X2V_EVENT_KEEPALIVE": ("event_keepalive", _float(0.1, 300), "Seconds between keep-alive comments on a quiet event stream, so that proxies do not close it"),
    "X2V_DEMO_NODE_PORT": ("demo_node_port", _int(0, 65535), "Port of the built-in demo node (0: any free port)"),
    "X2V_DEMO_JOB_SECONDS": ("demo_job_seconds", _float(0, 3600), "Minimum seconds each demo-node job takes"),
    "X2V_LOG_LEVEL": ("log_level", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    "X2V_ADMIN_KEY": ("admin_key", _admin_key, "An admin API key for a new deployment (at least 24 characters); it works while this variable holds it. Unset and no key made yet: the first start makes one and shows it once"),
    "X2V_PRIVATE_URLS": ("private_urls", _bool, "`true`: input URLs may point at private, loopback and link-local addresses. Default: public addresses only, so a key cannot make the gateway read internal services"),
    "X2V_METRICS_OPEN": ("metrics_open", _bool, "`true`: `/metrics` answers without a key (for a scraper on a private network). Default: it needs an admin key"),
    "X2V_HEADERLESS_KEY": ("headerless_key", _text, "The API key (its id or name) that requests without an `Authorization` header act as on the compatible routes (the LightX2V server API, the OpenAI routes, the replaced services), for clients written to send none; only on a network where everyone who can reach the gateway may use that key. Empty: those routes need a key like every other"),
    "X2V_CORS_ORIGINS": ("cors_origins", _origins, "Browser origins allowed to call the API (CORS), comma-separated, e.g. `https://app.example.com`. Empty: CORS off"),
    "X2V_SESSION_HOURS": ("session_hours", _float(0.1, 24 * 90), "Hours a dashboard sign-in lasts"),
    "X2V_MAX_FILE_MB": ("max_file_mb", _int(1, 1024 * 1024), "Largest single input file accepted (upload, URL or base64), in MiB"),
    "X2V_MIN_FREE_DISK_MB": ("min_free_disk_mb", _int(0, 1024 * 1024 * 1024), "New jobs get 507 while the data directory's disk has less free space than this, in MiB (0: no check)"),
    "X2V_MEDIA_CHECKERS": ("media_checkers", _int(1, 32), "Helper processes that check uploaded files and results (Pillow, PyAV), one file each at a time; one API key uses at most all but one of them"),
    "X2V_MAX_IMAGE_MEGAPIXELS": ("max_image_megapixels", _float(0.1, 1000), "Largest image accepted, in megapixels (width × height / 1,000,000); larger ones get 422 before they are decoded"),
    "X2V_BLOBS": ("blobs", _bucket_url, "Where inputs and results are kept: empty for the data directory's `blobs/`, or `s3://bucket/prefix` for an S3-compatible bucket (which must exist), with the `X2V_S3_*` settings"),
    "X2V_S3_ENDPOINT": ("s3_endpoint", _check_url, "The S3 server's URL, e.g. `http://seaweedfs:8333` (empty: AWS S3)"),
    "X2V_S3_REGION": ("s3_region", _text, "The bucket's region"),
    "X2V_S3_ACCESS_KEY_ID": ("s3_access_key_id", _text, "The S3 access key id (empty: the `AWS_*` variables, or the machine's role)"),
    "X2V_S3_SECRET_ACCESS_KEY": ("s3_secret_access_key", _text, "The S3 secret key; never shown or logged"),
    "X2V_S3_PRESIGN_MINUTES": ("s3_presign_minutes", _float(0, 7 * 24 * 60), "Above 0: video and input downloads answer with a redirect to a presigned URL valid this many minutes, so the bytes come straight from the bucket. 0: the gateway serves them itself"),
    "X2V_SPEECH_PART_SECONDS": ("speech_part_seconds", _float(2, 600), "Longest audio a node takes in one s2v task: a pipeline's s2v scene with longer audio is split at its silences into parts of at most this many seconds, run in parallel and joined"),
    "X2V_WEBHOOK_RETRY_HOURS": ("webhook_retry_hours", _float(0.001, 24 * 30), "Hours a webhook delivery is retried (each retry waits longer) before the gateway gives up on it"),
    "X2V_WEBHOOK_FIRST_RETRY": ("webhook_first_retry", _float(0.05, 3600), "Seconds before a failed webhook delivery is tried again; each later retry waits twice as long as the one before (with jitter), at most an hour"),
    "X2V_WEBHOOK_TIMEOUT": ("webhook_timeout", _float(0.5, 300), "Seconds a webhook receiver has to answer one delivery, connecting included"),
    "X2V_WEBHOOK_CONCURRENCY": ("webhook_concurrency", _int(1, 256), "Webhook deliveries in flight at once, across every receiver"),
    "X2V_REPLICA_ID": ("replica_id", _replica_id, "This gateway's name among replicas sharing one store (dispatch/replicas.py); the jobs it sends name it. Default `hostname:pid`. Give each replica its own, stable across its restarts"),
    "X2V_REPLICA_LEASE": ("replica_lease", _float(2, 300), "Seconds a replica's lease lasts without renewal (renewed every second): a replica silent this long has its jobs in flight taken over by another"),
}

CLOUD_SETTINGS = {
    "LIGHTX2V_ACCESS_TOKEN": "Access token for the hosted LightX2V cloud; adds it as an upstream. Several tokens: comma-separated",
    "LIGHTX2V_BASE_URL": "Base URL of the hosted LightX2V cloud",
    "LIGHTX2V_MODELS": "Cloud model per task type for jobs that name none, `task=model_cls` pairs separated by commas; a task type not listed keeps its default",
}
DEFAULT_CLOUD_URL = "https://x2v.light-ai.top"


def _parse_clouds(env: Mapping[str, str]) -> tuple[CloudSpec, ...]:
    tokens = [t.strip() for t in env.get("LIGHTX2V_ACCESS_TOKEN", "").split(",") if t.strip()]
    base_url = _check_url("LIGHTX2V_BASE_URL", env.get("LIGHTX2V_BASE_URL") or DEFAULT_CLOUD_URL)
    return tuple(
        CloudSpec(name="cloud" if len(tokens) == 1 else f"cloud{i}", base_url=base_url, token=token)
        for i, token in enumerate(tokens, start=1)
    )


def parse_cloud_models(name: str, raw: str) -> dict[str, str]:
    """`s2v=SekoTalk,t2v=self-forcing-dmd` -> the cloud model each task type runs on by default."""
    models = {}
    for task, model in _node_pairs(name, raw):
        if task not in ALL_TASKS:
            raise SettingsError(f"{name}: {task!r} is not a task type; task types are {', '.join(sorted(ALL_TASKS))}")
        models[task] = model
    return models


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Settings from `environ` (default: the process environment) over the `.env` file."""
    env: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        env.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    env.update(os.environ if environ is None else environ)

    values: dict[str, Any] = {}
    for name, (attr, parse, _) in SETTINGS.items():
        raw = env.get(name)
        if raw is not None and raw.strip() != "":
            values[attr] = parse(name, raw.strip())
    values["clouds"] = _parse_clouds(env)
    values["cloud_models"] = parse_cloud_models("LIGHTX2V_MODELS", env.get("LIGHTX2V_MODELS", ""))
    names = {node.name for node in values.get("nodes", ())}
    for variable, attr in (("X2V_NODE_TASKS", "node_tasks"), ("X2V_NODE_CAPACITY", "node_capacity")):
        for node in set(values.get(attr, {})) - names - {"*"}:
            raise SettingsError(f"{variable}: no node named {node!r} in X2V_NODES")
    return Settings(**values)


def cli_command() -> str:
    """This command as the person who started it types it: what the gateway and the CLI print.

    `./dev` sets X2V_CLI to `./dev`: in a checkout the `x2v-gateway` script is in `.venv/bin/`,
    not on PATH, and `./dev keys create ...` is what works there. Installed with pip or in the
    Docker image, it is `x2v-gateway`.
    """
    return os.environ.get("X2V_CLI") or "x2v-gateway"
