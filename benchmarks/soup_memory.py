"""Peak memory and time per inner step of Learned-Soup+, HL-Soup+ and MEHL-Soup+ against a fine-tuning step,
and the peak memory and time of the merge methods (task arithmetic, TIES, DARE, DARE-TIES, Model Stock, WiSE-FT).

Ingredients are one random open_clip image tower perturbed K times (memory and time need no
trained weights). Every configuration runs in a fresh process (or, with --worlds, in fresh
torchrun groups of that many ranks: gloo on a CPU, NCCL on GPUs); peak memory is measured above
each process's baseline (CPU RSS by sampling; the CUDA allocator peak on a GPU) and reported for
the rank that peaked highest, beside the ingredient bytes one rank held. Prints a Markdown table.
Examples (the tables of docs/memory-and-speed.md; the last, the merge methods alone at K = 4 and 32
on the small ViT-S-32 tower):

    python benchmarks/soup_memory.py --arch ViT-B-32 --ks 4 8 16 32 --bs 1 2 4 --device cuda
    python benchmarks/soup_memory.py --arch ViT-B-32 --ks 8 --bs 4 --worlds 1 2 --device cpu --batch 8 --steps 3
    python benchmarks/soup_memory.py --arch ViT-S-32 --ks 4 32 --batch 8 --steps 3 --device cpu --merges \
        --skip learned_soup_plus hl_soup_plus mehl_soup_plus

A merge method is timed over one point of its grid (the construction and the select-data score of
one candidate; a grid of n points costs about n times that), from theta_0 = the unperturbed init.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from soup_pipeline.core.ingredients import IngredientStore, save_ingredient
from soup_pipeline.core.models import classifier_spec
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.runtime.devices import resolve_device
from soup_pipeline.runtime.meters import measure
from soup_pipeline.runtime.placement import device_for
from soup_pipeline.soups import Objective, params_from, run_method
from soup_pipeline.soups.engine.distributed import process_group

NUM_CLASSES = 10
MERGES = ("task_arithmetic", "ties", "dare", "dare_ties", "model_stock", "wise_ft")
ONE_POINT = {"task_arithmetic": {"scales": [0.3]}, "ties": {"scales": [1.0], "densities": [0.2]},
             "dare": {"scales": [0.3], "drops": [0.5]}, "dare_ties": {"scales": [1.0], "drops": [0.5]},
             "model_stock": {"groupings": ["tensor"]}, "wise_ft": {"alphas": [0.5]}}


def init_state(arch: str) -> dict[str, torch.Tensor]:
    """The seeded random init every benchmark ingredient perturbs (theta_0 of the merge methods)."""
    torch.manual_seed(0)
    return classifier_from_spec(classifier_spec(arch, NUM_CLASSES)).state_dict()


def make_ingredients(folder: Path, arch: str, K: int, image_size: int, dtype: str | None) -> list[Path]:
    """K perturbations (relative scale 1e-2) of one seeded random init, written in `dtype` (float32 when None:
    72 ViT-L-14 towers take 87 GB in float32, 43 GB in bfloat16); reused when already on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{arch}-{dtype or 'float32'}-{k:03d}.safetensors" for k in range(K)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        base = init_state(arch)
        file_dtype = getattr(torch, dtype or "float32")
        for path in missing:
            k = int(path.stem.rsplit("-", 1)[1])
            gen = torch.Generator().manual_seed(1000 + k)
            state = {key: (v + 1e-2 * v.std().nan_to_num(1.0) * torch.randn(v.shape, generator=gen)).to(file_dtype)
                     if v.is_floating_point() and v.numel() > 1 else v for key, v in base.items()}
            save_ingredient(state, path, meta={"fit_acc": 0.5, "base_model": f"{arch}-random"})
    return paths


def heldout(image_size: int, batch: int, steps: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch * steps, 3, image_size, image_size, generator=gen)
    return TensorDataset(images, torch.randint(0, NUM_CLASSES, (batch * steps,), generator=gen))


class StepClock:
    """Wraps the loss: a timestamp per call; a step is the time between consecutive calls in a block."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, logits, targets):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.nn.functional.cross_entropy(logits, targets)

    def step_seconds(self, steps_per_block: int) -> float:
        """Median step time within blocks; the run's first gap (lazy CUDA / autograd set-up) is left out."""
        gaps = [b - a for i, (a, b) in enumerate(zip(self.stamps, self.stamps[1:])) if (i + 1) % steps_per_block]
        return statistics.median(gaps[1:]) if len(gaps) > 1 else float("nan")


def finetune_floor(args, device: torch.device) -> dict:
    """One plain fine-tuning step (forward, backward, AdamW) on the same model and batch."""
    model = classifier_from_spec(classifier_spec(args.arch, NUM_CLASSES)).to(device).train()
    data = heldout(args.image_size, args.batch, 1)
    images, labels = data.tensors[0].to(device), data.tensors[1].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    with measure(device) as meter:
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return {"step_s": statistics.median(times[1:]), "peak_bytes": meter.peak_bytes, "ingredient_bytes": model_bytes}


