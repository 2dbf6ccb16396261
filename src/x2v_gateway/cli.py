"""The `x2v-gateway` command."""

from __future__ import annotations

import logging
import queue
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .settings import Settings, SettingsError, cli_command, load_settings

if TYPE_CHECKING:
    import socket

    from .app import Gateway


@click.group()
@click.version_option(package_name="x2v-gateway")
def main() -> None:
    """A durable gateway in front of LightX2V video-generation servers."""


@main.command()
@click.option("--env-file", default=".env", show_default=True, help="Settings file read under the environment")
def serve(env_file: str) -> None:
    """Run the gateway with settings from the environment and `.env`.

    Example: x2v-gateway serve
    """
    import uvicorn

    from .app import create_app, settle_heap
    from .http_protocol import BodyPiecesProtocol

    try:
        settings = load_settings(env_file=env_file)
    except SettingsError as exc:
        click.echo(f"x2v-gateway: {exc}", err=True)
        sys.exit(2)
    app = create_app(settings)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)  # returns once it listens (or exits)
            settle_heap()
            click.echo(_where(settings, app.state.gateway), nl=False)

    server = Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        http=BodyPiecesProtocol,
        # An open dashboard keeps a live-update stream open: do not wait for it forever on stop.
        timeout_graceful_shutdown=5,
    ))
    try:
        with _access_log_off_loop():
            server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:  # it could not listen (uvicorn logged why), as uvicorn.run exits
        sys.exit(3)


