"""What the estimates show: the table of rows (printed, and in the markdown), each day's results
file of a set of settings (``benchmarks/results/tpu_aot_<date><settings>.json``), the markdown
gathering every day's (``tpu_aot<settings>.md``, ending with what its columns mean), and
``--reanalyse``, which counts a results file's HLO figures again from the kept HLO."""
from __future__ import annotations

import datetime
import gzip
import json
import re
from pathlib import Path
from typing import Any

from benchmarks.tpu.paths import REPO, RESULTS
from benchmarks.tpu.roofline import NOTE, derive
from benchmarks.tpu.scenarios import ATTENTION_NAMES, SDXL_DEPTH
from sdxl_common import chips


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows (as derive() leaves them) as a markdown table, one line each."""
    columns = (
        "scenario", "how", "chips", "global batch", "status", "compile s", "args GiB", "temp GiB",
        "total GiB / HBM", "HLO TFLOP/step", "analytic TFLOP/step", "compute s", "HBM s", "ICI s", "DCN s", "roofline s",
        "roofline img/s", "roofline MFU", "cost-model step s",
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        total = "-"
        if "total_gib" in r:
            total = f"{r['total_gib']:.1f} / {r['hbm_gib']:.0f}" + ("" if r["fits_hbm"] else " **over**")
        elif "oom_used_gib" in r:
            total = f"{r['oom_used_gib']:.1f} / {r['oom_capacity_gib']:.1f} (compiler OOM)"
        elif r["status"] == "over_hbm":
            total = f"{r['target_state_gib_per_chip']:.1f} / {r['hbm_gib']:.0f} (state alone)"
        how = "compiled" if r.get("method") is None else r["method"].replace("extrapolated from depths ", "extrap. ")
        if r["status"] in ("over_hbm", "crashed", "timeout"):
            how = "not compiled"
        elif r.get("failed_at_depth") is not None:
            how += f" ({r['status']} at depth {r['failed_at_depth']})"
        hlo = r.get("hlo_flops_per_device")
        hlo_cell = _fmt(hlo * r["chips"] / 1e12 if hlo else None, ".1f")
        if hlo and r.get("attention") == "splash":
            hlo_cell += " (outside kernels)"
        analytic = r.get("analytic_executed_flops_per_step")
        mfu = r.get("roofline_mfu")
        limited = r.get("roofline_limited_by")
        cells = [
            r["scenario"] + (f" (depth {r['depth']})" if r["unet"] == "sdxl" and r.get("depth") not in (None, SDXL_DEPTH) else "")
            + (", scanned layers" if r.get("scan_layers") else "")
            + (f", {r['attention']} attention" if r.get("attention", "xla") != "xla" else "")
            + (f", {r['train_method']}" if r.get("train_method", "full") != "full" else ""),
            how,
            _fmt(r.get("chips"), "d"),
            _fmt(r.get("global_batch"), "d"),
            r["status"],
            _fmt(r.get("compile_s"), ".0f"),
            _fmt(r.get("argument_gib"), ".2f"),
            _fmt(r.get("temp_gib"), ".2f"),
            total,
            hlo_cell,
            _fmt(analytic / 1e12 if analytic else None, ".1f"),
            _fmt(r.get("compute_seconds"), ".3f"),
            _fmt(r.get("hbm_seconds"), ".3f"),
            "not recounted" if r.get("ici_not_recounted") else _fmt(r.get("ici_seconds"), ".3f"),
            _fmt(r.get("dcn_seconds"), ".3f"),
            _fmt(r.get("roofline_seconds"), ".3f") + (f" ({limited})" if limited else ""),
            _fmt(r.get("roofline_images_per_s"), ".2f"),
            "-" if mfu is None else f"{100 * mfu:.0f}%",
            _fmt(r.get("optimal_seconds"), ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The end of every generated markdown: what its columns mean and published figures to set them
# against. The chips' figures come from sdxl_common.chips (markdown_notes()).
MARKDOWN_NOTES = """\
## What the columns mean

- **how** / **status**: `compiled` is the full SDXL step compiled as is. `extrap. 1, 2` (status
  `extrapolated`: nothing at full depth was compiled) means the step was
  compiled for two shallower copies of SDXL (the deepest level's 10 transformer layers cut to 1
  and 2, everything else unchanged) and every per-chip figure (parameters, memory, FLOPs, cost-model
  time) was extrapolated linearly to 10 layers. The extrapolated parameter count is checked against
  the real one below.
