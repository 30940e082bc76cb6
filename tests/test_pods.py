"""The pod path, through the CLIs: a run directory on Cloud Storage (a local emulator of its API),
and training as 2 processes x 2 devices joined by jax.distributed, as every worker of a TPU pod
slice runs it, against the same run on 1 process x 8 devices."""

from __future__ import annotations

import json
import signal

import jax
import numpy as np
from PIL import Image
import pytest
from flax import nnx

from flax_train import config as config_lib, models, train
from flax_train.demo import CONFIG as DEMO_CONFIG
from train_support import (
    REPO,
    Processes,
    Workspace,
    assert_trees_equal,
    checkpoint_steps,
    flip_bytes_in_the_largest_file,
    host,
    make_config,
    make_workspace,
    overrides,
    run_cli,
    run_script_in_processes,
)

pytestmark = pytest.mark.xdist_group("pods")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("pods"))


# The runs below are compared with this one: 1 process x 8 devices, in this process, a checkpoint
# every 2 steps. The learning rate is constant, so how many steps a run is told to take does not
# change its steps.
REFERENCE_STEPS = 12


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> tuple[config_lib.Config, train.TrainResult]:
    cfg = make_config(workspace, tmp_path_factory.mktemp("reference") / "run", f"train.max_steps={REFERENCE_STEPS}",
                      "checkpoint.every_steps=2", "checkpoint.keep=100")
    return cfg, train.train(cfg)


