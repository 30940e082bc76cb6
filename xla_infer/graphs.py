"""The bodies of the pipeline's device graphs: plain functions of the torch modules, the sampler and
device tensors. `Pipeline` binds the modules and settings (functools.partial) and wraps each with
`Runtime.graph`, so that each is one guarded compiled graph, traced once per pipeline shape.

Nothing here reads a tensor back to the host or branches on a tensor's value: a choice that
differs between calls (strength 1 or not, the step reached) is device data, and one that does not
(an inpainting UNet or not, the latent size) is bound when the pipeline is built.
"""
from __future__ import annotations

import torch

from xla_infer.batches import TextInput
from xla_infer.schedulers import DeviceSampler


@torch.no_grad()
def encode_text(text_encoder: torch.nn.Module | None, text_encoder_2: torch.nn.Module, text_1: TextInput | None,
                text_2: TextInput, keep: torch.Tensor, *, chunks: int = 1, weighting: str | None = None,
                empty_ids: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's text embeddings (rows, chunks * length, dims) and pooled embedding of each row,
    zeroed where `keep` is 0.

    Each encoder reads each of a row's `chunks` chunks as a sequence of its own; their hidden
    states follow each other along the tokens (the UNet's cross-attention takes any number), and
    the pooled embedding is the first chunk's, as A1111 and compel take it. `weighting` ("a1111",
    "compel" or None) applies the per-token weights the inputs carry; compel's also needs each
    encoder's empty prompt (`empty_ids`, (1, length)).
    """
    # SDXL conditions on the penultimate layer of both encoders and the projected pooled output of
    # the second; the refiner, which has no first encoder, on the second's alone.
    embeds, pooled = _encode_chunks(text_encoder_2, text_2, chunks, weighting, empty_ids[1])
    if text_encoder is not None:
        embeds = torch.cat([_encode_chunks(text_encoder, text_1, chunks, weighting, empty_ids[0])[0], embeds], dim=-1)
    keep = keep.to(embeds.dtype)
    return embeds * keep[:, None, None], pooled * keep[:, None]


def _encode_chunks(encoder: torch.nn.Module, text: TextInput, chunks: int, weighting: str | None,
                   empty_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder's (rows, chunks * length, dims) penultimate hidden states, weighted, and its
    projected pooled output of each row's first chunk (None for an encoder without a projection)."""
    rows = text.ids.shape[0]
    ids = text.ids.reshape(rows * chunks, -1)
    if weighting == "compel":
        hidden, pooled = _compel(encoder, text, ids, empty_ids)
    else:
        out = encoder(ids, output_hidden_states=True)
        hidden, pooled = out.hidden_states[-2], getattr(out, "text_embeds", None)
        if weighting == "a1111":
            hidden = _a1111(hidden, text.weights.reshape(ids.shape))
    pooled = None if pooled is None else pooled.unflatten(0, (rows, chunks))[:, 0]
    return hidden.reshape(rows, -1, hidden.shape[-1]), pooled


def _a1111(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis (its "Original" mode): each token's hidden state times its weight, then the
    chunk scaled back to the mean it had unweighted. A1111 takes the means over the batch of prompts
    it encodes together; here over each prompt's chunk, so that an image does not depend on its
    batch (the same for a batch of one)."""
    unweighted = hidden.to(torch.float32)
    weighted = unweighted * weights[..., None].to(torch.float32)
    scale = unweighted.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
    return (weighted * scale).to(hidden.dtype)


def _compel(encoder: torch.nn.Module, text: TextInput, ids: torch.Tensor,
            empty_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """compel's weighting (sdxl_common.prompt_weights.compel_downweights gives the definition):
    hidden states blended from the empty prompt's by the weights, then mixed with the extra passes
    that hide fragments of weight below 1. One encoder call reads the chunks, the passes and the
    empty prompt together; returns the chunks' (rows * chunks, length, dims) and pooled outputs."""
    length = ids.shape[-1]
    passes = text.pass_ids.reshape(-1, length)
    keys = torch.cat([torch.ones_like(ids), text.pass_mask.reshape(passes.shape), torch.ones_like(empty_ids)])
    out = encoder(torch.cat([ids, passes, empty_ids]), attention_mask=_causal_mask(keys, encoder.dtype),
                  output_hidden_states=True)
    base, extra, empty = out.hidden_states[-2].split([len(ids), len(passes), 1])
    mix = text.pass_mix.to(torch.float32)  # (rows, chunks, passes)
    base = _towards_empty(base, empty, text.weights.reshape(ids.shape)).unflatten(0, mix.shape[:2])
    extra = _towards_empty(extra, empty, text.pass_weights.reshape(passes.shape)).unflatten(0, (len(mix), -1))
    mixed = base * (1 - mix.sum(-1))[..., None, None] + torch.einsum("rcp,rpld->rcld", mix, extra)
    pooled = getattr(out, "text_embeds", None)
    return mixed.flatten(0, 1).to(empty.dtype), None if pooled is None else pooled[:len(ids)]


def _towards_empty(hidden: torch.Tensor, empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """compel's weights: ``e + (h - e) * w`` from the empty prompt's hidden states e, in float32;
    a token of weight 1 keeps its own, as compel keeps it (no rounding through e)."""
    hidden, empty, weights = hidden.to(torch.float32), empty.to(torch.float32), weights[..., None].to(torch.float32)
    return torch.where(weights == 1, hidden, empty + (hidden - empty) * weights)


def _causal_mask(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive (sequences, 1, length, length) mask of CLIP's causal attention with the keys
    where ``keys`` is 0 hidden. Given whole (4-D), transformers passes it to the attention as it
    is; a (sequences, length) padding mask it would first test on the host, which no graph can."""
    length = keys.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()
    allowed = causal & keys.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def denoise_step(unet: torch.nn.Module, sampler: DeviceSampler, dtype: torch.dtype, latents, step, state, noise,
                 embeds, pooled, time_ids, guidance, inpaint=None):
    """One step, the UNet run in `dtype`. `inpaint` (B, 5, h, w): the mask and masked-image latents
    an inpainting UNet reads after the latents (a 9-channel UNet's pipeline always passes it: one graph)."""
    model_input = sampler.scale_input(latents, step)
    if inpaint is not None:
        model_input = torch.cat([model_input, inpaint], dim=1)  # diffusers' order: scaled latents, mask, masked
    model_input = model_input.repeat_interleave(2, dim=0).to(dtype)
    out = unet(
        model_input,
        sampler.timestep(step),
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )[0]
    out = out.to(torch.float32).unflatten(0, (-1, 2))
    uncond, cond = out[:, 0], out[:, 1]
    guided = uncond + guidance * (cond - uncond)
    step_noise = None if noise is None else noise.index_select(0, step)[0]
    latents, state = sampler.step(latents, guided, step, state, step_noise)
    return latents, step + 1, state


@torch.no_grad()
def decode(vae: torch.nn.Module, vae_dtype: torch.dtype, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from the scaled latents, the VAE run in `vae_dtype`."""
    scaling, stats = vae.config.scaling_factor, _latent_stats(vae, latents)
    if stats is not None:
        latents = latents * stats[1] / scaling + stats[0]
    else:
        latents = latents / scaling
    image = vae.decode(latents.to(vae_dtype), return_dict=False)[0]
    return (image.to(torch.float32) * 0.5 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_image(vae: torch.nn.Module, vae_dtype: torch.dtype, sampler: DeviceSampler, pixels, posterior_noise,
                 noise, start):
    """Image-to-image's starting latents, as StableDiffusionXLImg2ImgPipeline.prepare_latents.

    `pixels` (B, H, W, 3) uint8; `posterior_noise` and `noise` (B, C, h, w) drawn on the host;
    `start` (1,) the first step run.
    """
    latents = _vae_sample(vae, vae_dtype, _signed_unit(pixels), posterior_noise)
    return sampler.add_noise(latents, noise, start)


@torch.no_grad()
def encode_inpaint(vae: torch.nn.Module, vae_dtype: torch.dtype, sampler: DeviceSampler, init_sigma: torch.Tensor,
                   latent_size: tuple[int, int], inpainting_unet: bool, pixels, mask, posterior_noise, noise,
                   masked_noise, start, full):
    """Inpainting's inputs, as StableDiffusionXLInpaintPipeline.prepare_latents / prepare_mask_latents.

    `mask` (B, 1, H, W) float, already binarised (1 = repaint); `full` (1,) bool: strength 1,
    where the start is pure noise (scaled by the sampler's `init_sigma`) instead of the noised
    image (a where, not a branch: one graph). Returns the starting latents, and either the UNet's
    extra channels (`inpainting_unet`, 9 channels) or the image latents and latent-size mask the
    blend after each step needs (4-channel UNet).
    """
    image = _signed_unit(pixels)
    # The inpainting pipeline scales the encoded latents without the VAE's latents_mean/std
    # (unlike image-to-image); SDXL's VAE has none, but the pipeline is followed as written.
    image_latents = _vae_sample(vae, vae_dtype, image, posterior_noise, stats=False)
    noised = sampler.add_noise(image_latents, noise, start)
    latents = torch.where(full.reshape(1, 1, 1, 1), noise * init_sigma, noised)
    # Nearest-neighbour to latent size, as diffusers' F.interpolate default.
    small_mask = torch.nn.functional.interpolate(mask, size=latent_size)
    if inpainting_unet:
        masked_latents = _vae_sample(vae, vae_dtype, image * (mask < 0.5), masked_noise, stats=False)
        return latents, torch.cat([small_mask, masked_latents], dim=1)
    return latents, image_latents, small_mask


@torch.no_grad()
def blend(sampler: DeviceSampler, latents, step, small_mask, image_latents, noise):
    """With a 4-channel UNet, after each step (`step` already counts it): the image noised to the
    next step's level outside the mask (the clean image after the last step), as diffusers."""
    proper = sampler.add_noise(image_latents, noise, step)
    return (1 - small_mask) * proper + small_mask * latents


def _latent_stats(vae: torch.nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE config's per-channel latents mean and std, when it gives both (else None)."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    channels = latents.shape[1]
    mean_t = torch.tensor(mean, dtype=latents.dtype).view(1, channels, 1, 1).to(latents.device)
    std_t = torch.tensor(std, dtype=latents.dtype).view(1, channels, 1, 1).to(latents.device)
    return mean_t, std_t


def _vae_sample(vae: torch.nn.Module, vae_dtype: torch.dtype, image: torch.Tensor, posterior_noise: torch.Tensor,
                stats: bool = True) -> torch.Tensor:
    """Scaled latents of a [-1, 1] image, sampled from the VAE posterior with host-drawn noise."""
    posterior = vae.encode(image.to(vae_dtype)).latent_dist
    # latent_dist.sample(generator) is mean + std * a Gaussian; the Gaussian comes from the host.
    latents = (posterior.mean + posterior.std * posterior_noise.to(posterior.mean.dtype)).to(torch.float32)
    scaling, latent_stats = vae.config.scaling_factor, _latent_stats(vae, latents) if stats else None
    if latent_stats is not None:
        return (latents - latent_stats[0]) * scaling / latent_stats[1]
    return scaling * latents


def _signed_unit(pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1], as diffusers' VaeImageProcessor. Uint8 travels
    to the device: a quarter of float32's bytes."""
    image = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return 2.0 * image - 1.0
