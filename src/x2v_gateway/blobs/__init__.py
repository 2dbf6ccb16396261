"""Content-addressed files (inputs and results): the interface (`BlobStore`, `base.py`), a local
directory (`local.py`, the default) and an S3-compatible bucket (`s3.py`, `X2V_BLOBS=s3://…`)."""

from __future__ import annotations

from ..settings import S3Config, Settings
from .base import BlobStore, BlobStoreUnavailable, BlobTooLarge, BlobWriter, StoredBlob
from .local import LocalBlobStore
from .s3 import S3BlobStore

BlobStore.default_backend = LocalBlobStore


def open_blobs(settings: Settings) -> BlobStore:
    """The blob store `X2V_BLOBS` names: a bucket, or (unset) the data directory's `blobs/`."""
    if settings.s3 is None:
        return LocalBlobStore(settings.blob_dir)
    return S3BlobStore(settings.s3, settings.blob_dir / "tmp")


__all__ = [
    "BlobStore", "BlobStoreUnavailable", "BlobTooLarge", "BlobWriter", "LocalBlobStore", "S3BlobStore",
    "S3Config", "StoredBlob", "open_blobs",
]
