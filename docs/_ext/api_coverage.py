"""Fails the docs build when a public symbol has no API page.

Every name in ``optax_gradvac.__all__`` must be documented as
``optax_gradvac.<name>``, which an entry in one of the ``autosummary`` lists of
``docs/api.rst`` does. Checked once all pages are read, against the objects that
were actually documented, so a symbol whose entry fails to import is caught too.
"""

import importlib

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)

PACKAGE = "optax_gradvac"
API_PAGE = "api"


def missing_symbols(public: list[str], documented: set[str]) -> list[str]:
  """The public names with no ``PACKAGE.<name>`` among the documented objects."""
  return [name for name in public if f"{PACKAGE}.{name}" not in documented]


def _check(app: Sphinx, env: BuildEnvironment) -> None:
  del app
  public = list(importlib.import_module(PACKAGE).__all__)
  documented = set(env.get_domain("py").objects)
  for name in missing_symbols(public, documented):
    logger.warning(
      "%s.%s is in %s.__all__ but has no API page: add `%s` to the autosummary list "
      "of the section of docs/api.rst it belongs to.",
      PACKAGE,
      name,
      PACKAGE,
      name,
      location=API_PAGE,
      type="api_coverage",
    )
  for name in sorted(documented):
    head, _, tail = name.rpartition(".")
    if head == PACKAGE and tail not in public:
      logger.warning(
        "%s is documented but not in %s.__all__: remove it from docs/api.rst or export it.",
        name,
        PACKAGE,
        location=API_PAGE,
        type="api_coverage",
      )


def setup(app: Sphinx) -> dict[str, object]:
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
