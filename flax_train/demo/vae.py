"""Brief training of a small AutoencoderKL, so that the demo's latents decode to real images.

The demo pipeline is built offline with random weights; a random VAE would turn every sample into
noise. `train_vae` trains the folder's Flax VAE on the demo images for about a minute on a CPU and
writes it back in place, with `scaling_factor` chosen as SDXL's was: 1 / std of the latents, so that
the latents the UNet learns from have about unit variance.

    report = train_vae("runs/demo/base/vae", images)      # uint8 NHWC
    python -m flax_train.demo.vae                           # measures the demo-sized run
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from flax_train import config as config_lib, models
from sdxl_common import sdxl
from flax_train.data import prepare
from flax_train.data.images import open_source, prepare_sample
from flax_train.demo import CONFIG, synthetic, tiny
from flax_train.models.vae import AutoencoderKL

# Tuned on the demo (512 synthetic shapes at 32x32, the demo pipeline's 3-level VAE): about two
# minutes on an idle 2-core CPU, after which 98% of the shapes, seen or not, read back with both
# colours right (`python -m flax_train.demo.vae`; 400 steps: 83%).
DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 8
DEFAULT_LEARNING_RATE = 1e-3
# The KL term is a per-element mean like the reconstruction term. It only has to keep the latents
# at a sane scale; much larger weights blur the reconstructions.
DEFAULT_KL_WEIGHT = 1e-3
# Larger images are box-downsampled to this size for the training steps: a step costs a quarter of
# one at 64x64, and a convolutional VAE trained on the smaller copies reconstructs the full-size
# images as well (the scaling factor and PSNR are measured at full size).
DEFAULT_TRAIN_SIZE = 32


def _check_images(images: np.ndarray, in_channels: int, factor: int) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array (N, H, W, C) of uint8, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != in_channels:
        raise ValueError(f"images must have shape (N, H, W, {in_channels}), got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: the VAE needs at least one image to train on")
    height, width = images.shape[1:3]
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not divisible by the VAE's downsampling factor {factor}")
    return images


def downsampling_factor(vae: AutoencoderKL) -> int:
    return sdxl.vae_scale_factor(vae.config)


def _to_model_input(images: np.ndarray) -> jax.Array:
    """uint8 NHWC -> float32 NCHW in [-1, 1], the VAE's input convention."""
    return jnp.asarray(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), jnp.float32) / 127.5 - 1.0


def _to_uint8(x: jax.Array) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    pixels = np.asarray(jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0).round())
    return pixels.astype(np.uint8).transpose(0, 2, 3, 1)


def training_images(cfg: config_lib.Config) -> np.ndarray:
    """A run's images exactly as its latent cache encodes them (same source and crop), uint8 NHWC."""
    source_spec, preprocess = prepare.specs_from_config(cfg)
    source = open_source(source_spec)
    return np.stack([prepare_sample(source[i], i, preprocess).pixels for i in range(len(source))])


