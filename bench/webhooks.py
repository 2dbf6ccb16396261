"""Webhook deliveries: how fast the worker sends them, and whether a slow receiver holds up the rest.

`--jobs` finished jobs with a webhook each are put in a real SQLite store; the worker (the one the
gateway runs) records their `job.succeeded` messages and sends them to receivers on 127.0.0.1.
With `--slow-share`, that share of the jobs (the oldest) go to another receiver that answers only
after the attempt's timeout: the others must still arrive at the fast receiver's pace.

    PYTHONPATH=$PWD/src .venv/bin/python bench/webhooks.py --jobs 1000 --slow-share 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import free_port

from x2v_gateway.dispatch import Notifier
from x2v_gateway.metrics import Metrics
from x2v_gateway.settings import Settings
from x2v_gateway.store import JobStore, JobWebhook
from x2v_gateway.webhook_worker import WebhookWorker


class Receiver:
    """Counts what it is sent, and answers after `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.received = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                receiver.received += 1
                time.sleep(delay)
                try:
                    self.send_response(200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.handle_error = lambda request, address: None  # the worker hung up: expected
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def run(jobs: int, slow_share: float, concurrency: int, timeout: float) -> None:
    fast_receiver, slow_receiver = Receiver(), Receiver(delay=timeout + 1)
    slow = int(jobs * slow_share)
    with tempfile.TemporaryDirectory(prefix="x2v-bench-hooks-") as tmp:
        store = JobStore(Path(tmp) / "gateway.db")
        await store.create_key({
            "id": "k1", "name": "bench", "key_hash": "0" * 64, "prefix": "", "admin": False,
            "daily_quota": None, "max_concurrent": None, "rate_per_min": None, "source": "bench",
            "webhook_secret": "whsec_" + "A" * 32,
        }, "bench")
        for n in range(jobs):
            port = slow_receiver.port if n < slow else fast_receiver.port
            hook = JobWebhook(f"http://127.0.0.1:{port}/hook", ("succeeded",), "k1")
            job, _ = await store.create_job(task="t2v", params={"prompt": f"job {n}"}, inputs={}, owner="k1", webhook=hook)
            await store.succeed(job.id, "0" * 64, {"size": 1, "duration": 5.0})
        settings = Settings(data_dir=Path(tmp), private_urls=True, webhook_concurrency=concurrency,
                            webhook_timeout=timeout, webhook_first_retry=60)
        worker = WebhookWorker(settings, store, Notifier(), Metrics())
        started = time.perf_counter()
        await worker.start()
        try:
            while fast_receiver.received < jobs - slow:
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
        finally:
            await worker.stop()
            store.close()
    print(f"{jobs - slow} messages to a fast receiver in {elapsed:.2f} s ({(jobs - slow) / elapsed:.0f}/s), "
          f"beside {slow} to a receiver slower than the {timeout:g} s timeout ({slow_receiver.received} attempts made); "
          f"concurrency {concurrency}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--slow-share", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.slow_share, args.concurrency, args.timeout))


if __name__ == "__main__":
    main()
