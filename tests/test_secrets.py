"""After every other test: no secret a test gateway was given or handed out (API keys, upstream
tokens, session cookies) appears in any log a gateway wrote or any response body a test read.
Those logs and bodies are kept by `gateway_proc.GatewayProcess`, and listed with the secrets in
the run's directory by every test process (gateway_proc.watched). A plain `pytest` runs this file
last (conftest.py); ./dev test runs it on its own, after the parallel run."""

from __future__ import annotations

import re
import time
from pathlib import Path

from gateway_proc import GatewayProcess, remember_secret, watched


def provoke(tmp_path) -> None:
    """A gateway pushed where a careless one leaks: a hosted-cloud token its upstream refuses
    to answer for, DEBUG logging, refused sign-ins and keys, a key made and revoked."""
    token = remember_secret("lx2v-cloud-token-" + "s3cr3t" * 4)
    gateway = GatewayProcess(
        tmp_path / "data", LIGHTX2V_ACCESS_TOKEN=token, LIGHTX2V_BASE_URL="http://127.0.0.1:9",
        X2V_LOG_LEVEL="DEBUG", X2V_REQUEST_TIMEOUT="2",
    ).start()
    try:
        with gateway.client() as admin:
            made = admin.post("/api/v1/keys", json={"name": "leaky"}).json()
            key = remember_secret(made["key"])
            job = admin.post("/api/v1/jobs", json={"task": "t2v", "prompt": "to a cloud that is not there"})
            assert job.status_code == 201, job.text
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not admin.get("/api/v1/nodes").json()[0]["last_error"]:
                time.sleep(0.2)
            assert admin.get("/api/v1/nodes").json()[0]["last_error"]  # the cloud was tried, and failed
            admin.get(f"/api/v1/jobs/{job.json()['id']}")
            admin.get("/api/v1/audit")
            admin.get("/metrics")
            admin.delete(f"/api/v1/keys/{made['info']['id']}")
        with gateway.client(key=key) as revoked:
            assert revoked.get("/api/v1/jobs").status_code == 401
        with gateway.client(key=None) as browser:
            form = browser.get("/ui/sign-in").text
            sign_in_token = re.search(r'name="_sign_in_token" value="([^"]+)"', form).group(1)
            refused = browser.post("/ui/sign-in", data={"_sign_in_token": sign_in_token, "key": key})
            assert refused.status_code == 401
        gateway.sign_in()
    finally:
        gateway.stop()


def test_no_secret_in_any_gateway_log_or_response_body(tmp_path):
    provoke(tmp_path)
    secrets = watched("secrets")
    assert secrets, "no secret was recorded: the check would prove nothing"
    scanned, found = 0, []
    for path in sorted(map(Path, watched("files"))):
        if not path.exists():
            continue
        data = path.read_bytes()
        scanned += len(data)
        for secret in secrets:
            if secret.encode() in data:
                # Never the secret itself in the report: pytest's output is a log too.
                found.append(f"{secret[:6]}… in {path}")
    assert scanned > 0
    assert not found, "secrets leaked:\n" + "\n".join(found)
