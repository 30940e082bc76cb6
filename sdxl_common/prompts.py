"""Prompt files, as both command lines read them (`flax-train sample --prompts`, `xla-infer --prompts`)."""

from __future__ import annotations

import re

from sdxl_common import storage
from sdxl_common.buckets import Size
from sdxl_common.errors import BadInput, InputNotFound


def read_prompt_file(path: storage.PathLike) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file, local or ``gs://`` (a byte-order mark and
    Windows line ends allowed); an error names the file and, for a bad line, its number."""
    return [line for _, line in _lines(path)]


# "1216x832: a castle at dusk": a size in front of a prompt, as `--size` writes it.
_SIZED = re.compile(r"(\d+)\s*[xX]\s*(\d+)\s*:(.*)")


def read_sized_prompt_file(path: storage.PathLike) -> list[tuple[str, Size | None]]:
    """``read_prompt_file``'s prompts, each with the (height, width) its line names in front of it
    ("WIDTHxHEIGHT: prompt") or None. A file names a size on every line or on none, so that no
    line's size depends on a default the reader has to look up."""
    out: list[tuple[str, Size | None]] = []
    for number, line in _lines(path):
        match = _SIZED.fullmatch(line)
        size = None
        if match is not None:
            width, height, line = int(match[1]), int(match[2]), match[3].strip()
            if not width or not height:
                raise BadInput(f"{path}:{number}: {width}x{height}: width and height must be positive")
            if not line:
                raise BadInput(f"{path}:{number}: a size with no prompt after it")
            size = (height, width)
        if out and (size is None) != (out[0][1] is None):
            first = "names a size" if size is None else "names none"
            raise BadInput(f"{path}:{number}: the first prompt {first}, this one "
                           f"{'none' if size is None else 'does'}: write a size (WIDTHxHEIGHT: prompt) "
                           "in front of every prompt or of none")
        out.append((line, size))
    return out


def _lines(path: storage.PathLike) -> list[tuple[int, str]]:
    """The non-blank lines of a prompt file with their numbers, stripped."""
    try:
        data = storage.path(path).read_bytes()
    except FileNotFoundError:
        raise InputNotFound(f"{path}: no such prompt file") from None
    except OSError as error:  # a folder, no permission: the user named the wrong thing
        raise BadInput(f"{path}: cannot read the prompt file ({error.strerror or error})") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip().lstrip("\ufeff").strip()
        except UnicodeDecodeError as error:
            raise BadInput(f"{path}:{number}: not UTF-8 (byte {error.start + 1} of the line)") from None
        if line:
            lines.append((number, line))
    if not lines:
        raise BadInput(f"{path}: no prompts (the file is empty)")
    return lines
