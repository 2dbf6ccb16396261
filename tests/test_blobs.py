"""The blob store, in-process, on both backends: a local directory and a real S3 server
(SeaweedFS on loopback, tests/s3_server.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import subprocess
import sys

import pytest

from x2v_gateway.blobs import BlobStore, BlobStoreUnavailable, LocalBlobStore, S3BlobStore
from x2v_gateway.blobs.migrate import copy_blobs
from x2v_gateway.settings import S3Config

import loopback


def _s3(server, tmp_path, **options) -> S3BlobStore:
    options.setdefault("prefix", f"unit-{secrets.token_hex(4)}")
    config = S3Config(
        bucket=server.bucket, endpoint=server.endpoint, access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key, **options,
    )
    return S3BlobStore(config, tmp_path / "spool")


@pytest.fixture(params=["local", "s3"])
def blobs(request, tmp_path) -> BlobStore:
    if request.param == "local":
        return BlobStore(tmp_path / "blobs")
    return _s3(request.getfixturevalue("s3_server"), tmp_path)


async def _write(blobs: BlobStore, data: bytes):
    writer = blobs.writer()
    for i in range(0, len(data), 70_000):  # odd-sized chunks, as a socket delivers them
        writer.write(data[i:i + 70_000])
        await writer.drain()
    return writer


async def _read(blobs: BlobStore, sha: str, **window) -> bytes:
    blob = await blobs.open(sha)
    assert blob is not None
    return b"".join([chunk async for chunk in blob.chunks(**window)])


@pytest.mark.parametrize("size", [1, 4095, 5 * 1024 * 1024 + 12345, 17 * 1024 * 1024 + 3])
def test_a_blob_is_kept_once_under_its_sha256_with_exactly_its_bytes(blobs, size):
    # Full 4 MiB blocks bypass the page cache (O_DIRECT); the tail does not. Past 8 MiB, the S3
    # store uploads in parts. Whatever the size, the blob and its address are exactly the bytes.
    data = os.urandom(size)

    async def scenario():
        writer = await _write(blobs, data)
        assert (await writer.written()).read_bytes() == data  # complete for the checks before commit
        sha, stored = await writer.commit()
        assert (sha, stored) == (hashlib.sha256(data).hexdigest(), size)
        assert await _read(blobs, sha) == data
        again = await _write(blobs, data)
        assert await again.commit() == (sha, size)  # the same bytes: kept once
        discarded = await _write(blobs, b"x" + data)
        discarded.discard()
        blobs.writer_thread.submit(lambda: None).result()  # the duplicate's removal has run
        assert [p.name for p in blobs.tmp_dir.iterdir()] == []
        await blobs.delete([sha, "0" * 64])  # one kept, one never was: no error
        assert await blobs.open(sha) is None and not await blobs.exists(sha)

    asyncio.run(scenario())


def test_ranged_reads_give_the_window_in_exact_chunks(blobs):
    # A base64 encoder needs every chunk but the last to be a multiple of 3 bytes long.
    data = os.urandom(3 * 1024 * 1024 + 11)

    async def scenario():
        sha, _ = await (await _write(blobs, data)).commit()
        blob = await blobs.open(sha)
        assert blob.size == len(data)
        chunks = [c async for c in blob.chunks(3 * 64 * 1024, start=1000, length=2 * 1024 * 1024)]
        assert b"".join(chunks) == data[1000:1000 + 2 * 1024 * 1024]
        assert {len(c) for c in chunks[:-1]} == {3 * 64 * 1024}
        assert await _read(blobs, sha, start=len(data) - 10) == data[-10:]

    asyncio.run(scenario())


def test_adopt_moves_a_finished_file_in(blobs, tmp_path):
    path = tmp_path / "result.mp4"
    data = os.urandom(100_000)
    path.write_bytes(data)

    async def scenario():
        sha, size = await blobs.adopt(path)
        assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
        assert await _read(blobs, sha) == data

    asyncio.run(scenario())
    blobs.writer_thread.submit(lambda: None).result()
    assert not path.exists()


def test_a_local_store_serves_its_own_files_and_never_redirects(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    assert isinstance(blobs, LocalBlobStore)

    async def scenario():
        sha, _ = await (await _write(blobs, b"hello")).commit()
        assert blobs.path(sha).read_bytes() == b"hello"
        assert await blobs.download_url(sha, "a.mp4", "video/mp4") is None

    asyncio.run(scenario())


def test_presigned_download_url_fetches_the_blob_without_the_secret(s3_server, tmp_path):
    blobs = _s3(s3_server, tmp_path, presign_minutes=5)

    async def scenario():
        sha, _ = await (await _write(blobs, b"a video")).commit()
        return await blobs.download_url(sha, "job.mp4", "video/mp4")

    url = asyncio.run(scenario())
    assert s3_server.secret_access_key not in url
    assert loopback.get(url).content == b"a video"
    assert loopback.get(url, headers={"Range": "bytes=2-4"}).content == b"vid"


def test_a_refused_key_is_a_503_that_names_no_secret(s3_server, tmp_path):
    config = S3Config(
        bucket=s3_server.bucket, endpoint=s3_server.endpoint, access_key_id=s3_server.access_key_id,
        secret_access_key="wrong-" + secrets.token_hex(8),
    )
    blobs = S3BlobStore(config, tmp_path / "spool")

    async def scenario():
        writer = await _write(blobs, b"bytes")
        with pytest.raises(BlobStoreUnavailable) as refused:
            await writer.commit()
        return refused.value

    error = asyncio.run(scenario())
    assert error.status == 503 and "file store" in error.message
    assert config.secret_access_key not in f"{error.message} {error.detail}"
    assert "403" in error.detail or "Permission" in error.detail
    assert [p.name for p in blobs.tmp_dir.iterdir()] == []  # the spooled copy is not left behind


def test_copying_a_local_store_into_a_bucket_copies_each_blob_once(s3_server, tmp_path):
    local = BlobStore(tmp_path / "data" / "blobs")
    data = [os.urandom(n) for n in (10, 70_000, 9 * 1024 * 1024)]

    async def keep_all() -> list[str]:
        return [(await (await _write(local, d)).commit())[0] for d in data]

    shas = asyncio.run(keep_all())
    prefix = f"moved-{secrets.token_hex(4)}"
    target = _s3(s3_server, tmp_path, prefix=prefix)
    seen = []
    first = asyncio.run(copy_blobs(local, target, seen.append))
    assert (first.total, first.copied, first.skipped, first.bytes_copied) == (3, 3, 0, sum(map(len, data)))
    assert seen[-1].done == 3
    assert {k.rsplit("/", 1)[-1] for k in s3_server.keys(prefix)} == set(shas)
    assert [local.path(sha).read_bytes() for sha in shas] == data  # the local files stay

    # Again, as the command a person runs twice: nothing is copied twice.
    env = {**os.environ, "X2V_DATA_DIR": str(tmp_path / "data"), **s3_server.settings(prefix)}
    again = subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "copy-blobs", "--env-file", "/nonexistent"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert "Copied 0 blobs (0.0 MB); 3 were in the bucket already." in again.stdout
    assert "3/3 blobs" in again.stderr
    assert s3_server.secret_access_key not in again.stdout + again.stderr