- **compile s**: wall time of `lower().compile()` on this host (shared and loaded, so slow); for
  extrapolated rows, the sum of the two shallower compiles. A TPU VM's host compiles much faster.
- **args / temp / total GiB**: per chip, from the compiler's `memory_analysis()`; total =
  arguments + outputs + temporaries + code - aliased (the donated state). `oom` is the TPU compiler
  refusing the program for HBM, with its message's used / capacity figures.
- **HLO TFLOP/step**: the matrix products and convolutions of the compiled program, counted from
  its optimized HLO (`flax_train.hlo_cost`) with every loop body (scanned layers) counted as often
  as it runs, x chips. XLA's own `cost_analysis()` counts a loop body once (kept in the JSON as
  `xla_flops_per_chip`). Splash rows: outside the Pallas kernels, whose products it cannot see.
  **analytic**: 6.761 TFLOP forward per image at 1024px, 1.589 at 512px (torch FlopCounterMode on
  the diffusers UNet), x3 for forward + backward, x4 with full rematerialisation (an upper count: the
  backward pass recomputes the resnet and transformer blocks, not the stem, the up- and
  downsampling convolutions and the embeddings); a LoRA step x2 (x3): its backward skips the frozen
  weights' gradients.
- **compute / ICI s**: each resource's time per step alone at its peak, per chip: the HLO's FLOPs
  (splash rows: the analytic FLOPs, which include attention) over the peak bf16 FLOP/s ({peaks}
  TFLOP/s); the bytes each chip receives in the program's collectives (FSDP's
  all-gathers and reduce-scatters, which the TPU compiler runs as collective matmuls of
  collective-permutes) over half the bidirectional interconnect bandwidth ({ici} GB/s per
  chip; Cloud TPU documentation). `not recounted`: the row's collectives were counted by an earlier
  `hlo_cost` that counted each of the TPU compiler's asynchronous collectives once per fusion
  printing it (a start, overlapped pieces and a done) and some hybrid meshes' groups as all the chips;
  that row's HLO was not kept to count again, so its roofline is the compute's time alone.
- **HBM s**: the bytes every unfused instruction of the HLO reads and writes (a fusion its operands
  and result; a scanned layer's slice, not the whole stack) over the HBM bandwidth ({hbm}
  GB/s). An upper estimate: on a TPU it also counts the compiler's copies and slices between memory
  spaces, so it is shown and kept out of the roofline.
- **roofline s**: the larger of compute and ICI, and which one it is: the step if the two overlapped
  perfectly and each ran at its peak. An idealised estimate, not a bound and not a measurement.
  **roofline img/s** = global batch / roofline s; **roofline MFU** = analytic model FLOPs (3 x
  forward; recomputation not counted) / (roofline s x peak x chips).
- **cost-model step s**: the TPU compiler's `optimal_seconds`, a {note}; `-` where the cost model
  could not price the program (it answers a negative time for scanned programs, kept in the JSON as
  `optimal_seconds_unpriced`) or cannot see all of it (splash rows: `*_outside_kernels`).

## Published figures for comparison (not from this project)

- Hugging Face blog "Accelerating SDXL inference with JAX on Cloud TPU v5e" (2023), measured:
  1024x1024, 20 Euler steps with guidance, v5e-4 batch 4 in 2.33 s (1.72 images/s), batch 8 in
  4.99 s; v4-8 batch 4 in 2.16 s; about 3 minutes to compile. MLPerf Inference v4.1, SDXL (20
  steps, guidance, 1024px, bf16): v5e-4 1.75 images/s offline, v6e-4 (preview) 5.44. Compare them
  with the `--inference 20` rows' roofline img/s; a training step (forward, backward, optimizer,
  3-4 forwards' work per image) is not comparable one to one.
- MaxDiffusion trains SDXL on TPU without EMA and without rematerialisation; the scenarios here
  keep EMA (one more fp32 copy of the weights) and fp32 AdamW, as `configs/sdxl_base.yaml` does,
  so their memory is not comparable to MaxDiffusion's.
