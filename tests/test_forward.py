"""A large upload goes on to a free node while it arrives, and never becomes a task by mistake.

The node gets the end of the forwarded request only after the gateway has kept and checked the
job: a refused file, a client that gives up, a gateway killed mid-upload or a node that drops the
connection must each leave no task on the node, and an accepted job still runs exactly once.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import loopback
from gateway_proc import GatewayProcess, wait_for
from media import make_big_wav
from servers import MisbehavingNode, NodeProcess

FORWARDED = "while it arrived"  # the gateway's log line for a forwarded upload


class RawUpload:
    """A multipart POST sent by hand, a piece at a time, so a test can stop half-way."""

    def __init__(self, gateway: GatewayProcess, fields: list[tuple[str, str]], files: list[tuple[str, Path]],
                 after: list[tuple[str, str]] = ()):
        boundary = secrets.token_hex(12)

        def field(name: str, value: str) -> bytes:
            return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()

        self.parts: list[bytes | Path] = [field(name, value) for name, value in fields]
        for name, path in files:
            self.parts += [
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode(),
                path,
                b"\r\n",
            ]
        self.parts += [field(name, value) for name, value in after]
        self.parts.append(f"--{boundary}--\r\n".encode())
        self.length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self.parts)
        self.conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
        self.conn.putrequest("POST", "/api/v1/jobs")
        self.conn.putheader("Authorization", f"Bearer {gateway.admin_key}")
        self.conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        self.conn.putheader("Content-Length", str(self.length))
        self.conn.endheaders()
        self._chunks = self._read()
        self.sent = 0

    def _read(self) -> Iterator[bytes]:
        for part in self.parts:
            if isinstance(part, bytes):
                yield part
                continue
            with part.open("rb") as handle:
                while chunk := handle.read(256 * 1024):
                    yield chunk

    def send(self, upto: int | None = None) -> None:
        """Send the body up to byte `upto` (or whole)."""
        for chunk in self._chunks:
            self.conn.send(chunk)
            self.sent += len(chunk)
            if upto is not None and self.sent >= upto:
                return

    def response(self) -> tuple[int, dict]:
        self.send()
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())


def node_files(node: NodeProcess, kind: str = "audios") -> list[Path]:
    folder = node.data_dir / "inputs" / kind
    return [p for p in folder.iterdir() if p.is_file()] if folder.exists() else []


def node_tasks(node: NodeProcess) -> dict:
    return loopback.get(f"{node.url}/v1/tasks/", timeout=5).json()


def sent(node: NodeProcess) -> list[str]:
    """The gateway job ids the node got tasks for, in order (the form route names a task by
    its save_result_path; the gateway sets that on the JSON route too)."""
    return [entry["request"]["save_result_path"] for entry in node.submissions()]


def post_s2v(client: httpx.Client, image: Path, audio: Path, **kwargs) -> httpx.Response:
    """An s2v job as a multipart upload, `task` first (as forwarding needs), files from disk."""
    data = {"task": "s2v", **kwargs.pop("data", {})}
    with image.open("rb") as i, audio.open("rb") as a:
        return client.post("/api/v1/jobs", data=data, files={"image": i, "audio": a}, **kwargs)


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def voice8(tmp_path) -> Path:
    return make_big_wav(tmp_path / "voice8.wav", 8)


def forwarding_gateway(tmp_path: Path, node: NodeProcess, **settings: str) -> GatewayProcess:
    # Anything over 1 MiB is forwarded.
    return GatewayProcess(tmp_path / "data", nodes=f"n1={node.url}", X2V_FORM_THRESHOLD_MB="1", **settings).start()


def test_upload_reaches_the_node_while_it_arrives_and_runs_once(tmp_path, media, voice8):
    node = NodeProcess(tmp_path / "node").start()
    gateway = forwarding_gateway(tmp_path, node)
    try:
        upload = RawUpload(gateway, [("task", "s2v"), ("prompt", "forwarded")],
                           [("image", media["face"]), ("audio", voice8)])
        upload.send(upto=upload.length // 2)
        # Half the voice-over is still with the client, and the node is already writing it.
        wait_until(lambda: any(p.stat().st_size > 2 * 1024 * 1024 for p in node_files(node)))
        assert node.submissions() == []  # no task before the gateway has the whole job
        status, job = upload.response()
        assert status == 201, job
        with gateway.client() as client:
            done = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=120)
            assert done["state"] == "succeeded", done
            video = client.get(f"/api/v1/jobs/{job['id']}/video")
            assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        (entry,) = node.submissions()
        assert entry["route"].endswith("/video/form")
        assert entry["request"]["save_result_path"] == job["id"]
        assert entry["request"]["prompt"] == "forwarded"
        assert entry["request"]["seed"] == done["params"]["seed"]
        assert f"job {job['id']}: upload sent on to n1 {FORWARDED}" in gateway.log()
        assert done["inputs"]["audio"]["size"] == voice8.stat().st_size
    finally:
        gateway.stop()
        node.stop()


def test_refused_uploads_never_become_tasks_and_give_their_slot_back(tmp_path, media, voice8):
    node = NodeProcess(tmp_path / "node").start()
    gateway = forwarding_gateway(tmp_path, node)
    noise = tmp_path / "noise.wav"
    noise.write_bytes(b"RIFF" + secrets.token_bytes(3 * 1024 * 1024))  # looks like a WAV, is not one
    try:
        with gateway.client() as client:
            # A file that is not what it claims: streamed to the node, then refused.
            bad = post_s2v(client, media["face"], noise)
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "audio", bad.text
            # A bad field after the files: the files were streamed already.
            status, late = RawUpload(gateway, [("task", "s2v")], [("image", media["face"]), ("audio", voice8)],
                                     after=[("seed", "forty-two")]).response()
            assert status == 422 and late["error"]["field"] == "seed", late
        assert FORWARDED not in gateway.log()
        time.sleep(0.5)
        assert node.submissions() == [] and node_tasks(node) == {}
        # Both slots are free again: the next two uploads are forwarded and run.
        with gateway.client() as client:
            ids = []
            for n in range(2):
                response = post_s2v(client, media["face"], voice8, data={"prompt": f"ok {n}"})
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
            for job_id in ids:
                assert wait_for(client, job_id, {"succeeded", "failed"}, timeout=120)["state"] == "succeeded"
        assert sorted(sent(node)) == sorted(ids)
        assert gateway.log().count(FORWARDED) == 2
    finally:
        gateway.stop()
        node.stop()


def send_half(gateway: GatewayProcess, node: NodeProcess, media: dict[str, Path], voice8: Path) -> RawUpload:
    """An s2v upload sent half-way, once the node is writing a new file of it."""
    before = set(node_files(node))
    upload = RawUpload(gateway, [("task", "s2v")], [("image", media["face"]), ("audio", voice8)])
    upload.send(upto=upload.length // 2)
    wait_until(lambda: any(p.stat().st_size > 1024 * 1024 for p in set(node_files(node)) - before))
    return upload


def test_client_that_gives_up_or_gateway_killed_mid_upload_leaves_no_task(tmp_path, media, voice8):
    node = NodeProcess(tmp_path / "node").start()
    gateway = forwarding_gateway(tmp_path, node)
    try:
        # The client gives up half-way.
        send_half(gateway, node, media, voice8).conn.close()
        # The gateway is killed half-way through another one.
        upload = send_half(gateway, node, media, voice8)
        gateway.kill()
        upload.conn.close()
        time.sleep(1.0)
        assert node.submissions() == [] and node_tasks(node) == {}
        gateway.start()
        with gateway.client() as client:
            assert client.get("/api/v1/jobs").json()["jobs"] == []
            response = post_s2v(client, media["face"], voice8)
            job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=120)
            assert job["state"] == "succeeded", job
        assert sent(node) == [job["id"]]
    finally:
        gateway.stop()
        node.stop()


def test_idempotent_replay_of_a_forwarded_upload_sends_nothing_more(tmp_path, media, voice8):
    node = NodeProcess(tmp_path / "node").start()
    gateway = forwarding_gateway(tmp_path, node)
    try:
        with gateway.client() as client:
            answers = [
                post_s2v(client, media["face"], voice8, headers={"Idempotency-Key": "row-7"}) for _ in range(2)
            ]
            assert [a.status_code for a in answers] == [201, 200]
            assert answers[0].json()["id"] == answers[1].json()["id"]
            wait_for(client, answers[0].json()["id"], {"succeeded"}, timeout=120)
        assert len(node.submissions()) == 1
    finally:
        gateway.stop()
        node.stop()


def test_node_that_drops_the_forwarded_upload_still_gets_the_job_once(tmp_path, media, voice8):
    node = MisbehavingNode(tmp_path / "node").start()
    gateway = forwarding_gateway(tmp_path, node)
    try:
        node.fault("reset", route="submit", phase="before", times=1)
        with gateway.client() as client:
            response = post_s2v(client, media["face"], voice8)
            assert response.status_code == 201, response.text
            job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=120)
        assert job["state"] == "succeeded", job
        assert [f["fired"] for f in node.faults()] == [1]  # the reset hit the forwarded request
        assert sent(node) == [job["id"]]
        assert FORWARDED not in gateway.log()
    finally:
        gateway.stop()
        node.stop()


def test_upload_does_not_jump_the_queue(tmp_path, media, voice8):
    # One slot only (no look-ahead), and a job already waiting for it in the gateway's queue.
    node = NodeProcess(tmp_path / "node", job_seconds=2.0).start()
    gateway = forwarding_gateway(tmp_path, node, X2V_LOOKAHEAD="0")
    try:
        with gateway.client() as client:
            first, waiting = (
                client.post("/api/v1/jobs", json={"task": "t2v", "prompt": p}).json()["id"] for p in ("a", "b")
            )
            wait_for(client, first, {"running"})
            upload = post_s2v(client, media["face"], voice8)
            assert upload.status_code == 201, upload.text
            late = upload.json()["id"]
            for job_id in (first, waiting, late):
                assert wait_for(client, job_id, {"succeeded", "failed"}, timeout=120)["state"] == "succeeded"
        assert sent(node) == [first, waiting, late]
        assert FORWARDED not in gateway.log()
    finally:
        gateway.stop()
        node.stop()


def test_slow_upload_gives_its_slot_to_a_job_queued_meanwhile(tmp_path, media, voice8):
    # One slot only: a forwarded upload that takes its time must not keep the GPU idle.
    node = NodeProcess(tmp_path / "node").start()
    gateway = forwarding_gateway(tmp_path, node, X2V_LOOKAHEAD="0")
    try:
        upload = RawUpload(gateway, [("task", "s2v")], [("image", media["face"]), ("audio", voice8)])
        upload.send(upto=upload.length // 2)
        wait_until(lambda: any(p.stat().st_size > 1024 * 1024 for p in node_files(node)))
        with gateway.client() as client:
            quick = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "meanwhile"}).json()["id"]
            # It runs while half the upload is still with the client.
            assert wait_for(client, quick, {"succeeded", "failed"}, timeout=30)["state"] == "succeeded"
            status, job = upload.response()
            assert status == 201, job
            assert wait_for(client, job["id"], {"succeeded", "failed"}, timeout=120)["state"] == "succeeded"
        assert sent(node) == [quick, job["id"]]
        assert "gave its slot on n1 to a queued job" in gateway.log()
        assert FORWARDED not in gateway.log()  # the upload went through the queue instead
    finally:
        gateway.stop()
        node.stop()


def test_node_full_after_reading_the_whole_forwarded_form_is_back_pressure(tmp_path, media, voice8):
    # LightX2V reads the whole form before it checks its queue. Someone else's task fills this
    # node (the gateway counted a free slot), so the forwarded upload gets 503 "queue full"
    # only at its end: the job waits, and runs once when the node has room.
    node = NodeProcess(tmp_path / "node", job_seconds=3.0, max_queue_size=1).start()
    gateway = forwarding_gateway(tmp_path, node)
    try:
        other = loopback.post(f"{node.url}/v1/tasks/video/", json={"prompt": "someone else", "save_result_path": "someone-else"}, timeout=10)
        assert other.status_code == 200, other.text
        with gateway.client() as client:
            response = post_s2v(client, media["face"], voice8)
            assert response.status_code == 201, response.text
            job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=120)
            assert job["state"] == "succeeded", job
            assert any("queue is full" in e["detail"] for e in job["events"]), job["events"]
        assert sent(node) == ["someone-else", job["id"]]
        assert f"job {job['id']}: upload sent on to n1 {FORWARDED}" in gateway.log()
    finally:
        gateway.stop()
        node.stop()


@pytest.mark.parametrize(("room", "route"), [(2000, "/video/form"), (2001, "/video/form"), (0, "/video/")])
def test_forwarded_form_fills_its_declared_length_or_is_sent_the_ordinary_way(tmp_path, media, room, route):
    # The form sent on declares its Content-Length before the files' sizes are known. A form
    # shorter than that ends with an epilogue of line breaks (odd or even in length), which the
    # node's parser skips; fields that would not fit leave no task, and the job goes the
    # ordinary way (small files: the JSON route), once.
    from x2v_gateway.upstream.base import SubmitRequest
    from x2v_gateway.upstream.selfhosted import SelfHostedNode

    node = NodeProcess(tmp_path / "node").start()
    files = {"image": (media["face"], "image.png"), "audio": (media["voice"], "audio.wav")}
    # The files and their part heads (152 bytes each here), but none of the fields.
    length = sum(path.stat().st_size + 160 for path, _ in files.values()) + room

    async def scenario() -> str:
        adapter = SelfHostedNode("n1", node.url)
        try:
            upload = adapter.open_form(length, "s2v")
            for role, (path, filename) in files.items():
                upload.begin_file(role, filename)
                upload.write(path.read_bytes())
                upload.end_file()
                await upload.drain()
            assert not upload.broken
            request = SubmitRequest(
                job_id="job-1", task_id="job-1", task="s2v", params={"prompt": "declared", "seed": 7},
                inputs={role: path for role, (path, _) in files.items()},
                filenames={role: filename for role, (_, filename) in files.items()},
            )
            return await upload.finish(request)
        finally:
            await adapter.aclose()

    try:
        task_id = asyncio.run(scenario())
        (entry,) = node.submissions()
        assert entry["route"].endswith(route)
        assert entry["request"]["save_result_path"] == "job-1"
        assert (entry["request"]["prompt"], entry["request"]["seed"]) == ("declared", 7)
        assert task_id == "job-1" and len(node_tasks(node)) == 1  # one task, known by its save_result_path
        # The node kept each file exactly as sent: the epilogue is not part of the last one.
        for kind, role in (("imgs", "image"), ("audios", "audio")):
            (kept,) = node_files(node, kind)
            assert kept.read_bytes() == files[role][0].read_bytes()
    finally:
        node.stop()
