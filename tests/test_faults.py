"""What a preemptible TPU fleet does to a run, done to the CLI on the tiny workspace: kill -9 at
random moments (during asynchronous checkpoint writes too), damaged checkpoints, a checkpoint that
cannot be written, SIGTERM while starting, and output paths that cannot be written."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flax_train import checkpoint, train
from flax_train.data import prepare
from flax_train.data.cache import LatentCache, shard_path
from flax_train.demo import CONFIG as DEMO_CONFIG
from flax_train.demo import synthetic
from train_support import (
    REPO,
    Workspace,
    assert_trees_equal,
    checkpoint_steps,
    cli_env,
    flip_bytes_in_the_largest_file,
    host,
    make_config,
    make_workspace,
    overrides,
)

pytestmark = pytest.mark.xdist_group("faults")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("faults"))


def start_train(workspace: Workspace, run_dir: Path, log: Path, *extra: str, file_limit_kib: int = 0) -> subprocess.Popen:
    """`flax-train train` in the background. ``file_limit_kib``: its files cannot grow past that, so
    writes fail as on a full disk (EFBIG rather than ENOSPC; a size-limited file system would need
    root to mount)."""
    command = [sys.executable, "-m", "flax_train.cli", "train", "--config", str(DEMO_CONFIG),
               *overrides(workspace, run_dir, *extra)]
    if file_limit_kib:  # the shell ignores SIGXFSZ (inherited) so a write fails instead of killing
        command = ["bash", "-c", f"trap '' XFSZ; ulimit -f {file_limit_kib}; exec \"$@\"", "bash", *command]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, condition, what: str, log: Path, timeout: float = 300) -> bool:
    """True once ``condition()`` holds; False if the process exited first (0 only)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-3000:]
            return False
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)
    return True


def kill_9_after(command: list[str], log: Path, condition, what: str, delay_s: float) -> None:
    """Runs ``command`` and kills it (SIGKILL) ``delay_s`` seconds after ``condition()`` first holds."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(proc, condition, what, log), f"finished before {what} could be interrupted"
        time.sleep(delay_s)
    finally:
        proc.kill()
        proc.wait()


def unfinished(run_dir: Path) -> set[str]:
    """Checkpoints being written, or left half-written by a kill (orbax writes into a temporary folder)."""
    folder = run_dir / "checkpoints"
    return {p.name for p in folder.iterdir() if "tmp" in p.name} if folder.exists() else set()


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_at_random_moments_then_resume_is_bit_exact(workspace, eight_steps, eight_steps_states, tmp_path):
    uninterrupted, extra = eight_steps  # asynchronous saves (the default) at steps 2, 4, 6, 8
    steps = 8
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    kills, during_save = 0, 0
    while kills < 2:
        log = tmp_path / f"run{kills}.log"
        proc = start_train(workspace, run_dir, log, *extra)
        try:
            before, stale = (checkpoint_steps(run_dir) or [0])[-1], unfinished(run_dir)
            # Alternate: kill while a checkpoint is being written, or a random moment after a new one.
            if kills % 2 == 0:
                alive = wait_for(proc, lambda: unfinished(run_dir) - stale, "checkpoint write", log)
            else:
                alive = wait_for(proc, lambda: (checkpoint_steps(run_dir) or [0])[-1] > before, "checkpoint", log)
                time.sleep(rng.uniform(0, 0.5))
            if not alive:
                break  # finished before the kill: only possible if the steps ran out
            during_save += bool(unfinished(run_dir) - stale)
            proc.kill()
            proc.wait()
            kills += 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if before:
            assert f"resumed from the checkpoint of step {before}" in log.read_text()
    assert kills == 2 and during_save >= 1, (kills, during_save)

    final = start_train(workspace, run_dir, tmp_path / "final.log", *extra)
    assert final.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert [row["step"] for row in metric_rows(run_dir)] == list(range(1, steps + 1))  # one row per step

    _, resumed = train.restore_checkpoint(make_config(workspace, run_dir, *extra))
    assert_trees_equal(resumed, eight_steps_states[8])  # parameters, optimizer state, EMA, step, RNG key


def _delete_a_file(checkpoint: Path) -> None:
    next(p for p in sorted(checkpoint.rglob("*")) if p.is_file() and "state" in p.parts).unlink()


def _truncate_the_largest_file(checkpoint: Path) -> None:
    largest = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def _empty_the_metadata(checkpoint: Path) -> None:
    for p in checkpoint.rglob("*metadata*"):
        if p.is_file():
            p.write_bytes(b"")


@pytest.fixture(scope="module")
def eight_steps(workspace, tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    """An uninterrupted run of 8 steps with checkpoints at 2, 4, 6 and 8, and its config."""
    extra = ("train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep=10")
    run_dir = tmp_path_factory.mktemp("eight") / "run"
    train.train(make_config(workspace, run_dir, *extra))
    return run_dir, extra


@pytest.fixture(scope="module")
def eight_steps_states(workspace, eight_steps) -> dict[int, Any]:
    """That run's states at steps 4 and 8 (host copies), restored once for every test comparing with them."""
    run_dir, extra = eight_steps
    cfg = make_config(workspace, run_dir, *extra)
    return {step: host(train.restore_checkpoint(cfg, step=step)[1]) for step in (4, 8)}


