"""moto's S3 server on loopback, for the remote-storage benchmark and tests (``moto[server]``,
a development dependency, imported only when a server is started)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def options(endpoint: str, *, fast_fail: bool = False) -> dict[str, Any]:
    """s3fs storage_options for ``endpoint``; ``fast_fail``: one attempt, short timeouts."""
    opts: dict[str, Any] = {
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    if fast_fail:
        opts["config_kwargs"] = {
            "connect_timeout": 1,
            "read_timeout": 1,
            "retries": {"max_attempts": 1, "mode": "standard"},
        }
    return opts


class MotoServer:
    """moto's S3 server on a free 127.0.0.1 port, for as long as the test session runs."""

    def __init__(self) -> None:
        env = {**os.environ, **CREDENTIALS}
        for _ in range(5):  # the free port may be taken between the probe and the bind
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError("moto's S3 server did not start")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return True
            time.sleep(0.1)
        return False

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self) -> str:
        """Create a bucket through the S3 API; return its name."""
        name = f"tk-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