def test_a_run_directory_on_cloud_storage(workspace, reference, gcs_bucket, tmp_path):
    """prepare -> train with checkpoints -> stop -> resume -> export -> xla-infer (its prompt file
    too), all through the CLIs with every path in a bucket of a real Cloud Storage API (the emulator)."""
    from etils import epath

    run_dir = f"{gcs_bucket}/runs/{tmp_path.name}"
    args = ["--config", str(DEMO_CONFIG), *overrides(workspace, run_dir, "data.cache_dir=null")]
    run_cli("prepare", *args, cwd=tmp_path)
    first = run_cli("train", *args, "--max-steps", "2", cwd=tmp_path)
    assert "trained to step 2" in first
    second = run_cli("train", *args, "validation.every_steps=4", "validation.num_steps=2", "export.at_end=true",
                     "logging.tensorboard=true", cwd=tmp_path)
    assert "trained to step 4" in second and f"{run_dir}/export" in second

    reference_cfg, reference_run = reference  # the same run on local disk

    run = epath.Path(run_dir)
    assert (run / "config.yaml").exists() and (run / "cache" / "manifest.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # the resumed run continued the file
    assert [row["loss"] for row in rows] == reference_run.losses[:4]
    assert list((run / "tensorboard").iterdir())
    assert [p.name for p in (run / "samples").iterdir()] == ["step_0000004.png"]
    assert (run / "export" / "model_index.json").exists() and (run / "export" / "unet" / "config.json").exists()
    # The checkpoint went through tensorstore's gs:// driver and back unchanged.
    _, state = train.restore_checkpoint(config_lib.load([DEMO_CONFIG], overrides(workspace, run_dir)))
    _, local = train.restore_checkpoint(reference_cfg, step=4)
    assert_trees_equal(state, local)

    (run / "prompts.txt").write_text("a red circle on a blue background\n")
    run_cli("--model", f"{run_dir}/export", "--prompts", f"{run_dir}/prompts.txt", "--steps", "2",
            "--out", f"{run_dir}/images", cwd=tmp_path, module="xla_infer.cli")
    assert sorted(p.name for p in (run / "images").iterdir()) == ["00000.png", "manifest.json"]
    # pathlib would have turned gs://b/x into a local folder gs:/b/x.
    assert not (tmp_path / "gs:").exists() and not (REPO / "gs:").exists()


def test_two_processes_train_what_one_does_and_survive_sigterm_and_a_damaged_checkpoint(workspace, reference, tmp_path):
    """2 processes x 2 devices through the CLI: SIGTERM to one process stops both at the same step
    with a checkpoint; with that checkpoint damaged on disk both set it aside and resume from the
    one before; the resumed run ends with the parameters of an uninterrupted 1 process x 8 devices
    run; validation images, the export at the end and sampling work across processes. (kill -9 at
    any moment, then a bit-exact resume: tests/test_faults.py, in one process.)"""
    run_dir = tmp_path / "run"
    args = ["--config", str(DEMO_CONFIG), *overrides(workspace, run_dir, "train.max_steps=100000", "checkpoint.every_steps=2")]

    # SIGTERM reaches process 1 only (a preemption notice on one host), after a first checkpoint.
    first = Processes(tmp_path, "first", "train", *args)
    first.wait_until(lambda: checkpoint_steps(run_dir), "checkpoint")
    first.procs[1].send_signal(signal.SIGTERM)
    outputs = first.wait()
    stops = [int(out.split("stopped at step ")[1].split()[0]) for out in outputs]
    saved = checkpoint_steps(run_dir)
    assert stops[0] == stops[1] and saved[-1] == stops[0] and len(saved) >= 2, (saved, outputs)

    # The newest checkpoint damaged on disk: both processes set it aside, resume from the one
    # before and redo the steps after it.
    flip_bytes_in_the_largest_file(run_dir / "checkpoints" / str(stops[0]))
    end = stops[0] + 2 + stops[0] % 2  # even: step end - 2 has a periodic checkpoint to compare with
    assert end <= REFERENCE_STEPS, stops
    resumed = Processes(tmp_path, "resumed", "train", *args, f"train.max_steps={end}", "export.at_end=true",
                        "validation.every_steps=1000", "validation.num_steps=2")  # validates at the last step
    outputs = resumed.wait()
    assert all(f"trained to step {end}" in out and "cannot be restored" in out for out in outputs), outputs
    assert [p.name.split("-")[0] for p in (run_dir / "checkpoints" / "damaged").iterdir()] == [str(stops[0])]
    assert (run_dir / "samples" / f"step_{end:07d}.png").is_file()  # written once, by process 0

    # The same run on 1 process x 8 devices. Every step trains the same samples with the same noise
    # (the step-1 losses agree to the last bit or one), but the 2-process run sums the devices'
    # partial gradients and losses across processes with gloo, in another order than the in-process
    # all-reduce. Float addition is not associative, so the runs differ by rounding, which Adam
    # amplifies where a gradient is near zero (it divides by the gradient's size). So: integers
    # (step, RNG key) equal, and every float array (weights, EMA, optimizer moments) closer to the
    # reference than 1% of what the last two training steps changed in it (measured: at most 0.15%
    # after 6 steps, the median array 0.02%).
    reference_cfg, reference_run = reference
    _, expected = train.restore_checkpoint(reference_cfg, step=end)
    multi_cfg = config_lib.load([DEMO_CONFIG], overrides(workspace, run_dir))
    _, state = train.restore_checkpoint(multi_cfg, step=end)
    _, earlier = train.restore_checkpoint(multi_cfg, step=end - 2)
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    for got, want, before in zip(*(jax.tree.leaves(host(tree)) for tree in (state, expected, earlier))):
        if np.issubdtype(want.dtype, np.floating):
            assert np.linalg.norm(got - want) <= 0.01 * np.linalg.norm(before - want)
        else:
            np.testing.assert_array_equal(got, want)
    rows = {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert abs(rows[1]["loss"] - reference_run.losses[0]) <= 2 * np.spacing(np.float32(reference_run.losses[0]))

    exported = models.load(run_dir / "export", subfolder="unet")
    assert_trees_equal(nnx.state(exported, nnx.Param), state.ema)  # gathered from both processes
    Processes(tmp_path, "sample", "sample", "--model", str(run_dir / "export"), "--prompt", "a red circle",
              "--steps", "2", "--out", str(tmp_path / "samples")).wait()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["0000.png"]
    with Image.open(tmp_path / "samples" / "0000.png") as png:  # the settings, as xla-infer writes them
        assert png.text["prompt"] == "a red circle" and "\nSteps: 2, Sampler: Euler, CFG scale: " in png.text["parameters"]


SLICES_WORKER = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flax_train import config, sharding
sharding.initialize_distributed()
mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=-1, tensor=1, slices=2))
processes = [sorted({d.process_index for d in row.reshape(-1)}) for row in mesh.devices]
# each process contributes one row of the batch; a sum over the data axis crosses the slices
rows = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.full((1, 2), jax.process_index() + 1.0))
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(rows)
print("MESH", dict(mesh.shape), processes, float(total))
"""


def test_two_processes_as_two_slices_split_the_data_axis_between_them(tmp_path):
    """mesh.slices=2 over 2 processes x 2 devices: where devices do not know their TPU slice, each
    process is one (JAX's hybrid mesh with processes as granules), as each slice of a multislice
    pod is its own set of hosts; the data axis runs across them, fsdp within each."""
    outputs = run_script_in_processes(tmp_path, SLICES_WORKER)
    for out in outputs:
        assert "MESH {'data': 2, 'fsdp': 2, 'tensor': 1} [[0], [1]] 6.0" in out, out
