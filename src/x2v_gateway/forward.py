"""Sending a large upload on to a free node while it is still arriving.

Received whole, checked, and only then sent, a 1 GB voice-over spends twice its transfer time
on the wire before a node has it. So when a self-hosted node has a free slot and no queued job
waits for one, the gateway opens that node's `/form` submission as the first file of an API
upload begins, and copies each byte to the node as well as to the blob store.

Nothing about durability changes: the node gets the end of the body only after the job is kept,
checked and recorded as an attempt on that node (`UploadSink`), exactly as a queued job would be.
Whatever goes wrong before that (a bad field, a file that is not what it claims, a node that
drops the connection, a gateway crash) only drops an unfinished request, which never becomes a
task; the job, if it was accepted, is sent the ordinary way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dispatch import Dispatcher, UpstreamState
    from .store import Job
    from .upstream.base import UploadSink

log = logging.getLogger(__name__)

# How much of a file `sniff` looks at.
SNIFF_BYTES = 16
# Seconds between checks that no queued job waits for the slot a forwarded upload holds.
YIELD_CHECK_SECONDS = 1.0
# How much longer than the client's upload the form sent on may be: its part heads and the
# fields the gateway adds (seed, save_result_path) take a few hundred bytes more than the
# client's own; what is not needed is sent as an epilogue after the form (`open_form`).
FORM_SLACK_BYTES = 16 * 1024


def sniff(role: str, head: bytes) -> str | None:
    """The extension the media checker will most likely give a file that starts with `head`.

    The node names its copy after the file name's extension, which must be sent before the
    file's bytes, long before the checker has seen all of them. A wrong or missing guess costs
    only the forwarding: a job whose checked kind differs is sent the ordinary way.
    """
    if role != "audio":
        for magic, kind in _IMAGE_MAGIC:
            if head.startswith(magic):
                return kind
        return "webp" if head[:4] == b"RIFF" and head[8:12] == b"WEBP" else None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[4:8] == b"ftyp":
        return "m4a"
    for magic, kind in _AUDIO_MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:  # an ADTS header: raw AAC
            return "aac"
        if head[1] & 0xE0 == 0xE0:  # an MPEG audio frame
            return "mp3"
    return None


_IMAGE_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
]
_AUDIO_MAGIC = [(b"ID3", "mp3"), (b"fLaC", "flac"), (b"OggS", "ogg"), (b"\x1aE\xdf\xa3", "webm")]


class UploadForward:
    """Hooks for `read_multipart`: every file of one upload, copied to a node as it arrives.

    It starts at the first file, and only when the fields before it name the task (`task`
    first, as the API documents) and a node has room. It stops quietly whenever forwarding is not
    worth keeping up; the upload itself is never refused because of it. A slow upload must not
    keep a GPU idle: when a job queued meanwhile needs the slot it holds, it gives the slot up.
    """

    def __init__(self, dispatcher: Dispatcher, owner: str | None, size: int) -> None:
        """`size`: the client's Content-Length."""
        self._dispatcher = dispatcher
        self._owner = owner
        self._size = size
        self._state: UpstreamState | None = None
        self._upload: UploadSink | None = None
        self._tried = False
        self._stopped = False
        self._role: str | None = None
        self._head: bytearray | None = None  # the start of a file, until it is named
        self._watch: asyncio.Task[None] | None = None
        # Asking for a slot reads the store, which the parser's hooks cannot wait for: the hooks
        # of the chunk where the first file begins are kept here (one chunk at most), and played
        # once `drain` has the answer.
        self._wanted: tuple[str, str | None] | None = None
        self._early: list[tuple[str, tuple]] = []

    def file_begins(self, role: str, fields: dict[str, str]) -> None:
        if not self._tried:
            self._tried = True
            task = fields.get("task", "").strip()
            if task:
                self._wanted = (task, fields.get("upstream", "").strip() or None)
        if self._wanted is not None:
            self._early.append(("begin", (role,)))
            return
        self._role, self._head = role, bytearray()

    async def _reserve(self) -> None:
        assert self._wanted is not None
        (task, pinned), self._wanted = self._wanted, None
        early, self._early = self._early, []
        self._state = await self._dispatcher.reserve_for_upload(task, pinned, self._owner)
        if self._state is None or self._stopped:
            return
        self._upload = self._state.upstream.open_form(self._size + FORM_SLACK_BYTES, task)
        self._watch = asyncio.ensure_future(self._give_way_when_needed())
        for hook, args in early:
            if hook == "begin":
                self._role, self._head = args[0], bytearray()
            elif hook == "data":
                self.file_data(*args)
            else:
                self.file_ends()

    def file_data(self, data: bytes) -> None:
        if self._wanted is not None:
            self._early.append(("data", (data,)))
            return
        if self._upload is None or self._stopped:
            return
        if self._head is None:
            self._upload.write(data)
            return
        self._head += data
        if len(self._head) >= SNIFF_BYTES:
            self._name_file()

    def file_ends(self) -> None:
        if self._wanted is not None:
            self._early.append(("end", ()))
            return
        if self._upload is None or self._stopped:
            return
        if self._head is not None:
            self._name_file()
        if not self._stopped:
            self._upload.end_file()

    def _name_file(self) -> None:
        assert self._upload is not None and self._role is not None and self._head is not None
        kind = sniff(self._role, bytes(self._head))
        if kind is None:
            self._stopped = True
            return
        self._upload.begin_file(self._role, f"{self._role}.{kind}")
        self._upload.write(bytes(self._head))
        self._head = None

    async def drain(self) -> None:
        """After each chunk of the client's body: send on what the parser handed over."""
        if self._wanted is not None:
            await self._reserve()
        if self._upload is None:
            return
        if self._stopped or self._upload.broken:
            await self.close()
            return
        await self._upload.drain()

    async def _give_way_when_needed(self) -> None:
        """Every second, while the upload arrives (or stalls): is a queued job waiting for the
        slot it holds? Then forwarding ends, and the job goes through the queue like any other."""
        while self._state is not None:
            await asyncio.sleep(YIELD_CHECK_SECONDS)
            if self._state is not None and await self._dispatcher.reservation_blocks(self._state):
                log.info("an upload still arriving gave its slot on %s to a queued job", self._state.name)
                await self.close()

    def hand_over(self, job: Job) -> bool:
        """Let the dispatcher finish the submission of this just-created job; False (the job
        then waits in the queue) when the forwarded upload cannot be used for it."""
        state, upload = self._state, self._upload
        if (
            state is None or upload is None or self._stopped or upload.broken
            or self._dispatcher.states.get(state.name) is not state
            or job.task not in state.upstream.tasks or job.pinned not in (None, state.name)
        ):
            return False
        self._state = self._upload = None
        self._stop_watching()

        async def submit() -> None:
            try:
                await self._dispatcher.submit_reserved(job, state, upload.finish)
            finally:
                await upload.abort()  # only if the submission never got to finish it

        self._dispatcher.spawn(submit())
        log.info("job %s: upload sent on to %s while it arrived", job.id, state.name)
        return True

    def _stop_watching(self) -> None:
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        self._watch = None

    async def close(self) -> None:
        """Give the slot back and drop the node's unfinished request, unless handed over."""
        self._stopped = True
        self._stop_watching()
        if self._upload is not None:
            upload, self._upload = self._upload, None
            await asyncio.shield(upload.abort())
        if self._state is not None:
            state, self._state = self._state, None
            self._dispatcher.unreserve(state)
