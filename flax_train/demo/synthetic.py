"""The built-in captioned dataset: one coloured shape on a coloured background.

Captions read "a red circle on a blue background". The 168 (shape colour, shape, background)
combinations fall into three fixed splits:

* held out: every combination of 8 (shape colour, shape) pairs that never appear together in
  training ("a red circle" on any background), although each colour and each shape is trained
  with others. Asking for them measures composition of what was learnt, not recall;
* validation: 16 further combinations, one background for each remaining pair, kept out of
  training to tune the recipe on, so the scores reported at the end are not tuned on;
* training: the other 96.

`classify` reads the shape, its colour and the background from the pixels; `score` turns that
into the prompt-adherence figures the demo reports.

`write_synthetic_dataset` writes the set as an imagefolder (PNG files + metadata.jsonl), so the
demo goes through exactly the code path that user data goes through. Everything is a function of
the seed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# Far apart in RGB, so that nearest-colour classification of a blurry generated image is robust.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Non-square originals make the recorded crop corner and original size matter.
_ASPECTS = ((1, 1), (1, 1), (4, 3), (3, 4))
_FORMAT_VERSION = 2


class Combination(NamedTuple):
    shape_colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.shape_colour} {self.shape} on a {self.background} background"


def all_combinations() -> list[Combination]:
    names = list(COLOURS)
    return [Combination(c, s, b) for c in names for s in SHAPES for b in names if b != c]


# Images in the demo's dataset: about 5 of each training combination.
NUM_IMAGES = 512


def held_out_pairs() -> list[tuple[str, str]]:
    """(shape colour, shape) pairs never trained together: colour i with shape i mod 3."""
    return [(colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS)]


def held_out_combinations() -> list[Combination]:
    """Every combination of a held-out pair (8 pairs x 7 backgrounds = 56), none seen in training."""
    pairs = set(held_out_pairs())
    return [c for c in all_combinations() if (c.shape_colour, c.shape) in pairs]


def validation_combinations() -> list[Combination]:
    """One combination per trained (shape colour, shape) pair (16), kept out of training for tuning."""
    names = list(COLOURS)
    held = set(held_out_pairs())
    chosen = []
    for i, colour in enumerate(names):
        for k, shape in enumerate(SHAPES):
            if (colour, shape) not in held:
                # Offsets 1..7 never land on the shape colour itself; vary them so every background recurs.
                chosen.append(Combination(colour, shape, names[(i + 1 + (i + k) % (len(names) - 1)) % len(names)]))
    return chosen


def training_combinations() -> list[Combination]:
    excluded = set(held_out_combinations()) | set(validation_combinations())
    return [c for c in all_combinations() if c not in excluded]


def draw_image(combination: Combination, short_side: int, rng: np.random.Generator) -> Image.Image:
    """One image: random aspect (short side fixed), shape size and position drawn from `rng`.

    The shape stays inside the central square, so a centre crop always shows all of it.
    """
    aspect_w, aspect_h = _ASPECTS[rng.integers(len(_ASPECTS))]
    width = short_side * aspect_w // min(aspect_w, aspect_h)
    height = short_side * aspect_h // min(aspect_w, aspect_h)
    image = Image.new("RGB", (width, height), COLOURS[combination.background])
    draw = ImageDraw.Draw(image)

    size = rng.uniform(0.55, 0.75) * short_side
    slack = (short_side - size) / 2 * 0.8
    cx = width / 2 + rng.uniform(-slack, slack)
    cy = height / 2 + rng.uniform(-slack, slack)
    half = size / 2
    fill = COLOURS[combination.shape_colour]
    if combination.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif combination.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif combination.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {combination.shape!r}; known: {SHAPES}")
    return image


def synthetic_samples(num_images: int, seed: int) -> list[Combination]:
    """The combinations of a dataset of `num_images`, drawn uniformly from the training set."""
    choices = training_combinations()
    rng = np.random.default_rng([seed, 0])
    return [choices[i] for i in rng.integers(len(choices), size=num_images)]


def write_synthetic_dataset(path: str | os.PathLike, num_images: int, *, image_size: int = 64, seed: int = 0) -> Path:
    """Writes the dataset as an imagefolder: `images/NNNNN.png` and `metadata.jsonl`.

    A folder already holding the same dataset (same count, size, seed) is left as it is. The
    folder is built next to its final place and renamed into it, so an interrupted write never
    leaves a half dataset that looks finished.
    """
    path = Path(path)
    params = {"version": _FORMAT_VERSION, "num_images": num_images, "image_size": image_size, "seed": seed}
    stamp = path / "synthetic.json"
    if stamp.exists():
        if json.loads(stamp.read_text()) == params:
            return path
        raise FileExistsError(f"{path} holds a different synthetic dataset ({stamp.read_text()}); want {params}")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a synthetic dataset folder")

    building = path.with_name(path.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    (building / "images").mkdir(parents=True)
    lines = []
    for i, combination in enumerate(synthetic_samples(num_images, seed)):
        image = draw_image(combination, image_size, np.random.default_rng([seed, 1, i]))
        name = f"images/{i:05d}.png"
        image.save(building / name)
        lines.append(json.dumps({"file_name": name, "text": combination.caption, **combination._asdict()}))
    (building / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (building / "synthetic.json").write_text(json.dumps(params))
    if path.exists():
        path.rmdir()
    path.parent.mkdir(parents=True, exist_ok=True)
    building.rename(path)
    return path


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 HWC RGB; float arrays are taken to be in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    return array


def _nearest_colour_labels(pixels: np.ndarray) -> np.ndarray:
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    distances = ((pixels[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return distances.argmin(-1)


def _shape_mask(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    labels = _nearest_colour_labels(_as_rgb_array(image))
    h, w = labels.shape
    border = max(1, min(h, w) // 10)
    frame = np.concatenate(
        [labels[:border].ravel(), labels[-border:].ravel(), labels[:, :border].ravel(), labels[:, -border:].ravel()]
    )
    background = int(np.bincount(frame, minlength=len(COLOURS)).argmax())
    return labels, labels != background, list(COLOURS)[background]


def classify(image: Image.Image | np.ndarray) -> Combination:
    """(shape colour, shape, background) measured from the pixels.

    Each pixel takes the nearest palette colour; the background is the commonest colour of the
    outer frame, the shape colour the commonest of the rest. The shape is read from the pixels of
    the largest region of that colour, in its bounding box, in ways a blurry rendering keeps: an upright triangle has
    its centre of mass two thirds of the way down (a circle or square at half way); of the other
    two, the one whose outline overlaps the pixels more (intersection over union) wins. No shape
    (under 2% of the pixels differ from the background) gives None for the shape and its colour.
    """
    labels, mask, background = _shape_mask(image)
    if mask.mean() < 0.02:
        return Combination(None, None, background)
    colour = int(np.bincount(labels[mask], minlength=len(COLOURS)).argmax())
    # The largest connected region of that colour: stray pixels elsewhere say nothing of the shape.
    regions, count = ndimage.label(labels == colour)
    largest = 1 + int(np.argmax(np.bincount(regions.ravel(), minlength=count + 1)[1:]))
    rows, cols = np.nonzero(regions == largest)
    box = regions[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == largest
    height, width = box.shape
    if (rows.mean() - rows.min() + 0.5) / height > 0.55:
        shape = "triangle"
    else:
        y, x = np.mgrid[0:height, 0:width]
        circle = ((y + 0.5) / height - 0.5) ** 2 + ((x + 0.5) / width - 0.5) ** 2 <= 0.25
        # IoU with the full box is the fill ratio; with the inscribed circle, overlap over union.
        square_iou = box.mean()
        circle_iou = (box & circle).sum() / (box | circle).sum()
        shape = "square" if square_iou > circle_iou else "circle"
    return Combination(list(COLOURS)[colour], shape, background)


def score(images: list[np.ndarray], prompts: list[Combination]) -> dict[str, float]:
    """Share of images whose measured shape, shape colour and background match their prompt's,
    each on its own and all three at once ("joint")."""
    found = [classify(image) for image in images]
    n = max(len(images), 1)
    report = {
        name: sum(getattr(f, name) == getattr(p, name) for f, p in zip(found, prompts)) / n
        for name in Combination._fields
    }
    report["joint"] = sum(f == p for f, p in zip(found, prompts)) / n
    report["count"] = len(images)
    return report
