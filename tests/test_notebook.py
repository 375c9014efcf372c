"""The architecture walkthrough, notebooks/01_architecture.ipynb: committed without outputs, and run from a fresh
kernel with nbclient (the maintained runner behind nbconvert's ExecutePreprocessor) within its two-minute budget.

Running it is what keeps it true: every step calls the pipeline's own code (the toy models, `build_anymal`, the
token layout, `caption_loss`, `generate_captions`, the published 8B configs), so a change there that breaks the
walkthrough fails here. The assertions read what the notebook printed.
"""

import re
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from pipeline.toy.world import parse_caption

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_architecture.ipynb"
BUDGET_S = 120


def test_committed_notebook_has_no_outputs():
    """Outputs (images, timings, paths of a temporary directory) stay out of git; the notebook stays valid."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    with_outputs = [i for i, cell in enumerate(code_cells) if cell.outputs or cell.execution_count is not None]
    assert not with_outputs, f"code cells {with_outputs} hold outputs; clear all outputs before committing"


def test_architecture_notebook_runs_from_a_fresh_kernel():
    """Every cell runs without an error in a new kernel, in under two minutes; the walkthrough shows what it says:
    the plots, the latents in the image slots, a falling loss, a well-formed caption and the 8B shapes."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=BUDGET_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    started = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - started
    print(f"{NOTEBOOK.name}: {seconds:.1f} s from a fresh kernel")
    assert seconds < BUDGET_S

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    tables = "".join(output.get("data", {}).get("text/plain", "") for output in outputs)
    # The image, its patch grid, the attention maps before and after training, the loss curve.
    assert len(images) == 5
    assert "features:     (1, 65, 128)" in text and "latents: (1, 8, 128)" in text
    assert "image slots carry the latents: True" in text
    first, last = map(float, re.search(r"loss over 40 steps: ([\d.]+) -> ([\d.]+)", text).groups())
    assert last < first / 2
    generated = re.search(r"^generated: (.*)$", text, re.MULTILINE).group(1)
    assert parse_caption(generated) is not None, generated
    assert "(1, 257, 1024)" in tables and "(1, 64, 4096)" in tables and "8,030,261,248" in tables
