"""Where a model comes from: one function turns a model location into a local diffusers folder.

    folder = model_source.local_folder("stabilityai/stable-diffusion-xl-base-1.0", variant="fp16")
    vae = model_source.local_folder("gs://bucket/sdxl-vae", component=True)

A location is

- a local folder: used where it is, nothing copied or checked here (the loaders say what is missing);
- a Hub id ("owner/name"): downloaded into the huggingface_hub cache at ``revision``;
- a URL that ``etils.epath`` reads (``gs://bucket/folder``, anything with "://"): copied to a local
  cache folder, because safetensors maps weights from local files and diffusers and transformers
  load from local folders only;
- a single-file checkpoint (a local path or URL ending in ``.safetensors``, such as Stability's
  ``sd_xl_base_1.0.safetensors``): converted once into a diffusers folder in the same cache
  (``sdxl_common.single_file``), with the configs of the ``config`` folder or else the shipped SDXL
  base or refiner configs.

From a Hub repo or a URL only the files loading the model reads are fetched, chosen as diffusers'
``DiffusionPipeline.download`` chooses them: ``model_index.json``; for a component folder holding
weights its ``config.json`` and the safetensors weights of one precision (the ``variant``'s files
where the folder has them, as diffusers' ``variant_compatible_siblings`` picks); every file of the
other folders (tokenizers, scheduler). Unlike ``DiffusionPipeline.download`` (diffusers 0.42), only
the folders ``model_index.json`` names are read: it also fetches the weights of every other folder
holding a ``diffusion_pytorch_model.safetensors``, such as ``vae_1_0/`` in
stabilityai/stable-diffusion-xl-base-1.0 (335 MB that nothing loads).

Both the trainer (``flax_train.models.resolve_pipeline``) and ``xla_infer`` go through here, so
they fetch the same files. This module imports neither JAX nor torch at import time, so
``xla_infer`` can use it; diffusers (hence torch) is imported only to fetch from a Hub repo or URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from sdxl_common import storage
from sdxl_common.errors import BadInput, InputNotFound, RunFailure
from sdxl_common.storage import PathLike

# Where copies of remote folders go: $SDXL_TPU_MODEL_CACHE, or ~/.cache/sdxl-tpu/models.
CACHE_ENV = "SDXL_TPU_MODEL_CACHE"
# Files of these kinds make a folder a model's. Only safetensors are ever fetched: pickles can run
# code when loaded, the others are for other runtimes.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".onnx", ".onnx_data", ".pb", ".ckpt", ".pt", ".pth")
SINGLE_FILE_SUFFIX = ".safetensors"
_PICKLE_FILES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# Files of a pipeline folder that hold no weights: all a single file needs from its config folder.
_CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/*.txt", "tokenizer*/*.json", "scheduler/*.json"]


def is_hub_id(location: PathLike) -> bool:
    """Whether ``location`` reads as a Hub id: "owner/name" and no local path of that name."""
    text = str(location)
    return (
        text.count("/") == 1
        and not text.startswith((".", "/", "~"))
        and "\\" not in text
        and not storage.is_remote(text)
        and not os.path.exists(text)
    )


def local_folder(
    location: PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    component: bool = False,
    config: PathLike | None = None,
) -> Path:
    """The local diffusers folder of ``location`` (a folder, a Hub id, a URL or a single
    ``.safetensors`` file; see the module doc).

    ``component=False``: a whole pipeline (``model_index.json`` and one folder per component).
    ``component=True``: one component's folder (``config.json`` and weights), such as a separate VAE.
    ``revision`` (branch, tag or commit) applies to a Hub id; ``variant`` ("fp16") picks the
    ``*.fp16.safetensors`` weights from a Hub repo or a URL. A local folder is returned as it is.
    ``config``: for a single file, the diffusers pipeline (folder, Hub id at ``revision``, or URL)
    whose configs, tokenizers and scheduler go with its weights, as diffusers'
    ``from_single_file(config=...)``; None: the shipped SDXL base or refiner configs.
    """
    if not component and str(location).endswith(_PICKLE_FILES):
        raise BadInput(f"{location}: a pickle checkpoint; only .safetensors single files are read "
                       "(unpickling can run arbitrary code)")
    if not component and str(location).endswith(SINGLE_FILE_SUFFIX):
        return _convert_single_file(str(location), config=config, revision=revision)
    if storage.is_remote(location):
        return _copy_remote(str(location), variant=variant, component=component)
    if is_hub_id(location):
        return _download(str(location), revision=revision, variant=variant, component=component)
    return Path(os.path.expanduser(str(location)))


# ---------------------------------------------------------------------------------------------
# Which files


def _pipeline_components(index: Mapping) -> list[str]:
    # model_index.json maps each component to [library, class]; [null, null] marks an absent one.
    return sorted(
        name for name, value in index.items()
        if not name.startswith("_") and isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None
    )


def needed_files(names: Iterable[str], *, index: Mapping | None, variant: str | None) -> list[str]:
    """The files of a folder listing (``/``-separated relative paths) that loading it reads.

    ``index``: the folder's ``model_index.json`` for a pipeline, None for a single component.
    """
    from diffusers.pipelines.pipeline_loading_utils import variant_compatible_siblings

    names = sorted(names)
    folders = [f"{name}/" for name in _pipeline_components(index)] if index is not None else [""]
    chosen = ["model_index.json"] if index is not None else []
    weight_files = []
    for folder in folders:
        files = [n for n in names if n.startswith(folder) and "/" not in n[len(folder):]]
        # A pipeline's folders without weights (tokenizers, scheduler) are taken whole.
        if index is None or any(n.endswith(_WEIGHT_SUFFIXES) for n in files):
            chosen.append(f"{folder}config.json")
            weight_files += [n for n in files if n.endswith(".safetensors") or ".safetensors.index" in n]
        else:
            chosen += files
    try:
        weights, _ = variant_compatible_siblings(weight_files, variant=variant)
    except ValueError as err:  # the variant exists in none of the folders
        raise InputNotFound(str(err)) from None
    missing = [f or "./" for f in folders if f"{f}config.json" in chosen and not any(w.startswith(f) for w in weights)]
    if missing:
        raise InputNotFound(f"no safetensors weights in {', '.join(missing)}")
    return sorted(set(chosen + list(weights)) & set(names))


# ---------------------------------------------------------------------------------------------
# Hub


def _download(repo_id: str, *, revision: str | None, variant: str | None, component: bool,
              configs_only: bool = False) -> Path:
    """Sorts what the Hub answers into the user's errors (no such repo, revision or file; a gated
    repo) and failures to reach it (no network, offline mode without a cached copy, server errors)."""
    from huggingface_hub import errors as hub

    def first_line(err: Exception) -> str:
        return (str(err).strip() or type(err).__name__).splitlines()[0]

    try:
        return _fetch_from_hub(repo_id, revision=revision, variant=variant, component=component,
                               configs_only=configs_only)
    except hub.GatedRepoError as err:
        raise BadInput(f"{repo_id} is gated: accept its terms on the Hub, then log in "
                       f"(`hf auth login` or HF_TOKEN) ({first_line(err)})") from None
    except (hub.RevisionResolutionError, hub.LocalEntryNotFoundError) as err:
        raise RunFailure(f"{repo_id}: the Hub cannot be reached and the local Hub cache does not hold "
                         f"this model: {first_line(err)}") from None
    except hub.RevisionNotFoundError:
        raise InputNotFound(f"{repo_id}: no revision {revision!r} (a branch, tag or commit) on the Hub") from None
    except hub.RepositoryNotFoundError:
        raise InputNotFound(f"{repo_id}: no such model on the Hub (or it is private and you are not "
                            "logged in: `hf auth login` or HF_TOKEN)") from None
    except hub.EntryNotFoundError as err:
        raise InputNotFound(f"{repo_id}: {first_line(err)}") from None
    except (hub.HfHubHTTPError, OSError) as err:  # requests' errors are OSErrors
        raise RunFailure(f"{repo_id}: could not fetch from the Hub: {first_line(err)}") from None


def _fetch_from_hub(repo_id: str, *, revision: str | None, variant: str | None, component: bool,
                    configs_only: bool) -> Path:
    from huggingface_hub import HfApi, get_cached_repo_tree, hf_hub_download, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    api = HfApi()
    # Every file below comes from this one commit, even if the branch moves meanwhile. Offline,
    # the commit a previous download recorded for the branch.
    revision = api.resolve_revision(repo_id, revision=revision)
    if configs_only:  # a single file's config folder: its weights would go unread
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_CONFIG_PATTERNS))
    index = None
    if not component:
        index = storage.read_json(hf_hub_download(repo_id, "model_index.json", revision=revision))
    try:  # the listing snapshot_download cached: no request, and it works offline
        names = [f.path for f in get_cached_repo_tree(repo_id, revision=revision.resolved)]
    except CachedRepoTreeNotFoundError:
        names = [s.rfilename for s in api.model_info(repo_id, revision=revision.resolved).siblings]
    files = needed_files(names, index=index, variant=variant)
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))


# ---------------------------------------------------------------------------------------------
# URLs


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/sdxl-tpu/models"))


def _copy_remote(url: str, *, variant: str | None, component: bool) -> Path:
    """A local copy of the needed files under ``url``, made once per version of the remote folder.

    The copy's name holds a hash of the URL and of the chosen files' names, sizes and modification
    times: a changed remote folder gets a new copy (older copies stay until deleted by hand), an
    unchanged one is not copied again. A copy is built in a temporary folder next to it and renamed
    into place when complete, so an interrupted copy is never taken for a finished one; processes
    copying the same folder at once (several on one host) each build their own and the first rename
    wins (``_build_once``). Each host of a multi-host job copies to its own disk.
    """
    root = storage.path(url)
    stats = _listing(root) if root.is_dir() else {}
    if not stats:
        raise InputNotFound(f"{url}: no such folder (or it is empty)")
    index = None
    if not component:
        if "model_index.json" not in stats:
            raise InputNotFound(f"{url} is not a diffusers pipeline folder (no model_index.json)")
        index = storage.read_json(root / "model_index.json")
    files = needed_files(stats, index=index, variant=variant)
    key = hashlib.sha256(json.dumps([url, [(f, stats[f].length, stats[f].mtime) for f in files]]).encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-80:] + "-" + key.hexdigest()[:16]

    def copy(partial: Path) -> None:
        for relative in files:
            storage.copy_file(root / relative, partial / relative)

    return _build_once(cache_root() / name, copy)


def _build_once(target: Path, build) -> Path:
    """``target``, made by ``build(folder)`` in a temporary folder beside it and renamed into place
    when complete, unless it exists already: an interrupted build (killed, or failed with an
    error) is never taken for a finished one. Processes building the same folder at once (several
    on one host) each build their own and the first rename wins."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        build(partial)
        os.rename(partial, target)
    except OSError:
        if not target.is_dir():
            raise
        # Another process finished the same build first: its folder is as good as ours.
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _listing(folder) -> dict:
    """Relative path -> stat of every file under the ``epath.Path`` ``folder`` (which has no
    recursive glob on object stores)."""
    files = {}
    for path in folder.iterdir():
        stat = path.stat()
        if stat.is_directory:
            files.update({f"{path.name}/{name}": inner for name, inner in _listing(path).items()})
        else:
            files[path.name] = stat
    return files


