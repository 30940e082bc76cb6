"""The config system: every shipped YAML loads and validates, layering and overrides work, and
every kind of mistake is reported with the key that causes it. No JAX here."""

import dataclasses
import pickle
import textwrap
import typing
from pathlib import Path

import pytest

from flax_train import config as cfg, sharding
from flax_train.demo import CONFIG as DEMO_CONFIG

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
SDXL_BASE = CONFIGS / "sdxl_base.yaml"
PRESETS = sorted((CONFIGS / "presets").glob("*.yaml"))
# Devices of the machine each preset is written for (a v5p-8 has 4 chips).
PRESET_DEVICES = {
    "tpu_v5e_8": 8,
    "tpu_v5p_8": 4,
    "tpu_v5p_32": 16,
    "tpu_v6e_8": 8,
    "gpu_h100": 8,
    "cpu_8": 8,
    "mesh_data_parallel": 8,
    "mesh_fsdp": 8,
    "mesh_hybrid": 8,
}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------
# The shipped files.


def test_the_required_files_exist():
    names = {p.name for p in RECIPES}
    assert "sdxl_base.yaml" in names
    assert {p.stem for p in PRESETS} == set(PRESET_DEVICES)
    assert DEMO_CONFIG.is_file()


@pytest.mark.parametrize("path", RECIPES + PRESETS, ids=lambda p: p.name)
def test_every_yaml_starts_with_the_command_that_runs_it(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any("flax-train train" in line and "--config configs/" in line for line in header), path


@pytest.mark.parametrize("path", RECIPES + [DEMO_CONFIG], ids=lambda p: p.name)
def test_recipes_load_and_validate_on_8_devices(path):
    config = cfg.load(path)
    cfg.validate(config, num_devices=8)
    cfg.validate(config)


@pytest.mark.parametrize("recipe", [SDXL_BASE, DEMO_CONFIG], ids=lambda p: p.name)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_layer_on_recipes(recipe, preset):
    base = cfg.load(recipe)
    layered = cfg.load([recipe, preset])
    cfg.validate(layered, num_devices=PRESET_DEVICES[preset.stem])
    # The preset changes what it names and nothing else.
    assert layered.data == base.data
    assert layered.run_dir == base.run_dir
    assert layered.model.pretrained == base.model.pretrained


def test_sdxl_base_is_the_documented_recipe():
    c = cfg.load(SDXL_BASE)
    assert c.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
    assert c.data.resolution == 1024
    assert (c.train.optimizer, c.train.lr_schedule, c.train.learning_rate) == ("adamw", "constant", 1e-6)
    assert c.train.warmup_steps > 0 and c.train.ema.enabled and c.model.remat != "none"
    assert sharding.resolve_mesh_shape(c.mesh, 8) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_demo_is_a_small_fsdp_run_on_the_folder_it_builds():
    c = cfg.load(DEMO_CONFIG)
    assert c.model.pretrained == "runs/demo/base" and c.model.unet_config is None
    assert c.data.source == "imagefolder" and c.data.path == "runs/demo/data"
    assert c.data.resolution <= 64  # small enough for a 2-core CPU
    assert 100 <= c.train.max_steps <= 1000
    assert sharding.resolve_mesh_shape(c.mesh, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert c.checkpoint.every_steps > 0 and c.validation.every_steps > 0 and c.validation.prompts
    assert c.export.at_end


def test_hybrid_preset_resolves_to_two_replicas():
    c = cfg.load([DEMO_CONFIG, CONFIGS / "presets" / "mesh_hybrid.yaml"])
    assert sharding.resolve_mesh_shape(c.mesh, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    c = cfg.load([DEMO_CONFIG, CONFIGS / "presets" / "mesh_data_parallel.yaml"])
    assert sharding.resolve_mesh_shape(c.mesh, 8) == {"data": 8, "fsdp": 1, "tensor": 1}


# ---------------------------------------------------------------------------------------------
# Layering: base files and several files in order.


def test_base_is_relative_to_the_file_and_applied_first(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "train: {max_steps: 5, seed: 3}\nrun_dir: r\n")
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\ntrain: {max_steps: 7}\n")
    child = write(tmp_path / "sub" / "child.yaml", "base: mid.yaml\ntrain:\n  ema: {enabled: true}\n")
    c = cfg.load(child)
    assert c.train.max_steps == 7  # mid overrides root
    assert c.train.seed == 3  # root's key survives: sections merge key by key
    assert c.train.ema.enabled and c.train.ema.decay == cfg.EmaConfig().decay
    assert c.run_dir == "r"


def test_list_of_bases_and_list_of_files_apply_in_order(tmp_path):
    write(tmp_path / "a.yaml", "train: {max_steps: 1, seed: 1}\n")
    write(tmp_path / "b.yaml", "train: {max_steps: 2}\n")
    c = write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\n")
    d = write(tmp_path / "d.yaml", "train: {seed: 4}\n")
    assert cfg.load(c).train.max_steps == 2
    both = cfg.load([c, d])
    assert (both.train.max_steps, both.train.seed) == (2, 4)
    reversed_order = cfg.load([d, tmp_path / "a.yaml"])
    assert reversed_order.train.seed == 1


def test_lists_and_tables_are_replaced_not_merged(tmp_path):
    write(tmp_path / "a.yaml", "validation: {prompts: [one, two, three]}\nmesh: {rules: {embed: fsdp}}\n")
    b = write(tmp_path / "b.yaml", "base: a.yaml\nvalidation: {prompts: [four]}\nmesh: {rules: {heads: tensor}}\n")
    c = cfg.load(b)
    assert c.validation.prompts == ("four",)
    assert c.mesh.rules == {"heads": "tensor"}


def test_base_cycle_and_missing_base_are_errors(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(cfg.ConfigError, match="a.yaml -> .*b.yaml -> .*a.yaml"):
        cfg.load(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(cfg.ConfigError, match="nowhere.yaml.*base of .*c.yaml"):
        cfg.load(tmp_path / "c.yaml")


def test_empty_file_gives_defaults_and_non_mapping_is_an_error(tmp_path):
    assert cfg.load(write(tmp_path / "empty.yaml", "# nothing\n")) == cfg.Config()
    with pytest.raises(cfg.ConfigError, match="list.yaml: expected a mapping of sections"):
        cfg.load(write(tmp_path / "list.yaml", "- a\n- b\n"))
    with pytest.raises(cfg.ConfigError, match="scalar.yaml: expected a mapping of sections"):
        cfg.load(write(tmp_path / "scalar.yaml", "3\n"))
    with pytest.raises(cfg.ConfigError, match="base: expected a path or a list of paths"):
        cfg.load(write(tmp_path / "base.yaml", "base: {a: 1}\n"))


def test_duplicate_keys_and_bad_yaml_are_errors(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"(?s)dup.yaml: not valid YAML.*duplicate key seed.*line 3"):
        cfg.load(write(tmp_path / "dup.yaml", "train:\n  seed: 1\n  seed: 2\n"))
    with pytest.raises(cfg.ConfigError, match="bad.yaml: not valid YAML"):
        cfg.load(write(tmp_path / "bad.yaml", "train: [unclosed\n"))


# ---------------------------------------------------------------------------------------------
# Overrides.


def test_overrides_nested_lists_and_types():
    c = cfg.load(
        DEMO_CONFIG,
        [
            "train.learning_rate=1e-5",  # YAML 1.1 would read a string; we read a number
            "train.max_steps=2000",
            "train.ema.decay=0.5",
            "train.ema.enabled=false",
            "train.betas=[0.8, 0.95]",
            "validation.prompts=[a cat, 'a dog, sitting']",
            "train.max_grad_norm=null",
            "train.snr_gamma=5",  # an integer where a number is expected
            "run_dir=gs://bucket/runs/x",
            "model.unet_config={block_out_channels: [32, 64], layers_per_block: 1}",
            "model.pretrained=/data/sdxl",
        ],
    )
    assert c.train.learning_rate == 1e-5 and isinstance(c.train.learning_rate, float)
    assert c.train.max_steps == 2000 and isinstance(c.train.max_steps, int)
    assert c.train.ema == cfg.EmaConfig(enabled=False, decay=0.5, start_step=0, every=1)
    assert c.train.betas == (0.8, 0.95)
    assert c.validation.prompts == ("a cat", "a dog, sitting")
    assert c.train.max_grad_norm is None
    assert c.train.snr_gamma == 5.0 and isinstance(c.train.snr_gamma, float)
    assert c.run_dir == "gs://bucket/runs/x"
    assert c.model.unet_config == {"block_out_channels": (32, 64), "layers_per_block": 1}
    cfg.validate(c, num_devices=8)


def test_yaml_files_read_exponents_as_numbers(tmp_path):
    c = cfg.load(write(tmp_path / "lr.yaml", "train: {learning_rate: 1e-6, eps: 1E-8, weight_decay: 2.5e+1}\n"))
    assert (c.train.learning_rate, c.train.eps, c.train.weight_decay) == (1e-6, 1e-8, 25.0)


def test_override_returns_a_new_config_and_later_overrides_win():
    base = cfg.load(DEMO_CONFIG)
    changed = cfg.apply_overrides(base, ["train.seed=1", "train.seed=2"])
    assert changed.train.seed == 2 and base.train.seed == 0


def test_override_of_a_whole_section_merges_its_keys():
    c = cfg.apply_overrides(cfg.Config(), ["train.ema={enabled: true}"])
    assert c.train.ema.enabled and c.train.ema.decay == cfg.EmaConfig().decay
    c = cfg.apply_overrides(c, ["train={seed: 3, ema: {decay: 0.5}}"])
    assert (c.train.seed, c.train.ema.enabled, c.train.ema.decay) == (3, True, 0.5)


def test_a_section_that_is_off_is_switched_on_by_setting_one_of_its_keys(tmp_path):
    assert cfg.Config().logging.wandb is None  # off by default
    on = cfg.apply_overrides(cfg.Config(), ["logging.wandb.project=p"])
    assert on.logging.wandb == cfg.WandbConfig(project="p")  # the section's other keys at their defaults
    assert cfg.apply_overrides(cfg.Config(), ["logging.wandb={}"]).logging.wandb == cfg.WandbConfig()
    assert cfg.apply_overrides(on, ["logging.wandb={tags: [a]}"]).logging.wandb == cfg.WandbConfig(project="p", tags=("a",))
    assert cfg.apply_overrides(on, ["logging.wandb=null"]).logging.wandb is None
    with pytest.raises(cfg.ConfigError, match="unknown key 'logging.wandb.projct'; did you mean 'logging.wandb.project'"):
        cfg.apply_overrides(cfg.Config(), ["logging.wandb.projct=p"])
    with pytest.raises(cfg.ConfigError, match="unknown key 'logging.project'; did you mean 'logging.wandb.project'"):
        cfg.apply_overrides(cfg.Config(), ["logging.project=p"])
    cfg.save(on, tmp_path / "config.yaml")
    assert cfg.load(tmp_path / "config.yaml") == on


def test_override_one_string_where_a_list_is_expected():
    c = cfg.apply_overrides(cfg.Config(), ["validation.prompts=a single prompt"])
    assert c.validation.prompts == ("a single prompt",)


def test_override_inside_a_free_form_table_keeps_the_rest():
    c = cfg.apply_overrides(cfg.Config(), ["mesh.rules={embed: fsdp, heads: tensor}", "mesh.rules.mlp=[fsdp, tensor]"])
    assert c.mesh.rules == {"embed": "fsdp", "heads": "tensor", "mlp": ("fsdp", "tensor")}
    c = cfg.apply_overrides(c, ["mesh.rules.heads=null"])
    assert c.mesh.rules["heads"] is None and c.mesh.rules["embed"] == "fsdp"


def test_malformed_overrides():
    with pytest.raises(cfg.ConfigError, match="expected key=value"):
        cfg.apply_overrides(cfg.Config(), ["train.seed"])
    with pytest.raises(cfg.ConfigError, match="'train.seed' is a value; it has no key 'x'"):
        cfg.apply_overrides(cfg.Config(), ["train.seed.x=1"])
    with pytest.raises(TypeError):
        cfg.apply_overrides(cfg.Config(), "train.seed=1")


# ---------------------------------------------------------------------------------------------
# Unknown keys and wrong types.


@pytest.mark.parametrize(
    "override, unknown, suggestion",
    [
        ("train.lerning_rate=1e-4", "train.lerning_rate", "train.learning_rate"),
        ("trian.seed=1", "trian", "train"),
        ("train.ema.decy=0.9", "train.ema.decy", "train.ema.decay"),
        ("train.resolution=512", "train.resolution", "data.resolution"),  # the right key, wrong section
        ("mesh.fdsp=4", "mesh.fdsp", "mesh.fsdp"),
    ],
)
def test_unknown_key_names_full_path_and_closest_key(override, unknown, suggestion):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.apply_overrides(cfg.Config(), [override])
    assert f"unknown key '{unknown}'" in str(info.value)
    assert f"did you mean '{suggestion}'?" in str(info.value)


def test_unknown_key_without_a_close_match_lists_the_valid_ones():
    with pytest.raises(cfg.ConfigError, match="unknown key 'export.zzz'; valid keys here: at_end, use_ema"):
        cfg.apply_overrides(cfg.Config(), ["export.zzz=1"])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "typo.yaml", "train:\n  ema:\n    decy: 0.9\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(path)
    message = str(info.value)
    assert "typo.yaml" in message
    assert "unknown key 'train.ema.decy'; did you mean 'train.ema.decay'?" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=ten", "train.max_steps: Value 'ten' of type 'str' could not be converted to Integer"),
        ("train.max_steps=10.5", "train.max_steps: Value '10.5' of type 'float' could not be converted to Integer"),
        ("train.max_steps=true", "train.max_steps: Value 'True' of type 'bool' could not be converted to Integer"),
        ("train.learning_rate=fast", "train.learning_rate: Value 'fast' of type 'str' could not be converted to Float"),
        ("data.random_flip=maybe", "data.random_flip: Value 'maybe' is not a valid bool"),
        ("train.betas=[0.9]", "train.betas: TupleConfig length 1 does not match type hint length 2"),
        ("train.betas=[0.9, x]", "train.betas: Value '[0.9, 'x']' of type 'list' could not be converted to Float"),
        ("mesh.rules=[fsdp]", "mesh.rules: Invalid type assigned: list is not a subclass of Dict[str, Any]. value: ['fsdp']"),
        ("run_dir={a: 1}", "run_dir: Cannot convert 'dict' to string"),
        ("train.ema=3", "train.ema: Invalid type assigned: int is not a subclass of EmaConfig"),
        ("train.seed=null", "train.seed: field 'train.seed' is not Optional"),
    ],
)
def test_type_errors_name_key_expected_type_and_value(override, expected):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.apply_overrides(cfg.Config(), [override])
    assert expected in str(info.value)


def test_type_error_in_a_file(tmp_path):
    path = write(tmp_path / "types.yaml", "checkpoint:\n  keep: many\n")
    with pytest.raises(cfg.ConfigError, match=r"types.yaml: checkpoint.keep: Value 'many' of type 'str' could not be "):
        cfg.load(path)


# ---------------------------------------------------------------------------------------------
# Validation of values.


def demo(*overrides: str) -> cfg.Config:
    return cfg.load(DEMO_CONFIG, overrides)


def replaced(config, key: str, value):
    """`config` with the dotted `key` set, as Python code does it: no loader involved."""
    head, _, rest = key.partition(".")
    return dataclasses.replace(config, **{head: replaced(getattr(config, head), rest, value) if rest else value})


# A wrong value for every choice-valued key, and the closest valid one where there is one.
WRONG_CHOICES = [
    ("model.dtype", "float16", "bfloat16"),
    ("model.param_dtype", "int8", None),
    ("model.attention", "flash", None),
    ("model.remat", "dots_batch", "dots_no_batch"),
    ("model.prediction_type", "sample", None),
    ("data.source", "parquet", None),
    ("data.crop", "left", None),
    ("data.latent_mode", "means", "mean"),
    ("train.optimizer", "adamww", "adamw"),
    ("train.lr_schedule", "cosin", "cosine"),
    ("train.timestep_bias.strategy", "middle", None),
    ("train.nan_policy", "ignore", None),
    ("validation.scheduler", "dpm", None),
    ("validation.prompt_weighting", "compell", "compel"),
    ("logging.chip", "tpu_v6", "tpu_v6e"),
]


@pytest.mark.parametrize("key, value, closest", WRONG_CHOICES)
def test_wrong_choices_are_refused_when_read_with_the_valid_ones(key, value, closest):
    with pytest.raises(cfg.ConfigError) as info:
        demo(f"{key}={value}")
    message = str(info.value)
    assert f"{key}: unknown value '{value}'; choose one of " in message
    if closest:
        assert f"did you mean '{closest}'?" in message


def test_wrong_choices_in_a_config_built_in_python_are_all_reported():
    config = demo()
    for key, value, _ in WRONG_CHOICES:
        config = replaced(config, key, value)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.validate(config)
    for key, value, _ in WRONG_CHOICES:
        assert f"{key}: unknown value '{value}'" in str(info.value)


def test_choices_are_those_of_the_modules_that_use_them():
    from flax_train import diffusion, metrics, optim, schedulers
    from flax_train.data import images as sources
    from flax_train.models import layers
    from sdxl_common import prompt_weights

    owned = {
        "model.attention": layers.ATTENTION_IMPLEMENTATIONS,
        "model.remat": tuple(layers.REMAT_POLICIES),
        "model.prediction_type": diffusion.PREDICTION_TYPES + (None,),
        "data.source": sources.SourceSpec.KINDS,
        "train.optimizer": typing.get_args(optim.Optimizer),
        "train.lr_schedule": typing.get_args(optim.LrSchedule),
        "train.timestep_bias.strategy": diffusion.TIMESTEP_BIAS_STRATEGIES,
        "validation.scheduler": schedulers.SAMPLERS,
        "validation.prompt_weighting": prompt_weights.SYNTAXES + (None,),
        "logging.chip": tuple(metrics.CHIP_PEAK_TFLOPS) + (None,),
    }
    for key, choices in owned.items():
        section, _, name = ("config." + key).rpartition(".")
        section_type = type(eval(section, {"config": cfg.Config()}))
        assert cfg._choices(typing.get_type_hints(section_type)[name]) == choices, key


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.learning_rate=0"], "train.learning_rate"),
        (["train.learning_rate=-1e-4"], "train.learning_rate"),
        (["train.learning_rate=.nan"], "train.learning_rate"),
        (["train.global_batch_size=12"], "train.global_batch_size=12 is not divisible by the data-parallel size 8"),
        (["train.global_batch_size=0"], "train.global_batch_size"),
        (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.max_steps=300", "train.warmup_steps=301"], "train.warmup_steps"),
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["data.resolution=100"], "data.resolution must be a positive multiple of 8"),
        (["data.resolution=0"], "data.resolution"),
        (["validation.resolution=60"], "validation.resolution"),
        (["validation.max_text_chunks=0"], "validation.max_text_chunks must be >= 1"),
        (["model.unet_config=huge"], "model.unet_config"),
        (["model.unet_config=[1, 2]"], "model.unet_config must be null, a mapping of UNet config keys or one of sdxl"),
        (["model.pretrained=''"], "model.pretrained: empty"),
        (["train.timestep_bias.multiplier=0"], "train.timestep_bias.multiplier"),
        (["train.timestep_bias.portion=1.5"], "train.timestep_bias.portion"),
        (["train.timestep_bias.portion=0"], "train.timestep_bias.portion"),
        (["train.timestep_bias.begin=500", "train.timestep_bias.end=400"], "train.timestep_bias.begin/end"),
        (["train.timestep_bias.end=1001"], "train.timestep_bias.begin/end"),
        (["train.ema.decay=1"], "train.ema.decay must be in (0, 1)"),
        (["train.ema.decay=0"], "train.ema.decay"),
        (["train.ema.every=0"], "train.ema.every"),
        (["train.caption_dropout=1.2"], "train.caption_dropout must be in [0, 1]"),
        (["train.caption_dropout=-0.1"], "train.caption_dropout"),
        (["train.betas=[0.9, 1.0]"], "train.betas"),
        (["train.eps=0"], "train.eps"),
        (["train.weight_decay=-1"], "train.weight_decay"),
        (["train.max_grad_norm=0"], "train.max_grad_norm"),
        (["train.snr_gamma=0"], "train.snr_gamma"),
        (["train.noise_offset=-0.1"], "train.noise_offset"),
        (["data.path=null"], "data.path is required"),
        (["data.max_pixels=0"], "data.max_pixels"),
        (["mesh.data=-1"], "only one axis may be -1"),
        (["mesh.fsdp=3"], "mesh: data=1 x fsdp=3 x tensor=1 needs 3 devices, but there are 8"),
        (["mesh.data=3"], "the fixed axes take 3, which does not divide 8"),
        (["mesh.tensor=0"], "mesh.tensor must be a positive number of devices or -1"),
        (["mesh.rules={embed: model}"], "mesh.rules.embed: unknown value 'model'; choose one of data, fsdp, tensor"),
        (["mesh.rules.heads=[tensor, 7]"], "mesh.rules.heads: unknown value 7"),
        (["checkpoint.keep=0"], "checkpoint.keep"),
        (["checkpoint.every_steps=-5"], "checkpoint.every_steps"),
        (["validation.prompts=[]"], "validation.prompts is empty"),
        (["validation.num_steps=0"], "validation.num_steps"),
        (["validation.guidance_scale=-1"], "validation.guidance_scale"),
        (["train.ema.enabled=false", "export.use_ema=true"], "export.use_ema is true but train.ema.enabled is false"),
        (["logging.every_steps=0"], "logging.every_steps"),
        (["logging.peak_tflops=0"], "logging.peak_tflops"),
        (["run_dir=''"], "run_dir"),
    ],
)
def test_invalid_values_are_named(overrides, key):
    config = demo(*overrides)  # well typed: loading succeeds
    with pytest.raises(cfg.ConfigError) as info:
        cfg.validate(config, num_devices=8)
    assert key in str(info.value)


def test_every_problem_is_reported_at_once():
    config = replaced(demo("train.learning_rate=0", "data.resolution=30"), "train.optimizer", "sgd")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.validate(config)
    message = str(info.value)
    assert "train.learning_rate" in message and "data.resolution" in message and "train.optimizer" in message


def test_batch_divisibility_counts_data_times_fsdp_not_tensor():
    hybrid = demo("mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2", "train.global_batch_size=4")
    cfg.validate(hybrid, num_devices=8)  # data 2 x fsdp 2: 4 images split 4 ways
    with pytest.raises(cfg.ConfigError, match="data-parallel size 4"):
        cfg.validate(cfg.apply_overrides(hybrid, ["train.global_batch_size=6"]), num_devices=8)


def test_fixed_mesh_is_checked_without_a_device_count():
    with pytest.raises(cfg.ConfigError, match="data-parallel size 4"):
        cfg.validate(demo("mesh.data=4", "mesh.fsdp=1", "train.global_batch_size=6"))
    cfg.validate(demo("train.global_batch_size=6"))  # fsdp=-1: unknown until the devices are known


def test_valid_edge_values_pass():
    cfg.validate(
        demo(
            "train.caption_dropout=0",
            "train.timestep_bias.strategy=range",
            "train.timestep_bias.begin=0",
            "train.timestep_bias.end=1000",
            "train.timestep_bias.portion=1",
            "train.max_steps=300",
            "train.warmup_steps=300",
            "validation.every_steps=0",
            "validation.prompts=[]",
            "export.use_ema=false",
            "train.ema.enabled=false",
            "checkpoint.keep=null",
            "model.prediction_type=v_prediction",
        ),
        num_devices=8,
    )


def test_inline_unet_config_with_a_pretrained_pipeline_is_valid():
    c = demo("model.pretrained=/models/sdxl", "model.unet_config={block_out_channels: [32, 64]}")
    cfg.validate(c, num_devices=8)


# ---------------------------------------------------------------------------------------------
# Mesh resolution.


@pytest.mark.parametrize(
    "axes, devices, shape",
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
        ({"data": 1, "fsdp": -1, "tensor": 1}, 8, (1, 8, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 1}, 8, (2, 4, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
        ({"data": 1, "fsdp": 4, "tensor": -1}, 4, (1, 4, 1)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
        ({"data": 1, "fsdp": -1, "tensor": 1}, 1, (1, 1, 1)),
        # multislice: the sizes are one slice's; the data axis runs over the slices too
        ({"data": 1, "fsdp": -1, "tensor": 1, "slices": 2}, 8, (2, 4, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 1, "slices": 2}, 16, (4, 4, 1)),
    ],
)
def test_resolve_mesh_shape(axes, devices, shape):
    resolved = sharding.resolve_mesh_shape(cfg.MeshConfig(**axes), devices)
    assert resolved == dict(zip(sharding.MESH_AXES, shape))
    assert list(resolved) == list(sharding.MESH_AXES)


@pytest.mark.parametrize(
    "axes, devices, message",
    [
        ({"data": -1, "fsdp": -1}, 8, "only one axis may be -1"),
        ({"data": 3, "fsdp": -1}, 8, "does not divide 8"),
        ({"data": 2, "fsdp": 2}, 8, "needs 4 devices, but there are 8"),
        ({"data": 0}, 8, "mesh.data must be a positive"),
        ({"fsdp": -2}, 8, "mesh.fsdp must be a positive"),
        ({}, 0, "number of devices must be positive"),
        ({"slices": 3}, 8, "mesh.slices=3 cannot split the 8 devices"),
        ({"slices": 0}, 8, "mesh.slices must be a positive"),
    ],
)
def test_resolve_mesh_shape_errors(axes, devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(cfg.MeshConfig(**axes), devices)


def test_multislice_data_axis_runs_over_slices_of_devices_in_order():
    """On one process's CPU devices (simulated chips) slice s is devices [4s, 4s + 4): the mesh is
    the data=2 layout, whose steps tests/test_train.py compares; across processes each process is a
    slice (tests/test_pods.py)."""
    multislice = sharding.make_mesh(cfg.MeshConfig(data=1, fsdp=-1, tensor=1, slices=2))
    hybrid = sharding.make_mesh(cfg.MeshConfig(data=2, fsdp=-1, tensor=1))
    assert dict(multislice.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [[d.id for d in row.reshape(-1)] for row in multislice.devices] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert (multislice.devices == hybrid.devices).all()
    with pytest.raises(cfg.ConfigError, match="data-parallel size 4"):  # 2 slices x data 2, fixed without devices
        cfg.validate(demo("mesh.slices=2", "mesh.data=2", "mesh.fsdp=1", "train.global_batch_size=6"))


# ---------------------------------------------------------------------------------------------
# Saving, immutability.


@pytest.mark.parametrize("path", RECIPES + [DEMO_CONFIG], ids=lambda p: p.name)
def test_save_load_round_trip(tmp_path, path):
    config = cfg.load(
        path,
        [
            # Strings that YAML would read as other types unless the writer quotes them.
            "validation.prompts=['1e5', 'yes', 'null', '3', 'a: b', '- x']",
            "validation.negative_prompt='1.0e3'",
            "mesh.rules={embed: fsdp, heads: [fsdp, tensor], norm: null}",
            "train.learning_rate=1.5e-7",
        ],
    )
    out = tmp_path / "run" / "config.yaml"
    cfg.save(config, out)
    again = cfg.load(out)
    assert again == config
    assert again.validation.prompts[:4] == ("1e5", "yes", "null", "3")


def test_references_to_other_keys_are_resolved_and_saved_as_values(tmp_path):
    path = write(
        tmp_path / "refs.yaml",
        r"""
        run_dir: gs://bucket/r
        checkpoint: {dir: "${run_dir}/ckpt"}
        validation: {negative_prompt: 'costs \${5}'}
        """,
    )
    c = cfg.load(path)
    assert c.checkpoint.dir == "gs://bucket/r/ckpt" and c.validation.negative_prompt == "costs ${5}"
    cfg.save(c, tmp_path / "saved.yaml")
    assert cfg.load(tmp_path / "saved.yaml") == c == cfg.apply_overrides(c, [])


def test_to_dict_is_plain_yaml_data():
    d = cfg.to_dict(cfg.apply_overrides(cfg.Config(), ["mesh.rules={embed: [fsdp]}"]))
    assert d["train"]["betas"] == [0.9, 0.999]
    assert type(d["mesh"]["rules"]) is dict and d["mesh"]["rules"]["embed"] == ["fsdp"]
    assert list(d) == [f.name for f in dataclasses.fields(cfg.Config)]


def test_configs_are_immutable_and_hashable():
    c = cfg.load(DEMO_CONFIG, ["model.unet_config={block_out_channels: [32, 64]}", "mesh.rules.embed=fsdp"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.model.unet_config["block_out_channels"] = (1,)  # type: ignore[index]
    with pytest.raises(TypeError):
        c.mesh.rules.update(heads="tensor")  # type: ignore[attr-defined]
    assert isinstance(c.model.unet_config["block_out_channels"], tuple)
    assert hash(c) == hash(cfg.load(DEMO_CONFIG, ["model.unet_config={block_out_channels: [32, 64]}", "mesh.rules.embed=fsdp"]))
    assert dataclasses.replace(c, run_dir="elsewhere").run_dir == "elsewhere" and c.run_dir == "runs/demo"
    assert pickle.loads(pickle.dumps(c)) == c
    # Tables given in Python are frozen too, so such configs can also be static jit arguments.
    built = cfg.MeshConfig(rules={"mlp": ["fsdp", "tensor"]})
    assert built.rules == {"mlp": ("fsdp", "tensor")} and hash(built) == hash(cfg.MeshConfig(rules={"mlp": ("fsdp", "tensor")}))


# ---------------------------------------------------------------------------------------------
# Users coming from the diffusers scripts; the documentation.


def test_diffusers_flag_names_point_to_real_keys():
    keys = set(cfg._all_keys(cfg.Config))
    for flag, key in cfg.DIFFUSERS_FLAGS.items():
        assert key in keys, (flag, key)


def test_a_diffusers_flag_name_is_answered_with_our_key():
    with pytest.raises(cfg.ConfigError, match="diffusers' --gradient_checkpointing is 'model.remat' here"):
        cfg.apply_overrides(cfg.Config(), ["model.gradient_checkpointing=true"])
    with pytest.raises(cfg.ConfigError, match="diffusers' --train_batch_size is 'train.global_batch_size'"):
        cfg.apply_overrides(cfg.Config(), ["train.train_batch_size=4"])


def test_every_key_and_flag_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for key in cfg._all_keys(cfg.Config):
        assert f"`{key}`" in doc, key
    for flag in cfg.DIFFUSERS_FLAGS:
        assert f"--{flag}" in doc, flag


def test_single_file_export_is_refused_for_lora_only():
    cfg.validate(cfg.load([DEMO_CONFIG], ["export.single_file=true", "export.single_file_dtype=float16"]), 8)
    lora_run = cfg.load([DEMO_CONFIG], ["export.single_file=true", "train.method=lora"])
    with pytest.raises(cfg.ConfigError, match="export.single_file: a LoRA run"):
        cfg.validate(lora_run, 8)
