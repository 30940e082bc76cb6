"""Only the user's input is "exit 2 with one line"; a bug shows its traceback and asks for a report."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from flax_train import config as config_lib
from sdxl_common.errors import BUG_HINT, UserError

REPO = Path(__file__).resolve().parents[1]


def flax_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flax_train.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], result.stderr


@pytest.mark.parametrize("case", ["broken_yaml", "wrong_type", "missing_pretrained"])
def test_config_mistakes_exit_2_with_one_line(tmp_path, case):
    config = tmp_path / "c.yaml"
    if case == "broken_yaml":
        config.write_text("train:\n  learning_rate: [1, 2\n")
        result, names = flax_train("prepare", "--config", str(config)), ("c.yaml", "not valid YAML")
    elif case == "wrong_type":
        config.write_text("train:\n  learning_rate: fast\n")
        result, names = flax_train("prepare", "--config", str(config)), ("c.yaml", "train.learning_rate")
    else:
        missing = tmp_path / "no-model"
        result = flax_train("prepare", f"model.pretrained={missing}", f"data.path={tmp_path}", f"run_dir={tmp_path}/r")
        names = (str(missing),)
    assert_one_line_error(result, *names)


def test_sample_with_a_non_utf8_prompt_file_exits_2(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe caf\xe9\n")
    # The prompt file is read before the model, so no model folder is needed to reach the error.
    result = flax_train("sample", "--model", str(tmp_path / "model"), "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "prompts.txt:2", "not UTF-8")


@pytest.mark.parametrize("spec, message", [("style.safetensors:strong", "the scale after ':' must be a number"),
                                           ("absent.safetensors:0.5", "no such LoRA file")])
def test_sample_with_a_bad_lora_exits_2_before_loading_the_model(tmp_path, spec, message):
    result = flax_train("sample", "--model", str(tmp_path / "model"), "--prompt", "a red circle",
                        "--lora", str(tmp_path / spec), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, message)


class _Marker:
    """Unpickling this creates a file: the proof that a pickle was run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_named_as_safetensors_is_refused_and_never_unpickled(tmp_path):
    from flax_train.models.weights import SafetensorsReader, WeightsError

    marker = tmp_path / "unpickled"
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(pickle.dumps({"weight": _Marker(str(marker))}))
    with pytest.raises(WeightsError) as info:
        SafetensorsReader([weights])
    assert str(weights) in str(info.value) and "not a safetensors file" in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_malformed_json_in_a_model_folder_names_the_file(tmp_path, text):
    from sdxl_common import sdxl
    from sdxl_common.errors import BadInput

    scheduler = tmp_path / "scheduler"
    scheduler.mkdir()
    (scheduler / "scheduler_config.json").write_bytes(text.encode("latin-1"))
    (tmp_path / "model_index.json").write_bytes(text.encode("latin-1"))
    for read in (sdxl.scheduler_config, sdxl.force_zeros_for_empty_prompt):
        with pytest.raises(BadInput, match=r"\.json: ") as info:
            read(tmp_path)
        assert "\n" not in str(info.value)


def test_a_bug_raising_valueerror_shows_its_traceback_and_exits_1(tmp_path):
    code = (
        "import sys, flax_train.cli as c, flax_train.train as t\n"
        "def broken(*a, **k):\n"
        "    raise ValueError('boom')\n"
        "t.train = broken\n"
        f"sys.exit(c.main(['train', 'run_dir={tmp_path}/run']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "ValueError: boom" in result.stderr
    assert BUG_HINT in result.stderr


def test_report_sorts_user_errors_run_failures_and_bugs(capsys):
    from sdxl_common.errors import BadInput, InputNotFound, RunFailure, report

    assert report("p c", BadInput("bad value")) == 2
    assert report("p c", InputNotFound("x: missing")) == 2
    assert report("p c", RunFailure("disk full")) == 1
    assert capsys.readouterr().err == "p c: error: bad value\np c: error: x: missing\n\np c: error: disk full\n"
    try:
        raise KeyError("internal")
    except KeyError as error:
        assert report("p c", error) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'internal'" in err and BUG_HINT in err


# ---------------------------------------------------------------------------------------------
# Fuzzing: whatever the user writes, the library answers with a UserError, never another error.

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _schema_keys() -> list[str]:
    return config_lib._all_keys(config_lib.Config)


KEYS = st.sampled_from(_schema_keys() + ["base", "train", "data", "mesh.rules", "model.unet_config"]) | st.text(max_size=12)
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
)


def _nested(tree: dict) -> dict:
    """Dotted schema keys as nested sections, as a config file writes them."""
    out: dict = {}
    for key, value in tree.items():
        node = out
        *parents, last = str(key).split(".") if key else [""]
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    return out


def _check(load) -> None:
    try:
        cfg = load()
        config_lib.validate(cfg, 8)
    except config_lib.ConfigError:
        pass


@FUZZ
@given(document=st.dictionaries(KEYS, VALUES, max_size=6).map(_nested) | VALUES)
def test_fuzz_yaml_config_files(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    _check(lambda: config_lib.load([path]))


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_config_files_that_may_not_be_yaml(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _check(lambda: config_lib.load([path]))


OVERRIDE_VALUES = st.text(max_size=30) | VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())


@FUZZ
@given(overrides=st.lists(st.tuples(KEYS, st.sampled_from(["=", ""]), OVERRIDE_VALUES).map("".join), max_size=4))
def test_fuzz_overrides(overrides):
    _check(lambda: config_lib.load([], overrides))


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_fuzz_prompt_files(tmp_path_factory, data):
    from sdxl_common.prompts import read_prompt_file, read_sized_prompt_file  # what the command lines read

    path = tmp_path_factory.mktemp("fuzz") / "prompts.txt"
    path.write_bytes(data)
    try:
        prompts = read_prompt_file(path)
    except UserError:
        return
    assert prompts and all(isinstance(p, str) and p for p in prompts)
    try:
        sized = read_sized_prompt_file(path)
    except UserError:
        return
    assert len(sized) == len(prompts) and all(p for p, _ in sized)
    assert all(size is None or min(size) > 0 for _, size in sized) and len({s is None for _, s in sized}) == 1
