"""The least CPU any gateway that hashes an upload and sends it on over loopback can spend per GiB.

    .venv/bin/python bench/upload_floor.py

No gateway here: one thread receives 1 GiB from a loopback socket into a reused buffer, hashes it
(sha256, the content address) and sends it on to another loopback socket, the three steps every
forwarded upload takes, with no parsing, no disk and no Python beyond the loop. Its CPU-seconds per
GiB, step by step, are the floor under `bench/upload.py`'s "gateway CPU-s per GiB".

Then the send alone, two ways: `sendmsg` from memory (what the gateway does), and `os.sendfile`
from a file written with O_DIRECT, as the gateway writes its kept copy (so not in page cache).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

GIB = 1 << 30
CHUNK = 256 * 1024  # what uvloop hands the gateway per read
BLOCK = 4 * 1024 * 1024  # the gateway's direct writes


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def _sink(server: socket.socket) -> None:
    conn, _ = server.accept()
    buf = bytearray(1 << 20)
    while conn.recv_into(buf):
        pass
    conn.close()


def _source(server: socket.socket, data: bytes) -> None:
    conn, _ = server.accept()
    for _ in range(GIB // len(data)):
        conn.sendall(data)
    conn.close()


def floor() -> dict[str, float]:
    """CPU-seconds per GiB of receive, sha256 and send, in one thread."""
    inbound, outbound = _listener(), _listener()
    threads = [threading.Thread(target=_source, args=(inbound, os.urandom(CHUNK))),
               threading.Thread(target=_sink, args=(outbound,))]
    for t in threads:
        t.start()
    inp = socket.create_connection(inbound.getsockname())
    out = socket.create_connection(outbound.getsockname())
    digest, buf = hashlib.sha256(), bytearray(CHUNK)
    view, spent, total = memoryview(buf), {"receive": 0.0, "sha256": 0.0, "send": 0.0}, 0
    while True:
        t0 = time.thread_time()
        n = inp.recv_into(buf)
        t1 = time.thread_time()
        if not n:
            break
        digest.update(view[:n])
        t2 = time.thread_time()
        out.sendall(view[:n])
        t3 = time.thread_time()
        spent["receive"] += t1 - t0
        spent["sha256"] += t2 - t1
        spent["send"] += t3 - t2
        total += n
    out.close()
    for t in threads:
        t.join()
    inp.close()
    inbound.close()
    outbound.close()
    return {step: seconds * GIB / total for step, seconds in spent.items()}


def send_cpu(how: str, path: Path) -> tuple[float, float]:
    """CPU-seconds and seconds to send 1 GiB to a loopback socket, `sendmsg` or `sendfile`."""
    server = _listener()
    sink = threading.Thread(target=_sink, args=(server,))
    sink.start()
    sock = socket.create_connection(server.getsockname())
    cpu, wall = time.thread_time(), time.perf_counter()
    if how == "sendfile":
        fd = os.open(path, os.O_RDONLY)
        offset = 0
        while offset < GIB:
            offset += os.sendfile(sock.fileno(), fd, offset, BLOCK)
        os.close(fd)
    else:
        pieces = [os.urandom(CHUNK) for _ in range(BLOCK // CHUNK)]
        for _ in range(GIB // BLOCK):
            sock.sendmsg(pieces)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    sock.close()
    sink.join()
    server.close()
    return cpu, wall


def main() -> None:
    steps = floor()
    print(f"receive + sha256 + send, one thread: {sum(steps.values()):.2f} CPU-s per GiB ("
          + ", ".join(f"{step} {seconds:.2f}" for step, seconds in steps.items()) + ")")
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        path = Path(tmp) / "kept"
        block = mmap.mmap(-1, BLOCK)
        block.write(os.urandom(BLOCK))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        for offset in range(0, GIB, BLOCK):
            os.pwrite(fd, block, offset)
        os.close(fd)
        for how in ("sendmsg", "sendfile"):
            cpu, wall = send_cpu(how, path)
            print(f"send 1 GiB with {how}: {cpu:.2f} CPU-s, {wall:.2f} s")


if __name__ == "__main__":
    main()
