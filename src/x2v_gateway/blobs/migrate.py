"""Copying a local blob store into another one (a bucket): when a deployment outgrows one machine.

Idempotent: a blob the target keeps already is skipped (one HEAD), so a copy interrupted halfway
is simply run again. The local files stay where they are; the copy never changes them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import Settings
from .base import BlobStore, BlobStoreUnavailable
from .local import LocalBlobStore

# Blobs copied at once: each upload holds at most its part buffers (blobs/s3.py), and a few at a
# time keep a bucket's round trips busy when most blobs are small images.
COPIES_AT_ONCE = 4


@dataclass
class CopyProgress:
    total: int  # blobs in the local store
    done: int = 0  # of them, looked at
    copied: int = 0  # ... and copied
    skipped: int = 0  # ... and already in the target
    bytes_copied: int = 0


async def copy_blobs(
    source: LocalBlobStore, target: BlobStore, progress: Callable[[CopyProgress], None] | None = None,
) -> CopyProgress:
    """Copy every blob of `source` into `target` (those it keeps already are skipped);
    `progress` is called after each blob. Raises BlobStoreUnavailable if the target fails."""
    paths = await asyncio.to_thread(_blob_files, source.root)
    state = CopyProgress(total=len(paths))
    pending = iter(paths)

    async def worker() -> None:
        for path in pending:
            sha = path.name
            if await target.exists(sha):
                state.skipped += 1
            else:
                size = await asyncio.to_thread(_stage, path, target.tmp_dir / f"copy-{sha}")
                await target._keep(target.tmp_dir / f"copy-{sha}", sha, size)
                state.copied += 1
                state.bytes_copied += size
            state.done += 1
            if progress is not None:
                progress(state)

    await asyncio.gather(*(worker() for _ in range(COPIES_AT_ONCE)))
    return state


def _blob_files(root: Path) -> list[Path]:
    """The blobs of a local store (`<root>/<ab>/<sha256>`), not its temporary files."""
    return sorted(
        path for path in root.glob("??/*")
        if len(path.name) == 64 and path.name.startswith(path.parent.name) and path.is_file()
    )


def _stage(path: Path, staged: Path) -> int:
    """A copy of a blob the target may consume: a hard link where they share a disk."""
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:
        shutil.copyfile(path, staged)
    return staged.stat().st_size


async def copy_local_to_bucket(settings: Settings, progress: Callable[[CopyProgress], None] | None = None) -> CopyProgress:
    """Every blob of the data directory's store into the bucket `X2V_BLOBS` names."""
    from . import open_blobs

    source, target = LocalBlobStore(settings.blob_dir), open_blobs(settings)
    try:
        return await copy_blobs(source, target, progress)
    finally:
        await target.aclose()
        await source.aclose()


def copy_step(settings: Settings, console: Any) -> str:
    """`migrate-store`'s step for the files (store/migrate.py BLOB_STEPS): with X2V_BLOBS naming
    a bucket, every local blob copied into it, with a progress bar; the line for the summary."""
    if settings.s3 is None:
        return (f"blobs        stay in {settings.blob_dir.resolve()} (every replica needs them there;"
                " or set X2V_BLOBS to a bucket and run this again)")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console) as bars:
        bar = bars.add_task("blobs", total=None)
        try:
            done = asyncio.run(copy_local_to_bucket(
                settings, lambda p: bars.update(bar, total=p.total, completed=p.done),
            ))
        except BlobStoreUnavailable as exc:
            return f"blobs        not all copied ({exc.detail}); run it again to go on"
    return (f"blobs        {done.copied} copied into {settings.blobs} ({done.bytes_copied / 1e6:,.1f} MB),"
            f" {done.skipped} there already")
