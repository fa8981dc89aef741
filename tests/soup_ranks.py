"""One rank of a distributed toy soup, run by torchrun from the tests (or alone, as the reference).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/soup_ranks.py OUT METHOD [--crash-at BLOCK]

The test makes the ingredients first (`toys.toy_ingredients(OUT / "ingredients", K)`). Every rank writes
OUT/rank-R.json (what it held and its result's digest); rank 0 also writes OUT/result.safetensors (coefficients,
beta and the soup). A crash is raised by rank 1 (or the only rank) at the first step of block BLOCK.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soup_pipeline.core.ingredients import IngredientStore  # noqa: E402
from soup_pipeline.runtime.devices import resolve_device
from soup_pipeline.soups import run_method  # noqa: E402
from soup_pipeline.soups.engine.distributed import Ranks, process_group  # noqa: E402
from toys import params_for, toy_objective  # noqa: E402

SETTINGS = dict(device="cpu", batch_size=32, passes=1.0, lr=0.05, seed=3, model_batch=3, model_epochs=2, prefetch=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("method")
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--grad-clip", type=float, default=None)
    args = parser.parse_args()
    with process_group(resolve_device("cpu")) as ranks:
        store = IngredientStore(sorted((args.out / "ingredients").glob("*.safetensors")))  # made by the test
        # as the stage sets it
        params = params_for(args.method, **SETTINGS, grad_clip=args.grad_clip, nproc=ranks.world)
        crash_rank = min(1, ranks.world - 1)

        def crash(event):
            if event.position == args.crash_at and event.step == 0 and ranks.rank == crash_rank:
                raise RuntimeError(f"simulated crash of rank {ranks.rank} in block {event.position}")

        hook = {"on_step": crash} if args.crash_at is not None else {}
        result = run_method(args.method, store, toy_objective(), params, resume_dir=args.out / "resume", **hook)
        record = {"rank": ranks.rank, "world": ranks.world, "peak_resident_count": store.peak_resident_count,
                  "peak_resident_bytes": store.peak_resident_bytes, "ingredient_bytes": store.ingredient_bytes(),
                  "beta_sum": float(result.beta.sum()), "blocks_reused": result.info.get("blocks_reused", 0)}
        (args.out / f"rank-{ranks.rank}.json").write_text(json.dumps(record))
        if Ranks.current().leader:
            save_file({"coefficients": result.info["coefficients"].contiguous(), "beta": result.beta.contiguous(),
                       **{f"soup.{k}": v.contiguous() for k, v in result.state_dict.items()}},
                      str(args.out / "result.safetensors"))


if __name__ == "__main__":
    main()
