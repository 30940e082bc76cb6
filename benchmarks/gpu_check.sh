#!/usr/bin/env bash
# The GPU check, prepared for a machine with one NVIDIA GPU (jax with CUDA and torch installed;
# diffusers, transformers and this package installed from wheels brought along), sized for a few
# minutes: cuDNN attention against XLA's, then full SDXL at 1024x1024 in bf16 with remat full,
# batch 8: our step (cuDNN attention, then XLA's) against diffusers' step in eager torch and under
# torch.compile, all on the same GPU. Results go to $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu_check.sh
#   UNET=tiny RESOLUTION=64 BATCH=8 bash benchmarks/gpu_check.sh   # the same path in seconds, any host
set -euo pipefail
OUT=${OUT:-benchmarks/results}
UNET=${UNET:-sdxl}
RESOLUTION=${RESOLUTION:-1024}
BATCH=${BATCH:-8}
PYTHON=${PYTHON:-python}
step=("$PYTHON" -m benchmarks.train_throughput --unet "$UNET" --resolution "$RESOLUTION" --batch "$BATCH"
      --dtype bfloat16 --remat full --layouts fsdp --scan-layers --warmup 2 --steps 5 --out "$OUT")
if "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  "$PYTHON" -m benchmarks.gpu_attention_check --out "$OUT"
  "${step[@]}" --attention cudnn --torch-compile
fi
"${step[@]}" --attention xla --no-diffusers
