"""The trainer's configuration: one typed tree of frozen dataclasses, read from YAML.

A run's config is built in layers, each overriding the one before:

1. the defaults written in the dataclasses below;
2. YAML files, in the order given; a file may name ``base: other.yaml`` (or a list of them,
   paths relative to the file), which is applied before the file's own keys;
3. ``section.key=value`` overrides from the command line, values parsed as YAML.

Sections merge key by key; any other value (a list, a free-form table) is replaced whole.
Unknown keys and values of the wrong type are errors as soon as they are read. Values that are
well typed but unusable (lr <= 0, a batch the mesh cannot split, ...) are errors in `validate`,
which the trainer calls before anything is compiled. `save` writes the resolved config into
the run directory, in a form `load` reads back to an equal config.
"""

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import yaml
from etils import epath

# The demo recipe: the config to run when none is named (it ships with the source checkout).
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

MESH_AXES = ("data", "fsdp", "tensor")

# Dense bf16 peak per chip, used for MFU. None: no meaningful peak (MFU is only reported when
# logging.peak_tflops is given).
CHIP_PEAK_TFLOPS: dict[str, float | None] = {
    "tpu_v4": 275.0,
    "tpu_v5e": 197.0,
    "tpu_v5p": 459.0,
    "tpu_v6e": 918.0,
    "h100": 989.0,
    "cpu": None,
}

# Choices for the string-valued keys. Named UNet architectures are built by flax_train.models.
UNET_SIZES = ("sdxl", "tiny")
COMPUTE_DTYPES = ("bfloat16", "float32")
PARAM_DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DATA_SOURCES = ("synthetic", "imagefolder", "hf", "captions_txt")
CROPS = ("random", "center")
LATENT_MODES = ("sample", "mean")
OPTIMIZERS = ("adamw", "adafactor", "lion")
LR_SCHEDULES = ("constant", "linear", "cosine")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")
NAN_POLICIES = ("stop", "skip")
SAMPLERS = ("euler", "ddim")

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
}

# SDXL's noise schedule has 1000 training timesteps; timestep-bias ranges index into it.
NUM_TRAIN_TIMESTEPS = 1000


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type or invalid value."""


class FrozenDict(Mapping):
    """A read-only, hashable mapping for the free-form tables (`model.unet_config`, `mesh.rules`),
    so the whole config stays immutable and can be a static argument to `jax.jit`."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping | Sequence = ()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenDict({self._items!r})"


# ----------------------------------------------------------------------------------------------
# Schema. Field comments name the diffusers training-script flag a key replaces, where one does.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --pretrained_model_name_or_path: a diffusers SDXL folder or Hub id. null: every component
    # is built offline with random weights at the demo's size (`unet_config: tiny`).
    pretrained: str | None = "stabilityai/stable-diffusion-xl-base-1.0"
    # --pretrained_vae_model_name_or_path: a VAE folder or Hub id used instead of pretrained/vae.
    vae: str | None = None
    revision: str | None = None
    # With `pretrained` set: null loads its UNet; a named size or an inline dict of
    # UNet2DConditionModel config keys trains a UNet of that shape from scratch instead.
    unet_config: str | Mapping[str, Any] | None = None
    dtype: str = "bfloat16"  # compute dtype (--mixed_precision bf16 | no)
    param_dtype: str = "float32"  # master weights and optimizer state
    attention: str = "auto"
    remat: str = "none"  # --gradient_checkpointing: full
    prediction_type: str | None = None  # null: the scheduler config's own


@dataclasses.dataclass(frozen=True)
class SyntheticDataConfig:
    num_images: int = 64
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "imagefolder"
    # --train_data_dir (imagefolder, captions_txt) or --dataset_name (hf: Hub id or local folder).
    path: str | None = None
    dataset_config: str | None = None  # --dataset_config_name
    split: str = "train"
    caption_column: str = "text"
    image_column: str = "image"
    resolution: int = 1024
    crop: str = "random"  # --center_crop: center
    random_flip: bool = False
    cache_dir: str | None = None  # latent cache; null: <run_dir>/cache
    latent_mode: str = "mean"  # latents cached as a VAE posterior sample or its mean
    max_pixels: int = 89_478_485  # larger source images are refused (decompression bombs)
    synthetic: SyntheticDataConfig = SyntheticDataConfig()


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    enabled: bool = False  # --use_ema
    decay: float = 0.9999
    start_step: int = 0
    every: int = 1


