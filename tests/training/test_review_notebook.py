"""The review notebook runs top to bottom against a store with a tiny training run (so it never goes stale)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "review.ipynb"


def test_review_notebook_executes(tracked_store: tuple[str, Path]) -> None:
    _, root = tracked_store  # MLFLOW_TRACKING_URI points at it for the session; the kernel inherits it
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # learning curves and episode plots
    text = "".join(o.get("text", "") for o in outputs) + "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "suite default" in text and "oracle" in text
