"""A real `prefect server start` and the pipeline's served deployment, on loopback, for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from mlflow_server import free_port, stop, wait_healthy

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
T = TypeVar("T")


@contextlib.contextmanager
def spawn(command: list[str], log: Path, env: dict[str, str], cwd: Path,
          sig: int = signal.SIGTERM) -> Iterator[subprocess.Popen]:
    """Start `command` in its own process group with output to `log`; send the group `sig` after."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        stop(process, sig=sig)


@contextlib.contextmanager
def prefect_server(folder: Path, *, timeout_s: float = 90) -> Iterator[str]:
    """`prefect server start` with its own PREFECT_HOME under `folder`; yield the API URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(folder / "home"), "PREFECT_UI_ENABLED": "false"}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = folder / "server.log"
    with spawn(command, log, env, folder) as process:
        wait_healthy(api, process, log, timeout_s)
        yield api


@contextlib.contextmanager
def serve_deployment(api: str, folder: Path, *, name: str, params: Path, root: Path,
                     env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`python -m soup_pipeline.prefect.serve` against `api`; yields once the deployment is registered."""
    log = folder / f"serve-{name}.log"
    command = [sys.executable, "-m", "soup_pipeline.prefect.serve", "--name", name, "--params", str(params),
               "--root", str(root)]
    full_env = {**os.environ, **(env or {}), "PREFECT_API_URL": api}
    with spawn(command, log, full_env, folder) as process:
        poll(lambda: deployment(api, name), timeout_s=90, process=process, log=log)
        yield process


@contextlib.contextmanager
def worker(api: str, folder: Path, *, pool: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool POOL` against `api`; stopped with SIGINT (it ignores SIGTERM for long)."""
    log = folder / f"worker-{pool}.log"
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    with spawn(command, log, {**os.environ, **(env or {}), "PREFECT_API_URL": api}, folder,
               sig=signal.SIGINT) as process:
        yield process


def flow_run_states(api: str, flow_run_id: str) -> list[str]:
    """The names of every state a flow run went through, oldest first."""
    with urllib.request.urlopen(f"{api}/flow_run_states/?flow_run_id={flow_run_id}", timeout=10) as response:
        states = json.loads(response.read())
    return [state["name"] for state in sorted(states, key=lambda state: state["timestamp"])]


def cli(api: str, *args: str, cwd: Path | None = None) -> str:
    """Run the `prefect` CLI against `api`; return its output, failing with it when the command fails."""
    done = subprocess.run([sys.executable, "-m", "prefect", *args], env={**os.environ, "PREFECT_API_URL": api},
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    if done.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def api_get(api: str, path: str) -> dict | None:
    """GET `api`/`path` as JSON; None on 404."""
    try:
        with urllib.request.urlopen(f"{api}/{path}", timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def deployment(api: str, name: str) -> dict | None:
    """The deployment `soup-pipeline/<name>`, or None while it is not registered."""
    return api_get(api, f"deployments/name/soup-pipeline/{name}")


def finished_flow_run(api: str, flow_run_id: str) -> dict | None:
    """The flow run once it is in a terminal state, else None."""
    run = api_get(api, f"flow_runs/{flow_run_id}")
    return run if run and run["state"] and run["state"]["type"] in TERMINAL else None


def poll(probe: Callable[[], T | None], *, timeout_s: float, process: subprocess.Popen | None = None,
         log: Path | None = None, interval_s: float = 1.0) -> T:
    """Call `probe` until it returns something; fail after `timeout_s` or if `process` exits (showing `log`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if (value := probe()) is not None:
            return value
        time.sleep(interval_s)
    tail = log.read_text()[-3000:] if log is not None else ""
    raise AssertionError(f"gave up after {timeout_s} s waiting for {probe}:\n{tail}")
