"""The CLIP text encoders of SDXL in Flax NNX: ``CLIPTextModel`` and ``CLIPTextModelWithProjection``.

They compute what transformers' classes of the same names compute, on the same weights:

    token + position embeddings
    -> N pre-norm layers: x += attn(layer_norm1(x)) with a causal mask; x += mlp(layer_norm2(x))
    -> final_layer_norm
    -> pooled output: the final-normed state at the end-of-text token
    -> (WithProjection only) text_projection, a bias-free linear map of the pooled output

SDXL conditions its UNet on the penultimate entry of ``hidden_states`` of both encoders (before
any final norm) and on encoder 2's ``text_embeds``, so every layer's output is returned. The
forward pass is deterministic: ``attention_dropout`` (0.0 in SDXL's configs) is not applied.

Weights are stored under the keys of the SDXL checkpoints on the Hub (``text_model.embeddings...``,
``text_model.encoder.layers.0...``, ``text_projection.weight``). transformers 4.x, 5.x and other
tools all read that layout; transformers 5 itself saves ``CLIPTextModel`` without the
``text_model.`` prefix, which ``TORCH_CHECKPOINT_RENAMES`` accepts when loading.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct
from sdxl_common.errors import BadInput

from flax_train.models import freeze_config
from flax_train.models import layers
from flax_train.models.layers import EMBED, HEADS, MLP, Dtype

# transformers' CLIPTextConfig defaults, used for keys a config.json leaves out.
CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}

# Legacy configs carry eos_token_id == 2 (a wrong value); for them transformers pools at the
# largest token id instead, which is the end token in CLIP's vocabulary. We do the same.
LEGACY_EOS_TOKEN_ID = 2

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@struct.dataclass
class CLIPTextOutput:
    """``hidden_states`` holds the embeddings, then each layer's output (the last one before
    ``final_layer_norm``); ``last_hidden_state`` is after it; ``pooler_output`` is
    ``last_hidden_state`` at the end-of-text token."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooler_output: jax.Array


@struct.dataclass
class CLIPTextWithProjectionOutput:
    """As ``CLIPTextOutput``, with the projected pooled output ``text_embeds`` in its place."""

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]


def _config_value(config: Mapping[str, Any], key: str) -> Any:
    return config.get(key, CONFIG_DEFAULTS[key])


class CLIPTextEmbeddings(nnx.Module):
    def __init__(
        self, vocab_size: int, max_positions: int, width: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        self.token_embedding = layers.Embed(vocab_size, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = layers.Embed(
            max_positions, width, axes=(None, EMBED), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1]
        max_positions = self.position_embedding.embedding.shape[0]
        if length > max_positions:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {max_positions}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))


