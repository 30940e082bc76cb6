"""LoRA files made as another trainer makes them: peft adapters with random factors, saved by
diffusers' `save_lora_weights`. Shared by the trainer's and xla_infer's LoRA tests."""

from __future__ import annotations

import torch


def make_lora(folder, out, *, seed, unet=None, text=None, text_2=None, metadata=True, b_scale=0.2):
    """A LoRA file of random factors, written by diffusers' save_lora_weights from peft adapters.

    `unet` / `text` / `text_2`: peft LoraConfig keyword arguments for the UNet / the first / the
    second text encoder (`text_2` defaults to `text`). B is scaled by `b_scale` so the LoRA changes
    the images clearly without saturating them. Returns `out`, the folder holding the file."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    torch.manual_seed(seed)
    layers, metadata_kwargs = {}, {}
    for name, options in (("unet", unet), ("text_encoder", text), ("text_encoder_2", text if text_2 is None else text_2)):
        if options is None:
            continue
        # init_lora_weights=False draws B at random too (peft's default starts it at zero).
        config = LoraConfig(init_lora_weights=False, **options)
        model = getattr(pipe, name)
        model.add_adapter(config)
        state = get_peft_model_state_dict(model)
        layers[f"{name}_lora_layers"] = {k: v * b_scale if "lora_B" in k else v for k, v in state.items()}
        if metadata:
            metadata_kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(out, **layers, **metadata_kwargs)
    return out
