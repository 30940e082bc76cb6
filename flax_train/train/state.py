"""The training state: what it holds, how it starts, and its shapes alone (for restoring and
for compiling ahead of time without creating a weight)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_train import config as config_lib, lora, models, optim, sharding
from flax_train.train.model import lora_unet, unet_options


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: nnx.State  # what is trained, param_dtype (fp32 by default): the UNet, or its LoRA factors
    opt_state: Any
    ema: nnx.State | None  # exponential moving average of params (None when EMA is off)
    rng: jax.Array  # raw uint32 PRNG key; per-step keys are folded in from the step number
    skipped: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient


@flax.struct.dataclass
class LoraTrainState(TrainState):
    """A LoRA run's state: ``params`` are the LoRA factors, and ``frozen`` the UNet's own weights
    (with ``lora.train_text_encoder`` also both text encoders') in the compute dtype, never
    updated. They travel with the state through the compiled step (an input, not a constant
    compiled into it) but are no part of a checkpoint, which holds the plain TrainState
    (``trainable``): they come from model.pretrained again. A subclass rather than a field of
    TrainState, so that a full fine-tune's checkpoints keep their tree (and older ones still
    restore)."""

    frozen: nnx.State


def _train_state_fields(state: TrainState) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}


def trainable(state: TrainState) -> TrainState:
    """What a checkpoint holds: the state without any frozen weights."""
    return TrainState(**_train_state_fields(state))


def with_frozen(state: TrainState, frozen: nnx.State | None) -> TrainState:
    """``state`` with LoRA's frozen weights beside it (as it is for ``frozen=None``)."""
    return state if frozen is None else LoraTrainState(**_train_state_fields(state), frozen=frozen)


def frozen_of(state: TrainState) -> nnx.State | None:
    return state.frozen if isinstance(state, LoraTrainState) else None


def build_optimizer(cfg: config_lib.Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    t = cfg.train
    lr = optim.learning_rate_schedule(
        t.learning_rate, kind=t.lr_schedule, warmup_steps=t.warmup_steps, total_steps=t.max_steps
    )
    tx = optim.make_optimizer(
        t.optimizer,
        lr,
        b1=t.betas[0],
        b2=t.betas[1],
        eps=t.eps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
    )
    return tx, lr


def initial_state_fn(cfg: config_lib.Config, tx: optax.GradientTransformation) -> Callable[[nnx.State], TrainState]:
    def init(params: nnx.State) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema=jax.tree.map(jnp.copy, params) if cfg.train.ema.enabled else None,
            rng=jax.random.PRNGKey(cfg.train.seed),
            skipped=jnp.zeros((), jnp.int32),
        )

    return init


def build_state(
    cfg: config_lib.Config,
    params: nnx.State,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: dict[str, Any],
    frozen: nnx.State | None = None,
) -> tuple[TrainState, Any]:
    """The initial TrainState, sharded; and the sharding tree of the state for jit and restore.
    ``frozen``: LoRA's frozen UNet weights, kept as they are (already sharded)."""
    init = initial_state_fn(cfg, tx)
    state_shardings = sharding.tree_shardings(jax.eval_shape(init, params), mesh, rules)
    param_shardings = sharding.tree_shardings(params, mesh, rules)
    state = jax.jit(init, in_shardings=(param_shardings,), out_shardings=state_shardings)(params)
    if frozen is not None:
        state = with_frozen(state, frozen)
        state_shardings = with_frozen(state_shardings, sharding.tree_shardings(frozen, mesh, rules))
    return state, state_shardings


def abstract_state(
    cfg: config_lib.Config,
    architecture: dict[str, Any],
    text_configs: dict[str, dict[str, Any]] | None = None,
    *,
    frozen: bool = False,
) -> tuple[nnx.GraphDef, TrainState]:
    """The graph of the model ``cfg`` trains and its TrainState as shapes and dtypes alone, from
    the UNet's ``architecture`` (and ``text_configs``, see ``model.text_encoder_configs``) without
    creating a weight: what a checkpoint restores into, and what ahead-of-time compiles take.
    ``frozen``: LoRA's frozen weights beside the state, as the step takes it (a checkpoint holds
    the state without them)."""
    tx, _ = build_optimizer(cfg)
    frozen_weights = None
    if cfg.train.method == "lora":
        graphdef, params, rest = lora.split(nnx.eval_shape(lambda: lora_unet(cfg, architecture, text_configs)))
        frozen_weights = rest if frozen else None
    else:
        graphdef, params = nnx.split(models.abstract(architecture, **unet_options(cfg)), nnx.Param)
    return graphdef, with_frozen(jax.eval_shape(initial_state_fn(cfg, tx), params), frozen_weights)