@dataclasses.dataclass(frozen=True)
class TimestepBiasConfig:
    strategy: str = "none"  # --timestep_bias_strategy
    multiplier: float = 1.0
    portion: float = 0.25  # share of timesteps biased by earlier / later
    begin: int = 0  # [begin, end) for range
    end: int = NUM_TRAIN_TIMESTEPS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Images per micro-step over all chips (--train_batch_size x number of chips). An optimizer
    # update sees global_batch_size x grad_accum_steps images.
    global_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 10_000
    seed: int = 0
    learning_rate: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)  # --adam_beta1/2
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # null: no clipping
    ema: EmaConfig = EmaConfig()
    snr_gamma: float | None = None  # min-SNR loss weighting; null: off
    timestep_bias: TimestepBiasConfig = TimestepBiasConfig()
    noise_offset: float = 0.0
    caption_dropout: float = 0.0  # --proportion_empty_prompts, drawn anew every step
    nan_policy: str = "stop"  # a non-finite loss stops the run, or its update is skipped


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Devices along each axis; one axis may be -1 to take all remaining devices.
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Logical axis name -> mesh axis (or list of axes, or null for replicated), overriding
    # entries of the default table in flax_train.sharding.
    rules: Mapping[str, str | tuple[str, ...] | None] = FrozenDict()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000  # --checkpointing_steps; 0: no periodic saves
    keep: int | None = 3  # --checkpoints_total_limit; null: keep all
    async_save: bool = True
    dir: str | None = None  # null: <run_dir>/checkpoints
    resume: bool = True  # continue from the newest checkpoint in `dir` when there is one


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    every_steps: int = 0  # 0: no validation images
    prompts: tuple[str, ...] = ()  # --validation_prompt
    negative_prompt: str = ""
    num_steps: int = 25
    guidance_scale: float = 5.0
    scheduler: str = "euler"
    seed: int = 0
    resolution: int | None = None  # null: data.resolution


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    at_end: bool = True
    use_ema: bool | None = None  # null: the EMA weights when train.ema.enabled
    dir: str | None = None  # null: <run_dir>/export
    single_file: bool = False  # also write one .safetensors checkpoint


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    jsonl: bool = True
    chip: str | None = None  # key of CHIP_PEAK_TFLOPS; null: detected from the devices
    peak_tflops: float | None = None  # per chip; overrides the chip's table entry


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    export: ExportConfig = ExportConfig()
    logging: LoggingConfig = LoggingConfig()
    run_dir: str = "runs/sdxl"  # --output_dir; a local path or a gs:// URL


# ----------------------------------------------------------------------------------------------
# YAML reading and writing.

