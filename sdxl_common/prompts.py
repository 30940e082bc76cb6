"""Prompt files, as both command lines read them (`flax-train sample --prompts`, `xla-infer --prompts`)."""

from __future__ import annotations

from sdxl_common import storage
from sdxl_common.errors import BadInput, InputNotFound


def read_prompt_file(path: storage.PathLike) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file, local or ``gs://`` (a byte-order mark and
    Windows line ends allowed); an error names the file and, for a bad line, its number."""
    try:
        data = storage.path(path).read_bytes()
    except FileNotFoundError:
        raise InputNotFound(f"{path}: no such prompt file") from None
    except OSError as error:  # a folder, no permission: the user named the wrong thing
        raise BadInput(f"{path}: cannot read the prompt file ({error.strerror or error})") from None
    prompts = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip().lstrip("\ufeff").strip()
        except UnicodeDecodeError as error:
            raise BadInput(f"{path}:{number}: not UTF-8 (byte {error.start + 1} of the line)") from None
        if line:
            prompts.append(line)
    if not prompts:
        raise BadInput(f"{path}: no prompts (the file is empty)")
    return prompts
