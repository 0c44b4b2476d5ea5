"""The docs pages: every public symbol has an API entry, and every ``pycon`` example runs."""

import doctest
import pathlib
import re

import jax
import numpy as np
import pytest

import optax_gradvac

DOCS = pathlib.Path(__file__).parent.parent / "docs"
GENERATED = ("_build", "_autosummary", "notebooks")
PAGES = sorted(
  page
  for page in DOCS.rglob("*.md")
  if not any(part in GENERATED for part in page.relative_to(DOCS).parts)
)

# An rst ``autosummary`` directive: its indented body, up to the first unindented line.
AUTOSUMMARY = re.compile(r"^\.\. autosummary::\n((?:[ \t]+.*\n|\n)*)", re.MULTILINE)
PYCON = re.compile(r"^```pycon\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# A page whose examples need optional packages names them, as in
# `<!-- pycon requires: equinox -->`: without them its examples are skipped.
REQUIRES = re.compile(r"^<!-- pycon requires: ([\w, ]+) -->$", re.MULTILINE)


def autosummary_entries(text: str) -> list[str]:
  """The names listed in an rst page's ``autosummary`` directives (options skipped)."""
  return [
    line.strip()
    for block in AUTOSUMMARY.findall(text)
    for line in block.splitlines()
    if line.strip() and not line.strip().startswith(":")
  ]


def test_autosummary_entries_parses_directives():
  text = (
    ".. autosummary::\n   :toctree: x\n\n   foo\n   bar\n\nText, not_a_name.\n\n"
    ".. autosummary::\n\n   baz\n"
  )
  assert autosummary_entries(text) == ["foo", "bar", "baz"]


def test_api_page_lists_every_public_symbol():
  listed = autosummary_entries((DOCS / "api.rst").read_text())
  missing = [name for name in optax_gradvac.__all__ if name not in listed]
  assert not missing, (
    f"in optax_gradvac.__all__ but not on the API page: {missing}. Add each to the "
    "autosummary list of the section of docs/api.rst it belongs to."
  )
  extra = [name for name in listed if name not in optax_gradvac.__all__]
  assert not extra, f"docs/api.rst lists {extra}, which optax_gradvac.__all__ does not export."
  assert len(listed) == len(set(listed)), "docs/api.rst lists a symbol twice."


@pytest.mark.parametrize(
  "page",
  [page for page in PAGES if PYCON.search(page.read_text())],
  ids=lambda page: str(page.relative_to(DOCS)),
)
def test_pycon_examples_run(page):
  """The page's ``pycon`` blocks, in order, share one namespace, as in a doctest file."""
  for requirement in REQUIRES.findall(page.read_text()):
    for module in requirement.split(","):
      pytest.importorskip(module.strip(), reason=f"{page.name} needs {module.strip()}")
  source = "\n".join(PYCON.findall(page.read_text()))
  parser = doctest.DocTestParser()
  test = parser.get_doctest(source, {}, page.name, str(page), 0)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  # With jax's traceback filtering on, an error raised inside a jax transformation carries
  # a note, and doctest before Python 3.11.4 or so compares the last line that it prints (the
  # note) instead of the error's message.
  filtering = jax.config.jax_traceback_filtering
  jax.config.update("jax_traceback_filtering", "off")
  try:
    runner.run(test)
  finally:
    jax.config.update("jax_traceback_filtering", filtering)
  results = runner.summarize(verbose=False)
  assert results.attempted > 0
  assert results.failed == 0, f"{results.failed} example(s) failed in {page}; see the output above"


def test_the_readme_quickstart_runs_as_written(capsys):
  """The README's first example, verbatim: every task's loss falls, their sum threefold."""
  readme = (DOCS.parent / "README.md").read_text()
  (code,) = re.findall(r"^<!-- test:quickstart -->\n```python\n(.*?)^```$", readme, re.M | re.S)
  exec(compile(code, "README.md", "exec"), {})
  first, last = (
    np.array(line.split("[")[1].rstrip("]").split(), float)
    for line in capsys.readouterr().out.splitlines()
  )
  assert np.all(last < first) and last.sum() < first.sum() / 3, (first, last)
