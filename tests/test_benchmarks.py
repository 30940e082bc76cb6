"""The benchmark scripts run as documented (their --quick modes) and write what they promise.
Nothing here measures speed: the figures come from running the scripts, on the device they name."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.unets import MEDIUM_SIZES, unet_architecture
from flax_train import hlo_cost
from sdxl_common import sdxl

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("benchmarks")


def test_train_throughput_quick_times_ours_and_the_diffusers_step(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "train_throughput_tiny_cpu_quick.json").read_text())
    assert report["device"].endswith("(cpu)")
    diffusers, ours = report["results"]  # eager diffusers runs first, so that it frees a GPU's memory for ours
    assert ours["layout"] == "fsdp" and diffusers["layout"].startswith("diffusers torch eager")
    assert ours["images_per_s"] > 0 and diffusers["images_per_s"] > 0
    assert report["ours_vs_diffusers_images_per_s"] == pytest.approx(ours["images_per_s"] / diffusers["images_per_s"], rel=1e-2)
    assert "ours (best layout) / diffusers" in result.stdout
    table = result.stdout.split("vs first\n")[1].splitlines()
    assert table[0].startswith("fsdp ") and table[1].startswith("diffusers torch eager")  # ours first: the base of "vs first"
    # each phase is announced with the time since start, so that a run cut short shows where it was
    assert "s] ours, fsdp: compiling the step" in result.stdout


def test_train_throughput_refuses_an_unknown_diffusers_mode(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--quick", "--diffusers", "eager,jit",
                             "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--diffusers takes eager, compile or none" in result.stderr
    assert not list(tmp_path.iterdir())


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


def test_the_benchmark_unets_are_the_models_they_are_named_after():
    """medium is SDXL's UNet at a fifth of the width (infer_latency's folder and train_throughput's
    step time the same one); depth changes only the last block's transformer layers."""
    from flax_train.demo.tiny import tiny_component_configs

    medium = unet_architecture("medium", 256)
    assert medium == {"_class_name": "UNet2DConditionModel", **tiny_component_configs(vocab_size=1, **MEDIUM_SIZES)["unet"]}
    narrowed = {**sdxl.UNET_CONFIG, "sample_size": 32, "block_out_channels": [64, 128, 256], "attention_head_dim": [1, 2, 4]}
    for key, value in medium.items():
        assert narrowed.get(key, value) == (list(value) if isinstance(value, tuple) else value), key
    assert unet_architecture("sdxl", 1024, depth=2)["transformer_layers_per_block"] == [1, 2, 2]
    with pytest.raises(ValueError, match="unknown UNet 'large'"):
        unet_architecture("large", 256)


def test_a_tpu_estimate_fitted_from_shallower_compiles_is_labelled_extrapolated():
    from benchmarks.tpu.roofline import extrapolate

    shallow = [{"scenario": "s", "depth": d, "status": "compiled", "unet_params": 100 + 10 * d, "temp_gib": 1.0 + d,
                "compile_s": 5.0} for d in (1, 2)]
    row = extrapolate(shallow, depth=10)
    assert row["status"] == "extrapolated" and row["method"] == "extrapolated from depths 1, 2"
    assert row["unet_params"] == 200 and row["temp_gib"] == 11.0


