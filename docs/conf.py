"""Sphinx configuration for the optax_gradvac documentation.

Build (from the repository root): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Nothing is downloaded at build time (no intersphinx). The notebooks in ``notebooks/`` are
copied into ``docs/notebooks/`` and executed at their small size on every build.
"""

import inspect
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent

# Document (and run the notebooks against) this tree's code, installed or not.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import optax_gradvac  # noqa: E402

project = "optax_gradvac"
author = "optax_gradvac authors"
copyright = "optax_gradvac authors"
release = version = optax_gradvac.__version__

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "api_coverage",
]

exclude_patterns = [
  "_build",
  # Written by the multilingual example; included by guides/multilingual.md.
  "multilingual/results.md",
  "multilingual/other_set/results.md",
  "**.ipynb_checkpoints",
]
templates_path = ["_templates"]

html_theme = "furo"
html_title = "optax_gradvac"

# Every reference must resolve. Names from jax, optax, flax, numpy and the standard
# library cannot (no intersphinx, so the build works offline), nor can type variables
# of private modules: they render as plain code text.
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|jaxlib|optax|flax|numpy|chex|collections\.abc|typing)(\..*)?"),
  (r"py:class", r"optax_gradvac\._\w+\.[A-Z]\w*"),
]

# API pages.
autosummary_generate = True
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True  # jnp.float32, not <class 'jax.numpy.float32'>
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Markdown pages.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# Notebooks: executed on every build, at the small size the test suite uses.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_in_temp = True
nb_execution_show_tb = True
nb_output_stderr = "remove"
nb_merge_streams = True
nb_render_markdown_format = "gfm"  # the notebooks display Markdown tables
os.environ.setdefault("OPTAX_GRADVAC_NOTEBOOK_SMALL", "1")


def _copy_notebooks() -> None:
  """Sphinx reads sources only under docs/: the notebooks get a fresh copy there."""
  target = DOCS / "notebooks"
  shutil.rmtree(target, ignore_errors=True)
  target.mkdir()
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(notebook, target / notebook.name)  # keeps mtimes: no needless rereads


def _use_this_interpreter_as_kernel() -> None:
  """Runs the notebooks with this Python, whatever other ``python3`` kernels exist.

  The kernel spec goes first on ``JUPYTER_PATH`` (as in tests/test_notebooks.py).
  """
  spec_dir = pathlib.Path(tempfile.mkdtemp()) / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  os.environ["JUPYTER_PATH"] = os.pathsep.join(
    filter(None, [str(spec_dir.parent.parent), os.environ.get("JUPYTER_PATH")])
  )


_copy_notebooks()
_use_this_interpreter_as_kernel()


# jax.typing's ArrayLike and DTypeLike are Unions that autodoc would print expanded.
_JAX_TYPING = [
  (
    re.compile(
      r"~?[\w.]*\bArray \| ~?numpy\.ndarray \| ~?numpy\.bool \| ~?numpy\.number"
      r" \| bool \| int \| float \| complex"
    ),
    "~jax.typing.ArrayLike",
  ),
  (
    re.compile(r"str \| type\[~?typing\.Any\] \| ~?numpy\.dtype \| ~?[\w.]*\bSupportsDType"),
    "~jax.typing.DTypeLike",
  ),
]
# A NamedTuple field with its comment: ``  count: jax.Array  # what it is.``
_FIELD = re.compile(r"^\s+(\w+): [^#\n]+#\s*(.+)$", re.MULTILINE)


def _short_jax_typing(app, what, name, obj, options, signature, return_annotation):
  del app, what, name, obj, options
  for pattern, name in _JAX_TYPING:
    signature = pattern.sub(name, signature) if signature else signature
  return signature, return_annotation


def _namedtuple_fields(app, what, name, obj, options, lines):
  """Lists a state NamedTuple's fields with the comments they carry in the source."""
  del app, name, options
  if what != "class" or not hasattr(obj, "_fields"):
    return
  comments = dict(_FIELD.findall(inspect.getsource(obj)))
  lines.append("")
  lines.append("Fields:")
  lines.append("")
  for field in obj._fields:
    lines.append(f"* ``{field}``: {comments.get(field, '')}")
  lines.append("")


def setup(app):
  app.connect("autodoc-process-signature", _short_jax_typing)
  app.connect("autodoc-process-docstring", _namedtuple_fields)