# ---------------------------------------------------------------------------------------------
# Single files


def _convert_single_file(location: str, *, config: PathLike | None, revision: str | None) -> Path:
    """The diffusers folder converted from the single file at ``location`` (see ``local_folder``).

    Converted once per version of the file and of the config folder: the folder's name holds a hash
    of the file's location, size and modification time and of the config folder's files (names,
    sizes, modification times), so a changed file or config is converted again. Built aside and
    renamed into place (``_build_once``), so a killed conversion leaves nothing that is used.
    """
    from sdxl_common import single_file

    remote = storage.is_remote(location)
    source = storage.path(location) if remote else Path(os.path.expanduser(location))
    if not source.is_file():
        raise InputNotFound(f"{location}: no such file")
    if config is None:
        configs = None
    elif is_hub_id(config):
        configs = _download(str(config), revision=revision, variant=None, component=False, configs_only=True)
    else:
        configs = local_folder(config)
    if configs is not None and not (configs / "model_index.json").is_file():
        raise InputNotFound(f"{config}: not a diffusers pipeline folder (no model_index.json), so it cannot "
                            "give the single file's configs")
    stat = source.stat()
    size, mtime = (stat.length, stat.mtime) if remote else (stat.st_size, stat.st_mtime_ns)
    # Without a config folder, the shipped configs (both: which one applies is read from the file).
    config_root = configs or single_file.CONFIGS_DIR
    config_files = sorted((str(p.relative_to(config_root)), p.stat().st_size, p.stat().st_mtime_ns)
                          for p in config_root.rglob("*") if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES))
    where = location if remote else str(source.resolve())
    key = hashlib.sha256(json.dumps([where, size, mtime, str(config_root), config_files]).encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name)[-80:] + "-" + key.hexdigest()[:16]

    def convert(partial: Path) -> None:
        local = source
        if remote:  # safetensors reads local files only
            local = partial / ".download" / source.name
            storage.copy_file(source, local)
        single_file.convert_to_folder(local, partial, configs)
        if remote:
            shutil.rmtree(partial / ".download")

    return _build_once(cache_root() / name, convert)
