"""Settings from the environment and a `.env` file.

Every setting is one `X2V_*` (or `LIGHTX2V_*`) variable. A bad value stops start-up with a
message naming the variable; the README's settings table is checked against `SETTINGS` by a test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values


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
    max_wait: float = 600.0
    demo_node_port: int = 0
    demo_job_seconds: float = 0.0
    log_level: str = "INFO"
    clouds: tuple[CloudSpec, ...] = ()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "gateway.db"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


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


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(f"{name} must not be empty")
    return Path(raw).expanduser()


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


# name -> (Settings field, parser, description for the README). Order is the README's order.
SETTINGS: dict[str, tuple[str, Callable[[str, str], Any], str]] = {
    "X2V_DATA_DIR": ("data_dir", _path, "Where the SQLite file and the blob store live"),
    "X2V_HOST": ("host", _text, "Address the gateway listens on"),
    "X2V_PORT": ("port", _int(1, 65535), "Port the gateway listens on"),
    "X2V_NODES": ("nodes", parse_nodes, "Self-hosted LightX2V nodes: comma-separated base URLs, each optionally `name=url`. Empty: a built-in demo node is started"),
    "X2V_POLL_INTERVAL": ("poll_interval", _float(0.05, 60), "Seconds between two status requests to a node that has work"),
    "X2V_LOOKAHEAD": ("lookahead", _int(0, 9), "Jobs waiting in a node's own queue beyond the one it runs, so the GPU starts the next at once"),
    "X2V_REQUEST_TIMEOUT": ("request_timeout", _float(1, 3600), "Seconds before an upstream request gives up"),
    "X2V_RETENTION_HOURS": ("retention_hours", _float(0, 24 * 3650), "Inputs and results of finished jobs are deleted after this many hours (0 keeps them forever)"),
    "X2V_MAX_UPLOAD_MB": ("max_upload_mb", _int(1, 1024 * 1024), "Largest multipart upload accepted, in MiB"),
    "X2V_MAX_JSON_MB": ("max_json_mb", _int(1, 4096), "Largest JSON request body accepted (base64 inputs included), in MiB"),
    "X2V_FORM_THRESHOLD_MB": ("form_threshold_mb", _int(0, 1024 * 1024), "Inputs larger than this go to a node through its multipart `/form` route instead of base64 JSON"),
    "X2V_MAX_WAIT": ("max_wait", _float(0, 86400), "Longest `wait` a client may ask `POST /api/v1/jobs` to block for, in seconds"),
    "X2V_DEMO_NODE_PORT": ("demo_node_port", _int(0, 65535), "Port of the built-in demo node (0: any free port)"),
    "X2V_DEMO_JOB_SECONDS": ("demo_job_seconds", _float(0, 3600), "Minimum seconds each demo-node job takes"),
    "X2V_LOG_LEVEL": ("log_level", _log_level, "DEBUG, INFO, WARNING or ERROR"),
}

CLOUD_SETTINGS = {
    "LIGHTX2V_ACCESS_TOKEN": "Access token for the hosted LightX2V cloud; adds it as an upstream. Several tokens: comma-separated",
    "LIGHTX2V_BASE_URL": "Base URL of the hosted LightX2V cloud",
}
DEFAULT_CLOUD_URL = "https://x2v.light-ai.top"


def _parse_clouds(env: Mapping[str, str]) -> tuple[CloudSpec, ...]:
    tokens = [t.strip() for t in env.get("LIGHTX2V_ACCESS_TOKEN", "").split(",") if t.strip()]
    base_url = _check_url("LIGHTX2V_BASE_URL", env.get("LIGHTX2V_BASE_URL") or DEFAULT_CLOUD_URL)
    return tuple(
        CloudSpec(name="cloud" if len(tokens) == 1 else f"cloud{i}", base_url=base_url, token=token)
        for i, token in enumerate(tokens, start=1)
    )


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
    return Settings(**values)