def test_the_inference_estimate_compiles_the_sampler_with_every_step_counted():
    """tpu_aot --inference compiles flax_train.sampling's guided loop and the VAE decode; here for
    4 CPU devices and the tiny UNet (a TPU compile of it takes minutes), to check the program and
    its accounting: the HLO count holds every step's UNet call on the doubled batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.tpu.inference import compile_inference
    from benchmarks.tpu.scenarios import Scenario, Settings
    from flax_train import hlo_cost, models

    scenario = Scenario.parse("v5e-4_dp_none_64px_b1")
    row = {}
    for steps in (2, 4):
        row[steps] = compile_inference(scenario, Settings(inference_steps=steps), "tiny", devices=jax.devices()[:4])
    assert row[2]["status"] == "compiled" and row[2]["global_batch"] == 4 and row[2]["task"] == "inference"
    assert row[2]["collective_bytes_per_device"] == 0  # data parallel: nothing crosses chips

    # One UNet call on a chip's doubled batch (its image and the unconditional twin), compiled and
    # counted by the same rule (a convolution's taps on zero padding are not counted).
    architecture = unet_architecture("tiny", 64)
    graph, params = nnx.split(models.abstract(architecture, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    text_width, tokens = architecture["cross_attention_dim"], 77
    pooled_width = architecture["projection_class_embeddings_input_dim"] - 6 * architecture["addition_time_embed_dim"]
    doubled = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in (
        ((2, 4, 16, 16), jnp.float32), ((2,), jnp.float32), ((2, tokens, text_width), jnp.bfloat16),
        ((2, pooled_width), jnp.bfloat16), ((2, 6), jnp.float32))]  # the tiny VAE's factor is 4

    def forward(params, latents, t, context, pooled, time_ids):
        return nnx.merge(graph, params)(latents, t, context, text_embeds=pooled, time_ids=time_ids)

    unet_call = hlo_cost.analyse(jax.jit(forward).lower(params, *doubled).compile().as_text()).flops
    # The same at every step, so XLA computes it once, before the loop: each cross-attention
    # layer's key and value projections of the text (the tiny UNet has 4 such layers, 64 wide: one
    # in its second down block, one in the mid block, two in its first up block) and the
    # pooled-text-and-size embedding's two linear layers (into 4 x 32 = 128 features).
    key_value = 4 * 2 * (2 * tokens * text_width * 64)
    added_embedding = 2 * architecture["projection_class_embeddings_input_dim"] * 128 + 2 * 128 * 128
    per_step = unet_call - 2 * (key_value + added_embedding)
    # Two more steps: two more UNet calls, nothing else that multiplies.
    assert row[4]["hlo_flops_per_device"] - row[2]["hlo_flops_per_device"] == 2 * per_step


def test_tpu_aot_quick_compiles_the_tiny_step_and_sampler_end_to_end():
    result = subprocess.run([sys.executable, "-m", "benchmarks.tpu_aot", "--quick"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| v5e-")]
    assert [row.split(" | ")[0] for row in rows] == ["| v5e-8_fsdp_full_64px_b1, scanned layers", "| v5e-4_dp_none_64px_b1"]
    assert all("| compiled |" in row for row in rows)
    assert "estimate nothing" in result.stdout


def test_tpu_aot_results_keep_each_day_and_the_table_shows_every_days_latest_rows(tmp_path, monkeypatch):
    """Compiles of one settings suffix run over several days (each takes up to half an hour here):
    each day's JSON keeps that day's rows, the markdown gathers them, a scenario's latest row winning."""
    from benchmarks.tpu import results

    monkeypatch.setattr(results, "RESULTS", tmp_path)
    monkeypatch.setattr(results, "REPO", tmp_path)
    info = {"cpu_count": 2, "memory_gib": 23.5, "platform": "test", "jax": "j", "libtpu": "l", "flax": "f"}

    def row(name, compile_s):
        return {"scenario": name, "slice": "v5e-8", "unet": "sdxl", "depth": 10, "resolution": 1024, "remat": "full",
                "status": "compiled", "chips": 8, "global_batch": 8, "scan_layers": True, "attention": "splash",
                "compile_s": compile_s, "argument_gib": 4.8, "output_gib": 4.8, "temp_gib": 3.2, "code_gib": 0.0,
                "alias_gib": 4.8}

    results.write_results([row("v5e-8_fsdp_full_1024px_b1", 850.0), row("v5e-8_fsdp_full_1024px_b2", 1104.0)], [],
                          info, "cmd a", "_scan_splash", "2026-12-02")
    results.write_results([row("v5e-8_fsdp_full_1024px_b2", 999.0)], [], info, "cmd b", "_scan_splash", "2026-12-03")
    first = json.loads((tmp_path / "tpu_aot_2026-12-02_scan_splash.json").read_text())
    assert [r["compile_s"] for r in first["results"]] == [850.0, 1104.0]
    md = (tmp_path / "tpu_aot_scan_splash.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| v5e-8")]
    assert [line.split(" | ")[0] for line in table] == ["| v5e-8_fsdp_full_1024px_b1, scanned layers, splash attention",
                                                        "| v5e-8_fsdp_full_1024px_b2, scanned layers, splash attention"]
    assert "| 850 |" in table[0] and "| 999 |" in table[1] and "1104" not in md
    assert "Compiled 2026-12-02, 2026-12-03" in md and "cmd a\ncmd b" in md
    assert "`tpu_aot_2026-12-02_scan_splash.json`, `tpu_aot_2026-12-03_scan_splash.json`" in md

    # A recompile that runs out of time, the same day or a later one, does not hide the compile.
    timed_out = {**row("v5e-8_fsdp_full_1024px_b2", 3300.0), "status": "timeout"}
    results.write_results([timed_out], [], info, "cmd c", "_scan_splash", "2026-12-03")
    results.write_results([{**timed_out, "scenario": "v5e-8_fsdp_full_1024px_b1"}], [], info, "cmd d", "_scan_splash",
                          "2026-12-04")
    third = json.loads((tmp_path / "tpu_aot_2026-12-03_scan_splash.json").read_text())
    assert [(r["status"], r["compile_s"]) for r in third["results"]] == [("compiled", 999.0)]
    table = [line for line in (tmp_path / "tpu_aot_scan_splash.md").read_text().splitlines() if line.startswith("| v5e-8")]
    assert "| 850 |" in table[0] and "| 999 |" in table[1] and "timeout" not in "".join(table)


