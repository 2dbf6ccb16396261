"""The `x2v-gateway` command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .settings import SettingsError, load_settings


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

    from .app import create_app

    try:
        settings = load_settings(env_file=env_file)
    except SettingsError as exc:
        click.echo(f"x2v-gateway: {exc}", err=True)
        sys.exit(2)
    app = create_app(settings)
    click.echo(f"x2v-gateway listening on http://{settings.host}:{settings.port} (data in {settings.data_dir})")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())


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
    from .demo_node import build_demo_server

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_demo_server(
        host, port, data_dir, job_seconds=job_seconds, max_queue_size=max_queue_size,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
    )
    server.run()


if __name__ == "__main__":
    main()
