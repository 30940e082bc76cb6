"""`flax-train train` on bad input: a one-line error and exit code 2, before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def flax_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flax_train.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("where", ["override", "file"])
def test_an_unknown_config_key_exits_2_with_a_suggestion(tmp_path, where):
    run_dir = tmp_path / "run"
    if where == "override":
        args = ["train", "train.learnig_rate=1e-4", f"run_dir={run_dir}"]
    else:
        config = tmp_path / "typo.yaml"
        config.write_text(f"run_dir: {run_dir}\ntrain:\n  learnig_rate: 1.0e-4\n")
        args = ["train", "--config", str(config)]

    result = flax_train(*args)

    assert result.returncode == 2, result.stderr
    assert "unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'?" in result.stderr
    if where == "file":
        assert "typo.yaml" in result.stderr  # the message names the file
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # refused before anything was written


def test_without_config_the_schema_defaults_apply(tmp_path):
    # The SDXL fine-tuning recipe, not the demo's: the config the trainer resolved and saved in the
    # run directory before it found that the (here missing) pretrained folder does not exist.
    from flax_train import config as config_lib

    run_dir = tmp_path / "run"
    result = flax_train("train", f"model.pretrained={tmp_path / 'missing'}", f"data.path={tmp_path}", f"run_dir={run_dir}")
    assert result.returncode == 2, result.stderr
    assert "missing" in result.stderr and "Traceback" not in result.stderr
    saved = config_lib.load([run_dir / "config.yaml"])
    expected = config_lib.load([], [f"model.pretrained={tmp_path / 'missing'}", f"data.path={tmp_path}", f"run_dir={run_dir}"])
    assert saved == expected
    assert saved.model.unet_config is None  # fine-tune the pretrained UNet
    assert saved.train.learning_rate == 1e-6 and saved.data.resolution == 1024 and saved.train.timestep_bias.strategy == "none"
