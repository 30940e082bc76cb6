"""prompt_2 and image-to-image on a torch_xla device (PJRT CPU here): still compiled once.

Image-to-image adds one graph, the VAE encoder (with the posterior sample and the scheduler's
add_noise), compiled on its first use; the strength only sets where the device step counter
starts, so after that no prompt, prompt_2, seed, image or strength compiles anything. The parity
of both features with diffusers is checked on plain torch in tests/test_xla_pipeline.py; here the
torch_xla images are checked against the plain-torch pipeline's.
"""
import numpy as np
import pytest

from flax_train.demo.tiny import save_tiny_pipeline
from test_xla_device import SMALL, varied_prompts
from xla_infer import Pipeline

pytestmark = pytest.mark.xdist_group("xla")  # the worker that already runs torch_xla (test_xla_device.py)

PROMPTS = ["a red circle", "a blue square on a green background"]
SEEDS = [5, 9]
STEPS = 4
# Another image size and batch size than test_xla_device.py's pipelines (64, 2), so that no graph
# of one module comes from torch_xla's in-memory cache in the other, in whichever order they run.
SIZE = 32
BATCH = 3
# XLA's CPU kernels differ from ATen's in summation order; fp32 results agree to ~1e-6.
ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xla_modes") / "sdxl", seed=0, **SMALL)


def load(folder, **kwargs):
    # dpmpp_2m: its multistep state is what a later start step could most easily get wrong.
    options = dict(device="xla", dtype="fp32", batch_size=BATCH, steps=STEPS, scheduler="dpmpp_2m", height=SIZE,
                   width=SIZE)
    return Pipeline.from_pretrained(folder, **{**options, **kwargs})


def random_images(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def test_image_to_image_compiles_one_graph_once_for_any_strength(folder):
    import torch_xla.debug.metrics as metrics

    pipe = load(folder)
    pipe.warmup()
    assert pipe.compile_count == 3  # text encode, denoise step, decode
    images = random_images(0, 2)
    kwargs = dict(negative_prompts=[None, "blurry"], prompt_2=["a green star", None], seeds=SEEDS, image=images,
                  strength=0.75, output_type="np")
    # The first image-to-image call warms up its own graph (not a recompilation error).
    got = pipe(PROMPTS, **kwargs)
    assert pipe.compile_count == 4 and "image" in pipe.warmed_up
    expected = load(folder, device="cpu")(PROMPTS, **kwargs)
    assert expected.std() > 0.01
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)

    # New prompts, prompt_2s, negatives, seeds, images and every strength (1 to 4 of the 4 steps),
    # and text-to-image again in between: nothing compiles (the guard would raise), and the only
    # device-to-host reads are the finished images, one per batch.
    prompts = varied_prompts()[:6]
    fetches_before = (metrics.metric_data("TransferFromDeviceTime") or (0,))[0]
    for i, strength in enumerate((0.25, 0.5, 1.0, 0.3)):
        pipe(prompts, negative_prompts=list(reversed(prompts)), prompt_2=prompts[i:] + prompts[:i],
             negative_prompt_2="dark", seeds=100 * i, image=random_images(i + 1, len(prompts)), strength=strength,
             guidance_scale=3.0 + i)
        pipe(prompts[:3], prompt_2="a green star", seeds=7 * i)
    pipe(prompts[:1], seeds=[1], image=random_images(9, 1)[0])  # the default strength, one image for all
    assert pipe.compile_count == 4
    batches = 4 * (2 + 1) + 1  # per round: 6 prompts in batches of 3, then 3 prompts
    assert (metrics.metric_data("TransferFromDeviceTime") or (0,))[0] - fetches_before == batches
    assert metrics.executed_fallback_ops() == []


# Inpainting and base + refiner, each at a batch size of its own (1, 4, 5: no other torch_xla test
# uses them) so every graph it counts is compiled by it, whatever ran before.


def random_masks(seed: int, n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size)) > 0.5).astype(np.uint8) * 255 for _ in range(n)]


