"""A 1 GB speech-to-video upload into an S3 bucket through the gateway: its peak memory, and its
throughput next to uploading the same file straight to the S3 server.

    .venv/bin/python bench/s3_upload.py [--mb 1024] [--runs 3]

Side by side in one run, alternating, against one SeaweedFS server on loopback (tests/s3_server.py):
the WAV put straight into the bucket by obstore in a process of its own (multipart, the parts and
concurrency the gateway uses), and the portrait + WAV posted to a gateway with `X2V_BLOBS=s3://…`,
which hashes it to a temporary file, checks it, uploads it and records the job before it answers
(`X2V_FORWARD_UPLOADS=false`, so that nothing else shares the upload). Then the time until the
node has the job: the gateway reads the WAV back from the bucket as it sends it. Each run's WAV
differs in its last sample, so content addressing cannot skip the upload. Reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import upload
from common import GatewayProcess, NodeProcess, make_big_wav, make_png, median, rss_peak_mb
from s3_server import SeaweedS3

_DIRECT = """
import asyncio, json, resource, sys, time
from pathlib import Path
import obstore
from obstore.store import S3Store
from x2v_gateway.blobs.s3 import PART_BYTES, PARTS_AT_ONCE
import os
endpoint, bucket, key_id, key, path = sys.argv[1:]
store = S3Store(bucket, endpoint=endpoint, region="us-east-1", access_key_id=key_id,
                secret_access_key=os.environ["S3_SECRET"], client_options={"allow_http": True, "timeout": "600s"})
async def put():
    await obstore.put_async(store, key, Path(path), chunk_size=PART_BYTES, max_concurrency=PARTS_AT_ONCE)
started = time.perf_counter()
asyncio.run(put())
print(json.dumps({"seconds": time.perf_counter() - started,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
os._exit(0)  # Python's teardown after obstore aborts one exit in two (see cli._exit_past_obstore)
"""


def vary(audio: Path) -> None:
    """A different last sample: another sha256, so the bucket cannot already hold it."""
    with audio.open("r+b") as handle:
        handle.seek(-2, os.SEEK_END)
        handle.write(secrets.token_bytes(2))


def put_direct(s3: SeaweedS3, audio: Path) -> tuple[float, float]:
    vary(audio)
    os.sync()
    out = subprocess.run(
        [sys.executable, "-c", _DIRECT, s3.endpoint, s3.bucket, s3.access_key_id,
         f"direct/{secrets.token_hex(4)}", str(audio)],
        capture_output=True, text=True, env={**os.environ, "S3_SECRET": s3.secret_access_key},  # not in argv: ps shows it
    )
    if out.returncode:
        raise RuntimeError(f"the direct upload failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-2000:]}")
    result = json.loads(out.stdout)
    return result["seconds"], result["rss_mb"]


def post_gateway(gateway: GatewayProcess, node: NodeProcess, image: Path, audio: Path) -> tuple[float, float]:
    """Seconds until the gateway accepted the job (kept in the bucket), and until the node had it."""
    vary(audio)
    return upload.post_gateway(gateway, node, image, audio)


def empty(s3: SeaweedS3) -> None:
    """Every object of the last run deleted: gigabytes kept would slow the next run's writes
    (and fill the disk). `upload.quiet` does the same for the node's inputs."""
    import obstore

    store = s3.store()
    keys = [meta["path"] for batch in obstore.list(store) for meta in batch]
    if keys:
        obstore.delete(store, keys)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-s3-"))
    s3 = SeaweedS3(root / "s3")
    try:
        image = make_png(root / "face.png", size=(512, 512))
        audio = make_big_wav(root / "voice.wav", args.mb)
        size_mb = audio.stat().st_size / 1024 / 1024
        s3.start()
        node = NodeProcess(root / "node", max_queue_size=100).start()
        gateway = GatewayProcess(
            root / "gw", nodes=f"n1={node.url}", X2V_FORWARD_UPLOADS="false", **s3.settings("blobs"),
        ).start()
        try:
            with gateway.client() as client:
                client.get("/api/v1/jobs").raise_for_status()
            baseline = rss_peak_mb(gateway.proc.pid)
            direct, direct_rss, accepted, on_node = [], [], [], []
            for _ in range(args.runs):
                seconds, rss = put_direct(s3, audio)
                direct.append(seconds)
                direct_rss.append(rss)
                empty(s3)
                a, n = post_gateway(gateway, node, image, audio)
                accepted.append(a)
                on_node.append(n)
                empty(s3)
            peak = rss_peak_mb(gateway.proc.pid)
        finally:
            gateway.stop()
            node.stop()
        d, a, n = median(direct), median(accepted), median(on_node)
        print(f"Upload of {size_mb:.0f} MiB (portrait + WAV) into SeaweedFS S3 on loopback, median of"
              f" {args.runs} runs each, alternating\n")
        print("| path | seconds | MiB/s | relative to direct | peak RSS |")
        print("|---|---|---|---|---|")
        print(f"| straight into the bucket (obstore, its own process) | {d:.2f} | {size_mb / d:.0f} | 100 % |"
              f" {max(direct_rss):.0f} MiB |")
        print(f"| gateway accepts it (hashed, checked, in the bucket, recorded) | {a:.2f} | {size_mb / a:.0f} |"
              f" {d / a:.0%} | {peak:.0f} MiB (after start {baseline:.0f} MiB) |")
        print(f"| gateway, until the node has it (read back from the bucket) | {n:.2f} | {size_mb / n:.0f} |"
              f" {d / n:.0%} | |")
    finally:
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
