"""sdxl_common.storage: files appear whole or not at all, folders are published whole, and an output
path that cannot take files is refused before any work (local paths; gs:// runs in test_pods.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sdxl_common import errors, storage


def test_a_write_that_fails_half_way_leaves_nothing_under_the_name(tmp_path):
    # A process whose files cannot grow past 64 KiB (as on a full disk) writes 1 MiB.
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        from sdxl_common import storage
        storage.atomic_write_bytes({str(tmp_path / "image.png")!r}, b"x" * (1 << 20))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "File too large" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither a truncated image.png nor its temporary file

    storage.atomic_write_bytes(tmp_path / "deeper" / "image.png", b"complete")
    assert (tmp_path / "deeper" / "image.png").read_bytes() == b"complete"
    assert [p.name for p in (tmp_path / "deeper").iterdir()] == ["image.png"]


def test_publishing_a_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.json").write_text("{}")
    staging = storage.staging_dir(target)
    assert staging.parent == tmp_path and not any(staging.iterdir())  # a sibling: publishing is a rename
    (staging / "unet").mkdir()
    (staging / "unet" / "config.json").write_text("{}")
    (staging / "model_index.json").write_text("{}")
    storage.publish_folder(staging, target, marker="model_index.json")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["model_index.json", "unet", "unet/config.json"]
    assert not staging.exists()


def test_an_output_folder_that_cannot_take_files_is_refused_and_nothing_is_created(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for bad in (a_file, a_file / "below"):
        with pytest.raises(errors.BadInput, match="cannot write there"):
            storage.writable_folder(bad)
    missing = tmp_path / "new" / "folder"
    assert storage.writable_folder(missing) == storage.path(missing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # checked, not created
