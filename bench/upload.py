"""A 1 GB speech-to-video upload: the gateway's CPU per GiB, its peak memory, and its throughput
next to the node's, on a machine kept equally busy for every path.

    .venv/bin/python bench/upload.py [--mb 1024] [--runs 5] [--load 0.5] [--base OTHER/src] [--whole]

Side by side in one run, alternating: the same portrait + 1 GB WAV posted straight to a demo
node's `/v1/tasks/video/form`; to the gateway's `/api/v1/jobs`, which sends it on to the same
node's form route while it arrives (and stores and checks it); with `--base`, to a second gateway
running another checkout's sources (the code before a change); with `--whole`, to a gateway with
`X2V_FORWARD_UPLOADS=false`, which receives it whole before sending it. Reports medians.

`--load` keeps one core busy that fraction of the time (a child process of this script, started
before the first upload and stopped after the last, so every path runs beside the same load):
the gateway's extra CPU shows in its throughput only when the machine has none to spare.
CPU-seconds come from /proc (utime + stime), for the gateway's whole process and per thread: its
event loop (the main thread) and the rest (the blob writer, `to_thread` workers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import GatewayProcess, NodeProcess, make_big_wav, make_png, median, rss_peak_mb

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")

# A core busy `duty` of every 10 ms: a steady neighbour, the same for every path measured.
BURNER = """
import sys, time
duty = float(sys.argv[1])
while True:
    start = time.monotonic()
    while time.monotonic() - start < 0.010 * duty:
        pass
    time.sleep(0.010 * (1 - duty))
"""


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


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU-seconds (user + system) of each thread of `pid` so far."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            # The command name may hold spaces and parentheses: the fields start after the last ')'.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return seconds


class CpuMeter:
    """CPU-seconds a process spent between `start()` and `stop()`: all of it, its main thread
    (the event loop), and the node's."""

    def __init__(self, pid: int, node_pid: int) -> None:
        self.pid, self.node_pid = pid, node_pid
        self.total: list[float] = []
        self.loop: list[float] = []
        self.node: list[float] = []

    def start(self) -> None:
        self._before = thread_cpu(self.pid), thread_cpu(self.node_pid)

    def stop(self) -> None:
        # A moment for what follows the node's answer (the blob's commit, the temporary file).
        time.sleep(0.3)
        after, node_after = thread_cpu(self.pid), thread_cpu(self.node_pid)
        before, node_before = self._before
        # A thread that ended between the two readings is lost; one that began counts whole.
        self.total.append(sum(after[t] - before.get(t, 0) for t in after))
        self.loop.append(after[self.pid] - before[self.pid])
        self.node.append(sum(node_after[t] - node_before.get(t, 0) for t in node_after))


def post_direct(node: NodeProcess, image: Path, audio: Path, meter: CpuMeter) -> float:
    quiet(node)
    meter.start()
    started = time.perf_counter()
    with image.open("rb") as i, audio.open("rb") as a, httpx.Client(timeout=600) as client:
        response = client.post(
            f"{node.url}/v1/tasks/video/form",
            data={"prompt": "bench", "seed": "1"},
            files={"image_file": ("face.png", i), "audio_file": ("voice.wav", a)},
        )
    response.raise_for_status()
    elapsed = time.perf_counter() - started
    meter.stop()
    return elapsed


