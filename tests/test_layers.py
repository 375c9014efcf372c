"""The code's layers (pyproject.toml, [tool.importlinter]) hold, and a wrong import breaks them.

`lint-imports` reads the contracts from pyproject.toml and the import graph of `pipeline`; `make lint` runs it too.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The package under `root` must be the one imported: it goes first on the path, before the editable install.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_layer_contracts_hold():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 broken" in proc.stdout


def test_an_import_against_the_layers_breaks_a_contract(tmp_path):
    """A copy of the package where the model imports the trainer (model code must know nothing of training)."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    resampler = tmp_path / "pipeline" / "model" / "resampler.py"
    resampler.write_text(resampler.read_text() + "\nfrom pipeline.training import trainer  # noqa: E402,F401\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "pipeline.model is not allowed to import pipeline.training" in proc.stdout
    assert "pipeline.model.resampler -> pipeline.training.trainer" in proc.stdout
