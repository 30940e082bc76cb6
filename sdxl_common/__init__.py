"""What the trainer (`flax_train`) and the generator (`xla_infer`) share, importing neither JAX nor
torch at import time: the error classes the command lines sort by (`errors`), local and `gs://` files
(`storage`), model sources (`model_source`: a folder, a Hub id, a `gs://` URL), SDXL's facts and
folder layout (`sdxl`), Stability's single-file layout (`single_file`), LoRA files (`lora_files`),
prompt files (`prompts`), the samplers' tables (`samplers`, read from diffusers' schedulers
when they are built) and PNG metadata (`png`).

Neither half imports the other: each installs alone (`pip install '.[train]'`, `'.[infer]'`).
"""
