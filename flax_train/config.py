"""The trainer's configuration: one typed tree of frozen dataclasses, read from YAML.

A run's config is built in layers, each overriding the one before:

1. the defaults written in the dataclasses below;
2. YAML files, in the order given; a file may name ``base: other.yaml`` (or a list of them,
   paths relative to the file), which is applied before the file's own keys;
3. ``section.key=value`` overrides from the command line, values parsed as YAML.

Sections merge key by key; any other value (a list, a free-form table) is replaced whole. A
section that may be off (``logging.wandb: null``) is turned on, its other keys at their defaults,
by setting any of its keys.
Unknown keys, values of the wrong type and unknown choices are errors as soon as they are read.
Values that are well typed but unusable (lr <= 0, a batch the mesh cannot split, ...) are errors
in `validate`, which the trainer calls before anything is compiled. `save` writes the resolved
config into the run directory, in a form `load` reads back to an equal config.

The dataclasses are an OmegaConf structured-config schema: OmegaConf reads the YAML, checks each
value against its field's type (`Literal` choices included) and builds the dataclasses. It was
chosen over draccus, which on this schema took `true` and `null` for integers, split a lone string
into characters, accepted duplicate YAML keys and could not set one key of a table.
"""

import contextlib
import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml
from etils import epath
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from sdxl_common import buckets
from flax_train import lora, metrics, sharding
from flax_train.data.cache import READS_IN_FLIGHT
from flax_train.data.images import DataSource
from flax_train.diffusion import PredictionType, TimestepBias
from sdxl_common.errors import BadInput
from flax_train.models.layers import Attention, Remat
from flax_train.optim import LrSchedule, Optimizer
from flax_train.schedulers import Sampler

# Choices only the config has; the others come from the modules that act on them.
UnetName = Literal["sdxl"]  # named UNet architectures, built by flax_train.models
ComputeDtype = Literal["bfloat16", "float32"]
ParamDtype = Literal["float32", "bfloat16"]
FileDtype = Literal["float16", "bfloat16", "float32"]
Crop = Literal["random", "center"]
LatentMode = Literal["sample", "mean"]
NanPolicy = Literal["stop", "skip"]
PromptWeighting = Literal["a1111", "compel"]  # sdxl_common.prompt_weights.SYNTAXES
TrainMethod = Literal["full", "lora"]  # train every UNet weight, or low-rank factors beside frozen ones
WandbMode = Literal["online", "offline", "disabled"]  # the modes of wandb.init
Chip = Literal[tuple(metrics.CHIP_PEAK_TFLOPS)]  # the table's keys, so the names are written once

# Flags of diffusers' train_text_to_image_sdxl.py whose names differ from ours, so a config that
# uses one is told the key to use instead (docs/configuration.md has the full table).
DIFFUSERS_FLAGS = {
    "pretrained_model_name_or_path": "model.pretrained",
    "pretrained_vae_model_name_or_path": "model.vae",
    "gradient_checkpointing": "model.remat",
    "mixed_precision": "model.dtype",
    "dataset_name": "data.path",
    "dataset_config_name": "data.dataset_config",
    "train_data_dir": "data.path",
    "center_crop": "data.crop",
    "proportion_empty_prompts": "train.caption_dropout",
    "train_batch_size": "train.global_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "max_train_steps": "train.max_steps",
    "lr_scheduler": "train.lr_schedule",
    "lr_warmup_steps": "train.warmup_steps",
    "adam_beta1": "train.betas",
    "adam_beta2": "train.betas",
    "adam_weight_decay": "train.weight_decay",
    "adam_epsilon": "train.eps",
    "use_ema": "train.ema.enabled",
    "timestep_bias_strategy": "train.timestep_bias.strategy",
    "timestep_bias_multiplier": "train.timestep_bias.multiplier",
    "timestep_bias_portion": "train.timestep_bias.portion",
    "timestep_bias_begin": "train.timestep_bias.begin",
    "timestep_bias_end": "train.timestep_bias.end",
    "validation_prompt": "validation.prompts",
    "validation_epochs": "validation.every_steps",
    "checkpointing_steps": "checkpoint.every_steps",
    "checkpoints_total_limit": "checkpoint.keep",
    "resume_from_checkpoint": "checkpoint.resume",
    "output_dir": "run_dir",
    "report_to": "logging.tensorboard",
    "rank": "lora.rank",  # train_text_to_image_lora_sdxl.py
    "train_text_encoder": "lora.train_text_encoder",  # the same script's
    "instance_data_dir": "data.path",  # train_dreambooth_lora_sdxl.py
    "instance_prompt": "data.instance_prompt",  # the same script's
}

