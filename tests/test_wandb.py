"""``logging.wandb``: a real training run logged to Weights & Biases in offline mode (no network,
no API key), stopped and resumed in the same run directory, then read back from the files W&B
wrote, with W&B's own reader of its transaction logs (``wandb leet inspect --json``); where a
``gs://`` run directory's W&B files go; and the errors a user can fix (a bad mode or tag, no API
key, no wandb package).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flax_train import config as config_lib, train
from flax_train.demo import CONFIG as DEMO_CONFIG
from flax_train.metrics import MetricsWriter
from flax_train.wandb_sink import RUN_ID_FILE
from sdxl_common import errors, storage
from train_support import STEPS, Workspace, make_config, make_workspace

pytestmark = pytest.mark.xdist_group("wandb")

FIRST_STOP = 2  # the first run stops here (a checkpoint and a validation grid); the second resumes


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("wandb"))


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """W&B in offline mode, its settings and caches in a folder of this module, not in ~, and no
    credentials: no API key, no ~/.netrc, a server that is not there."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.delenv("WANDB_API_KEY", raising=False)
        env.setenv("NETRC", str(home / "netrc"))
        env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(home / name.lower()))
        yield
    import wandb

    wandb.teardown()  # W&B's service process, which outlives a run


@dataclasses.dataclass(frozen=True)
class Segment:
    """What one run of the same W&B run wrote in offline mode."""

    folder: Path  # <run_dir>/wandb/offline-run-<start time>-<run id>
    records: list[dict]  # of its transaction log, in order

    def of_type(self, kind: str) -> list[dict]:
        return [record[kind] for record in self.records if record["type"] == kind]

    def history(self) -> list[dict]:
        return [history["item"] for history in self.of_type("history")]


@pytest.fixture(scope="module")
def resumed_run(workspace, offline) -> tuple[config_lib.Config, list[Segment]]:
    """A run stopped at step FIRST_STOP, then resumed to STEPS; a validation grid at both ends.
    Returns its config and what each of the two runs wrote to W&B, in order."""
    cfg = make_config(
        workspace,
        workspace.root / "run",
        "logging.wandb={project: sdxl-tpu-tests, name: tiny, tags: [test]}",
        f"validation.every_steps={FIRST_STOP}",
        "validation.num_steps=2",
    )
    assert train.train(cfg, max_steps=FIRST_STOP).step == FIRST_STOP
    assert train.train(cfg).step == STEPS
    folders = sorted((Path(cfg.run_dir) / "wandb").glob("offline-run-*"))  # named by their start time, then id
    return cfg, [Segment(folder, read_records(folder)) for folder in folders]