def _exit_past_obstore(code: int) -> None:
    """Exit now, skipping the interpreter's teardown: once obstore (the S3 client, blobs/s3.py)
    has run, Python's finalisation aborts with SIGABRT in about one exit in two (measured with
    obstore 0.12), which would report a finished command as a crash. (`serve` needs none of
    this: uvicorn ends it with the SIGTERM it was stopped with, before any teardown.)"""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _HandOff(QueueHandler):
    """Passes a record on as it is: uvicorn's access formatter needs the record's own `args`,
    which `QueueHandler.prepare` would merge into the message."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


@contextmanager
def _access_log_off_loop() -> Iterator[None]:
    """Write uvicorn's access log (a line per request at INFO) from a thread of its own.

    Formatting and writing a line costs ~35 CPU-µs, and the write waits for the disk or the pipe
    (80-100 µs on a busy machine); on the event loop that was a quarter of a `GET /api/v1/jobs/{id}`.
    Handing the record to a queue costs the loop a few µs. The lines still come out in order, and
    the ones queued at shutdown are written before the process exits.
    """
    logger = logging.getLogger("uvicorn.access")
    handlers = list(logger.handlers)
    if not handlers:
        yield
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, *handlers, respect_handler_level=True)
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(_HandOff(records))
    listener.start()
    try:
        yield
    finally:
        listener.stop()


def _where(settings: Settings, gateway: Gateway) -> str:
    """The start-up block: what listens where, and where the data is."""
    host = settings.host
    anywhere = host in ("0.0.0.0", "::", "")
    shown = "127.0.0.1" if anywhere else f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{settings.port}"
    if gateway.demo_node is not None:
        upstreams = (f"the built-in demo node, {gateway.demo_node.url} (placeholder videos on the CPU;"
                     " X2V_NODES lists real LightX2V servers)")
    else:
        kinds = [state.upstream.kind for state in gateway.dispatcher.states.values()]
        nodes, clouds = kinds.count("selfhosted"), kinds.count("cloud")
        counts = []
        if nodes or not clouds:
            counts.append(f"{nodes} self-hosted node{'s' if nodes != 1 else ''}")
        if clouds:
            counts.append(f"{clouds} cloud account{'s' if clouds != 1 else ''}")
        upstreams = ", ".join(counts)
    rows = [
        ("gateway", url + (f" (and every other address: {host})" if anywhere else "")),
        ("dashboard", f"{url}/ui/"),
        ("API docs", f"{url}/schema"),
        ("upstreams", upstreams),
        ("data", str(settings.data_dir.resolve())),
    ]
    if settings.database_url:
        rows.append(("store", f"PostgreSQL, {settings.database_shown}"))
    return "\nx2v-gateway is ready.\n" + "".join(f"  {name:<10} {value}\n" for name, value in rows) + "\n"


@main.command("demo-node")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", default="./demo-node-data", show_default=True, type=click.Path(path_type=Path))
@click.option("--job-seconds", default=0.0, show_default=True, type=float, help="Minimum time each task takes")
@click.option("--max-queue-size", default=10, show_default=True, type=int)
@click.option("--tasks", default="s2v,i2v,t2v,flf2v", show_default=True, help="Task types it accepts")
def demo_node(host: str, port: int, data_dir: Path, job_seconds: float, max_queue_size: int, tasks: str) -> None:
    """Serve the LightX2V self-hosted API on the CPU, rendering placeholder videos.

    Example: x2v-gateway demo-node --port 8001
    """
    from .demo import build_demo_server

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_demo_server(
        host, port, data_dir, job_seconds=job_seconds, max_queue_size=max_queue_size,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
    )
    server.run()


@main.command("copy-blobs")
@click.option("--env-file", default=".env", show_default=True, help="Settings file read under the environment")
def copy_blobs_command(env_file: str) -> None:
    """Copy the data directory's blobs into the bucket X2V_BLOBS names (again: only what is missing).

    Example: X2V_BLOBS=s3://x2v/blobs x2v-gateway copy-blobs
    """
    import asyncio
    import time

    from .blobs import BlobStoreUnavailable
    from .blobs.migrate import CopyProgress, copy_local_to_bucket

    try:
        settings = load_settings(env_file=env_file)
    except SettingsError as exc:
        click.echo(f"x2v-gateway: {exc}", err=True)
        sys.exit(2)
    if settings.s3 is None:
        click.echo("x2v-gateway: X2V_BLOBS names no bucket (s3://bucket/prefix) to copy into", err=True)
        sys.exit(2)
    said = [0.0]

    def progress(p: CopyProgress) -> None:
        if p.done == p.total or time.monotonic() - said[0] >= 1:
            said[0] = time.monotonic()
            click.echo(f"  {p.done}/{p.total} blobs: {p.copied} copied ({p.bytes_copied / 1e6:,.1f} MB),"
                       f" {p.skipped} there already", err=True)

    click.echo(f"Copying {settings.blob_dir} into {settings.blobs} ...", err=True)
    try:
        done = asyncio.run(copy_local_to_bucket(settings, progress))
    except BlobStoreUnavailable as exc:
        click.echo(f"x2v-gateway: {exc.detail}; run the command again to go on", err=True)
        _exit_past_obstore(1)
    click.echo(f"Copied {done.copied} blobs ({done.bytes_copied / 1e6:,.1f} MB); {done.skipped} were"
               " in the bucket already.")
    _exit_past_obstore(0)


# -- API keys -------------------------------------------------------------------------------------


def _open_auth(env_file: str):  # -> tuple[Auth, JobStore]
    from .auth import Auth
    from .store import JobStore

    try:
        settings = load_settings(env_file=env_file)
    except SettingsError as exc:
        click.echo(f"x2v-gateway: {exc}", err=True)
        sys.exit(2)
    store = JobStore(settings.store_location)
    return Auth(settings, store), store


def _api_error_exit(exc: Exception) -> None:
    """A refusal the API would answer with a 4xx, said on the command line."""
    click.echo(f"x2v-gateway: {getattr(exc, 'message', exc)}", err=True)
    sys.exit(1)


def _actor() -> str:
    import getpass

    try:
        return f"cli ({getpass.getuser()})"
    except Exception:  # no user name for this uid (a container)
        return "cli"


def _rate(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from .auth import parse_rate

    if value is None:
        return None
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_env_file_option = click.option(
    "--env-file", default=".env", show_default=True, help="Settings file read under the environment (for X2V_DATA_DIR)"
)


@main.group()
def keys() -> None:
    """API keys: make, list and revoke them (on the gateway's data directory)."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for")
@click.option("--admin", is_flag=True, help="May see every job, manage nodes and keys")
@click.option("--daily-quota", type=click.IntRange(0), help="Jobs it may submit per UTC day")
@click.option("--max-concurrent", type=click.IntRange(1), help="Most of its jobs on nodes at once; the rest wait queued")
@click.option("--rate", callback=_rate, help="API requests it may make, e.g. 60/min, 2/s or 600/h")
@click.option("--webhook", help="Default webhook URL of its jobs that name none")
@click.option("--webhook-events", help="Events the default webhook gets, comma-separated (queued, started, succeeded, failed, cancelled, batch.finished)")
@_env_file_option
def create_key(name: str, admin: bool, daily_quota: int | None, max_concurrent: int | None,
               rate: float | None, webhook: str | None, webhook_events: str | None, env_file: str) -> None:
    """Make an API key and print it, once: the gateway keeps only its hash. Its webhook
    signing secret is printed once too, on stderr.

    The key goes to stdout and everything else to stderr, so a script can keep it:

    Example: x2v-gateway keys create --name alice --daily-quota 200 --max-concurrent 2 --rate 60/min

    Example: x2v-gateway keys create --name ci --webhook https://ci.example.com/x2v --webhook-events succeeded,failed
    """
    import asyncio

    from .schemas import ApiError
    from .store import KeyNameTaken
    from .webhooks import new_key_webhook

    auth, store = _open_auth(env_file)
    try:
        columns, secret = asyncio.run(new_key_webhook(webhook, webhook_events, private_ok=auth.settings.private_urls))
        key, row = asyncio.run(auth.create_key(
            name=name, admin=admin, daily_quota=daily_quota, max_concurrent=max_concurrent,
            rate_per_min=rate, actor=_actor(), source="cli", webhook=columns,
        ))
    except (KeyNameTaken, ApiError) as exc:
        _api_error_exit(exc)
    finally:
        store.close()
    click.echo(f"Made {'an admin' if admin else 'a'} key {row['id']} ({name}). It is shown this once:", err=True)
    click.echo(key)
    click.echo("Use it as `Authorization: Bearer <key>`, or sign in to the dashboard with it.", err=True)
    click.echo(f"Its webhook signing secret, shown this once too: {secret}", err=True)


def _key_webhooks(auth, key: str):  # -> tuple[dict, JobWebhooks]
    """The key named (by id or name) and the webhooks of its jobs; exits when there is none."""
    import asyncio

    from .webhooks import JobWebhooks

    row = asyncio.run(auth.find_key(key))
    if row is None:
        click.echo(f"x2v-gateway: no key {key!r} (see `{cli_command()} keys list`)", err=True)
        sys.exit(1)
    return row, JobWebhooks(auth.store, private_ok=auth.settings.private_urls)


@keys.command("update")
@click.argument("key")
@click.option("--webhook", help="Default webhook URL of its jobs that name none ('' removes it)")
@click.option("--webhook-events", help="Events the default webhook gets, comma-separated")
@_env_file_option
def update_key(key: str, webhook: str | None, webhook_events: str | None, env_file: str) -> None:
    """Change a key's default webhook, by id or name (new jobs use it within 2 s).

    Example: x2v-gateway keys update alice --webhook https://hooks.example.com/x2v --webhook-events succeeded,failed
    """
    import asyncio

    from .schemas import ApiError
    from .webhooks import set_key_default

    if webhook is None:
        raise click.UsageError("say what to change: --webhook URL (or '' to remove it)")
    auth, store = _open_auth(env_file)
    try:
        row, hooks = _key_webhooks(auth, key)
        asyncio.run(set_key_default(store, hooks, row["id"], webhook or None, webhook_events, _actor()))
    except ApiError as exc:
        _api_error_exit(exc)
    finally:
        store.close()
    click.echo(f"Key {row['id']} ({row['name']}): " + ("default webhook set." if webhook else "no default webhook."))


@keys.command("rotate-webhook-secret")
@click.argument("key")
@click.option("--keep-previous-hours", default=24.0, show_default=True, type=click.FloatRange(0, 720),
              help="Hours the secret it replaces still signs too (0: it stops at once)")
@_env_file_option
def rotate_webhook_secret(key: str, keep_previous_hours: float, env_file: str) -> None:
    """Make a new webhook signing secret for a key and print it, once (alone on stdout).

    Example: x2v-gateway keys rotate-webhook-secret alice --keep-previous-hours 48
    """
    import asyncio

    from .webhooks import rotate_secret

    auth, store = _open_auth(env_file)
    try:
        row, hooks = _key_webhooks(auth, key)
        made = asyncio.run(rotate_secret(store, hooks, row["id"], _actor(), keep_previous_hours=keep_previous_hours))
    finally:
        store.close()
    assert made is not None
    click.echo(f"New webhook signing secret of key {row['id']} ({row['name']}), shown this once:", err=True)
    click.echo(made[0])
    if made[1]:
        click.echo(f"The previous secret signs too for {keep_previous_hours:g} more hours.", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key")
@_env_file_option
def list_keys(as_json: bool, env_file: str) -> None:
    """Every key with its limits and today's jobs (never the keys themselves).

    Example: x2v-gateway keys list
    """
    import asyncio
    import json
    import time

    auth, store = _open_auth(env_file)
    try:
        async def read() -> list[dict]:
            rows = await store.keys()
            for row in rows:
                row["jobs_today"] = await auth.jobs_today(row["id"])
            return rows

        rows = asyncio.run(read())
    finally:
        store.close()
    if as_json:
        for row in rows:
            row.pop("key_hash")
            click.echo(json.dumps(row))
        return

    def when(ts: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) if ts else "-"

    def limit(value: object, unit: str = "") -> str:
        return "-" if value is None else f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"

    header = ("id", "name", "starts", "admin", "quota/day", "concurrent", "rate", "today", "created (UTC)", "revoked (UTC)")
    table = [header] + [
        (r["id"], r["name"], r["prefix"] or "-", "yes" if r["admin"] else "no", limit(r["daily_quota"]),
         limit(r["max_concurrent"]), limit(r["rate_per_min"], "/min"), str(r["jobs_today"]),
         when(r["created_at"]), when(r["revoked_at"]))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


@keys.command("revoke")
@click.argument("key")
@_env_file_option
def revoke_key(key: str, env_file: str) -> None:
    """Revoke a key, by id or name: it stops working at once and its dashboard sessions end.

    Example: x2v-gateway keys revoke alice
    """
    import asyncio

    auth, store = _open_auth(env_file)
    try:
        row = asyncio.run(auth.find_key(key))
        if row is None or row["revoked_at"] is not None:
            click.echo(f"x2v-gateway: no active key {key!r} (see `{cli_command()} keys list`)", err=True)
            sys.exit(1)
        # The API refuses these two (they would lock every admin out); on the server the
        # operator may, and is told what it means.
        asyncio.run(auth.revoke_key(row["id"], _actor(), keep_admin=False))
        keys = store.read_blocking(lambda r: r.keys())
        admins_left = sum(1 for k in keys if k["admin"] and k["revoked_at"] is None)
    finally:
        store.close()
    click.echo(f"Revoked key {row['id']} ({row['name']}).")
    if row["source"] == "env":
        click.echo("It was the key in X2V_ADMIN_KEY: it stays revoked, even after a restart. Set a"
                   " new X2V_ADMIN_KEY and restart to have an admin key there again.", err=True)
    if row["admin"] and not admins_left:
        click.echo("No admin key works now: nobody can manage keys or nodes through the API until"
                   f" you make one with `{cli_command()} keys create --admin --name NAME`.", err=True)


# -- the client: submit, watch, download, cancel, retry (client/) --------------------------------

from .client import COMMANDS as _CLIENT_COMMANDS  # noqa: E402 (registered after the server's)

for _command in _CLIENT_COMMANDS:
    main.add_command(_command)

from .store_cli import migrate_store_command  # noqa: E402

main.add_command(migrate_store_command)


if __name__ == "__main__":
    main()
