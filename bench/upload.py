"""A 1 GB speech-to-video upload: the gateway's peak memory, and its throughput next to the node's.

    .venv/bin/python bench/upload.py [--mb 1024] [--runs 5]

Side by side in one run, alternating: the same portrait + 1 GB WAV posted straight to a demo
node's `/v1/tasks/video/form`; to the gateway's `/api/v1/jobs`, which sends it on to the same
node's form route while it arrives (and stores and checks it); and to a second gateway with
`X2V_FORWARD_UPLOADS=false`, which receives it whole before sending it. Reports medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from common import GatewayProcess, NodeProcess, make_big_wav, make_png, median, rss_peak_mb


def quiet(node: NodeProcess) -> None:
    """Start every upload on an equally quiet machine.

    * The demo node renders each task it gets: wait until it is idle, or one path would be
      measured while the node renders the other's video.
    * The node keeps every upload it saved (as LightX2V does). On this VM, page cache in guest
      memory never touched before costs several times more to write than recycled memory, so
      gigabytes of kept inputs would make every later upload slower than the first, whichever
      path it took. The finished tasks' inputs are deleted, and the disk synced, before each run.
    """
    deadline = time.monotonic() + 300
    while httpx.get(f"{node.url}/v1/service/status").json()["service_status"] != "idle":
        if time.monotonic() > deadline:
            raise RuntimeError("the node is still busy after 300 s")
        time.sleep(0.1)
    for path in (node.data_dir / "inputs").rglob("*"):
        if path.is_file():
            path.unlink()
    os.sync()


def post_direct(node: NodeProcess, image: Path, audio: Path) -> float:
    quiet(node)
    started = time.perf_counter()
    with image.open("rb") as i, audio.open("rb") as a, httpx.Client(timeout=600) as client:
        response = client.post(
            f"{node.url}/v1/tasks/video/form",
            data={"prompt": "bench", "seed": "1"},
            files={"image_file": ("face.png", i), "audio_file": ("voice.wav", a)},
        )
    response.raise_for_status()
    return time.perf_counter() - started


def post_gateway(gateway: GatewayProcess, node: NodeProcess, image: Path, audio: Path) -> tuple[float, float]:
    """Seconds until the gateway accepted the job, and until the node had it."""
    quiet(node)
    started = time.perf_counter()
    with image.open("rb") as i, audio.open("rb") as a, gateway.client(timeout=600) as client:
        response = client.post(
            "/api/v1/jobs", data={"task": "s2v", "prompt": "bench"},
            files={"image": ("face.png", i), "audio": ("voice.wav", a)},
        )
    response.raise_for_status()
    accepted = time.perf_counter() - started
    job_id = response.json()["id"]
    # The node's /form route picks its own task id; the gateway's id is the save_result_path.
    while not any(e["request"].get("save_result_path") == job_id for e in node.submissions()):
        time.sleep(0.02)
    return accepted, time.perf_counter() - started


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-upload-"))
    try:
        image = make_png(root / "face.png", size=(512, 512))
        audio = make_big_wav(root / "voice.wav", args.mb)
        size_mb = audio.stat().st_size / 1024 / 1024
        node = NodeProcess(root / "node", max_queue_size=100).start()
        # The gateway as it ships, and one that receives each upload whole before sending it.
        gateway = GatewayProcess(root / "gw", nodes=f"n1={node.url}").start()
        whole = GatewayProcess(root / "gw-whole", nodes=f"n1={node.url}", X2V_FORWARD_UPLOADS="false").start()
        try:
            for g in (gateway, whole):
                with g.client() as client:
                    client.get("/api/v1/jobs").raise_for_status()
            baseline = rss_peak_mb(gateway.proc.pid)
            direct, accepted, on_node, whole_on_node = [], [], [], []
            for _ in range(args.runs):
                direct.append(post_direct(node, image, audio))
                a, n = post_gateway(gateway, node, image, audio)
                accepted.append(a)
                on_node.append(n)
                whole_on_node.append(post_gateway(whole, node, image, audio)[1])
            peak = rss_peak_mb(gateway.proc.pid)
            checker = max(rss_peak_mb(pid) for pid in children(gateway.proc.pid))
        finally:
            gateway.stop()
            whole.stop()
            node.stop()
        d, a, n, w = median(direct), median(accepted), median(on_node), median(whole_on_node)
        print(f"Upload of {size_mb:.0f} MiB (portrait + WAV), median of {args.runs} runs each, alternating\n")
        print("| path | seconds | MiB/s | relative to direct |")
        print("|---|---|---|---|")
        print(f"| straight to the node (`/v1/tasks/video/form`) | {d:.2f} | {size_mb / d:.0f} | 100 % |")
        print(f"| gateway accepts it (stored, checked, recorded) | {a:.2f} | {size_mb / a:.0f} | {d / a:.0%} |")
        print(f"| gateway, until the node has it | {n:.2f} | {size_mb / n:.0f} | {d / n:.0%} |")
        print(f"| gateway with `X2V_FORWARD_UPLOADS=false`, until the node has it | {w:.2f} | {size_mb / w:.0f} | {d / w:.0%} |")
        paired = sorted(dd / nn for dd, nn in zip(direct, on_node))
        print("\nEach run, until the node has it, relative to the direct upload just before it: "
              + ", ".join(f"{r:.0%}" for r in paired))
        print(f"\nGateway peak RSS: {peak:.0f} MiB, {peak * 1.048576:.1f} MB (baseline after start {baseline:.0f} MiB,"
              f" growth {peak - baseline:.0f} MiB); its media checker process: {checker:.0f} MiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
