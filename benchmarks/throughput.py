"""Images per second of fine-tuning and evaluation, read by 0 and 2 DataLoader workers, in float32 and bfloat16.

The data are an image folder of PNGs (the digits, upscaled to --png-size pixels, so every image is decoded and resized
by the pipeline's own transform, as a team's photos would be) read the way the pipeline reads it
(`core.reading.read_batches`); the model is a seeded random open_clip image tower with a linear head (throughput
needs no trained weights). Fine-tuning is `training.finetune.train_loop` (AdamW steps); evaluation is
`evaluation.scoring.model_outputs`. Each figure is the second of two passes (the first sets up lazily), and each pass
starts its own worker processes, as the pipeline's epochs do. Prints a Markdown table.

    python benchmarks/throughput.py                                                   # this CPU, float32
    python benchmarks/throughput.py --arch ViT-B-32 --image-size 224 --device cuda --precisions float32 bf16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from soup_pipeline.core.batches import forward, to_device
from soup_pipeline.core.data import digits_arrays, digits_preprocess, image_folder_dataset
from soup_pipeline.core.models import classifier_spec
from soup_pipeline.core.portable_classifier import classifier_from_spec, image_transform
from soup_pipeline.evaluation.scoring import model_outputs
from soup_pipeline.runtime.devices import resolve_device
from soup_pipeline.runtime.precision import autocast
from soup_pipeline.runtime.randomness import OwnGlobalRNG
from soup_pipeline.training.finetune import train_loop


def write_folder(root: Path, images: int, size: int) -> Path:
    """`images` digits as RGB PNGs of `size` pixels under root/CLASS/; returns root."""
    pixels, labels = digits_arrays()
    for i in range(images):
        digit = Image.fromarray((pixels[i % len(pixels)] * 255 / 16).astype(np.uint8)).convert("RGB")
        folder = root / str(int(labels[i % len(labels)]))
        folder.mkdir(parents=True, exist_ok=True)
        digit.resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
    return root


def timed(device: torch.device, run) -> float:
    """Seconds of `run()` (the GPU's queue drained before the clock stops)."""
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def finetune_rate(args, dataset, device: torch.device, workers: int, precision: str) -> float:
    """Images per second of one fine-tuning pass (the second of two)."""
    torch.manual_seed(0)
    model = classifier_from_spec(classifier_spec(args.arch, 10)).to(device)
    stamps = [time.perf_counter()]

    def loss_fn(images, labels):
        with autocast(precision, device):
            logits = forward(model, to_device(images, device))
        return F.cross_entropy(logits.float(), labels.to(device))

    def on_epoch(epoch: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    train_loop(model, dataset, loss_fn, epochs=2, batch_size=args.batch, lr=1e-5, weight_decay=0.0, warmup_frac=0.0,
               generator=torch.Generator().manual_seed(0), rng=OwnGlobalRNG(0, device), desc="benchmark",
               on_epoch=on_epoch, workers=workers, device=device)
    return len(dataset) / (stamps[2] - stamps[1])


def evaluation_rate(args, dataset, device: torch.device, workers: int, precision: str) -> float:
    """Images per second of one evaluation pass (the second of two)."""
    torch.manual_seed(0)
    model = classifier_from_spec(classifier_spec(args.arch, 10)).to(device)
    seconds = [timed(device, lambda: model_outputs(model, dataset, args.batch, device, workers=workers,
                                                   precision=precision)) for _ in range(2)]
    return len(dataset) / seconds[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="soup-tiny-vit")
    parser.add_argument("--image-size", type=int, default=32, help="the model's input size (the transform's)")
    parser.add_argument("--png-size", type=int, default=256, help="pixels of each PNG on disk")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--precisions", nargs="+", default=["float32"], choices=["float32", "bf16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory(prefix="soup-throughput-") as folder:
        dataset = image_folder_dataset(write_folder(Path(folder), args.images, args.png_size),
                                       image_transform(digits_preprocess(args.image_size)))
        print(f"{args.arch} at {args.image_size} px, {args.images} PNGs of {args.png_size} px, batch {args.batch}, "
              f"{card}, torch {torch.__version__}\n")
        print("| precision | workers | fine-tuning images/s | evaluation images/s |")
        print("|---|---:|---:|---:|")
        for precision in args.precisions:
            for workers in args.workers:
                train = finetune_rate(args, dataset, device, workers, precision)
                evaluate = evaluation_rate(args, dataset, device, workers, precision)
                print(f"| {precision} | {workers} | {train:.0f} | {evaluate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
