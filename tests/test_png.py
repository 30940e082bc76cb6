"""The PNG files both command lines write: the settings that made an image travel with it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sdxl_common.png import png_bytes


def test_pngs_carry_their_settings_as_the_web_uis_read_them():
    """The `parameters` chunk worked by hand in the AUTOMATIC1111 layout (what ComfyUI and image
    sites also read): values holding a comma or colon quoted; each setting also a chunk of its own."""
    settings = {"prompt": "a cat, sitting", "negative_prompt": "blurry", "steps": 30, "scheduler": "euler_a",
                "guidance_scale": 7.5, "seed": 3, "model": "gs://bucket/sdxl", "strength": None,
                "prompt_2": "日本語"}
    png = Image.open(io.BytesIO(png_bytes(np.zeros((48, 64, 3), np.uint8), settings)))
    assert png.text["parameters"] == (
        'a cat, sitting\nNegative prompt: blurry\n'
        'Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 64x48, Model: "gs://bucket/sdxl"'
    )
    assert png.text["prompt_2"] == "日本語" and png.text["seed"] == "3" and png.text["strength"] == "null"
    no_negative = Image.open(io.BytesIO(png_bytes(np.zeros((8, 8, 3), np.uint8), {"prompt": "x", "steps": 2})))
    assert no_negative.text["parameters"] == "x\nSteps: 2, Size: 8x8"
