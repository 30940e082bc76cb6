"""xla_infer.Pipeline on a torch_xla device (PJRT CPU here): parity with diffusers, compiled once.

Compiling the tiny UNet's step graph takes tens of seconds on a CPU, so one warmed-up pipeline is
shared by the module (xdist group "xla" keeps these tests in one worker, where later pipelines
of the same shapes also hit the in-memory compilation cache for the text-encode and decode graphs).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_train.demo.tiny import save_tiny_pipeline
from test_xla_pipeline import diffusers_images
from xla_infer import SCHEDULER_NAMES, Pipeline, RecompilationError
from xla_infer.checks import InputError

pytestmark = pytest.mark.xdist_group("xla")

PROMPTS = ["a red circle", "a blue square on a green background"]
NEGATIVES = [None, "blurry"]
SEEDS = [5, 9]
STEPS = 2
# A smaller UNet than the default tiny one (one resnet per level, one transformer layer) keeps each
# step-graph compilation short; the structure is still SDXL's.
SMALL = dict(layers_per_block=1, transformer_layers_per_block=(1, 1))
# XLA's CPU kernels differ from ATen's in summation order; fp32 results agree to ~1e-6.
ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xla_device") / "sdxl", seed=0, **SMALL)


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


def load(folder, **kwargs):
    options = dict(device="xla", dtype="fp32", batch_size=2, steps=STEPS, scheduler="euler")
    return Pipeline.from_pretrained(folder, **{**options, **kwargs})


@pytest.fixture(scope="module")
def xla_pipe(folder):
    pipe = load(folder)
    pipe.warmup()
    return pipe


def test_warmup_compiles_exactly_the_three_graphs(xla_pipe):
    assert xla_pipe.device.type == "xla"
    assert xla_pipe.warmed_up == {"generation"} and xla_pipe.compile_count == 3  # text encode, denoise step, decode
    assert xla_pipe.compile_seconds > 0


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_matches_diffusers_for_each_scheduler(folder, reference, xla_pipe, scheduler):
    pipe = xla_pipe if scheduler == "euler" else load(folder, scheduler=scheduler)
    got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np")
    expected = diffusers_images(reference, pipe, PROMPTS, NEGATIVES, SEEDS)
    assert expected.std() > 0.01
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    # The other schedulers only add their own step graph: encode and decode come from the cache.
    assert pipe.compile_count == (3 if pipe is xla_pipe else 1)


def varied_prompts() -> list[str]:
    prompts = [
        "", "a", "red", "a red circle", "a blue square on a green background", "two yellow stars, top left",
        "ünïcødé prompt: café crème brûlée", "日本語のプロンプト", "emoji 😀🎨 and symbols #$%&", "ŁÓDŹ żółć",
        "a " + "very " * 40 + "long prompt",  # over 77 tokens: truncated, same shape
        " ".join(["circle square triangle"] * 30),  # far over 77 tokens
        "tab\tand\nnewline", "UPPER CASE WORDS", "1234567890", "a photo of a cat", "a painting of a dog",
        "a drawing of a house near the sea", "sketch", "high quality detailed render of a pink heart",
        "Привет мир", "مرحبا بالعالم",
    ]
    assert len(set(prompts)) == len(prompts) >= 20
    return prompts


def test_no_new_compilation_for_any_prompt_seed_or_negative(xla_pipe, caplog):
    import torch_xla.debug.metrics as metrics

    prompts = varied_prompts()
    before = xla_pipe.compile_count
    fetches_before = (metrics.metric_data("TransferFromDeviceTime") or (0,))[0]
    # Negative prompts: absent, present, mixed per row; many seeds; other guidance and micro-conditioning.
    xla_pipe(prompts, seeds=1000)
    xla_pipe(prompts, negative_prompts=list(reversed(prompts)), seeds=list(range(50, 50 + len(prompts))),
             guidance_scale=9.0)
    xla_pipe(prompts[:5], negative_prompts=["blurry", None, "", None, "日本語"], seeds=[7, 7, 8, 8, 9],
             guidance_scale=1.0, original_size=(1024, 768), crops_coords_top_left=(16, 0), target_size=(64, 64),
             negative_original_size=(512, 512), negative_target_size=(64, 64))
    assert xla_pipe.compile_count == before
    # The only device-to-host reads are the finished images, one per batch: nothing inside the loop.
    batches = 2 * -(-len(prompts) // xla_pipe.batch_size) + 3
    assert (metrics.metric_data("TransferFromDeviceTime") or (0,))[0] - fetches_before == batches
    assert metrics.executed_fallback_ops() == []  # no op fell back to the CPU (a hidden host round trip)
    assert any("were dropped" in r.getMessage() for r in caplog.records)


def test_cache_dir_on_cpu_is_reported_not_pretended(folder, tmp_path):
    cache = tmp_path / "xla_cache"
    pipe = load(folder, cache_dir=cache)
    assert pipe.cache_status.startswith("not used: torch_xla cannot load a persistent compilation cache back on CPU")
    assert not cache.exists()
    assert pipe.describe()["persistent_cache"] == pipe.cache_status


def test_data_parallel_spmd_over_two_devices_matches_plain_torch(folder, tmp_path):
    """Two PJRT CPU devices in a fresh process: the batch is sharded, the images are the same.

    Image-to-image too: its latents and the multistep state enter the step graph with the same
    sharding as text-to-image's, so it adds only its encode graph.
    """
    script = (
        "import json, sys, numpy as np\n"
        "from xla_infer import Pipeline\n"
        "pipe = Pipeline.from_pretrained(sys.argv[1], device='xla', dtype='fp32', batch_size=2, steps=2,"
        " scheduler='dpmpp_2m')\n"
        "images = pipe(['a red circle', 'a cat'], negative_prompts=[None, 'blurry'], seeds=[5, 9], output_type='np')\n"
        "compiles = pipe.compile_count\n"
        "start = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)\n"
        "edited = [pipe(['a red circle', 'a cat'], seeds=[5, 9], image=start, strength=s, output_type='np')"
        " for s in (1.0, 0.5)]\n"
        "np.save(sys.argv[2], np.stack([images, *edited]))\n"
        "print(json.dumps({'mesh': pipe.mesh is not None, 'devices': pipe.num_devices,"
        " 'compiles': [compiles, pipe.compile_count]}))\n"
    )
    out = tmp_path / "spmd.npy"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(out)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"mesh": True, "devices": 2, "compiles": [3, 4]}
    plain = load(folder, device="cpu", scheduler="dpmpp_2m")
    start = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    expected = np.stack([
        plain(["a red circle", "a cat"], negative_prompts=[None, "blurry"], seeds=[5, 9], output_type="np"),
        *[plain(["a red circle", "a cat"], seeds=[5, 9], image=start, strength=strength, output_type="np")
          for strength in (1.0, 0.5)],
    ])
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=ATOL)


def test_a_graph_leaking_into_the_loop_fails_the_compile_guard(xla_pipe, monkeypatch):
    # Simulates a regression that leaves an op pending on the device: the guidance scale computed
    # on the device instead of uploaded. torch_xla then compiles an extra graph, which the
    # pipeline's compile counter must report as an error after warm-up.
    upload = xla_pipe.runtime.to_device

    def leaky_upload(tensor, batch_dim=0):
        on_device = upload(tensor, batch_dim)
        return on_device * 1.5 if tensor.dim() == 4 and tensor.shape[1:] == (1, 1, 1) else on_device

    monkeypatch.setattr(xla_pipe.runtime, "to_device", leaky_upload)
    with pytest.raises(RecompilationError, match="1 unexpected compilation"):
        xla_pipe(["a red circle"], seeds=[1])


def test_a_changed_graph_is_refused_loudly(xla_pipe, monkeypatch):
    # A different token length behind the pipeline's back changes the text-encode graph:
    # torch_xla.compile(max_different_graphs=1) refuses to trace a second variant.
    monkeypatch.setattr(xla_pipe, "text_length", 70)
    with pytest.raises(RuntimeError, match="Maximum number of different graphs allowed per function exceeded"):
        xla_pipe(["a red circle"], seeds=[1])


def test_one_pipeline_serves_several_sizes_each_compiled_once(folder, reference):
    """Sizes (height, width) compiled at warm-up: the text encoder's graph serves them all, each size
    adds its step and decode graphs, and then no prompt, seed or size of the set compiles again."""
    landscape = (48, 80)
    pipe = load(folder, sizes=[(64, 64), landscape])
    assert pipe.sizes == ((64, 64), landscape) and (pipe.height, pipe.width) == (64, 64)
    pipe.warmup()  # the default size (graphs this module's other pipelines may have compiled already)
    before = pipe.compile_count
    pipe.warmup(sizes=pipe.sizes)
    assert pipe.compile_count == before + 2  # the landscape's own denoise step and decode
    compiled = pipe.compile_count
    for size, seeds in ((landscape, [1, 2]), ((64, 64), [3, 4]), (landscape, SEEDS)):
        got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, output_type="np", size=size)
        assert got.shape == (2, *size, 3)
    assert pipe.compile_count == compiled
    with pipe.at_size(landscape):  # diffusers at the same size (its default micro-conditioning: the size)
        expected = diffusers_images(reference, pipe, PROMPTS, NEGATIVES, SEEDS)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    with pytest.raises(InputError, match="32x32 is not one of this pipeline's sizes"):
        pipe(PROMPTS, size=(32, 32))


WEIGHTED_PROMPTS = {  # two chunks: prompts of one chunk and of two, cut, weighted up and down, BREAK
    "a1111": ["", "a red circle", "(a red circle:1.4) BREAK [blue square]", "((red)) " + "circle " * 100,
              "[[blurry]]", "x " * 140 + "(red:0.5)", "square " * 160],
    "compel": ["", "a red circle", "(a red circle)1.4 blue- square--", "red++ " + "circle " * 100, "blurry---",
               "x " * 140 + "red-", "square " * 160],
}


@pytest.mark.parametrize("weighting", ["a1111", "compel"])
def test_weighted_long_prompts_compile_nothing_after_warmup(folder, weighting):
    """Token ids of two chunks and their weights are graph data: after warm-up no prompt length (up
    to two chunks, or cut), weight or BREAK compiles anything, and the images are plain torch's."""
    pipe = load(folder, max_text_chunks=2, prompt_weighting=weighting)
    pipe.warmup()
    compiled = pipe.compile_count
    prompts = WEIGHTED_PROMPTS[weighting]
    for shift in range(3):  # each prompt in other batches, with other negatives
        got = pipe(prompts[shift:] + prompts[:shift], negative_prompts=list(reversed(prompts)), seeds=SEEDS[0],
                   output_type="np")
    assert pipe.compile_count == compiled
    plain = load(folder, device="cpu", max_text_chunks=2, prompt_weighting=weighting)
    expected = plain(prompts[2:] + prompts[:2], negative_prompts=list(reversed(prompts)), seeds=SEEDS[0],
                     output_type="np")
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
