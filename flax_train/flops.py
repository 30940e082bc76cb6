"""FLOPs counted from a program's jaxpr: the matrix products and convolutions it runs.

Two figures feed the trainer's utilisation metrics (see ``metrics.throughput``):

- **Model FLOPs** of a training step: 3 x the UNet's forward pass (forward, and a backward of
  twice its cost) per image, whatever the step recomputes. This is the numerator of MFU as the
  PaLM paper defines it (Chowdhery et al., 2022, appendix B), so MFU compares across remat
  settings and attention kernels. The forward is counted with XLA attention, whose products are
  visible in the jaxpr (a Pallas or cuDNN kernel is one opaque call).
- **Hardware FLOPs** are counted from the compiled step's optimized HLO
  (``flax_train.hlo_cost``): what the chip executes, recomputation included, each loop body
  (scanned layers, gradient accumulation's micro-batches) as often as it runs. XLA's own cost
  analysis counts a loop body once.

Only ``dot_general`` and ``conv_general_dilated`` are counted (2 FLOPs per multiply-add), as
torch's FlopCounterMode counts matrix products and convolutions; elementwise work, norms and
softmax are left out, as in published MFU figures. A convolution counts every kernel tap, those on
its zero padding too, as torch does; XLA's cost analysis leaves the padding taps out (16% fewer for
a 3x3 convolution on an 8x8 map, 1% on SDXL's 128x128 latents at 1024px) and adds elementwise
work, so the two counts differ by a few percent in either direction.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
from flax import nnx


def jaxpr_flops(jaxpr: Any) -> float:
    """FLOPs of the products and convolutions in ``jaxpr`` (a Jaxpr or ClosedJaxpr) and every
    program nested in it, a ``scan``'s body as often as it runs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        inner = [jaxpr_flops(sub) for sub in _nested(eqn.params)]
        if not inner:
            continue
        if name == "cond":  # one branch runs
            total += max(inner)
        elif name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


def _nested(params: Mapping[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
                found.append(item)
    return found


def _dot_flops(eqn: Any) -> float:
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    depth = math.prod(lhs[d] for d in lhs_contracting)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * depth


def _conv_flops(eqn: Any) -> float:
    numbers = eqn.params["dimension_numbers"]
    kernel = eqn.invars[1].aval.shape
    # rhs_spec: (output feature dim, input feature dim, spatial dims...); the kernel's input
    # features are already per group, so this is the multiply-adds behind one output element.
    in_features, *spatial = numbers.rhs_spec[1:]
    per_output = kernel[in_features] * math.prod(kernel[d] for d in spatial)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def unet_forward_flops(unet: nnx.Module, inputs: Mapping[str, jax.ShapeDtypeStruct]) -> float:
    """FLOPs of one forward pass of ``unet`` (abstract is enough: nothing is computed) on one
    sample of ``inputs``: ``latents``, ``prompt_embeds``, ``pooled_prompt_embeds``, ``add_time_ids``
    (a batch's shapes; the batch dimension is replaced by 1)."""
    graphdef, state = nnx.split(unet)
    one = {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in inputs.items()}

    def forward(state, latents, prompt_embeds, pooled, time_ids):
        model = nnx.merge(graphdef, state)
        return model(latents, jnp.zeros((1,), jnp.int32), prompt_embeds, text_embeds=pooled, time_ids=time_ids)

    closed = jax.make_jaxpr(forward)(
        state, one["latents"], one["prompt_embeds"], one["pooled_prompt_embeds"], one["add_time_ids"]
    )
    return jaxpr_flops(closed)
