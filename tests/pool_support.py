"""What the pool tests (test_pool.py, test_failover.py) share: real demo nodes started at once,
a gateway in front of them, and reading what each side saw."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import loopback
from gateway_proc import GatewayProcess
from servers import NodeProcess

FINAL = {"succeeded", "failed", "cancelled"}
ADMIN_KEY = "pool-test-admin-key-0123456789"


def start(*nodes: NodeProcess) -> list[NodeProcess]:
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda n: n.start(), nodes))
    return list(nodes)


def gateway_for(tmp_path: Path, nodes: dict[str, NodeProcess], **settings: str) -> GatewayProcess:
    spec = ",".join(f"{name}={node.url}" for name, node in nodes.items())
    return GatewayProcess(tmp_path / "gw", spec, X2V_ADMIN_KEY=ADMIN_KEY, **settings).start()


def api(gateway: GatewayProcess, key: str = ADMIN_KEY) -> httpx.Client:
    return loopback.client(base_url=gateway.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def submit(client: httpx.Client, task: str = "t2v", media: dict | None = None, **fields) -> str:
    body = {"task": task, "prompt": fields.pop("prompt", "a cat"), **fields}
    if task == "s2v":
        assert media is not None
        body["image"] = base64.b64encode(media["face"].read_bytes()).decode()
        body["audio"] = base64.b64encode(media["voice"].read_bytes()).decode()
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_all(client: httpx.Client, ids: list[str], timeout: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {i: client.get(f"/api/v1/jobs/{i}").json() for i in ids}
        if all(j["state"] in FINAL for j in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError({i: j["state"] for i, j in jobs.items()})
        time.sleep(0.2)




def tasks_on(node: NodeProcess) -> dict[str, dict]:
    return loopback.get(f"{node.url}/v1/tasks/", timeout=10).json()


def submitted_ids(node: NodeProcess) -> list[str]:
    return [entry["task_id"] for entry in node.submissions()]


def client_events(gateway: GatewayProcess, job_id: str) -> str:
    with api(gateway) as client:
        return " ".join(e["detail"] for e in client.get(f"/api/v1/jobs/{job_id}").json()["events"])

