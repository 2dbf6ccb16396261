"""What a person sees on a fresh checkout: the commands the README and the gateway's start-up
output show work as written from the repo directory, the start-up lines say once what listens
where, and the built-in demo node's polls do not flood the terminal.

The checkout is a copy of `./dev` next to a `.venv` that `./dev serve` would have set up (its
`x2v-gateway` runs this tree's sources), so `./dev` itself runs exactly as a person runs it.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import loopback
from gateway_proc import GatewayProcess, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# `./dev` commands that serve until stopped, and the client's (they need a gateway with jobs:
# tests/test_client.py runs them for real): checked with `--help` (the command exists and `./dev`
# hands it over); the rest run for real.
# Commands that serve, or that talk to a gateway or read the user's files: shown with --help.
SERVING = {"serve", "demo-node", "submit", "watch", "download", "cancel", "retry", "pipeline", "copy-blobs", "migrate-store"}
# `./dev` commands of its own, not the CLI's.
DEV_ONLY = {"test", "bench"}
READY = "x2v-gateway is ready."


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The repo directory after `./dev serve` set up `.venv` (so `./dev` installs nothing)."""
    root = tmp_path / "repo"
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(REPO / "dev", root / "dev")
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    script = root / ".venv" / "bin" / "x2v-gateway"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m x2v_gateway.cli "$@"\n')
    script.chmod(0o755)
    stamp = root / ".venv" / ".installed"
    stamp.touch()
    later = (root / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (later, later))
    return root


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("X2V_", "LIGHTX2V_"))}
    env.update(PYTHONPATH=str(REPO / "src"), X2V_DATA_DIR=str(data_dir), **extra)
    return env


def _commands(text: str) -> list[str]:
    """Every command shown as code, in order: lines of ```sh blocks, `inline` spans and the
    `$(...)` in them."""
    shown = []
    for block, span in re.findall(r"```sh\n(.*?)```|`([^`\n]+)`", text, flags=re.S):
        if block:
            shown += [line.split(" #", 1)[0].strip() for line in block.splitlines()]
        else:
            shown += [span, *re.findall(r"\$\(([^)]*)\)", span)]
    return [c for c in shown if c]


