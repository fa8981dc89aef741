"""Stage `soup@METHOD` (and `refine@METHOD`, a soup built on another): build one soup from the sweep's ingredients
and write it with its mixing weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import Params
from ..runtime.devices import rank_device, resolve_device
from ..runtime.errors import SoupError
from ..runtime.kill_points import armed, reached
from ..runtime.lock import LOCK_HELD_ENV
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


def run(params: Params, root: str | Path, method: str) -> SoupResult:
    """Run `method` and write runs/soups/METHOD/{soup.safetensors, beta.json, metrics.json, history.json}
    (and search.json, the candidate table, when the grouping was chosen on select data): the same
    bytes for the same inputs on a CPU. Its seconds, peak memory and processes go to runs/costs/soup-METHOD.json.

    With `nproc` > 1 a method that runs distributed is launched on that many processes by torchrun
    (one per GPU on a GPU machine, gloo on the CPU); rank 0 writes the files, read back here.
    """
    paths = StagePaths(Path(root))
    settings = params.soup.method(method)
    spec = get_spec(method)
    if settings.nproc > 1 and spec.distributed and launched_world() == 1:
        launch(params, paths, method, settings.nproc)
        return read_result(paths, method)
    store = open_store(params, paths, settings=settings)
    objective = soup_objective(params, store, load_splits(params), settings)
    options = {"resume_dir": paths.runs / "resume" / method} if spec.resumable else {}
    if spec.anchored:
        options["anchor"] = open_anchor(paths, store)
    if spec.refines:
        options["soup"] = read_result(paths, settings.soup)
    if spec.resumable and armed("mehl-block"):
        options["on_step"] = lambda event: reached("mehl-block") if event.position > 0 else None
    device = rank_device(resolve_device(settings.device))
    with process_group(device) as ranks:
        result = run_method(method, store, objective, settings, **options)
    if ranks.leader:
        write_result(result, paths, soup_metrics(result, objective, device), store.ingredients[0].meta,
                     processes=ranks.world)
    return result


def launch(params: Params, paths: StagePaths, method: str, nproc: int) -> None:
    """`soup-pipeline soup --method METHOD` on `nproc` processes under torchrun, with these very params."""
    with tempfile.TemporaryDirectory(prefix="soup-params-") as folder:
        given = Path(folder) / "params.json"  # JSON is YAML: the CLI reads it as its params file
        given.write_text(json.dumps(params.model_dump(mode="json")))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "soup_pipeline.cli", "--params", str(given), "--root", str(paths.root), "soup",
                   "--method", method]
        done = subprocess.run(command, env={**os.environ, LOCK_HELD_ENV: "1"})
    if done.returncode != 0:
        raise SoupError(f"{method} on {nproc} processes failed (torchrun exit code {done.returncode}); the log above "
                        "names the rank and its error. Finished blocks are kept: rerun to resume after the last one")
