"""cuDNN's fused attention against XLA's, on one GPU: outputs and gradients at SDXL's attention
shapes (bf16), and each one's time. Part of ``benchmarks/gpu_check.sh``; needs a GPU.

    python -m benchmarks.gpu_attention_check [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

# (name, batch, query tokens, key tokens, heads, head width): SDXL at 1024px, 8 images per step.
SHAPES = (
    ("self 64x64 latents", 8, 4096, 4096, 10, 64),
    ("self 32x32 latents", 8, 1024, 1024, 20, 64),
    ("cross to 77 text tokens", 8, 4096, 77, 10, 64),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from flax_train.models.layers import dot_product_attention

    if jax.default_backend() != "gpu":
        raise SystemExit("cuDNN attention needs a GPU; this host's JAX backend is " + jax.default_backend())
    rows = []
    for name, batch, q_len, k_len, heads, width in SHAPES:
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (batch, q_len, heads, width), jnp.bfloat16)
        k, v = (jax.random.normal(key, (batch, k_len, heads, width), jnp.bfloat16) for key in keys[1:3])
        cotangent = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
        out, grads, seconds, failed = {}, {}, {}, {}
        for impl in ("xla", "cudnn"):
            def loss(q, k, v, impl=impl):
                o = dot_product_attention(q, k, v, implementation=impl)
                return jnp.sum(o.astype(jnp.float32) * cotangent.astype(jnp.float32)), o

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            try:  # a shape one kernel refuses is reported, and the other shapes still run
                (_, out[impl]), grads[impl] = jax.block_until_ready(step(q, k, v))
            except Exception as error:
                failed[impl] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                continue
            start = time.perf_counter()
            for _ in range(args.repeats):
                result = step(q, k, v)
            jax.block_until_ready(result)
            seconds[impl] = (time.perf_counter() - start) / args.repeats

        def error(a, b):  # largest difference relative to the reference's largest magnitude
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

        row = {"shape": name, "batch": batch, "query_tokens": q_len, "key_tokens": k_len, "heads": heads, "head_dim": width}
        if failed:
            rows.append({**row, "failed": failed})
            print(f"{name:24s} failed: {failed}")
            continue
        row.update({
            "output_relative_error": error(out["cudnn"], out["xla"]),
            "grad_relative_error": max(error(a, b) for a, b in zip(grads["cudnn"], grads["xla"])),
            "xla_forward_backward_s": seconds["xla"], "cudnn_forward_backward_s": seconds["cudnn"],
            "cudnn_speedup": seconds["xla"] / seconds["cudnn"],
        })  # fmt: skip
        rows.append(row)
        print(f"{name:24s} output err {row['output_relative_error']:.2e}  grad err {row['grad_relative_error']:.2e}  "
              f"xla {seconds['xla'] * 1e3:.2f} ms  cudnn {seconds['cudnn'] * 1e3:.2f} ms  ({row['cudnn_speedup']:.2f}x)")
    device = jax.devices()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_attention_{device.device_kind.replace(' ', '_')}.json"
    path.write_text(json.dumps({"benchmark": "gpu_attention_check", "date": datetime.date.today().isoformat(),
                                "device": device.device_kind, "jax": jax.__version__, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    if any("failed" in row for row in rows):
        raise SystemExit("cuDNN or XLA attention failed at a shape above")


if __name__ == "__main__":
    main()
