"""Sphinx configuration for the optax_gradvac documentation.

Build (from the repository root): ``sphinx-build -E -W --keep-going -b html docs docs/_build/html``.
Nothing is downloaded at build time: the links into the jax, optax, flax and numpy docs
come from the inventories committed in ``docs/_inventories/`` (written by
``docs/_ext/inventories.py``). The notebooks in ``notebooks/`` are copied into
``docs/notebooks/`` and rendered with the outputs committed in them (``python
notebooks/execute.py`` writes those; the test suite executes the notebooks).
"""

import inspect
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent

# Document this tree's code, installed or not.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import optax_gradvac  # noqa: E402

project = "optax_gradvac"
author = "optax_gradvac authors"
copyright = "optax_gradvac authors"
release = version = optax_gradvac.__version__
REPOSITORY = "https://github.com/optax-gradvac/optax_gradvac"
BRANCH = "main"

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.intersphinx",
  "sphinx.ext.linkcode",
  "sphinx_copybutton",
  "api_coverage",
  "public_names",
]

exclude_patterns = [
  "_build",
  # Written by the multilingual example; included by guides/multilingual.md.
  "multilingual/results.md",
  "multilingual/other_set/results.md",
  # Written by the race; included by guides/multilingual.md.
  "multilingual/race/race.md",
  "**.ipynb_checkpoints",
]
templates_path = ["_templates"]

html_theme = "furo"
html_title = f"optax_gradvac {version}"
html_theme_options = {
  # "View this page" and "Edit this page" at the top of every page.
  "source_repository": f"{REPOSITORY}/",
  "source_branch": BRANCH,
  "source_directory": "docs/",
  "footer_icons": [
    {
      "name": "GitHub",
      "url": REPOSITORY,
      "html": (DOCS / "_static" / "github.svg").read_text(),  # GitHub's mark
      "class": "",
    },
  ],
}

# Links into the docs of the libraries the API speaks of, from the committed inventories
# (docs/_ext/inventories.py writes them; nothing is fetched). Where an annotation names an
# object by a private module (optax._src.base...), docs/_ext/public_names.py finds it.
intersphinx_mapping = {
  name: (url, str(DOCS / "_inventories" / f"{name}.inv"))
  for name, url in [
    ("jax", "https://docs.jax.dev/en/latest/"),
    ("optax", "https://optax.readthedocs.io/en/latest/"),
    ("flax", "https://flax.readthedocs.io/en/latest/"),
    ("flax_linen", "https://flax-linen.readthedocs.io/en/latest/"),
    ("numpy", "https://numpy.org/doc/stable/"),
  ]
}

# Every reference must resolve. The standard library and chex have no inventory here,
# and type variables of private modules have no page: they render as plain code text.
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(chex|collections\.abc|typing)(\..*)?"),
  (r"py:class", r"optax_gradvac\._\w+\.[A-Z]\w*"),
]

# Copy buttons copy the code without the prompts (.gp) and outputs (.go) of pycon blocks.
copybutton_exclude = ".linenos, .gp, .go"

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

# Notebooks: rendered with the outputs committed in them (python notebooks/execute.py
# writes those at full size; tests/test_notebooks.py executes every notebook).
nb_execution_mode = "off"
nb_output_stderr = "remove"
nb_merge_streams = True
nb_render_markdown_format = "gfm"  # the notebooks display Markdown tables


def _copy_notebooks() -> None:
  """Sphinx reads sources only under docs/: the notebooks get a fresh copy there."""
  target = DOCS / "notebooks"
  shutil.rmtree(target, ignore_errors=True)
  target.mkdir()
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(notebook, target / notebook.name)  # keeps mtimes: no needless rereads


_copy_notebooks()


def linkcode_resolve(domain: str, info: dict[str, str]) -> str | None:
  """The lines on GitHub of an API object's source: the "[source]" link of its page."""
  if domain != "py" or not info["module"].startswith("optax_gradvac"):
    return None
  value = sys.modules.get(info["module"])
  for part in info["fullname"].split("."):
    value = getattr(value, part, None)
  try:
    value = inspect.unwrap(value)  # the function under functools.wraps
    path = pathlib.Path(inspect.getsourcefile(value)).resolve().relative_to(ROOT)
    lines, first = inspect.getsourcelines(value)
  except (TypeError, OSError, ValueError):  # no Python source (a NamedTuple field, a value)
    return None
  return f"{REPOSITORY}/blob/{BRANCH}/{path.as_posix()}#L{first}-L{first + len(lines) - 1}"


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


def _page_sources(app, pagename, templatename, context, doctree):
  """Points "View/Edit this page" of the pages made from files outside docs/ at those files."""
  del app, templatename, doctree
  source = {"benchmarks": "benchmarks/README.md"}.get(pagename)
  if pagename.startswith("notebooks/"):
    source = f"{pagename}.ipynb"
  if source:
    context["theme_source_view_link"] = f"{REPOSITORY}/blob/{BRANCH}/{source}"
    context["theme_source_edit_link"] = f"{REPOSITORY}/edit/{BRANCH}/{source}"


def setup(app):
  app.connect("autodoc-process-signature", _short_jax_typing)
  app.connect("autodoc-process-docstring", _namedtuple_fields)
  app.connect("html-page-context", _page_sources)