def stopped_at_6(eight_steps, tmp_path: Path) -> tuple[Path, Path, tuple[str, ...]]:
    """A copy of that run as a run stopped after step 6 leaves it."""
    source, extra = eight_steps
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "8")
    return source, run_dir, extra


@pytest.mark.parametrize(
    "damage", [_delete_a_file, _truncate_the_largest_file, flip_bytes_in_the_largest_file, _empty_the_metadata]
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_restores(
    workspace, eight_steps, eight_steps_states, tmp_path, damage, caplog
):
    _, run_dir, extra = stopped_at_6(eight_steps, tmp_path)
    damage(run_dir / "checkpoints" / "6")

    _, state = train.restore_checkpoint(make_config(workspace, run_dir, *extra))

    assert_trees_equal(state, eight_steps_states[4])
    assert f"checkpoint {run_dir / 'checkpoints' / '6'} cannot be restored" in caplog.text
    damaged = list((run_dir / "checkpoints" / "damaged").iterdir())
    assert len(damaged) == 1 and damaged[0].name.startswith("6-")  # kept, for whoever wants to look
    assert checkpoint_steps(run_dir) == [2, 4]


def test_a_checksum_changes_with_any_one_element_and_not_with_the_sharding():
    mesh = jax.make_mesh((8,), ("x",))
    values = {
        "float32": jnp.linspace(-3, 3, 64, dtype=jnp.float32).reshape(8, 8),
        "bfloat16": jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16).reshape(8, 8),
        "int32": jnp.arange(64, dtype=jnp.int32).reshape(8, 8),
        "key": jax.random.key(0),
    }
    sums = checkpoint.checksums(values, {"epoch": 1})
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("x") if v.ndim else P())) for k, v in values.items()}
    assert checkpoint.checksums(sharded, {"epoch": 1}) == sums
    assert checkpoint.checksums(values, {"epoch": 2})["data"] != sums["data"]
    for name in ("float32", "bfloat16", "int32"):
        for index in [(0, 0), (3, 5), (7, 7)]:
            changed = dict(values, **{name: values[name].at[index].set(values[name][index] + 1)})
            assert checkpoint.checksums(changed, {"epoch": 1})[f"['{name}']"] != sums[f"['{name}']"], (name, index)
        swapped = dict(values, **{name: values[name][::-1]})  # same elements, other places
        assert checkpoint.checksums(swapped, {"epoch": 1})[f"['{name}']"] != sums[f"['{name}']"]
    other_key = dict(values, key=jax.random.key(1))
    assert checkpoint.checksums(other_key, {"epoch": 1})["['key']"] != sums["['key']"]


