"""The demo's synthetic dataset: deterministic, three disjoint splits whose held-out pairs are never
trained together, and a pixel classifier that reads shape, shape colour and background."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flax_train.data.images import SourceSpec, open_source
from flax_train.demo import synthetic


def test_splits_are_disjoint_and_held_out_pairs_are_never_trained_together():
    held = synthetic.held_out_combinations()
    validation = synthetic.validation_combinations()
    train = synthetic.training_combinations()
    assert (len(held), len(validation), len(train)) == (56, 16, 96)
    assert len(set(held) | set(validation) | set(train)) == len(synthetic.all_combinations()) == 8 * 7 * 3
    trained_pairs = {(t.shape_colour, t.shape) for t in train}
    for c in held:
        assert c.shape_colour != c.background
        # The scored (shape colour, shape) pair never appears in training, but each part does.
        assert (c.shape_colour, c.shape) not in trained_pairs
        assert any(t.shape_colour == c.shape_colour for t in train) and any(t.shape == c.shape for t in train)
        assert any(t.background == c.background and t.shape == c.shape for t in train)
    # Validation combinations are new triples of trained pairs: for tuning without the held-out set.
    assert set(validation).isdisjoint(train) and all((c.shape_colour, c.shape) in trained_pairs for c in validation)
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
        expected = synthetic.Combination(row["shape_colour"], row["shape"], row["background"])
        assert synthetic.classify(image) == expected, row
        # A blurred, noisy rendering (what a small generator produces) still reads the same colours.
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64) / 255
        noisy = np.clip(blurred + np.random.default_rng(0).normal(0, 0.05, blurred.shape), 0, 1)
        assert synthetic.classify(noisy) == expected, row


def test_classifier_reports_no_shape_on_a_plain_image():
    plain = Image.new("RGB", (32, 32), synthetic.COLOURS["green"])
    assert synthetic.classify(plain) == (None, None, "green")


def test_score_counts_each_attribute_and_all_three_together(dataset):
    rows = read_metadata(dataset)[:12]
    images = [np.asarray(Image.open(dataset / row["file_name"]).convert("RGB")) for row in rows]
    asked = [synthetic.Combination(r["shape_colour"], r["shape"], r["background"]) for r in rows]
    assert synthetic.score(images, asked) == {"shape_colour": 1.0, "shape": 1.0, "background": 1.0, "joint": 1.0, "count": 12}
    # Asking for another shape: shape and joint drop to 0, the colours still match.
    other_shape = [c._replace(shape=next(s for s in synthetic.SHAPES if s != c.shape)) for c in asked]
    assert synthetic.score(images, other_shape) == {"shape_colour": 1.0, "shape": 0.0, "background": 1.0, "joint": 0.0, "count": 12}
    # Half the prompts ask for another shape colour: joint follows the weakest attribute.
    mixed = [c._replace(shape_colour=c.background) if i % 2 else c for i, c in enumerate(asked)]
    assert synthetic.score(images, mixed)["joint"] == synthetic.score(images, mixed)["shape_colour"] == 0.5
    # A plain background, no shape: only the background can match.
    plain = [np.full((64, 64, 3), synthetic.COLOURS[c.background], np.uint8) for c in asked]
    assert synthetic.score(plain, asked) == {"shape_colour": 0.0, "shape": 0.0, "background": 1.0, "joint": 0.0, "count": 12}


def test_the_dataset_is_an_ordinary_imagefolder(tmp_path):
    path = synthetic.write_synthetic_dataset(tmp_path / "set", 5, image_size=64, seed=1)
    source = open_source(SourceSpec("imagefolder", str(path)))
    assert len(source) == 5 and source.rejected == []
    assert source[0].key == "images/00000.png" and source[0].caption.startswith("a ")