# SDXL's noise schedule has 1000 training timesteps; timestep-bias ranges index into it.
NUM_TRAIN_TIMESTEPS = 1000


class ConfigError(BadInput):
    """A config that cannot be used: unknown key, wrong type or invalid value."""


class FrozenDict(dict):
    """A read-only, hashable dict for the free-form tables (`model.unet_config`, `mesh.rules`),
    so the whole config stays immutable and can be a static argument to `jax.jit`. A dict, not
    a Mapping, because OmegaConf takes only dicts for a table."""

    def __hash__(self) -> int:
        return hash(frozenset(self.items()))

    def __reduce__(self):  # pickle and deepcopy would otherwise refill it key by key
        return FrozenDict, (dict(self),)

    def _read_only(self, *args, **kwargs):
        raise TypeError("config tables are read-only; use config.apply_overrides or dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenDict({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


# ----------------------------------------------------------------------------------------------
# Schema. Field comments name the diffusers training-script flag a key replaces, where one does.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --pretrained_model_name_or_path: the diffusers SDXL folder or Hub id the run starts from, or a
    # single-file checkpoint (a path or URL ending in .safetensors, e.g. sd_xl_base_1.0.safetensors).
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"
    # A single-file model.pretrained: the diffusers pipeline (folder, Hub id or URL) whose configs,
    # tokenizers and scheduler go with its weights (null: the shipped SDXL base or refiner ones).
    config_from: str | None = None
    # --pretrained_vae_model_name_or_path: a VAE folder or Hub id used instead of pretrained/vae.
    vae: str | None = None
    # --revision: the Hub branch, tag or commit of pretrained (model.vae is read at its default branch).
    revision: str | None = None
    # --variant: the weights of that precision from a Hub repo or URL, e.g. "fp16" for the
    # *.fp16.safetensors files (null: the full-precision ones). Not applied to model.vae.
    variant: str | None = None
    # null: fine-tune the pretrained folder's UNet. A UnetName or an inline dict of
    # UNet2DConditionModel config keys: train a new UNet of that shape from random weights, with
    # the folder's VAE and text encoders. Any, because OmegaConf has no union of a string and a
    # mapping; `validate` checks it.
    unet_config: Any = None
    dtype: ComputeDtype = "bfloat16"  # --mixed_precision bf16 | no
    param_dtype: ParamDtype = "float32"  # master weights and optimizer state
    attention: Attention = "auto"
    remat: Remat = "none"  # --gradient_checkpointing: full
    # Run each stack of identical transformer layers as one lax.scan: compiled once, not per layer
    # (the same weights, names and outputs; see layers.call_stack).
    scan_layers: bool = False
    prediction_type: PredictionType | None = None  # null: the scheduler config's own

    def __post_init__(self):
        object.__setattr__(self, "unet_config", _freeze(self.unet_config))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: DataSource = "imagefolder"
    # --train_data_dir (imagefolder, captions_txt) or --dataset_name (hf: Hub id or local folder).
    path: str | None = None
    dataset_config: str | None = None  # --dataset_config_name
    split: str = "train"
    caption_column: str = "text"
    image_column: str = "image"
    # --instance_prompt (DreamBooth): every image under `path` (imagefolder or captions_txt) gets this
    # caption; no metadata.jsonl or .txt file is read.
    instance_prompt: str | None = None
    resolution: int = 1024
    crop: Crop = "random"  # --center_crop: center
    random_flip: bool = False
    cache_dir: str | None = None  # latent cache; null: <run_dir>/cache
    latent_mode: LatentMode = "mean"  # latents cached as a VAE posterior sample or its mean
    cache_shard_size: int = 256  # source items per cache file: what an interrupted prepare redoes at most
    # Samples the loader reads at once (one ranged read each): on Cloud Storage, where a read
    # waits tens of ms, it reads about reads_in_flight / latency samples per second per process.
    reads_in_flight: int = READS_IN_FLIGHT
    max_pixels: int = 89_478_485  # larger source images are refused (decompression bombs)
    # Aspect-ratio buckets: [] crops every image to the square of `resolution`; [sdxl] uses SDXL's
    # list (its paper's appendix I) scaled to `resolution`; or sizes as "WIDTHxHEIGHT" strings.
    # Each image goes to the bucket nearest its aspect ratio (sdxl_common/buckets.py).
    buckets: tuple[str, ...] = ()
    # Fewer buckets, chosen by prepare from the image headers: the rarest is dropped while more
    # than max_buckets hold images or it holds fewer than min_bucket_images (each bucket is a
    # compiled step; one thinner than a global batch repeats images); its images go to the
    # nearest bucket left. `flax-train buckets` shows the choice before anything is encoded.
    max_buckets: int | None = None
    min_bucket_images: int = 0
    # The share of the cache held out of training for validation.loss_every_steps (of each bucket:
    # the same evenly spaced samples in every run); 0: none, training sees every sample.
    validation_split: float = 0.0
    # Chunks of 75 tokens each caption is encoded in (1: CLIP's 77 tokens; 2 or 3 for 150 / 225),
    # as `flax-train sample --max-text-chunks` reads a prompt; longer captions are cut and counted.
    max_text_chunks: int = 1


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    enabled: bool = False  # --use_ema
    decay: float = 0.9999
    start_step: int = 0
    every: int = 1


@dataclasses.dataclass(frozen=True)
class TimestepBiasConfig:
    strategy: TimestepBias = "none"  # --timestep_bias_strategy
    multiplier: float = 1.0
    portion: float = 0.25  # share of timesteps biased by earlier / later
    begin: int = 0  # [begin, end) for range
    end: int = NUM_TRAIN_TIMESTEPS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Used when train.method is lora (flax_train.lora)."""

    rank: int = 4  # --rank
    alpha: float | None = None  # the update is scaled by alpha / rank; null: alpha = rank, as diffusers' scripts
    dropout: float = 0.0  # on the LoRA input, in training only
    # Module names as peft's target_modules: a module matches when its diffusers path is the name
    # or ends with "." + the name. Attention projections by default; see lora.SUPPORTED_TARGETS.
    target_modules: tuple[str, ...] = lora.DEFAULT_TARGETS
    # A LoRA file or folder (diffusers or kohya format, local or URL) to continue training from:
    # its factors are the starting point and its rank, alpha and targets replace the three above.
    init_from: str | None = None
    # Also adapt both text encoders' attention projections (lora.TEXT_ENCODER_TARGETS, same rank,
    # alpha and dropout): the cache then keeps token ids and the step runs the encoders.
    train_text_encoder: bool = False  # --train_text_encoder


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Images per micro-step over all chips (--train_batch_size x number of chips). An optimizer
    # update sees global_batch_size x grad_accum_steps images.
    global_batch_size: int = 8
    grad_accum_steps: int = 1
    method: TrainMethod = "full"  # full: every UNet weight; lora: the `lora` section's factors only
    max_steps: int = 10_000
    seed: int = 0
    learning_rate: float = 1e-6
    lr_schedule: LrSchedule = "constant"
    warmup_steps: int = 0
    optimizer: Optimizer = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)  # --adam_beta1/2
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # null: no clipping
    ema: EmaConfig = EmaConfig()
    snr_gamma: float | None = None  # min-SNR loss weighting; null: off
    timestep_bias: TimestepBiasConfig = TimestepBiasConfig()
    noise_offset: float = 0.0
    caption_dropout: float = 0.0  # --proportion_empty_prompts, drawn anew every step
    nan_policy: NanPolicy = "stop"  # a non-finite loss stops the run, or its update is skipped


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Devices along each axis of one slice; one axis may be -1 to take all remaining devices.
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # TPU slices joined over the data-centre network (multislice): the data axis spans them, so
    # weights stay sharded within each slice and only gradients cross between slices.
    slices: int = 1
    # Logical axis name -> mesh axis (or list of axes, or null for replicated), overriding
    # entries of the default table in flax_train.sharding. Values are checked by `validate`:
    # OmegaConf has no union of a string and a list.
    rules: dict[str, Any] = FrozenDict()

    def __post_init__(self):
        object.__setattr__(self, "rules", _freeze(self.rules))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000  # --checkpointing_steps; 0: no periodic saves
    keep: int | None = 3  # --checkpoints_total_limit; null: keep all
    async_save: bool = True
    dir: str | None = None  # null: <run_dir>/checkpoints
    resume: bool = True  # continue from the newest checkpoint in `dir` when there is one
    # Seconds from SIGTERM to exit: a checkpoint not finished by then is abandoned (the one before
    # stays) and the run exits 1. null: wait for the save however long it takes.
    sigterm_grace_s: float | None = None


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    every_steps: int = 0  # 0: no validation images
    # The loss on the samples data.validation_split holds out, with fixed noise and timesteps,
    # every this many steps and at the last (val_loss in the metrics); 0: off.
    loss_every_steps: int = 0
    prompts: tuple[str, ...] = ()  # --validation_prompt
    negative_prompt: str | None = None  # null: the model's unconditional input (zeros for SDXL), as diffusers
    num_steps: int = 25
    guidance_scale: float = 5.0
    scheduler: Sampler = "euler"
    seed: int = 0
    resolution: int | None = None  # null: data.resolution
    # Sizes ("WIDTHxHEIGHT") to draw the prompts at, one grid each (e.g. a bucket of each aspect);
    # empty: one square grid of `resolution`.
    sizes: tuple[str, ...] = ()
    # Chunks of 75 tokens a prompt may fill (1: CLIP's 77 tokens); null: data.max_text_chunks, as trained.
    max_text_chunks: int | None = None
    prompt_weighting: PromptWeighting | None = None  # null: prompts as written


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    at_end: bool = True
    use_ema: bool | None = None  # null: the EMA weights when train.ema.enabled
    dir: str | None = None  # null: <run_dir>/export
    # A LoRA run: also write its factors in kohya's format (KOHYA_LORA_NAME), for A1111 and ComfyUI.
    kohya_lora: bool = False
    # Also write <dir>.safetensors: the whole pipeline as one checkpoint in the original SDXL layout
    # (A1111, ComfyUI, diffusers' from_single_file); a full fine-tune only.
    single_file: bool = False
    single_file_dtype: FileDtype | None = None  # null: each tensor in the exported folder's dtype


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (flax_train/wandb_sink.py), with the `wandb` extra installed."""

    project: str | None = None  # null: W&B's default project
    entity: str | None = None  # user or team; null: the API key's default entity
    name: str | None = None  # the run's display name; null: W&B picks one
    tags: tuple[str, ...] = ()
    mode: WandbMode | None = None  # null: W&B's own choice ($WANDB_MODE, else online)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    jsonl: bool = True
    chip: Chip | None = None  # null: detected from the devices
    peak_tflops: float | None = None  # per chip; overrides the chip's table entry
    # null: off. Setting any of its keys (logging.wandb.project=...) turns it on with the others' defaults.
    wandb: WandbConfig | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    export: ExportConfig = ExportConfig()
    logging: LoggingConfig = LoggingConfig()
    run_dir: str = "runs/sdxl"  # --output_dir; a local path or a gs:// URL


# ----------------------------------------------------------------------------------------------
# Reading, layering and writing.


def load(
    paths: str | os.PathLike | Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
) -> Config:
    """Reads config files in order (later ones override earlier ones), then `key=value` overrides.

    Checks keys, types and choices; call `validate` for the values.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    tree = OmegaConf.structured(Config)
    for path in paths:
        for source, data in _file_layers(path):
            with _naming(source):
                _set_all(tree, data)
    return _with_overrides(tree, overrides)


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Returns `config` with `a.b=value` overrides applied; values are parsed as YAML.

    A key inside a free-form table is set on its own (`mesh.rules.embed=fsdp`), keeping the rest.
    """
    tree = OmegaConf.structured(Config)
    with _naming("config"):
        _set_all(tree, _literal(to_dict(config)))
    return _with_overrides(tree, overrides)


def to_dict(config: Any) -> Any:
    """Plain dicts, lists and scalars (what YAML and JSON can hold) for a config or any part of it."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {key: to_dict(value) for key, value in config.items()}
    if isinstance(config, (tuple, list)):
        return [to_dict(value) for value in config]
    return config


def save(config: Config, path: str | os.PathLike) -> None:
    """Writes `config` as YAML (a local path or a URL); `load(path)` gives back an equal config."""
    text = OmegaConf.to_yaml(_literal(to_dict(config)))  # quotes strings its reader would retype
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Resolved configuration of this run, every key included.\n" + text)


@contextlib.contextmanager
def _naming(source: str):
    """Turns errors inside into one-line ConfigErrors that start with `source`."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except OmegaConfBaseException as e:
        # The first line says what is wrong, with the value; the rest is OmegaConf's context.
        key = f"{e.full_key}: " if e.full_key else ""
        raise ConfigError(f"{source}: {key}{str(e).splitlines()[0]}") from None


def _parse_yaml(text: str) -> Any:
    # OmegaConf's YAML reader, public only through dotlists: it reads `1e-6` as a number (plain
    # YAML 1.1 reads a string) and refuses duplicate keys.
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(["value=" + text]))["value"]
    except yaml.YAMLError as e:
        # PyYAML's message takes several lines; the problem and where it is fit on one.
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"not valid YAML: {problem}{where}") from None
    except OmegaConfBaseException as e:  # a malformed `${...}` reference
        raise ConfigError(str(e).splitlines()[0]) from None


