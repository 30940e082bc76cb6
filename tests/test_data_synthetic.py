"""The built-in synthetic dataset: deterministic, held-out combinations never trained on, pixel classifier."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flax_train.data import synthetic
from flax_train.data.sources import SourceSpec, open_source


def test_held_out_combinations_are_disjoint_and_leave_every_part_seen():
    held = synthetic.held_out_combinations()
    train = synthetic.training_combinations()
    assert len(held) == len(set(held)) == 24
    assert set(held).isdisjoint(train)
    assert len(train) + len(held) == len(synthetic.COLOURS) * (len(synthetic.COLOURS) - 1) * len(synthetic.SHAPES)
    for c in held:
        assert c.shape_colour != c.background
        # Each part of a held-out triple is trained in other combinations.
        assert any(t.shape_colour == c.shape_colour and t.shape == c.shape for t in train)
        assert any(t.background == c.background and t.shape == c.shape for t in train)
    assert held == synthetic.held_out_combinations()  # fixed, not drawn from a run's seed


def read_metadata(path):
    return [json.loads(line) for line in (path / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", 48, image_size=64, seed=5)


def test_dataset_is_deterministic_and_never_shows_held_out_combinations(dataset, tmp_path):
    rows = read_metadata(dataset)
    assert len(rows) == 48
    held = {tuple(c) for c in synthetic.held_out_combinations()}
    for row in rows:
        assert (row["shape_colour"], row["shape"], row["background"]) not in held
        assert row["text"] == f"a {row['shape_colour']} {row['shape']} on a {row['background']} background"
    sizes = {Image.open(dataset / row["file_name"]).size for row in rows}
    assert min(min(s) for s in sizes) == 64 and any(w != h for w, h in sizes)  # non-square originals

    again = synthetic.write_synthetic_dataset(tmp_path / "again", 48, image_size=64, seed=5)
    assert read_metadata(again) == rows
    for row in rows[:8]:
        assert (again / row["file_name"]).read_bytes() == (dataset / row["file_name"]).read_bytes()
    other = synthetic.write_synthetic_dataset(tmp_path / "other", 48, image_size=64, seed=6)
    assert [r["text"] for r in read_metadata(other)] != [r["text"] for r in rows]


def test_existing_dataset_is_reused_and_a_different_one_refused(dataset):
    before = (dataset / "metadata.jsonl").stat().st_mtime_ns
    assert synthetic.write_synthetic_dataset(dataset, 48, image_size=64, seed=5) == dataset
    assert (dataset / "metadata.jsonl").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError):
        synthetic.write_synthetic_dataset(dataset, 48, image_size=64, seed=7)


def test_classifier_reads_colours_and_shape_from_pixels(dataset):
    for row in read_metadata(dataset):
        image = Image.open(dataset / row["file_name"])
        assert synthetic.classify(image) == (row["shape_colour"], row["background"]), row
        assert synthetic.classify_shape(image) == row["shape"], row
        # A blurred, noisy rendering (what a small generator produces) still reads the same colours.
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64) / 255
        noisy = np.clip(blurred + np.random.default_rng(0).normal(0, 0.05, blurred.shape), 0, 1)
        assert synthetic.classify(noisy) == (row["shape_colour"], row["background"]), row


def test_classifier_reports_no_shape_on_a_plain_image():
    plain = Image.new("RGB", (32, 32), synthetic.COLOURS["green"])
    assert synthetic.classify(plain) == (None, "green")
    assert synthetic.classify_shape(plain) is None


def test_synthetic_source_goes_through_the_imagefolder_path(tmp_path):
    spec = SourceSpec("synthetic", str(tmp_path / "set"), num_images=5, image_size=64, seed=1)
    source = open_source(spec)
    assert len(source) == 5 and source.rejected == []
    assert source[0].key == "images/00000.png" and source[0].caption.startswith("a ")
