"""Latent-cache loader throughput per process: samples/s from a local cache and from gs://.

Writes a latent cache of SDXL-shaped rows (latents 4x128x128 and prompt embeddings 77x2048 in
bf16, pooled embeddings 1280, time ids: 0.45 MB a sample), then, each in a fresh process, runs the
trainer's loader (`flax_train.data.cache.make_loader`, one process's share of a global batch) over
it from local disk and from a local Cloud Storage emulator (benchmarks/gcs_emulator.py, threaded)
that waits a fixed delay before answering each request, as real Cloud Storage takes tens of
milliseconds to a ranged read's first byte. For each it reports samples/s, the requests and bytes
read per sample against the bytes a sample needs, the loader's peak host memory and the CPU it
takes; and what the emulator serves alone (reads of the same size, no loader: the limit any reader
meets on this machine), also with each sample split into four reads as a tensor per array needs.
Last, what opening a cache of 10 million samples costs (a synthetic manifest). Not a test: nothing
is asserted.

    python -m benchmarks.loader_throughput                  # SDXL rows; delays 0, 15 and 40 ms
    python -m benchmarks.loader_throughput --quick          # seconds: checks the script, small rows
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # see benchmarks/gcs_emulator.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the loader needs no accelerator

REPO = Path(__file__).resolve().parents[1]
SDXL_ROW = {"latent": (4, 128, 128), "prompt": (77, 2048), "pooled": (1280,)}
QUICK_ROW = {"latent": (4, 16, 16), "prompt": (77, 64), "pooled": (32,)}


def write_cache(folder: Path, samples: int, shard_size: int, row: dict) -> None:
    """A finished latent cache of random rows, written with the cache module's own writers."""
    import ml_dtypes
    import numpy as np

    from flax_train.data import cache as cache_lib
    from flax_train.data.images import PreprocessSpec, SourceSpec
    from sdxl_common.storage import atomic_write_bytes

    rng = np.random.default_rng(0)
    bf16 = ml_dtypes.bfloat16
    shards = -(-samples // shard_size)
    for k in range(shards):
        n = min(shard_size, samples - k * shard_size)
        index = np.arange(k * shard_size, k * shard_size + n)
        arrays = {
            "latents": rng.standard_normal((n, *row["latent"]), np.float32).astype(bf16),
            "prompt_embeds": rng.standard_normal((n, *row["prompt"]), np.float32).astype(bf16),
            "pooled_prompt_embeds": rng.standard_normal((n, *row["pooled"]), np.float32).astype(bf16),
            "add_time_ids": np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.int32), (n, 1)),
        }
        metadata = {"shard": k, "keys": [f"{i:08d}.jpg" for i in index], "captions": [f"caption {i}" for i in index],
                    "skipped": []}
        atomic_write_bytes(cache_lib.shard_path(folder, k), cache_lib.encode_shard(index, {None: arrays}, metadata))
    settings = cache_lib.CacheSettings(SourceSpec("imagefolder", "/synthetic"), PreprocessSpec(resolution=1024),
                                       model={"vae": "0" * 64}, dtype="bfloat16")
    plan = {"settings": settings.to_json(), "layout": {"shard_size": shard_size, "num_items": samples, "num_shards": shards}}
    cache_lib.write_manifest(folder, plan, rejected=[])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(location: str, batch: int, seconds: float, probe_samples: int, stats_url: str | None,
            reads_in_flight: int | None) -> dict:
    """Runs in a fresh process: the loader over `location` for `seconds`, after a probe that reads
    `probe_samples` samples one at a time to count requests and bytes per sample."""
    import urllib.request

    import numpy as np

    from flax_train.data.cache import LatentCache, make_loader

    def stats() -> dict:
        if not stats_url:
            return {"requests": 0, "bytes_sent": 0}
        with urllib.request.urlopen(stats_url, timeout=10) as response:
            return json.loads(response.read())

    cache = LatentCache(location)
    rng = np.random.default_rng(1)
    before = stats()
    needed = 0
    for i in rng.choice(len(cache), size=probe_samples, replace=False):
        needed += sum(a.nbytes for a in cache[int(i)].values())
    after = stats()
    per_sample = {
        "requests_per_sample": (after["requests"] - before["requests"]) / probe_samples,
        "bytes_read_per_sample": (after["bytes_sent"] - before["bytes_sent"]) / probe_samples,
        "bytes_needed_per_sample": needed / probe_samples,
    }
    rss_before = _status_kib("VmRSS")
    options = {} if reads_in_flight is None else {"reads_in_flight": reads_in_flight}
    loader = make_loader(cache, global_batch_size=batch, seed=0, process_index=0, process_count=1, **options)
    for _ in range(2):  # warm-up: connections opened, threads started
        next(loader)
    cpu0, start, count = os.times(), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        count += len(next(loader)["latents"])
    wall = time.perf_counter() - start
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "samples_per_s": count / wall,
        "samples": count,
        "seconds": wall,
        "loader_cpu_cores": cpu / wall,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "rss_before_loader_mib": rss_before / 1024,
        **per_sample,
    }


