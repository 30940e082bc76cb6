"""Where a model comes from: a local folder, a Hub id, a gs:// folder (sdxl_common.model_source).

The Hub is a fake one on localhost serving a repository laid out as
stabilityai/stable-diffusion-xl-base-1.0 is (tests/fixtures/sdxl_base_1.0_files.txt), with a tiny
SDXL pipeline's files where the downloaded folder must load and placeholder bytes elsewhere. It
answers the calls huggingface_hub makes (repo info, tree listing, HEAD/GET on /resolve/, large
files redirected to another origin as the Hub redirects them to its CDN) and records every request,
so the tests see exactly which files a download fetched and at which revision.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from sdxl_common import model_source, storage

# One worker builds the tiny pipeline and starts the fake Hub once for all of them.
pytestmark = pytest.mark.xdist_group("model_sources")

ROOT = Path(__file__).resolve().parent.parent
REPO_FILES = (Path(__file__).parent / "fixtures" / "sdxl_base_1.0_files.txt").read_text().split()
REPO_ID = "stabilityai/stable-diffusion-xl-base-1.0"
BRANCH = "sdxl-test-branch"  # the revision the tests ask for; the fake Hub has no "main" for this repo
# A separate VAE, as model.vae names one: weights in three forms, of which only one is loaded.
VAE_REPO = "example/sdxl-vae"
VAE_FILES = ["README.md", "config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
             "images/preview.png", "sdxl_vae.safetensors"]
# The Hub keeps these in LFS (the repository's .gitattributes): their /resolve/ answer is a redirect.
LFS_SUFFIXES = (".safetensors", ".msgpack", ".onnx", ".onnx_data", ".bin", ".png")
TINY_SIZES = dict(seed=0, image_size=16, layers_per_block=1, transformer_layers_per_block=(1, 1), text_layers=1)


def _fp16_copy(source: Path) -> bytes:
    from safetensors.numpy import load_file, save

    tensors = load_file(str(source))
    return save({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()})


def repo_contents(tiny: Path) -> dict[str, bytes]:
    """Every path of the real repository: the tiny pipeline's file where it has one, its weights cast to
    fp16 for the .fp16 variants, placeholder bytes for the rest (no test may load those)."""
    files = {}
    for path in REPO_FILES:
        plain = tiny / path.replace(".fp16.", ".")
        if ".fp16." in path and plain.is_file():
            files[path] = _fp16_copy(plain)
        elif (tiny / path).is_file():
            files[path] = (tiny / path).read_bytes()
        else:
            files[path] = f"placeholder for {path}\n".encode()
    return files


class FakeHub:
    """Model repositories served on 127.0.0.1, each at one branch (and its commit); LFS files from a second origin.

    ``repos``: repo id -> (branch, {path: bytes}). Every request is recorded in ``requests`` as
    (repo id, kind, method, revision, path) with kind "api", "tree", "resolve" or "blob"; the
    files whose bytes were sent are in ``fetched`` as (repo id, path).
    """

    def __init__(self, repos: dict[str, tuple[str, dict[str, bytes]]]):
        self.repos = repos
        self.commits = {repo: hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest() for repo, (branch, _) in repos.items()}
        self.blobs = {f"/blobs/{repo}/{hashlib.sha256(data).hexdigest()}": (repo, path)
                      for repo, (_, files) in repos.items() for path, data in files.items()}
        self.requests: list[tuple[str, str, str, str, str]] = []
        self.fetched: list[tuple[str, str]] = []
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self.hub, self.cdn = self._serve(), self._serve()
        self.endpoint = f"http://127.0.0.1:{self.hub.server_port}"

    def _serve(self) -> http.server.ThreadingHTTPServer:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear(), self.fetched.clear(), self.unexpected.clear()

    def fetched_files(self, repo: str) -> list[str]:
        return sorted(path for r, path in self.fetched if r == repo)

    def requested_files(self, repo: str) -> set[str]:
        return {path for r, kind, _, _, path in self.requests if r == repo and kind == "resolve"}

    def revisions(self, repo: str) -> set[str]:
        return {revision for r, kind, _, revision, _ in self.requests if r == repo and kind != "blob"}

    def _record(self, *entry) -> None:
        with self._lock:
            self.requests.append(entry)

    def _answer(self, request: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(request.path).path)
        if path in self.blobs:
            repo, name = self.blobs[path]
            self._record(repo, "blob", request.command, "", name)
            return self._send(request, self.repos[repo][1][name], body, fetched=(repo, name))
        if path == "/api/agent-harnesses":  # huggingface_hub's daily look-up for its user agent; not about models
            return self._error(request, "EntryNotFound")
        for repo, (branch, files) in self.repos.items():
            commit = self.commits[repo]
            api, resolve = f"/api/models/{repo}", f"/{repo}/resolve/"
            if path == api or path.startswith(api + "/revision/"):
                revision = path[len(api + "/revision/"):] if path != api else "main"
                self._record(repo, "api", request.command, revision, "")
                if revision not in (branch, commit):
                    return self._error(request, "RevisionNotFound")
                info = {"id": repo, "sha": commit, "private": False, "siblings": [{"rfilename": p} for p in sorted(files)]}
                return self._send(request, json.dumps(info).encode(), body)
            if path.startswith(api + "/tree/"):
                revision, _, under = path[len(api + "/tree/"):].partition("/")
                self._record(repo, "tree", request.command, revision, under)
                if revision not in (branch, commit):
                    return self._error(request, "RevisionNotFound")
                return self._send(request, json.dumps(self._tree(files, under)).encode(), body)
            if path.startswith(resolve):
                revision, _, name = path[len(resolve):].partition("/")
                self._record(repo, "resolve", request.command, revision, name)
                if revision not in (branch, commit):
                    return self._error(request, "RevisionNotFound")
                if name not in files:
                    return self._error(request, "EntryNotFound", {"X-Repo-Commit": commit})
                data = files[name]
                if name.endswith(LFS_SUFFIXES):
                    # As the Hub answers for an LFS file: its metadata here, its bytes from another origin.
                    blob = hashlib.sha256(data).hexdigest()
                    request.send_response(302)
                    for key, value in {
                        "Location": f"http://127.0.0.1:{self.cdn.server_port}/blobs/{repo}/{blob}",
                        "X-Repo-Commit": commit, "X-Linked-Etag": f'"{blob}"', "X-Linked-Size": str(len(data)),
                        "ETag": f'"{_git_oid(data)}"', "Content-Length": "0",
                    }.items():
                        request.send_header(key, value)
                    request.end_headers()
                    return
                return self._send(request, data, body, fetched=(repo, name),
                                  headers={"X-Repo-Commit": commit, "ETag": f'"{_git_oid(data)}"'})
        with self._lock:
            self.unexpected.append(f"{request.command} {request.path}")
        self._error(request, "RepoNotFound")

    @staticmethod
    def _tree(files: dict[str, bytes], under: str) -> list[dict]:
        prefix = under.rstrip("/") + "/" if under else ""
        entries, folders = [], set()
        for name in sorted(n for n in files if n.startswith(prefix)):
            parts = name.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "path": name, "size": len(files[name]), "oid": _git_oid(files[name])}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(files[name]).hexdigest(), "size": len(files[name]), "pointerSize": 134}
            entries.append(entry)
        return entries + [{"type": "directory", "path": f, "oid": _git_oid(f.encode())} for f in sorted(folders)]

    def _send(self, request, data: bytes, body: bool, *, fetched=None, headers=None) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            if fetched:  # before the bytes go: the client may be done before this thread runs again
                with self._lock:
                    self.fetched.append(fetched)
            request.wfile.write(data)

    @staticmethod
    def _error(request, code: str, headers=None) -> None:
        request.send_response(404)
        for key, value in {"X-Error-Code": code, "Content-Length": "0", **(headers or {})}.items():
            request.send_header(key, value)
        request.end_headers()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from flax_train.demo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", **TINY_SIZES)


@pytest.fixture(scope="module")
def hub(tiny):
    vae = {name: (tiny / "vae" / name).read_bytes() if (tiny / "vae" / name).is_file() else f"placeholder {name}\n".encode()
           for name in VAE_FILES}
    server = FakeHub({REPO_ID: (BRANCH, repo_contents(tiny)), VAE_REPO: ("main", vae)})
    yield server
    server.close()


@pytest.fixture
def hub_env(hub, tmp_path):
    """A fresh huggingface_hub cache, online, pointed at the fake Hub (read at import: hence subprocesses)."""
    hub.reset()
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def run(args: list[str], env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def expected_pipeline_files(variant: str | None) -> set[str]:
    weights = "fp16.safetensors" if variant else "safetensors"
    return {
        "model_index.json",
        "scheduler/scheduler_config.json",
        *(f"{c}/config.json" for c in ("unet", "vae", "text_encoder", "text_encoder_2")),
        *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2")
          for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")),
        f"unet/diffusion_pytorch_model.{weights}",
        f"vae/diffusion_pytorch_model.{weights}",
        f"text_encoder/model.{weights}",
        f"text_encoder_2/model.{weights}",
    }


def snapshot(env: dict, repo: str, hub: FakeHub) -> Path:
    return Path(env["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / hub.commits[repo]


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def assert_fetched_only(hub: FakeHub, repo: str, expected: set[str]) -> None:
    assert hub.unexpected == []
    # Every needed file was asked for, nothing else was, and no file was sent twice. (Identical
    # files are stored once by huggingface_hub, so a second one may be asked for but not sent.)
    assert hub.requested_files(repo) == expected
    assert set(hub.fetched_files(repo)) <= expected
    assert len(hub.fetched_files(repo)) == len(set(hub.fetched_files(repo)))


# ---------------------------------------------------------------------------------------------
# Which files


def test_needed_files_of_sdxl_base_are_one_precision_of_the_named_components():
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             **{c: ["diffusers", "x"] for c in ("unet", "vae", "scheduler")},
             **{c: ["transformers", "x"] for c in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}}
    for variant in (None, "fp16"):
        assert set(model_source.needed_files(REPO_FILES, index=index, variant=variant)) == expected_pipeline_files(variant)
    with pytest.raises(FileNotFoundError, match="variant=bf16"):
        model_source.needed_files(REPO_FILES, index=index, variant="bf16")
    assert model_source.needed_files(VAE_FILES, index=None, variant=None) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        model_source.needed_files(["config.json", "diffusion_pytorch_model.bin"], index=None, variant=None)


def test_locations():
    assert model_source.is_hub_id("stabilityai/stable-diffusion-xl-base-1.0")
    assert not model_source.is_hub_id("./runs/export") and not model_source.is_hub_id("/abs/x")
    assert not model_source.is_hub_id("gs://bucket/x") and not model_source.is_hub_id("runs/demo/base/unet")
    assert storage.is_remote("gs://bucket/x") and not storage.is_remote("runs/x")
    assert model_source.local_folder("~/somewhere") == Path.home() / "somewhere"  # a local folder is itself


# ---------------------------------------------------------------------------------------------
# Hub ids


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_flax_train_prepare_fetches_only_what_loads_at_the_revision(hub, hub_env, tiny, tmp_path, variant):
    from flax_train import models
    from sdxl_common import sdxl
    from flax_train.demo import synthetic

    data = synthetic.write_synthetic_dataset(tmp_path / "data", 8, image_size=16, seed=0)
    run([sys.executable, "-m", "flax_train.cli", "prepare", "--config", "flax_train/demo/demo.yaml",
         f"model.pretrained={REPO_ID}", f"model.revision={BRANCH}", f"model.variant={variant or 'null'}",
         f"model.vae={VAE_REPO}", f"data.path={data}", "data.resolution=16", f"run_dir={tmp_path / 'run'}",
         "train.global_batch_size=8"], hub_env)

    expected = expected_pipeline_files(variant)
    assert_fetched_only(hub, REPO_ID, expected)
    # The branch asked for reached the Hub, and every file came from the commit it names then.
    assert BRANCH in hub.revisions(REPO_ID) and hub.revisions(REPO_ID) <= {BRANCH, hub.commits[REPO_ID]}
    assert_fetched_only(hub, VAE_REPO, {"config.json", "diffusion_pytorch_model.safetensors"})
    folder = snapshot(hub_env, REPO_ID, hub)
    assert files_under(folder) == expected
    prompts = ["a red circle", "a blue square"]
    for ours, theirs in zip(sdxl.tokenize(sdxl.load_tokenizers(folder), prompts),
                            sdxl.tokenize(sdxl.load_tokenizers(tiny), prompts)):
        np.testing.assert_array_equal(ours, theirs)
    unet = models.load(folder / "unet")
    assert unet.config["sample_size"] == 8

    # Once fetched, the same folder offline, without a request.
    hub.reset()
    code = ("import sys; from sdxl_common import model_source; "
            "print(model_source.local_folder(sys.argv[1], revision=sys.argv[2], variant=sys.argv[3] or None))")
    result = run([sys.executable, "-c", code, REPO_ID, BRANCH, variant or ""], {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert Path(result.stdout.strip().splitlines()[-1]) == folder and hub.requests == []


def test_xla_infer_fetches_the_same_files(hub, hub_env, tmp_path):
    out = tmp_path / "images"
    run([sys.executable, "-m", "xla_infer.cli", "--model", REPO_ID, "--revision", BRANCH, "--variant", "fp16",
         "--prompt", "a red circle", "--device", "cpu", "--dtype", "fp32", "--steps", "1", "--out", str(out)], hub_env)

    assert_fetched_only(hub, REPO_ID, expected_pipeline_files("fp16"))
    assert BRANCH in hub.revisions(REPO_ID) and hub.revisions(REPO_ID) <= {BRANCH, hub.commits[REPO_ID]}
    assert (out / "00000.png").is_file()
    assert json.loads((out / "manifest.json").read_text())["pipeline"]["model"] == REPO_ID


@pytest.mark.parametrize(
    "case, expected_status, expected",
    [
        ("no such repository", 2, "example/no-such-model: no such model on the Hub"),
        ("no such revision", 2, f"{REPO_ID}: no revision 'no-such-branch'"),
        ("Hub unreachable", 1, f"{REPO_ID}: the Hub cannot be reached and the local Hub cache does not hold this model"),
    ],
)
def test_hub_errors_are_one_line_sorted_into_input_and_failure(hub, hub_env, tmp_path, case, expected_status, expected):
    model, revision, env = REPO_ID, BRANCH, hub_env
    if case == "no such repository":
        model = "example/no-such-model"
    elif case == "no such revision":
        revision = "no-such-branch"
    else:
        env = {**hub_env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on the discard port
    result = subprocess.run([sys.executable, "-m", "xla_infer.cli", "--model", model, "--revision", revision,
                             "--prompt", "a red circle", "--device", "cpu", "--out", str(tmp_path / "out")],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == expected_status, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"xla-infer: error: {expected}"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# gs:// folders


def upload(local: Path, url: str) -> None:
    from etils import epath

    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        target = epath.Path(url) / path.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())


@pytest.fixture
def model_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "models"))
    return tmp_path / "models"


def test_gs_folder_is_copied_once_and_loads(gcs_bucket, tiny, model_cache, tmp_path, monkeypatch):
    from flax_train import models
    from sdxl_common import sdxl

    url = f"{gcs_bucket}/{tmp_path.name}/sdxl"
    upload(tiny, url)
    folder = models.resolve_pipeline(url)
    assert folder.parent == model_cache
    assert files_under(folder) == files_under(tiny)
    assert all((folder / f).read_bytes() == (tiny / f).read_bytes() for f in files_under(tiny))
    assert len(sdxl.load_tokenizers(folder)) == 2
    assert models.load(folder, subfolder="unet").config["sample_size"] == 8
    vae = models.resolve_folder(f"{url}/vae")  # a component folder, as model.vae names one
    assert files_under(vae) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert models.load(vae).config["latent_channels"] == 4

    def no_copy(*args):
        raise AssertionError("copied again")

    with monkeypatch.context() as patch:
        patch.setattr(storage, "copy_file", no_copy)
        assert models.resolve_pipeline(url) == folder

    # A changed remote folder is a new copy; the old one is left as it was.
    from etils import epath

    scheduler = epath.Path(url) / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text() + "\n")
    changed = models.resolve_pipeline(url)
    assert changed != folder and (changed / "scheduler/scheduler_config.json").read_text().endswith("\n\n")
    assert (folder / "scheduler/scheduler_config.json").read_bytes() == (tiny / "scheduler/scheduler_config.json").read_bytes()
    assert sorted(p.name for p in model_cache.iterdir()) == sorted([folder.name, changed.name, vae.name])


def test_gs_copy_interrupted_is_never_used(gcs_bucket, tiny, model_cache, tmp_path, monkeypatch):
    url = f"{gcs_bucket}/{tmp_path.name}/sdxl"
    upload(tiny, url)
    copy, calls = storage.copy_file, []

    def dies_midway(source, destination):
        calls.append(destination)
        if len(calls) == 3:
            raise OSError("connection reset")
        copy(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr(storage, "copy_file", dies_midway)
        with pytest.raises(OSError, match="connection reset"):
            model_source.local_folder(url)
    assert list(model_cache.iterdir()) == []  # nothing that could pass for a copy, nothing left over

    # What a killed process leaves: a partial folder. It is not taken for the copy.
    folder = model_source.local_folder(url)
    shutil.rmtree(folder)
    partial = model_cache / f".{folder.name}.killed.partial"
    (partial / "unet").mkdir(parents=True)
    (partial / "model_index.json").write_bytes((tiny / "model_index.json").read_bytes())
    again = model_source.local_folder(url)
    assert again == folder and files_under(again) == files_under(tiny)


def test_gs_concurrent_copies_on_one_host_agree(gcs_bucket, tiny, model_cache, tmp_path, monkeypatch):
    url = f"{gcs_bucket}/{tmp_path.name}/sdxl"
    upload(tiny, url)
    copy, both_copying = storage.copy_file, threading.Barrier(2, timeout=60)

    def copy_together(source, destination):
        if destination.name == "model_index.json":
            both_copying.wait()  # both processes are mid-copy; both will try to rename
        copy(source, destination)

    monkeypatch.setattr(storage, "copy_file", copy_together)
    results = []
    threads = [threading.Thread(target=lambda: results.append(model_source.local_folder(url))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert files_under(results[0]) == files_under(tiny)
    assert [p.name for p in model_cache.iterdir()] == [results[0].name]  # the loser's copy is gone
