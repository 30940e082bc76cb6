"""Optimizers and learning-rate schedules from the config (optax)."""

from __future__ import annotations

from typing import Any, Literal, get_args

import optax
from sdxl_common.errors import BadInput

Optimizer = Literal["adamw", "adafactor", "lion"]
LrSchedule = Literal["constant", "linear", "cosine"]


def learning_rate_schedule(
    peak: float, *, kind: LrSchedule = "constant", warmup_steps: int = 0, total_steps: int = 1
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak``, then constant, linear decay to 0, or cosine decay to 0."""
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "constant":
        after = optax.constant_schedule(peak)
    elif kind == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        raise BadInput(f"lr schedule {kind!r}; choose one of {get_args(LrSchedule)}")
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    name: Optimizer,
    schedule: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW, Adafactor or Lion."""
    if name == "adamw":
        core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adafactor":
        # Factored second moments: optimizer state ~ O(rows + cols) per matrix, the usual choice
        # when AdamW's two full-size moments do not fit next to a 2.6B-parameter UNet.
        core = optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
    elif name == "lion":
        core = optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        raise BadInput(f"optimizer {name!r}; choose one of {get_args(Optimizer)}")
    parts: list[Any] = []
    if max_grad_norm:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(core)
    return optax.chain(*parts)
