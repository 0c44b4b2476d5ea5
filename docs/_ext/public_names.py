"""Links an annotation that names an object by its defining module to its public page.

autodoc writes an annotation as ``obj.__module__ + "." + obj.__qualname__``:
``optax._src.base.GradientTransformationExtraArgs``, ``jax.jaxlib._jax.Array``. The
inventories (``docs/_inventories``) list the public names (``jax.Array``), and which
private path stands behind each depends on the installed version.
So when a Python reference finds no target, this extension looks the name up among the
installed objects behind the inventories' public names, already imported by autodoc, and
resolves the reference to the shortest public name of the same object.
"""

from __future__ import annotations

import sys
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext import intersphinx

_public: dict[str, str] | None = None  # built once per build, at the first miss


def _imported(name: str) -> object | None:
  """The object called ``name`` if its module is imported already (nothing is imported)."""
  parts = name.split(".")
  for split in range(len(parts), 0, -1):
    module = sys.modules.get(".".join(parts[:split]))
    if module is None:
      continue
    value: object = module
    for part in parts[split:]:
      value = getattr(value, part, None)
      if value is None:
        return None
    return value
  return None


def _defining_name(value: object) -> str | None:
  module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
  if isinstance(module, str) and isinstance(qualname, str):
    return f"{module}.{qualname}"
  return None


def _public_names(env: BuildEnvironment) -> dict[str, str]:
  """Defining name -> shortest public name, over the inventories' classes and functions."""
  names: dict[str, str] = {}
  for kind in ("py:class", "py:function", "py:exception"):
    for public in sorted(intersphinx.InventoryAdapter(env).main_inventory.get(kind, {}), key=len):
      value = _imported(public)
      defining = None if value is None else _defining_name(value)
      if defining and defining != public:
        names.setdefault(defining, public)
  return names


def _resolve(
  app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.TextElement
) -> nodes.reference | None:
  if node.get("refdomain") != "py":
    return None
  global _public
  if _public is None:
    _public = _public_names(env)
  public = _public.get(node["reftarget"])
  if public is None:
    return None
  renamed = node.deepcopy()
  renamed["reftarget"] = public
  return intersphinx.missing_reference(app, env, renamed, contnode)


def setup(app: Sphinx) -> dict[str, Any]:
  app.setup_extension("sphinx.ext.intersphinx")
  app.connect("missing-reference", _resolve, priority=900)  # after intersphinx's own try
  return {"parallel_read_safe": True, "parallel_write_safe": True}
