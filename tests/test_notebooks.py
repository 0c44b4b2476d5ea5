"""Runs every notebook in ``notebooks/`` at its small size: a cell that fails fails the test."""

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture
def notebook_environment(tmp_path, monkeypatch):
  """A ``python3`` kernel running this interpreter, with the notebooks' small sizes.

  The kernel spec goes first on ``JUPYTER_PATH``, so the notebooks run in the environment
  under test even where another ``python3`` kernel spec (a user's, a system one) points
  at a different interpreter. The kernel inherits the environment variables.
  """
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("OPTAX_GRADVAC_NOTEBOOK_SMALL", "1")
  work_dir = tmp_path / "work"
  work_dir.mkdir()
  return work_dir


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path, notebook_environment):
  notebook = nbformat.read(path, as_version=4)
  # One more cell checks that the kernel ran in the environment under test.
  notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
  client = nbclient.NotebookClient(
    notebook,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": str(notebook_environment)}},
  )
  client.execute()
  assert notebook.cells[-1].outputs[0]["text"].strip() == sys.prefix


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_saved_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{path.name}: cell {index} was saved with outputs"
      assert cell.execution_count is None, f"{path.name}: cell {index} has an execution count"
