"""The media checker: uploads and results are parsed in a helper process that may die or hang."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from x2v_gateway.checker import CheckFailed, MediaChecker, MediaError


def test_a_dead_or_stuck_helper_costs_one_check_and_is_replaced(media):
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
        checker.timeout = 0.001
        with pytest.raises(CheckFailed, match="could not be checked within"):
            asyncio.run(checker.inspect("audio", media["voice"]))
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
