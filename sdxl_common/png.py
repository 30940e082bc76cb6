"""PNG files with the settings that made them, as both command lines write them."""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def png_bytes(image: np.ndarray | Image.Image, parameters: Mapping[str, Any] | None = None) -> bytes:
    """``image`` as PNG file bytes (for ``storage.atomic_write_bytes``). ``parameters``: one iTXt
    chunk per key (UTF-8, so prompts in any script survive; values that are not strings as JSON),
    and all of them as one JSON object in a ``parameters`` chunk, for tools that read that one."""
    info = None
    if parameters:
        info = PngInfo()
        for key, value in parameters.items():
            info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
        info.add_itxt("parameters", json.dumps(dict(parameters), ensure_ascii=False))
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
