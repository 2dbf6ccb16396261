"""A content-addressed blob store: every input and result file, stored once by its sha256.

One portrait used by 100 jobs is one file. Files are written to a temporary name while their hash
is computed on the fly, then renamed into place, so a reader never sees half a blob and a crash
leaves only a temporary file that the next start removes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO


class BlobTooLarge(Exception):
    """More bytes arrived than the caller allowed."""


class BlobWriter:
    """Write a blob in chunks; `commit()` gives its sha256 and size, `discard()` drops it."""

    def __init__(self, store: BlobStore, limit: int | None = None) -> None:
        self._store = store
        self._limit = limit
        self._hash = hashlib.sha256()
        self.size = 0
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._tmp = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._limit is not None and self.size > self._limit:
            raise BlobTooLarge(self.size)
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self) -> tuple[str, int]:
        self._file.close()
        sha = self._hash.hexdigest()
        dest = self._store.path(sha)
        if dest.exists():
            self._tmp.unlink()  # the same bytes are already stored
        else:
            dest.parent.mkdir(exist_ok=True)
            os.replace(self._tmp, dest)
        return sha, self.size

    def discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    @property
    def tmp_path(self) -> Path:
        """Where the bytes are until commit (for checks that must run before accepting them)."""
        self._file.flush()
        return self._tmp


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of writes interrupted by a crash: never referenced by any job.
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def writer(self, limit: int | None = None) -> BlobWriter:
        return BlobWriter(self, limit)

    def adopt(self, path: Path) -> tuple[str, int]:
        """Move a finished file (a downloaded result) into the store; return its sha256 and size."""
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
        sha, size = digest.hexdigest(), path.stat().st_size
        dest = self.path(sha)
        dest.parent.mkdir(exist_ok=True)
        os.replace(path, dest)
        return sha, size

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize
