"""The demo's brief VAE training: it learns, writes a folder diffusers loads, and refuses bad input."""
import json

import numpy as np
import pytest
import torch

from flax_train import models
from flax_train.demo import vae as vae_train
from flax_train.demo import synthetic
from flax_train.demo.tiny import tiny_component_configs

SIZE = 16


@pytest.fixture
def vae_folder(tmp_path):
    from diffusers import AutoencoderKL

    config = tiny_component_configs(vocab_size=1, image_size=SIZE, vae_channels=(8, 16), norm_num_groups=4)["vae"]
    torch.manual_seed(0)
    AutoencoderKL(**config).save_pretrained(tmp_path / "vae", safe_serialization=True)
    return tmp_path / "vae"


def shapes(count: int, seed: int = 0) -> np.ndarray:
    combos = synthetic.all_combinations()
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        image = synthetic.draw_image(combos[rng.integers(len(combos))], SIZE, rng)
        images.append(np.asarray(image.crop((0, 0, SIZE, SIZE))))
    return np.stack(images)


def test_training_lowers_the_loss_and_writes_a_folder_diffusers_loads(vae_folder):
    from diffusers import AutoencoderKL

    images = shapes(16)
    before = vae_train.psnr(images, vae_train.reconstruct(models.load(vae_folder), images))
    report = vae_train.train_vae(
        vae_folder, images, steps=150, batch_size=8, learning_rate=2e-3, train_size=None, progress=False
    )
    assert report["final_loss"] < 0.5 * report["initial_loss"], report
    assert report["psnr"] > before + 3.0, (before, report)

    # The scaling factor written is 1 / std of the posterior means, so scaled latents have unit std.
    trained = models.load(vae_folder)
    means = vae_train.encode_means(trained, images)
    assert trained.config["scaling_factor"] == pytest.approx(1.0 / means.std(), rel=1e-5)
    assert report["scaling_factor"] == pytest.approx(trained.config["scaling_factor"])
    assert np.std(means * trained.config["scaling_factor"]) == pytest.approx(1.0, rel=1e-5)

    # diffusers reads the same weights and scaling factor, and decodes what our VAE decodes.
    reference = AutoencoderKL.from_pretrained(vae_folder).eval()
    assert reference.config.scaling_factor == pytest.approx(trained.config["scaling_factor"])
    x = torch.from_numpy(images[:4].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        torch_means = reference.encode(x).latent_dist.mean.numpy()
    np.testing.assert_allclose(torch_means, means[:4], atol=1e-4)
    assert json.loads((vae_folder / "config.json").read_text())["scaling_factor"] == trained.config["scaling_factor"]


def test_training_at_a_reduced_size_still_reports_full_size_figures(vae_folder):
    images = shapes(8, seed=1)
    report = vae_train.train_vae(vae_folder, images, steps=4, batch_size=4, train_size=SIZE // 2, progress=False)
    assert report["train_size"] == SIZE // 2
    assert np.isfinite(report["psnr"]) and report["steps"] == 4


@pytest.mark.parametrize(
    "shape, train_size, factor, expected",
    [
        ((1, 64, 64, 3), 32, 2, 2),
        ((1, 64, 64, 3), None, 2, 1),
        ((1, 32, 32, 3), 32, 2, 1),  # already small enough
        ((1, 64, 48, 3), 16, 2, 2),  # 48/16 = 3 does not divide 64; 2 does, and keeps both sides VAE-divisible
        ((1, 60, 60, 3), 16, 4, 3),  # 60/3 = 20, a multiple of the VAE's 4
        ((1, 60, 60, 3), 16, 8, 1),  # 60/3 = 20 and 60/2 = 30 are not multiples of 8
    ],
)
def test_training_downsample_factor(shape, train_size, factor, expected):
    assert vae_train._training_downsample(shape, train_size, factor) == expected


def test_bad_input_is_refused_before_training(vae_folder):
    good = shapes(2)
    cases = [
        (good.astype(np.float32), {}, "uint8"),
        (good[..., :2], {}, r"shape \(N, H, W, 3\)"),
        (good[:0], {}, "empty"),
        (good[:, :15, :15], {}, "not divisible"),
        (good, {"steps": 0}, "steps must be a positive integer"),
        (good, {"batch_size": 2.5}, "batch_size must be a positive integer"),
        (good, {"learning_rate": 0.0}, "learning_rate must be positive"),
        (good, {"kl_weight": -1.0}, "kl_weight must be >= 0"),
    ]
    written = (vae_folder / "diffusion_pytorch_model.safetensors").read_bytes()
    for images, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            vae_train.train_vae(vae_folder, images, progress=False, **kwargs)
    assert (vae_folder / "diffusion_pytorch_model.safetensors").read_bytes() == written


def test_psnr():
    a = np.zeros((1, 4, 4, 3), np.uint8)
    assert vae_train.psnr(a, a) == float("inf")
    b = np.full_like(a, 255)
    assert vae_train.psnr(a, b) == pytest.approx(0.0)
