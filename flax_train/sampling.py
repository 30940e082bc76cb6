"""The JAX SDXL sampler: text encoding, the guided denoising loop, VAE decoding; and the
`Generator` built on them (validation images during training, `flax-train sample`).

The pieces are written against plain callables and duck-typed modules, so they take the Flax
models of `flax_train.models` as they are, and stand-ins in tests:

* `prompt_encoding.encode_text(text_encoder, text_encoder_2, text_1, text_2, ...)`: SDXL's text
  conditioning from its two encoders, prompts in chunks of 77 tokens and weighted.
* `sample_latents(unet_fn, tables, ...)`: `unet_fn(sample, timesteps, encoder_hidden_states, *,
  text_embeds, time_ids) -> prediction`, NCHW in and out, the Flax UNet's calling convention.
* `decode_latents(vae, latents)`: `vae.decode(z)` maps latents (already divided by the scaling
  factor) to NCHW images in [-1, 1]; `vae.config` holds `scaling_factor`.

All of it is jittable; the denoising loop is one `jax.lax.fori_loop` whose body is the same graph
at every step (the scheduler tables are indexed by the traced step index).

A `Generator` loads the tokenizers, both text encoders, the VAE and the scheduler config of a
diffusers folder once, and compiles two functions: prompt encoding, and sampling + decoding. The
UNet weights are an argument of the latter, so the trainer can pass its current (EMA) parameters
without rebuilding anything. Prompts are read as xla_infer reads them (`max_text_chunks`,
`prompt_weighting`; docs/xla_infer.md#long-prompts-and-prompt-weighting): token ids and weights
are data of the encoding, so no prompt within the chunks compiles it again. With no negative
prompt it feeds the model's unconditional input as diffusers does
(`sdxl.force_zeros_for_empty_prompt`), so an exported folder gives the same images here, in
xla_infer and in diffusers.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from flax_train import lora, models, prompt_encoding, schedulers, sharding
from sdxl_common import buckets, lora_files, prompt_weights, sdxl, storage
from sdxl_common.errors import BadInput
from sdxl_common.png import png_bytes
from flax_train.schedulers import SamplerTables

log = logging.getLogger(__name__)

UNetFn = Callable[..., jax.Array]


def make_time_ids(
    original_size: Sequence[int],
    crop_top_left: Sequence[int],
    target_size: Sequence[int],
    batch: int,
) -> jax.Array:
    """SDXL's micro-conditioning, (batch, 6) float32: [orig_h, orig_w, crop_top, crop_left, target_h, target_w].

    Sizes are (height, width) in pixels; the crop corner is (top, left).
    """
    if not len(original_size) == len(crop_top_left) == len(target_size) == 2:
        raise ValueError(
            f"expected (h, w) sizes and a (top, left) corner, got {original_size}, {crop_top_left}, {target_size}"
        )
    values = [*original_size, *crop_top_left, *target_size]
    return jnp.tile(jnp.asarray(values, dtype=jnp.float32)[None, :], (batch, 1))


def _to_batch(x: jax.Array, batch: int) -> jax.Array:
    """Broadcast an input with a leading batch dimension of 1 or `batch` to `batch` rows."""
    x = jnp.asarray(x)
    return jnp.broadcast_to(x, (batch,) + x.shape[1:])


def sample_latents(
    unet_fn: UNetFn,
    tables: SamplerTables,
    latents: jax.Array,
    prompt_embeds: jax.Array,
    pooled_embeds: jax.Array,
    time_ids: jax.Array,
    neg_prompt_embeds: jax.Array,
    neg_pooled_embeds: jax.Array,
    neg_time_ids: jax.Array,
    guidance_scale: float | jax.Array,
    noise_keys: jax.Array | None = None,
) -> jax.Array:
    """Denoise `latents` with classifier-free guidance over all steps of `tables`.

    `latents` (B, 4, h, w) is unit-variance noise; it is scaled by the scheduler's
    `init_noise_sigma` here, as diffusers' pipelines do with the `latents` they are given.
    Text inputs are (B, L, D) / (B, P) / (B, 6); any of them may have a batch of 1 instead of B.
    Each step makes one UNet call on the doubled batch, each image's negative and positive inputs
    side by side (rows 2i and 2i+1: split over devices, an image and its twin stay on the same
    device, so guidance moves nothing between them), and combines the two predictions as
    uncond + guidance_scale * (cond - uncond). Returns the final latents (not divided by the VAE
    scaling factor). `noise_keys` (B,): a random key per image, for samplers that add noise at
    every step (euler_a): step i draws from `fold_in(key, i + 1)`, so an image depends only on its
    own key.
    """
    batch = latents.shape[0]
    if tables.needs_step_noise and noise_keys is None:
        raise ValueError(f"the {tables.name} sampler needs noise_keys")

    def pairs(negative: jax.Array, positive: jax.Array) -> jax.Array:
        negative, positive = _to_batch(negative, batch), _to_batch(positive, batch)
        return jnp.stack([negative, positive], axis=1).reshape(2 * batch, *positive.shape[1:])

    context = pairs(neg_prompt_embeds, prompt_embeds)
    text_embeds = pairs(neg_pooled_embeds, pooled_embeds)
    all_time_ids = pairs(neg_time_ids, time_ids)
    timesteps = jnp.asarray(tables.timesteps, dtype=jnp.float32)

    def denoise_step(i: jax.Array, carry: tuple[jax.Array, schedulers.State]) -> tuple[jax.Array, schedulers.State]:
        x, state = carry
        model_input = schedulers.scale_model_input(tables, i, jnp.repeat(x, 2, axis=0))
        t = jnp.broadcast_to(timesteps[i], (2 * batch,))
        prediction = unet_fn(model_input, t, context, text_embeds=text_embeds, time_ids=all_time_ids)
        prediction = prediction.astype(jnp.float32).reshape(batch, 2, *x.shape[1:])
        uncond, cond = prediction[:, 0], prediction[:, 1]
        guided = uncond + guidance_scale * (cond - uncond)
        noise = None
        if tables.needs_step_noise:
            draw = lambda key: jax.random.normal(jax.random.fold_in(key, i + 1), x.shape[1:])
            noise = jax.vmap(draw)(noise_keys)
        return schedulers.step(tables, i, guided, x, state, noise)

    x = latents * jnp.asarray(tables.init_noise_sigma, latents.dtype)
    carry = (x, schedulers.initial_state(tables, x))
    return jax.lax.fori_loop(0, timesteps.shape[0], denoise_step, carry)[0]


def decode_latents(vae: Any, latents: jax.Array, scaling_factor: float | None = None) -> jax.Array:
    """Latents (B, 4, h, w) -> uint8 images (B, H, W, 3), as diffusers' SDXL pipeline decodes them.

    Divides by the VAE's scaling factor (or, for VAEs whose config has `latents_mean` and
    `latents_std`, un-normalises with those), decodes, and maps [-1, 1] to 0..255.
    """
    config = getattr(vae, "config", None) or {}
    if scaling_factor is None:
        scaling_factor = config["scaling_factor"]
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        z = latents * jnp.reshape(jnp.asarray(std), shape) / scaling_factor + jnp.reshape(jnp.asarray(mean), shape)
    else:
        z = latents / scaling_factor
    images = vae.decode(z).astype(jnp.float32)
    images = jnp.clip(images / 2 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(images, (0, 2, 3, 1)) * 255).astype(jnp.uint8)


# --------------------------------------------------------------------------------------------
# Generator


class Generator:
    def __init__(
        self,
        folder: str | epath.PathLike,
        *,
        vae: str | epath.PathLike | None = None,
        scheduler: str = "euler",
        num_steps: int = 25,
        resolution: int | None = None,
        dtype: Any = jnp.float32,
        load_unet: bool = True,
        loras: Sequence[tuple[str, float]] = (),
        max_text_chunks: int = 1,
        prompt_weighting: str | None = None,
    ):
        """``loras``: (LoRA file or folder, scale) pairs merged into the weights once, here (see
        ``sdxl_common.lora_files`` for the formats). ``max_text_chunks``: the chunks of 75 tokens
        each prompt is laid out in (1: CLIP's 77 tokens); shorter prompts are padded with empty
        chunks, longer ones cut with a warning. ``prompt_weighting``: None (prompts as written),
        "a1111" or "compel" (their syntax and weighting), as in xla_infer."""
        if not isinstance(max_text_chunks, int) or isinstance(max_text_chunks, bool) or max_text_chunks < 1:
            raise BadInput(f"max_text_chunks must be a positive integer, got {max_text_chunks!r}")
        if prompt_weighting is not None and prompt_weighting not in prompt_weights.SYNTAXES:
            raise BadInput(f"prompt_weighting must be None or one of {', '.join(prompt_weights.SYNTAXES)}, "
                           f"got {prompt_weighting!r}")
        self.text_chunks, self.prompt_weighting = max_text_chunks, prompt_weighting
        root = models.resolve_pipeline(folder)
        self.tokenizers = sdxl.load_tokenizers(root)
        self.force_zeros_for_empty_prompt = sdxl.force_zeros_for_empty_prompt(root)
        encoders = [models.load(root, subfolder=name, dtype=dtype) for name in ("text_encoder", "text_encoder_2")]
        # The SDXL VAE overflows in fp16; decoding in fp32 is always safe and costs little.
        self.vae = models.load(models.resolve_folder(vae) if vae else models.resolve_folder(root, "vae"))
        self.unet = models.load(root, subfolder="unet", dtype=dtype) if load_unet else None
        if loras:
            if self.unet is None:
                raise ValueError("a LoRA is merged into the UNet: load_unet must be true")
            targets = {"unet": self.unet, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
            paths = {name: lora.module_paths(model) for name, model in targets.items()}
            for location, scale in loras:
                for component, factors in lora_files.read(location, modules=paths, unet_config=self.unet.config).items():
                    lora.merge(targets[component], factors, scale, str(location))
        self.tables = schedulers.make_scheduler(scheduler, sdxl.scheduler_config(root), num_steps)
        self.vae_scale = sdxl.vae_scale_factor(self.vae.config)
        if resolution is None:
            unet_config = self.unet.config if self.unet is not None else models.read_config(root / "unet")
            resolution = unet_config["sample_size"] * self.vae_scale
        if resolution % self.vae_scale:
            raise BadInput(f"resolution {resolution} is not divisible by the VAE's factor {self.vae_scale}")
        self.resolution = resolution
        self.latent_channels = self.vae.config["latent_channels"]
        self.text_length = int(encoders[1].config["max_position_embeddings"])
        # compel's weights blend from each tokenizer's empty prompt, (1, length).
        self._empty_ids = tuple(prompt_weights.chunk([], tokenizer, 1, self.text_length).ids.astype(np.int32)
                                for tokenizer in self.tokenizers) if prompt_weighting == "compel" else (None, None)
        self._text = nnx.split(nnx.List(encoders))
        self._vae = nnx.split(self.vae)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def _encode(self, graphdef: nnx.GraphDef, state: nnx.State, text_1: dict[str, jax.Array],
                text_2: dict[str, jax.Array], empty_ids: tuple[jax.Array | None, jax.Array | None]):
        te1, te2 = nnx.merge(graphdef, state)
        return prompt_encoding.encode_text(te1, te2, text_1, text_2, chunks=self.text_chunks,
                                           weighting=self.prompt_weighting, empty_ids=empty_ids)

    def text_arrays(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Each tokenizer's `prompt_weights.text_arrays` of ``texts``, as the encoding reads them
        (ids in int32: JAX's default integers)."""
        def arrays(tokenizer) -> dict[str, np.ndarray]:
            laid_out = prompt_weights.text_arrays(tokenizer, texts, self.text_chunks, self.text_length,
                                                  self.prompt_weighting)
            return {name: array.astype(np.int32) if array.dtype == np.int64 else array
                    for name, array in laid_out.items()}

        return arrays(self.tokenizers[0]), arrays(self.tokenizers[1])

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str | None],
               text: tuple[nnx.GraphDef, nnx.State] | None = None) -> dict[str, jax.Array]:
        """Prompt and negative-prompt embeddings, computed once and reused by every call.

        A negative prompt of None is the model's unconditional input: zeros where the folder says
        ``force_zeros_for_empty_prompt`` (SDXL), else the encoded empty prompt; as in diffusers.
        ``text``: (graph, state) of an ``nnx.List`` of two text encoders to use instead of the
        folder's (a run's adapted encoders, on its mesh).
        """
        if len(prompts) != len(negative_prompts):
            raise ValueError("one negative prompt per prompt")
        negatives = [n or "" for n in negative_prompts]
        # Every text read first: bad syntax names the text, and a text too long says what it loses.
        prompt_weights.check_texts(self.tokenizers, self.text_chunks, self.text_length, self.prompt_weighting,
                                   prompts, prompts, negative_prompts, negatives, logger=log)
        inputs = lambda texts: (*self.text_arrays(texts), self._empty_ids)
        if text is not None:  # the arrays go where the encoders are, which may span processes
            replicated = sharding.replicated(jax.tree.leaves(text[1])[0].sharding.mesh)
            inputs = lambda texts: jax.device_put((*self.text_arrays(texts), self._empty_ids), replicated)
        text = self._text if text is None else text
        embeds, pooled = self._encode(*text, *inputs(prompts))
        neg_embeds, neg_pooled = self._encode(*text, *inputs(negatives))
        if self.force_zeros_for_empty_prompt:
            zero = jnp.asarray([n is None for n in negative_prompts])
            neg_embeds = jnp.where(zero[:, None, None], 0, neg_embeds).astype(neg_embeds.dtype)
            neg_pooled = jnp.where(zero[:, None], 0, neg_pooled).astype(neg_pooled.dtype)
        return {"prompt_embeds": embeds, "pooled": pooled, "neg_prompt_embeds": neg_embeds, "neg_pooled": neg_pooled}

    @functools.partial(jax.jit, static_argnums=(0, 1, 3))
    def _sample(self, unet_graph, unet_params, vae_graph, vae_state, embeds, latents, guidance_scale, keys):
        unet = nnx.merge(unet_graph, unet_params)
        vae = nnx.merge(vae_graph, vae_state)
        size = (latents.shape[2] * self.vae_scale, latents.shape[3] * self.vae_scale)  # the image's (h, w)
        time_ids = make_time_ids(size, (0, 0), size, latents.shape[0])
        out = sample_latents(
            unet,
            self.tables,
            latents,
            embeds["prompt_embeds"],
            embeds["pooled"],
            time_ids,
            embeds["neg_prompt_embeds"],
            embeds["neg_pooled"],
            time_ids,
            guidance_scale,
            keys,
        )
        return decode_latents(vae, out.astype(jnp.float32))

    @staticmethod
    def seed_keys(count: int, seed: int) -> jax.Array:
        """Image i's random key: that of seed + i, whatever the batch it is generated in."""
        return jnp.stack([jax.random.PRNGKey(seed + i) for i in range(count)])

    def initial_latents(self, count: int, seed: int, size: tuple[int, int] | None = None) -> jax.Array:
        """Image i starts from the noise of its key (``seed_keys``); an ancestral sampler draws
        its step noise from the same key (see ``sample_latents``). ``size``: the images' (height,
        width), each a multiple of the VAE's factor; by default the square of ``resolution``. Each
        size compiles the sampler once."""
        height, width = size or (self.resolution, self.resolution)
        if height % self.vae_scale or width % self.vae_scale or min(height, width) <= 0:
            raise BadInput(f"size {width}x{height}: both sides must be positive multiples of the VAE's factor {self.vae_scale}")
        shape = (self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        return jax.vmap(lambda key: jax.random.normal(key, shape))(self.seed_keys(count, seed))

    def generate_from_embeds(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        embeds: dict[str, jax.Array],
        *,
        seed: int = 0,
        guidance_scale: float = 5.0,
        latents: jax.Array | None = None,
        keys: jax.Array | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3) for pre-encoded prompts, with the given UNet weights.

        ``latents`` (N, C, h, w) replaces the seeded initial noise, e.g. to reproduce another
        implementation's images exactly; ``keys`` (N,) the seeded keys of the step noise;
        ``size`` the images' (height, width) (see ``initial_latents``)."""
        count = embeds["prompt_embeds"].shape[0]
        if latents is None:
            latents = self.initial_latents(count, seed, size)
        if keys is None:
            keys = self.seed_keys(count, seed)
        images = self._sample(graphdef, params, *self._vae, embeds, latents, jnp.float32(guidance_scale), keys)
        return sharding.to_host(images)

    def replicate_on(self, mesh: jax.sharding.Mesh) -> None:
        """Puts the VAE on every device of ``mesh``, to sample with a UNet sharded over it (on a pod
        that mesh spans processes, and arrays on one local device cannot join its computations)."""
        graph, state = self._vae
        self._vae = (graph, jax.device_put(sharding.to_host(state), sharding.replicated(mesh)))

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        negative_prompt: str | None = None,
        seed: int = 0,
        guidance_scale: float = 5.0,
        latents: jax.Array | None = None,
        size: tuple[int, int] | None = None,
    ) -> list[Image.Image]:
        if self.unet is None:
            raise ValueError("this Generator was built without a UNet; use generate_from_embeds")
        embeds = self.encode(prompts, [negative_prompt] * len(prompts))
        graphdef, params = nnx.split(self.unet)
        images = self.generate_from_embeds(
            graphdef, params, embeds, seed=seed, guidance_scale=guidance_scale, latents=latents, size=size
        )
        return [Image.fromarray(image) for image in images]

