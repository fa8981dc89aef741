"""Stage `soup@METHOD` (and `refine@METHOD`, a soup built on another): build one soup from the sweep's ingredients
and write it with its mixing weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..config import Params, SoupSettings
from ..runtime.errors import SoupError
from ..runtime.kill_points import armed, reached
from ..runtime.lock import LOCK_HELD_ENV
from ..runtime.placement import device_for, rank_devices
from ..soups import SoupResult, get_spec, run_method
from ..soups.engine.base import Objective, model_at, role_metrics
from ..soups.engine.distributed import launched_world, process_group
from ..workspace.loading import load_splits, open_anchor, open_store, soup_objective
from ..workspace.paths import StagePaths
from ..workspace.results import INFO_KEYS, read_result, write_result


def soup_metrics(result: SoupResult, objective: Objective, device) -> dict:
    """The numbers a soup is judged by before test data is touched: loss and accuracy on the fit and
    select roles, and K x L against the fit size."""
    return {
        "method": result.method,
        "K": len(result.ingredient_names),
        "L": len(result.layer_names),
        "coefficients": result.beta.numel(),
        "fit_size": len(objective.fit),
        "select_size": len(objective.select),
        **role_metrics(model_at(objective, result.state_dict, device), objective, device),
        **{k: v for k, v in result.info.items() if k in INFO_KEYS},
    }


def soup_device(params: Params, method: str) -> torch.device:
    """Where soup `method` is built (`runtime.placement`): dealt by its place in `soup.built` over the GPUs its
    `device` spreads over (`auto` and `cuda`: every visible one), a torchrun rank on its own GPU, else the CPU."""
    return device_for(params.soup.method(method).device, params.soup.built.index(method), "soup.device")


def soup_devices(params: Params, method: str) -> list[str]:
    """Every device soup `method` occupies on this node: its own (`soup_device`), or, launched on several processes,
    the GPU of each local rank."""
    settings = params.soup.method(method)
    if get_spec(method).distributed and settings.nproc * settings.nnodes > 1:
        return rank_devices(settings.device, settings.nproc, "soup.device")
    return [str(soup_device(params, method))]


def run(params: Params, root: str | Path, method: str) -> SoupResult:
    """Run `method` and write runs/soups/METHOD/{soup.safetensors, beta.json, metrics.json, history.json}
    (and search.json, the candidate table, when the grouping was chosen on select data): the same
    bytes for the same inputs on a CPU. Its seconds, peak memory and processes go to runs/costs/soup-METHOD.json.

    With `nproc` > 1 (or `nnodes` > 1) a method that runs distributed is launched on that many processes (per node)
    by torchrun (one per GPU on a GPU machine, gloo on the CPU); every rank ends with the same soup, and the first
    rank of each node writes the files into that node's root, read back here.
    """
    paths = StagePaths(Path(root))
    settings = params.soup.method(method)
    spec = get_spec(method)
    if spec.distributed and settings.nproc * settings.nnodes > 1 and launched_world() == 1:
        launch(params, paths, method, settings)
        return read_result(paths, method)
    device = soup_device(params, method)
    settings = settings.model_copy(update={"device": str(device)})  # the method runs where it was placed
    store = open_store(params, paths, settings=settings)
    objective = soup_objective(params, store, load_splits(params), settings)
    options = {"resume_dir": paths.runs / "resume" / method} if spec.resumable else {}
    if spec.anchored:
        options["anchor"] = open_anchor(paths, store)
    if spec.refines:
        options["soup"] = read_result(paths, settings.soup)
    if spec.resumable and armed("mehl-block"):
        options["on_step"] = lambda event: reached("mehl-block") if event.position > 0 else None
    with process_group(device) as ranks:
        result = run_method(method, store, objective, settings, **options)
    if ranks.leader:
        write_result(result, paths, soup_metrics(result, objective, device), store.ingredients[0].meta,
                     processes=ranks.world)
    return result


def launch(params: Params, paths: StagePaths, method: str, settings: SoupSettings) -> None:
    """`soup-pipeline soup --method METHOD` on `nproc` processes under torchrun, with these very params: on this node
    alone, or as one of `nnodes` nodes meeting at the c10d rendezvous `rdzv_endpoint`."""
    given_params = json.dumps(params.model_dump(mode="json"))  # JSON is YAML: the CLI reads it as its params file
    with tempfile.TemporaryDirectory(prefix="soup-params-") as folder:
        given, error_file = Path(folder) / "params.json", Path(folder) / "torchrun-error.json"
        given.write_text(given_params)
        command = [sys.executable, "-m", "torch.distributed.run", *placement(method, settings, given_params),
                   f"--nproc-per-node={settings.nproc}", "-m", "soup_pipeline.cli", "--params", str(given),
                   "--root", str(paths.root), "soup", "--method", method]
        # torchrun's agent writes to its error file the error it stops on itself, such as other nodes never joining
        env = {**os.environ, LOCK_HELD_ENV: "1", "TORCHELASTIC_ERROR_FILE": str(error_file)}
        done = subprocess.run(command, env=env)
        unmet = rendezvous_error(error_file) if done.returncode != 0 else None
    if unmet is not None:
        raise SoupError(f"{method}: not all {settings.nnodes} nodes joined the rendezvous at {settings.rdzv_endpoint} "
                        f"within join_timeout={settings.join_timeout} s ({unmet}). Start `soup-pipeline soup --method "
                        f"{method}` with the same params on every node, each able to reach {settings.rdzv_endpoint}, "
                        "within that time of each other (or raise join_timeout)")
    if done.returncode != 0:
        nodes = f"{settings.nnodes} nodes x " if settings.nnodes > 1 else ""
        raise SoupError(f"{method} on {nodes}{settings.nproc} processes failed (torchrun exit code {done.returncode}); "
                        "the log above names the rank and its error. Finished blocks are kept: rerun to resume after "
                        "the last one")


def rendezvous_error(error_file: Path) -> str | None:
    """The rendezvous error torchrun's agent gave up on before starting any rank (named in its error file), None for
    any other end."""
    message = json.loads(error_file.read_text()).get("message") if error_file.is_file() else None
    name = message["message"].split(":")[0] if isinstance(message, dict) else ""
    return name if name.startswith("Rendezvous") else None


def placement(method: str, settings: SoupSettings, given_params: str) -> list[str]:
    """torchrun's options placing this node: alone (`--standalone`), or among `nnodes` nodes meeting at the c10d
    rendezvous `rdzv_endpoint` under one id that every node derives alike (the method and a digest of the params)."""
    if settings.nnodes == 1:
        return ["--standalone"]
    run_id = f"soup-{method}-{hashlib.sha256(given_params.encode()).hexdigest()[:16]}"
    return [f"--nnodes={settings.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={settings.rdzv_endpoint}",
            f"--rdzv-id={run_id}", f"--rdzv-conf=join_timeout={settings.join_timeout}", "--max-restarts=0"]