def emulator_alone(location: str, batch: int, seconds: float, bytes_per_sample: int, shard_bytes: int,
                   files: list[str], reads_per_sample: int = 1) -> dict:
    """Runs in a fresh process: what the emulator serves with no loader. Four threads each fetch
    batches of `batch` samples of `bytes_per_sample` at random offsets, each sample in
    `reads_per_sample` ranged reads of equal parts (as a tensor per array would need), all of a
    batch at once, through gcsfs (the storage client the loader uses), for `seconds`."""
    import concurrent.futures

    import fsspec
    import numpy as np

    fs = fsspec.filesystem("gs", finalize_on_close=True)
    paths = [f"{location}/{name}" for name in files]

    def fetch_batches(seed: int, until: float) -> int:
        rng, count = np.random.default_rng(seed), 0
        part = bytes_per_sample // reads_per_sample
        while time.perf_counter() < until:
            starts = [s + i * part for s in rng.integers(0, shard_bytes - bytes_per_sample, batch).tolist()
                      for i in range(reads_per_sample)]
            chosen = [paths[i] for i in rng.integers(len(paths), size=batch) for _ in range(reads_per_sample)]
            out = fs.cat_ranges(chosen, starts, [s + part for s in starts], on_error="raise")
            assert all(len(b) == part for b in out)
            count += batch
        return count

    fetch_batches(0, time.perf_counter() + 1)  # connections opened
    cpu0, start = os.times(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        count = sum(pool.map(fetch_batches, range(1, 5), [start + seconds] * 4))
    wall = time.perf_counter() - start
    cpu1 = os.times()
    return {"samples_per_s": count / wall, "samples": count, "seconds": wall,
            "client_cpu_cores": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall}


def index_at_scale(samples: int, shard_size: int, skipped_share: float) -> dict:
    """Runs in a fresh process: a manifest and skipped list for `samples` samples (no shard files),
    then what opening the cache and starting its loader costs, and what reading the skipped list
    (prepare's report of a finished cache) costs."""
    import tracemalloc

    import ml_dtypes
    import numpy as np

    from flax_train.data import cache as cache_lib
    from flax_train.data.images import PreprocessSpec, SourceSpec

    folder = Path(tempfile.mkdtemp())
    num_shards = -(-samples // shard_size)
    counts = np.full(num_shards, shard_size)
    counts[-1] = samples - shard_size * (num_shards - 1)
    skipped = int(samples * skipped_share)
    np.add.at(counts, np.random.default_rng(0).integers(num_shards, size=skipped), -1)
    layout = cache_lib.RecordLayout.of({
        "latents": (ml_dtypes.bfloat16, SDXL_ROW["latent"]), "add_time_ids": (np.int32, (6,)),
        "pooled_prompt_embeds": (ml_dtypes.bfloat16, SDXL_ROW["pooled"]), "prompt_embeds": (ml_dtypes.bfloat16, SDXL_ROW["prompt"]),
    })
    settings = cache_lib.CacheSettings(SourceSpec("webdataset", "gs://bucket/set-{00000..99999}.tar"),
                                       PreprocessSpec(resolution=1024), model={"vae": "0" * 64}, dtype="bfloat16")
    manifest = {"format": cache_lib.FORMAT, "version": cache_lib.VERSION, "settings": settings.to_json(),
                "layout": {"shard_size": shard_size, "num_items": samples, "num_shards": num_shards},
                "num_samples": int(counts.sum()), "num_skipped": skipped, "record": layout.to_json(),
                "shards": {"num_samples": counts.tolist(), "records_offset": [4096] * num_shards}}
    cache_lib.write_json(folder / cache_lib.MANIFEST, manifest)
    cache_lib.write_json(folder / cache_lib.SKIPPED,
                         [[f"{i // 10_000:05d}.tar/{i:09d}", "unreadable image"] for i in range(skipped)])

    tracemalloc.start()
    start = time.perf_counter()
    cache = cache_lib.LatentCache(folder, expected=settings)
    loader = cache_lib.make_loader(cache, global_batch_size=256, seed=0, process_index=3, process_count=32)
    cache_lib.batch_indices(len(cache), 8, 0, 3, 32)[123_456]  # a batch's indices, deep into the run
    open_s = time.perf_counter() - start
    open_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    start = time.perf_counter()
    listed = len(cache_lib.read_json(folder / cache_lib.SKIPPED))
    skipped_s = time.perf_counter() - start
    skipped_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    loader.close()
    assert listed == skipped and len(cache) == samples - skipped
    return {
        "samples": samples, "shards": num_shards, "skipped": skipped,
        "manifest_mib": (folder / cache_lib.MANIFEST).stat().st_size / 2**20,
        "open_cache_and_loader_s": open_s, "open_cache_and_loader_peak_mib": open_peak / 2**20,
        "skipped_list_mib": (folder / cache_lib.SKIPPED).stat().st_size / 2**20,
        "read_skipped_list_s": skipped_s, "read_skipped_list_peak_mib": skipped_peak / 2**20,
    }


def _child(function: str, env: dict | None = None, **kwargs) -> dict:
    """`function(**kwargs)` in a fresh Python process (its own memory peak, no warm state)."""
    code = f"import json, sys; from benchmarks.loader_throughput import {function}; " \
           f"print('RESULT ' + json.dumps({function}(**json.loads(sys.argv[1]))))"
    result = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=1800)
    if result.returncode:
        raise RuntimeError(f"{function} failed:\n{result.stderr[-4000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024, help="samples in the cache")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="the process's batch (global batch / processes)")
    parser.add_argument("--delays", default="0,15,40", help="milliseconds the emulator waits per request")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each loader runs after warm-up")
    parser.add_argument("--index-samples", type=int, default=10_000_000, help="samples of the synthetic manifest (0: none)")
    parser.add_argument("--reads-in-flight", type=int, default=None, help="the loader's; default: the trainer's default")
    parser.add_argument("--label", default="", help="added to the results' file name")
    parser.add_argument("--quick", action="store_true", help="small rows, short runs: checks the script")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    row = QUICK_ROW if args.quick else SDXL_ROW
    if args.quick:
        args.samples, args.shard_size, args.batch, args.seconds, args.delays = 128, 32, 16, 1.0, "0,20"
        args.index_samples = 100_000
    delays = [float(d) for d in args.delays.split(",")]
    probe = min(64, args.samples)

    from benchmarks.gcs_emulator import STATS_PATH, Emulator
    from sdxl_common import storage

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "cache"
        write_cache(local, args.samples, args.shard_size, row)
        files = sorted(str(p.relative_to(local)) for p in (local / "shards").iterdir())
        shard_bytes = min((local / f).stat().st_size for f in files)
        print(f"cache: {args.samples} samples in {len(files)} shards, {sum((local / f).stat().st_size for f in files) / 2**20:.0f} MiB",
              flush=True)
        result = _child("measure", location=str(local), batch=args.batch, seconds=args.seconds, probe_samples=probe, stats_url=None,
                        reads_in_flight=args.reads_in_flight)
        runs.append({"source": "local disk", "delay_ms": None, **result})
        print(f"local disk: {result['samples_per_s']:.0f} samples/s", flush=True)
        for delay in delays:
            emulator = Emulator(threaded=True, delay_ms=delay)
            with emulator as bucket:
                remote = f"{bucket}/cache"
                storage.upload_tree(local, remote)
                stats_url = emulator.url + STATS_PATH
                server = emulator.process.pid
                cpu0, wall0 = _cpu_seconds(server), time.perf_counter()
                result = _child("measure", location=remote, batch=args.batch, seconds=args.seconds,
                                probe_samples=probe, stats_url=stats_url, reads_in_flight=args.reads_in_flight)
                result["emulator_cpu_cores"] = (_cpu_seconds(server) - cpu0) / (time.perf_counter() - wall0)
                runs.append({"source": "gs:// emulator", "delay_ms": delay, **result})
                print(f"gs:// at {delay:g} ms a request: {result['samples_per_s']:.0f} samples/s", flush=True)
                if delay == 0:
                    alone = _child("emulator_alone", location=remote, batch=args.batch, seconds=args.seconds,
                                   bytes_per_sample=int(result["bytes_read_per_sample"]), shard_bytes=shard_bytes, files=files)
                    runs.append({"source": "gs:// emulator alone (no loader)", "delay_ms": 0.0, **alone})
                    print(f"emulator alone: {alone['samples_per_s']:.0f} samples/s", flush=True)
                    # The same bytes in four reads a sample: what a tensor per array would cost.
                    split = _child("emulator_alone", location=remote, batch=args.batch, seconds=args.seconds,
                                   bytes_per_sample=int(result["bytes_read_per_sample"]), shard_bytes=shard_bytes,
                                   files=files, reads_per_sample=4)
                    runs.append({"source": "gs:// emulator alone, 4 reads a sample", "delay_ms": 0.0, **split})
                    print(f"emulator alone, 4 reads a sample: {split['samples_per_s']:.0f} samples/s", flush=True)

    index = {}
    if args.index_samples:
        index = _child("index_at_scale", samples=args.index_samples, shard_size=256, skipped_share=0.01)
        print(f"a cache of {index['samples']:,} samples: manifest {index['manifest_mib']:.1f} MiB, cache and loader opened in "
              f"{index['open_cache_and_loader_s']:.2f} s ({index['open_cache_and_loader_peak_mib']:.1f} MiB); skipped list of "
              f"{index['skipped']:,} read in {index['read_skipped_list_s']:.2f} s ({index['read_skipped_list_peak_mib']:.0f} MiB)",
              flush=True)
    report = {
        "benchmark": "loader_throughput",
        "command": " ".join(["python -m benchmarks.loader_throughput", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}",
        "row_shapes": {name: list(shape) for name, shape in row.items()},
        "samples": args.samples,
        "shard_size": args.shard_size,
        "process_batch": args.batch,
        "reads_in_flight": args.reads_in_flight,
        "runs": [{k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()} for run in runs],
        "index": {k: round(v, 4) if isinstance(v, float) else v for k, v in index.items()},
    }
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    label = f"_{args.label}" if args.label else ""
    out = args.out / f"loader_throughput_{platform.machine()}{label}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def print_table(report: dict) -> None:
    print(f"\n{'source':40} {'delay':>6} {'samples/s':>10} {'req/sample':>10} {'read/needed':>11} {'peak RSS':>9} {'CPU cores':>9}")
    for run in report["runs"]:
        delay = "" if run["delay_ms"] is None else f"{run['delay_ms']:g} ms"
        ratio = run["bytes_read_per_sample"] / run["bytes_needed_per_sample"] if run.get("bytes_needed_per_sample") else None
        print(f"{run['source']:40} {delay:>6} {run['samples_per_s']:>10.0f} "
              f"{run.get('requests_per_sample', float('nan')):>10.2f} {ratio if ratio else float('nan'):>11.3f} "
              f"{run.get('peak_rss_mib', float('nan')):>6.0f} MiB {run.get('loader_cpu_cores', run.get('client_cpu_cores')):>9.2f}")


if __name__ == "__main__":
    main()