def _file_layers(path: str | os.PathLike, chain: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The (source, mapping) layers of one file, its bases first."""
    name = os.fspath(path)
    if "://" not in name:  # URLs (gs://) are not normalised: it would merge their slashes
        name = os.path.normpath(name)
    if name in chain:
        raise ConfigError("config files name each other as base: " + " -> ".join(chain + (name,)))
    via = f" (base of {chain[-1]})" if chain else ""
    try:
        text = epath.Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}{via}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}{via}: not UTF-8 text (byte {e.start + 1}: {e.reason})") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"cannot read config file {path}{via}: {e.strerror or e}") from None
    with _naming(name):
        data = _parse_yaml(text)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of sections at the top level, got {data!r}")
        bases = data.pop("base", None) or []
        bases = [bases] if isinstance(bases, str) else bases
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError(f"base: expected a path or a list of paths, got {bases!r}")
    layers = []
    for base in bases:
        layers += _file_layers(epath.Path(path).parent / base, chain + (name,))
    layers.append((name, data))
    return layers


def _with_overrides(tree: DictConfig, overrides: Sequence[str]) -> Config:
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    for override in overrides:
        key, sep, text = override.partition("=")
        with _naming(f"override {override!r}"):
            if not sep or not key.strip():
                raise ConfigError("expected key=value, e.g. train.learning_rate=1e-5")
            _set(tree, key.strip(), _parse_yaml(text))
    with _naming("config"):
        return OmegaConf.to_object(tree)


def _set_all(tree: DictConfig, mapping: Mapping) -> None:
    for key, value in mapping.items():
        _set(tree, str(key), value)


def _literal(value: Any) -> Any:
    """`value` with `${` escaped in its strings: the references in a built config are resolved
    already, and what is left of `${` is text."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", value)
    if isinstance(value, Mapping):
        return {key: _literal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_literal(item) for item in value]
    return value


