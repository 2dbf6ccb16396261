"""The media checker: uploads and results are parsed in a helper process that may die or hang."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from pathlib import Path

import pytest

from x2v_gateway.checker import CheckFailed, MediaChecker, MediaError


def _pipe(path: Path) -> Path:
    """A named pipe: a check of it waits until the test writes to it (forever if it never does)."""
    os.mkfifo(path)
    return path


def _reading(pipe: Path) -> bool:
    """Whether a check is opening the pipe. (Opening it to write, without blocking, tells, and
    closing it again lets that open go on, to an empty file.)"""
    try:
        fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        assert exc.errno == errno.ENXIO  # no reader
        return False
    os.close(fd)
    return True


async def _end(check: asyncio.Task, pipe: Path) -> None:
    """Let the check of `pipe` end: every time it opens the pipe, it finds an empty file."""
    while not check.done():
        _reading(pipe)
        await asyncio.sleep(0.02)
    with pytest.raises(MediaError, match="is not a readable image"):
        check.result()


def test_a_dead_or_stuck_helper_costs_one_check_and_is_replaced(media, tmp_path):
    checker = MediaChecker(timeout=30)
    try:
        assert asyncio.run(checker.inspect("image", media["face"])) == "png"
        first = checker.pid
        os.kill(first, signal.SIGKILL)  # as if a file had crashed FFmpeg
        assert asyncio.run(checker.inspect("audio", media["voice"])) == "wav"
        assert checker.pid not in (None, first)
        with pytest.raises(MediaError, match="is not a readable image"):
            asyncio.run(checker.inspect("image", media["not_image"]))
        with pytest.raises(FileNotFoundError):
            asyncio.run(checker.probe_video(media["face"].with_name("missing.mp4")))
        with pytest.raises(ValueError, match="no video stream"):
            asyncio.run(checker.probe_video(media["voice"]))
        # A check that outlasts the timeout kills the helper; the next check starts a new one.
        # Reading a pipe nobody writes to never ends, however fast the machine.
        checker.timeout = 1
        with pytest.raises(CheckFailed, match="could not be checked within 1 s"):
            asyncio.run(checker.inspect("audio", _pipe(tmp_path / "never.wav")))
        assert checker.pid is None
        checker.timeout = 30
        assert asyncio.run(checker.inspect("image", media["face2"])) == "png"
    finally:
        checker.close()


def test_the_gateway_itself_never_loads_the_media_libraries(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; import x2v_gateway.cli, x2v_gateway.app, x2v_gateway.jobs, x2v_gateway.dispatch;"
        " print(sorted({m.split('.')[0] for m in sys.modules} & {'av', 'PIL'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"


def test_one_keys_stuck_checks_leave_a_checker_for_everyone_else(media, tmp_path):
    """A tenant's files that keep checkers busy (a huge or hostile upload) hold at most all the
    checkers but one; another tenant's upload is checked meanwhile."""
    checker = MediaChecker(timeout=600, workers=2)
    first, second = _pipe(tmp_path / "first.png"), _pipe(tmp_path / "second.png")

    async def scenario() -> None:
        stuck = asyncio.create_task(checker.inspect("image", first, owner="key-a"))
        queued = asyncio.create_task(checker.inspect("image", second, owner="key-a"))
        while not _reading(first):
            await asyncio.sleep(0.02)
        # key-a's first check holds a checker; its second waits for it, not for a free checker.
        assert await asyncio.wait_for(checker.inspect("image", media["face"], owner="key-b"), 300) == "png"
        assert await asyncio.wait_for(checker.inspect("audio", media["voice"], owner="key-b"), 300) == "wav"
        assert not stuck.done() and not queued.done() and not _reading(second)
        await _end(stuck, first)
        # Its turn came when its first check ended.
        await _end(queued, second)

    try:
        asyncio.run(scenario())
    finally:
        checker.close()


def test_a_check_given_up_while_it_waits_for_a_checker_frees_its_turn(media, tmp_path):
    checker = MediaChecker(timeout=600, workers=1)
    pipe = _pipe(tmp_path / "slow.png")

    async def scenario() -> None:
        stuck = asyncio.create_task(checker.inspect("image", pipe, owner="key-a"))
        while not _reading(pipe):
            await asyncio.sleep(0.02)
        waiting = asyncio.create_task(checker.inspect("image", media["face"], owner="key-b"))
        await asyncio.sleep(0)
        waiting.cancel()  # its request went away
        await _end(stuck, pipe)
        assert await asyncio.wait_for(checker.inspect("image", media["face2"], owner="key-c"), 300) == "png"

    try:
        asyncio.run(scenario())
    finally:
        checker.close()
