"""PNG files with the settings that made them, as both command lines write them.

The ``parameters`` text chunk follows the layout of the AUTOMATIC1111 web UI, which that UI,
ComfyUI and image-sharing sites read back ("PNG info"): the prompt, a ``Negative prompt:`` line,
then one line of ``Key: value`` fields separated by ", " (a value holding a comma, colon or
newline is written as a JSON string). Every setting is also a chunk of its own, under our key.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

# Our sampler names -> the names that web UI gives the same samplers.
SAMPLER_NAMES = {"euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}

# The settings the one-line fields carry: (our key, the field's name).
_FIELDS = (
    ("steps", "Steps"),
    ("scheduler", "Sampler"),
    ("guidance_scale", "CFG scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model", "Model"),
    ("strength", "Denoising strength"),
)


def _field_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parameters_text(settings: Mapping[str, Any], width: int, height: int) -> str:
    """The ``parameters`` chunk for an image of ``width`` x ``height`` made with ``settings``."""
    values = {**settings, "size": f"{width}x{height}"}
    values["scheduler"] = SAMPLER_NAMES.get(values.get("scheduler"), values.get("scheduler"))
    lines = [str(values.get("prompt") or "")]
    if values.get("negative_prompt"):
        lines.append(f"Negative prompt: {values['negative_prompt']}")
    fields = [f"{name}: {_field_value(values[key])}" for key, name in _FIELDS if values.get(key) is not None]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_bytes(image: np.ndarray | Image.Image, settings: Mapping[str, Any] | None = None) -> bytes:
    """``image`` as PNG file bytes (for ``storage.atomic_write_bytes``). With ``settings``: the
    ``parameters`` chunk above, and one iTXt chunk per setting (UTF-8, so prompts in any script
    survive; values that are not strings as JSON)."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    info = None
    if settings:
        info = PngInfo()
        info.add_itxt("parameters", parameters_text(settings, *image.size))
        for key, value in settings.items():
            if key != "parameters":
                info.add_itxt(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
