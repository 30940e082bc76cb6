"""`make demo` in short: every stage runs on the 8-device mesh and writes what it promises, and the
adherence score measures what it says it measures."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from PIL import Image

from flax_train import demo, vae_train
from flax_train.data import synthetic

RESOLUTION = 16  # the demo VAE downsamples by 4: 4x4 latents
PER_SPLIT = 3


def drawn(combos: list, size: int = 64) -> list[np.ndarray]:
    images = []
    for i, combo in enumerate(combos):
        image = synthetic.draw_image(combo, size, np.random.default_rng(i))
        left, top = (image.width - size) // 2, (image.height - size) // 2
        images.append(np.asarray(image.crop((left, top, left + size, top + size))))
    return images


def test_adherence_counts_matching_colours():
    combos = synthetic.held_out_combinations()[:8]
    images = drawn(combos)
    assert demo.adherence(images, combos) == {"both": 1.0, "shape_colour": 1.0, "background": 1.0, "count": 8}

    # Same images, prompts asking for other shape colours: only the backgrounds still match.
    other = [c._replace(shape_colour=next(n for n in synthetic.COLOURS if n not in (c.shape_colour, c.background))) for c in combos]
    assert demo.adherence(images, other) == {"both": 0.0, "shape_colour": 0.0, "background": 1.0, "count": 8}

    # A plain background, no shape: the shape colour is wrong whatever was asked.
    plain = [np.full((64, 64, 3), synthetic.COLOURS[c.background], np.uint8) for c in combos]
    assert demo.adherence(plain, combos)["shape_colour"] == 0.0
    assert demo.adherence([], []) == {"both": 0.0, "shape_colour": 0.0, "background": 0.0, "count": 0}


def test_short_demo_runs_every_stage(tmp_path, monkeypatch, capsys):
    # The VAE's minute of training, cut to a few steps: this checks the wiring, not the learning.
    monkeypatch.setattr(vae_train, "train_vae", functools.partial(vae_train.train_vae, steps=4, batch_size=4))
    run_dir = tmp_path / "demo"
    rc = demo.main(
        [
            "--run-dir",
            str(run_dir),
            "--per-split",
            str(PER_SPLIT),
            "--steps",
            "2",
            f"data.resolution={RESOLUTION}",
            "data.synthetic.num_images=16",
            "train.global_batch_size=8",
            "train.max_steps=2",
            "train.warmup_steps=0",
            "checkpoint.every_steps=2",
            "validation.every_steps=2",
            "validation.num_steps=2",
            "logging.every_steps=1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "prompt adherence" in out and str(run_dir / "export") in out

    report = json.loads((run_dir / "demo_report.json").read_text())
    training = set(c.caption for c in synthetic.training_combinations())
    held_out = set(c.caption for c in synthetic.held_out_combinations())
    assert report["seen"]["count"] == report["held_out"]["count"] == PER_SPLIT
    assert set(report["seen"]["prompts"]) <= training and len(set(report["seen"]["prompts"])) == PER_SPLIT
    assert set(report["held_out"]["prompts"]) <= held_out
    for split in ("seen", "held_out"):
        r = report[split]
        assert 0.0 <= r["both"] <= min(r["shape_colour"], r["background"]) <= 1.0
        grid = Image.open(run_dir / f"demo_{split}.png")
        zoom = demo.GRID_TILE_PIXELS // RESOLUTION
        assert grid.size == (PER_SPLIT * RESOLUTION * zoom, RESOLUTION * zoom)
    assert 0 < report["seconds"]["train"] <= report["seconds"]["total"]
    assert np.isfinite(report["final_loss"])

    # Every stage left its output: the offline pipeline with its trained VAE, the cache, metrics,
    # a checkpoint, validation images and the exported diffusers folder.
    base_scheduler = json.loads((run_dir / "base" / "scheduler" / "scheduler_config.json").read_text())
    assert base_scheduler["prediction_type"] == "v_prediction" and base_scheduler["rescale_betas_zero_snr"]
    vae_config = json.loads((run_dir / "base" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.13025  # set from the trained VAE's latents
    assert (run_dir / "cache" / "manifest.json").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2
    assert any((run_dir / "checkpoints").iterdir())
    assert list((run_dir / "samples").glob("*.png"))
    assert (run_dir / "export" / "model_index.json").is_file()
    exported = json.loads((run_dir / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert exported["prediction_type"] == "v_prediction"
