"""Waiting for a job in the request that submits or reads it: `?wait=N` or `Prefer: wait=N`
(RFC 7240), and how the answer says what came of it.

`Preference-Applied: wait=N` says a `Prefer: wait` was honoured, N being the seconds actually
allowed (at most X2V_MAX_WAIT). `X2V-Wait: timeout` says the wait ended before the job did: the
job is in the body as it is then, not finished. A `Prefer` header that cannot be read, or whose
`wait` is not a number of whole seconds, is ignored, as RFC 7240 asks of preferences a server
does not understand: the request is answered at once, without `Preference-Applied`.
"""

from __future__ import annotations

import re

from ..store import Job

# RFC 7240: `wait = "wait" BWS "=" BWS delta-seconds`; delta-seconds is 1*DIGIT (RFC 9111).
_WAIT = re.compile(r'^\s*wait\s*=\s*"?(\d{1,9})"?\s*$', re.IGNORECASE | re.ASCII)


def prefer_wait(header: str | None) -> int | None:
    """The `wait` of a Prefer header, in seconds; None when it asks none or cannot be read."""
    if not header or len(header) > 1000:
        return None
    for preference in header.split(","):
        token = preference.split(";", 1)[0]  # a preference's own parameters say nothing of wait
        if (match := _WAIT.match(token)) is not None:
            return int(match.group(1))
    return None


def waited(query: float | None, prefer: int | None, max_wait: float) -> tuple[float | None, dict[str, str]]:
    """Seconds to wait (`?wait=` first, then `Prefer`), and the headers that say it was applied."""
    if query is not None:
        return query, {}
    if prefer is None:
        return None, {}
    applied = min(prefer, max_wait)
    return applied, {"preference-applied": f"wait={applied:g}"}


def wait_outcome(seconds: float | None, job: Job) -> dict[str, str]:
    """`X2V-Wait: timeout` when a wait was asked and the job had not finished when it ended."""
    return {"x2v-wait": "timeout"} if seconds and not job.finished else {}
