"""Writes the Sphinx inventories of jax, optax, flax and numpy that the docs link into.

The docs build runs offline, so ``intersphinx_mapping`` (``docs/conf.py``) reads these
committed files instead of downloading each project's ``objects.inv``. This script makes
them from the projects' own documentation sources and the installed packages::

  python docs/_ext/inventories.py --jax ~/src/jax --optax ~/src/optax \\
    --flax ~/src/flax --numpy ~/src/numpy

Each path is a checkout (any recent commit) of https://github.com/jax-ml/jax,
https://github.com/google-deepmind/optax, https://github.com/google/flax and
https://github.com/numpy/numpy; only their API pages are read (``docs/jax*.rst``,
``docs/api/*.rst``, ``docs_nnx/api_reference`` and ``docs/api_reference``,
``doc/source/reference``). Run it in an environment with jax, optax, flax and numpy
installed, then commit ``docs/_inventories/``.

Where an object's page is:

* ``.. autosummary::`` with ``:toctree: DIR`` gives each listed name a page of its own,
  ``DIR/<full name>.html``, next to the listing page (jax, optax, numpy);
* ``.. autofunction::``, ``.. autoclass::``, ``.. automodule::`` and the other ``auto*``
  and ``py:*`` directives document the object on the page itself, at ``#<full name>``
  (flax), with the members an explicit ``:members: a, b`` names.

Names are relative to the page's ``currentmodule`` (or last ``automodule``). The kind of
each entry (``py:class``, ``py:function``, ``py:data``, ``py:module``) comes from the
installed object, so that a type alias such as ``jax.typing.ArrayLike``, which signatures
reference as a class, resolves; a name the installed package lacks keeps its directive's
kind. An object that a public namespace also exports under a shorter name (flax documents
``flax.nnx.optimizer.Optimizer``; users write ``flax.nnx.Optimizer``) gets that name too.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pathlib
import re
import types
import typing
import zlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "_inventories"


@dataclasses.dataclass(frozen=True)
class Site:
  """One documentation site: its base URL and where its API pages are in the sources."""

  name: str
  url: str
  package: str
  source_root: str  # the Sphinx source directory, relative to the checkout
  pages: tuple[str, ...]  # globs of API pages, relative to source_root
  namespaces: tuple[str, ...]  # modules whose exports get alias entries


SITES = {
  "jax": Site(
    "jax",
    "https://docs.jax.dev/en/latest/",
    "jax",
    "docs",
    ("jax*.rst",),
    ("jax", "jax.numpy", "jax.lax", "jax.random", "jax.tree", "jax.tree_util", "jax.typing"),
  ),
  "optax": Site(
    "optax",
    "https://optax.readthedocs.io/en/latest/",
    "optax",
    "docs",
    ("api/*.rst",),
    ("optax", "optax.tree", "optax.transforms", "optax.schedules", "optax.losses"),
  ),
  "flax": Site(
    "flax",
    "https://flax.readthedocs.io/en/latest/",
    "flax",
    "docs_nnx",
    ("api_reference/**/*.rst",),
    ("flax.nnx", "flax.struct", "flax.training.train_state"),
  ),
  "flax_linen": Site(
    "flax_linen",
    "https://flax-linen.readthedocs.io/en/latest/",
    "flax",
    "docs",
    ("api_reference/**/*.rst",),
    ("flax.linen", "flax.serialization", "flax.struct", "flax.training.train_state"),
  ),
  "numpy": Site(
    "numpy",
    "https://numpy.org/doc/stable/",
    "numpy",
    "doc/source",
    ("reference/**/*.rst",),
    ("numpy",),
  ),
}
CHECKOUT = {"jax": "jax", "optax": "optax", "flax": "flax", "flax_linen": "flax", "numpy": "numpy"}

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:py:)?([\w-]+)::\s*(.*?)\s*$")
_OPTION = re.compile(r"^\s+:([\w-]+):\s*(.*?)\s*$")
_DIRECTIVE_KINDS = {
  "module": "module",
  "automodule": "module",
  "class": "class",
  "autoclass": "class",
  "exception": "class",
  "autoexception": "class",
  "function": "function",
  "autofunction": "function",
  "decorator": "function",
  "autodecorator": "function",
  "method": "method",
  "automethod": "method",
  "data": "data",
  "autodata": "data",
  "attribute": "attribute",
  "autoattribute": "attribute",
}


@dataclasses.dataclass
class Entry:
  name: str
  kind: str  # the directive's kind, replaced by the installed object's where there is one
  uri: str


def _full_name(name: str, current: str | None, package: str) -> str:
  if name.startswith(package + ".") or name == package or not current:
    return name
  return f"{current}.{name}"


def parse_page(path: pathlib.Path, page: str, package: str) -> tuple[list[Entry], set[str]]:
  """The objects one API page documents, and the modules it names."""
  lines = path.read_text(encoding="utf-8").splitlines()
  entries: list[Entry] = []
  modules: set[str] = set()
  current: str | None = None
  index = 0
  while index < len(lines):
    match = _DIRECTIVE.match(lines[index])
    index += 1
    if not match:
      continue
    indent, directive, argument = match.groups()
    options: dict[str, str] = {}
    while index < len(lines) and (option := _OPTION.match(lines[index])):
      options[option.group(1)] = option.group(2)
      index += 1
    if directive == "currentmodule":
      current = argument or None
      if current:
        modules.add(current)
    elif directive == "autosummary":
      content = []
      inside = indent + " "
      while index < len(lines) and (not lines[index].strip() or lines[index].startswith(inside)):
        content.append(lines[index].strip())
        index += 1
      if "toctree" not in options:
        continue  # a table of objects documented elsewhere
      folder = str(pathlib.PurePosixPath(page).parent / options["toctree"].strip("/"))
      for item in content:
        if item and not item.startswith((":", "..")):
          name = _full_name(item.split()[0].lstrip("~"), current, package)
          kind = "class" if name.rsplit(".", 1)[-1][:1].isupper() else "function"
          uri = f"{pathlib.PurePosixPath(folder, name)}.html#{name}".removeprefix("./")
          entries.append(Entry(name, kind, uri))
    elif directive in _DIRECTIVE_KINDS and argument:
      kind = _DIRECTIVE_KINDS[directive]
      name = argument.split("(")[0].strip()
      if kind == "module":
        current = name
        modules.add(name)
        entries.append(Entry(name, "module", f"{page}.html#module-{name}"))
      else:
        name = _full_name(name, current, package)
        entries.append(Entry(name, kind, f"{page}.html#{name}"))
      members = options.get("members", "")
      for member in filter(None, (m.strip() for m in members.split(","))):
        member_name = f"{name}.{member}"
        member_kind = "method" if kind == "class" else "function"
        entries.append(Entry(member_name, member_kind, f"{page}.html#{member_name}"))
  return entries, modules


_MISSING = object()


def resolve(name: str) -> object:
  """The installed object called ``name``, or ``_MISSING``."""
  parts = name.split(".")
  for split in range(len(parts), 0, -1):
    try:
      value = importlib.import_module(".".join(parts[:split]))
    except Exception:  # a missing module, or one that fails to import here
      continue
    for part in parts[split:]:
      value = getattr(value, part, _MISSING)
      if value is _MISSING:
        return _MISSING
    return value
  return _MISSING


def _is_type_alias(value: object) -> bool:
  alias_types = (types.UnionType, types.GenericAlias, typing.TypeVar)
  return isinstance(value, alias_types) or type(value).__module__ == "typing"


def installed_kind(value: object, kind: str) -> str:
  """The inventory kind for an installed object (``kind`` is the directive's)."""
  if value is _MISSING:
    return "class" if kind == "exception" else kind
  if inspect.ismodule(value):
    return "module"
  if inspect.isclass(value) or _is_type_alias(value):
    return "class"
  if kind in ("method", "attribute"):
    return kind
  return "function" if callable(value) else "data"


def build(site: Site, checkout: pathlib.Path) -> list[Entry]:
  """Every object the site documents, with its installed kind and its aliases."""
  root = checkout / site.source_root
  entries: dict[str, Entry] = {}
  modules: set[str] = set(site.namespaces)
  for pattern in site.pages:
    for path in sorted(root.glob(pattern)):
      page = path.relative_to(root).with_suffix("").as_posix()
      page_entries, page_modules = parse_page(path, page, site.package)
      modules |= page_modules
      for entry in page_entries:
        entries.setdefault(entry.name, entry)  # the first page that documents it

  by_object: dict[int, Entry] = {}
  for entry in entries.values():
    value = resolve(entry.name)
    entry.kind = installed_kind(value, entry.kind)
    if value is not _MISSING and (callable(value) or inspect.ismodule(value)):
      by_object.setdefault(id(value), entry)
  for module_name in sorted(modules):
    module = resolve(module_name)
    if not inspect.ismodule(module):
      continue
    for attribute in dir(module):
      if attribute.startswith("_") or f"{module_name}.{attribute}" in entries:
        continue
      target = by_object.get(id(getattr(module, attribute, None)))
      if target is not None:
        name = f"{module_name}.{attribute}"
        entries[name] = Entry(name, target.kind, target.uri)
  return sorted(entries.values(), key=lambda entry: entry.name)


def write(site: Site, entries: list[Entry]) -> pathlib.Path:
  """Writes a version 2 Sphinx inventory (the format of every ``objects.inv``)."""
  header = (
    "# Sphinx inventory version 2\n"
    f"# Project: {site.name}\n"
    "# Version: latest\n"
    "# The remainder of this file is compressed using zlib.\n"
  )
  body = "".join(f"{entry.name} py:{entry.kind} 1 {entry.uri} -\n" for entry in entries)
  OUT.mkdir(exist_ok=True)
  path = OUT / f"{site.name}.inv"
  path.write_bytes(header.encode() + zlib.compress(body.encode(), 9))
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for name in ("jax", "optax", "flax", "numpy"):
    parser.add_argument(f"--{name}", type=pathlib.Path, required=True, help=f"a {name} checkout")
  args = parser.parse_args()
  for site in SITES.values():
    entries = build(site, getattr(args, CHECKOUT[site.name]))
    path = write(site, entries)
    print(f"{path.name}: {len(entries)} objects, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
  main()
