"""The benchmark scripts run as documented (their --quick modes) and write what they promise.
Nothing here measures speed: the figures come from running the scripts, on the device they name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("benchmarks")


def test_train_throughput_quick_times_ours_and_the_diffusers_step(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "train_throughput_tiny_cpu_quick.json").read_text())
    assert report["device"].endswith("(cpu)")
    ours, diffusers = report["results"]
    assert ours["layout"] == "fsdp" and diffusers["layout"].startswith("diffusers torch eager")
    assert ours["images_per_s"] > 0 and diffusers["images_per_s"] > 0
    assert report["ours_vs_diffusers_images_per_s"] == pytest.approx(ours["images_per_s"] / diffusers["images_per_s"], rel=1e-2)
    assert "ours (best layout) / diffusers" in result.stdout


def test_infer_latency_quick_runs_every_runner_once_compiled(tmp_path):
    out = tmp_path / "infer.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.infer_latency", "--quick", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {run["device"]: run for run in report["runs"]}
    assert list(runs) == ["xla", "cpu", "diffusers", "jax"]
    for name, run in runs.items():
        assert run["images_per_second_median"] > 0 and run["warmup_seconds"] > 0, name
        assert run.get("compilations_after_warmup", 0) == 0, name  # new prompts and seeds, no new graph
    assert runs["xla"]["compilations_in_warmup"] >= 1 and runs["jax"]["compilations_in_warmup"] == 1
    assert report["runs"][0]["images_per_second_ratio_to_first"] == 1


def test_a_tpu_estimate_fitted_from_shallower_compiles_is_labelled_extrapolated():
    from benchmarks.tpu_aot import extrapolate

    shallow = [{"scenario": "s", "depth": d, "status": "compiled", "unet_params": 100 + 10 * d, "temp_gib": 1.0 + d,
                "compile_s": 5.0} for d in (1, 2)]
    row = extrapolate(shallow, depth=10)
    assert row["status"] == "extrapolated" and row["method"] == "extrapolated from depths 1, 2"
    assert row["unet_params"] == 200 and row["temp_gib"] == 11.0