def _set(tree: DictConfig, key: str, value: Any) -> None:
    """Sets the dotted `key` of `tree`; a mapping given for a section sets its keys one by one."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            raise ConfigError(f"'{'.'.join(parts[:i])}' is a value; it has no key '{'.'.join(parts[i:])}'")
        section = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(section) and part not in {f.name for f in dataclasses.fields(section)}:
            raise _unknown_key(section, ".".join(parts[:i]), part)
        parent, node = node, node.get(part)
        if node is None and (i < len(parts) - 1 or isinstance(value, Mapping)):
            node = _switch_on(parent, section, part)
    if dataclasses.is_dataclass(OmegaConf.get_type(node)) and isinstance(value, Mapping):
        for name, item in value.items():
            _set(tree, f"{key}.{name}", item)
        return
    if dataclasses.is_dataclass(section):
        # OmegaConf checks choices too, but without naming the closest.
        problems = _choice_problems(key, value, _choices(typing.get_type_hints(section)[part]))
        if problems:
            raise ConfigError(problems[0])
    if isinstance(value, str) and OmegaConf.is_sequence(node):
        value = [value]  # one prompt where a list of them is expected
    with read_write(parent):
        OmegaConf.update(parent, part, value, merge=False)


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section's field: ``Section``, or ``Section | None`` for a section that
    may be off (``logging.wandb``); None for a value's field."""
    return next((t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), None)


