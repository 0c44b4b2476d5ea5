"""The notebooks in ``notebooks/``: every cell runs, and the saved outputs are current.

Each notebook runs at its small size (``OPTAX_GRADVAC_NOTEBOOK_SMALL=1``), on a copy in
memory, so that a cell that fails fails the test. The notebooks are committed with the
outputs of a full-size run by ``notebooks/execute.py``, stamped with the hash of the code
cells and of the package sources they ran on; a stamp that no longer matches fails, with
the command that regenerates them.
"""

import importlib.util
import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _load_execute_script():
  spec = importlib.util.spec_from_file_location("execute", ROOT / "notebooks" / "execute.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


execute = _load_execute_script()


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
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(notebook_environment)}},
  )
  client.execute()
  assert notebook.cells[-1].outputs[0]["text"].strip() == sys.prefix


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_saved_outputs_come_from_the_current_code(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  regenerate = f"regenerate its outputs with `{execute.REGENERATE} {path.stem}` and commit it"
  saved = notebook.metadata.get(execute.METADATA_KEY, {}).get("stamp")
  assert saved is not None, f"{path.name} is saved without outputs or stamp: {regenerate}"
  current = execute.stamp(notebook)
  assert saved["code_cells"] == current["code_cells"], (
    f"{path.name}: its code cells changed since its outputs were saved: {regenerate}"
  )
  assert saved["package"] == current["package"], (
    f"{path.name}: the package sources (optax_gradvac/**/*.py) changed since its outputs "
    f"were saved: {regenerate} (`{execute.REGENERATE}` reruns every notebook)"
  )

  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
    f"{path.name}: its code cells were not run once each, top to bottom: {regenerate}"
  )
  outputs = [output for cell in code for output in cell.outputs]
  assert any("image/png" in output.get("data", {}) for output in outputs), (
    f"{path.name} is saved without its figures: {regenerate}"
  )
  errors = [
    index
    for index, cell in enumerate(code)
    if any(output.output_type == "error" for output in cell.outputs)
  ]
  assert not errors, f"{path.name}: code cells {errors} saved an error: {regenerate}"