- torch_xla: compiling SDXL can take about an hour on TPU (torch_xla docs); no published SDXL
  training throughput.
"""


def markdown_notes() -> str:
    """MARKDOWN_NOTES with the chips' figures from sdxl_common.chips (v5e, v5p, v6e, in that order)."""
    rows = {name.removeprefix("tpu_"): chips.CHIPS[name] for name in ("tpu_v5e", "tpu_v5p", "tpu_v6e")}
    return MARKDOWN_NOTES.format(
        note=NOTE,
        peaks=", ".join(f"{chip.peak_tflops:g} {name}" for name, chip in rows.items()),
        ici=", ".join(f"{chip.ici_gb_per_s:g}" for chip in rows.values()),
        hbm=", ".join(f"{chip.hbm_gb_per_s:g}" for chip in rows.values()),
    )


def write_results(rows: list[dict[str, Any]], analogs: list[dict[str, Any]], info: dict[str, Any],
                  command: str | None, suffix: str = "", today: str | None = None) -> list[Path]:
    """The day's results file of these settings, then the table of every day's."""
    return [save_day(rows, analogs, info, command, suffix, today), write_markdown(info, suffix)]


def save_day(rows: list[dict[str, Any]], analogs: list[dict[str, Any]], info: dict[str, Any],
             command: str | None, suffix: str, today: str | None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = today or datetime.date.today().isoformat()
    json_path = RESULTS / f"tpu_aot_{today}{suffix}.json"
    # Runs of the same day and settings share one file: a scenario run again replaces its rows,
    # others are kept, so each scenario can be compiled in a run of its own.
    earlier = json.loads(json_path.read_text()) if json_path.exists() else {}
    before = {r["scenario"]: derive(r) for r in earlier.get("results", [])}
    rows = [later_row(before.get(r["scenario"]), r) for r in rows]
    names = {r["scenario"] for r in rows + analogs}
    rows = [r for name, r in before.items() if name not in names] + rows
    analogs = [derive(r) for r in earlier.get("shallow_compiles", []) if r["scenario"] not in names] + analogs
    commands = [c for c in earlier.get("commands", []) if c != command] + ([command] if command else [])
    payload = {
        "benchmark": "tpu_aot",
        "date": today,
        "commands": commands,
        "estimate_note": NOTE,
        "host": info,
        "results": rows,
        "shallow_compiles": analogs,
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return json_path


def later_row(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """A scenario's row to show: the later run's, unless only the earlier one compiled. A compile
    that ran out of time or memory on a busy day says nothing new about the program."""
    if before is not None and before["status"] == "compiled" and after["status"] in ("timeout", "crashed"):
        return before
    return after


def write_markdown(info: dict[str, Any], suffix: str) -> Path:
    """The table of the runs of these settings from every day, a scenario's latest row winning."""
    by_name: dict[str, dict[str, Any]] = {}
    shallow: dict[str, dict[str, Any]] = {}
    commands, dates, paths = [], [], []
    for date, path in results_files(suffix):
        day = json.loads(path.read_text())
        by_name.update((r["scenario"], later_row(by_name.get(r["scenario"]), derive(r))) for r in day["results"])
        shallow.update((r["scenario"], derive(r)) for r in day.get("shallow_compiles", []))
        commands += [c for c in day.get("commands", []) if c not in commands]
        dates.append(date)
        paths.append(f"`{path.relative_to(REPO)}`")
    rows, analogs = list(by_name.values()), list(shallow.values())
    inference = any(r.get("task") == "inference" for r in rows)
    attention = " and ".join(sorted({ATTENTION_NAMES[r.get("attention", "xla")] for r in rows})) + " attention."
    if inference:
        what = ("The JAX sampler (`flax_train.sampling`, as `flax-train sample` runs it): Euler steps with "
                "classifier-free guidance (the UNet on each image and its unconditional twin, side by side on "
                "one chip), then the VAE decode; bf16 UNet, fp32 VAE, weights replicated on every chip, text "
                "encoders left out; " + attention)
    else:
        what = ("The trainer's own step (`flax_train.train.train_step`) with `configs/sdxl_base.yaml`: AdamW, EMA, "
                "bf16 compute, fp32 weights and optimizer state, " + attention)
    md = [
        f"# SDXL {'inference' if inference else 'training'} on Cloud TPU: ahead-of-time compiler estimates",
        "",
        f"Compiled {', '.join(dates)} on a **CPU-only host** ({info['cpu_count']} cores, {info['memory_gib']} GiB, shared "
        f"with other work; {info['platform']}); no TPU was used. jax {info['jax']}, libtpu {info['libtpu']}, "
        f"flax {info['flax']}. " + what
        + (" Rows marked `scanned layers` run each stack of transformer layers as one scan (`model.scan_layers`)."
           if any(r.get("scan_layers") for r in rows) else "")
        + (" Rows marked `lora rN` train a rank-N LoRA (`train.method: lora`): the UNet's own weights are frozen"
           " in bf16 and only the factors have fp32 copies, AdamW moments and EMA."
           if any(r.get("train_method", "full") != "full" for r in rows) else ""),
        "",
        "Memory is the TPU compiler's plan; the roofline, images/s and MFU are **idealised estimates** from "
        f"the compiled program's counts, and the cost-model step time a **{NOTE}**. None is a measurement.",
        "",
        "```",
        *commands,
        "```",
        "",
        table(rows),
        "",
    ]
    if analogs:
        real = sdxl_param_count()
        checks = sorted({(r["unet_params"], r["method"]) for r in rows if r.get("method") and "unet_params" in r})
        md += [f"SDXL UNet parameters: {real:,}; extrapolated: " + ", ".join(f"{p:,} ({m})" for p, m in checks) + ".", ""]
        md += ["The shallower compiles the extrapolated rows come from:", "", table(analogs), ""]
    failed = [r for r in rows + analogs if r["status"] not in ("compiled", "extrapolated", "oom", "over_hbm")]
    if failed:
        md += ["## Compiles that failed", ""]
        md += [f"- `{r['scenario']}`: {r['status']} - {failure_reason(r)[:300]}" for r in failed]
        md.append("")
    md += [f"Raw figures: {', '.join(paths)}.", "", markdown_notes()]
    md_path = RESULTS / f"tpu_aot{suffix}.md"
    md_path.write_text("\n".join(md))
    return md_path


def failure_reason(row: dict[str, Any]) -> str:
    """Why a compile failed, as the markdown's list of failures says it."""
    if row.get("returncode") == -9:  # SIGKILL: on a host without swap, the kernel's out-of-memory killer
        after = f" after {row['compile_s']:.0f} s" if row.get("compile_s") else ""
        return f"the compiler was killed (SIGKILL){after}: this host ran out of memory"
    return str(row.get("error", ""))


def results_files(suffix: str) -> list[tuple[str, Path]]:
    """(date, path) of every results file of these settings, oldest first."""
    pattern = re.compile(rf"tpu_aot_(\d{{4}}-\d{{2}}-\d{{2}}){re.escape(suffix)}\.json")
    return sorted((m[1], p) for p in RESULTS.glob("tpu_aot_*.json") if (m := pattern.fullmatch(p.name)))


def reanalyse(json_path: Path) -> list[Path]:
    """Rows of a results file with their HLO figures counted again from the kept HLO."""
    from flax_train import hlo_cost

    json_path = json_path.resolve()
    payload = json.loads(json_path.read_text())
    m = re.fullmatch(r"tpu_aot_(\d{4}-\d{2}-\d{2})(.*)\.json", json_path.name)
    if not m:
        raise SystemExit(f"{json_path}: not a tpu_aot results file (tpu_aot_DATE[SUFFIX].json)")
    for row in payload["results"] + payload.get("shallow_compiles", []):
        hlo_path = REPO / row.get("hlo_path", "-")
        if hlo_path.is_file():
            row.update(hlo_cost.summary(hlo_cost.analyse(gzip.decompress(hlo_path.read_bytes()).decode(), row["chips"])))
    payload["results"] = [derive(r) for r in payload["results"]]
    payload["shallow_compiles"] = [derive(r) for r in payload.get("shallow_compiles", [])]
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return [json_path, write_markdown(payload["host"], m[2])]


def sdxl_param_count() -> int:
    from flax_train import models
    from sdxl_common import sdxl

    return models.count_params(models.abstract(sdxl.UNET_CONFIG))
