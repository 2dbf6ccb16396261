"""A test double of the hosted LightX2V cloud API, served over real HTTP on 127.0.0.1.

It reproduces ../shared/lightx2v/cloud.md, the contract captured from the real server code with
the PostgreSQL task store the hosted platform runs, quirks included: HTTP 500 with
`{"message": "error: <python exception>!"}` for nearly every client mistake, 400 for the three
per-user limits, `CANCEL` (not CANCELLED), cancel and resume as GET, one unknown id failing a whole
`task_ids=` query, relative result URLs. A double kinder than the real thing would only hide bugs,
so each handler follows the real handler's steps in the same order and lets Python produce the
same exception text (`'task'`, `Incorrect padding`, `cannot identify image file ...`).

Jobs are run by a simulated worker pool: `--workers` workers take single_stage tasks in FIFO
order, each job takes `--job-seconds`, a prompt containing `FAIL` ends FAILED with the fail_msg
"worker failed", and multi_stage tasks stay PENDING (no worker serves those queues, as captured).

For tests, every accepted submit goes to `<state-dir>/submits.jsonl` and every request to
`<state-dir>/requests.jsonl` (with whether it carried an Authorization header, never its value),
and faults (a proxy's 502, a connection closed after the cloud acted) are armed at run time
through the tests' fault injector (faults.py): `CloudDouble.inject`, or `CloudDouble.fault`.

    python tests/cloud_double.py --port 8610 --token secret=github_12345 --job-seconds 2 --workers 1

`CloudDouble` (below) starts it as a subprocess for tests and reads those files back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import enum
import hashlib
import hmac
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import av
import httpx
from PIL import Image

import loopback
from faults import FaultInjector, FaultsClient, serve
from x2v_gateway.demo import asgi
from x2v_gateway.demo.asgi import Request, Response, json_response, route

# -- the contract's constants ------------------------------------------------------------------

DEFAULT_USER = "github_12345"

# The shipped model_pipeline.json (cloud.md §3), outer model names.
MODELS = [
    ("t2v", "wan2.2-T2V-A14B", "single_stage"),
    ("t2v", "wan2.2-T2V-A14B", "multi_stage"),
    ("t2v", "self-forcing-dmd", "single_stage"),
    ("i2v", "wan2.2-14B-480P", "single_stage"),
    ("i2v", "wan2.2-14B-480P", "multi_stage"),
    ("i2v", "wan2.2-I2V-A14B-distill", "single_stage"),
    ("i2v", "matrix-game2-gta-drive", "single_stage"),
    ("i2v", "matrix-game2-universal", "single_stage"),
    ("i2v", "matrix-game2-templerun", "single_stage"),
    ("i2i", "qwen-image-2509", "single_stage"),
    ("t2i", "qwen-image", "single_stage"),
    ("s2v", "SekoTalk", "single_stage"),
    ("s2v", "SekoTalk", "multi_stage"),
    ("animate", "wan2.2_animate", "single_stage"),
    ("flf2v", "wan2.2-14B-480P", "single_stage"),
    ("flf2v", "Wan2.2-I2V-A14B-distill", "single_stage"),
]
# The config maps the inner `seko_talk` to the outer `SekoTalk`; submit looks up inner names, so
# an error message shows the inner one.
INNER_NAMES = {"SekoTalk": "seko_talk"}
OUTER_NAMES = {inner: outer for outer, inner in INNER_NAMES.items()}
TASK_INPUTS = {
    "s2v": ["input_image", "input_audio"],
    "i2v": ["input_image"],
    "t2v": [],
    "t2i": [],
    "i2i": ["input_image"],
    "flf2v": ["input_image", "input_last_frame"],
    "animate": ["input_image", "input_video"],
}
INPUT_TYPES = {
    "input_image": "IMAGE", "input_last_frame": "IMAGE", "input_audio": "AUDIO", "input_video": "VIDEO",
}
# The real message names the server's own config path; keep one so clients must strip it.
PIPELINE_PATH = "/opt/LightX2V/lightx2v/deploy/server/../../../configs/model_pipeline.json"
# The monitor's `worker_min_capacity`: no queue is ever "busy" below this many pending subtasks.
WORKER_MIN_CAPACITY = 20
PRESIGN_SECRET = b"cloud-double-presign"


class Status(enum.IntEnum):
    # PostgreSQL stores subtask statuses as these integers (they show in /task/list rows).
    CREATED = 1
    PENDING = 2
    RUNNING = 3
    SUCCEED = 4
    FAILED = 5
    CANCEL = 6
    REJECT = 7


ACTIVE = (Status.CREATED, Status.PENDING, Status.RUNNING)
FINISHED = (Status.SUCCEED, Status.FAILED, Status.CANCEL, Status.REJECT)


def data_name(name: str, task_id: str) -> str:
    """How the server names a stored input or output (images get `.png`, videos `.mp4`)."""
    suffix = {"input_image": ".png", "input_last_frame": ".png", "input_video": ".mp4",
              "output_video": ".mp4", "output_image": ".png"}.get(name, "")
    return f"{task_id}-{name}{suffix}"


def make_token(user_id: str = DEFAULT_USER, *, secret: bytes = b"cloud-double-jwt") -> str:
    """An access token shaped like the platform's HS256 JWT, so leak checks see a realistic one."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"user_id": user_id, "username": user_id.split("_", 1)[-1], "email": "", "homepage": "",
              "token_type": "access", "iat": now, "exp": now + 168 * 3600, "jti": uuid.uuid4().hex}
    payload = b64(json.dumps(claims).encode())
    signature = b64(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


# -- configuration and state -------------------------------------------------------------------


@dataclass
class Config:
    tokens: dict[str, str] = field(default_factory=dict)  # access token -> user id
    expired_tokens: list[str] = field(default_factory=list)
    workers: int = 1
    job_seconds: float = 1.0
    # A running worker learns of a cancel at its next ping (10 s on the real worker).
    ping_seconds: float = 1.0
    visit_gap: float = 0.05  # user_visit_frequency
    max_active: int = 3  # user_max_active_tasks
    max_daily: int = 100  # user_max_daily_tasks
    # Pending subtasks per queue at which submit answers "Queue busy"; None = the real formula,
    # max(20, 3600 * workers / average job time).
    queue_capacity: int | None = None
    pending_timeout: float = 1800.0  # subtask_pending_timeout
    running_timeout: float = 3600.0  # subtask_running_timeouts: also the estimate until measured
    no_limit_users: list[str] = field(default_factory=list)  # SKIP_CHECK_USER_BUSY_LIST
    absolute_urls: bool = False  # result_url answers a pre-signed absolute URL, as S3/TOS does
    presign_expires: float = 86400.0
    # Seconds submit waits after creating the task before it answers (a slow server, for tests
    # of the window between a submit reaching the cloud and its answer reaching the client).
    # Lowering it releases the answers already waiting.
    submit_delay: float = 0.0


@dataclass
class Subtask:
    task_id: str
    worker_name: str
    queue: str
    inputs: list[str]
    outputs: list[str]
    previous: list[str]
    status: Status = Status.CREATED
    worker_identity: str | None = None
    extra_info: dict = field(default_factory=dict)
    create_t: float = 0.0
    update_t: float = 0.0
    ping_t: float = 0.0
    infer_cost: float | None = None
    pending_seq: int = 0  # FIFO order in its queue
    run_id: int = 0  # which worker run owns it; a cancelled run's late report is ignored


@dataclass
class Task:
    task_id: str
    task_type: str
    model_cls: str  # inner name
    stage: str
    params: dict
    user_id: str
    inputs: dict
    outputs: dict
    create_t: float
    update_t: float
    status: Status = Status.CREATED
    extra_info: dict = field(default_factory=dict)
    tag: str = ""
    ping_t: float | None = None
    subtasks: list[Subtask] = field(default_factory=list)


@dataclass
class Run:
    subtask: Subtask
    run_id: int
    started: float
    ends: float
    next_ping: float


def json_answer(data: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return json_response(status, data, headers or [])


def error_answer(e: Any, code: int) -> Response:
    # The server's `error_response(e, code)`: note the `!` appended to every message.
    return json_answer({"message": f"error: {e}!"}, code)


def fake_ffmpeg_failure(data: bytes, reason: str) -> str:
    """What `media_to_audio` puts in its assertion: ffmpeg's whole stderr (about 2.7 kB)."""
    tmp = f"/tmp/tmp{hashlib.sha1(data).hexdigest()[:8]}"
    configuration = " ".join(
        f"--enable-{lib}" for lib in (
            "gpl version3 libaom libass libbluray libcaca libcdio libcodec2 libdav1d libflite "
            "libfontconfig libfreetype libfribidi libglslang libgme libgsm libharfbuzz libmp3lame "
            "libmysofa libopenjpeg libopenmpt libopus librubberband libshine libsnappy libsoxr "
            "libspeex libtheora libtwolame libvidstab libvorbis libvpx libwebp libx265 libxml2 "
            "libxvid libzimg openal opencl opengl sdl2 libplacebo librav1e pocketsphinx "
            "librsvg libjxl libdc1394 libdrm libiec61883 chromaprint frei0r ladspa libx264 libjack "
            "libpulse librabbitmq librist libsrt libssh libsvtav1 libvpl libzmq libzvbi lv2 "
            "libcdio-paranoia libopenh264 libsmbclient libtesseract libgnutls libbs2b shared"
        ).split()
    )
    libs = "\n".join(
        f"  {name:<14} {major}. {minor:>3}.100 / {major}. {minor:>3}.100"
        for name, major, minor in (("libavutil", 58, 29), ("libavcodec", 60, 31), ("libavformat", 60, 16),
                                   ("libavdevice", 60, 3), ("libavfilter", 9, 12), ("libswscale", 7, 5),
                                   ("libswresample", 4, 12), ("libpostproc", 57, 3))
    )
    stderr = (
        "ffmpeg version 6.1.1-3ubuntu5 Copyright (c) 2000-2023 the FFmpeg developers\n"
        "  built with gcc 13 (Ubuntu 13.2.0-23ubuntu3)\n"
        f"  configuration: --prefix=/usr --extra-version=3ubuntu5 --toolchain=hardened "
        f"--libdir=/usr/lib/x86_64-linux-gnu --incdir=/usr/include/x86_64-linux-gnu --arch=amd64 "
        f"--enable-gpl --disable-stripping --disable-omx --enable-gnutls "
        f"{configuration}\n{libs}\n"
        f"[in#0 @ 0x5581c2b1a3c0] Error opening input: {reason}\n"
        f"Error opening input file {tmp}.\n"
        f"{tmp}: {reason}\n"
    )
    return f"media to wav failed: {stderr}"


def check_audio(data: bytes) -> None:
    """The server converts audio with ffmpeg; here PyAV decodes one frame to the same verdict."""
    if len(data) < 4:
        raise ValueError("Audio file too short")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
            next(container.decode(container.streams.audio[0]))
    except (av.error.FFmpegError, StopIteration, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or "Invalid data found when processing input"
        raise AssertionError(fake_ffmpeg_failure(data, reason)) from None


def check_image(data: bytes) -> None:
    image = Image.open(io.BytesIO(data)).convert("RGB")  # raises "cannot identify image file <...>"
    w, h = image.size
    assert w > 0 and h > 0, "image is empty"


def render_mp4(seed: int, *, frames: int = 16, size: tuple[int, int] = (96, 64), fps: int = 16) -> bytes:
    """A small playable MP4 like the captured one: H.264 video, AAC audio, 16 frames."""
    out = io.BytesIO()
    base = (seed % 200, (seed // 200) % 200, (seed // 40000) % 200)
    with av.open(out, "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "ultrafast"}
        audio = container.add_stream("aac", rate=44100)
        audio.layout = "stereo"
        for index in range(frames):
            shade = tuple(min(255, c + index * 3) for c in base)
            picture = Image.new("RGB", size, shade)
            picture.paste((255, 255, 255), (index * 4 % size[0], 8, index * 4 % size[0] + 8, 16))
            for packet in video.encode(av.VideoFrame.from_image(picture)):
                container.mux(packet)
        samples_per_frame = 1024
        total = 44100 * frames // fps
        for start in range(0, total, samples_per_frame):
            frame = av.AudioFrame(format="fltp", layout="stereo", samples=samples_per_frame)
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))  # silence
            frame.sample_rate = 44100
            frame.pts = start
            frame.time_base = Fraction(1, 44100)
            for packet in audio.encode(frame):
                container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                container.mux(packet)
    return out.getvalue()


def render_png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (seed % 255, 80, 160)).save(out, format="PNG")
    return out.getvalue()


# -- the cloud ---------------------------------------------------------------------------------


class Cloud:
    """The platform's task manager, monitor and worker pool, in memory."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tasks: dict[str, Task] = {}
        self.user_visits: dict[str, float] = {}
        self.costs: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=10))
        self.runs: list[Run | None] = []
        self._seq = 0
        self._run_seq = 0
        self._results: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    # The pipeline config -----------------------------------------------------------------------

    def pipeline(self, keys: list) -> dict:
        outer = OUTER_NAMES.get(keys[1], keys[1])
        if (keys[0], outer, keys[2]) not in MODELS:
            raise Exception(f"{keys} are not in {PIPELINE_PATH}!")
        task, _, stage = keys
        inputs = TASK_INPUTS[task]
        output = "output_image" if task in ("t2i", "i2i") else "output_video"
        prefix = f"{task}-{outer}-{stage}"
        if stage == "single_stage":
            workers = {"pipeline": {"inputs": inputs, "outputs": [output], "previous": [],
                                    "queue": f"{prefix}-pipeline"}}
        else:
            workers = {
                "text_encoder": {"inputs": inputs, "outputs": ["text_encoder_output"], "previous": [],
                                 "queue": f"{prefix}-text_encoder"},
                "dit": {"inputs": ["text_encoder_output"], "outputs": ["latents"], "previous": ["text_encoder"],
                        "queue": f"{prefix}-dit"},
                "vae_decoder": {"inputs": ["latents"], "outputs": [output], "previous": ["dit"],
                                "queue": f"{prefix}-vae_decoder"},
            }
        return {"workers": workers, "inputs": inputs, "outputs": [output]}

    def serves(self, queue: str) -> bool:
        # The simulated pool serves every single_stage queue and nothing else.
        return queue.endswith("-single_stage-pipeline")

    def ready_workers(self, queue: str) -> int:
        return self.config.workers if self.serves(queue) else 0

    def avg_cost(self, queue: str) -> float:
        costs = self.costs[queue]
        if not costs:
            return int(self.config.running_timeout) if self.config.running_timeout.is_integer() \
                else self.config.running_timeout
        return sum(costs) / len(costs)

    def pending_in(self, queue: str) -> list[Subtask]:
        subs = [s for t in self.tasks.values() for s in t.subtasks if s.queue == queue and s.status == Status.PENDING]
        return sorted(subs, key=lambda s: s.pending_seq)

    # Limits ------------------------------------------------------------------------------------

    def check_user_busy(self, user_id: str) -> str | bool:
        """The monitor's check, run before the body is even parsed."""
        if user_id in self.config.no_limit_users:
            return True
        cur_t = time.time()
        if user_id in self.user_visits:
            elapse = cur_t - self.user_visits[user_id]
            if elapse <= self.config.visit_gap:
                return f"User {user_id} visit too frequently, {elapse:.2f} s vs {self.config.visit_gap:.2f} s"
        # Recorded only when the gap check passes, but before the other two checks.
        self.user_visits[user_id] = cur_t
        mine = [t for t in self.tasks.values() if t.user_id == user_id]
        active = [t for t in mine if t.status in ACTIVE and t.tag != "delete"]
        if len(active) >= self.config.max_active:
            return f"User {user_id} has too many active tasks, {len(active)} vs {self.config.max_active}"
        # Deleted tasks still count towards the daily limit (include_delete=True).
        daily = [t for t in mine if t.create_t >= cur_t - 86400]
        if len(daily) >= self.config.max_daily:
            return f"User {user_id} has too many daily tasks, {len(daily)} vs {self.config.max_daily}"
        return True

    def check_queue_busy(self, queues: list[str]) -> float | None:
        wait_time = 0
        for queue in queues:
            avg_cost = self.avg_cost(queue)
            worker_cnt = self.ready_workers(queue)
            pending = len(self.pending_in(queue))
            if self.config.queue_capacity is not None:
                capacity = self.config.queue_capacity
            else:
                capacity = max(WORKER_MIN_CAPACITY, 3600 * max(worker_cnt, 1) // avg_cost)
            if pending >= capacity:
                return None
            wait_time += avg_cost * pending / max(worker_cnt, 1)
        return wait_time

    # Task store (the PostgreSQL task manager) --------------------------------------------------

    def load(self, task_id: str, user_id: str | None = None) -> Task | None:
        task = self.tasks.get(task_id)
        if task is None or task.tag == "delete" or (user_id is not None and task.user_id != user_id):
            return None
        return task

    def query_task(self, task_id: str, user_id: str) -> tuple[Task, list[Subtask]] | None:
        # Both task managers answer None for an unknown id; the handler unpacks it anyway.
        task = self.load(task_id, user_id)
        return None if task is None else (task, task.subtasks)

    @staticmethod
    def change_subtask(sub: Subtask, old: Status | None, new: Status, fail_msg: str | None = None) -> None:
        now = time.time()
        if old is None:  # resume: the record starts again
            sub.extra_info = {"elapses": {}}
        else:
            start = sub.extra_info.get("start_t", now)
            sub.extra_info.setdefault("elapses", {})[f"{old.name}-{new.name}"] = now - start
        if new in FINISHED:
            sub.extra_info.pop("start_t", None)
        else:
            sub.extra_info["start_t"] = now
        if fail_msg:
            sub.extra_info["fail_msg"] = fail_msg
        sub.status = new
        sub.update_t = now

    @staticmethod
    def end_task(task: Task, status: Status) -> None:
        now = time.time()
        start = task.extra_info.get("start_t", now)
        task.extra_info = {"active_elapse": now - start}
        task.status = status
        task.update_t = now

    def create_task(self, keys: list, pipeline: dict, params: dict, user_id: str) -> Task:
        now = time.time()
        task_id = str(uuid.uuid4())
        task = Task(
            task_id=task_id, task_type=keys[0], model_cls=keys[1], stage=keys[2], params=params,
            user_id=user_id, inputs={i: data_name(i, task_id) for i in pipeline["inputs"]},
            outputs={o: data_name(o, task_id) for o in pipeline["outputs"]},
            create_t=now, update_t=now, extra_info={"start_t": now},
        )
        for name, worker in pipeline["workers"].items():
            task.subtasks.append(Subtask(
                task_id=task_id, worker_name=name, queue=worker["queue"], inputs=worker["inputs"],
                outputs=worker["outputs"], previous=worker["previous"],
                extra_info={"elapses": {}, "start_t": now}, create_t=now, update_t=now,
            ))
        self.tasks[task_id] = task
        return task

    def prepare_subtasks(self, task: Task) -> None:
        """Put every subtask whose predecessors succeeded into its queue."""
        done = {s.worker_name for s in task.subtasks if s.status == Status.SUCCEED}
        for sub in task.subtasks:
            if sub.status == Status.CREATED and set(sub.previous) <= done:
                self.change_subtask(sub, Status.CREATED, Status.PENDING)
                self._seq += 1
                sub.pending_seq = self._seq
        if task.status == Status.CREATED:
            task.status = Status.PENDING
            task.update_t = time.time()

    def cancel_task(self, task_id: str, user_id: str) -> str | bool:
        task = self.load(task_id, user_id)
        if task is None:
            return "unknown cancel error"
        if task.status not in ACTIVE:
            # The PostgreSQL manager's f-string continues a line with a backslash, so its
            # indentation (24 spaces) lands in the message.
            return (f"Task {task_id} is not in active status (current status: TaskStatus.{task.status.name}). "
                    + " " * 24 + "Only tasks with status CREATED, PENDING, or RUNNING can be cancelled.")
        for sub in task.subtasks:
            if sub.status not in FINISHED:
                self.change_subtask(sub, sub.status, Status.CANCEL)
        self.end_task(task, Status.CANCEL)
        return True

    def resume_task(self, task: Task) -> str | bool:
        if task.status not in FINISHED:
            return "Active task cannot be resumed"
        if task.status == Status.SUCCEED:
            return "Succeed task cannot be resumed"
        for sub in task.subtasks:
            if sub.status != Status.SUCCEED:
                self.change_subtask(sub, None, Status.CREATED)
                sub.ping_t = 0.0
                sub.run_id = 0
        task.extra_info = {"start_t": time.time()}
        task.status = Status.CREATED
        task.update_t = time.time()
        self.prepare_subtasks(task)
        return True

    # Shapes of the answers ---------------------------------------------------------------------

    def format_subtask(self, sub: Subtask) -> dict:
        cur: dict[str, Any] = {
            "status": sub.status.name, "worker_name": sub.worker_name, "fail_msg": None, "elapses": {},
            "estimated_pending_order": None, "estimated_pending_secs": None,
            "estimated_running_secs": None, "ready_worker_count": None,
        }
        if sub.status in (Status.PENDING, Status.RUNNING):
            cur["estimated_running_secs"] = self.avg_cost(sub.queue)
            cur["ready_worker_count"] = self.ready_workers(sub.queue)
            if sub.status == Status.PENDING:
                order = 1 + [s.task_id for s in self.pending_in(sub.queue)].index(sub.task_id)
                # The real monitor divides by 1e-7 when no worker serves the queue: an order of 2
                # with no worker "waits" 10 million job lengths.
                worker_count = max(cur["ready_worker_count"], 1e-7)
                cur["estimated_pending_order"] = order
                cur["estimated_pending_secs"] = cur["estimated_running_secs"] * ((order - 1) // worker_count + 1)
        info = sub.extra_info
        cur["elapses"] = dict(info.get("elapses", {}))
        if "start_t" in info:
            cur["elapses"][f"{cur['status']}-"] = time.time() - info["start_t"]
        if "fail_msg" in info:
            cur["fail_msg"] = info["fail_msg"]
        return cur

    def format_task(self, task: Task, subtasks: list[dict]) -> dict:
        body = {
            "task_id": task.task_id, "task_type": task.task_type,
            "model_cls": OUTER_NAMES.get(task.model_cls, task.model_cls), "stage": task.stage,
            "params": task.params, "create_t": task.create_t, "update_t": task.update_t,
            "status": task.status.name, "extra_info": task.extra_info, "tag": task.tag,
            "inputs": task.inputs, "outputs": task.outputs, "user_id": task.user_id,
        }
        if task.ping_t is not None:
            body["ping_t"] = task.ping_t
        body["subtasks"] = subtasks
        return body

    @staticmethod
    def raw_subtask(sub: Subtask) -> dict:
        # /task/list carries the raw rows: PostgreSQL keeps status as an integer, times as floats.
        return {
            "task_id": sub.task_id, "worker_name": sub.worker_name, "inputs": sub.inputs,
            "outputs": sub.outputs, "queue": sub.queue, "previous": sub.previous,
            "status": int(sub.status), "worker_identity": sub.worker_identity, "result": None,
            "fail_time": 0, "extra_info": sub.extra_info, "create_t": sub.create_t,
            "update_t": sub.update_t, "ping_t": sub.ping_t, "infer_cost": sub.infer_cost,
        }

    def result_bytes(self, task: Task, name: str) -> bytes:
        key = f"{task.task_id}/{name}"
        if key not in self._results:
            seed = int(task.task_id.replace("-", "")[:8], 16)
            self._results[key] = render_png(seed) if name == "output_image" else render_mp4(seed)
            while len(self._results) > 32:
                self._results.popitem(last=False)
        return self._results[key]

    # The worker pool ---------------------------------------------------------------------------

    def tick(self) -> None:
        now = time.time()
        cfg = self.config
        while len(self.runs) < cfg.workers:
            self.runs.append(None)
        for index, run in enumerate(self.runs):
            if run is None:
                continue
            sub = run.subtask
            if sub.run_id != run.run_id or sub.status != Status.RUNNING:
                # Cancelled under it: the worker only notices at its next ping ({"msg": "delete"}),
                # and its slot stays busy until then.
                if now >= run.next_ping:
                    self.runs[index] = None
                continue
            if now >= run.ends:
                self._finish(run, now)
                self.runs[index] = None
            elif now >= run.next_ping:
                sub.ping_t = now
                run.next_ping = now + cfg.ping_seconds
        # Fewer workers configured: retire idle slots beyond the count.
        while len(self.runs) > cfg.workers and self.runs[-1] is None:
            self.runs.pop()
        for index, run in enumerate(self.runs):
            if run is None and index < cfg.workers:
                sub = self._next_pending()
                if sub is None:
                    break
                self._start(index, sub, now)
        self._expire(now)

    def _next_pending(self) -> Subtask | None:
        candidates = [s for t in self.tasks.values() for s in t.subtasks
                      if s.status == Status.PENDING and self.serves(s.queue)]
        return min(candidates, key=lambda s: s.pending_seq, default=None)

    def _start(self, index: int, sub: Subtask, now: float) -> None:
        self._run_seq += 1
        task = self.tasks[sub.task_id]
        self.change_subtask(sub, Status.PENDING, Status.RUNNING)
        sub.worker_identity = f"double-worker-{index}"
        sub.run_id = self._run_seq
        sub.ping_t = now
        task.status = Status.RUNNING
        task.ping_t = now
        task.update_t = now
        self.runs[index] = Run(sub, self._run_seq, now, now + self.config.job_seconds,
                               now + self.config.ping_seconds)

    def _finish(self, run: Run, now: float) -> None:
        sub = run.subtask
        task = self.tasks[sub.task_id]
        cost = now - run.started
        self.costs[sub.queue].append(max(cost, 1))  # the monitor's max(cur_cost, 1)
        sub.infer_cost = cost
        if "FAIL" in str(task.params.get("prompt", "")):
            self.change_subtask(sub, Status.RUNNING, Status.FAILED, fail_msg="worker failed")
            for other in task.subtasks:
                if other.status not in FINISHED:
                    self.change_subtask(other, other.status, Status.FAILED, fail_msg="other subtask failed")
            self.end_task(task, Status.FAILED)
            return
        self.change_subtask(sub, Status.RUNNING, Status.SUCCEED)
        if all(s.status == Status.SUCCEED for s in task.subtasks):
            self.end_task(task, Status.SUCCEED)
        else:
            self.prepare_subtasks(task)

    def _expire(self, now: float) -> None:
        """The monitor's timeouts: PENDING too long, RUNNING too long."""
        for task in self.tasks.values():
            if task.status not in ACTIVE:
                continue
            for sub in task.subtasks:
                elapse = now - sub.update_t
                if sub.status in (Status.CREATED, Status.PENDING) and elapse > self.config.pending_timeout:
                    message = f"CREATED / PENDING timeout: {elapse:.2f} s"
                elif sub.status == Status.RUNNING and elapse >= self.config.running_timeout:
                    message = f"RUNNING timeout: {elapse:.2f} s"
                else:
                    continue
                self.change_subtask(sub, sub.status, Status.FAILED, fail_msg=message)
                for other in task.subtasks:
                    if other.status not in FINISHED:
                        self.change_subtask(other, other.status, Status.FAILED, fail_msg="other subtask failed")
                self.end_task(task, Status.FAILED)
                break


# -- HTTP --------------------------------------------------------------------------------------


class App(asgi.App):
    """The platform's FastAPI routes, on the demo package's raw ASGI toolkit, so every status
    and body is exact."""

    def __init__(self, config: Config, state_dir: Path | None = None, on_ready: Callable[[], None] | None = None):
        self.cloud = Cloud(config)
        self.config = config
        self._on_ready = on_ready
        self._journal = (state_dir / "submits.jsonl").open("a", buffering=1) if state_dir else None
        self._ticker: asyncio.Task | None = None
        self.router = asgi.Router([
            route("GET", "/api/v1/model/list", self.model_list),
            route("POST", "/api/v1/task/submit", self.submit),
            route("GET", "/api/v1/task/query", self.query),
            route("GET", "/api/v1/task/list", self.task_list),
            route("GET", "/api/v1/task/result_url", self.result_url),
            route("GET", "/api/v1/task/cancel", self.cancel),
            route("GET", "/api/v1/task/resume", self.resume),
            route("DELETE", "/api/v1/task/delete", self.delete),
            route("GET", "/assets/task/result", self.asset_result),
            route("POST", "/api/v1/worker/fetch", self.worker_route),
            route("POST", "/api/v1/worker/report", self.worker_route),
            route("POST", "/api/v1/worker/ping/subtask", self.worker_route),
            route("POST", "/_double/config", self.set_config),
            route("GET,HEAD", "/presigned/{object_name:path}", self.presigned),
            # The SPA catch-all, with no frontend built: any other GET is its 404, any other
            # method on any path a 405.
            route("GET", "/{path:path}", self.frontend),
        ], redirect_slashes=False)

    async def startup(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever())
        if self._on_ready:
            self._on_ready()

    async def shutdown(self) -> None:
        if self._ticker:
            self._ticker.cancel()

    def error_response(self, exc: asgi.HTTPError) -> Response:
        # The platform's exception handler answers {"message"}, not FastAPI's {"detail"}.
        return json_answer({"message": exc.detail}, exc.status, exc.headers)

    async def _tick_forever(self) -> None:
        while True:
            try:
                self.cloud.tick()
            except Exception:  # a bug in the double must show, not silently stop every worker
                import traceback
                traceback.print_exc()
            await asyncio.sleep(0.01)

    async def frontend(self, request: Request) -> Response:
        return Response(404, b"<h1>Frontend not found</h1>", [("content-type", "text/html; charset=utf-8")])

    # Auth --------------------------------------------------------------------------------------

    def _verify(self, token: str | None) -> str:
        if token in self.config.expired_tokens:
            raise _not_authenticated("Token has expired")
        user = self.config.tokens.get(token or "")
        if user is None:
            raise _not_authenticated("Could not validate credentials")
        return user

    def user(self, request: Request) -> str:
        """FastAPI's HTTPBearer, then the JWT check."""
        header = request.header("authorization")
        scheme, _, credentials = (header or "").partition(" ")
        if not header or not scheme or not credentials or scheme.lower() != "bearer":
            raise _not_authenticated("Not authenticated")
        return self._verify(credentials)

    def user_from_query(self, request: Request) -> str:
        # The download routes take `Authorization: Bearer` or else `?token=`.
        header = request.header("authorization")
        token = header[7:] if header and header.startswith("Bearer ") else request.query.get("token")
        return self._verify(token)

    # Routes ------------------------------------------------------------------------------------

    async def model_list(self, request: Request) -> Response:
        self.user(request)
        return json_answer({"models": [{"task": t, "model_cls": m, "stage": s} for t, m, s in MODELS]})

    async def submit(self, request: Request) -> Response:
        user = self.user(request)
        cloud = self.cloud
        try:
            msg = cloud.check_user_busy(user)
            if msg is not True:
                return error_answer(msg, 400)
            params = json.loads(await request.body())
            keys = [params.pop("task"), params.pop("model_cls"), params.pop("stage")]
            keys[1] = INNER_NAMES.get(keys[1], keys[1])
            assert len(params["prompt"]) > 0, "valid prompt is required"
            pipeline = cloud.pipeline(keys)
            inputs = pipeline["inputs"]
            for x in inputs + pipeline["outputs"]:  # check_params
                if x in params and "type" in params[x]:
                    if params[x]["type"] == "stream":
                        env = "STREAM_AUDIO" if INPUT_TYPES.get(x) == "AUDIO" else "STREAM_VIDEO"
                        raise AssertionError(f"stream {env[7:].lower()} is not supported, please set env {env}=1")
                    if params[x]["type"] == "directory":
                        assert INPUT_TYPES.get(x) == "AUDIO", \
                            f"directory type is only supported for AUDIO input, got {INPUT_TYPES.get(x)}"
            queues = [w["queue"] for w in pipeline["workers"].values()]
            wait_time = cloud.check_queue_busy(queues)
            if wait_time is None:
                return error_answer("Queue busy, please try again later", 500)
            received = {}
            for inp in inputs:
                if inp not in params:
                    raise Exception(f"Input {inp} not found in params")
                item = params.pop(inp)
                data = await self._preload(inp, INPUT_TYPES[inp], item["type"], item["data"])
                received[inp] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            task = cloud.create_task(keys, pipeline, params, user)
            cloud.prepare_subtasks(task)
            self._record(task, received)
            # Read again while waiting, so a test can hold an answer and then let it go
            # (`configure(submit_delay=0)`) at the moment it chooses.
            while time.time() < task.create_t + self.config.submit_delay:
                await asyncio.sleep(0.02)
            return json_answer({"task_id": task.task_id, "workers": pipeline["workers"], "params": params,
                                "wait_time": wait_time})
        except Exception as e:
            return error_answer(str(e), 500)

    async def _preload(self, inp: str, inp_type: str, typ: str, val: Any) -> bytes:
        try:
            if typ == "url":
                data = await self._fetch(val)
            elif typ == "base64":
                data = base64.b64decode(val)
            elif typ == "directory":
                data = b"".join(base64.b64decode(v) for v in val.values())
            else:
                raise ValueError(f"cannot read {inp}[{inp_type}] which type is {typ}!")
            if inp_type == "IMAGE":
                check_image(data)
            elif inp_type == "AUDIO" and typ != "directory":
                check_audio(data)
            elif inp_type == "VIDEO" and len(data) == 0:
                raise ValueError("Video file is empty")
            return data
        except Exception as e:
            # `val[:100]` itself raises for a dict or a number, as on the real server.
            raise ValueError(f"Failed to read {inp}, type={typ}, val={val[:100]}: {e}!")

    @staticmethod
    async def _fetch(url: str) -> bytes:
        timeout = int(os.getenv("REQUEST_TIMEOUT", "5"))
        chunks = []
        async with httpx.AsyncClient() as client:
            async with client.stream("GET", url, timeout=timeout) as response:
                response.raise_for_status()
                async for chunk in response.aiter_bytes(chunk_size=1024 * 1024):
                    chunks.append(chunk)
                    if len(chunks) > 128:
                        raise Exception(f"url {url} recv data is too big")
        return b"".join(chunks)

    def _record(self, task: Task, inputs: dict) -> None:
        if self._journal is None:
            return
        self._journal.write(json.dumps({
            "t": task.create_t, "task_id": task.task_id, "user_id": task.user_id, "task": task.task_type,
            "model_cls": OUTER_NAMES.get(task.model_cls, task.model_cls), "stage": task.stage,
            "params": task.params, "inputs": inputs,
        }) + "\n")

    async def query(self, request: Request) -> Response:
        user = self.user(request)
        cloud = self.cloud
        try:
            if "task_ids" in request.query:
                tasks = []
                for task_id in request.query["task_ids"].split(","):
                    task_id = task_id.strip()
                    if task_id:
                        task, subtasks = cloud.query_task(task_id, user)
                        tasks.append(cloud.format_task(task, [cloud.format_subtask(s) for s in subtasks]))
                return json_answer({"tasks": tasks})
            task_id = request.query["task_id"]
            task, subtasks = cloud.query_task(task_id, user)
            return json_answer(cloud.format_task(task, [cloud.format_subtask(s) for s in subtasks]))
        except Exception as e:
            return error_answer(str(e), 500)

    async def task_list(self, request: Request) -> Response:
        user = self.user(request)
        try:
            page = int(request.query.get("page", 1))
            page_size = int(request.query.get("page_size", 10))
            assert page > 0 and page_size > 0, "page and page_size must be greater than 0"
            status_filter = request.query.get("status", None)
            tasks = [t for t in self.cloud.tasks.values() if t.user_id == user and t.tag != "delete"]
            if status_filter and status_filter != "ALL":
                wanted = Status[status_filter.upper()]  # KeyError 'CANCELLED' -> 500
                tasks = [t for t in tasks if t.status == wanted]
            tasks.sort(key=lambda t: t.create_t, reverse=True)
            total = len(tasks)
            total_pages = (total + page_size - 1) // page_size
            page_info = {"page": page, "page_size": page_size, "total": total, "total_pages": total_pages}
            if page > total_pages:
                return json_answer({"tasks": [], "pagination": page_info})
            chosen = tasks[(page - 1) * page_size: page * page_size]
            listed = [self.cloud.format_task(t, [Cloud.raw_subtask(s) for s in t.subtasks]) for t in chosen]
            return json_answer({"tasks": listed, "pagination": page_info})
        except Exception as e:
            return error_answer(str(e), 500)

    def _checked_output(self, request: Request, user: str) -> tuple[Task, str]:
        name = request.query["name"]
        task_id = request.query["task_id"]
        task = self.cloud.load(task_id, user)
        assert task is not None, f"Task {task_id} not found"
        assert task.status == Status.SUCCEED, f"Task {task_id} not succeed"
        assert name in task.outputs, f"Output {name} not found in task {task_id}"
        assert name not in task.params, f"Output {name} is a stream"
        return task, name

    async def result_url(self, request: Request) -> Response:
        user = self.user(request)
        try:
            task, name = self._checked_output(request, user)
            if self.config.absolute_urls:
                url = self._presign(request.header("host") or "127.0.0.1", task.outputs[name])
            else:
                url = f"./assets/task/result?task_id={task.task_id}&name={name}"
            return json_answer({"url": url})
        except Exception as e:
            return error_answer(str(e), 500)

    async def asset_result(self, request: Request) -> Response:
        user = self.user_from_query(request)
        try:
            task, name = self._checked_output(request, user)
            data = self.cloud.result_bytes(task, name)
            # `guess_file_type("output_video")` finds no extension: octet-stream, no `.mp4`.
            return Response(200, data, [
                ("content-type", "application/octet-stream"),
                ("content-disposition", f'attachment; filename="{name}"'),
                ("cache-control", "public, max-age=3600"),
            ])
        except Exception as e:
            return error_answer(str(e), 500)

    def _presign(self, host: str, object_name: str) -> str:
        expires = int(time.time() + self.config.presign_expires)
        signature = hmac.new(PRESIGN_SECRET, f"{object_name}:{expires}".encode(), hashlib.sha256).hexdigest()
        query = urlencode({"X-Tos-Expires": expires, "X-Tos-Signature": signature})
        return f"http://{host}/presigned/{quote(object_name)}?{query}"

    async def presigned(self, request: Request) -> Response:
        """Stands in for the object store behind a pre-signed URL (S3/TOS semantics)."""

        def s3_error(status: int, code: str, message: str) -> Response:
            body = f"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            return Response(status, body.encode(), [("content-type", "application/xml")])

        if request.header("authorization") is not None:
            # An object store refuses a pre-signed URL that also carries an Authorization header.
            return s3_error(400, "InvalidArgument", "Only one auth mechanism allowed; only the "
                            "X-Tos-Signature query parameter or the Authorization header should be specified")
        object_name = request.path.removeprefix("/presigned/")
        try:
            expires = int(request.query["X-Tos-Expires"])
            given = request.query["X-Tos-Signature"]
        except (KeyError, ValueError):
            return s3_error(403, "AccessDenied", "Query-string authentication requires the Signature and Expires parameters")
        expected = hmac.new(PRESIGN_SECRET, f"{object_name}:{expires}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given, expected):
            return s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided.")
        if time.time() > expires:
            return s3_error(403, "AccessDenied", "Request has expired")
        task_id, _, name = object_name.rpartition("-output_")
        task = self.cloud.tasks.get(task_id)
        if task is None or task.status != Status.SUCCEED:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        name = "output_" + name.split(".")[0]
        media = "image/png" if name == "output_image" else "video/mp4"
        return Response(200, self.cloud.result_bytes(task, name), [("content-type", media)])

    async def cancel(self, request: Request) -> Response:
        user = self.user(request)
        try:
            task_id = request.query["task_id"]
            ret = self.cloud.cancel_task(task_id, user)
            if ret is True:
                return json_answer({"msg": "Task cancelled successfully"})
            return error_answer({"error": f"Task {task_id} cancel failed: {ret}"}, 400)
        except Exception as e:
            return error_answer(str(e), 500)

    async def resume(self, request: Request) -> Response:
        user = self.user(request)
        try:
            task_id = request.query["task_id"]
            task = self.cloud.load(task_id, user)
            if task is None:
                # The real handler reads `task["task_type"]` from the None it got back.
                raise TypeError("'NoneType' object is not subscriptable")
            keys = [task.task_type, task.model_cls, task.stage]
            try:
                self.cloud.pipeline(keys)
            except Exception:
                return error_answer(f"Model {keys} is not supported now, please submit a new task", 400)
            ret = self.cloud.resume_task(task)
            if ret is True:
                return json_answer({"msg": "ok"})
            return error_answer(f"Task {task_id} resume failed: {ret}", 400)
        except Exception as e:
            return error_answer(str(e), 500)

    async def delete(self, request: Request) -> Response:
        user = self.user(request)
        try:
            task_id = request.query["task_id"]
            task = self.cloud.load(task_id, user)
            if not task:
                return error_answer("Task not found", 404)
            if task.status not in FINISHED:
                return error_answer("Only finished tasks can be deleted", 400)
            # PostgreSQL: tagged `delete`, then invisible to list, query, cancel and resume.
            task.tag = "delete"
            task.update_t = time.time()
            return json_answer({"message": "Task deleted successfully"})
        except Exception as e:
            return error_answer(str(e), 500)

    async def worker_route(self, request: Request) -> Response:
        self.user(request)  # HTTPBearer first; no user token is a worker token
        return json_answer({"message": "Invalid worker token"}, 403)

    # Test controls (not part of the platform) ---------------------------------------------------

    async def set_config(self, request: Request) -> Response:
        changes = json.loads(await request.body())
        for key, value in changes.items():
            if not hasattr(self.config, key):
                return json_answer({"message": f"unknown setting {key}"}, 400)
            setattr(self.config, key, value)
        return json_answer({k: v for k, v in asdict(self.config).items() if k not in ("tokens", "expired_tokens")})


def _not_authenticated(message: str) -> asgi.HTTPError:
    return asgi.HTTPError(401, message, [("www-authenticate", "Bearer")])


class RequestLog:
    """ASGI middleware: every request and the status its client got, to requests.jsonl (with
    whether it carried an Authorization header, never its value)."""

    def __init__(self, app: Any, path: Path) -> None:
        self.app = app
        self._out = path.open("a", buffering=1)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer: dict[str, Any] = {"status": None, "body": b""}

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self._write(Request(scope, receive), answer["status"], answer["body"])

    def _write(self, request: Request, status: int | None, body: bytes) -> None:
        query = {k: ("<redacted>" if k == "token" else v) for k, v in request.query.items()}
        entry = {
            "t": time.time(), "method": request.method, "path": request.path, "query": query,
            "auth": _auth_kind(request), "status": status,
        }
        if status is not None and status >= 400:
            # Which refusal it was (the limits all answer 400); the messages never hold a token.
            try:
                entry["message"] = json.loads(body).get("message")
            except (ValueError, AttributeError):
                pass
        self._out.write(json.dumps(entry) + "\n")


def _auth_kind(request: Request) -> str:
    header = request.header("authorization")
    return "none" if header is None else header.partition(" ")[0].lower() or "empty"


# -- running it --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8610, help="0 picks a free port (see --state-dir)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN[=USER]",
                        help=f"a valid access token and its user id (default user {DEFAULT_USER}); repeatable")
    parser.add_argument("--expired-token", action="append", default=[], metavar="TOKEN")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--job-seconds", type=float, default=1.0)
    parser.add_argument("--ping-seconds", type=float, default=1.0)
    parser.add_argument("--visit-gap", type=float, default=0.05)
    parser.add_argument("--max-active", type=int, default=3)
    parser.add_argument("--max-daily", type=int, default=100)
    parser.add_argument("--queue-capacity", type=int, default=None)
    parser.add_argument("--pending-timeout", type=float, default=1800.0)
    parser.add_argument("--running-timeout", type=float, default=3600.0)
    parser.add_argument("--no-limits", action="append", default=[], metavar="USER")
    parser.add_argument("--absolute-urls", action="store_true")
    parser.add_argument("--presign-expires", type=float, default=86400.0)
    parser.add_argument("--submit-delay", type=float, default=0.0)
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where to write url, submits.jsonl and requests.jsonl")
    args = parser.parse_args(argv)
    tokens = {}
    for item in args.token:
        token, sep, user = item.rpartition("=")
        if not sep or not token or not user:
            token, user = item, DEFAULT_USER
        tokens[token] = user
    config = Config(
        tokens=tokens, expired_tokens=args.expired_token, workers=args.workers, job_seconds=args.job_seconds,
        ping_seconds=args.ping_seconds, visit_gap=args.visit_gap, max_active=args.max_active,
        max_daily=args.max_daily, queue_capacity=args.queue_capacity, pending_timeout=args.pending_timeout,
        running_timeout=args.running_timeout, no_limit_users=args.no_limits, absolute_urls=args.absolute_urls,
        presign_expires=args.presign_expires, submit_delay=args.submit_delay,
    )
    return args, config


def main(argv: list[str] | None = None) -> None:
    args, config = parse_args(argv)
    url = ""
    if args.state_dir:
        args.state_dir.mkdir(parents=True, exist_ok=True)

    def listening(address: str) -> None:
        nonlocal url
        url = address

    def ready() -> None:
        if args.state_dir:
            (args.state_dir / "url.tmp").write_text(url)
            os.replace(args.state_dir / "url.tmp", args.state_dir / "url")
        print(f"cloud double listening on {url}", flush=True)

    def logged(inner: Any) -> Any:
        # In front of the fault injector: a request a fault answered is logged as its client saw it.
        return RequestLog(inner, args.state_dir / "requests.jsonl") if args.state_dir else inner

    app = FaultInjector(lambda: App(config, args.state_dir, on_ready=ready))
    asyncio.run(serve(app, args.host, args.port, wrap=logged, on_listening=listening, log_level="warning"))


class CloudDouble(FaultsClient):
    """The double as a subprocess for tests: start, stop, kill, and read what it saw.

        with CloudDouble(tmp_path, workers=2, job_seconds=0.3) as cloud:
            adapter = CloudUpstream("cloud", cloud.url, cloud.token)
            ...
            assert len(cloud.journal()) == 1

    Keyword options are the command-line flags: workers, job_seconds, ping_seconds, visit_gap,
    max_active, max_daily, queue_capacity, pending_timeout, running_timeout, absolute_urls,
    presign_expires, submit_delay, expired_token=[...], no_limits=[...]. Its state lives in
    memory: a restarted double has forgotten every task (the real one keeps them in PostgreSQL).
    """

    def __init__(self, state_dir: Path, *, tokens: dict[str, str] | None = None, users: int = 1,
                 **options: Any) -> None:
        self.state_dir = Path(state_dir)
        # One realistic JWT-shaped token per user unless given: github_12345, github_12346, ...
        self.tokens = tokens or {make_token(f"github_{12345 + i}"): f"github_{12345 + i}" for i in range(users)}
        self.options = options
        self.process: subprocess.Popen | None = None
        self.url = ""

    @property
    def token(self) -> str:
        return next(iter(self.tokens))

    def token_for(self, user_id: str) -> str:
        return next(t for t, u in self.tokens.items() if u == user_id)

    def start(self, timeout: float = 20.0) -> CloudDouble:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "url").unlink(missing_ok=True)
        argv = [sys.executable, __file__, "--port", "0", "--state-dir", str(self.state_dir)]
        for token, user in self.tokens.items():
            argv += ["--token", f"{token}={user}"]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    argv += [flag, str(item)]
            elif value is not None and value is not False:
                argv += [flag, str(value)]
        log = (self.state_dir / "double.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not (self.state_dir / "url").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"cloud double did not start: {(self.state_dir / 'double.log').read_text()[-2000:]}")
            time.sleep(0.02)
        self.url = (self.state_dir / "url").read_text()
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> CloudDouble:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self, name: str) -> list[dict]:
        path = self.state_dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def journal(self) -> list[dict]:
        """Every accepted submit: task_id, user_id, task, model_cls, stage, params, inputs (sizes, sha256)."""
        return self._read("submits.jsonl")

    def requests(self) -> list[dict]:
        """Every request: method, path, query (token redacted), auth kind ("bearer"/"none"/...),
        status, and for a refusal its `message`."""
        return self._read("requests.jsonl")

    def counts(self) -> collections.Counter:
        """Requests per route, e.g. counts()["GET /api/v1/task/query"]."""
        return collections.Counter(f"{r['method']} {r['path']}" for r in self.requests())

    def configure(self, **changes: Any) -> dict:
        """Change settings of the running double (workers, job_seconds, max_active, submit_delay...)."""
        return loopback.post(f"{self.url}/_double/config", json=changes).json()

    @contextlib.contextmanager
    def configured(self, **changes: Any) -> Iterator[None]:
        """`configure` for the block only: the settings it changes are put back as they were."""
        before = self.configure()
        self.configure(**changes)
        try:
            yield
        finally:
            self.configure(**{key: before[key] for key in changes})

    def inject(self, path: str, *, status: int | None = None, drop: bool = False, count: int = 1) -> None:
        """Make the next `count` requests to `path` fail: with a proxy-style `status` page
        (default 502), or (`drop=True`) by handling them and then closing the connection
        without the answer. Shorthands of `fault()`."""
        route = f"^[A-Z]+ {re.escape(path)}$"
        if drop:
            self.fault("close", route=route, phase="after", times=count)
        else:
            self.fault("error", route=route, status=status or 502, times=count)


if __name__ == "__main__":
    main()
