"""Many lightweight LightX2V nodes in one process: one asyncio server listening on `--count` ports.

    .venv/bin/python bench/fake_nodes.py --count 500

Each port answers the routes the gateway follows a node with (see
/work/shared/lightx2v/selfhosted.md): `GET /v1/service/status`, `/v1/service/metadata`,
`/v1/tasks/` (the list), `/v1/tasks/{id}/status`, `POST /v1/tasks/video/`, `DELETE /v1/tasks/{id}`.
A task starts when the one before it ends and runs for `--job-seconds` (default: longer than
any bench), so what is measured is the cost of following busy nodes, not of collecting videos.
The first line printed is a JSON object: the ports, and a control port whose `GET /stats`
answers the requests counted per route kind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from datetime import datetime


class Node:
    def __init__(self, job_seconds: float) -> None:
        self.tasks: dict[str, dict] = {}
        self.job_seconds = job_seconds
        self.started: dict[str, float] = {}

    def advance(self) -> None:
        now = time.time()
        running = None
        for task_id, task in self.tasks.items():
            if task["status"] == "processing":
                if now - self.started[task_id] >= self.job_seconds:
                    task["status"], task["end_time"] = "completed", datetime.now().isoformat()
                else:
                    running = task_id
        if running is None:
            for task_id, task in self.tasks.items():
                if task["status"] == "pending":
                    task["status"], task["start_time"] = "processing", datetime.now().isoformat()
                    self.started[task_id] = now
                    break

    def status(self) -> dict:
        self.advance()
        current = next((k for k, t in self.tasks.items() if t["status"] == "processing"), None)
        pending = sum(t["status"] == "pending" for t in self.tasks.values())
        return {"service_status": "busy" if current else "idle", "current_task": current,
                "active_tasks": [], "pending_tasks": pending, "queue_size": 10}


def respond(node: Node, method: str, path: str, body: bytes, counts: Counter) -> tuple[int, object]:
    if method == "GET" and path == "/v1/service/status":
        counts["status"] += 1
        return 200, node.status()
    if method == "GET" and path == "/v1/service/metadata":
        counts["metadata"] += 1
        return 200, {"model_cls": "wan2.1", "task": "t2v"}
    if method == "GET" and path == "/v1/tasks/":
        counts["list"] += 1
        node.advance()
        return 200, node.tasks
    if method == "GET" and path.startswith("/v1/tasks/") and path.endswith("/status"):
        counts["task_status"] += 1
        node.advance()
        task = node.tasks.get(path.split("/")[3])
        return (200, task) if task else (404, {"detail": "Task not found"})
    if method == "POST" and path == "/v1/tasks/video/":
        counts["submit"] += 1
        fields = json.loads(body or b"{}")
        task_id = fields.get("task_id") or f"T{len(node.tasks)}"
        if task_id in node.tasks:
            return 503, {"detail": f"Task ID {task_id} already exists"}
        node.tasks[task_id] = {"task_id": task_id, "status": "pending", "start_time": None,
                               "end_time": None, "error": None, "error_type": "",
                               "save_result_path": fields.get("save_result_path") or task_id}
        node.advance()
        return 200, {"task_id": task_id, "task_status": "pending", "save_result_path": task_id}
    if method == "DELETE" and path.startswith("/v1/tasks/"):
        counts["cancel"] += 1
        task = node.tasks.get(path.split("/")[3])
        if task and task["status"] in ("pending", "processing"):
            task["status"] = "cancelled"
            return 200, {"stop_status": "success"}
        return 200, {"stop_status": "do_nothing"}
    counts["other"] += 1
    return 404, {"detail": "Not Found"}


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, target, _ = line.decode().split(" ", 2)
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = header.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            code, payload = answer(method, target.split("?")[0], body)
            data = json.dumps(payload).encode()
            writer.write(f"HTTP/1.1 {code} X\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def main(count: int, job_seconds: float) -> None:
    counts: Counter = Counter()
    servers, ports = [], []
    for _ in range(count):
        node = Node(job_seconds)
        server = await asyncio.start_server(
            lambda r, w, node=node: serve(r, w, lambda m, p, b: respond(node, m, p, b, counts)),
            "127.0.0.1", 0, backlog=64,
        )
        servers.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    control = await asyncio.start_server(
        lambda r, w: serve(r, w, lambda m, p, b: (200, {**counts, "at": time.monotonic()})),
        "127.0.0.1", 0,
    )
    print(json.dumps({"ports": ports, "control": control.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--job-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.job_seconds))
