"""`flax-train buckets`: the sizes of a dataset's images, read from their file headers, and the
aspect-ratio buckets they would fill, before anything is encoded.

Each bucket is one more training program to compile (minutes for SDXL on a TPU), and a bucket
with fewer images than a global batch repeats images within its batches. The survey counts the
images per bucket as `flax-train prepare` will place them (the same upright size, the same
nearest-aspect rule, the same size limit) and proposes the `data.buckets` list that keeps at most
a given number, each with at least a global batch (``sdxl_common.buckets.fit``). Only headers are
read: a few kilobytes per file (a WebDataset's tars are read whole, being streams).
"""

from __future__ import annotations

import collections
import dataclasses
import io
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

from flax_train.data import webdataset
from flax_train.data.images import RawSample, Source, TarSource, prefetched
from sdxl_common import buckets

READ_THREADS = 16  # header reads are latency, not CPU: many in flight (gs:// especially)
# EXIF orientations that turn the picture a quarter: the upright image is the stored one transposed.
_QUARTER_TURNS = {5, 6, 7, 8}


@dataclasses.dataclass(frozen=True)
class Survey:
    sizes: collections.Counter  # upright (height, width) -> images
    unusable: int  # unreadable, or larger than the limit: prepare skips them too

    @property
    def images(self) -> int:
        return sum(self.sizes.values())


def upright_size(image: Path | bytes, max_pixels: int) -> buckets.Size | None:
    """(height, width) of ``image`` as prepare decodes it (turned upright per its EXIF
    orientation), from its header alone; None where prepare would skip it."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as handle:
            width, height = handle.size
            turned = handle.getexif().get(0x0112) in _QUARTER_TURNS
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    if width * height == 0 or width * height > max_pixels:
        return None
    return (width, height) if turned else (height, width)


def _samples(source: Source | TarSource, share: tuple[int, int]) -> Iterator[RawSample | None]:
    """The samples of ``source`` in process ``share[0]``'s share of ``share[1]`` (the items, or the
    tars, whose number it is modulo the count); None for an entry that is no sample."""
    process, count = share
    if isinstance(source, TarSource):
        for url in source.tars[process::count]:
            for sample in webdataset.read_tar(url, source.caption_column):
                yield sample if isinstance(sample, RawSample) else None
    else:
        yield from (source[i] for i in range(process, len(source), count))


def survey(source: Source | TarSource, max_pixels: int, *, share: tuple[int, int] = (0, 1),
           progress: bool = True) -> Survey:
    """The upright sizes of the images of ``source`` (of this process's ``share`` of them: see
    ``_samples``; the entries the source refused before reading count in the first share)."""
    samples: Iterable[RawSample | None] = _samples(source, share)
    total = None if isinstance(source, TarSource) else len(range(share[0], len(source), share[1]))
    if progress:
        from tqdm.auto import tqdm

        samples = tqdm(samples, total=total, unit="img", desc="read sizes")
    sizes, unusable = collections.Counter(), len(source.rejected) if share[0] == 0 else 0
    read = lambda sample: None if sample is None else upright_size(sample.image, max_pixels)  # noqa: E731
    for size in prefetched(read, ((s,) for s in samples), READ_THREADS, 4 * READ_THREADS):
        if size is None:
            unusable += 1
        else:
            sizes[size] += 1
    return Survey(sizes, unusable)


def report(result: Survey, candidates: tuple[buckets.Size, ...], chosen: tuple[buckets.Size, ...],
           min_images: int) -> str:
    """The table `flax-train buckets` prints: images per bucket of ``candidates`` (those with any),
    then per bucket of ``chosen``, and the override that trains with ``chosen``."""
    lines = [f"{result.images:,} images ({result.unusable:,} unusable: unreadable or over the size limit)"]

    def table(counts: dict[buckets.Size, int]) -> None:
        for bucket, count in counts.items():
            if count:
                thin = "  fewer than a global batch" if count < min_images else ""
                lines.append(f"  {buckets.size_text(bucket):>10} {count:>9,} {count / max(result.images, 1):6.1%}{thin}")

    filled = buckets.assign(result.sizes, candidates)
    lines.append(f"in the {len(candidates)} buckets of data.buckets, {sum(1 for c in filled.values() if c)} filled:")
    table(filled)
    if chosen != tuple(b for b, c in filled.items() if c):
        lines.append(f"kept {len(chosen)}, each image in the nearest of them:")
        table(buckets.assign(result.sizes, chosen))
    lines.append("train with: data.buckets=[" + ",".join(buckets.size_text(b) for b in chosen) + "]")
    return "\n".join(lines)
