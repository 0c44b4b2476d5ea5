"""Runs the notebooks at their full size and saves them with their outputs and a stamp.

Usage, from the repository root (or anywhere)::

  python notebooks/execute.py                # every notebook in notebooks/
  python notebooks/execute.py quickstart     # only the ones named (with or without .ipynb)

Each notebook runs top to bottom in a fresh ``python3`` kernel of this interpreter, with
this checkout's ``optax_gradvac`` first on ``PYTHONPATH`` (a last check fails the run if
the kernel imported another copy), at full size (``OPTAX_GRADVAC_NOTEBOOK_SMALL`` unset),
in a temporary directory. A cell that raises stops the run and nothing is saved. The
notebook is then written back in place with

* its outputs (figures as PNG) and execution counts, without the volatile metadata that
  would make every run a diff (per-cell timings, widget state, the kernel's
  ``language_info``), and without what went to stderr, which is printed instead;
* ``metadata["optax_gradvac"]["stamp"]``: the SHA-256 of the notebook's code cells and
  the SHA-256 of the package's Python sources (``optax_gradvac/**/*.py``) it ran on;
* ``metadata["optax_gradvac"]["executed_with"]``: the Python, jax, jaxlib, flax, optax and
  numpy versions and the JAX platform, for the reader.

``tests/test_notebooks.py`` recomputes the stamp with :func:`stamp` and fails when the
code cells or the package sources changed since the outputs were saved: rerun this
script then. It needs ``nbclient``, ``nbformat`` and ``ipykernel`` (the ``dev`` extra)
and the notebooks' own packages (the ``examples`` extra). Run it on a CPU-only machine,
so that the saved numbers are the ones a CPU reproduces.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from importlib import metadata

import jax
import nbclient
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parent
ROOT = NOTEBOOKS.parent
PACKAGE = ROOT / "optax_gradvac"
METADATA_KEY = "optax_gradvac"
REGENERATE = "python notebooks/execute.py"
VERSIONS = ("jax", "jaxlib", "flax", "optax", "numpy")


def _sha256(chunks: list[bytes]) -> str:
  digest = hashlib.sha256()
  for chunk in chunks:
    # Length-prefixed, so that no two different sequences of chunks hash alike.
    digest.update(len(chunk).to_bytes(8, "little"))
    digest.update(chunk)
  return digest.hexdigest()


def package_sources() -> list[pathlib.Path]:
  """The package's Python sources, in a fixed order."""
  return sorted(PACKAGE.rglob("*.py"))


def stamp(notebook: dict) -> dict[str, str]:
  """What the saved outputs depend on: the code cells and the package sources.

  Args:
    notebook: the notebook, as ``nbformat`` (or ``json``) reads it.

  Returns:
    ``{"code_cells": sha256, "package": sha256}``.
  """
  code = [
    "".join(cell["source"]).encode()  # nbformat joins sources; raw JSON keeps lists
    for cell in notebook["cells"]
    if cell["cell_type"] == "code"
  ]
  sources = []
  for path in package_sources():
    sources.append(path.relative_to(ROOT).as_posix().encode())
    sources.append(path.read_bytes())
  return {"code_cells": _sha256(code), "package": _sha256(sources)}


def _kernel_spec_dir() -> pathlib.Path:
  """A ``python3`` kernel spec that runs this interpreter, whatever other specs exist."""
  spec_dir = pathlib.Path(tempfile.mkdtemp()) / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return spec_dir.parent.parent


def _executed_with() -> dict[str, str]:
  installed = {dist.metadata["Name"].lower(): dist.version for dist in metadata.distributions()}
  versions = {name: installed[name] for name in VERSIONS if name in installed}
  return {"python": platform.python_version(), **versions, "platform": jax.default_backend()}


def clean(notebook: nbformat.NotebookNode, name: str) -> None:
  """Drops per-cell timings and what went to stderr (shown here instead: the environment's
  warnings, like tqdm's about ipywidgets, are not the notebook's output)."""
  for index, cell in enumerate(notebook.cells):
    cell.metadata.pop("execution", None)
    if cell.cell_type != "code":
      continue
    for output in cell.outputs:
      if output["output_type"] == "error":
        raise RuntimeError(f"{name}: cell {index} saved an error")
      if output["output_type"] == "stream" and output["name"] == "stderr":
        print(f"  {name}: cell {index} wrote to stderr:\n{output['text']}", file=sys.stderr)
    cell.outputs = [
      output
      for output in cell.outputs
      if not (output["output_type"] == "stream" and output["name"] == "stderr")
    ]


def execute(path: pathlib.Path) -> float:
  """Runs one notebook at full size and saves it with outputs and stamp; returns seconds."""
  notebook = nbformat.read(path, as_version=4)
  original_metadata = {
    key: value for key, value in notebook.metadata.items() if key != METADATA_KEY
  }
  notebook.metadata = nbformat.from_dict(original_metadata)
  check = nbformat.v4.new_code_cell("import optax_gradvac\nprint(optax_gradvac.__file__)")
  notebook.cells.append(check)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as work_dir:
    client = nbclient.NotebookClient(
      notebook,
      timeout=1800,
      kernel_name="python3",
      record_timing=False,
      store_widget_state=False,
      resources={"metadata": {"path": work_dir}},
    )
    client.execute()
  seconds = time.perf_counter() - start
  imported = pathlib.Path(check.outputs[0]["text"].strip()).resolve()
  if imported != PACKAGE / "__init__.py":
    raise RuntimeError(f"{path.name}: the kernel imported {imported}, not {PACKAGE}")
  notebook.cells.pop()

  clean(notebook, path.name)
  notebook.metadata = nbformat.from_dict(
    {
      **original_metadata,
      METADATA_KEY: {"stamp": stamp(notebook), "executed_with": _executed_with()},
    }
  )
  nbformat.validate(notebook)
  nbformat.write(notebook, path)
  return seconds


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
  args = parser.parse_args(argv)
  paths = sorted(NOTEBOOKS.glob("*.ipynb"))
  if args.names:
    wanted = {name.removesuffix(".ipynb") for name in args.names}
    unknown = wanted - {path.stem for path in paths}
    if unknown:
      parser.error(f"no such notebook: {', '.join(sorted(unknown))}")
    paths = [path for path in paths if path.stem in wanted]

  os.environ.pop("OPTAX_GRADVAC_NOTEBOOK_SMALL", None)
  os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
  )
  os.environ["JUPYTER_PATH"] = os.pathsep.join(
    filter(None, [str(_kernel_spec_dir()), os.environ.get("JUPYTER_PATH")])
  )
  sys.path.insert(0, str(ROOT))
  total = 0.0
  for path in paths:
    print(f"{path.name} ...", flush=True)
    seconds = execute(path)
    total += seconds
    size = path.stat().st_size / 1024
    print(f"{path.name}: {seconds:.0f} s, saved ({size:.0f} KiB)", flush=True)
  print(f"{len(paths)} notebooks in {total:.0f} s")


if __name__ == "__main__":
  main()
