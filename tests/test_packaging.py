"""The packaging metadata agrees with itself: minimum-version pins, version, changelog."""

import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import optax_gradvac

ROOT = pathlib.Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = ROOT / ".ci" / "minimum-versions.txt"


def _lower_bounds() -> dict[str, Version]:
  """The ``>=`` bound of every package that pyproject.toml names, build system included."""
  requirements = [
    *PYPROJECT["build-system"]["requires"],
    *PYPROJECT["project"]["dependencies"],
    *(r for group in PYPROJECT["project"]["optional-dependencies"].values() for r in group),
  ]
  bounds = {}
  for text in requirements:
    requirement = Requirement(text)
    name = canonicalize_name(requirement.name)
    lower = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    if name == "optax-gradvac" or not lower:
      continue
    assert bounds.get(name, lower[0]) == lower[0], f"{name} has two lower bounds"
    bounds[name] = lower[0]
  return bounds


def _pins() -> dict[str, Version]:
  pins = {}
  for line in CONSTRAINTS.read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
      continue
    requirement = Requirement(line)
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{line!r} is not an exact pin"
    pins[canonicalize_name(requirement.name)] = Version(spec.version)
  return pins


def test_every_dependency_is_pinned_at_its_lower_bound():
  bounds, pins = _lower_bounds(), _pins()
  for text in PYPROJECT["project"]["dependencies"]:
    name = canonicalize_name(Requirement(text).name)
    assert name in bounds, f"dependency {text!r} has no lower bound"
    assert pins.get(name) == bounds[name], f"{name}: pinned {pins.get(name)}, bound {bounds[name]}"


def test_every_pin_is_a_lower_bound():
  bounds, pins = _lower_bounds(), _pins()
  for name, version in pins.items():
    if name == "jaxlib":
      continue
    assert name in bounds, f"{name} is pinned but pyproject.toml gives it no lower bound"
    assert version == bounds[name], f"{name}: pinned {version}, bound {bounds[name]}"


def test_jaxlib_is_pinned_with_jax():
  pins = _pins()
  assert pins["jaxlib"] == pins["jax"]


def test_version_comes_from_the_package():
  assert "version" not in PYPROJECT["project"]
  assert "version" in PYPROJECT["project"]["dynamic"]
  attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "optax_gradvac.__version__"
  assert str(Version(optax_gradvac.__version__)) == optax_gradvac.__version__


def test_changelog_has_the_current_version():
  headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
  assert headings[0] == "Unreleased"
  assert optax_gradvac.__version__ in headings