class CLIPAttention(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, attention: str, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise BadInput(f"hidden_size {width} is not a multiple of num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.attention = attention
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = layers.Linear(width, width, axes=(EMBED, HEADS), **kw)
        self.k_proj = layers.Linear(width, width, axes=(EMBED, HEADS), **kw)
        self.v_proj = layers.Linear(width, width, axes=(EMBED, HEADS), **kw)
        self.out_proj = layers.Linear(width, width, axes=(HEADS, EMBED), **kw)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        batch, length, width = x.shape
        split = lambda t: t.reshape(batch, length, self.num_heads, width // self.num_heads)
        out = layers.dot_product_attention(
            split(self.q_proj(x)),
            split(self.k_proj(x)),
            split(self.v_proj(x)),
            is_causal=True,
            key_mask=key_mask,
            implementation=self.attention,
        )
        return self.out_proj(out.reshape(batch, length, width))


class CLIPMLP(nnx.Module):
    def __init__(self, width: int, hidden: int, activation: str, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise BadInput(f"hidden_act {activation!r} is not supported; choose one of {tuple(ACTIVATIONS)}")
        self.activation = activation
        self.fc1 = layers.Linear(width, hidden, axes=(EMBED, MLP), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = layers.Linear(hidden, width, axes=(MLP, EMBED), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: Mapping[str, Any], *, attention: str, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        width = _config_value(config, "hidden_size")
        eps = _config_value(config, "layer_norm_eps")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(width, _config_value(config, "num_attention_heads"), attention=attention, **kw)
        self.layer_norm1 = layers.LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = CLIPMLP(width, _config_value(config, "intermediate_size"), _config_value(config, "hidden_act"), **kw)
        self.layer_norm2 = layers.LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: Mapping[str, Any], *, attention: str, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(_config_value(config, "num_hidden_layers"))
            ]
        )


class CLIPTextTransformer(nnx.Module):
    """The text tower both public classes share (transformers' ``text_model``)."""

    def __init__(
        self, config: Mapping[str, Any], *, attention: str, remat: str, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        eos = _config_value(config, "eos_token_id")
        if not isinstance(eos, int):
            raise BadInput(f"eos_token_id must be one integer to pool at, got {eos!r}")
        layers.resolve_attention(attention)  # fail at construction on an unknown name
        if remat not in layers.REMAT_POLICIES:
            raise BadInput(f"remat policy {remat!r}; choose one of {tuple(layers.REMAT_POLICIES)}")
        self.eos_token_id = eos
        self.remat = remat
        width = _config_value(config, "hidden_size")
        self.embeddings = CLIPTextEmbeddings(
            _config_value(config, "vocab_size"),
            _config_value(config, "max_position_embeddings"),
            width,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.encoder = CLIPEncoder(config, attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.final_layer_norm = layers.LayerNorm(
            width, eps=_config_value(config, "layer_norm_eps"), dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, input_ids: jax.Array, key_mask: jax.Array | None = None) -> CLIPTextOutput:
        """``key_mask`` (batch, length) bool: the tokens no other token attends to where it is false
        (transformers' ``attention_mask``, on top of the causal mask)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layers.call_block(layer, x, key_mask, remat=self.remat)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        ids = input_ids.astype(jnp.int32)
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            end = jnp.argmax(ids, axis=-1)
        else:
            # The first end token: SDXL's first tokenizer pads with the end token itself.
            end = jnp.argmax(ids == self.eos_token_id, axis=-1)
        pooled = last[jnp.arange(last.shape[0]), end]
        return CLIPTextOutput(last_hidden_state=last, hidden_states=tuple(hidden_states), pooler_output=pooled)


class _CLIPTextEncoder(layers.Component):
    """What both public classes share: construction from a transformers config and the weights name."""

    WEIGHTS_NAME = "model.safetensors"
    # Checkpoints from transformers < 4.31 saved the position_ids buffer; it is not a parameter.
    TORCH_IGNORED_KEYS = (r"(^|\.)position_ids$",)

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        attention: str = "xla",
        remat: str = "none",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = freeze_config(config)
        self.text_model = CLIPTextTransformer(
            config, attention=attention, remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )


class CLIPTextModel(_CLIPTextEncoder):
    """SDXL's first text encoder. ``model(input_ids)`` with int (B, L) ids, L <= max_position_embeddings
    (and an optional ``key_mask``, see ``CLIPTextTransformer``)."""

    # transformers >= 5 saves this class without the `text_model.` prefix the Hub checkpoints use.
    TORCH_CHECKPOINT_RENAMES = ((r"^(?!text_model\.)", "text_model."),)

    def __call__(self, input_ids: jax.Array, key_mask: jax.Array | None = None) -> CLIPTextOutput:
        return self.text_model(input_ids, key_mask)


class CLIPTextModelWithProjection(_CLIPTextEncoder):
    """SDXL's second text encoder: the text tower plus a bias-free projection of the pooled output."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        attention: str = "xla",
        remat: str = "none",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(config, attention=attention, remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = layers.Linear(
            _config_value(config, "hidden_size"),
            _config_value(config, "projection_dim"),
            use_bias=False,
            axes=(EMBED, None),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, key_mask: jax.Array | None = None) -> CLIPTextWithProjectionOutput:
        out = self.text_model(input_ids, key_mask)
        return CLIPTextWithProjectionOutput(
            text_embeds=self.text_projection(out.pooler_output),
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
        )


def encode_prompts(
    text_encoder: Any, text_encoder_2: Any, ids1: jax.Array, ids2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """SDXL's text conditioning: token ids (B, 77) of both tokenizers -> (prompt_embeds (B, 77, D1 + D2),
    pooled (B, P)).

    SDXL conditions on the penultimate hidden states of both encoders (before the final layer norm),
    concatenated along channels, and on the projected pooled output of encoder 2.
    """
    out1 = text_encoder(ids1)
    out2 = text_encoder_2(ids2)
    prompt_embeds = jnp.concatenate([out1.hidden_states[-2], out2.hidden_states[-2]], axis=-1)
    return prompt_embeds, out2.text_embeds
