"""notebooks/quickstart.ipynb runs from top to bottom (so it never rots) and is committed without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "onenip-test-python"


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, "strip the outputs before committing"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Executed in a kernel of this very interpreter (a kernelspec written for it), writing under tmp_path."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "onenip-pl test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("ONENIP_QUICKSTART_DIR", str(tmp_path / "work"))
    manager = KernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]),
    )
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, km=manager, timeout=240, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    text = "\n".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "prompt retrieval chose the right product" in text
    assert "max |onnxruntime - PyTorch|" in text and "onnxruntime: score" in text
    figures = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 1, "the heat-map figure was not shown inline"
    assert (tmp_path / "work" / "train" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "work" / "export" / "onenip.onnx").is_file()