def _switch_on(parent: DictConfig, section: type, key: str) -> DictConfig | None:
    """Turns the section ``key`` of ``parent``, off (null) until now, on with its defaults, so that
    its keys can be set one by one; returns it. None where ``key`` is a value, not such a section."""
    cls = _section_type(typing.get_type_hints(section)[key]) if dataclasses.is_dataclass(section) else None
    if cls is None:
        return None
    with read_write(parent):
        parent[key] = OmegaConf.structured(cls)
    return parent.get(key)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        section = _section_type(f.type)
        if section:
            keys += _all_keys(section, f"{prefix}{f.name}.")
    return keys


def _unknown_key(cls: type, section: str, key: str) -> ConfigError:
    prefix = section + "." if section else ""
    where = f"unknown key '{prefix}{key}'"
    if key in DIFFUSERS_FLAGS:
        return ConfigError(f"{where}; diffusers' --{key} is '{DIFFUSERS_FLAGS[key]}' here")
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        suggestion = prefix + close[0]
    else:
        # A key put in the wrong section: `train.resolution` -> `data.resolution`.
        outside = [k for k in _all_keys(Config) if k.rpartition(".")[0] != section and not prefix.startswith(k + ".")]
        same_name = [k for k in outside if k.rpartition(".")[2] == key]
        similar = difflib.get_close_matches(prefix + key, outside, n=1, cutoff=0.75)
        suggestion = (same_name or similar or [None])[0]
    if suggestion:
        return ConfigError(f"{where}; did you mean '{suggestion}'?")
    return ConfigError(f"{where}; valid keys here: {', '.join(valid)}")