def _box_downsample(x: jax.Array, factor: int) -> jax.Array:
    """Mean of each factor x factor block of NCHW images."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


def _training_downsample(shape: tuple[int, ...], train_size: int | None, vae_factor: int) -> int:
    """The integer factor that brings (H, W) down to about `train_size`, or 1 where none fits."""
    height, width = shape[1:3]
    if train_size is None or min(height, width) <= train_size:
        return 1
    factor = min(height, width) // train_size
    while factor > 1 and (height % factor or width % factor or (height // factor) % vae_factor or (width // factor) % vae_factor):
        factor -= 1
    return factor


def _batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def vae_loss(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    x: jax.Array,
    key: jax.Array,
    noise_scale: jax.Array,
    kl_weight: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """MSE + L1 of decode(posterior sample) against `x`, plus `kl_weight` x KL(posterior || N(0, 1)).

    The sample is mean + noise_scale * std * eps. Decoding samples rather than means teaches the
    decoder to tolerate latents that are a little off, which is what a briefly trained UNet
    produces. L1 sharpens the flat colour regions that MSE alone leaves soft.
    """
    vae = nnx.merge(graphdef, params, rest)
    mean, logvar = vae.encode(x)
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    recon = vae.decode(mean + noise_scale * jnp.exp(0.5 * logvar) * eps).astype(jnp.float32)
    error = recon - x
    reconstruction = jnp.mean(jnp.square(error)) + jnp.mean(jnp.abs(error))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return reconstruction + kl_weight * kl, (reconstruction, kl)


def train_step(
    state: tuple[nnx.State, optax.OptState],
    pixels: jax.Array,
    indices: jax.Array,
    key: jax.Array,
    noise_scale: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    optimizer: optax.GradientTransformation,
    kl_weight: float,
) -> tuple[tuple[nnx.State, optax.OptState], dict[str, jax.Array]]:
    """One Adam step on the images `pixels[indices]` (NCHW in [-1, 1]), each mirrored at random."""
    params, opt_state = state
    k_flip, k_sample = jax.random.split(key)
    x = pixels[indices]
    # Shapes and colours look the same mirrored; the VAE sees twice the variety for free.
    flip = jax.random.bernoulli(k_flip, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[..., ::-1], x)
    (loss, (reconstruction, kl)), grads = jax.value_and_grad(vae_loss, has_aux=True)(
        params, graphdef, rest, x, k_sample, noise_scale, kl_weight
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "reconstruction": reconstruction, "kl": kl, "grad_norm": optax.global_norm(grads)}
    return (params, opt_state), metrics


def encode_means(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Posterior means (N, latent_channels, h, w) of uint8 NHWC images, before scaling."""
    images = _check_images(images, vae.config["in_channels"], downsampling_factor(vae))
    graphdef, state = nnx.split(vae)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])
    return np.concatenate(
        [np.asarray(encode(state, _to_model_input(images[b])), np.float32) for b in _batches(len(images), batch_size)]
    )