def post_gateway(
    gateway: GatewayProcess, node: NodeProcess, image: Path, audio: Path, meter: CpuMeter
) -> tuple[float, float]:
    """Seconds until the gateway accepted the job, and until the node had it."""
    quiet(node)
    meter.start()
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
    on_node = time.perf_counter() - started
    meter.stop()
    return accepted, on_node


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class Way:
    """One way of getting the upload to the node, and what each run of it measured."""

    def __init__(self, label: str, gateway: GatewayProcess | None, node: NodeProcess) -> None:
        self.label, self.gateway = label, gateway
        assert node.proc is not None
        self.meter = CpuMeter(gateway.proc.pid if gateway and gateway.proc else node.proc.pid, node.proc.pid)
        self.accepted: list[float] = []
        self.on_node: list[float] = []
        self.baseline_rss = rss_peak_mb(gateway.proc.pid) if gateway and gateway.proc else 0.0

    def run(self, node: NodeProcess, image: Path, audio: Path) -> None:
        if self.gateway is None:
            self.on_node.append(post_direct(node, image, audio, self.meter))
        else:
            a, n = post_gateway(self.gateway, node, image, audio, self.meter)
            self.accepted.append(a)
            self.on_node.append(n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load", type=float, default=0.5,
                        help="fraction of one core a background process keeps busy (0: none)")
    parser.add_argument("--base", type=Path, help="src/ of another checkout, measured beside this one")
    parser.add_argument("--whole", action="store_true", help="also a gateway with X2V_FORWARD_UPLOADS=false")
    args = parser.parse_args()
    this_src = HERE.parent / "src"
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-upload-"))
    started: list[GatewayProcess] = []
    burner = None
    try:
        image = make_png(root / "face.png", size=(512, 512))
        audio = make_big_wav(root / "voice.wav", args.mb)
        size_mb = audio.stat().st_size / 1024 / 1024
        gib = audio.stat().st_size / 1024**3
        node = NodeProcess(root / "node", max_queue_size=100).start()

        def gateway(name: str, src: Path, **settings: str) -> GatewayProcess:
            g = GatewayProcess(root / name, nodes=f"n1={node.url}", PYTHONPATH=str(src.resolve()), **settings)
            started.append(g.start())
            with g.client() as client:
                client.get("/api/v1/jobs").raise_for_status()
            return g

        paths = [Way("straight to the node (`/v1/tasks/video/form`)", None, node)]
        if args.base:
            paths.append(Way(f"gateway before (`{args.base}`), until the node has it", gateway("gw-base", args.base), node))
        this = Way("gateway, this code, until the node has it", gateway("gw", this_src), node)
        paths.append(this)
        if args.whole:
            paths.append(Way("gateway with `X2V_FORWARD_UPLOADS=false`, until the node has it",
                               gateway("gw-whole", this_src, X2V_FORWARD_UPLOADS="false"), node))
        if args.load > 0:
            burner = subprocess.Popen([sys.executable, "-c", BURNER, str(args.load)])
        try:
            for round_ in range(args.runs):
                # The gateways take turns at going first, right after the direct upload.
                gateways = paths[1:] if round_ % 2 == 0 else paths[:0:-1]
                for p in [paths[0], *gateways]:
                    p.run(node, image, audio)
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
        peaks = {p.label: rss_peak_mb(p.gateway.proc.pid) for p in paths if p.gateway and p.gateway.proc}
        checker = max(rss_peak_mb(pid) for pid in children(this.gateway.proc.pid))
    finally:
        for g in started:
            g.stop()
        node.stop()
        shutil.rmtree(root, ignore_errors=True)

    direct = median(paths[0].on_node)
    print(f"Upload of {size_mb:.0f} MiB (portrait + WAV), median of {args.runs} runs each, alternating;"
          f" background load {args.load:.0%} of one core; load average {os.getloadavg()[0]:.1f}"
          f" on {os.cpu_count()} cores at the end\n")
    print("| path | seconds | MiB/s | relative to direct | gateway CPU-s per GiB (event loop + other threads) | node CPU-s per GiB |")
    print("|---|---|---|---|---|---|")
    for p in paths:
        t = median(p.on_node)
        cpu = "" if p.gateway is None else (
            f"{median(p.meter.total) / gib:.2f} ({median(p.meter.loop) / gib:.2f}"
            f" + {median([a - b for a, b in zip(p.meter.total, p.meter.loop)]) / gib:.2f})")
        print(f"| {p.label} | {t:.2f} | {size_mb / t:.0f} | {direct / t:.0%} | {cpu} | {median(p.meter.node) / gib:.2f} |")
    print()
    for p in paths[1:]:
        paired = sorted(d / n for d, n in zip(paths[0].on_node, p.on_node))
        print(f"- {p.label}: accepted after {median(p.accepted):.2f} s; each run relative to the direct"
              f" upload of its round: " + ", ".join(f"{r:.0%}" for r in paired)
              + f"; peak RSS {peaks[p.label]:.0f} MiB (after start {p.baseline_rss:.0f})")
    print(f"- the media checker process of this code's gateway: {checker:.0f} MiB")


if __name__ == "__main__":
    main()
