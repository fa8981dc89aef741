#!/usr/bin/env bash
# Every GPU figure docs/memory-and-speed.md states, in one run (about ten minutes on one GPU): the inner step of
# Learned-Soup+, HL-Soup+ and MEHL-Soup+ against a fine-tuning step at b = 2 and 18 (fused and per tensor), peak
# memory for K = 4 and 32, the merge methods' peak, ingredients held in bfloat16 against float32, and fine-tuning and
# evaluation images per second with 0 and 2 DataLoader workers in float32 and bf16 autocast. Writes the
# Markdown tables, headed by the card's name and the commit, to --out (default benchmarks/gpu-figures.md).
#
#   bash benchmarks/gpu.sh                   # on the GPU (ViT-B-32 at 224 pixels, random weights)
#   bash benchmarks/gpu.sh --device cpu      # its own smoke test: the same runs on a tiny model, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
out=benchmarks/gpu-figures.md
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1 (use --device cuda|cpu, --out FILE)" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python}
if [ "$device" = cpu ]; then
  model=(--arch soup-tiny-vit --image-size 32 --batch 8 --steps 2)
  ks_big=8; b_big=8                            # the smoke test's K and b in place of 32 and 18
  throughput=(--images 128)
else
  model=(--arch ViT-B-32 --image-size 224 --batch 32 --steps 4)
  ks_big=32; b_big=18
  throughput=(--arch ViT-B-32 --image-size 224 --images 1024 --batch 128)
fi
bench=("$python" benchmarks/soup_memory.py "${model[@]}" --device "$device"
       --workdir "${TMPDIR:-/tmp}/soup-gpu-bench")

card=$("$python" -c "import torch; print(torch.cuda.get_device_name(0) if '$device' != 'cpu' else 'CPU only')")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "no git")
{
  echo "# GPU figures: $card, commit $commit, $(date -u +%Y-%m-%d)"
  echo
  echo "## Inner step against a fine-tuning step, b = 2 and $b_big, fused"
  "${bench[@]}" --ks "$b_big" --bs 2 "$b_big"
  echo
  echo "## The same, per tensor"
  "${bench[@]}" --ks "$b_big" --bs 2 "$b_big" --per-tensor --skip learned_soup_plus
  echo
  echo "## Peak memory, K = 4 and $ks_big, b = 2, and the merge methods"
  "${bench[@]}" --ks 4 "$ks_big" --bs 2 --merges
  echo
  echo "## Ingredients held in bfloat16 (storage_dtype) against the float32 rows above, K = $ks_big"
  "${bench[@]}" --ks "$ks_big" --bs 2 --storage-dtype bfloat16 --skip learned_soup_plus hl_soup_plus
  echo
  echo "## Fine-tuning and evaluation throughput: 0 and 2 DataLoader workers, float32 and bf16 autocast"
  "$python" benchmarks/throughput.py "${throughput[@]}" --device "$device" --precisions float32 bf16
} | tee "$out"
if grep -q "| failed:" "$out"; then
  echo "gpu.sh: some configurations failed (see $out)" >&2
  exit 1
fi