def _choices(tp: Any) -> tuple | None:
    """The values a Literal field (optional or not) allows; None for other fields."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(arg for arg in args if arg is not type(None))
    if typing.get_origin(tp) is not Literal:
        return None
    return typing.get_args(tp) + ((None,) if optional else ())


def _choice_problems(key: str, value: Any, choices: Sequence | None) -> list[str]:
    if choices is None or value in choices:
        return []
    names = [str(choice) for choice in choices if choice is not None]
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return [f"{key}: unknown value {value!r}; choose one of {', '.join(names)}{hint}"]


# ----------------------------------------------------------------------------------------------
# Validation of values.


def validate(config: Config, num_devices: int | None = None) -> None:
    """Raises ConfigError listing every invalid value; checks the mesh against `num_devices`
    (all devices of all processes) when it is given."""
    problems: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    # Choices again: a config built in Python (dataclasses.replace) was never read.
    def choices(section: Any, prefix: str) -> None:
        for name, tp in typing.get_type_hints(type(section)).items():
            value = getattr(section, name)
            if _section_type(tp):
                if value is not None:  # a section that is off has no values to check
                    choices(value, f"{prefix}{name}.")
            else:
                problems.extend(_choice_problems(prefix + name, value, _choices(tp)))

    choices(config, "")

    m = config.model
    check(bool(m.pretrained), "model.pretrained: empty; give a diffusers SDXL folder or Hub id")
    check(
        m.config_from is None or m.pretrained.endswith(".safetensors"),
        f"model.config_from is for a single-file model.pretrained (a .safetensors file), not {m.pretrained!r}",
    )
    check(
        m.attention != "splash" or config.logging.chip in (None, "cpu") or str(config.logging.chip).startswith("tpu"),
        f"model.attention: splash is the TPU kernel but logging.chip is {config.logging.chip}; use cudnn, xla or auto",
    )
    names = typing.get_args(UnetName)
    check(
        m.unet_config is None or isinstance(m.unet_config, Mapping) or m.unet_config in names,
        f"model.unet_config must be null, a mapping of UNet config keys or one of {', '.join(names)}; "
        f"got {m.unet_config!r}",
    )

    d = config.data
    check(bool(d.path), f"data.path is required for data.source {d.source!r} (a folder, a dataset id for hf, or tar files for webdataset)")
    check(
        d.resolution > 0 and d.resolution % 8 == 0,
        f"data.resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {d.resolution}",
    )
    check(d.max_pixels > 0, f"data.max_pixels must be positive, got {d.max_pixels}")
    check(d.cache_shard_size > 0, f"data.cache_shard_size must be positive, got {d.cache_shard_size}")
    check(d.reads_in_flight > 0, f"data.reads_in_flight must be positive, got {d.reads_in_flight}")
    check(bool(d.caption_column), "data.caption_column must not be empty")
    if d.instance_prompt is not None:
        check(bool(d.instance_prompt.strip()), "data.instance_prompt must not be empty (null: the dataset's captions)")
        check(d.source in ("imagefolder", "captions_txt"),
              f"data.instance_prompt captions a folder of images (data.source imagefolder or captions_txt), "
              f"not data.source {d.source!r}, whose items carry their own captions")
    check(d.buckets != ("sdxl",) or d.resolution % 32 == 0,
          f"data.buckets [sdxl] scales SDXL's sizes to data.resolution, which must then be a multiple of 32, got {d.resolution}")
    for size in config.validation.sizes:
        try:
            buckets.parse_size(size)
        except ValueError as error:
            check(False, f"validation.sizes: {error}")
    for size in d.buckets if d.buckets != ("sdxl",) else ():
        try:
            h, w = buckets.parse_size(size)
            check(h % 8 == 0 and w % 8 == 0, f"data.buckets: {size}: both sides must be multiples of 8 (the VAE's factor)")
        except ValueError as error:
            check(False, f"data.buckets: {error}" + ("; [sdxl] stands alone" if size == "sdxl" else ""))
    check(bool(d.image_column), "data.image_column must not be empty")
    check(d.max_buckets is None or d.max_buckets >= 1, f"data.max_buckets must be at least 1, got {d.max_buckets}")
    check(d.min_bucket_images >= 0, f"data.min_bucket_images must be at least 0, got {d.min_bucket_images}")
    check(bool(d.buckets) or (d.max_buckets is None and d.min_bucket_images == 0),
          "data.max_buckets and data.min_bucket_images choose among data.buckets, which is empty")
    check(d.max_text_chunks >= 1, f"data.max_text_chunks must be >= 1, got {d.max_text_chunks}")

    t = config.train
    check(t.global_batch_size >= 1, f"train.global_batch_size must be >= 1, got {t.global_batch_size}")
    check(t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
    check(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    check(
        math.isfinite(t.learning_rate) and t.learning_rate > 0,
        f"train.learning_rate must be a positive number, got {t.learning_rate}",
    )
    check(
        0 <= t.warmup_steps <= t.max_steps,
        f"train.warmup_steps must be between 0 and train.max_steps ({t.max_steps}), got {t.warmup_steps}",
    )
    check(all(0 <= b < 1 for b in t.betas), f"train.betas must each be in [0, 1), got {list(t.betas)}")
    check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    check(t.eps > 0, f"train.eps must be > 0, got {t.eps}")
    check(
        t.max_grad_norm is None or t.max_grad_norm > 0,
        f"train.max_grad_norm must be > 0 (or null for no clipping), got {t.max_grad_norm}",
    )
    check(0 < t.ema.decay < 1, f"train.ema.decay must be in (0, 1), got {t.ema.decay}")
    check(t.ema.start_step >= 0, f"train.ema.start_step must be >= 0, got {t.ema.start_step}")
    check(t.ema.every >= 1, f"train.ema.every must be >= 1, got {t.ema.every}")
    check(
        t.snr_gamma is None or t.snr_gamma > 0,
        f"train.snr_gamma must be > 0 (or null for no min-SNR weighting), got {t.snr_gamma}",
    )
    bias = t.timestep_bias
    check(bias.multiplier > 0, f"train.timestep_bias.multiplier must be > 0, got {bias.multiplier}")
    check(0 < bias.portion <= 1, f"train.timestep_bias.portion must be in (0, 1], got {bias.portion}")
    check(
        0 <= bias.begin < bias.end <= NUM_TRAIN_TIMESTEPS,
        f"train.timestep_bias.begin/end must satisfy 0 <= begin < end <= {NUM_TRAIN_TIMESTEPS}, "
        f"got begin={bias.begin}, end={bias.end}",
    )
    check(t.noise_offset >= 0, f"train.noise_offset must be >= 0, got {t.noise_offset}")
    check(0 <= t.caption_dropout <= 1, f"train.caption_dropout must be in [0, 1], got {t.caption_dropout}")

    lo = config.lora
    check(lo.rank >= 1, f"lora.rank must be >= 1, got {lo.rank}")
    check(lo.alpha is None or (math.isfinite(lo.alpha) and lo.alpha > 0),
          f"lora.alpha must be > 0 (or null for lora.rank), got {lo.alpha}")
    check(0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), got {lo.dropout}")
    check(len(lo.target_modules) > 0,
          "lora.target_modules is empty; name at least one module, e.g. [to_q, to_k, to_v, to_out.0]")
    for name in lo.target_modules:
        if name not in lora.SUPPORTED_TARGETS:
            close = difflib.get_close_matches(name, lora.SUPPORTED_TARGETS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"lora.target_modules: unknown module {name!r}; choose from "
                            f"{', '.join(lora.SUPPORTED_TARGETS)}{hint}")
    check(len(set(lo.target_modules)) == len(lo.target_modules),
          f"lora.target_modules names a module twice: {list(lo.target_modules)}")
    check(t.method == "lora" or lo.init_from is None,
          f"lora.init_from is set but train.method is {t.method}; continuing a LoRA needs train.method: lora")
    check(t.method == "lora" or not lo.train_text_encoder,
          f"lora.train_text_encoder is set but train.method is {t.method}; it adapts the text encoders of a LoRA run")
    check(t.method != "lora" or m.unet_config is None,
          "train.method is lora but model.unet_config is set; a LoRA trains beside the pretrained folder's UNet "
          "(model.unet_config: null)")

    mesh = config.mesh
    shape = None
    mesh_problems = sharding.mesh_axis_problems(mesh)
    problems += mesh_problems
    if not mesh_problems:
        if num_devices is not None:
            try:
                shape = sharding.resolve_mesh_shape(mesh, num_devices)
            except ValueError as e:
                problems.append(str(e))
        elif -1 not in (mesh.data, mesh.fsdp, mesh.tensor):
            shape = {axis: getattr(mesh, axis) for axis in sharding.MESH_AXES}
            shape["data"] *= mesh.slices
    if shape is not None:
        data_parallel = shape["data"] * shape["fsdp"]
        check(
            t.global_batch_size % data_parallel == 0,
            f"train.global_batch_size={t.global_batch_size} is not divisible by the data-parallel size "
            f"{data_parallel} (mesh data={shape['data']} x fsdp={shape['fsdp']})",
        )
    for logical, target in mesh.rules.items():
        targets = target if isinstance(target, tuple) else () if target is None else (target,)
        for axis in targets:
            problems += _choice_problems(f"mesh.rules.{logical}", axis, sharding.MESH_AXES)

    c = config.checkpoint
    check(c.every_steps >= 0, f"checkpoint.every_steps must be >= 0 (0: no periodic saves), got {c.every_steps}")
    check(c.sigterm_grace_s is None or c.sigterm_grace_s > 0,
          f"checkpoint.sigterm_grace_s must be > 0 seconds or null, got {c.sigterm_grace_s}")
    check(c.keep is None or c.keep >= 1, f"checkpoint.keep must be >= 1 (or null to keep all), got {c.keep}")

    v = config.validation
    check(v.every_steps >= 0, f"validation.every_steps must be >= 0 (0: off), got {v.every_steps}")
    check(
        v.every_steps == 0 or len(v.prompts) > 0,
        f"validation.prompts is empty but validation.every_steps={v.every_steps}; add prompts or set every_steps: 0",
    )
    check(v.loss_every_steps >= 0, f"validation.loss_every_steps must be >= 0 (0: off), got {v.loss_every_steps}")
    check(0 <= d.validation_split < 1, f"data.validation_split must be in [0, 1), got {d.validation_split}")
    check(v.loss_every_steps <= 0 or d.validation_split > 0,
          f"validation.loss_every_steps={v.loss_every_steps} needs held-out samples; set data.validation_split "
          "(e.g. 0.05) or validation.loss_every_steps: 0")
    check(v.num_steps >= 1, f"validation.num_steps must be >= 1, got {v.num_steps}")
    check(v.guidance_scale >= 0, f"validation.guidance_scale must be >= 0, got {v.guidance_scale}")
    check(v.max_text_chunks is None or v.max_text_chunks >= 1,
          f"validation.max_text_chunks must be >= 1, got {v.max_text_chunks}")
    check(
        v.resolution is None or (v.resolution > 0 and v.resolution % 8 == 0),
        f"validation.resolution must be a positive multiple of 8 (or null for data.resolution), got {v.resolution}",
    )

    check(
        not config.export.use_ema or t.ema.enabled,
        "export.use_ema is true but train.ema.enabled is false; enable EMA or set export.use_ema: null",
    )
    check(
        not (config.export.single_file and config.train.method == "lora"),
        "export.single_file: a LoRA run exports its factors only; set export.single_file: false "
        "(or export.kohya_lora: true for a file A1111 and ComfyUI load)",
    )

    log = config.logging
    check(log.every_steps >= 1, f"logging.every_steps must be >= 1, got {log.every_steps}")
    check(
        log.peak_tflops is None or log.peak_tflops > 0,
        f"logging.peak_tflops must be > 0 (or null for the chip's table entry), got {log.peak_tflops}",
    )
    for tag in log.wandb.tags if log.wandb else ():  # W&B's own limits, which it checks only when the run starts
        check(1 <= len(tag) <= 64, f"logging.wandb.tags: {tag!r} has {len(tag)} characters; W&B takes 1 to 64")

    check(bool(config.run_dir), "run_dir must not be empty")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
