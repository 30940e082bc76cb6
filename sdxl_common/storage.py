"""Where outputs live: a local folder or any URL ``etils.epath`` supports (``gs://bucket/...``).

Every run path goes through ``epath.Path``, one type for both, so ``run_dir=gs://b/x`` reaches
Cloud Storage instead of a local folder named ``gs:`` (what ``pathlib.Path("gs://b/x")`` becomes).
Object stores have no rename and no append, which shapes the two writers here:

- a file is written whole: locally to a temporary name renamed into place, remotely as one upload
  (an object becomes visible only once its upload completes), so a reader never sees half a file;
- a folder (an export) is built on local disk, then published: renamed into place locally;
  uploaded remotely with its marker file (``model_index.json``) last and the old marker removed
  first, so a reader that finds the marker finds a complete folder.

No JAX here: ``xla_infer`` writes its images through it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from etils import epath

from sdxl_common import errors

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    return "://" in str(path)


def path(location: PathLike) -> epath.Path:
    """The one path type for run outputs; ``~`` is expanded for local paths."""
    return epath.Path(location if is_remote(location) else os.path.expanduser(str(location)))


def read_json(file: PathLike) -> dict:
    """A JSON object from a file the user gave (a config in a model folder): a missing or malformed
    file is the user's error and says which file."""
    file = path(file)
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise errors.InputNotFound(f"{file}: no such file") from None
    except (ValueError, OSError) as error:  # not JSON, not UTF-8, a folder
        raise errors.BadInput(f"{file}: not a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise errors.BadInput(f"{file}: holds a JSON {type(value).__name__}, not an object")
    return value


def writable_folder(target: PathLike) -> epath.Path:
    """``target`` once it is known to take files, checked before any long work so that a bad output
    path fails in the first second, in one line, not after minutes of generating. Nothing is left
    behind: a missing local folder is not created here (its nearest existing parent is tried)."""
    out = path(target)
    try:
        if is_remote(target) or out.is_dir():
            probe = out / f".write-test-{uuid.uuid4().hex}"  # unique: every host of a pod may probe at once
            probe.write_bytes(b"")
            probe.unlink()
            return out
        parent = Path(str(out))
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is a file")
        Path(tempfile.mkdtemp(dir=parent, prefix=".write-test-")).rmdir()
    except OSError as error:
        raise errors.BadInput(f"{target}: cannot write there ({error.strerror or error})") from None
    return out


def atomic_write_bytes(target: PathLike, data: bytes) -> None:
    """All or nothing: never a truncated file where ``target`` is, even if the process dies."""
    if is_remote(target):
        path(target).write_bytes(data)
        return
    local = Path(os.path.expanduser(str(target)))
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_ranges(requests: list[tuple[PathLike, int, int]]) -> list[bytes]:
    """``[(file, start, end), ...]`` -> the bytes ``[start, end)`` of each file, in order.

    Remote files are read with one ranged request each, all in flight at once (gcsfs, at most
    128 together), so a batch of reads costs about one request's latency, not the sum of them. Local
    files are read with ``os.pread``.
    """
    remote = [i for i, (file, _, _) in enumerate(requests) if is_remote(file)]
    out: list[bytes] = [b""] * len(requests)
    if remote:
        import fsspec

        protocol = str(requests[remote[0]][0]).split("://")[0]
        # For gs://, the instance etils.epath uses (fsspec keeps one per set of arguments).
        fs = fsspec.filesystem(protocol, **({"finalize_on_close": True} if protocol in ("gs", "gcs") else {}))
        got = fs.cat_ranges([str(requests[i][0]) for i in remote], [requests[i][1] for i in remote],
                            [requests[i][2] for i in remote], on_error="raise")
        for i, data in zip(remote, got):
            out[i] = data
    opened: dict[str, int] = {}
    try:
        for i, (file, start, end) in enumerate(requests):
            if is_remote(file):
                continue
            name = os.path.expanduser(str(file))
            if name not in opened:
                opened[name] = os.open(name, os.O_RDONLY)
            out[i] = os.pread(opened[name], end - start, start)
    finally:
        for fd in opened.values():
            os.close(fd)
    for (file, start, end), data in zip(requests, out):
        if len(data) != end - start:
            raise OSError(f"{file}: asked for bytes {start}-{end}, got {len(data)} bytes (a truncated file?)")
    return out


def copy_file(source: PathLike, destination: PathLike) -> None:
    """One file, local or remote on either side, streamed (weights can be many GB)."""
    destination = path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with path(source).open("rb") as src, destination.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)


def upload_tree(source: PathLike, target: PathLike, *, last: str | None = None) -> None:
    """Copies the files under local folder ``source`` to ``target``; the file named ``last`` (relative
    to ``source``) is copied after all the others."""
    source = Path(source)
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    files.sort(key=lambda p: str(p) == last)  # stable: only moves `last` to the end
    for relative in files:
        copy_file(source / relative, path(target) / str(relative))


def publish_folder(local: Path, target: PathLike, *, marker: str) -> epath.Path:
    """Moves the finished local folder ``local`` to ``target``, replacing what was there (see the
    module doc). ``local`` should sit next to ``target`` when both are local, so the move is a rename."""
    out = path(target)
    if not is_remote(target):
        if out.exists():
            shutil.rmtree(str(out))
        os.replace(local, str(out))
        return out
    if (out / marker).exists():
        (out / marker).unlink()  # first: from here on readers see no (complete) folder
    if out.exists():
        out.rmtree()
    upload_tree(local, out, last=marker)
    shutil.rmtree(local)
    return out


def staging_dir(target: PathLike) -> Path:
    """An empty local folder to build ``target`` in before ``publish_folder``: a sibling for a local
    target (so publishing is a rename on the same file system), a temporary folder for a URL."""
    if is_remote(target):
        return Path(tempfile.mkdtemp(prefix="sdxl-tpu-staging-"))
    out = Path(os.path.expanduser(str(target)))
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted earlier attempt
    staging.mkdir(parents=True)
    return staging
