"""Where captioned images come from: a Hub dataset, an imagefolder, caption .txt files, or the synthetic set.

A source is a random-access list of `RawSample`s (an image file or encoded bytes, and its caption)
in a fixed order. Entries that can be rejected without opening the image (a metadata path that
leaves the dataset folder, an image without a caption file) never become samples; they are listed
in `source.rejected` with the reason, for the prepare report. Images are not decoded here.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

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

    kind: "synthetic" (written to `path` if missing), "imagefolder" (`path` with metadata.jsonl),
    "captions_txt" (`path` with image files and same-name .txt captions), or "hf" (`path` is a
    Hub dataset id or anything `datasets.load_dataset` accepts).
    """

    kind: str
    path: str
    caption_column: str = "text"
    image_column: str = "image"  # hf only; imagefolder metadata names files in "file_name"
    split: str = "train"  # hf only
    dataset_config: str | None = None  # hf only: the dataset's configuration name, if it has several
    num_images: int = 0  # synthetic only
    image_size: int = 64  # synthetic only: short side of the generated images
    seed: int = 0  # synthetic only

    KINDS = ("synthetic", "imagefolder", "captions_txt", "hf")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"data source kind must be one of {self.KINDS}, got {self.kind!r}")
        if self.kind == "synthetic" and self.num_images <= 0:
            raise ValueError("a synthetic source needs num_images > 0")

    def to_json(self) -> dict[str, Any]:
        """The fields that determine the samples (the synthetic ones only for the synthetic set)."""
        fields = dataclasses.asdict(self)
        if self.kind != "synthetic":
            for name in ("num_images", "image_size", "seed"):
                fields.pop(name)
        if self.kind != "hf":
            for name in ("image_column", "split", "dataset_config"):
                fields.pop(name)
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
            raise FileNotFoundError(f"{metadata}: an imagefolder dataset needs a metadata.jsonl")
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


class CaptionTxtSource:
    """Image files anywhere under a folder, each with a caption in the same-name `.txt` file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such dataset folder")
        self.rejected: list[tuple[str, str]] = []
        self._images: list[Path] = []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            key = str(path.relative_to(self.root))
            if not _inside(self.root, path.resolve()):
                self.rejected.append((key, "path outside dataset folder"))
            elif not path.with_suffix(".txt").is_file():
                self.rejected.append((key, "missing caption file"))
            else:
                self._images.append(path)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> RawSample:
        path = self._images[index]
        caption = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
        return RawSample(key=str(path.relative_to(self.root)), image=path, caption=caption)


class HFSource:
    """A Hugging Face `datasets` dataset with an image column and a caption column.

    Images are read as encoded bytes (decoding disabled) so that our bounded decoder handles them
    and a bad one is skipped rather than raised by `datasets`.
    """

    def __init__(self, dataset: Any, image_column: str = "image", caption_column: str = "text"):
        import datasets

        for column in (image_column, caption_column):
            if column not in dataset.column_names:
                raise ValueError(f"dataset has no column {column!r}; its columns: {dataset.column_names}")
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


def open_source(spec: SourceSpec) -> Source:
    """The source a spec names; the synthetic set is written to `spec.path` first if missing."""
    if spec.kind == "synthetic":
        from flax_train.data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(spec.path, spec.num_images, image_size=spec.image_size, seed=spec.seed)
        return ImageFolderSource(spec.path, "text")
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