def test_inpainting_with_a_4_channel_unet_compiles_two_graphs_once(folder):
    import torch_xla.debug.metrics as metrics

    pipe = load(folder, batch_size=1)
    pipe.warmup()
    assert pipe.compile_count == 3
    kwargs = dict(negative_prompts=["blurry"], seeds=[5], image=random_images(0, 1),
                  mask_image=random_masks(0, 1, SIZE), strength=0.75, output_type="np")
    got = pipe(PROMPTS[:1], **kwargs)
    assert pipe.compile_count == 5 and "mask" in pipe.warmed_up  # + the inpainting encode and the blend after each step
    expected = load(folder, batch_size=1, device="cpu")(PROMPTS[:1], **kwargs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    # New masks, images, strengths (1.0 starts from pure noise: a where, not another graph), blur,
    # prompts and seeds, and text-to-image in between: nothing compiles.
    fetches_before = (metrics.metric_data("TransferFromDeviceTime") or (0,))[0]
    prompts = varied_prompts()[:2]
    for i, strength in enumerate((1.0, 0.25, None)):
        pipe(prompts, seeds=10 * i, image=random_images(i + 1, 2), mask_image=random_masks(i + 1, 2, SIZE),
             strength=strength, mask_blur=2 if i else None, guidance_scale=2.0 + i)
        pipe(prompts[:1], seeds=i)
    assert pipe.compile_count == 5
    assert (metrics.metric_data("TransferFromDeviceTime") or (0,))[0] - fetches_before == 3 * (2 + 1)
    assert metrics.executed_fallback_ops() == []


def test_inpainting_unet_compiles_four_graphs_once(tmp_path_factory):
    size, batch = 16, 4
    inpainting = save_tiny_pipeline(tmp_path_factory.mktemp("xla_modes") / "inpainting", seed=1, kind="inpainting",
                                    image_size=size, **SMALL)
    pipe = load(inpainting, batch_size=batch, height=size, width=size)
    pipe.warmup()
    assert pipe.compile_count == 4  # text encode, inpainting encode, denoise step (9 channels in), decode
    images = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(4)]
    kwargs = dict(seeds=SEEDS, image=images[:2], mask_image=random_masks(0, 2, size), output_type="np")
    got = pipe(PROMPTS, **kwargs)
    np.testing.assert_allclose(got, load(inpainting, batch_size=batch, height=size, width=size, device="cpu")(
        PROMPTS, **kwargs), rtol=0, atol=ATOL)
    for i, strength in enumerate((1.0, 0.5, 0.3)):
        pipe(varied_prompts()[i: i + 5], seeds=i, image=images[i], mask_image=random_masks(i, 5, size),
             strength=strength)
    assert pipe.compile_count == 4


def test_base_and_refiner_compile_five_graphs_once_for_any_switch_point(folder, tmp_path_factory):
    size, batch = 16, 5
    base = folder  # the module's base model, at a batch size (hence graphs) of this test's own
    refiner = save_tiny_pipeline(tmp_path_factory.mktemp("xla_modes") / "refiner", seed=4, kind="refiner",
                                 image_size=size, **SMALL)
    options = dict(batch_size=batch, height=size, width=size, scheduler="euler_a", refiner=refiner)
    pipe = load(base, **options)
    pipe.warmup(refiner=True)
    # The base's three graphs, then the refiner's text encode (second encoder only) and denoise
    # step; its VAE has the base's architecture (as SDXL's refiner has), so its decode graph is
    # the base's, from torch_xla's in-memory cache.
    assert pipe.compile_count == 5
    kwargs = dict(negative_prompts=[None, "blurry"], seeds=SEEDS, denoising_end=0.5, output_type="np")
    np.testing.assert_allclose(pipe(PROMPTS, **kwargs), load(base, device="cpu", **options)(PROMPTS, **kwargs),
                               rtol=0, atol=ATOL)
    # Every switch point of the 4 steps (base 1 to 3 steps), new prompts and seeds: nothing compiles.
    for i, fraction in enumerate((0.3, 0.7, 0.8)):
        pipe(varied_prompts()[i: i + 6], seeds=i, denoising_end=fraction, aesthetic_score=5.0 + i)
    assert pipe.compile_count == 5
