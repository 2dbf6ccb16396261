"""LightX2V's own multi-server client, reimplemented faithfully: the baseline of bench/pool.py.

Source: ModelTC/LightX2V `scripts/server/post_multi_servers.py` (commit f8aee98b, unchanged since
b099ff96, 2025-08-12), used by `post_multi_servers_t2v.py` / `post_multi_servers_i2v.py`. Its loop:

* `get_available_urls`: every URL whose `GET /v1/service/status` answers is "available";
* for each message, in order, `find_idle_server` walks the available URLs asking
  `GET /v1/service/status` and returns the first whose `service_status` is `idle`; when none is,
  it sleeps **3 s** and walks them again;
* it starts a thread that `POST`s the message to `<url>/v1/tasks/` and then asks
  `GET /v1/tasks/{id}/status` every **0.5 s** until `completed` or `failed` (on an error it logs
  and asks again after 0.5 s, forever: a task on a dead server never ends);
* then sleeps **0.5 s** ("let thread start") before looking for the next idle server;
* at the end it joins every thread.

It calls `requests.get`/`requests.post` at module level, as upstream does (a new session and a
new connection per call, about 2 CPU-ms each). Module-level `httpx.get` would cost ~20x that (a new
client and SSL context per call) and make the baseline look slower than the real script.
Differences, none of which changes the timing: `logging` instead of loguru, no tqdm bar, and each
thread records what it did (url, task id, times) so the benchmark can report it.

    python bench/multiserver_baseline.py http://127.0.0.1:8000 http://127.0.0.1:8001 --jobs 16
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass

import requests

log = logging.getLogger("multiserver_baseline")


@dataclass
class TaskRecord:
    index: int
    url: str
    task_id: str | None = None
    submitted: float | None = None  # time.time()
    finished: float | None = None
    success: bool = False


def send_and_monitor_task(url: str, message: dict, record: TaskRecord) -> bool:
    """Send task to server and monitor until completion (upstream's function, same loop)."""
    try:
        response = requests.post(f"{url}/v1/tasks/", json=message, timeout=None)
        record.submitted = time.time()
        task_id = response.json().get("task_id")
        record.task_id = task_id
        if not task_id:
            log.error("No task_id received from %s", url)
            return False
        while True:
            try:
                status_data = requests.get(f"{url}/v1/tasks/{task_id}/status", timeout=None).json()
                task_status = status_data.get("status")
                if task_status == "completed":
                    record.finished, record.success = time.time(), True
                    return True
                elif task_status == "failed":
                    log.error("Task %d (task_id: %s) failed", record.index + 1, task_id)
                    record.finished = time.time()
                    return False
                else:
                    time.sleep(0.5)
            except Exception as e:  # upstream retries forever, whatever the error
                log.error("Failed to check status for task_id %s: %s", task_id, e)
                time.sleep(0.5)
    except Exception as e:
        log.error("Failed to send task to %s: %s", url, e)
        return False


def get_available_urls(urls: list[str]) -> list[str] | None:
    """Check which URLs are available and return the list."""
    available_urls = []
    for url in urls:
        try:
            _ = requests.get(f"{url}/v1/service/status", timeout=None).json()
            available_urls.append(url)
        except Exception:
            continue
    if not available_urls:
        log.error("No available urls.")
        return None
    return available_urls


def find_idle_server(available_urls: list[str]) -> str:
    """Find an idle server from available URLs."""
    while True:
        for url in available_urls:
            try:
                response = requests.get(f"{url}/v1/service/status", timeout=None).json()
                if response["service_status"] == "idle":
                    return url
            except Exception:
                continue
        time.sleep(3)


def process_tasks_async(messages: list[dict], available_urls: list[str]) -> list[TaskRecord]:
    """Process a list of tasks across multiple servers, as upstream's script does."""
    active_threads = []
    records = []
    for idx, message in enumerate(messages):
        server_url = find_idle_server(available_urls)
        record = TaskRecord(idx, server_url)
        records.append(record)
        thread = threading.Thread(target=send_and_monitor_task, args=(server_url, message, record))
        thread.daemon = False
        thread.start()
        active_threads.append(thread)
        # Small delay to let thread start
        time.sleep(0.5)
    for thread in active_threads:
        thread.join()
    return records


def messages_like_upstream(count: int) -> list[dict]:
    """The t2v script's messages: seed 42, a prompt, its negative prompt, a save path."""
    prompts = [
        "A cat walks on the grass, realistic style.",
        "A person is riding a bike. Realistic, Natural lighting, Casual.",
        "A car turns a corner. Realistic, Natural lighting, Casual.",
        "An astronaut is flying in space, Van Gogh style. Dark, Mysterious.",
    ]
    return [
        {"seed": 42, "prompt": prompts[i % len(prompts)], "negative_prompt": "blurry",
         "image_path": "", "save_result_path": f"output_lightx2v_wan_t2v_{i + 1}.mp4"}
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--jobs", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    urls = get_available_urls(args.urls)
    if not urls:
        raise SystemExit(1)
    started = time.time()
    records = process_tasks_async(messages_like_upstream(args.jobs), urls)
    print(f"{sum(r.success for r in records)}/{len(records)} succeeded in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
