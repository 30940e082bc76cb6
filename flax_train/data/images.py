"""Where training images come from, and how each becomes SDXL training pixels.

Sources: a Hub dataset, an imagefolder (images + metadata.jsonl), or images with same-name caption
.txt files. A source is a random-access list of `RawSample`s (an image file or encoded bytes, and
its caption) in a fixed order. Entries that can be rejected without opening the image (a metadata path that
leaves the dataset folder, an image without a caption file) never become samples; they are listed
in `source.rejected` with the reason, for the prepare report. Images are not decoded here.

Preprocessing decodes one sample and crops it as SDXL does, recording its micro-conditioning.
SDXL conditions on `add_time_ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.
The numbers are computed here, from the very crop that produced the pixels, and are cached with
the latent: they can never disagree with it (the diffusers SDXL script caches latents but redraws
random crops afterwards).

Every random choice of a sample (which caption of a list, the crop, the flip) comes from a
generator seeded by (seed, sample index, purpose): independent of batch size, device count,
process count, and of whether a prepare was interrupted and resumed.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence, get_args

import numpy as np
from PIL import Image, ImageOps
from sdxl_common import buckets
from sdxl_common.errors import BadInput, InputNotFound

DataSource = Literal["imagefolder", "captions_txt", "hf", "webdataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class RawSample:
    key: str  # stable name for reports: path relative to the dataset folder, or the row number
    image: Path | bytes  # a file, or the encoded image (Hub datasets)
    caption: str | Sequence[str] | None


class Source(Protocol):
    rejected: list[tuple[str, str]]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RawSample: ...


@dataclass(frozen=True)
class SourceSpec:
    """Which dataset to read; stored in the cache manifest.

    kind: "imagefolder" (`path` with metadata.jsonl), "captions_txt" (`path` with image files and
    same-name .txt captions), "hf" (`path` is a Hub dataset id or anything `datasets.load_dataset`
    accepts), or "webdataset" (`path` names tar shards: flax_train.data.webdataset).
    """

    kind: str
    path: str
    caption_column: str = "text"
    image_column: str = "image"  # hf only; imagefolder metadata names files in "file_name"
    split: str = "train"  # hf only
    dataset_config: str | None = None  # hf only: the dataset's configuration name, if it has several
    # DreamBooth: every image under the `path` folder, each with this one caption (none read).
    instance_prompt: str | None = None

    KINDS = get_args(DataSource)

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise BadInput(f"data source kind must be one of {self.KINDS}, got {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        """The fields that determine the samples."""
        fields = dataclasses.asdict(self)
        if self.kind != "hf":
            for name in ("image_column", "split", "dataset_config"):
                fields.pop(name)
        if self.instance_prompt is None:  # caches made before the key existed keep their settings
            fields.pop("instance_prompt")
        return fields


def _inside(root: Path, path: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


class ImageFolderSource:
    """A folder with `metadata.jsonl`: one JSON object per line, `file_name` relative to the folder.

    The caption is the `caption_column` field (a string, or a list of strings). File names that
    resolve (symlinks included) to somewhere outside the folder are rejected.
    """

    def __init__(self, root: str | os.PathLike, caption_column: str = "text"):
        self.root = Path(root).resolve()
        metadata = self.root / "metadata.jsonl"
        if not metadata.is_file():
            raise InputNotFound(f"{metadata}: an imagefolder dataset needs a metadata.jsonl")
        self.rejected: list[tuple[str, str]] = []
        self._samples: list[RawSample] = []
        with open(metadata, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name = row["file_name"]
                    if not isinstance(name, str):
                        raise TypeError("file_name is not a string")
                except (ValueError, KeyError, TypeError) as e:
                    self.rejected.append((f"metadata.jsonl:{number}", f"bad metadata line ({e})"))
                    continue
                path = (self.root / name).resolve()
                if not _inside(self.root, path):
                    self.rejected.append((name, "path outside dataset folder"))
                    continue
                self._samples.append(RawSample(key=name, image=path, caption=row.get(caption_column)))

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> RawSample:
        return self._samples[index]


def _image_files(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files anywhere under `root`, sorted, and those rejected (resolving outside it)."""
    if not root.is_dir():
        raise InputNotFound(f"{root}: no such dataset folder")
    images, rejected = [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        if _inside(root, path.resolve()):
            images.append(path)
        else:
            rejected.append((str(path.relative_to(root)), "path outside dataset folder"))
    return images, rejected


class CaptionTxtSource:
    """Image files anywhere under a folder, each with a caption in the same-name `.txt` file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        images, self.rejected = _image_files(self.root)
        self._images: list[Path] = []
        for path in images:
            if path.with_suffix(".txt").is_file():
                self._images.append(path)
            else:
                self.rejected.append((str(path.relative_to(self.root)), "missing caption file"))

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> RawSample:
        path = self._images[index]
        caption = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
        return RawSample(key=str(path.relative_to(self.root)), image=path, caption=caption)


class InstanceSource:
    """DreamBooth's instance images: every image file anywhere under a folder, each captioned with
    the one `prompt` ("a photo of sks dog"); caption files and metadata, if any, are not read."""

    def __init__(self, root: str | os.PathLike, prompt: str):
        self.root = Path(root).resolve()
        self._images, self.rejected = _image_files(self.root)
        self._prompt = prompt

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> RawSample:
        path = self._images[index]
        return RawSample(key=str(path.relative_to(self.root)), image=path, caption=self._prompt)


class HFSource:
    """A Hugging Face `datasets` dataset with an image column and a caption column.

    Images are read as encoded bytes (decoding disabled) so that our bounded decoder handles them
    and a bad one is skipped rather than raised by `datasets`.
    """

    def __init__(self, dataset: Any, image_column: str = "image", caption_column: str = "text"):
        import datasets

        for column in (image_column, caption_column):
            if column not in dataset.column_names:
                raise BadInput(f"dataset has no column {column!r}; its columns: {dataset.column_names}")
        self._dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self._image_column = image_column
        self._caption_column = caption_column
        self.rejected: list[tuple[str, str]] = []

    @classmethod
    def load(
        cls,
        name: str,
        *,
        config_name: str | None = None,
        split: str = "train",
        image_column: str = "image",
        caption_column: str = "text",
    ) -> "HFSource":
        """`name` is a Hub dataset id (needs network on first use) or a local dataset folder."""
        import datasets

        return cls(datasets.load_dataset(name, config_name, split=split), image_column, caption_column)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> RawSample:
        row = self._dataset[index]
        image = row[self._image_column] or {}
        data = image.get("bytes") or (Path(image["path"]) if image.get("path") else b"")
        return RawSample(key=f"row {index}", image=data, caption=row[self._caption_column])


@dataclass
class TarSource:
    """A WebDataset (flax_train.data.webdataset): read tar by tar, front to back, not by index."""

    tars: list[str]
    caption_column: str = "text"
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def open_source(spec: SourceSpec) -> Source | TarSource:
    """The source a spec names."""
    if spec.kind == "webdataset":
        from flax_train.data.webdataset import list_tars

        return TarSource(list_tars(spec.path), spec.caption_column)
    if spec.instance_prompt is not None:
        return InstanceSource(spec.path, spec.instance_prompt)
    if spec.kind == "imagefolder":
        return ImageFolderSource(spec.path, spec.caption_column)
    if spec.kind == "captions_txt":
        return CaptionTxtSource(spec.path)
    return HFSource.load(
        spec.path,
        config_name=spec.dataset_config,
        split=spec.split,
        image_column=spec.image_column,
        caption_column=spec.caption_column,
    )


def prefetched(fn: Callable[..., Any], items: Iterable[tuple], workers: int, lookahead: int) -> Iterator[Any]:
    """fn(*item) for each item in order, computed by a thread pool at most `lookahead` items ahead."""
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="image-reads") as pool:
        pending: collections.deque = collections.deque()
        while True:
            while len(pending) < lookahead and (item := next(items, None)) is not None:
                pending.append(pool.submit(fn, *item))
            if not pending:
                return
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------
# Preprocessing

# Purposes of the per-sample generators; adding one never changes the draws of another.
_CAPTION_STREAM, _CROP_STREAM, _FLIP_STREAM = 0, 1, 2


class SkippedSample(Exception):
    """A sample that cannot be used; `reason` is a short category for the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become training pixels; stored in the cache manifest."""

    resolution: int = 1024
    center_crop: bool = True  # False: random crop
    random_flip: bool = False
    max_pixels: int = 89_478_485  # larger images are skipped before their pixels are decoded (PIL's limit)
    seed: int = 0
    # Aspect-ratio buckets, (height, width) each (sdxl_common.buckets): an image is cropped to the
    # one nearest its aspect ratio. Empty: every image to the square of `resolution`.
    buckets: tuple[tuple[int, int], ...] = ()
    # Fewer buckets than listed: prepare drops the rarest while more than `max_buckets` hold images
    # or the rarest holds fewer than `min_bucket_images` (sdxl_common.buckets.fit).
    max_buckets: int | None = None
    min_bucket_images: int = 0

    def __post_init__(self):
        # Sizes read back from JSON are lists: kept as tuples, so that specs compare and hash alike.
        object.__setattr__(self, "buckets", tuple(tuple(int(d) for d in size) for size in self.buckets))
        if self.resolution <= 0 or self.resolution % 8:
            raise BadInput(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.max_pixels <= 0:
            raise BadInput(f"max_pixels must be positive, got {self.max_pixels}")
        if (self.max_buckets is not None and self.max_buckets < 1) or self.min_bucket_images < 0:
            raise BadInput(f"max_buckets must be at least 1 and min_bucket_images at least 0, got "
                           f"{self.max_buckets} and {self.min_bucket_images}")
        bad = [size for size in self.buckets if min(size) <= 0 or size[0] % 8 or size[1] % 8]
        if bad:
            raise BadInput(f"bucket {buckets.size_text(bad[0])}: both sides must be positive multiples of 8")

    @property
    def fits_buckets(self) -> bool:
        """Whether prepare chooses which of ``buckets`` to keep from the images' sizes."""
        return bool(self.buckets) and (self.max_buckets is not None or self.min_bucket_images > 1)

    def target(self, size: buckets.Size) -> buckets.Size:
        """The (height, width) an image of ``size`` (height, width) is cropped to."""
        return buckets.nearest(size, self.buckets) if self.buckets else (self.resolution, self.resolution)


@dataclass(frozen=True)
class PreparedSample:
    index: int
    key: str
    pixels: np.ndarray  # uint8 [height, width, 3] of its target size (spec.target)
    time_ids: np.ndarray  # int32 [6]: orig_h, orig_w, crop_top, crop_left, target_h, target_w
    caption: str


def sample_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def decode_image(image: str | os.PathLike | bytes, max_pixels: int) -> Image.Image:
    """An RGB image, upright per its EXIF orientation; raises SkippedSample when unusable.

    The size is checked from the header, before any pixel is decoded, so a huge or hostile file
    costs no memory.
    """
    try:
        handle = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    except Image.DecompressionBombError as e:
        raise SkippedSample("image too large", str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:  # includes UnidentifiedImageError, missing files
        raise SkippedSample("unreadable image", str(e)) from None
    with handle:
        width, height = handle.size
        if width * height > max_pixels:
            raise SkippedSample("image too large", f"{width}x{height} is over {max_pixels} pixels")
        if width == 0 or height == 0:
            raise SkippedSample("unreadable image", f"empty image {width}x{height}")
        try:
            handle.load()
            upright = ImageOps.exif_transpose(handle)
        except Image.DecompressionBombError as e:
            raise SkippedSample("image too large", str(e)) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            reason = "truncated image" if "truncated" in str(e).lower() else "unreadable image"
            raise SkippedSample(reason, str(e)) from None
        return _to_rgb(upright)


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colours: show them over white, as a viewer would.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def pick_caption(caption: str | Sequence[str] | None, seed: int, index: int) -> str:
    """The caption text; one of a list, chosen with the run's seed. Raises SkippedSample if empty."""
    if isinstance(caption, str):
        candidates = [caption.strip()]
    elif isinstance(caption, Sequence):
        candidates = [c.strip() for c in caption if isinstance(c, str)]
    else:
        candidates = []
    candidates = [c for c in candidates if c]
    if not candidates:
        raise SkippedSample("empty caption")
    if len(candidates) == 1:
        return candidates[0]
    return candidates[int(sample_rng(seed, index, _CAPTION_STREAM).integers(len(candidates)))]


def resize_and_crop(image: Image.Image, target: buckets.Size, spec: PreprocessSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [h, w, 3], time_ids int32 [6]) for one decoded image and its ``target`` (h, w).

    The image is resized to the smallest size that covers the target (its aspect ratio kept; for a
    square target, the short side to the target's), then the target is cropped (centre or random)
    and optionally mirrored. SDXL's micro-conditioning (its paper, section 2.2 and 2.3) is
    `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`: the size before any resize, the
    crop's top-left corner in the resized image, and the target. After a flip the corner is where
    the crop sits in the mirrored picture, which is the one the model sees: its left edge is
    measured from the other side.
    """
    orig_w, orig_h = image.size
    target_h, target_w = target
    scale = max(target_h / orig_h, target_w / orig_w)
    new_h, new_w = max(target_h, round(orig_h * scale)), max(target_w, round(orig_w * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)

    if spec.center_crop:
        top, left = int(round((new_h - target_h) / 2.0)), int(round((new_w - target_w) / 2.0))
    else:
        rng = sample_rng(spec.seed, index, _CROP_STREAM)
        top, left = int(rng.integers(new_h - target_h + 1)), int(rng.integers(new_w - target_w + 1))
    image = image.crop((left, top, left + target_w, top + target_h))

    if spec.random_flip and sample_rng(spec.seed, index, _FLIP_STREAM).random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - target_w
    time_ids = np.array([orig_h, orig_w, top, left, target_h, target_w], dtype=np.int32)
    return np.asarray(image, dtype=np.uint8), time_ids


def prepare_sample(raw: RawSample, index: int, spec: PreprocessSpec) -> PreparedSample:
    """Caption, decode, resize, crop, flip one source sample; raises SkippedSample if unusable."""
    caption = pick_caption(raw.caption, spec.seed, index)
    image = decode_image(raw.image, spec.max_pixels)
    pixels, time_ids = resize_and_crop(image, spec.target((image.height, image.width)), spec, index)
    return PreparedSample(index=index, key=raw.key, pixels=pixels, time_ids=time_ids, caption=caption)
