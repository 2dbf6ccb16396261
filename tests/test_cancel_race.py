"""A wait that is cancelled in the same loop turn as what it waits for arrives still ends
cancelled. On Python 3.11 `asyncio.wait_for` loses that cancel, which once left the gateway's
webhook loop running after `stop()` cancelled it, and the gateway hanging on shutdown."""

from __future__ import annotations

import asyncio

import pytest

from x2v_gateway.notify import Notifier


def test_a_wait_cancelled_as_its_event_is_set_ends_cancelled() -> None:
    asyncio.run(_wait_cancelled_as_its_event_is_set())


async def _wait_cancelled_as_its_event_is_set() -> None:
    notifier = Notifier()
    waiting = asyncio.create_task(notifier.wait("job-1", 30.0))
    await asyncio.sleep(0)  # it waits now
    notifier.changed("job-1")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


def test_a_read_of_changes_cancelled_as_one_arrives_ends_cancelled() -> None:
    asyncio.run(_read_cancelled_as_a_change_arrives())


async def _read_cancelled_as_a_change_arrives() -> None:
    notifier = Notifier()
    with notifier.listen() as changes:
        reading = asyncio.create_task(changes.next(quiet=30.0, gather=0.0))
        await asyncio.sleep(0)
        notifier.changed("job-1")
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