# YAML 1.1 reads `1e-6` and `1.0e6` as strings (it wants a dot and a signed exponent); every
# config author means a number, so both the loader and the dumper resolve them as floats.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports it
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def _file_layers(path: str | os.PathLike, chain: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The (source, mapping) layers of one file, its bases first."""
    name = os.fspath(path)
    if "://" not in name:  # URLs (gs://) are not normalised: it would merge their slashes
        name = os.path.normpath(name)
    if name in chain:
        raise ConfigError("config files name each other as base: " + " -> ".join(chain + (name,)))
    try:
        text = epath.Path(path).read_text()
    except FileNotFoundError:
        via = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{via}") from None
    data = _parse_yaml(text, name)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of sections at the top level, got {_describe_value(data)}")
    bases = data.pop("base", None)
    if isinstance(bases, str):
        bases = [bases]
    if bases is None:
        bases = []
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{name}: base: expected a path or a list of paths, got {_describe_value(bases)}")
    layers = []
    for base in bases:
        layers += _file_layers(epath.Path(path).parent / base, chain + (name,))
    layers.append((name, data))
    return layers


def load(
    paths: str | os.PathLike | Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
) -> Config:
    """Reads config files in order (later ones override earlier ones), then `key=value` overrides.

    Checks keys and types; call `validate` for the values.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    config = Config()
    for path in paths:
        for source, data in _file_layers(path):
            try:
                config = _apply_mapping(config, data, "")
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Returns `config` with `a.b=value` overrides applied; values are parsed as YAML.

    A key inside a free-form table is set on its own (`mesh.rules.embed=fsdp`), keeping the rest.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key=value, e.g. train.learning_rate=1e-5")
        value = _parse_yaml(text, f"override {override!r}")
        try:
            config = _set_path(config, key.split("."), value, "")
        except ConfigError as e:
            raise ConfigError(f"override {override!r}: {e}") from None
    return config


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
    """Writes `config` as YAML (local path or gs:// URL); `load(path)` gives back an equal config."""
    text = yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Resolved configuration of this run, every key included.\n" + text)


# ----------------------------------------------------------------------------------------------
# Applying mappings and overrides onto the typed tree.


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
    return keys


def _unknown_key(cls: type, prefix: str, key: Any) -> ConfigError:
    key, where = str(key), f"unknown key '{prefix}{key}'"
    if key in DIFFUSERS_FLAGS:
        return ConfigError(f"{where}; diffusers' --{key} is '{DIFFUSERS_FLAGS[key]}' here")
    valid = list(_field_types(cls))
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        suggestion = prefix + close[0]
    else:
        # A key put in the wrong section: `train.resolution` -> `data.resolution`.
        section = prefix.rstrip(".")
        outside = [k for k in _all_keys(Config) if k.rpartition(".")[0] != section and not prefix.startswith(k + ".")]
        same_name = [k for k in outside if k.rpartition(".")[2] == key]
        similar = difflib.get_close_matches(prefix + key, outside, n=1, cutoff=0.75)
        suggestion = (same_name or similar or [None])[0]
    if suggestion:
        return ConfigError(f"{where}; did you mean '{suggestion}'?")
    return ConfigError(f"{where}; valid keys here: {', '.join(valid)}")


def _apply_mapping(section: Any, values: Any, prefix: str) -> Any:
    """`section` with the keys of `values` set; sub-sections merge key by key."""
    if not isinstance(values, Mapping):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe_value(values)}")
    types_ = _field_types(type(section))
    changes = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key(type(section), prefix, key)
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            changes[key] = _apply_mapping(getattr(section, key), value, f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, tp, f"{prefix}{key}")
    return dataclasses.replace(section, **changes)


def _set_path(section: Any, parts: list[str], value: Any, prefix: str) -> Any:
    """`section` with the dotted key `parts` set to `value`."""
    name, rest = parts[0], parts[1:]
    types_ = _field_types(type(section))
    if name not in types_:
        raise _unknown_key(type(section), prefix, name)
    tp, key = types_[name], f"{prefix}{name}"
    current = getattr(section, name)
    if dataclasses.is_dataclass(tp):
        new = _set_path(current, rest, value, key + ".") if rest else _apply_mapping(current, value, key + ".")
    elif rest:
        if not _accepts_mapping(tp):
            raise ConfigError(f"'{key}' is {_describe_type(tp)}; it has no key '{'.'.join(rest)}'")
        table = to_dict(current) if isinstance(current, Mapping) else {}
        inner = table
        for part in rest[:-1]:
            if not isinstance(inner.get(part), dict):
                inner[part] = {}
            inner = inner[part]
        inner[rest[-1]] = value
        new = _coerce(table, tp, key)
    else:
        new = _coerce(value, tp, key)
    return dataclasses.replace(section, **{name: new})


