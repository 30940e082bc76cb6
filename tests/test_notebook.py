"""notebooks/colab_tpu.ipynb, run top to bottom in its demo mode (tiny offline model, CPU) in a
Jupyter kernel, cell by cell: every command it shows works with the code as it is."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from train_support import REPO, cli_env

pytestmark = pytest.mark.xdist_group("notebook")

NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"


def tagged(notebook: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    (cell,) = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    return cell


def images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


def text(cell: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def test_the_committed_notebook_has_no_outputs():
    # Outputs of a run would go stale as the code changes; the test below makes its own.
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_the_notebook_runs_in_demo_mode(tmp_path, monkeypatch):
    # The kernel and the commands it starts inherit this environment: demo mode, and the test
    # session's compilation cache (the CLIs' default cache would be in the home directory).
    for key, value in cli_env(SDXL_TPU_NOTEBOOK_DEMO="1").items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except CellExecutionError as error:
        # The traceback says which cell; the command's own message is in the cell's output.
        (failed,) = [c for c in notebook.cells if any(o.output_type == "error" for o in c.get("outputs", []))]
        pytest.fail(f"{error}\n--- output of the failed cell ---\n{text(failed)[-4000:]}")

    run_dir = tmp_path / "sdxl-tpu-demo" / "runs" / "sdxl-lora"
    train = text(tagged(notebook, "train"))
    assert "train:" in train and "20/20" in train  # the trainer's progress bar reached the cell
    assert images(tagged(notebook, "loss-curve")) == 1
    # Steps 10 and 20: one grid each.
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step_0000010.png", "step_0000020.png"]
    assert images(tagged(notebook, "validation-images")) == 2
    assert images(tagged(notebook, "generated-images")) == 2  # one per prompt
    lora_file = run_dir / "export" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file() and lora_file.stat().st_size > 0
