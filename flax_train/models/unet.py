"""The SDXL UNet (diffusers' ``UNet2DConditionModel``) in Flax NNX.

    unet = flax_train.models.load("sdxl/unet", dtype=jnp.bfloat16, remat="dots")
    noise_pred = unet(latents_nchw, timesteps, prompt_embeds, text_embeds=pooled, time_ids=add_time_ids)

It reads the diffusers ``config.json`` and implements every option the SDXL family uses (text-time
micro-conditioning, per-level heads and transformer depths, linear or convolutional transformer
projections, ...); any other option raises an error that names the config key. Attribute paths
mirror the torch module paths, so the weights convert mechanically (see ``flax_train.weights``).

Layout: activations are NHWC inside; ``__call__`` takes and returns NCHW like diffusers, and
``forward_nhwc`` skips those two transposes for callers that keep latents channels-last.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from sdxl_common.errors import BadInput

from flax_train.models import freeze_config, layers
from flax_train.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from flax_train.models.layers import EMBED, MLP, Dtype
from flax_train.models.transformer import FEED_FORWARD_TORCH_RENAMES, Transformer2DModel

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers' defaults for the keys this implementation reads, used when a config omits them.
DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "time_embedding_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

# Options this implementation does not support: key -> the values it accepts (diffusers' default
# first). Anything else is an error naming the key, never a silently different model. Keys read by
# neither list change nothing for these block types: upcast_attention (attention logits and softmax
# are float32 here anyway), resnet_out_scale_factor, mid_block_only_cross_attention,
# addition_embed_type_num_heads, sample_size.
UNSUPPORTED_UNLESS: dict[str, tuple] = {
    "num_attention_heads": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "act_fn": ("silu", "swish"),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "dropout": (0.0,),
    "mid_block_type": MID_BLOCK_TYPES,
}


def _per_level(value: Any, levels: int, key: str) -> list:
    """An int (or other scalar) repeated per level, or a per-level list checked for length."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise BadInput(f"UNet config: {key} has {len(value)} entries for {levels} levels")
        return list(value)
    return [value] * levels