def _accepts_mapping(tp: Any) -> bool:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_accepts_mapping(arg) for arg in typing.get_args(tp))
    return typing.get_origin(tp) is Mapping or tp is Any


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenDict({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming the key, the type expected and the value.

    Lenient only where no meaning is lost: integers where numbers are expected, whole numbers
    (1e4) where integers are, and one string where a list of strings is.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        variadic = len(args) == 2 and args[1] is Ellipsis
        if variadic and isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and (variadic or len(value) == len(args)):
            item_types = [args[0]] * len(value) if variadic else args
            return tuple(_coerce(item, t, f"{key}[{i}]") for i, (item, t) in enumerate(zip(value, item_types)))
    elif origin is Mapping:
        if isinstance(value, Mapping):
            key_type, value_type = args
            return FrozenDict(
                {_coerce(k, key_type, f"{key}.{k}"): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
            )
    else:
        raise TypeError(f"config field type {tp!r} is not handled")
    raise ConfigError(f"{key}: expected {_describe_type(tp)}, got {_describe_value(value)}")


def _describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list (each item {_describe_type(args[0])})"
        return f"a list of {len(args)} items ({', '.join(_describe_type(a) for a in args)})"
    if origin is Mapping:
        return "a mapping"
    names = {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Any: "any value",
    }
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _describe_value(value: Any) -> str:
    kinds = {
        type(None): "null",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    return f"{value!r} ({kinds.get(type(value), type(value).__name__)})"


# ----------------------------------------------------------------------------------------------
# Validation of values.


def _mesh_axis_problems(mesh: MeshConfig) -> list[str]:
    problems = []
    for axis in MESH_AXES:
        size = getattr(mesh, axis)
        if size != -1 and size < 1:
            problems.append(f"mesh.{axis} must be a positive number of devices or -1 (the rest), got {size}")
    filled = [axis for axis in MESH_AXES if getattr(mesh, axis) == -1]
    if len(filled) > 1:
        problems.append(
            f"mesh: only one axis may be -1, got {' and '.join(f'mesh.{a}=-1' for a in filled)}; "
            "give the others explicit sizes"
        )
    return problems


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes {data, fsdp, tensor} on `num_devices` devices, the -1 axis taking the rest."""
    problems = _mesh_axis_problems(mesh_cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    if num_devices < 1:
        raise ConfigError(f"the number of devices must be positive, got {num_devices}")
    shape = {axis: getattr(mesh_cfg, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in shape.values() if size != -1)
    described = " x ".join(f"{axis}={size}" for axis, size in shape.items())
    filled = [axis for axis, size in shape.items() if size == -1]
    if filled:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: {described} cannot be laid on {num_devices} devices: "
                f"the fixed axes take {fixed}, which does not divide {num_devices}"
            )
        shape[filled[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh: {described} needs {fixed} devices, but there are {num_devices}")
    return shape


def validate(config: Config, num_devices: int | None = None) -> None:
    """Raises ConfigError listing every invalid value; checks the mesh against `num_devices`
    (all devices of all processes) when it is given."""
    problems: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def choice(key: str, value: Any, choices: Sequence[str]) -> None:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key}: unknown value {value!r}; choose one of {', '.join(choices)}{hint}")

    m = config.model
    choice("model.dtype", m.dtype, COMPUTE_DTYPES)
    choice("model.param_dtype", m.param_dtype, PARAM_DTYPES)
    choice("model.attention", m.attention, ATTENTION_IMPLS)
    choice("model.remat", m.remat, REMAT_POLICIES)
    if m.prediction_type is not None:
        choice("model.prediction_type", m.prediction_type, PREDICTION_TYPES)
    if isinstance(m.unet_config, str):
        choice("model.unet_config", m.unet_config, UNET_SIZES)
    check(m.pretrained != "", "model.pretrained: empty; give a folder or Hub id, or null for random weights")
    check(
        m.pretrained is not None or m.unet_config == "tiny",
        "model.pretrained is null, so the whole pipeline is built offline with random weights at the "
        f"demo's size: model.unet_config must be 'tiny', got {m.unet_config!r}; other sizes and inline "
        "dicts reshape the UNet of a pretrained pipeline",
    )

    d = config.data
    choice("data.source", d.source, DATA_SOURCES)
    check(
        d.source == "synthetic" or bool(d.path),
        f"data.path is required for data.source {d.source!r} (a folder, or a dataset id for hf)",
    )
    check(
        d.resolution > 0 and d.resolution % 8 == 0,
        f"data.resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {d.resolution}",
    )
    choice("data.crop", d.crop, CROPS)
    choice("data.latent_mode", d.latent_mode, LATENT_MODES)
    check(d.max_pixels > 0, f"data.max_pixels must be positive, got {d.max_pixels}")
    check(bool(d.caption_column), "data.caption_column must not be empty")
    check(bool(d.image_column), "data.image_column must not be empty")
    check(d.synthetic.num_images >= 1, f"data.synthetic.num_images must be >= 1, got {d.synthetic.num_images}")

    t = config.train
    check(t.global_batch_size >= 1, f"train.global_batch_size must be >= 1, got {t.global_batch_size}")
    check(t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
    check(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    check(
        math.isfinite(t.learning_rate) and t.learning_rate > 0,
        f"train.learning_rate must be a positive number, got {t.learning_rate}",
    )
    choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    check(
        0 <= t.warmup_steps <= t.max_steps,
        f"train.warmup_steps must be between 0 and train.max_steps ({t.max_steps}), got {t.warmup_steps}",
    )
    choice("train.optimizer", t.optimizer, OPTIMIZERS)
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
    choice("train.timestep_bias.strategy", bias.strategy, TIMESTEP_BIAS_STRATEGIES)
    check(bias.multiplier > 0, f"train.timestep_bias.multiplier must be > 0, got {bias.multiplier}")
    check(0 < bias.portion <= 1, f"train.timestep_bias.portion must be in (0, 1], got {bias.portion}")
    check(
        0 <= bias.begin < bias.end <= NUM_TRAIN_TIMESTEPS,
        f"train.timestep_bias.begin/end must satisfy 0 <= begin < end <= {NUM_TRAIN_TIMESTEPS}, "
        f"got begin={bias.begin}, end={bias.end}",
    )
    check(t.noise_offset >= 0, f"train.noise_offset must be >= 0, got {t.noise_offset}")
    check(0 <= t.caption_dropout <= 1, f"train.caption_dropout must be in [0, 1], got {t.caption_dropout}")
    choice("train.nan_policy", t.nan_policy, NAN_POLICIES)

    mesh = config.mesh
    shape = None
    mesh_problems = _mesh_axis_problems(mesh)
    problems += mesh_problems
    if not mesh_problems:
        if num_devices is not None:
            try:
                shape = resolve_mesh_shape(mesh, num_devices)
            except ConfigError as e:
                problems.append(str(e))
        elif -1 not in (mesh.data, mesh.fsdp, mesh.tensor):
            shape = {axis: getattr(mesh, axis) for axis in MESH_AXES}
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
            choice(f"mesh.rules.{logical}", axis, MESH_AXES)

    c = config.checkpoint
    check(c.every_steps >= 0, f"checkpoint.every_steps must be >= 0 (0: no periodic saves), got {c.every_steps}")
    check(c.keep is None or c.keep >= 1, f"checkpoint.keep must be >= 1 (or null to keep all), got {c.keep}")

    v = config.validation
    check(v.every_steps >= 0, f"validation.every_steps must be >= 0 (0: off), got {v.every_steps}")
    check(
        v.every_steps == 0 or len(v.prompts) > 0,
        f"validation.prompts is empty but validation.every_steps={v.every_steps}; add prompts or set every_steps: 0",
    )
    check(v.num_steps >= 1, f"validation.num_steps must be >= 1, got {v.num_steps}")
    check(v.guidance_scale >= 0, f"validation.guidance_scale must be >= 0, got {v.guidance_scale}")
    choice("validation.scheduler", v.scheduler, SAMPLERS)
    check(
        v.resolution is None or (v.resolution > 0 and v.resolution % 8 == 0),
        f"validation.resolution must be a positive multiple of 8 (or null for data.resolution), got {v.resolution}",
    )

    check(
        not config.export.use_ema or t.ema.enabled,
        "export.use_ema is true but train.ema.enabled is false; enable EMA or set export.use_ema: null",
    )
    check(
        not config.export.single_file,
        "export.single_file: the single-file checkpoint format is not written yet; export the diffusers folder "
        "(export.single_file: false)",
    )

    log = config.logging
    check(log.every_steps >= 1, f"logging.every_steps must be >= 1, got {log.every_steps}")
    if log.chip is not None:
        choice("logging.chip", log.chip, list(CHIP_PEAK_TFLOPS))
    check(
        log.peak_tflops is None or log.peak_tflops > 0,
        f"logging.peak_tflops must be > 0 (or null for the chip's table entry), got {log.peak_tflops}",
    )

    check(bool(config.run_dir), "run_dir must not be empty")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
