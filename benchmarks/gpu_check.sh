#!/usr/bin/env bash
# The GPU check, prepared for a machine with one NVIDIA GPU (jax with CUDA and torch installed;
# diffusers and this package's other needs installed from wheels brought along: on an image with
# JAX 0.11 and torch 2.11, flax 0.12.10 or newer, optax, orbax-checkpoint, tensorstore, grain with
# array_record, dill and portpicker, omegaconf and diffusers), sized for a few minutes: cuDNN
# attention against XLA's, then full SDXL at 1024x1024 in bf16 with remat full, batch 8: our step
# with cuDNN attention beside diffusers' step in eager torch and under torch.compile, then ours
# with XLA's attention, all on the same GPU. Results go to $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu_check.sh
#   UNET=tiny RESOLUTION=64 BATCH=8 bash benchmarks/gpu_check.sh   # the same path in seconds, any host
set -euo pipefail
OUT=${OUT:-benchmarks/results}
UNET=${UNET:-sdxl}
RESOLUTION=${RESOLUTION:-1024}
BATCH=${BATCH:-8}
PYTHON=${PYTHON:-python}
# JAX and torch share the GPU in one process: JAX takes memory as its step needs it instead of 75%
# of the card up front, so the diffusers step that follows has the rest.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
step=("$PYTHON" -m benchmarks.train_throughput --unet "$UNET" --resolution "$RESOLUTION" --batch "$BATCH"
      --dtype bfloat16 --remat full --layouts fsdp --scan-layers --warmup 2 --steps 5 --out "$OUT")
if "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  # A shape cuDNN refuses in the attention check would stop the cuDNN step too, after minutes of
  # setting up: then our step runs with XLA's attention only.
  attention=cudnn
  "$PYTHON" -m benchmarks.gpu_attention_check --out "$OUT" || { echo "cuDNN attention failed: our step uses XLA's"; attention=xla; }
  # train_throughput prints each row as soon as it is measured, so a run cut short keeps them.
  "${step[@]}" --attention "$attention" --diffusers eager,compile
  [ "$attention" = xla ] && exit 0
fi
"${step[@]}" --attention xla --diffusers none
