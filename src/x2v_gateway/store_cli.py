"""`x2v-gateway migrate-store`: a SQLite deployment's store copied into PostgreSQL, with progress."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .settings import SettingsError, cli_command, load_settings, redact_url


@click.command("migrate-store")
@click.option("--to", "target", required=True, metavar="postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
              help="The PostgreSQL database to copy into (made up to date first; empty, or a copy"
                   " of this same deployment from an earlier run)")
@click.option("--from", "source", type=click.Path(path_type=Path), default=None,
              help="The SQLite file to copy [default: gateway.db in X2V_DATA_DIR]")
@click.option("--env-file", default=".env", show_default=True)
def migrate_store_command(target: str, source: Path | None, env_file: str) -> None:
    """Copy a SQLite deployment's store (jobs, batches, keys, sessions, quotas, nodes, audit log)
    into PostgreSQL. Stop the gateway first; running it again is safe and copies what changed.

    Example:

        x2v-gateway migrate-store --to postgresql://x2v:secret@db.internal:5432/x2v

    Then set X2V_DATABASE_URL to that URL and start the gateway (or its replicas).
    """
    import psycopg
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .store import is_database_url
    from .store.migrate import BLOB_STEPS, MigrationRefused, count_rows, migrate_store

    try:
        settings = load_settings(env_file=env_file)
    except SettingsError as exc:
        click.echo(f"x2v-gateway: {exc}", err=True)
        sys.exit(2)
    if not is_database_url(target):
        raise click.BadParameter("must be a postgresql:// URL", param_hint="--to")
    source = source or settings.db_path
    shown = redact_url(target)
    console = Console(stderr=True)
    try:
        totals = count_rows(source)
        with Progress(
            TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console,
        ) as progress:
            bars = {name: progress.add_task(name, total=n) for name, n in totals.items()}
            copied = migrate_store(source, target, lambda table, n: progress.advance(bars[table], n))
    except FileNotFoundError as exc:
        click.echo(f"x2v-gateway: {exc} (--from names another file)", err=True)
        sys.exit(1)
    except MigrationRefused as exc:
        click.echo(f"x2v-gateway: {exc}", err=True)
        sys.exit(1)
    except psycopg.Error as exc:
        # psycopg's messages name the host and user, never the password.
        click.echo(f"x2v-gateway: PostgreSQL at {shown}: {str(exc).strip()}", err=True)
        sys.exit(1)
    click.echo(f"Copied {source} into {shown}:")
    for table, rows in copied.rows.items():
        click.echo(f"  {table:<12} {rows:>9} rows ({copied.new[table]} new)")
    for name in copied.skipped:
        click.echo(f"  {name:<12} not copied: this version does not know the table", err=True)
    for step in BLOB_STEPS:
        click.echo("  " + step(settings, console))
    if not BLOB_STEPS:
        click.echo(f"  blobs        stay in {settings.blob_dir.resolve()} (every replica needs them there)")
    click.echo(f"Next: X2V_DATABASE_URL={shown} in .env, then `{cli_command()} serve`.")
