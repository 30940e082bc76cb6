"""SDXL's text conditioning from prompts laid out in chunks and weighted, in JAX: the sampler's
(`flax_train.sampling.Generator`) text encoding, the same as xla_infer's (`xla_infer/graphs.py`).

The host lays each text out (`sdxl_common.prompt_weights.text_arrays`: token ids in N chunks of 77,
each token's weight, compel's extra passes); here every array is data, so a new prompt, weight or
length within the N chunks compiles nothing. Each encoder reads each chunk as a sequence of its
own; the chunks' hidden states follow each other along the tokens (the UNet's cross-attention
takes any number), and the pooled embedding is the first chunk's, as A1111 and compel take it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def encode_text(text_encoder: Any, text_encoder_2: Any, text_1: dict[str, jax.Array], text_2: dict[str, jax.Array],
                *, chunks: int, weighting: str | None,
                empty_ids: tuple[jax.Array | None, jax.Array | None] = (None, None)) -> tuple[jax.Array, jax.Array]:
    """(prompt_embeds (rows, chunks * length, D1 + D2), pooled (rows, P)) of each encoder's
    `text_arrays` input. ``weighting`` ("a1111", "compel" or None) applies the weights the inputs
    carry; compel's also needs each encoder's empty prompt (``empty_ids``, (1, length))."""
    # SDXL conditions on the penultimate layer of both encoders and the projected pooled output of the second.
    hidden_1, _ = _encode_chunks(text_encoder, text_1, chunks, weighting, empty_ids[0])
    hidden_2, pooled = _encode_chunks(text_encoder_2, text_2, chunks, weighting, empty_ids[1])
    return jnp.concatenate([hidden_1, hidden_2], axis=-1), pooled


def _encode_chunks(encoder: Any, text: dict[str, jax.Array], chunks: int, weighting: str | None,
                   empty_ids: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """One encoder's (rows, chunks * length, dims) penultimate hidden states, weighted, and its
    projected pooled output of each row's first chunk (None for an encoder without a projection)."""
    rows = text["ids"].shape[0]
    ids = text["ids"].reshape(rows * chunks, -1)
    if weighting == "compel":
        hidden, pooled = _compel(encoder, text, ids, empty_ids)
    else:
        out = encoder(ids)
        hidden, pooled = out.hidden_states[-2], getattr(out, "text_embeds", None)
        if weighting == "a1111":
            hidden = _a1111(hidden, text["weights"].reshape(ids.shape))
    pooled = None if pooled is None else pooled.reshape(rows, chunks, -1)[:, 0]
    return hidden.reshape(rows, -1, hidden.shape[-1]), pooled


def _a1111(hidden: jax.Array, weights: jax.Array) -> jax.Array:
    """A1111's emphasis (its "Original" mode): each token's hidden state times its weight, then the
    chunk scaled back to the mean it had unweighted (over each prompt's chunk, as xla_infer: an
    image does not depend on its batch)."""
    unweighted = hidden.astype(jnp.float32)
    weighted = unweighted * weights[..., None].astype(jnp.float32)
    scale = unweighted.mean(axis=(1, 2), keepdims=True) / weighted.mean(axis=(1, 2), keepdims=True)
    return (weighted * scale).astype(hidden.dtype)


def _compel(encoder: Any, text: dict[str, jax.Array], ids: jax.Array,
            empty_ids: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """compel's weighting (sdxl_common.prompt_weights.compel_downweights gives the definition):
    hidden states blended from the empty prompt's by the weights, then mixed with the extra passes
    that hide fragments of weight below 1. One encoder call reads the chunks, the passes and the
    empty prompt together; returns the chunks' (rows * chunks, length, dims) and pooled outputs."""
    length = ids.shape[-1]
    passes = text["pass_ids"].reshape(-1, length)
    keys = jnp.concatenate([jnp.ones(ids.shape, bool), text["pass_mask"].reshape(passes.shape) != 0,
                            jnp.ones(empty_ids.shape, bool)])
    out = encoder(jnp.concatenate([ids, passes, empty_ids.astype(ids.dtype)]), keys)
    hidden = out.hidden_states[-2]
    base, extra, empty = hidden[:len(ids)], hidden[len(ids):len(ids) + len(passes)], hidden[len(ids) + len(passes):]
    mix = text["pass_mix"].astype(jnp.float32)  # (rows, chunks, passes)
    base = _towards_empty(base, empty, text["weights"].reshape(ids.shape)).reshape(*mix.shape[:2], length, -1)
    extra = _towards_empty(extra, empty, text["pass_weights"].reshape(passes.shape))
    extra = extra.reshape(mix.shape[0], -1, length, extra.shape[-1])
    mixed = base * (1 - mix.sum(-1))[..., None, None] + jnp.einsum("rcp,rpld->rcld", mix, extra,
                                                                    precision=jax.lax.Precision.HIGHEST)
    pooled = getattr(out, "text_embeds", None)
    return mixed.reshape(len(ids), length, -1).astype(hidden.dtype), None if pooled is None else pooled[:len(ids)]


def _towards_empty(hidden: jax.Array, empty: jax.Array, weights: jax.Array) -> jax.Array:
    """compel's weights: ``e + (h - e) * w`` from the empty prompt's hidden states e, in float32;
    a token of weight 1 keeps its own, as compel keeps it (no rounding through e)."""
    hidden, empty, weights = hidden.astype(jnp.float32), empty.astype(jnp.float32), weights[..., None].astype(jnp.float32)
    return jnp.where(weights == 1, hidden, empty + (hidden - empty) * weights)