def test_training_goes_on_past_a_damaged_checkpoint(workspace, eight_steps, eight_steps_states, tmp_path):
    _, run_dir, extra = stopped_at_6(eight_steps, tmp_path)
    _truncate_the_largest_file(run_dir / "checkpoints" / "6")

    result = train.train(make_config(workspace, run_dir, *extra))

    assert result.step == 8 and len(result.losses) == 4  # steps 5 to 8: resumed from step 4
    assert checkpoint_steps(run_dir) == [2, 4, 6, 8]  # step 6 saved again, the damaged one set aside
    _, resumed = train.restore_checkpoint(make_config(workspace, run_dir, *extra))
    assert_trees_equal(resumed, eight_steps_states[8])


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(workspace, eight_steps, tmp_path):
    _, run_dir, _ = stopped_at_6(eight_steps, tmp_path)
    extra = ("train.max_steps=40", "checkpoint.every_steps=2", "checkpoint.async_save=true")
    largest = max(p.stat().st_size for p in (run_dir / "checkpoints" / "6").rglob("*") if p.is_file())

    log = tmp_path / "full.log"
    proc = start_train(workspace, run_dir, log, *extra, file_limit_kib=largest // 8 // 1024)
    assert proc.wait(timeout=600) == 1, log.read_text()[-3000:]
    text = log.read_text()
    # orbax and tensorstore print the failure on their own threads too; ours is one line, not a bug report.
    ours = [line for line in text.splitlines() if line.startswith("flax-train train:")]
    assert len(ours) == 1 and ours[0].startswith(f"flax-train train: error: a checkpoint could not be written to {run_dir}")
    assert "bug in sdxl-tpu" not in text
    # orbax's own log records of it are kept to a line each, without their tracebacks.
    assert "site-packages/orbax" not in text, text[-3000:]
    # It stopped at the failed save (step 8), not steps later; checkpoint 6 is intact and resumes.
    assert max(row["step"] for row in metric_rows(run_dir)) <= 10
    assert checkpoint_steps(run_dir)[-1] == 6
    result = train.train(make_config(workspace, run_dir, *extra), max_steps=8)
    assert result.step == 8 and len(result.losses) == 2


def test_sigterm_while_starting_exits_0_with_a_message(workspace, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "start.log"
    proc = start_train(workspace, run_dir, log)
    try:
        assert wait_for(proc, lambda: "mesh {" in log.read_text(), "start-up", log)
        proc.send_signal(signal.SIGTERM)  # while the pipeline loads and the step compiles
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "stopped at step" in text and "on SIGTERM" in text, text[-2000:]


def test_a_save_longer_than_the_sigterm_grace_period_is_abandoned(workspace, eight_steps, tmp_path):
    _, run_dir, _ = stopped_at_6(eight_steps, tmp_path)
    extra = ("train.max_steps=100000", "checkpoint.every_steps=0", "checkpoint.sigterm_grace_s=0.2")
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink()  # so that its first row is a step of this run
    log = tmp_path / "grace.log"
    proc = start_train(workspace, run_dir, log, *extra)
    try:
        assert wait_for(proc, lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, "a new step", log)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert proc.wait(timeout=60) == 1, log.read_text()[-3000:]
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    # A step and a checkpoint of the demo UNet take longer than 0.2 s on this machine.
    assert waited < 5, waited
    assert "took longer than checkpoint.sigterm_grace_s=0.2 s" in log.read_text()
    assert checkpoint_steps(run_dir) == [2, 4, 6]
    _, state = train.restore_checkpoint(make_config(workspace, run_dir, *extra))
    assert int(state.step) == 6


def test_prepare_killed_several_times_resumes_and_ends_with_the_same_cache(workspace, tmp_path):
    data = synthetic.write_synthetic_dataset(tmp_path / "data", 96, image_size=64, seed=1)
    settings = (f"data.path={data}", "data.resolution=64", "data.cache_shard_size=8")  # 12 cache files
    cache_dir = tmp_path / "cache"
    command = [sys.executable, "-m", "flax_train.cli", "prepare", "--config", str(DEMO_CONFIG),
               *overrides(workspace, tmp_path / "run", *settings, f"data.cache_dir={cache_dir}")]

    def shards() -> set[str]:
        folder = shard_path(cache_dir, 0).parent
        return {p.name for p in folder.iterdir() if p.name.endswith(".safetensors")} if folder.exists() else set()

    rng = random.Random(1)
    kept = []
    for attempt in range(3):
        log = tmp_path / f"prepare{attempt}.log"
        before = shards()
        kill_9_after(command, log, lambda: len(shards()) > len(before), "a new cache file", rng.uniform(0, 0.05))
        kept.append(len(shards()))
    assert 3 <= kept[-1] < 12, kept

    final = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"{12 - kept[-1]} shards written, {kept[-1]} kept from an earlier run" in final.stdout, final.stdout

    reference = tmp_path / "reference"
    prepare.open_cache(make_config(workspace, tmp_path / "run", *settings, f"data.cache_dir={reference}"), workspace.base)
    resumed, expected = LatentCache(cache_dir), LatentCache(reference)
    assert resumed.manifest["shards"] == expected.manifest["shards"] and len(resumed) == len(expected) == 96
    for i in range(len(expected)):
        assert resumed.caption(i) == expected.caption(i)
        for name, value in expected[i].items():
            np.testing.assert_array_equal(resumed[i][name], value, err_msg=f"sample {i} {name}")


def test_xla_infer_killed_while_writing_leaves_only_whole_pngs(workspace, tmp_path):
    from PIL import Image

    out = tmp_path / "images"
    command = [sys.executable, "-m", "xla_infer.cli", "--model", str(workspace.base), "--prompt", "a red circle",
               "--num-images", "200", "--batch-size", "1", "--steps", "1", "--device", "cpu", "--dtype", "fp32",
               "--out", str(out)]
    rng = random.Random(2)
    for attempt in range(2):
        log = tmp_path / f"infer{attempt}.log"
        kill_9_after(command, log, lambda: len(list(out.glob("*.png"))) > 3, "images", rng.uniform(0, 0.1))
        pngs = sorted(out.glob("*.png"))
        assert 3 < len(pngs) < 200
        for png in pngs:  # an image under its final name is whole: temporary names are renamed when complete
            with Image.open(png) as image:
                image.load()
                assert image.size == (16, 16), png
        assert not (out / "manifest.json").exists()  # written once all images are


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("module", ["flax_train.cli", "xla_infer.cli"])
def test_an_unusable_output_folder_is_refused_before_the_model_is_read(tmp_path, module):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    command = ["sample"] if module == "flax_train.cli" else []
    # The model does not exist either: the output is checked first, so that is what is reported.
    result = run_cli(module, *command, "--model", str(tmp_path / "no-model"), "--prompt", "a red circle",
                     "--out", str(taken))
    assert result.returncode == 2, result.stderr
    assert f"{taken}: cannot write there" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 300


def test_export_without_a_checkpoint_says_so_before_reading_the_model(tmp_path):
    result = run_cli("flax_train.cli", "export", f"model.pretrained={tmp_path / 'no-model'}",
                     f"run_dir={tmp_path / 'never-trained'}")
    assert result.returncode == 2, result.stderr
    assert f"no checkpoint in {tmp_path / 'never-trained' / 'checkpoints'}" in result.stderr
    assert "Traceback" not in result.stderr