# --------------------------------------------------------------------------------------------
# Validation images


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, columns*W, 3) image."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


class Validator:
    """Generates the configured prompts with the JAX sampler every ``validation.every_steps``.

    The text encoders and VAE are loaded once and the prompts encoded once; each call only runs the
    sampler with the current (EMA) UNet weights and writes a PNG grid, which the metrics writer also
    logs (TensorBoard, W&B).
    """

    def __init__(self, cfg: Any, base: epath.PathLike, run_dir: epath.PathLike, writer: Any):
        v = cfg.validation
        self.cfg = cfg
        self.writer = writer
        self.out = storage.path(run_dir) / "samples"
        self.generator = Generator(
            base,
            vae=cfg.model.vae,
            scheduler=v.scheduler,
            num_steps=v.num_steps,
            resolution=v.resolution or cfg.data.resolution,
            dtype=jnp.dtype(cfg.model.dtype),
            load_unet=False,
            max_text_chunks=v.max_text_chunks or cfg.data.max_text_chunks,  # null: the captions' chunks
            prompt_weighting=v.prompt_weighting,
        )
        self.embeds = self.generator.encode(list(v.prompts), [v.negative_prompt] * len(v.prompts))
        # (height, width) of each grid, and its name in the file; one square grid without sizes.
        self.sizes = {buckets.size_text(size): size for size in map(buckets.parse_size, v.sizes)} or {"": None}
        self.latents = self.keys = None

    def run(self, step: int, graphdef: nnx.GraphDef, params: nnx.State,
            text_encoders: tuple[nnx.GraphDef, nnx.State] | None = None) -> epath.Path:
        """Every process calls this (the sampler is sharded like the UNet); process 0 writes.
        ``text_encoders``: a run's adapted encoders (see ``Generator.encode``), which encode the
        prompts anew at every call, since they change as the run trains."""
        v = self.cfg.validation
        if self.latents is None:  # first call: everything the sampler reads goes where the UNet is
            replicated = sharding.replicated(jax.tree.leaves(params)[0].sharding.mesh)
            self.generator.replicate_on(replicated.mesh)
            self.embeds = jax.device_put(sharding.to_host(self.embeds), replicated)
            self.latents, self.keys = jax.device_put(sharding.to_host((
                {name: self.generator.initial_latents(len(v.prompts), v.seed, size) for name, size in self.sizes.items()},
                self.generator.seed_keys(len(v.prompts), v.seed))), replicated)
        embeds = self.embeds
        if text_encoders is not None:
            embeds = self.generator.encode(list(v.prompts), [v.negative_prompt] * len(v.prompts), text_encoders)
        paths = []
        for name in self.sizes:
            # The UNet's mesh as the ambient one while the sampler is traced: kernels that must run
            # per device (splash attention's shard_map) read it from there, as in the train step.
            with jax.set_mesh(jax.tree.leaves(params)[0].sharding.mesh):
                images = self.generator.generate_from_embeds(
                    graphdef, params, embeds, guidance_scale=v.guidance_scale, latents=self.latents[name], keys=self.keys
                )
            grid = image_grid(images)
            paths.append(self.out / (f"step_{step:07d}_{name}.png" if name else f"step_{step:07d}.png"))
            if jax.process_index() == 0:
                storage.atomic_write_bytes(paths[-1], png_bytes(grid))
                self.writer.image(step, f"validation/{name}" if name else "validation", grid)
        sharding.sync("validation")
        return paths[0]