def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 NHWC images through encode (posterior mean) and decode, back to uint8 NHWC."""
    images = _check_images(images, vae.config["in_channels"], downsampling_factor(vae))
    graphdef, state = nnx.split(vae)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return np.concatenate([_to_uint8(apply(state, _to_model_input(images[b]))) for b in _batches(len(images), batch_size)])


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between uint8 images (inf when they are identical)."""
    mse = np.mean(np.square(original.astype(np.float64) - reconstruction.astype(np.float64))) / 255.0**2
    return math.inf if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def train_vae(
    vae_folder: str | Path,
    images: np.ndarray,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    train_size: int | None = DEFAULT_TRAIN_SIZE,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Trains the AutoencoderKL in `vae_folder` on uint8 NHWC `images` and writes it back in place.

    The config's `scaling_factor` becomes 1 / std of the posterior means of `images`, so that
    scaled latents have unit variance. `train_size=None` trains at full size. Returns
    {"initial_loss", "final_loss", "psnr", "scaling_factor", "latent_mean", "latent_std", "steps",
    "train_size", "seconds"}; `psnr` (dB) is that of the posterior-mean reconstructions of `images`
    after training, the losses are means over the first and last few steps.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
    started = time.perf_counter()
    vae = models.load(vae_folder)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{vae_folder} holds a {type(vae).__name__}, not an AutoencoderKL")
    vae_factor = downsampling_factor(vae)
    images = _check_images(images, vae.config["in_channels"], vae_factor)

    # Warm-up, then cosine decay to 0: a high rate early, a settled model at the end. Adam's b2 =
    # 0.99 adapts its scale within ~100 steps instead of ~1000, which a run this short needs.
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 8), steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule, b2=0.99))
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    state = (params, optimizer.init(params))
    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, rest=rest, optimizer=optimizer, kl_weight=kl_weight),
        donate_argnums=0,
    )

    factor = _training_downsample(images.shape, train_size, vae_factor)
    pixels = _box_downsample(_to_model_input(images), factor) if factor > 1 else _to_model_input(images)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    batch = min(batch_size, len(images))
    order = np.empty(0, np.int64)
    history: list[jax.Array] = []
    bar = tqdm(range(steps), desc="train vae", unit="step", disable=not progress)
    for i in bar:
        # Epochs of shuffled images: each image once per epoch.
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(images))])
        indices, order = order[:batch], order[batch:]
        # The posterior noise is phased in over the first half. From a random start the encoder's
        # log-variance is about 0: noise of std 1 would drown the small initial means, and the
        # decoder would learn nothing until the encoder had shrunk it.
        noise_scale = jnp.float32(min(1.0, 2.0 * i / steps))
        state, metrics = step(state, pixels, jnp.asarray(indices), jax.random.fold_in(key, i), noise_scale)
        history.append(metrics["loss"])
        # Read the loss one step late, so the host never waits for the step it just queued.
        if len(history) > 1 and (i % 10 == 0 or i == steps - 1):
            bar.set_postfix(loss=f"{float(history[-2]):.4f}")
    losses = np.asarray(jax.device_get(history), np.float64)
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(f"VAE training diverged: last losses {losses[-5:]}")
    nnx.update(vae, state[0])

    means = encode_means(vae, images)
    latent_std = float(means.std())
    if not math.isfinite(latent_std) or latent_std <= 0:
        raise FloatingPointError(f"latent std is {latent_std} after training; the VAE collapsed")
    scaling_factor = 1.0 / latent_std
    vae.config = models.freeze_config({**models.thaw_config(vae.config), "scaling_factor": scaling_factor})
    models.save(vae, vae_folder)

    window = max(1, min(10, steps // 5))
    return {
        "initial_loss": float(losses[:window].mean()),
        "final_loss": float(losses[-window:].mean()),
        "psnr": psnr(images, reconstruct(vae, images)),
        "scaling_factor": scaling_factor,
        "latent_mean": float(means.mean()),
        "latent_std": latent_std,
        "steps": steps,
        "train_size": images.shape[1] // factor,
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------
# Measuring the demo-sized run


def _unseen_synthetic_images(image_size: int, seed: int) -> tuple[np.ndarray, list]:
    """One new image of every colour/shape combination, held-out ones included, centre-cropped."""
    combinations = synthetic.all_combinations()
    images = []
    for i, combination in enumerate(combinations):
        image = synthetic.draw_image(combination, image_size, np.random.default_rng([seed, 2, i]))
        left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
        images.append(np.asarray(image.crop((left, top, left + image_size, top + image_size))))
    return np.stack(images), combinations


def classify_agreement(originals: np.ndarray, reconstructions: np.ndarray) -> float:
    """Share of images whose shape and colours read the same after the round trip."""
    same = [synthetic.classify(a) == synthetic.classify(b) for a, b in zip(originals, reconstructions)]
    return float(np.mean(same))


def main(argv: list[str] | None = None) -> int:
    """Trains the demo's VAE as the demo does and reports how well it reconstructs the shapes."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    demo_resolution = config_lib.load([CONFIG]).data.resolution
    parser = argparse.ArgumentParser(prog="python -m flax_train.demo.vae", description=main.__doc__)
    parser.add_argument("--image-size", type=int, default=demo_resolution)
    parser.add_argument("--num-images", type=int, default=synthetic.NUM_IMAGES, help="size of the synthetic training set")
    parser.add_argument("--seed", type=int, default=0, help="as the demo's train.seed: VAE weights and training order")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--kl-weight", type=float, default=DEFAULT_KL_WEIGHT)
    parser.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE)
    parser.add_argument("--vae-channels", type=int, nargs="+", default=tiny.DEMO_SIZES["vae_channels"])
    parser.add_argument("--out", type=Path, default=None, help="keep the trained VAE folder here")
    args = parser.parse_args(argv)

    config = tiny.tiny_component_configs(vocab_size=1, image_size=args.image_size, vae_channels=tuple(args.vae_channels))["vae"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp) / "vae"
        torch.manual_seed(args.seed + 1)  # the seed save_tiny_pipeline(seed=...) gives the VAE
        TorchAutoencoderKL(**config).save_pretrained(folder, safe_serialization=True)
        # The demo's training images, through the same source and preprocessing as the latent cache.
        data = synthetic.write_synthetic_dataset(Path(tmp) / "data", args.num_images, image_size=args.image_size, seed=args.seed)
        images = training_images(config_lib.load([CONFIG], [f"data.path={data}", f"data.resolution={args.image_size}"]))

        cpu = time.process_time()
        report = train_vae(
            folder,
            images,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            kl_weight=args.kl_weight,
            train_size=args.train_size,
            seed=args.seed,
        )
        report["cpu_seconds"] = time.process_time() - cpu
        vae = models.load(folder)
        unseen, _ = _unseen_synthetic_images(args.image_size, args.seed)
        report["agreement_train"] = classify_agreement(images, reconstruct(vae, images))
        report["agreement_unseen"] = classify_agreement(unseen, reconstruct(vae, unseen))
    report["vae_channels"] = list(config["block_out_channels"])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