def _per_layer(value: int | Sequence[int], num_layers: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_layers


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with diffusers' defaults filled in, after rejecting unsupported options."""
    cfg = {**DEFAULTS, **config}
    for key, accepted in UNSUPPORTED_UNLESS.items():
        value = cfg.get(key, accepted[0])
        if isinstance(value, (list, tuple)) and key == "only_cross_attention":
            value = any(value)
        if value not in accepted:
            if key == "num_attention_heads":
                # diffusers itself refuses it: "attention_head_dim" holds the head counts.
                raise BadInput(
                    f"UNet config: num_attention_heads={value!r} is rejected by diffusers' "
                    "UNet2DConditionModel too; give the number of heads per level as attention_head_dim"
                )
            raise BadInput(
                f"UNet config: {key}={value!r} is not supported by this implementation "
                f"(supported: {', '.join(repr(a) for a in accepted)})"
            )
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        for block_type in cfg[key]:
            if block_type not in allowed:
                raise BadInput(f"UNet config: {key} entry {block_type!r} is not supported (supported: {allowed})")
    if cfg["norm_num_groups"] is None:
        raise BadInput("UNet config: norm_num_groups=None is not supported (supported: an int)")
    levels = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != levels or len(cfg["up_block_types"]) != levels:
        raise BadInput("UNet config: block_out_channels, down_block_types and up_block_types differ in length")
    if cfg["addition_embed_type"] == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if cfg[key] is None:
                raise BadInput(f"UNet config: addition_embed_type='text_time' needs {key}")
    return cfg


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2: the MLP on the sinusoidal time (or text-time) features."""

    def __init__(self, in_features: int, features: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = layers.Linear(in_features, features, axes=(EMBED, MLP), **kw)
        self.linear_2 = layers.Linear(features, features, axes=(MLP, EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))


class _Blocks(nnx.Module):
    """Shared construction of a level's resnets and (for cross-attention levels) transformers."""

    def _build(
        self,
        resnet_in_channels: Sequence[int],
        out_channels: int,
        *,
        cross: Mapping[str, Any] | None,
        transformer_depths: Sequence[int],
        common: Mapping[str, Any],
        rngs: nnx.Rngs,
    ) -> None:
        kw = dict(dtype=common["dtype"], param_dtype=common["param_dtype"])
        self.remat = common["remat"]
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    c,
                    out_channels,
                    temb_channels=common["temb_channels"],
                    groups=common["groups"],
                    eps=common["eps"],
                    output_scale_factor=common["output_scale_factor"],
                    rngs=rngs,
                    **kw,
                )
                for c in resnet_in_channels
            ]
        )
        if cross is None:
            self.attentions = None
            return
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    out_channels,
                    heads=cross["heads"],
                    head_dim=out_channels // cross["heads"],
                    num_layers=depth,
                    cross_attention_dim=cross["cross_attention_dim"],
                    norm_num_groups=common["groups"],
                    use_linear_projection=cross["use_linear_projection"],
                    attention=common["attention"],
                    remat=common["remat"],
                    scan_layers=common["scan_layers"],
                    rngs=rngs,
                    **kw,
                )
                for depth in transformer_depths
            ]
        )

    def _layer(self, i: int, h: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        h = layers.call_block(self.resnets[i], h, temb, remat=self.remat)
        if self.attentions is not None:
            h = self.attentions[i](h, context)
        return h


class DownBlock(_Blocks):
    """DownBlock2D / CrossAttnDownBlock2D: (resnet [+ transformer]) x N, then a stride-2 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_downsample: bool,
        downsample_padding: int,
        cross: Mapping[str, Any] | None,
        transformer_layers: int | Sequence[int],
        common: Mapping[str, Any],
        rngs: nnx.Rngs,
    ):
        ins = [in_channels] + [out_channels] * (num_layers - 1)
        depths = _per_layer(transformer_layers, num_layers)
        self._build(ins, out_channels, cross=cross, transformer_depths=depths, common=common, rngs=rngs)
        kw = dict(dtype=common["dtype"], param_dtype=common["param_dtype"], rngs=rngs)
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, **kw)])
            if add_downsample
            else None
        )

    def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(len(self.resnets)):
            h = self._layer(i, h, temb, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(_Blocks):
    """UpBlock2D / CrossAttnUpBlock2D: (concat skip, resnet [+ transformer]) x N, then upsample."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_upsample: bool,
        cross: Mapping[str, Any] | None,
        transformer_layers: int | Sequence[int],
        common: Mapping[str, Any],
        rngs: nnx.Rngs,
    ):
        # The last resnet of a level takes the skip from before the level's downsampler, which has
        # the previous level's width; the others take skips of this level's width.
        ins = [
            (prev_output_channels if i == 0 else out_channels) + (in_channels if i == num_layers - 1 else out_channels)
            for i in range(num_layers)
        ]
        depths = _per_layer(transformer_layers, num_layers)
        self._build(ins, out_channels, cross=cross, transformer_depths=depths, common=common, rngs=rngs)
        kw = dict(dtype=common["dtype"], param_dtype=common["param_dtype"], rngs=rngs)
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(
        self,
        h: jax.Array,
        skips: Sequence[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None,
    ) -> jax.Array:
        for i in range(len(self.resnets)):
            h = jnp.concatenate([h, skips[-1 - i].astype(h.dtype)], axis=-1)
            h = self._layer(i, h, temb, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


class UNetMidBlock2DCrossAttn(_Blocks):
    """resnets[0] -> (attentions[i] -> resnets[i + 1]) at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        *,
        cross: Mapping[str, Any],
        transformer_layers: int | Sequence[int],
        common: Mapping[str, Any],
        rngs: nnx.Rngs,
    ):
        # Two resnets around one transformer (diffusers' num_layers=1).
        depths = _per_layer(transformer_layers, 1)[:1]
        self._build([channels, channels], channels, cross=cross, transformer_depths=depths, common=common, rngs=rngs)

    def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        h = layers.call_block(self.resnets[0], h, temb, remat=self.remat)
        h = self.attentions[0](h, context)
        return layers.call_block(self.resnets[1], h, temb, remat=self.remat)


class _KeyStream:
    """Stands in for ``nnx.Rngs`` while the UNet builds its layers: one key drawn from the caller's
    Rngs, then ``fold_in(key, i)`` for the i-th parameter.

    Why: every ``nnx.Rngs`` draw updates a counter Variable, and under tracing (abstract or jitted
    initialisation) that update costs time proportional to the trace so far (flax 0.12 probes
    ``.sharding`` on the traced counter and jax 0.10 builds its error message by walking the trace).
    With ~1,200 draws, building the SDXL UNet abstractly took over a minute; with this, seconds.
    """

    def __init__(self, key: jax.Array):
        self._key = key
        self._count = 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


class UNet2DConditionModel(layers.Component):
    """Noise (or v) prediction for SDXL: ``unet(sample, t, text_states, text_embeds=, time_ids=)``."""

    WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
    TORCH_KEY_RENAMES = FEED_FORWARD_TORCH_RENAMES

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
        attention: str = "xla",
        remat: str = "none",
        scan_layers: bool = False,
    ):
        cfg = resolve_config(config)
        layers.resolve_attention(attention)
        if remat not in layers.REMAT_POLICIES:
            raise BadInput(f"remat policy {remat!r}; choose one of {tuple(layers.REMAT_POLICIES)}")
        self.config = freeze_config(config)
        self.dtype = dtype
        self.attention = attention
        self.remat = remat
        self.center_input_sample = cfg["center_input_sample"]
        self.flip_sin_to_cos = cfg["flip_sin_to_cos"]
        self.freq_shift = cfg["freq_shift"]
        self.addition_embed_type = cfg["addition_embed_type"]
        self.addition_time_embed_dim = cfg["addition_time_embed_dim"]

        channels = list(cfg["block_out_channels"])
        levels = len(channels)
        # diffusers' naming quirk: "attention_head_dim" holds the number of heads per level.
        heads = _per_level(cfg["attention_head_dim"], levels, "attention_head_dim")
        cross_dims = _per_level(cfg["cross_attention_dim"], levels, "cross_attention_dim")
        layers_per_block = _per_level(cfg["layers_per_block"], levels, "layers_per_block")
        depths = _per_level(cfg["transformer_layers_per_block"], levels, "transformer_layers_per_block")
        reverse_depths = cfg["reverse_transformer_layers_per_block"]
        if reverse_depths is None:
            if any(isinstance(d, (list, tuple)) for d in depths):
                raise BadInput(
                    "UNet config: nested transformer_layers_per_block needs reverse_transformer_layers_per_block"
                )
            reverse_depths = depths[::-1]

        kw = dict(dtype=dtype, param_dtype=param_dtype)
        rngs = _KeyStream(rngs.params())
        self.time_proj_dim = channels[0]
        time_embed_dim = cfg["time_embedding_dim"] or 4 * channels[0]
        conv_in_k, conv_out_k = cfg["conv_in_kernel"], cfg["conv_out_kernel"]
        self.conv_in = layers.Conv(
            cfg["in_channels"], channels[0], conv_in_k, padding=(conv_in_k - 1) // 2, rngs=rngs, **kw
        )
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, rngs=rngs, **kw)
        self.add_embedding = (
            TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], time_embed_dim, rngs=rngs, **kw)
            if self.addition_embed_type == "text_time"
            else None
        )

        common = dict(
            temb_channels=time_embed_dim,
            groups=cfg["norm_num_groups"],
            eps=cfg["norm_eps"],
            # diffusers passes resnet_out_scale_factor to other block types only; these use 1.
            output_scale_factor=1.0,
            attention=attention,
            remat=remat,
            scan_layers=scan_layers,
            **kw,
        )

        def cross_settings(block_type: str, level: int) -> dict | None:
            if not block_type.startswith("CrossAttn"):
                return None
            return dict(
                heads=heads[level],
                cross_attention_dim=cross_dims[level],
                use_linear_projection=cfg["use_linear_projection"],
            )

        down = []
        for i, block_type in enumerate(cfg["down_block_types"]):
            down.append(
                DownBlock(
                    channels[max(i - 1, 0)],
                    channels[i],
                    num_layers=layers_per_block[i],
                    add_downsample=i < levels - 1,
                    downsample_padding=cfg["downsample_padding"],
                    cross=cross_settings(block_type, i),
                    transformer_layers=depths[i],
                    common=common,
                    rngs=rngs,
                )
            )
        self.down_blocks = nnx.List(down)

        if cfg["mid_block_type"] is None:
            self.mid_block = None
        else:
            mid_cross = dict(
                heads=heads[-1], cross_attention_dim=cross_dims[-1], use_linear_projection=cfg["use_linear_projection"]
            )
            mid_common = {**common, "output_scale_factor": cfg["mid_block_scale_factor"]}
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1], cross=mid_cross, transformer_layers=depths[-1], common=mid_common, rngs=rngs
            )

        up = []
        for i, block_type in enumerate(cfg["up_block_types"]):
            level = levels - 1 - i  # the down level this up block mirrors
            up.append(
                UpBlock(
                    channels[max(level - 1, 0)],
                    channels[min(level + 1, levels - 1)],
                    channels[level],
                    num_layers=layers_per_block[level] + 1,
                    add_upsample=i < levels - 1,
                    cross=cross_settings(block_type, level),
                    transformer_layers=reverse_depths[i],
                    common=common,
                    rngs=rngs,
                )
            )
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = layers.GroupNorm(cfg["norm_num_groups"], channels[0], eps=cfg["norm_eps"], **kw)
        self.conv_out = layers.Conv(
            channels[0], cfg["out_channels"], conv_out_k, padding=(conv_out_k - 1) // 2, rngs=rngs, **kw
        )


    def time_embed(self, timesteps: jax.Array, batch: int, text_embeds: jax.Array | None, time_ids: jax.Array | None):
        """The (B, time_embed_dim) conditioning vector every resnet receives."""
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_features = layers.timestep_embedding(
            timesteps, self.time_proj_dim, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        emb = self.time_embedding(t_features.astype(self.dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet uses addition_embed_type='text_time': pass text_embeds and time_ids")
            # SDXL micro-conditioning: each of the 6 size/crop ids gets its own sinusoidal embedding.
            id_features = layers.timestep_embedding(
                time_ids.reshape(-1),
                self.addition_time_embed_dim,
                flip_sin_to_cos=self.flip_sin_to_cos,
                freq_shift=self.freq_shift,
            ).reshape(batch, -1)
            add_features = jnp.concatenate([text_embeds.astype(jnp.float32), id_features], axis=-1)
            emb = emb + self.add_embedding(add_features.astype(self.dtype))
        return emb

    def forward_nhwc(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        *,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The UNet on channels-last latents (B, H, W, C); returns (B, H, W, out_channels) in ``dtype``."""
        batch = sample.shape[0]
        h = sample.astype(self.dtype)
        if self.center_input_sample:
            h = 2 * h - 1.0
        emb = self.time_embed(timesteps, batch, text_embeds, time_ids)
        context = encoder_hidden_states.astype(self.dtype)

        h = self.conv_in(h)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the size of the next skip, so odd latent sizes round-trip like diffusers.
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            h = block(h, block_skips, emb, context, upsample_size)
        h = nnx.silu(self.conv_norm_out(h))
        return self.conv_out(h)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        *,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """diffusers' calling convention: NCHW ``sample`` (B, C, H, W), ``timesteps`` (B,) or scalar,
        ``encoder_hidden_states`` (B, L, cross_attention_dim), ``text_embeds`` (B, pooled dim) and
        ``time_ids`` (B, 6) for text-time models. Returns the NCHW prediction in ``dtype``."""
        out = self.forward_nhwc(
            jnp.transpose(sample, (0, 2, 3, 1)),
            timesteps,
            encoder_hidden_states,
            text_embeds=text_embeds,
            time_ids=time_ids,
        )
        return jnp.transpose(out, (0, 3, 1, 2))