def run_one(args) -> dict:
    """One configuration in this process; returns its measurements."""
    device = device_for(args.device, 0, "--device")
    if args.method == "finetune":
        return finetune_floor(args, device)
    paths = make_ingredients(Path(args.workdir), args.arch, args.K, args.image_size, args.storage_dtype)
    store = IngredientStore(paths, storage_dtype=getattr(torch, args.storage_dtype) if args.storage_dtype else None)
    clock = StepClock(device)
    objective = Objective(lambda: classifier_from_spec(classifier_spec(args.arch, NUM_CLASSES)),
                          heldout(args.image_size, args.batch, args.steps),
                          select=heldout(args.image_size, args.batch, 1),
                          batch_size=args.batch, loss_fn=clock)
    settings = dict(device=args.device, model_batch=args.b, passes=1.0, epochs=1, batch_size=args.batch,
                    prefetch=not args.no_prefetch, storage_dtype=args.storage_dtype, fused_step=not args.per_tensor,
                    search=ONE_POINT.get(args.method))
    params = params_from(args.method, {key: value for key, value in settings.items() if value is not None})
    options = {"anchor": init_state(args.arch)} if args.method in MERGES else {}
    with process_group(device) as ranks:
        result = run_method(args.method, store, objective, params, **options)
    steps_per_block = result.info.get("steps_per_block", result.info.get("steps"))
    step_s = clock.step_seconds(steps_per_block) if steps_per_block else float("nan")
    return {"step_s": step_s, "peak_bytes": result.peak_bytes, "seconds": result.seconds,
            "resident_peak": store.peak_resident_count, "resident_peak_bytes": store.peak_resident_bytes,
            "ingredient_bytes": store.ingredient_bytes(), "rank": ranks.rank}


def configurations(args) -> list[tuple[str, int, int, int]]:
    """(method, K, b, ranks): the fine-tuning floor, then per K Learned-Soup+, HL-Soup+ and MEHL-Soup+ per b and world
    size (and, with --merges, each merge method)."""
    rows = [("finetune", 0, 0, 1)]
    for K in args.ks:
        rows.append(("learned_soup_plus", K, K, 1))
        rows.append(("hl_soup_plus", K, K, 1))
        rows += [("mehl_soup_plus", K, b, world) for b in args.bs if b <= K for world in args.worlds]
        rows += [(method, K, 0, 1) for method in MERGES] if args.merges else []
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--bs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32, help="held-out mini-batch size")
    parser.add_argument("--steps", type=int, default=4, help="inner steps per block")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--storage-dtype", default=None, choices=[None, "bfloat16", "float16", "float32"])
    parser.add_argument("--no-prefetch", action="store_true")
    parser.add_argument("--per-tensor", action="store_true", help="the per-tensor inner step instead of the fused one")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1], help="MEHL-Soup+ on this many ranks (torchrun)")
    parser.add_argument("--merges", action="store_true", help="also the merge methods, one grid point each")
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out, e.g. learned_soup_plus")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "soup-bench-ingredients"))
    parser.add_argument("--one", nargs=4, metavar=("METHOD", "K", "B", "REPORT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        args.method, args.K, args.b = args.one[0], int(args.one[1]), int(args.one[2])
        row = run_one(args)
        Path(args.one[3], f"rank-{row.get('rank', 0)}.json").write_text(json.dumps(row))
        return
    make_ingredients(Path(args.workdir), args.arch, max(args.ks), args.image_size, args.storage_dtype)
    model_bytes = None
    floor = None
    print(f"arch {args.arch}, batch {args.batch}, {args.steps} steps per block, device {resolve_device(args.device)}, "
          f"storage {args.storage_dtype or 'file dtype'}, prefetch {not args.no_prefetch}, "
          f"inner step {'per tensor' if args.per_tensor else 'fused'}")
    print("| method | K | b | ranks | peak memory per rank (GiB) | peak / model size | ingredients held per rank (GiB) "
          "| time per inner step (s) | step / fine-tune step | construction (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    passthrough = [f"--arch={args.arch}", f"--image-size={args.image_size}", f"--batch={args.batch}",
                   f"--steps={args.steps}", f"--device={args.device}", f"--workdir={args.workdir}"]
    passthrough += [f"--storage-dtype={args.storage_dtype}"] if args.storage_dtype else []
    passthrough += ["--no-prefetch"] if args.no_prefetch else []
    passthrough += ["--per-tensor"] if args.per_tensor else []
    for method, K, b, world in configurations(args):
        if method in args.skip:
            continue
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"] if world > 1 else []
        with tempfile.TemporaryDirectory() as reports:
            out = subprocess.run([sys.executable, *launcher, __file__, "--one", method, str(K), str(b), reports,
                                  *passthrough], capture_output=True, text=True)
            ranks = [json.loads(path.read_text()) for path in sorted(Path(reports).glob("rank-*.json"))]
        if out.returncode != 0 or not ranks:
            print(f"| {method} | {K} | {b} | {world} | failed: {out.stderr.strip().splitlines()[-1][:80]} | | | | | |",
                  flush=True)
            continue
        row = min(ranks, key=lambda r: r.get("rank", 0))  # rank 0's clock
        peak = max(r["peak_bytes"].get("cuda", r["peak_bytes"]["cpu_rss"]) for r in ranks)
        held = max(r.get("resident_peak_bytes", 0) for r in ranks)
        if method == "finetune":
            floor = row["step_s"]
        model_bytes = row.get("ingredient_bytes", model_bytes)
        ratio = f"{peak / model_bytes:.1f}" if model_bytes else ""
        speed = f"{row['step_s'] / floor:.2f}" if floor and row["step_s"] == row["step_s"] else ""
        step = f"{row['step_s']:.3f}" if row["step_s"] == row["step_s"] else ""  # NaN: a merge method has no steps
        print(f"| {method} | {K or ''} | {b or ''} | {world} | {peak / 2**30:.2f} | {ratio} | {held / 2**30:.2f} "
              f"| {step} | {speed} | {row.get('seconds', 0):.1f} |", flush=True)


if __name__ == "__main__":
    main()