def read_records(folder: Path) -> list[dict]:
    """The records of one offline run, as W&B's own reader of its transaction logs prints them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_a_resumed_run_continues_the_same_wandb_run(resumed_run):
    cfg, segments = resumed_run
    run_id = (Path(cfg.run_dir) / RUN_ID_FILE).read_text()
    assert len(segments) == 2
    for segment in segments:
        [run] = segment.of_type("run")
        assert run["run_id"] == run_id and f"-{run_id}" in segment.folder.name
        assert (run["project"], run["display_name"], run["tags"]) == ("sdxl-tpu-tests", "tiny", ["test"])


def test_the_logged_scalars_are_the_rows_of_metrics_jsonl(resumed_run):
    cfg, segments = resumed_run
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    scalars = [{k: v for k, v in item.items() if not k.startswith("_")}  # W&B's own: _step, _runtime, ...
               for segment in segments for item in segment.history() if "validation._type" not in item]
    assert scalars == rows


def test_the_resolved_config_is_the_runs_config(resumed_run):
    cfg, segments = resumed_run
    for segment in segments:
        [run] = segment.of_type("run")
        logged = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
        assert logged == config_lib.to_dict(cfg)


def test_validation_grids_are_logged_as_images(resumed_run):
    cfg, segments = resumed_run
    for step, segment in zip((FIRST_STOP, STEPS), segments):
        [image] = [item for item in segment.history() if "validation._type" in item]
        assert image["step"] == step and image["validation._type"] == "image-file"
        with Image.open(segment.folder / "files" / image["validation.path"]) as logged, \
                Image.open(Path(cfg.run_dir) / "samples" / f"step_{step:07d}.png") as written:
            np.testing.assert_array_equal(np.asarray(logged), np.asarray(written))


def test_a_remote_run_directory_keeps_the_run_id_and_leaves_wandbs_files_on_the_host(gcs_bucket, offline, tmp_path):
    # Two runs in one gs:// run directory, as a run and its resume; no training needed for where
    # things go.
    run_dir = f"{gcs_bucket}/{tmp_path.name}/run"
    for step in (1, 2):
        writer = MetricsWriter(run_dir, start_step=step - 1, wandb=config_lib.WandbConfig(), run_config={"run_dir": run_dir})
        writer.scalars(step, {"loss": 1.0 / step})
        writer.close()
    run_id = (storage.path(run_dir) / RUN_ID_FILE).read_text()
    assert sorted(p.name for p in storage.path(run_dir).iterdir()) == ["metrics.jsonl", "tensorboard", RUN_ID_FILE]
    # Named by their start time and the run id; a second start within the same second adds "-1".
    folders = sorted((Path(os.environ["WANDB_DIR"]) / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(folders) == 2
    assert [item["loss"] for folder in folders for item in Segment(folder, read_records(folder)).history()] == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------
# Errors the user can fix, each told in one line.


def test_an_unknown_mode_is_refused_in_one_line_naming_the_modes():
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.load([DEMO_CONFIG], ["logging.wandb.mode=onlin"])
    assert str(error.value) == ("override 'logging.wandb.mode=onlin': logging.wandb.mode: unknown value 'onlin'; "
                                "choose one of online, offline, disabled; did you mean 'online'?")
    # The same from a config built in Python, which no reader checked.
    cfg = config_lib.load([DEMO_CONFIG])
    built = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb=config_lib.WandbConfig(mode="on")))
    with pytest.raises(config_lib.ConfigError, match="logging.wandb.mode: unknown value 'on'; choose one of online"):
        config_lib.validate(built)
    # Tags W&B would refuse only once the run starts, after the step is compiled.
    with pytest.raises(config_lib.ConfigError, match="logging.wandb.tags: '' has 0 characters; W&B takes 1 to 64"):
        config_lib.validate(config_lib.load([DEMO_CONFIG], ["logging.wandb.tags=['', ok]"]))


def test_online_without_an_api_key_is_refused_in_one_line(offline, tmp_path):
    with pytest.raises(errors.BadInput, match="^logging.wandb: W&B refused the run: ") as error:
        MetricsWriter(tmp_path, tensorboard=False, jsonl=False, wandb=config_lib.WandbConfig(mode="online"))
    assert "\n" not in str(error.value)


def test_without_the_wandb_package_a_run_stops_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    # None in sys.modules fails `import wandb`: it stands in for an environment installed without
    # the [wandb] extra.
    monkeypatch.setitem(sys.modules, "wandb", None)
    never_read = Workspace(tmp_path, tmp_path / "base", tmp_path / "cache")  # the run stops before
    cfg = make_config(never_read, tmp_path / "run", "logging.wandb.project=p")
    with pytest.raises(errors.BadInput) as error:
        train.train(cfg)
    assert errors.report("flax-train train", error.value) == errors.EXIT_USER_ERROR
    assert capsys.readouterr().err == (
        "flax-train train: error: logging.wandb is set but the wandb package is not installed: "
        "pip install 'sdxl-tpu[wandb]' (or set logging.wandb: null)\n")
    assert not (tmp_path / "run").exists()  # nothing was written, let alone compiled
