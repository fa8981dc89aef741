"""Start a real `mlflow server` on loopback (SQLite backend, artifacts under a given folder) for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(uri: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `uri`/health until it answers 200; raise with the server log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server at {uri} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, timeout_s: float = 15, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to the server's process group (mlflow runs uvicorn as a child), then wait; SIGKILL if stuck."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def serve_mlflow(root: Path, *, timeout_s: float = 60) -> Iterator[str]:
    """Run `mlflow server` with `root`/mlflow.db and `root`/artifacts; yield its http URI; stop it after."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # else 8 job/huey processes start
    log = root / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_healthy(uri, process, log, timeout_s)
        yield uri
    finally:
        stop(process)
