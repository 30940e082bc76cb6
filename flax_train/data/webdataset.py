"""WebDataset tar shards as a data source: the format large image-text sets ship in (img2dataset
writes it, LAION and DataComp are published in it).

A WebDataset is a list of tar files; each sample is a run of consecutive members that share a
key, the member's path up to the first dot of its file name (`000123.jpg`, `000123.txt`,
`000123.json`), the rest of the name being the member's extension
(https://github.com/webdataset/webdataset#the-webdataset-format). A sample's image is its first
member with an image extension (`jpg`, `png`, `webp`, ...); its caption is the `txt` member, or
else the `caption_column` field of the `json` member.

Tars are read as streams, front to back, one request each: on Cloud Storage a tar is not worth
indexing member by member (one request per member, tens of milliseconds each), and every byte of
it is needed anyway. So a tar is the unit of `flax-train prepare`'s work: it becomes one cache
shard, written whole, and an interrupted prepare redoes only the tars whose shard is missing.
Member j of tar k is source item `k * TAR_STRIDE + j`, which seeds its random crop, flip and
caption choice, as a file's position does for the other sources.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from typing import Iterator

from sdxl_common import storage
from flax_train.data.images import IMAGE_EXTENSIONS, RawSample
from sdxl_common.errors import BadInput, InputNotFound

TAR_STRIDE = 1 << 32  # more members than any tar holds
_IMAGE_EXTENSIONS = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero-padded to the width of the
    first number); `{x,y}` -> x, y; several groups multiply out, left to right."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise BadInput(f"{pattern}: the range {{{body}}} runs backwards")
        choices = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise BadInput(f"{pattern}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def list_tars(path: str) -> list[str]:
    """The tar files of a WebDataset: a brace pattern (`gs://b/set-{00000..00099}.tar`), one
    `.tar`, or a folder (every `.tar` in it, in name order). Local paths or URLs."""
    if _BRACES.search(path) or path.endswith(".tar"):
        tars = expand_braces(path)
        missing = [tar for tar in tars if not storage.path(tar).exists()]
        if missing:
            raise InputNotFound(f"{len(missing)} of the {len(tars)} tar files of {path} do not exist, e.g. {missing[0]}")
        return tars
    folder = storage.path(path)
    if not folder.is_dir():
        raise InputNotFound(f"{path}: no such folder of tar files (or give a pattern such as {path}/{{00000..00099}}.tar)")
    tars = sorted(str(p) for p in folder.iterdir() if p.name.endswith(".tar"))
    if not tars:
        raise InputNotFound(f"{path}: no .tar files in this folder")
    return tars


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member: the extension starts at the first dot of the file name."""
    folder, _, file = name.rpartition("/")
    stem, _, extension = file.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _sample(tar_name: str, key: str, members: dict[str, bytes], caption_column: str) -> RawSample | tuple[str, str]:
    image = next((data for extension, data in members.items() if extension in _IMAGE_EXTENSIONS), None)
    name = f"{tar_name}/{key}"
    if image is None:
        return name, "no image in sample"
    caption = None
    if "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace")
    elif "json" in members:
        try:
            caption = json.loads(members["json"]).get(caption_column)
        except (ValueError, AttributeError):
            return name, "unreadable json"
    return RawSample(key=name, image=image, caption=caption)


def read_tar(url: str, caption_column: str = "text") -> Iterator[RawSample | tuple[str, str]]:
    """The samples of one tar in order, as RawSamples (image bytes and caption) or, for a sample
    that cannot be one, (name, reason). A tar that breaks off (truncated, unreadable) ends with one
    (name, reason) entry saying so after the samples read before the break."""
    tar_name = os.path.basename(url)
    key, members, count = None, {}, 0
    try:
        with storage.path(url).open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = _split_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield _sample(tar_name, key, members, caption_column)
                        count += 1
                    key, members = member_key, {}
                data = tar.extractfile(member).read()
                members.setdefault(extension, data)
        if key is not None:
            yield _sample(tar_name, key, members, caption_column)
    except (tarfile.TarError, EOFError, OSError) as error:
        yield f"{tar_name}@sample{count}", f"unreadable tar ({type(error).__name__}: {error}); the rest of it is lost"
