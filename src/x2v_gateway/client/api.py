"""The gateway's job API seen from a script: one class, `GatewayAPI`, over httpx.

Uploads stream from disk and downloads stream to disk, a chunk at a time, so a 2 GB input costs
no memory. A request is repeated only when repeating it is safe: reads, and submits, which carry
an Idempotency-Key and reopen their files from disk (a streamed body cannot be sent twice). Every
failure becomes a `ClientError` carrying the exit code a shell script sees.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

# Exit codes (README, Client): what a shell script can branch on.
OK = 0
SOME_FAILED = 1  # some jobs failed or were cancelled
USAGE = 2  # a bad option, a missing file, a manifest that cannot be read (click uses 2 too)
UNREACHABLE = 3  # no answer from the gateway: not running, wrong X2V_URL, network down
AUTH_REFUSED = 4  # no key, or the gateway refused it (401), or it may not do this (403)
REFUSED = 5  # the gateway refused a request: an unknown job or batch, an input it cannot take
UNFINISHED = 6  # `--no-wait` and some jobs have not finished yet
INTERRUPTED = 130  # Ctrl-C: run the same command again to go on

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1024 * 1024
# A busy gateway (or its rate limit) is waited out this long in all before giving up; a quota
# that resets at midnight is not.
PATIENCE_SECONDS = 120.0
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ClientError(Exception):
    """Why the command stops, and the exit code it stops with."""

    def __init__(self, message: str, code: int = REFUSED, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status  # the gateway's HTTP status, when it answered


class _Counted:
    """A file handed to httpx's multipart encoder that reports each chunk read, so the upload
    has a progress bar; httpx reads it 64 KiB at a time, and finds its size with fstat."""

    def __init__(self, handle: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        self._handle, self._on_bytes = handle, on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._on_bytes(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()


class GatewayAPI:
    """`/api/v1` of one gateway, with one key. Thread-safe: uploads run on several threads."""

    def __init__(self, url: str, key: str | None, *, timeout: float = 60.0) -> None:
        if not key:
            raise ClientError("no API key: set X2V_KEY (or pass --key); `keys create` on the gateway makes one",
                              AUTH_REFUSED)
        if not key.isascii() or not key.isprintable():
            raise ClientError("X2V_KEY / --key: an API key is printable ASCII; check what was pasted", USAGE)
        self.url = url.rstrip("/")
        self._me: dict[str, Any] | None = None
        # Until the gateway has answered once, it is not waited for: a wrong URL is said at once
        # (exit 3), while an outage in the middle of a run is waited out.
        self._answered = False
        try:
            # httpx's timeouts are per step (connect, each chunk written, each chunk read), not
            # for the whole request: a 2 GB upload on a slow link is fine, a silent gateway is not.
            self.http = httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                timeout=httpx.Timeout(timeout, connect=10.0),
            )
        except (ValueError, httpx.InvalidURL) as exc:
            raise ClientError(f"--url / X2V_URL: {url!r} is not a URL ({exc})", USAGE) from None
        if self.http.base_url.scheme not in ("http", "https") or not self.http.base_url.host:
            raise ClientError(f"--url / X2V_URL: {url!r} is not an http(s) URL", USAGE)

    def close(self) -> None:
        self.http.close()

    # -- requests --------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> httpx.Response:
        """One request, repeated while the gateway is unreachable, busy or rate-limiting (when
        `retry`, for up to PATIENCE_SECONDS); a refusal is a ClientError with the gateway's own
        message."""
        give_up = time.monotonic() + (PATIENCE_SECONDS if self._answered else 0)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.http.request(method, path, **kwargs)
                self._answered = True
            except httpx.TransportError as exc:
                if retry and time.monotonic() < give_up:
                    self.pause(attempt, None, give_up)
                    continue
                raise ClientError(f"the gateway at {self.url} does not answer ({type(exc).__name__}:"
                                  f" {exc or 'no details'}); is it running? (--url / X2V_URL)", UNREACHABLE) from None
            if response.status_code in (429, 502, 503, 504) and retry:
                wait = _retry_after(response)
                if wait is not None and time.monotonic() + wait < give_up:
                    self.pause(attempt, wait, give_up)
                    continue
            if response.status_code < 400:
                return response
            raise _refusal(response, self.url)

    @staticmethod
    def pause(attempt: int, wait: float | None, give_up: float) -> None:
        # Exponential backoff with jitter, or what Retry-After said; never past the patience.
        delay = wait if wait is not None else min(10.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0)
        time.sleep(max(0.0, min(delay, give_up - time.monotonic())))

    def get(self, path: str, **params: Any) -> Any:
        return self._send("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def me(self) -> dict[str, Any]:
        """The key's own record (read once): `submit` checks the URL and the key with it before
        it reads a file."""
        if self._me is None:
            self._me = self.get("/api/v1/me")
        return self._me

    def batch_jobs(self, batch_id: str) -> list[dict[str, Any]]:
        """Every job of the batch this key may see, oldest first, a page of 500 at a time."""
        jobs: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.get("/api/v1/jobs", batch_id=batch_id, limit=500, cursor=cursor)
            jobs += page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return jobs[::-1]

    def submit(
        self, fields: dict[str, str], files: dict[str, Path], idempotency_key: str,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> tuple[dict[str, Any], bool]:
        """Submit a job as a multipart upload; (job, made now). Its Idempotency-Key makes a
        repeat safe: after a lost answer, or in a second run, it returns the job made before."""
        give_up = time.monotonic() + PATIENCE_SECONDS
        attempt = 0
        while True:
            attempt += 1
            sent = 0

            def count(n: int) -> None:
                nonlocal sent
                sent += n
                on_bytes(n)

            handles = [path.open("rb") for path in files.values()]
            try:
                upload = {role: (path.name, _Counted(handle, count), "application/octet-stream")
                          for (role, path), handle in zip(files.items(), handles)}
                response = self._send("POST", "/api/v1/jobs", retry=False, data=fields, files=upload,
                                      headers={"Idempotency-Key": idempotency_key})
                return response.json(), response.status_code == 201
            except ClientError as exc:
                on_bytes(-sent)  # the next attempt sends them again
                if exc.code == UNREACHABLE and time.monotonic() < give_up:
                    self.pause(attempt, None, give_up)
                    continue
                if isinstance(exc, _Busy) and exc.wait is not None and time.monotonic() + exc.wait < give_up:
                    self.pause(attempt, exc.wait, give_up)
                    continue
                raise
            finally:
                for handle in handles:
                    handle.close()

    def cancel_job(self, job_id: str, purge: bool = False) -> dict[str, Any]:
        return self._send("DELETE", f"/api/v1/jobs/{job_id}", params={"purge": "true"} if purge else None).json()

    def cancel_batch(self, batch_id: str, purge: bool = False) -> dict[str, Any]:
        return self._send("DELETE", f"/api/v1/batches/{batch_id}", params={"purge": "true"} if purge else None).json()

    def retry(self, job_id: str) -> dict[str, Any]:
        # A retry is not idempotent (the second would be refused, 409): sent once.
        return self._send("POST", f"/api/v1/jobs/{job_id}/retry", retry=False).json()

    def download(self, job: dict[str, Any], target: Path, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        """The job's video into `target`, through `target.part`, checked against the sha256 the
        API reports before it takes the final name: a file under that name is whole."""
        result = job["result"]
        part = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        try:
            with self.http.stream("GET", result["url"]) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _refusal(response, self.url)
                with part.open("wb") as out:
                    for chunk in response.iter_bytes(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        on_bytes(len(chunk))
        except httpx.TransportError as exc:
            raise ClientError(f"the download of {job['id']}'s video broke off ({exc}); run again to go on",
                              UNREACHABLE) from None
        if digest.hexdigest() != result["sha256"]:
            part.unlink(missing_ok=True)
            raise ClientError(f"the video of {job['id']} arrived damaged (sha256 differs); run again", UNREACHABLE)
        os.replace(part, target)


class _Busy(ClientError):
    """429 or 503: worth waiting for when it says how long."""

    def __init__(self, message: str, wait: float | None, status: int) -> None:
        super().__init__(message, REFUSED, status)
        self.wait = wait


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return 1.0 if response.status_code in (502, 503, 504) else None


def _refusal(response: httpx.Response, url: str) -> ClientError:
    """The gateway's `{"error": {"message", "field"}}` as a ClientError with its exit code."""
    try:
        error = response.json()["error"]
        message = error["message"] + (f" ({error['field']})" if error.get("field") else "")
    except (ValueError, KeyError, TypeError):
        message = f"{response.status_code} {response.reason_phrase}"
        if response.status_code == 404:
            message += f": {url} has no {response.request.url.path}; is it an x2v-gateway? (--url / X2V_URL)"
    status = response.status_code
    if status == 401:
        return ClientError(f"the gateway refused the key: {message} (X2V_KEY / --key)", AUTH_REFUSED, status)
    if status == 403:
        return ClientError(f"this key may not do that: {message}", AUTH_REFUSED, status)
    if status in (429, 503):
        return _Busy(f"the gateway is busy: {message}", _retry_after(response), status)
    return ClientError(message, REFUSED, status)


def poll(api: GatewayAPI, batch_id: str, interval: float) -> Iterator[list[dict[str, Any]]]:
    """The batch's jobs, read again every `interval` seconds, for as long as the caller asks."""
    while True:
        started = time.monotonic()
        yield api.batch_jobs(batch_id)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