def test_compile_time_quick_compiles_the_step_scanned_and_unrolled(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "compile_time_tiny_64px_cpu_quick.json").read_text())
    unrolled, scanned = report["results"]
    assert (unrolled["variant"], scanned["variant"]) == ("unrolled", "scanned")
    assert unrolled["status"] == scanned["status"] == "compiled"
    # The scan runs the same layers: the compiled steps execute the same products.
    assert unrolled["hlo_flops"] == scanned["hlo_flops"] > 0
    assert report["unrolled_vs_scanned_compile_s"] == pytest.approx(unrolled["compile_s"] / scanned["compile_s"])
    assert "unrolled / scanned compile time" in result.stdout


def test_loader_throughput_quick_measures_each_source_and_counts_what_is_read(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.loader_throughput", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("loader_throughput_*_quick.json")).read_text())
    runs = {(run["source"], run["delay_ms"]): run for run in report["runs"]}
    assert set(runs) == {("local disk", None), ("gs:// emulator", 0.0), ("gs:// emulator alone (no loader)", 0.0),
                         ("gs:// emulator alone, 4 reads a sample", 0.0), ("gs:// emulator", 20.0)}
    assert all(run["samples_per_s"] > 0 for run in runs.values())
    for delay in (0.0, 20.0):
        run = runs["gs:// emulator", delay]
        # one ranged read per sample, of exactly the bytes it needs (the emulator counts them)
        assert run["requests_per_sample"] == 1 and run["bytes_read_per_sample"] == run["bytes_needed_per_sample"] > 0
        assert run["peak_rss_mib"] > run["rss_before_loader_mib"] > 0 and run["emulator_cpu_cores"] > 0
    assert report["index"]["samples"] == 100_000 and report["index"]["manifest_mib"] > 0
    assert "samples/s" in result.stdout


def test_a_multislice_tpu_estimate_prices_what_crosses_between_slices_at_the_network_bandwidth():
    """Two v5p-8 slices: the bytes the HLO count says cross between slices take the time the data
    centre network's 50 Gbit/s per chip needs; the slices' own collectives, their interconnect's."""
    from benchmarks.tpu.roofline import derive
    from benchmarks.tpu.scenarios import SLICES, Scenario

    scenario = Scenario.parse("2xv5p-8_fsdp_dots_1024px_b4")
    assert SLICES[scenario.slice].slices == 2
    row = dict(scenario=scenario.name, **dataclasses.asdict(scenario), unet="sdxl", depth=10, chips=8, slices=2,
               global_batch=32, status="compiled", attention="xla", hlo_flops_per_device=80e12,
               hlo_hbm_bytes_per_device=1e9, collective_bytes_per_device=12e9, dcn_bytes_per_device=2.5e9,
               hlo_accounting=hlo_cost.ACCOUNTING)
    derived = derive(row)
    assert derived["dcn_seconds"] == pytest.approx(2.5e9 / 6.25e9)
    assert derived["ici_seconds"] == pytest.approx(12e9 / 600e9)
    assert derived["roofline_limited_by"] == "dcn" and derived["roofline_seconds"] == pytest.approx(0.4)


def test_the_benchmarks_doc_shows_every_results_file(tmp_path):
    from benchmarks import report

    assert report.main(["--check"]) == 0, "run python -m benchmarks.report"
    # A new results file shows up in the generated section, and only there.
    (tmp_path / "loader_throughput_new.json").write_text(json.dumps({
        "benchmark": "loader_throughput", "date": "2026-12-31", "host": "a host",
        "runs": [{"source": "gs:// emulator", "delay_ms": 40, "samples_per_s": 1234.5, "requests_per_sample": 1.0,
                  "bytes_read_per_sample": 100.0, "bytes_needed_per_sample": 100.0, "peak_rss_mib": 512}]}))
    (tmp_path / "someday.json").write_text(json.dumps({"benchmark": "someday"}))
    section = report.render(tmp_path)
    assert "| gs:// emulator, 40 ms a request | 1,234.5 | 1.00 | 1.00 | 512 |" in section
    assert "### someday" in section and "someday.json" in section
    doc = "# Benchmarks\n\nprose\n\n" + report.render() + "\nafter\n"
    new = report.updated(doc, section)
    assert new.startswith("# Benchmarks\n\nprose\n\n") and new.endswith("\nafter\n") and "1,234.5" in new