def _run(checkout: Path, command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A shown command, typed in a shell in the repo directory."""
    args = shlex.split(command)
    if args[1] in SERVING:
        args.append("--help")
    return subprocess.run(
        ["bash", "-c", shlex.join(args)], cwd=checkout, env=env, capture_output=True, text=True,
        timeout=60,
    )


def test_every_cli_command_in_the_readme_works_as_written_from_the_repo_directory(checkout, tmp_path):
    shown = _commands(README.read_text())
    # `x2v-gateway` itself is not on PATH in a checkout: "command not found".
    bare = [c for c in shown if re.match(r"x2v-gateway\s", c)]
    assert not bare, f"the README shows commands that a checkout has no `x2v-gateway` for: {bare}"
    cli = [c for c in shown if c.startswith("./dev ") and c.split()[1] not in DEV_ONLY]
    assert any(c.startswith("./dev keys create") for c in cli), "the README shows no way to make a key"

    env = _env(tmp_path / "data")
    for command in cli:
        result = _run(checkout, command, env)
        assert result.returncode == 0, f"`{command}` failed:\n{result.stdout}{result.stderr}"
        if command.startswith("./dev keys create"):
            # Alone on stdout, so `KEY=$(./dev keys create ...)` keeps the key and nothing else.
            assert re.fullmatch(r"x2v_\S{43}\n", result.stdout), result.stdout
    listed = _run(checkout, "./dev keys list", env).stdout
    assert re.search(r"\balice\b.*\d{4}-\d\d-\d\d \d\d:\d\d\s*$", listed, re.M), "alice is not revoked:\n" + listed

    # The CLI's own hints name the command that works here too.
    again = _run(checkout, "./dev keys revoke alice", env)
    assert again.returncode == 1
    hinted = re.findall(r"`([^`]+)`", again.stderr)
    assert hinted == ["./dev keys list"], again.stderr
    assert _run(checkout, hinted[0], env).returncode == 0


def _block(log: str) -> dict[str, str]:
    assert log.count(READY) == 1, f"the start-up block is not there once:\n{log}"
    return dict(re.findall(r"^  (\S+(?: \S+)?) {2,}(.+)$", log.split(READY, 1)[1], re.M))


def _read_until(fd: int, done: re.Pattern[str], timeout: float = 60.0) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while not done.search(seen.decode(errors="replace")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no start-up block in {timeout:g} s:\n{seen.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the process is gone and the terminal closed
                raise AssertionError(f"the gateway stopped:\n{seen.decode(errors='replace')}") from None
    return seen.decode(errors="replace").replace("\r\n", "\n")


def test_first_start_in_a_terminal_shows_commands_that_work_and_says_once_where_it_listens(checkout, tmp_path):
    """`./dev serve` on a terminal, the first start: the admin key and what to run next."""
    data_dir, port = tmp_path / "data", free_port()
    env = _env(data_dir, X2V_PORT=str(port))
    terminal, their_end = pty.openpty()
    proc = subprocess.Popen(
        ["bash", "dev", "serve"], cwd=checkout, env=env, stdin=subprocess.DEVNULL,
        stdout=their_end, stderr=their_end, start_new_session=True,
    )
    os.close(their_end)
    try:
        shown = _read_until(terminal, re.compile(r"\n  data +\S+\r?\n"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        os.close(terminal)

    assert "It is shown once" in shown
    block = _block(shown)
    url = f"http://127.0.0.1:{port}"
    assert block["gateway"] == url
    assert block["dashboard"] == f"{url}/ui/"
    assert block["API docs"] == f"{url}/schema"
    assert block["upstreams"].startswith("the built-in demo node, http://127.0.0.1:")
    assert block["data"] == str(data_dir)

    commands = [c for c in re.findall(r"`([^`]+)`", shown) if "x2v-gateway" in c or c.startswith("./dev")]
    assert commands == ["./dev keys create --name NAME"], shown
    for command in commands:
        result = _run(checkout, command, env)
        assert result.returncode == 0, f"`{command}` failed:\n{result.stdout}{result.stderr}"


def test_demo_node_polls_stay_out_of_the_gateway_output_and_its_errors_do_not(tmp_path):
    gateway = GatewayProcess(tmp_path / "data", X2V_DEMO_JOB_SECONDS="0.5").start()
    try:
        with gateway.client() as client:
            ids = [client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"p{i}"}).json()["id"] for i in range(3)]
            for job_id in ids:
                assert wait_for(client, job_id, {"succeeded"})["state"] == "succeeded"
        demo_url = re.match(r"the built-in demo node, (http://\S+)", _block(gateway.log())["upstreams"])[1]
        # The demo node listens where the block says; garbage makes uvicorn warn, on its thread.
        assert loopback.get(f"{demo_url}/v1/service/status").status_code == 200
        demo = httpx.URL(demo_url)
        with socket.create_connection((demo.host, demo.port)) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            raw.recv(1024)
        deadline = time.monotonic() + 10
        while "Invalid HTTP request" not in gateway.log() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        gateway.stop()

    log = gateway.log()
    block = _block(log)
    assert block["gateway"] == gateway.url
    assert block["data"] == str(gateway.data_dir)
    # Some twenty status polls went to the demo node; none of them is a line.
    assert not re.search(r'"(GET|POST|DELETE) /v1/', log), log
    assert log.count("Uvicorn running on") == 1, log  # the gateway's, not the node's
    # The gateway's own access log is still on (X2V_LOG_LEVEL=INFO), and the node's warnings too.
    assert '"POST /api/v1/jobs HTTP/1.1" 201' in log
    assert "Invalid HTTP request received" in log


def test_start_up_block_counts_configured_nodes(tmp_path):
    nodes = f"gpu0=http://127.0.0.1:{free_port()},gpu1=http://127.0.0.1:{free_port()}"
    gateway = GatewayProcess(tmp_path / "data", nodes=nodes).start()
    gateway.stop()
    assert _block(gateway.log())["upstreams"] == "2 self-hosted nodes"
